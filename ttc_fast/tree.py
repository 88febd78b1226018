"""What a search holds per problem: its paths (the tree's nodes) and its state.

Strategies read and return these; observers (`ttc_fast.search.SearchObserver`) receive them.
A path's `branch` (the policy's cache) and `prm` (the PRM's handle) belong to the search loop,
which frees them when a strategy no longer keeps the path.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .data import Problem
from .flops import context_sum
from .scores import path_score


@dataclass(eq=False)
class Path:
    """A partial or finished solution: its steps, their scores, the policy tokens it took."""

    steps: list[str]
    scores: list[float]
    tokens: int = 0
    group: int = 0  # pruning group inside the problem (a DVTS subtree; 0 for beam search)
    finish_reason: str = "stop"  # "stop": a step ended at the delimiter; "eos" / "length": the path ended
    cut: bool = False  # its last step was cut at the policy's context: kept as text, not scored
    done: bool = False  # it left the search (finished, or at the last iteration)
    branch: object | None = None  # the policy's cache (engine Branch); None once released
    prm: object | None = None  # the PRM's handle; None once freed

    def score(self, aggregation: str) -> float:
        return path_score(self.scores, aggregation)


@dataclass(eq=False)
class ProblemState:
    """One problem in flight: its root (the prompt), the paths to expand next and how often
    (`frontier`), and its finished paths. `strategy` runs this problem (one per problem)."""

    index: int  # position in the data set: keys the problem's random streams
    problem: Problem
    strategy: object
    root: Path
    started: float
    frontier: list[tuple[Path, int]] = field(default_factory=list)
    completed: list[Path] = field(default_factory=list)
    # finished paths kept out of `completed` when another strategy takes the problem over (a
    # routed problem's probes): they join its completions after the new strategy's own
    set_aside: list[Path] = field(default_factory=list)
    iteration: int = 0
    policy_tokens: int = 0  # generated, pruned paths and rollouts included
    prm_tokens: float = 0
    # What the FLOPs are computed from (ttc_fast.flops): the prompt's length, and the sums of the
    # context lengths of the policy's processed tokens and of the PRM's
    prompt_tokens: int = 0
    policy_context: int = 0
    prm_context: float = 0

    def charge_generated(self, length: int, count: int) -> None:
        """`count` tokens generated at the end of a sequence now `length` tokens long."""
        self.policy_tokens += count
        self.policy_context += context_sum(length - count, count)
