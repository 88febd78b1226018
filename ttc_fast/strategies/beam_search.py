"""Beam search: keep the best n / width paths of a problem, expand each `width` times by a step."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..tree import Path, ProblemState
from .base import PruneContext, Strategy


@dataclass(frozen=True)
class BeamSearch(Strategy):
    """N beams: each iteration keeps the top N/width by aggregated PRM score and expands each
    `width` times by one step; the last iteration runs to EOS. A problem stops once N paths
    have finished."""

    width: int = 4
    iterations: int = 40
    lookahead: int = 0  # roll each candidate out this many greedy steps; the PRM scores the end
    # search-and-learn's filter_duplicates: of live candidates with the same text, only the first
    # competes for the kept beams
    filter_duplicates: bool = False

    stepwise: ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()
        if self.width < 1 or self.n % self.width:
            raise ValueError(f"{self.name}: n ({self.n}) must be a positive multiple of width ({self.width})")
        self._require_at_least_one("iterations")
        if self.lookahead < 0:
            raise ValueError(f"{self.name}: lookahead must be >= 0, got {self.lookahead}")

    @property
    def keep(self) -> int:
        """Beams kept per pruning group."""
        return self.n // self.width

    def is_final_iteration(self, iteration: int) -> bool:
        return iteration >= self.iterations - 1

    def rescore(self, ops, items: list[tuple[ProblemState, Path]]) -> None:
        """Lookahead: a candidate's step score is the PRM's score at the end of its greedy rollout."""
        if not self.lookahead:
            return
        for (_, path), score in zip(items, ops.rollout_scores(items, self.lookahead)):
            if score is not None:
                path.scores = path.scores[:-1] + [score]

    def select(self, states, children, ctx):
        live = [[p for p in paths if not p.done] for paths in children]
        # enough finished paths: the problem stops
        live = [[] if len(st.completed) >= self.n else paths for st, paths in zip(states, live)]
        return self.keep_top(live, ctx)

    def keep_top(self, live: list[list[Path]], ctx: PruneContext) -> list[list[tuple[Path, int]]]:
        """One segmented top-k over the pruning groups of every problem: the `keep` best of each
        group, each to be expanded `width` times."""
        candidates, seg_ptr, owners = [], [0], []
        for k, paths in enumerate(live):
            groups: dict[int, list[Path]] = {}
            seen: set[tuple[int, tuple[str, ...]]] = set()
            for path in paths:
                if self.filter_duplicates:
                    text = (path.group, tuple(path.steps))
                    if text in seen:
                        continue
                    seen.add(text)
                groups.setdefault(path.group, []).append(path)
            for g in sorted(groups):
                candidates += groups[g]
                seg_ptr.append(len(candidates))
                owners.append(k)
        frontiers: list[list[tuple[Path, int]]] = [[] for _ in live]
        if not candidates:
            return frontiers
        scores = torch.tensor([p.score(self.aggregation) for p in candidates], dtype=torch.float32)
        _, kept, _ = ctx.topk(scores, torch.tensor(seg_ptr, dtype=torch.int32), self.keep)
        kept_ids = {int(i) for i in kept.flatten().tolist() if i >= 0}
        for (start, end), k in zip(zip(seg_ptr[:-1], seg_ptr[1:]), owners):
            frontiers[k] += [(candidates[i], self.width) for i in range(start, end) if i in kept_ids]
        return frontiers
