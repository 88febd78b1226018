"""Best-of-N and its relatives: N whole solutions sampled at once, each scored step by step."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import Strategy


@dataclass(frozen=True)
class BestOfN(Strategy):
    """N independent solutions, scored step by step by the PRM; the pick is the best score
    (majority and weighted picks are reported too: one run serves all three)."""


@dataclass(frozen=True)
class MajorityVote(BestOfN):
    """N independent solutions; the pick is the most frequent answer (no PRM needed)."""

    needs_verifier: ClassVar[bool] = False


@dataclass(frozen=True)
class WeightedBestOfN(BestOfN):
    """N independent solutions; the pick is the answer with the largest summed PRM score."""
