"""Sampling parameters, validated, and the per-sample random streams.

Randomness is counter-based: the token at position p of a sample is drawn with noise that is a
hash of (sample seed, p, token id) (see `ttc_fast.kernels.sampling`). A sample's continuation
therefore does not depend on what else is in the batch, on preemption and recompute, or on the
backend: the torch reference and the Triton kernel draw the same tokens.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus mass; 1.0 = off
    top_k: int = 0  # 0 = off
    max_tokens: int = 256
    stop: tuple[str, ...] = ()  # stop strings (e.g. the step delimiter "\n\n")
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None  # None: fresh randomness each call
    n: int = 1  # samples per prompt; they share the prompt's blocks
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False

    def __post_init__(self):
        # Accept lists (and a single string) for convenience; store tuples so params stay hashable.
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in (self.stop_token_ids or ())))
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 turns it off), got {self.top_k}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")


def splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sample_seed(base_seed: int, *keys: int) -> int:
    """A 63-bit seed for one sample stream, derived from the request seed and its indices."""
    x = splitmix64(base_seed & _MASK64)
    for k in keys:
        x = splitmix64(x ^ (k & _MASK64))
    return x & ((1 << 63) - 1)


def fresh_seed() -> int:
    return int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1)
