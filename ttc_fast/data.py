"""Problem sets for search runs: MATH-500 and GSM8K JSONL files.

One JSON object per line, in either format (detected per line):

* MATH-500: ``problem``, ``answer`` (the gold LaTeX answer), optional ``unique_id``, ``level``,
  ``subject``, ``solution``;
* GSM8K: ``question``, ``answer`` (a worked solution ending in a ``#### <number>`` line; the gold
  kept in ``Problem.answer`` is that number, commas removed, and the full field goes to
  ``meta["solution"]``).

Blank lines are skipped.  A malformed line raises ``ValueError`` naming the file, the 1-based
line number and the problem (also for a duplicate id); a missing file raises
``FileNotFoundError``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from .grading import gsm8k_gold

__all__ = ["Problem", "load_problems"]


@dataclass
class Problem:
    id: str
    question: str
    answer: str  # gold answer; for GSM8K the number after "####"
    kind: Literal["math", "gsm8k"]
    meta: dict[str, Any] = field(default_factory=dict)


def _parse_line(obj: Any, n: int) -> Problem:
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")

    def text(key: str) -> str:
        v = obj[key]
        if not isinstance(v, str):
            raise ValueError(f"key {key!r} must be a string, got {type(v).__name__}")
        if not v.strip():
            raise ValueError(f"key {key!r} is empty")
        return v

    if "problem" in obj:
        kind = "math"
        question = text("problem")
    elif "question" in obj:
        kind = "gsm8k"
        question = text("question")
    else:
        raise ValueError("missing key 'problem' (MATH) or 'question' (GSM8K)")
    if "answer" not in obj:
        raise ValueError("missing key 'answer'")
    raw_answer = text("answer")

    uid = obj.get("unique_id")
    if uid is not None and not isinstance(uid, (str, int)):
        raise ValueError(f"key 'unique_id' must be a string, got {type(uid).__name__}")
    pid = str(uid) if uid is not None else f"line-{n}"

    meta = {k: v for k, v in obj.items() if k not in ("problem", "question", "answer", "unique_id")}
    if kind == "gsm8k":
        answer = gsm8k_gold(raw_answer)  # ValueError if no "####"
        meta["solution"] = raw_answer
    else:
        answer = raw_answer.strip()
    return Problem(id=pid, question=question, answer=answer, kind=kind, meta=meta)


def load_problems(path: str | os.PathLike) -> list[Problem]:
    """Read a MATH-500 or GSM8K JSONL file (see the module docstring)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"problem file not found: {path}")
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: invalid JSON: {e.msg} (column {e.colno})") from None
            try:
                p = _parse_line(obj, n)
            except ValueError as e:
                raise ValueError(f"{path}:{n}: {e}") from None
            if p.id in seen:
                raise ValueError(f"{path}:{n}: duplicate id {p.id!r} (first on line {seen[p.id]})")
            seen[p.id] = n
            problems.append(p)
    return problems
