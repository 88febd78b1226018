"""A hard-coded verifier as a PRM: fn(question, steps) -> float (the latest step's score) or
list[float] (one per step; the last is taken). No tokens, no KV cache. In outcome mode it is
called as fn(question, [the steps joined by step_separator]) and judges the whole solution."""
from __future__ import annotations

from typing import Callable

from .base import PRM, PRMHandle


class CallablePRM(PRM):
    """A hard-coded verifier fn(question, steps) -> float | list[float]."""

    def __init__(self, fn: Callable, outcome: bool = False, step_separator: str = "\n\n"):
        self.fn, self.outcome, self.sep = fn, outcome, step_separator
        self.kind = "outcome:callable" if outcome else "callable"
        self.tokens_processed = 0
        self.context_processed = 0
        self.stats = {"tokens_processed": 0, "calls": 0}

    def _call(self, question, steps) -> float:
        self.stats["calls"] += 1
        if self.outcome:
            steps = [self.sep.join(steps)]
        out = self.fn(question, list(steps))
        if isinstance(out, (list, tuple)):
            if not out:
                raise ValueError("the verifier returned an empty list")
            out = out[-1]
        return float(out)

    def start_many(self, questions):
        return [PRMHandle(q) for q in questions]

    def fork(self, handle, n):
        return [PRMHandle(handle.question, list(handle.steps)) for _ in range(n)]

    def free(self, handle):
        handle.alive = False

    def score_steps(self, handles, steps):
        self._check(handles, steps)
        self.last_row_tokens = [0] * len(handles)
        self.last_row_context = [0] * len(handles)
        out = []
        for h, s in zip(handles, steps):
            h.steps.append(s)
            out.append(self._call(h.question, h.steps))
        return out

    def score_full(self, question, steps):
        if self.outcome:
            return [self._call(question, steps)]
        return [self._call(question, steps[: k + 1]) for k in range(len(steps))]
