"""Tests for ttc_fast.grading: extraction, MATH / GSM8K equivalence and answer picking."""
import json
import threading

import pytest

from ttc_fast.grading import (
    extract_answer,
    grade,
    gsm8k_equal,
    gsm8k_gold,
    math_equal,
    pick_best,
    pick_majority,
    pick_weighted,
    picks_at_n,
    same_answer,
)

from shared_data import GSM8K, MATH500

needs_data = pytest.mark.usefixtures("shared_data")  # fails when ../shared/data is missing


def _math_answers():
    return {json.loads(l)["answer"] for l in MATH500.read_text().splitlines() if l.strip()}


# (gold exactly as in math500.jsonl, a different surface form of the same answer)
SAME = [
    (r"\left( 3, \frac{\pi}{2} \right)", r"(3,\frac{\pi}{2})"),
    (r"\left( 3, \frac{\pi}{2} \right)", r"\left(3, \dfrac{\pi}{2}\right)"),
    (r"\frac{14}{3}", r"\dfrac{14}{3}"),
    (r"\frac{3}{56}", "3/56"),
    (r"\frac{3}{2}", "1.5"),
    (r"\frac43", r"\frac{4}{3}"),
    (r"\frac65", "1.2"),
    (r"\dfrac{17}{50}", "0.34"),
    (r"-\frac{35}{9}", r"\frac{-35}{9}"),
    (r"\frac{1}{4}", "0.25"),
    (r"-\frac{\pi}{6}", r"-\pi/6"),
    (r"\frac{3\sqrt{3}}{4}", r"\frac{3}{4}\sqrt{3}"),
    (r"\frac{\sqrt{3}}{3}", r"\frac{1}{\sqrt{3}}"),
    (r"3\sqrt{13}", r"\sqrt{117}"),
    (r"11\sqrt2", r"11\sqrt{2}"),
    (r"-\sqrt{3}", r"-\sqrt3"),
    (r"11 \sqrt{5} + 11", r"11+11\sqrt{5}"),
    (r"1+2\sqrt{3}", r"2\sqrt3+1"),
    (r"90^\circ", "90"),
    (r"145^\circ", r"145^{\circ}"),
    ("x=5", "5"),
    (r"\text{Evelyn}", r"\text{Evelyn}"),
    (r"\text{east}", r"\text{East}"),
    (r"\text{(C)}", "C"),
    (r"\text{(E)}", "(E)"),
    (r"1 \pm \sqrt{19}", r"1+\sqrt{19}, 1-\sqrt{19}"),
    (r"\{1\pm\sqrt{5},-2\}", r"-2, 1-\sqrt{5}, 1+\sqrt{5}"),
    (r"\begin{pmatrix} -1/3 \\ 2/3 \\ 5/3 \end{pmatrix}",
     r"\begin{pmatrix} -\frac{1}{3} \\ \frac{2}{3} \\ \frac{5}{3} \end{pmatrix}"),
    (r"\begin{pmatrix} -1 & 0 \\ 0 & -1 \end{pmatrix}", r"\begin{pmatrix}-1&0\\0&-1\end{pmatrix}"),
    (r"\frac{270}7\text{ degrees}", r"\frac{270}{7}"),
    ("5x - 7y + 11z + 4 = 0", "5x-7y+11z+4=0"),
    (r"(2,\infty)", r"\left(2, \infty\right)"),
    (r"\left( \frac{3}{2}, -13 \right)", "(1.5,-13)"),
    (r"\$32,\!348", "32348"),
    (r"\$18.90", "18.9"),
    (r"5.4 \text{ cents}", "5.4"),
    (r"\left(\frac{3}{5},\frac{8}{3}\right]", "(3/5, 8/3]"),
    (r"(-\infty, 0]", r"(-\infty,0]"),
    (r"(-\infty, 2) \cup (3, \infty)", r"(-\infty,2)\cup(3,\infty)"),
    ("y = 2x + 3", "y=3+2x"),
    (r"x \in [-2,7]", "[-2,7]"),
    (r"\left[ \frac{\pi^2}{8}, \frac{5 \pi^2}{4} \right]", r"[\pi^2/8, 5\pi^2/4]"),
    ("1.25", r"\frac{5}{4}"),
    (".0000672", "6.72 \\times 10^{-5}"),
    ("10,\\!080", "10080"),
    ("58,500", "58500"),
    ("(6,31,-1)", r"\left(6, 31, -1\right)"),
]


@needs_data
def test_same_pairs_use_real_math500_answers():
    golds = _math_answers()
    missing = [g for g, _ in SAME if g not in golds]
    assert not missing
    assert len({g for g, _ in SAME}) >= 30


@needs_data
@pytest.mark.parametrize("gold,pred", SAME)
def test_math_equal_surface_forms(gold, pred):
    assert math_equal(pred, gold)
    assert grade(rf"so the answer is $\boxed{{{pred}}}$.", gold, "math")


@needs_data
def test_every_math500_answer_equals_itself_boxed():
    for g in _math_answers():
        assert grade(rf"Thus \boxed{{{g}}}.", g, "math"), g


@pytest.mark.parametrize(
    "gold,pred",
    [
        (r"\frac{14}{3}", r"\frac{3}{14}"),
        (r"\frac{1}{3}", "0.33"),
        (r"\text{(C)}", r"\text{(D)}"),
        (r"\text{Evelyn}", r"\text{Navin}"),
        (r"\left(\frac{3}{5},\frac{8}{3}\right]", "(3/5, 8/3)"),
        (r"\left( 3, \frac{\pi}{2} \right)", r"(3, \pi)"),
        (r"3\sqrt{13}", r"13\sqrt{3}"),
        ("y = 2x + 3", "y = 2x - 3"),
        (r"\begin{pmatrix} -2 \\ -14 \\ -7 \end{pmatrix}", r"\begin{pmatrix} 2 \\ 14 \\ 7 \end{pmatrix}"),
        ("(-\\infty, 0]", "(-\\infty, 0)"),
        (r"\$18.90", "19.80"),
        ("5", "-5"),
    ],
)
def test_math_equal_negatives(gold, pred):
    assert not math_equal(pred, gold)


@pytest.mark.parametrize("bad", [None, "", "   ", "((", r"\frac{", "}{", 5, r"\boxed{"])
def test_math_equal_never_raises(bad):
    assert math_equal(bad, "5") is False
    assert math_equal("5", bad) is False


def test_math_equal_off_main_thread():
    out = {}

    def work():
        out["eq"] = math_equal("0.5", r"\frac{1}{2}")
        out["ne"] = math_equal("0.4", r"\frac{1}{2}")
        # uncached pairs, so the parser and verify really run off the main thread
        out["same"] = same_answer(r"\dfrac{2}{4}", "0.50")
        out["diff"] = same_answer(r"\dfrac{2}{4}", "0.49")
        out["maj"] = pick_majority(["0.49", r"\dfrac{3}{6}", "0.500"])

    t = threading.Thread(target=work)
    t.start()
    t.join(30)
    assert out == {"eq": True, "ne": False, "same": True, "diff": False, "maj": r"\dfrac{3}{6}"}


# ------------------------------------------------------------------ extraction


@pytest.mark.parametrize(
    "text,want",
    [
        (r"Hence $\boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),
        (r"\boxed{\frac{\sqrt{3}}{2}} is nested", r"\frac{\sqrt{3}}{2}"),
        (r"first \boxed{1}, then \boxed{2}, finally \boxed{\{3, 4\}}.", r"\{3, 4\}"),
        (r"\boxed{\begin{pmatrix} 1 \\ 2 \end{pmatrix}}", r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}"),
        (r"answer: \fbox{7}", "7"),
        (r"so $\boxed 5$.", "5"),
        (r"\boxed{3} then truncated \boxed{4", "3"),
        (r"\boxed{ 12 }", "12"),
        ("Final Answer: The final answer is $\\frac{3}{4}$. I hope it is correct.", r"\frac{3}{4}"),
        ("The final answer is $\\$18.90$.", r"\$18.90"),
        ("the final answer is: 42.", "42"),
        ("The final answer is 7. I hope it is correct.", "7"),
        ("work...\n#### 1,234", "1,234"),
        (r"\boxed{2} and later the final answer is 3", "2"),
        ("no answer here", None),
        ("", None),
        (r"\boxed{}", None),
        (None, None),
    ],
)
def test_extract_answer(text, want):
    assert extract_answer(text) == want


# ------------------------------------------------------------------ GSM8K


@needs_data
def test_gsm8k_gold_whole_file():
    rows = [json.loads(l) for l in GSM8K.read_text().splitlines() if l.strip()]
    assert len(rows) == 1319
    for r in rows:
        g = gsm8k_gold(r["answer"])
        float(g)  # every gold is a plain number
        assert "," not in g
        assert gsm8k_equal(g, g)
        assert grade(rf"The total is \boxed{{{g}}}.", g, "gsm8k")


def test_gsm8k_gold_cases():
    assert gsm8k_gold("a\nb\n#### 1,234") == "1234"
    assert gsm8k_gold("#### -3") == "-3"
    with pytest.raises(ValueError):
        gsm8k_gold("no marker")


@pytest.mark.parametrize(
    "pred,gold,want",
    [
        ("18", "18", True),
        (r"\$18", "18", True),
        ("$18.00", "18", True),
        ("1,234", "1234", True),
        ("18 dollars", "18", True),
        (r"18 \text{ dollars}", "18", True),
        (r"\boxed{18}", "18", True),
        ("18.", "18", True),
        ("x = 18", "18", True),
        ("50%", "50", True),
        (r"\frac{1}{2}", "0.5", True),
        ("1000000.5", "1000000.5000001", True),
        ("17", "18", False),
        ("-18", "18", False),
        ("18.5", "18", False),
        ("", "18", False),
        (None, "18", False),
        ("eighteen", "18", False),
    ],
)
def test_gsm8k_equal(pred, gold, want):
    assert gsm8k_equal(pred, gold) is want


def test_grade_kind_checked():
    with pytest.raises(ValueError):
        grade("5", "5", "mmlu")
    assert grade("5", "5", "math") and grade("5", "5", "gsm8k")
    assert not grade(None, "5", "math")


# ------------------------------------------------------------------ picks


def test_same_answer_equivalent_forms():
    assert same_answer(r"\frac12", "0.5") and same_answer("0.5", r"\dfrac{1}{2}")
    assert same_answer(r"\frac12", r"\dfrac{1}{2}")
    assert same_answer(r"\left( 3, \frac{\pi}{2} \right)", r"(3,\frac{\pi}{2})")
    assert same_answer("x=5", "5") and same_answer("5", "x=5")
    assert same_answer("x^2+2x", "x(x+2)")
    assert same_answer(r"\{2,1\}", r"\{1,2\}")
    assert same_answer(" 12 ", "12") and same_answer("007", "7")  # plain-integer fast path
    assert not same_answer("1", "2")
    assert not same_answer(r"\frac12", "0.4")


def test_same_answer_is_symmetric_although_verify_is_not():
    # math_verify accepts gold "(-\infty,2)" for prediction "x<2" but not the other way round
    assert math_equal("x<2", r"(-\infty,2)") != math_equal(r"(-\infty,2)", "x<2")
    assert same_answer("x<2", r"(-\infty,2)") and same_answer(r"(-\infty,2)", "x<2")


@pytest.mark.parametrize("bad", [None, "", "   ", 5])
def test_same_answer_none_and_blank(bad):
    for other in (bad, "5", "", None):
        assert same_answer(bad, other) is False
        assert same_answer(other, bad) is False


def test_same_answer_unparsable_only_equals_itself():
    assert same_answer("not math {{", "notmath{{")  # equal after whitespace squashing
    assert same_answer("not math {{", " not  math {{ ")
    assert not same_answer("not math {{", "not math {{{")
    assert not same_answer("not math {{", "5")
    assert not same_answer(r"\frac{", "}{")


# (prediction, MATH-500 gold) pairs that math_equal grades correct; grouping must agree with it
GROUPING_AGREES = [
    (r"\frac{1}{2}\sqrt{3}", r"\frac{\sqrt{3}}{2}"),
    ("10", r"10\%"),
    ("C", r"\text{(C)}"),
    ("(E)", r"\text{(E)}"),
    (r"\text{East}", r"\text{east}"),
    ("1.5", r"\frac{3}{2}"),
    (r"\sqrt{117}", r"3\sqrt{13}"),
    ("90", r"90^\circ"),
    ("32348", r"\$32,\!348"),
    ("y=3+2x", "y = 2x + 3"),
    (r"-2, 1-\sqrt{5}, 1+\sqrt{5}", r"\{1\pm\sqrt{5},-2\}"),
    (r"\frac{270}{7}", r"\frac{270}7\text{ degrees}"),
]


@pytest.mark.parametrize("pred,gold", GROUPING_AGREES)
def test_grouping_agrees_with_grading(pred, gold):
    assert math_equal(pred, gold)
    assert same_answer(pred, gold) == math_equal(pred, gold)
    assert same_answer(gold, pred)
    # two surface forms of the gold outvote a single different answer that comes first
    assert pick_majority(["17", pred, gold]) == pred
    assert pick_weighted(["17", gold, pred], [0.9, 0.5, 0.5]) == gold


def test_grouping_is_against_the_first_member():
    # 10\% ~ 10 and 10\% ~ 0.1 (math_verify), but 10 !~ 0.1: the representative decides
    assert same_answer(r"10\%", "10") and same_answer(r"10\%", "0.1") and not same_answer("10", "0.1")
    assert pick_majority(["10", r"10\%", "0.1"]) == "10"  # groups {10, 10\%}, {0.1}
    assert pick_majority([r"10\%", "10", "0.1"]) == r"10\%"  # one group of three
    assert pick_majority(["0.1", "10", r"10\%"]) == "0.1"  # groups {0.1, 10\%}, {10}


def test_pick_majority():
    assert pick_majority(["1", "2", "2", "1"]) == "1"  # tie: earliest first occurrence wins
    assert pick_majority(["2", "1", "1", "2"]) == "2"
    assert pick_majority(["1", "0.5", r"\frac12"]) == "0.5"  # equivalent forms share a group
    assert pick_majority(["3", r"\frac{1}{2}", "0.5", "3.0", r"\dfrac12"]) == r"\frac{1}{2}"
    assert pick_majority(["", "  ", None, "4"]) == "4"  # blank answers are not answers
    assert pick_majority([None, None, "3"]) == "3"  # None never wins
    assert pick_majority([None, None]) is None
    assert pick_majority([]) is None


def test_pick_best():
    assert pick_best(["1", "2", "3"], [0.1, 0.9, 0.5]) == "2"
    assert pick_best([None, "2"], [1.0, 0.1]) == "2"
    assert pick_best(["1", "2"], [0.5, 0.5]) == "1"
    assert pick_best(["1", "2"], [float("nan"), 0.1]) == "2"
    assert pick_best([None], [1.0]) is None
    with pytest.raises(ValueError):
        pick_best(["1"], [0.1, 0.2])


def test_pick_weighted():
    # "1" alone scores 0.9; 0.5 and \frac12 together score 1.0
    assert pick_weighted(["1", "0.5", r"\frac{1}{2}"], [0.9, 0.5, 0.5]) == "0.5"
    assert pick_weighted(["1", "0.5", "2"], [0.9, 0.5, 0.5]) == "1"
    assert pick_weighted(["a", "b"], [0.5, 0.5]) == "a"
    assert pick_weighted([None, "3"], [5.0, 0.1]) == "3"
    assert pick_weighted([None, None], [1.0, 1.0]) is None


def test_picks_at_n():
    answers = ["1", None, "2", r"\frac{4}{2}", "1"]
    scores = [0.2, 0.99, 0.3, 0.3, 0.1]
    got = picks_at_n(answers, scores, [1, 2, 4, 5])
    assert got[1] == {"maj": "1", "naive": "1", "weighted": "1"}
    assert got[2] == {"maj": "1", "naive": "1", "weighted": "1"}
    assert got[4] == {"maj": "2", "naive": "2", "weighted": "2"}
    assert got[5] == {"maj": "1", "naive": "2", "weighted": "2"}
    with pytest.raises(ValueError):
        picks_at_n(answers, scores, [8])
