"""Answer extraction, equivalence grading and answer picking for MATH-500 and GSM8K.

Extraction
    ``extract_answer(text)`` returns the content of the last well-formed ``\\boxed{...}`` /
    ``\\fbox{...}`` (balanced, nested braces allowed; ``\\boxed 5`` also works), else the text after
    the last "final answer is" (Minerva style ``The final answer is $X$. I hope it is correct.``),
    else the text after a GSM8K-style ``#### X`` line, else ``None``.

MATH equivalence
    ``math_equal(pred, gold)`` wraps both answers in ``\\boxed{}`` and hands them to the maintained
    ``math_verify`` library (``parse`` + ``verify(gold, pred)``; note ``verify`` is not symmetric,
    the gold goes first).  math_verify guards parsing and comparison with ``signal.alarm``; that only
    works on the main thread, so off the main thread both are called with their timeouts disabled
    (a pathological answer such as ``9^{9^{9^9}}`` can then take a long time; on the main thread it
    is cut off after ``TIMEOUT_S`` seconds and graded False).  Nothing here raises on bad input.

GSM8K
    ``gsm8k_gold`` takes the number after ``####``; ``gsm8k_equal`` compares numbers
    (relative tolerance 1e-6) after stripping ``$``, commas, ``\\boxed{}``, units and a trailing dot.

Picking (best-of-n aggregation, as in search-and-learn's maj@n / naive@n / weighted@n)
    Answers are grouped by EQUIVALENCE using ``same_answer``, the same math_verify equivalence that
    grades them: answers identical after removing whitespace, and plain integers of equal value,
    are equal without the parser; otherwise both are parsed and ``verify`` is tried in both
    directions (it is asymmetric), so ``\\frac12`` / ``0.5``, ``x = 5`` / ``5`` and
    ``\\{2,1\\}`` / ``\\{1,2\\}`` share a group.  An answer math_verify cannot parse into an
    expression only matches the same text (whitespace ignored).  Answers are walked in order and
    each joins the first group whose REPRESENTATIVE (its first member) is ``same_answer`` with it,
    else starts a new group.  Since equivalence is checked against the representative only, the
    grouping depends on the order of the answers only where equivalence is not transitive, which
    math_verify's numeric rounding and percentage handling can cause (``10\\%`` matches both
    ``10`` and ``0.1``, which do not match each other).  ``None`` / empty answers never win unless
    every answer is ``None``.  Ties are broken deterministically: the group whose first member
    appears earliest wins, and a group is represented by its earliest member's surface form.
"""
from __future__ import annotations

import math
import re
import threading
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from functools import lru_cache
from typing import Iterable, Sequence

__all__ = [
    "TIMEOUT_S",
    "extract_answer",
    "math_equal",
    "gsm8k_gold",
    "gsm8k_equal",
    "grade",
    "same_answer",
    "pick_majority",
    "pick_best",
    "pick_weighted",
    "picks_at_n",
]

#: seconds math_verify may spend parsing / comparing one answer (main thread only; whole seconds,
#: since math_verify uses ``signal.alarm``).
TIMEOUT_S = 5

# --------------------------------------------------------------------------------------------
# extraction
# --------------------------------------------------------------------------------------------

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_FINAL_RE = re.compile(r"final\s+answer\s+is\s*:?", re.IGNORECASE)
_HASH_RE = re.compile(r"^\s*####\s*(.+?)\s*$", re.MULTILINE)
_HOPE_RE = re.compile(r"\s*I\s+hope\s+it\s+is\s+correct\.?\s*$", re.IGNORECASE)


def _box_content(text: str, start: int) -> str | None:
    """Content of the box whose command ends at ``start``; None if malformed or empty."""
    i = start
    n = len(text)
    while i < n and text[i] in " \t":
        i += 1
    if i >= n:
        return None
    if text[i] == "{":
        depth = 0
        j = i
        while j < n:
            c = text[j]
            if c == "\\":  # skip escaped characters such as \{ and \}
                j += 2
                continue
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    inner = text[i + 1 : j].strip()
                    return inner or None
            j += 1
        return None  # unbalanced (e.g. a truncated generation)
    if i == start:  # "\boxed5" is not a box; "\boxed 5" is
        return None
    m = re.match(r"[^\s$]+", text[i:])
    if not m:
        return None
    inner = m.group(0).rstrip(".,;")
    return inner or None


def _clean_tail(s: str) -> str | None:
    s = _HOPE_RE.sub("", s.strip())
    s = s.strip()
    if s.startswith("$"):
        m = re.match(r"\$+((?:\\.|[^\\])*?)\$+", s, re.DOTALL)
        s = m.group(1) if m else s.strip("$")
    s = s.strip().rstrip(".").strip().strip("$").strip()
    return s or None


def extract_answer(text: str) -> str | None:
    """The final answer of a completion (see the module docstring), or None."""
    if not isinstance(text, str) or not text:
        return None
    for m in reversed(list(_BOX_RE.finditer(text))):
        inner = _box_content(text, m.end())
        if inner is not None:
            return inner
    finals = list(_FINAL_RE.finditer(text))
    if finals:
        tail = text[finals[-1].end() :].strip()
        m = re.match(r"(\$\$?)((?:\\.|[^\\])*?)\1", tail, re.DOTALL)  # "$X$" or "$$X$$"
        line = m.group(2) if m else tail.split("\n", 1)[0]
        ans = _clean_tail(line)
        if ans is not None:
            return ans
    hashes = _HASH_RE.findall(text)
    if hashes:
        return _clean_tail(hashes[-1])
    return None


# --------------------------------------------------------------------------------------------
# math_verify glue
# --------------------------------------------------------------------------------------------


def _timeout() -> int | None:
    """math_verify's alarm-based timeout only works on the main thread: disable it elsewhere."""
    return TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


@lru_cache(maxsize=16384)
def _parse(ans: str) -> tuple:
    from math_verify import parse

    try:
        out = parse("\\boxed{" + ans + "}", parsing_timeout=_timeout())
        if not out:
            out = parse("$" + ans + "$", parsing_timeout=_timeout())
        return tuple(out)
    except BaseException as e:  # never let grading crash a run; KeyboardInterrupt passes through
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        return ()


def _squash(s: str) -> str:
    return re.sub(r"\s+", "", s)


def _verify(gold: tuple, pred: tuple) -> bool:
    """math_verify's ``verify(gold, pred)`` on two ``_parse`` results, under its own timeout on the
    main thread (none elsewhere, see ``_timeout``); False on any error or timeout."""
    from math_verify import verify

    try:
        return bool(verify(list(gold), list(pred), timeout_seconds=_timeout()))
    except BaseException as e:
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        return False


@lru_cache(maxsize=65536)
def _math_equal_cached(pred: str, gold: str) -> bool:
    g = _parse(gold)
    p = _parse(pred)
    if not g or not p:
        return _squash(pred) == _squash(gold)
    return _verify(g, p)


def math_equal(pred: str | None, gold: str) -> bool:
    """MATH-style equivalence of an extracted answer ``pred`` with the gold answer (math_verify)."""
    if not isinstance(pred, str) or not isinstance(gold, str):
        return False
    pred, gold = pred.strip(), gold.strip()
    if not pred or not gold:
        return False
    if pred == gold:
        return True
    if _PLAIN_INT.match(pred) and _PLAIN_INT.match(gold):  # the common case, without a parser
        return int(pred) == int(gold)
    return _math_equal_cached(pred, gold)


_PLAIN_INT = re.compile(r"-?\d{1,15}\Z")


# --------------------------------------------------------------------------------------------
# GSM8K
# --------------------------------------------------------------------------------------------

_NUM_RE = re.compile(r"-?\d+(?:\.\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?|-?\.\d+")


def gsm8k_gold(answer_field: str) -> str:
    """The number after ``####`` in a GSM8K answer field, commas removed."""
    if not isinstance(answer_field, str) or "####" not in answer_field:
        raise ValueError(f"GSM8K answer has no '####' line: {answer_field!r:.80}")
    tail = answer_field.rsplit("####", 1)[1].strip()
    tail = tail.replace(",", "").replace("$", "").strip().rstrip(".")
    if not tail:
        raise ValueError(f"GSM8K answer has nothing after '####': {answer_field!r:.80}")
    return tail


def _gsm8k_number(s: str) -> Fraction | None:
    s = s.strip()
    boxed = extract_answer(s) if "\\boxed" in s or "\\fbox" in s else None
    if boxed is not None:
        s = boxed
    s = re.sub(r"\\(?:text|mbox|mathrm|textbf)\{[^{}]*\}", " ", s)  # units written as text
    s = re.sub(r"\\d?frac\{([^{}]*)\}\{([^{}]*)\}", r"(\1)/(\2)", s)
    s = s.replace("\\$", "").replace("$", "").replace("\\!", "").replace("{,}", "")
    s = s.replace("\\%", "").replace("%", "").replace("(", "").replace(")", "")
    s = re.sub(r"(?<=\d),(?=\d{3}\b)", "", s)  # thousands separators
    s = s.replace("\u2212", "-")
    if "=" in s:
        s = s.rsplit("=", 1)[1]
    m = _NUM_RE.search(s)
    if not m:
        return None
    tok = re.sub(r"\s+", "", m.group(0))
    try:
        if "/" in tok:
            a, b = tok.split("/")
            return Fraction(Decimal(a)) / Fraction(Decimal(b))
        return Fraction(Decimal(tok))
    except (InvalidOperation, ZeroDivisionError, ValueError):
        return None


def gsm8k_equal(pred: str | None, gold: str) -> bool:
    """Numeric equality of a GSM8K prediction with the gold number (relative tolerance 1e-6)."""
    if not isinstance(pred, str) or not isinstance(gold, str):
        return False
    try:
        a, b = _gsm8k_number(pred), _gsm8k_number(gold)
    except Exception:
        return False
    if a is None or b is None:
        return False
    if a == b:
        return True
    return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-9)


def grade(pred_text_or_answer: str | None, gold: str, kind: str) -> bool:
    """Grade a completion or an extracted answer against ``gold``.

    ``extract_answer`` is tried first; if it finds nothing the input is taken to be the answer
    itself.  ``kind`` is ``"math"`` or ``"gsm8k"`` (any other kind raises ValueError).
    """
    if kind not in ("math", "gsm8k"):
        raise ValueError(f"kind must be 'math' or 'gsm8k', got {kind!r}")
    if not isinstance(pred_text_or_answer, str):
        return False
    ans = extract_answer(pred_text_or_answer)
    if ans is None:
        ans = pred_text_or_answer.strip()
    return math_equal(ans, gold) if kind == "math" else gsm8k_equal(ans, gold)


# --------------------------------------------------------------------------------------------
# equivalence groups and picks
# --------------------------------------------------------------------------------------------


def same_answer(a: str | None, b: str | None) -> bool:
    """True when ``a`` and ``b`` are non-empty answers that are identical after removing
    whitespace, or that ``math_equal`` finds equivalent either way round (math_verify's ``verify``
    is asymmetric: "x<2" vs "(-\\infty,2)").  Never raises."""
    if not (_is_answer(a) and _is_answer(b)):
        return False
    return _squash(a) == _squash(b) or math_equal(a, b) or math_equal(b, a)


def _is_answer(a) -> bool:
    return isinstance(a, str) and bool(a.strip())


def _score(x) -> float:
    try:
        f = float(x)
    except (TypeError, ValueError):
        return -math.inf
    return -math.inf if math.isnan(f) else f


def _groups(answers: Sequence[str | None]) -> list[list[int]]:
    """Indices of the non-None answers grouped by ``same_answer`` with each group's first member,
    groups in order of first occurrence."""
    groups: list[list[int]] = []
    for i, a in enumerate(answers):
        if not _is_answer(a):
            continue
        for g in groups:
            if same_answer(answers[g[0]], a):
                g.append(i)
                break
        else:
            groups.append([i])
    return groups


def _check_lengths(answers: Sequence, scores: Sequence) -> None:
    if len(answers) != len(scores):
        raise ValueError(f"{len(answers)} answers but {len(scores)} scores")


def pick_majority(answers: Sequence[str | None]) -> str | None:
    """Most frequent answer (equivalence groups); ties: earliest first occurrence wins."""
    groups = _groups(answers)
    if not groups:
        return None
    best = max(groups, key=lambda idx: (len(idx), -idx[0]))
    return answers[best[0]]


def pick_best(answers: Sequence[str | None], scores: Sequence[float]) -> str | None:
    """Best-of-n: the non-None answer with the highest score; ties: earliest wins."""
    _check_lengths(answers, scores)
    cand = [i for i, a in enumerate(answers) if _is_answer(a)]
    if not cand:
        return None
    i = max(cand, key=lambda j: (_score(scores[j]), -j))
    return answers[i]


def pick_weighted(answers: Sequence[str | None], scores: Sequence[float]) -> str | None:
    """Answer whose equivalence group has the highest summed score; ties: earliest group wins.
    NaN / non-numeric scores count as 0 in the sum."""
    _check_lengths(answers, scores)
    groups = _groups(answers)
    if not groups:
        return None

    def total(idx: list[int]) -> float:
        s = 0.0
        for j in idx:
            v = _score(scores[j])
            s += v if math.isfinite(v) else (v if v > 0 else 0.0)
        return s

    best = max(groups, key=lambda idx: (total(idx), -idx[0]))
    return answers[best[0]]


def vote_totals(answers: Sequence[str | None], weights: Sequence[float]) -> list[float]:
    """Each answer's summed weight, by the equivalence groups the picks use (in order of first
    occurrence); None answers do not vote."""
    _check_lengths(answers, weights)
    return [sum(weights[i] for i in idx) for idx in _groups(answers)]


def picks_at_n(
    answers: Sequence[str | None], scores: Sequence[float], ns: Iterable[int]
) -> dict[int, dict[str, str | None]]:
    """``{n: {"maj": ..., "naive": ..., "weighted": ...}}`` over the first n completions.
    Each n must satisfy ``1 <= n <= len(answers)`` (ValueError otherwise)."""
    _check_lengths(answers, scores)
    out: dict[int, dict[str, str | None]] = {}
    for n in ns:
        n = int(n)
        if not 1 <= n <= len(answers):
            raise ValueError(f"n={n} outside 1..{len(answers)} (number of completions)")
        a, s = list(answers[:n]), list(scores[:n])
        out[n] = {"maj": pick_majority(a), "naive": pick_best(a, s), "weighted": pick_weighted(a, s)}
    return out
