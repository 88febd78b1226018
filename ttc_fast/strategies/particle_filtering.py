"""Particle filtering: n particles advance a step; n are resampled in proportion to their scores."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..sampling import sample_seed
from ..tree import Path
from .base import Strategy


@dataclass(frozen=True)
class ParticleFiltering(Strategy):
    """n particles each advance one step; then n particles are resampled (with replacement) in
    proportion to softmax(aggregated PRM score / temperature). Finished particles are kept; a
    problem stops once n have finished."""

    iterations: int = 40
    temperature: float = 1.0

    stepwise: ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()
        self._require_at_least_one("iterations")
        if not self.temperature > 0:
            raise ValueError(f"{self.name}: temperature must be > 0, got {self.temperature}")

    def is_final_iteration(self, iteration: int) -> bool:
        return iteration >= self.iterations - 1

    def select(self, states, children, ctx):
        frontiers = []
        for st, paths in zip(states, children):
            live = [p for p in paths if not p.done] if len(st.completed) < self.n else []
            g = torch.Generator().manual_seed(sample_seed(ctx.seed, st.index, st.iteration, 1 << 20))
            frontiers.append(self.resample(live, g))
        return frontiers

    def resample(self, paths: list[Path], generator: torch.Generator) -> list[tuple[Path, int]]:
        """Draw len(paths) particles with replacement, p ~ softmax(score / T): a particle drawn k
        times is expanded k times (its copies share its blocks); one never drawn is dropped."""
        if not paths:
            return []
        scores = torch.tensor([p.score(self.aggregation) for p in paths], dtype=torch.float64)
        probs = torch.softmax(scores / self.temperature, dim=0)
        draws = torch.multinomial(probs, len(paths), replacement=True, generator=generator)
        counts = torch.bincount(draws, minlength=len(paths)).tolist()
        return [(path, count) for path, count in zip(paths, counts) if count]
