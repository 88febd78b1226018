"""The strategy interface: a strategy's settings and the rules the search loop asks it for.

One iteration of `ttc_fast.search.TreeSearch`, for every problem in flight:

    expand  each frontier path is continued `count` times with `expansion_sampling` (one step,
            or to the end); a child's pruning group is `child_group`, its end `child_finish`
    score   the PRM scores the new step of each child (`stepwise`), or every step of whole
            solutions; `rescore` may then change the new scores (lookahead rollouts)
    prune   children that `is_done` join the problem's finished paths; `select` returns each
            problem's next frontier, (path, times to expand it), from its children; the loop
            frees every path not kept
    pick    a problem whose frontier is empty is over: `final_paths` are its n completions
            (fewer when an adaptive strategy stopped early)

`for_problem` may hand a problem to another strategy (routing by difficulty); the root (the
prompt) is a path too, so `select` may expand it again (sampling in rounds; the first expansion
is `first_frontier`); `expansion_sampling` with a token budget and `child_finish` turning
"length" into a checkpoint score partial steps.
Defaults follow search-and-learn: aggregation "last", steps delimited by "\\n\\n", temperature 0.8,
top_p 1.0, max_tokens 2048 (`SEARCH_SAMPLING`).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Callable, ClassVar

from ..sampling import SamplingParams
from ..scores import AGGREGATIONS
from ..tree import Path, ProblemState

SEARCH_SAMPLING = SamplingParams(temperature=0.8, top_p=1.0, max_tokens=2048)
STEP_DELIMITER = "\n\n"


@dataclass(frozen=True)
class PruneContext:
    """What the loop gives `select`: the search's seed (for strategies that draw) and a segmented
    top-k, topk(scores [float32], seg_ptr [int32], k) -> (values, indices, counts), run by
    `ttc_fast.kernels` on the engine's device."""

    seed: int
    topk: Callable


@functools.lru_cache(maxsize=256)
def _expansion_params(base: SamplingParams, delimiter: str, final: bool) -> SamplingParams:
    return replace(base, stop=() if final else (delimiter,), n=1)


@dataclass(frozen=True)
class Strategy:
    n: int = 16
    aggregation: str = "last"
    delimiter: str = STEP_DELIMITER

    needs_verifier: ClassVar[bool] = True  # MajorityVote ranks answers without one
    stepwise: ClassVar[bool] = False  # an expansion writes one step, scored as it comes

    def __post_init__(self):
        self._require_at_least_one("n")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"{type(self).__name__}: aggregation must be one of {', '.join(AGGREGATIONS)}, got {self.aggregation!r}")
        if not self.delimiter:
            raise ValueError(f"{type(self).__name__}: the step delimiter must be non-empty")

    @property
    def name(self) -> str:
        return type(self).__name__

    def _require_at_least_one(self, *settings: str) -> None:
        """A settings check of __post_init__: each named setting is an integer >= 1."""
        for setting in settings:
            value = getattr(self, setting)
            if value < 1:
                raise ValueError(f"{self.name}: {setting} must be >= 1, got {value}")

    def for_problem(self, problem) -> "Strategy":
        """The strategy that runs `problem` (this one)."""
        return self

    @property
    def solutions_at_once(self) -> int:
        """The most whole solutions a problem of a whole-solution strategy holds at once (the
        loop admits problems by it): all n."""
        return self.n

    # --- expand ----------------------------------------------------------------------------------
    def first_frontier(self, root: Path) -> list[tuple[Path, int]]:
        """The first expansion: the prompt's n children (prefilled once, shared). Strategies that
        sample in rounds start with fewer."""
        return [(root, self.n)]

    def is_final_iteration(self, iteration: int) -> bool:
        """Whether expansion `iteration` (from 0) is the last: it then runs to EOS. Whole-solution
        strategies have one."""
        return True

    def step_sampling(self, base: SamplingParams) -> SamplingParams:
        """One step: stop at the delimiter."""
        return _expansion_params(base, self.delimiter, False)

    def expansion_sampling(self, base: SamplingParams, state: ProblemState, k: int) -> SamplingParams:
        """How the k-th path the problem expands in this iteration is continued."""
        return _expansion_params(base, self.delimiter, self.is_final_iteration(state.iteration))

    def child_group(self, parent: Path, j: int, of_root: bool) -> int:
        """The pruning group of the j-th child of `parent`."""
        return parent.group

    def child_finish(self, finish_reason: str, cut: bool) -> str:
        """A child's finish reason from its expansion's ("stop", "eos", "length"); `cut`: it
        reached the policy's context."""
        return finish_reason

    def is_done(self, path: Path, iteration: int) -> bool:
        """Whether a child of expansion `iteration - 1` leaves the search (it finished, or that
        expansion was the last)."""
        return path.finish_reason != "stop" or self.is_final_iteration(iteration - 1)

    # --- score -----------------------------------------------------------------------------------
    def rescore(self, ops, items: list[tuple[ProblemState, Path]]) -> None:
        """After scoring, change the live children's new scores (`ops`: the loop's primitives)."""

    # --- prune -----------------------------------------------------------------------------------
    def select(self, states: list[ProblemState], children: list[list[Path]], ctx: PruneContext) -> list[list[tuple[Path, int]]]:
        """Each problem's next frontier from its new children (those `done` are already among
        its finished paths). Whole-solution strategies expand once."""
        return [[] for _ in states]

    # --- pick ------------------------------------------------------------------------------------
    def final_paths(self, state: ProblemState) -> list[Path]:
        """The problem's n completions, in order (see `best_in_order`)."""
        return best_in_order(state.completed, self.n, self.aggregation)


def best_in_order(paths: list[Path], n: int, aggregation: str) -> list[Path]:
    """Exactly n of `paths`, as search-and-learn: the n best by aggregated score, kept in the
    order they finished (best-of-N: sample order, so that the picks at n < N read the first n
    samples, not the n best); if fewer finished, they are repeated in turn (a, b, a, b, ...)."""
    best = sorted(range(len(paths)), key=lambda i: paths[i].score(aggregation), reverse=True)[:n]
    done = [paths[i] for i in sorted(best)]
    if done and len(done) < n:
        done = (done * -(-n // len(done)))[:n]
    return done
