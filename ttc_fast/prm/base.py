"""What every verifier offers the search: handles on partial solutions, forked as beams
branch, scored one new step at a time (`PRM`). `ModelPRM` (scorer.py) runs a PRM checkpoint in
its own prefix-shared cache; `CallablePRM` (callable.py) calls a Python function."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..scores import aggregate


@dataclass(eq=False)
class PRMHandle:
    """One partial solution being scored: its question, the steps scored so far and (model PRMs)
    its sequence in the PRM's own KV cache."""

    question: str
    steps: list[str] = field(default_factory=list)
    seq: int | None = None  # None for a model PRM's handle whose KV was evicted (re-encoded on use)
    alive: bool = True

    @property
    def num_steps(self) -> int:
        return len(self.steps)


class PRM:
    """Common interface; see the module docstring. `tokens_processed` counts every token this PRM
    ran through its model (prefix + steps + outcome probes + re-encodes + score_full); `stats`
    splits it. `context_processed` is the sum of those tokens' context lengths (a token at
    position p attends p + 1 positions), for the FLOPs of `ttc_fast.flops`."""

    kind: str
    outcome: bool = False
    # Tokens the model ran for each handle of the latest `score_steps` call, and the sum of
    # their context lengths (a search charges both to the handle's problem)
    last_row_tokens: list[int]
    last_row_context: list[int]

    @property
    def default_aggregation(self) -> str:
        return "last" if self.outcome else "min"

    def start(self, question: str) -> PRMHandle:
        return self.start_many([question])[0]

    def start_many(self, questions: list[str]) -> list[PRMHandle]:
        raise NotImplementedError

    def fork(self, handle: PRMHandle, n: int) -> list[PRMHandle]:
        raise NotImplementedError

    def free(self, handle: PRMHandle) -> None:
        raise NotImplementedError

    def free_many(self, handles: list[PRMHandle]) -> None:
        for handle in handles:
            self.free(handle)

    def score_steps(self, handles: list[PRMHandle], steps: list[str]) -> list[float | None]:
        """Each handle's score after its new step; None (the handle unchanged) where a model PRM's
        context cannot hold the step."""
        raise NotImplementedError

    def prefetch(self, items: list[tuple[str, int]]) -> None:
        """A hint: (step, its index in the solution) pairs a coming `score_steps` call will score;
        a model PRM starts encoding them now. Nothing for other verifiers."""

    def score_full(self, question: str, steps: list[str]) -> list[float]:
        raise NotImplementedError

    def score(self, question: str, steps: list[str], how: str | None = None) -> float:
        """One number for a (partial) solution scored without the cache."""
        return aggregate(self.score_full(question, steps), how or self.default_aggregation)

    @staticmethod
    def _check(handles, steps):
        if len(handles) != len(steps):
            raise ValueError(f"score_steps: {len(handles)} handles but {len(steps)} steps")
        for h in handles:
            if not h.alive:
                raise ValueError("score_steps: a handle was already freed")
        if len({id(h) for h in handles}) != len(handles):
            raise ValueError("score_steps: the same handle appears twice in one call")
