"""Search strategies: small validated configurations. The loop that runs them is `search.py`.

Defaults follow search-and-learn: width 4, 40 iterations, aggregation "last", steps delimited by
"\\n\\n". Sampling defaults (temperature 0.8, top_p 1.0, max_tokens 2048) are `SEARCH_SAMPLING`.
"""
from __future__ import annotations

from dataclasses import dataclass

from .prm import AGGREGATIONS
from .sampling import SamplingParams

SEARCH_SAMPLING = SamplingParams(temperature=0.8, top_p=1.0, max_tokens=2048)
STEP_DELIMITER = "\n\n"


@dataclass(frozen=True)
class Strategy:
    n: int = 16
    aggregation: str = "last"
    delimiter: str = STEP_DELIMITER

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"{type(self).__name__}: n must be >= 1, got {self.n}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"{type(self).__name__}: aggregation must be one of {', '.join(AGGREGATIONS)}, got {self.aggregation!r}")
        if not self.delimiter:
            raise ValueError(f"{type(self).__name__}: the step delimiter must be non-empty")

    @property
    def name(self) -> str:
        return type(self).__name__


@dataclass(frozen=True)
class BestOfN(Strategy):
    """N independent solutions, scored step by step by the PRM; the pick is the best score
    (majority and weighted picks are reported too: one run serves all three)."""


@dataclass(frozen=True)
class MajorityVote(BestOfN):
    """N independent solutions; the pick is the most frequent answer (no PRM needed)."""


@dataclass(frozen=True)
class WeightedBestOfN(BestOfN):
    """N independent solutions; the pick is the answer with the largest summed PRM score."""


@dataclass(frozen=True)
class BeamSearch(Strategy):
    """N beams: each iteration keeps the top N/width by aggregated PRM score and expands each
    `width` times by one step; the last iteration runs to EOS."""

    width: int = 4
    iterations: int = 40
    lookahead: int = 0  # roll each candidate out this many greedy steps; the PRM scores the end
    # search-and-learn's filter_duplicates: of live candidates with the same text, only the first
    # competes for the kept beams
    filter_duplicates: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.width < 1 or self.n % self.width:
            raise ValueError(f"{self.name}: n ({self.n}) must be a positive multiple of width ({self.width})")
        if self.iterations < 1:
            raise ValueError(f"{self.name}: iterations must be >= 1, got {self.iterations}")
        if self.lookahead < 0:
            raise ValueError(f"{self.name}: lookahead must be >= 0, got {self.lookahead}")

    @property
    def keep(self) -> int:
        """Beams kept per pruning group."""
        return self.n // self.width


@dataclass(frozen=True)
class DVTS(BeamSearch):
    """Diverse verifier tree search: n/width independent subtrees; each keeps its best candidate
    per step and expands it `width` times. A subtree is done when its best candidate has
    finished (or at the last iteration); it returns its `width` best finished paths."""

    @property
    def keep(self) -> int:
        return 1


@dataclass(frozen=True)
class ParticleFiltering(Strategy):
    """n particles each advance one step; then n particles are resampled (with replacement) in
    proportion to softmax(aggregated PRM score / temperature). Finished particles are kept."""

    iterations: int = 40
    temperature: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        if self.iterations < 1:
            raise ValueError(f"{self.name}: iterations must be >= 1, got {self.iterations}")
        if not self.temperature > 0:
            raise ValueError(f"{self.name}: temperature must be > 0, got {self.temperature}")


STRATEGIES = {cls.__name__: cls for cls in (BestOfN, MajorityVote, WeightedBestOfN, BeamSearch, DVTS, ParticleFiltering)}
