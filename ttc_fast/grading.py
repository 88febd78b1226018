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
    Answers are grouped by EQUIVALENCE using ``answer_key``: a canonical string built from the
    math_verify parse (numbers rounded to 6 decimals so ``\\frac12`` and ``0.5`` share a key,
    tuples / sets / intervals / matrices keyed element-wise, ``x = 5`` keyed as ``5``, percentages
    keyed by their number, other expressions by ``str(expand(expr))``), falling back to the answer
    with all whitespace removed when math_verify cannot parse it.  ``None`` answers never win unless
    every answer is ``None``.  Ties are broken deterministically: the group whose first member
    appears earliest wins, and a group is represented by its earliest member's surface form.
"""
from __future__ import annotations

import math
import re
import threading
from decimal import Context, Decimal, InvalidOperation
from fractions import Fraction
from functools import lru_cache
from typing import Callable, Iterable, Sequence, TypeVar

__all__ = [
    "TIMEOUT_S",
    "extract_answer",
    "math_equal",
    "gsm8k_gold",
    "gsm8k_equal",
    "grade",
    "answer_key",
    "pick_majority",
    "pick_best",
    "pick_weighted",
    "picks_at_n",
]

#: seconds math_verify may spend parsing / comparing one answer (main thread only; whole seconds,
#: since math_verify uses ``signal.alarm``).
TIMEOUT_S = 5

_T = TypeVar("_T")

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


def _guarded(fn: Callable[..., _T], *args, default: _T) -> _T:
    """Run ``fn`` under math_verify's own timeout (main thread), returning ``default`` on any
    error or timeout."""
    from math_verify.errors import TimeoutException
    from math_verify.utils import timeout

    t = _timeout()
    try:
        return timeout(timeout_seconds=t)(fn)(*args)
    except (Exception, TimeoutException):
        return default


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


@lru_cache(maxsize=65536)
def _math_equal_cached(pred: str, gold: str) -> bool:
    from math_verify import verify

    g = _parse(gold)
    p = _parse(pred)
    if not g or not p:
        return _squash(pred) == _squash(gold)
    try:
        return bool(verify(list(g), list(p), timeout_seconds=_timeout()))
    except BaseException as e:
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        return False


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
# canonical keys and picks
# --------------------------------------------------------------------------------------------

_DEC_CTX = Context(prec=200)
_Q = Decimal("1e-6")


def _num_key(expr) -> str | None:
    """Key of a real number rounded to 6 decimals, or None when ``expr`` is not a real number."""
    import sympy

    if not getattr(expr, "is_number", False):
        return None
    if isinstance(expr, sympy.Integer):
        return str(int(expr))
    v = expr.evalf(30)
    if not (v.is_real and v.is_finite) or not isinstance(v, sympy.Float):
        return None
    d = Decimal(str(v)).quantize(_Q, context=_DEC_CTX)
    if d == 0:
        d = abs(d)
    s = format(d, "f").rstrip("0").rstrip(".")
    return s or "0"


def _key_of(expr) -> str:
    import sympy
    from sympy import Eq, FiniteSet, Interval, MatrixBase, Tuple, Union

    from math_verify.grader import get_pct_val

    pct = get_pct_val(expr)
    if pct is not None:
        expr = pct
    if isinstance(expr, Eq) and isinstance(expr.lhs, sympy.Symbol):
        expr = expr.rhs  # "x = 5" is keyed as "5", as math_verify grades it
    if isinstance(expr, MatrixBase):
        return "M" + str([[_key_of(e) for e in row] for row in expr.tolist()])
    if isinstance(expr, Tuple):
        return "(" + ",".join(_key_of(e) for e in expr.args) + ")"
    if isinstance(expr, FiniteSet) or type(expr).__name__ == "FiniteSet":
        return "{" + ",".join(sorted(_key_of(e) for e in expr.args)) + "}"
    if isinstance(expr, Interval):
        lo, hi = _key_of(expr.left), _key_of(expr.right)
        return f"{'(' if expr.left_open else '['}{lo},{hi}{')' if expr.right_open else ']'}"
    if isinstance(expr, Union):
        return "U(" + ",".join(sorted(_key_of(e) for e in expr.args)) + ")"
    if isinstance(expr, sympy.Basic):
        k = _num_key(expr)
        if k is not None:
            return k
        if expr.free_symbols and sympy.count_ops(expr) <= 60:
            return str(sympy.expand(expr))
        return str(expr)
    return str(expr)


@lru_cache(maxsize=16384)
def _answer_key_cached(ans: str) -> str:
    import sympy

    if _PLAIN_INT.match(ans):  # what the parser would key it as, without the parser
        return "mv:" + str(int(ans))
    fallback = "str:" + _squash(ans)
    parsed = _parse(ans)  # has its own timeout; must not run inside another alarm (it cancels it)
    if parsed and isinstance(parsed[0], (sympy.Basic, sympy.MatrixBase)):
        return _guarded(lambda e: "mv:" + _key_of(e), parsed[0], default=fallback)
    return fallback


def answer_key(ans: str | None) -> str | None:
    """Canonical grouping key of an extracted answer (None for None / empty)."""
    if not isinstance(ans, str) or not ans.strip():
        return None
    return _answer_key_cached(ans.strip())


def _score(x) -> float:
    try:
        f = float(x)
    except (TypeError, ValueError):
        return -math.inf
    return -math.inf if math.isnan(f) else f


def _groups(answers: Sequence[str | None]) -> dict[str, list[int]]:
    """Non-None answers grouped by key, in order of first occurrence (dicts keep insertion order)."""
    groups: dict[str, list[int]] = {}
    for i, a in enumerate(answers):
        k = answer_key(a)
        if k is not None:
            groups.setdefault(k, []).append(i)
    return groups


def _check_lengths(answers: Sequence, scores: Sequence) -> None:
    if len(answers) != len(scores):
        raise ValueError(f"{len(answers)} answers but {len(scores)} scores")


def pick_majority(answers: Sequence[str | None]) -> str | None:
    """Most frequent answer (equivalence groups); ties: earliest first occurrence wins."""
    groups = _groups(answers)
    if not groups:
        return None
    best = max(groups.values(), key=lambda idx: (len(idx), -idx[0]))
    return answers[best[0]]


def pick_best(answers: Sequence[str | None], scores: Sequence[float]) -> str | None:
    """Best-of-n: the non-None answer with the highest score; ties: earliest wins."""
    _check_lengths(answers, scores)
    cand = [i for i, a in enumerate(answers) if answer_key(a) is not None]
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

    best = max(groups.values(), key=lambda idx: (total(idx), -idx[0]))
    return answers[best[0]]


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
