"""Early rejection (speculative rejection, Sun et al. 2024): best-of-N that stops its worst
partial samples at checkpoints and lets the rest finish."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from ..tree import Path
from .base import Strategy


@dataclass(frozen=True)
class EarlyReject(Strategy):
    """n samples of a problem decode together, one step per expansion, each step scored by the
    PRM as it comes. After every `checkpoint_steps` steps, for `rounds` checkpoints, the problem's
    live samples are ranked by aggregated score and the lowest floor(`reject_fraction` x live) are
    stopped and freed, never leaving fewer than `min_keep` live; the survivors are continued
    untouched until the next checkpoint. Samples that finished before a checkpoint are
    completions, not candidates for rejection. The last of `iterations` expansions runs to EOS.

    Checkpoints sit at step boundaries because a PRM scores whole steps (its step tag follows a
    step): a checkpoint mid-step would score a step cut in half.

    Defaults: reject_fraction 0.5 (the fraction Sun et al. report), checkpoint_steps 1 (the
    first point a PRM can score at all, so the most decoding is saved), rounds 1 (one rejection
    on an early, noisy partial score; further rounds cut deeper into the samples on scores that
    are only a few steps better informed), min_keep 1, iterations 40 (search-and-learn's).

    Ranking ties are broken by sample order (the earlier sample is kept), so a rejection is
    deterministic. The completions are the samples that finished, in sample order: fewer than n
    when some were rejected (nothing is repeated to fill n)."""

    reject_fraction: float = 0.5
    checkpoint_steps: int = 1
    rounds: int = 1
    min_keep: int = 1
    iterations: int = 40

    stepwise: ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.reject_fraction <= 1.0:
            raise ValueError(f"{self.name}: reject_fraction must be in [0, 1], got {self.reject_fraction}")
        self._require_at_least_one("checkpoint_steps")
        if self.rounds < 0:
            raise ValueError(f"{self.name}: rounds must be >= 0, got {self.rounds}")
        if not 1 <= self.min_keep <= self.n:
            raise ValueError(f"{self.name}: min_keep must be in [1, n = {self.n}], got {self.min_keep}")
        self._require_at_least_one("iterations")

    def is_final_iteration(self, iteration: int) -> bool:
        return iteration >= self.iterations - 1

    def child_group(self, parent: Path, j: int, of_root: bool) -> int:
        # a sample's group is its index among the prompt's children: its place in sample order
        return j if of_root else parent.group

    def is_checkpoint(self, steps: int) -> bool:
        """Whether a rejection follows the expansion that wrote step `steps` (from 1)."""
        return steps % self.checkpoint_steps == 0 and steps // self.checkpoint_steps <= self.rounds

    def rejected(self, live: list[Path]) -> list[Path]:
        """The samples a checkpoint stops: the lowest floor(reject_fraction x live) by aggregated
        score (the later sample first among equals), leaving at least min_keep."""
        # (the epsilon: 0.29 x 100 is 28.999... in floats)
        count = min(math.floor(self.reject_fraction * len(live) + 1e-9), max(0, len(live) - self.min_keep))
        ranked = sorted(live, key=lambda p: (-p.score(self.aggregation), p.group))
        return ranked[len(ranked) - count:] if count else []

    def select(self, states, children, ctx):
        frontiers = []
        for st, paths in zip(states, children):
            live = [p for p in paths if not p.done]
            # live samples advance together, a step per expansion: all have written as many
            # steps (counted on the paths, not the problem's iterations, which a routed
            # problem's probe started earlier)
            if live and self.is_checkpoint(len(live[0].steps)):
                gone = {id(p) for p in self.rejected(live)}
                live = [p for p in live if id(p) not in gone]
            frontiers.append([(p, 1) for p in sorted(live, key=lambda p: p.group)])
        return frontiers

    def final_paths(self, state):
        return sorted(state.completed, key=lambda p: p.group)
