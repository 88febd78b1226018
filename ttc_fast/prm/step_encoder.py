"""A model PRM's token ids for new steps (`Format.rows`), encoded ahead of `score_steps`.

Encoding every beam's new step is the PRM's largest host cost (about half a µs of CPU per token
with a real tokenizer: `benchmarks/bench_prm_tokenize.py`). A format encodes many rows in one
batch call of the tokenizer, which encodes them in parallel in Rust. `prefetch` starts that on a
worker thread as soon as the policy finishes some steps, while its other rows still decode (on a
GPU, behind the device's decode steps); `rows` takes those and encodes the rest.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

from .formats import accepted

_POOL: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:  # one thread: the tokenizer's batch call is parallel itself
        _POOL = ThreadPoolExecutor(1, thread_name_prefix="ttc-prm-encode")
    return _POOL


class StepEncoder:
    """`Format.rows` of the PRM's format, for the rows of one `score_steps` call at a time:
    prefetched ones are taken from the worker threads, the rest encoded then. What a call did
    not use is dropped with it (prefetches are hints for the next call only)."""

    def __init__(self, fmt, outcome: bool):
        self.fmt, self.outcome = fmt, outcome
        # (step, index) -> (the batch's future, position in it)
        self._ahead: dict[tuple[str, int], tuple[Future, int]] = {}

    def prefetch(self, items: list[tuple[str, int]]) -> None:
        """Start encoding (step, step index) pairs on the worker thread, as one batch."""
        todo = list(dict.fromkeys(key for key in items if key not in self._ahead))
        if todo:
            batch = _pool().submit(self.fmt.rows, [step for step, _ in todo], [index for _, index in todo], self.outcome)
            for position, key in enumerate(todo):
                self._ahead[key] = (batch, position)

    @staticmethod
    def _taken(found):
        """A prefetched row, or None: not prefetched, or its batch failed as a whole (then the
        row is encoded again, so that only its own error can stop the call)."""
        if found is None:
            return None
        batch, position = found
        try:
            return batch.result()[position]
        except Exception:
            return None

    def rows(self, steps: list[str], indices: list[int]) -> list:
        """Each (step, index)'s (kept ids, tag ids, score offset); a row whose step the format
        rejects raises its error here."""
        ahead, self._ahead = self._ahead, {}
        out = [self._taken(ahead.get(key)) for key in zip(steps, indices)]
        missing = [i for i, row in enumerate(out) if row is None]
        if missing:
            for i, row in zip(missing, self.fmt.rows([steps[i] for i in missing], [indices[i] for i in missing], self.outcome)):
                out[i] = row
        return accepted(out)
