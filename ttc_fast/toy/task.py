"""The toy task: seeded multi-step arithmetic word problems with step-by-step solutions.

A problem is a running quantity changed by a chain of operations (2 to 6, by level):

    Tom has 7 apples. He buys 5 more. He gives away 3. He gets 4 times as many. How many
    apples does he have now?

and its solution has one step per operation, steps separated by a blank line ("\\n\\n"), each
step one arithmetic operation with its result written out, then the answer step:

    He buys 5 more, so 7 + 5 = 12.

    He gives away 3, so 12 - 3 = 9.

    He gets 4 times as many, so 9 * 4 = 36.

    The answer is \\boxed{36}.

`check_step(question, steps)` is the hard-coded verifier (`builtin:toy-checker`): 1.0 when the
latest step is the right operation of the problem with the right numbers and the right result
(the answer step: the right final value), else 0.0. Because a step must start from the true
running value, a step that follows a wrong step scores 0 too: the score is the probability that
the partial solution is still on track, like a Math-Shepherd label.
"""
from __future__ import annotations

import random
import re

from ..data import Problem

NAMES = [("Tom", "He"), ("Ann", "She"), ("Sam", "He"), ("Mia", "She"), ("Ben", "He"), ("Eva", "She"),
         ("Max", "He"), ("Zoe", "She")]
ITEMS = ["apples", "pens", "coins", "cards", "books", "stamps", "marbles", "shells"]

# level -> (number of operations, largest start value, largest added / removed amount,
#           largest multiplier, cap on every intermediate value)
LEVELS = {
    1: (2, 20, 20, 5, 200),
    2: (3, 30, 40, 6, 300),
    3: (4, 50, 60, 7, 500),
    4: (5, 70, 80, 8, 700),
    5: (6, 99, 99, 9, 999),
}
DEFAULT_LEVELS = (1, 2, 3, 4, 5)
EVAL_SEED = 20261124
EVAL_SIZE = 250
DEV_SEED = 20261125  # the development set: for choosing settings without looking at the eval set

# operation -> (question sentence, step phrase); "{p}" is the pronoun, "{b}" the operand
OPS = {
    "buy": ("+", "{p} buys {b} more.", "{p} buys {b} more"),
    "find": ("+", "{p} finds {b} more.", "{p} finds {b} more"),
    "give": ("-", "{p} gives away {b}.", "{p} gives away {b}"),
    "lose": ("-", "{p} loses {b}.", "{p} loses {b}"),
    "times": ("*", "{p} gets {b} times as many.", "{p} gets {b} times as many"),
    "split": ("/", "{p} splits them into {b} equal groups and keeps one.", "{p} keeps one of {b} groups"),
}
_APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a // b}
_QUESTION_OPS = re.compile(
    r"(?:buys|finds) (\d+) more|(?:gives away|loses) (\d+)|gets (\d+) times as many|splits them into (\d+) equal groups")
_START = re.compile(r"^\w+ has (\d+) ")
_EXPR = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def _choose_op(rng: random.Random, a: int, level: int) -> tuple[str, int]:
    _, _, max_add, max_mul, cap = LEVELS[level]
    while True:
        name = rng.choice(list(OPS))
        sym = OPS[name][0]
        if sym == "+":
            hi = min(max_add, cap - a)
            if hi >= 2:
                return name, rng.randint(2, hi)
        elif sym == "-":
            hi = min(max_add, a - 1)
            if hi >= 2:
                return name, rng.randint(2, hi)
        elif sym == "*":
            hi = min(max_mul, cap // max(a, 1))
            if hi >= 2:
                return name, rng.randint(2, hi)
        else:
            divisors = [d for d in range(2, 10) if a % d == 0 and a // d >= 2]
            if divisors:
                return name, rng.choice(divisors)


def make_problem(rng: random.Random, level: int, index: int | str = 0) -> Problem:
    """One problem of `level` (1..5: 2..6 operations, growing number ranges). Its solution text
    is in meta["solution"], its steps in meta["steps"]."""
    if level not in LEVELS:
        raise ValueError(f"level must be one of {sorted(LEVELS)}, got {level}")
    n_ops, max_start, *_ = LEVELS[level]
    name, pron = rng.choice(NAMES)
    item = rng.choice(ITEMS)
    value = rng.randint(2, max_start)
    sentences = [f"{name} has {value} {item}."]
    steps = []
    for _ in range(n_ops):
        op, b = _choose_op(rng, value, level)
        sym, q_text, s_text = OPS[op]
        new = _APPLY[sym](value, b)
        sentences.append(q_text.format(p=pron, b=b))
        steps.append(f"{s_text.format(p=pron, b=b)}, so {value} {sym} {b} = {new}.")
        value = new
    sentences.append(f"How many {item} does {pron.lower()} have now?")
    steps.append(f"The answer is \\boxed{{{value}}}.")
    question = " ".join(sentences)
    return Problem(id=f"toy-{index}", question=question, answer=str(value), kind="math",
                   meta={"level": level, "steps": steps, "solution": "\n\n".join(steps)})


def make_dataset(n: int, seed: int, levels=DEFAULT_LEVELS) -> list[Problem]:
    """n problems from one seeded stream, levels drawn uniformly from `levels`."""
    rng = random.Random(seed)
    levels = list(levels)
    return [make_problem(rng, rng.choice(levels), f"{seed}-{i}") for i in range(n)]


def eval_problems(n: int = EVAL_SIZE) -> list[Problem]:
    """The fixed evaluation set: the first n (default 250) problems of seed EVAL_SEED, 50 per
    level. The training sets use other seeds; their overlap with this set is removed."""
    rng = random.Random(EVAL_SEED)
    out = []
    for i in range(n):
        p = make_problem(rng, DEFAULT_LEVELS[i % len(DEFAULT_LEVELS)], f"eval-{i}")
        out.append(p)
    return out


def dev_problems(n: int = EVAL_SIZE) -> list[Problem]:
    """A development set like the eval set (n problems of seed DEV_SEED, levels in turn), none of
    them in it: search settings and checkpoints are compared here, so that the eval set only
    reports. Training draws exclude only the eval set (so that the shipped recipes replay
    exactly): about 1 in 500 dev problems, of level 1, also turns up in a 12,000-problem draw."""
    rng = random.Random(DEV_SEED)
    evals = {p.question for p in eval_problems()}
    out: list[Problem] = []
    while len(out) < n:
        p = make_problem(rng, DEFAULT_LEVELS[len(out) % len(DEFAULT_LEVELS)], f"dev-{len(out)}")
        if p.question not in evals:
            out.append(p)
    return out


def solve(question: str) -> list[tuple[int, str, int, int]]:
    """The operations of a question as (a, op, b, result), from the question text alone."""
    m = _START.search(question)
    if not m:
        raise ValueError(f"not a toy problem: {question!r}")
    value = int(m.group(1))
    chain = []
    for om in _QUESTION_OPS.finditer(question):
        k = next(i for i in range(4) if om.group(i + 1) is not None)
        sym, b = "+-*/"[k], int(om.group(k + 1))
        new = _APPLY[sym](value, b)
        chain.append((value, sym, b, new))
        value = new
    return chain


def final_value(question: str, chain: list | None = None) -> int:
    """The question's true answer: the last operation's result (the start value if it has none).
    `chain`: its `solve` result, when the caller has it already."""
    chain = solve(question) if chain is None else chain
    return chain[-1][3] if chain else int(_START.search(question).group(1))


def check_step(question: str, steps: list[str]) -> float:
    """1.0 if the latest step is right: every "a op b = c" in it is correct arithmetic and is the
    problem's next operation from the true running value (the answer step: \\boxed{} holds the
    true final value), else 0.0."""
    if not steps:
        return 0.0
    try:
        chain = solve(question)
    except ValueError:
        return 0.0
    k = len(steps) - 1
    step = steps[-1]
    exprs = _EXPR.findall(step)
    if k < len(chain):
        if not exprs or _BOXED.search(step):
            return 0.0
        a, sym, b, c = chain[k]
        for ea, esym, eb, ec in exprs:
            ea, eb, ec = int(ea), int(eb), int(ec)
            if esym not in _APPLY or (esym == "/" and (eb == 0 or ea % eb)):
                return 0.0
            if _APPLY[esym](ea, eb) != ec or (ea, esym, eb) != (a, sym, b):
                return 0.0
        return 1.0
    if k == len(chain):
        final = final_value(question, chain)
        boxes = _BOXED.findall(step)
        if exprs or not boxes:
            return 0.0
        return 1.0 if boxes[-1].strip() == str(final) else 0.0
    return 0.0


def prefix_labels(question: str, steps: list[str]) -> list[int]:
    """Math-Shepherd-style labels: step k is good (1) iff steps 0..k are all right, i.e. a
    correct continuation from it reaches the right answer."""
    out, ok = [], True
    for k in range(len(steps)):
        ok = ok and check_step(question, steps[: k + 1]) == 1.0
        out.append(int(ok))
    return out
