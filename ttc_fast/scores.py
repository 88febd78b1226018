"""A path's score from its step scores (search-and-learn's aggregations, and the mean)."""
from __future__ import annotations

import math

AGGREGATIONS = ("last", "min", "prod", "mean")


def aggregate(step_scores: list[float], how: str = "last") -> float:
    """One number for a partial solution from its step scores: the last, the minimum, the
    product or the mean."""
    if how not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {how!r}: one of {', '.join(AGGREGATIONS)}")
    if not step_scores:
        raise ValueError("aggregate: no step scores")
    if how == "last":
        return float(step_scores[-1])
    if how == "min":
        return float(min(step_scores))
    if how == "prod":
        return float(math.prod(step_scores))
    return float(sum(step_scores) / len(step_scores))


def path_score(step_scores: list[float], how: str) -> float:
    """A path's score; 0.0, a model PRM's lowest, for a path whose first step did not fit the
    PRM's context (or was cut at the policy's) and so has no score."""
    return aggregate(step_scores, how) if step_scores else 0.0
