"""REBASE, reward-balanced search: a problem's remaining budget of expansions is shared among its
live paths in proportion to softmax(score / T), step by step."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from .base import Strategy


@dataclass(frozen=True)
class Rebase(Strategy):
    """Reward-balanced search (REBASE, Wu et al. 2024). The prompt is expanded n times by one
    step; then, each iteration, the budget B = n - (paths finished so far) is shared among the
    live paths: path i is expanded round(B * softmax(score / temperature)_i) times (largest
    remainder rounding, so the counts sum to B); a path given none is dropped. The last
    iteration runs to EOS. A problem stops when B is spent or no path is live.

    Defaults: n 16, iterations 40 (as beam search), temperature 0.2 (`softmax_temperature` of the
    authors' configuration, thu-wyz/rebase hype-parameters/rebase.yaml: with PRM scores in
    [0, 1], a path 0.2 better gets e times the expansions, favouring the best while keeping
    several alive),
    aggregation "last", delimiter "\\n\\n"."""

    iterations: int = 40
    temperature: float = 0.2

    stepwise: ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()
        self._require_at_least_one("iterations")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"{self.name}: temperature must be a finite number > 0, got {self.temperature}")

    def is_final_iteration(self, iteration: int) -> bool:
        return iteration >= self.iterations - 1

    def select(self, states, children, ctx):
        frontiers = []
        for st, paths in zip(states, children):
            live = [p for p in paths if not p.done]
            budget = self.n - len(st.completed)
            counts = balanced_allocation([p.score(self.aggregation) for p in live], budget, self.temperature)
            frontiers.append([(path, count) for path, count in zip(live, counts) if count])
        return frontiers


def balanced_allocation(scores: list[float], budget: int, temperature: float) -> list[int]:
    """Expansions per candidate: budget * softmax(scores / temperature), rounded by largest
    remainder so that they sum to exactly `budget` (equal remainders: the earlier candidate).
    No budget or no candidates: all zero."""
    if budget <= 0 or not scores:
        return [0] * len(scores)
    top = max(scores)  # subtracted so that exp cannot overflow at small temperatures
    weights = [math.exp((s - top) / temperature) for s in scores]
    total = sum(weights)
    shares = [budget * w / total for w in weights]
    counts = [math.floor(share) for share in shares]
    left = budget - sum(counts)
    by_remainder = sorted(range(len(scores)), key=lambda i: (-(shares[i] - counts[i]), i))
    for i in by_remainder[:left]:
        counts[i] += 1
    return counts
