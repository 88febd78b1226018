"""Adaptive sampling: whole solutions drawn in rounds until the vote is settled (Adaptive-
Consistency's Beta stopping rule, Aggarwal et al. 2023), by answer counts or by summed PRM scores."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from ..grading import extract_answer, vote_totals
from ..tree import Path
from .base import Strategy


@dataclass(frozen=True)
class AdaptiveMajority(Strategy):
    """Whole solutions sampled from the prompt in rounds of `round_size`; after each round the
    top two answers' vote counts c1 >= c2 (None answers do not vote) decide: stop once
    P(p1 > p2 | c1, c2) = `beta_stop_probability(c1, c2)` >= `confidence`, or once n solutions
    are drawn. The last round is clamped to what is left of n (n < round_size: one round of n).
    Returns every solution drawn, in sample order: fewer than n when it stopped early.

    Defaults: n 64 (the most solutions a problem may draw), round_size 4, confidence 0.95
    (Adaptive-Consistency's threshold: four agreeing answers in the first round, 31/32, stop),
    aggregation "last", delimiter "\\n\\n". No verifier needed."""

    n: int = 64
    round_size: int = 4
    confidence: float = 0.95

    needs_verifier: ClassVar[bool] = False

    def __post_init__(self):
        super().__post_init__()
        self._require_at_least_one("round_size")
        if not 0.5 < self.confidence < 1:
            raise ValueError(f"{self.name}: confidence must be in (0.5, 1), got {self.confidence}")

    @property
    def solutions_at_once(self) -> int:
        return min(self.round_size, self.n)  # a round at a time

    def first_frontier(self, root: Path) -> list[tuple[Path, int]]:
        return [(root, min(self.round_size, self.n))]

    def vote_weight(self, path: Path) -> float:
        """What one solution adds to its answer's count."""
        return 1.0

    def top_two(self, paths: list[Path]) -> tuple[float, float]:
        """The two largest answer totals over `paths` (0 where there are fewer answers)."""
        answers = [extract_answer(self.delimiter.join(p.steps)) for p in paths]
        totals = sorted(vote_totals(answers, [self.vote_weight(p) for p in paths]), reverse=True)
        totals += [0.0, 0.0]
        return totals[0], totals[1]

    def should_stop(self, drawn: list[Path]) -> bool:
        if len(drawn) >= self.n:
            return True
        return beta_stop_probability(*self.top_two(drawn)) >= self.confidence

    def select(self, states, children, ctx):
        """Every solution has finished (`done`): the problem stops, or the prompt is sampled again."""
        return [[] if self.should_stop(st.completed) else [(st.root, min(self.round_size, self.n - len(st.completed)))]
                for st in states]

    def final_paths(self, state):
        return list(state.completed)


@dataclass(frozen=True)
class AdaptiveWeighted(AdaptiveMajority):
    """Adaptive weighted best-of-N: as `AdaptiveMajority`, but an answer's count is the summed
    aggregated PRM score of its solutions (a score below 0, or not finite, counts 0: the Beta
    posterior needs counts >= 0). PRM scores are at most 1, so this settles no sooner than the
    plain count. Needs a verifier."""

    needs_verifier: ClassVar[bool] = True

    def vote_weight(self, path: Path) -> float:
        score = path.score(self.aggregation)
        return score if math.isfinite(score) and score > 0 else 0.0


def beta_stop_probability(c1: float, c2: float) -> float:
    """P(p1 > p2 | counts c1, c2) for the two leading answers: under a uniform prior the leading
    answer's share p = p1 / (p1 + p2) has posterior Beta(c1 + 1, c2 + 1), and this is
    P(p > 1/2) = I_{1/2}(c2 + 1, c1 + 1). Integer counts: exactly, as a binomial tail
    P(Binomial(c1 + c2 + 1, 1/2) <= c1); real counts (PRM scores): by continued fraction."""
    if not (c1 >= 0 and c2 >= 0 and math.isfinite(c1) and math.isfinite(c2)):
        raise ValueError(f"beta_stop_probability: counts must be finite and >= 0, got {c1}, {c2}")
    if float(c1).is_integer() and float(c2).is_integer():
        k1, k2 = int(c1), int(c2)
        m = k1 + k2 + 1
        return sum(math.comb(m, j) for j in range(k1 + 1)) / 2**m
    return regularized_incomplete_beta(0.5, c2 + 1, c1 + 1)


def regularized_incomplete_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b), the Beta(a, b) distribution function at x (a, b > 0, 0 <= x <= 1), by its
    continued fraction (modified Lentz), on the side of x where it converges fast."""
    if not (a > 0 and b > 0 and 0 <= x <= 1):
        raise ValueError(f"regularized_incomplete_beta: need a, b > 0 and 0 <= x <= 1, got x={x}, a={a}, b={b}")
    if x == 0 or x == 1:
        return float(x)
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1) / (a + b + 2):
        return math.exp(log_front) * _beta_continued_fraction(x, a, b) / a
    # I_x(a, b) = 1 - I_{1-x}(b, a): the fraction converges fast for x below its mean-ish point
    return 1 - math.exp(log_front) * _beta_continued_fraction(1 - x, b, a) / b


def _beta_continued_fraction(x: float, a: float, b: float) -> float:
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    h = d
    # the number of terms needed grows as sqrt(max(a, b))
    for m in range(1, 200 + int(10 * math.sqrt(max(a, b)))):
        for coeff in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                      -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 + coeff * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + coeff / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1) < eps:
            return h
    raise ArithmeticError(f"incomplete beta: no convergence at x={x}, a={a}, b={b}")
