"""What the strategy rule tests share: a tiny random policy's engine, a verifier that scores each
path by a hash of its text, and arithmetic problems. The random policy never writes "\\n\\n", so
the step delimiter is "e"."""
from __future__ import annotations

import zlib

import ttc_fast as tf
from ttc_fast.data import Problem
from ttc_fast.testing import build_tiny_model

DELIM = "e"


def path_score(question: str, steps: list[str]) -> float:
    """A verifier whose score is a hash of the whole path: every path scores differently."""
    return (zlib.crc32("\x00".join([question, *steps]).encode("utf-8")) % 1000) / 1000


def tiny_engine(tmp_path_factory, num_blocks: int = 1024) -> tf.Engine:
    """A tiny random llama (seed 5) on the CPU, 4-token blocks."""
    path = build_tiny_model(tmp_path_factory.mktemp("llama"), "llama", seed=5)
    return tf.Engine(tf.load_model(path, device="cpu"), num_blocks=num_blocks, block_size=4)


def problems(k: int, start: int = 0) -> list[Problem]:
    return [Problem(f"p{i}", f"What is {i} times {i + 4}?", str(i * (i + 4)), "math", {}) for i in range(start, start + k)]
