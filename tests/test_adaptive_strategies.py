"""REBASE and the adaptive samplers, checked decision by decision through TreeSearch: every
pruning's allocation (REBASE) and every round's stop / continue (adaptive majority and weighted)
is recomputed from what an observer recorded; and the Beta stopping probability against known
values.

REBASE runs on a tiny random policy with a hash verifier (its delimiter is "e", as in
test_strategy_rules.py); the adaptive samplers need real answers, so they run on the toy task's
policy S (`builtin:toy-policy-s`), with the toy task's exact step checker as the verifier.
"""
import math
from collections import Counter

import pytest
import torch
from strategy_helpers import DELIM, path_score, problems, tiny_engine

import ttc_fast as tf
from ttc_fast.grading import extract_answer
from ttc_fast.search import SearchObserver, TreeSearch, powers_of_two
from ttc_fast.strategies.adaptive import (
    beta_stop_probability,
    regularized_incomplete_beta,
)
from ttc_fast.strategies.rebase import balanced_allocation

SAMPLING = tf.SamplingParams(temperature=1.0, max_tokens=10, seed=0)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return tiny_engine(tmp_path_factory)


# --- REBASE ------------------------------------------------------------------------------------
def reference_allocation(scores: list[float], budget: int, temperature: float) -> list[int]:
    """The rule, written again: budget * softmax(scores / T), floors, then one more to the
    largest remainders (ties: the earlier candidate)."""
    if budget <= 0 or not scores:
        return [0] * len(scores)
    quotas = (budget * torch.softmax(torch.tensor(scores, dtype=torch.float64) / temperature, dim=0)).tolist()
    counts = [int(q) for q in quotas]
    order = sorted(range(len(scores)), key=lambda i: (counts[i] - quotas[i], i))
    for i in order[: budget - sum(counts)]:
        counts[i] += 1
    return counts


class Prunings(SearchObserver):
    """Every pruning: the problem, its live candidates (id, aggregated score) in order, how many
    of its children finished, its finished paths so far, and the kept frontier."""

    def __init__(self):
        self.prunings = []
        self.completions = {}

    def on_prune(self, state, children, kept):
        agg = state.strategy.aggregation
        self.prunings.append({
            "problem": state.index,
            "live": [(id(p), p.score(agg)) for p in children if not p.done],
            "children": len(children),
            "finished": sum(p.done for p in children),
            "completed": len(state.completed),
            "kept": [(id(p), count) for p, count in kept],
        })

    def on_result(self, state, result):
        self.completions[state.index] = len(result.completions)


def test_rebase_shares_the_remaining_budget_by_softmax_of_the_scores(engine):
    """Pruning by pruning: the budget is n minus the paths finished so far, it is shared among the
    live candidates as softmax(score / T) with largest-remainder rounding (none: dropped), each
    iteration expands exactly the previous budget, and a problem stops once it is spent."""
    n, temperature = 8, 0.2
    strategy = tf.Rebase(n=n, iterations=4, temperature=temperature, delimiter=DELIM)
    seen = Prunings()
    list(TreeSearch(engine, tf.load_prm(path_score), strategy, SAMPLING, observer=seen).run(problems(3)))
    uneven = shrunk = 0
    budget_before: dict[int, int] = {}
    for pruning in seen.prunings:
        problem = pruning["problem"]
        assert problem not in budget_before or budget_before[problem] > 0  # a spent problem is never expanded
        assert pruning["children"] == budget_before.get(problem, n)  # the last budget, all of it expanded
        budget = n - pruning["completed"]
        assert budget == budget_before.get(problem, n) - pruning["finished"]
        scores = [score for _, score in pruning["live"]]
        counts = reference_allocation(scores, budget, temperature)
        assert pruning["kept"] == [(node, c) for (node, _), c in zip(pruning["live"], counts) if c]
        assert sum(c for _, c in pruning["kept"]) == (budget if pruning["live"] else 0)
        uneven += any(c > 1 for c in counts) and 0 in counts
        shrunk += pruning["finished"] > 0 and bool(pruning["kept"])
        assert pruning["kept"] or budget == 0  # it stops only when the budget is spent
        budget_before[problem] = budget
    assert uneven > 0 and shrunk > 0  # both the reallocation and the shrinking budget were exercised
    assert set(budget_before.values()) == {0}  # every problem spent its budget
    assert seen.completions == {0: n, 1: n, 2: n}


def test_balanced_allocation_by_hand():
    assert balanced_allocation([0.5, 0.5, 0.5], 4, 0.2) == [2, 1, 1]  # equal remainders: the earlier first
    assert balanced_allocation([0.9, 0.1], 5, 0.01) == [5, 0]  # a cold softmax gives all to the best
    assert balanced_allocation([0.9, 0.1], 5, 1e3) == [3, 2]  # a hot one shares evenly
    assert balanced_allocation([0.2, 0.7], 0, 0.2) == [0, 0]
    assert balanced_allocation([], 3, 0.2) == []
    # softmax([0, ln 3] / 1) = (1/4, 3/4): quotas 1.5 and 4.5 of 6; both remainders 0.5, the earlier wins
    assert balanced_allocation([0.0, math.log(3)], 6, 1.0) == [2, 4]
    g = torch.Generator().manual_seed(0)
    for budget in range(1, 40):
        scores = torch.rand(int(torch.randint(1, 12, (1,), generator=g)), generator=g).tolist()
        assert sum(balanced_allocation(scores, budget, 0.1)) == budget


@pytest.mark.parametrize("temperature", [0.0, -0.5, float("nan"), float("inf")])
def test_rebase_refuses_a_temperature_that_is_not_positive(temperature):
    with pytest.raises(ValueError, match=r"temperature must be a finite number > 0"):
        tf.Rebase(temperature=temperature)
    with pytest.raises(ValueError, match="iterations must be >= 1"):
        tf.Rebase(iterations=0)


def test_rebase_defaults():
    s = tf.Rebase()
    assert (s.n, s.iterations, s.temperature, s.aggregation, s.delimiter) == (16, 40, 0.2, "last", "\n\n")
    assert tf.Rebase.stepwise and tf.Rebase.needs_verifier


# --- the Beta stopping rule ----------------------------------------------------------------------
def test_beta_stop_probability_known_values():
    assert beta_stop_probability(0, 0) == 0.5
    assert beta_stop_probability(1, 0) == 0.75  # Beta(2, 1): 1 - (1/2)^2
    assert beta_stop_probability(4, 0) == 31 / 32  # four agreeing answers
    assert beta_stop_probability(3, 1) == 26 / 32
    assert beta_stop_probability(7, 7) == 0.5
    # real counts: Beta(a, 1) has distribution function x^a, Beta(1, b) 1 - (1 - x)^b
    assert beta_stop_probability(0.5, 0) == pytest.approx(1 - 0.5**1.5, abs=1e-13)
    assert beta_stop_probability(0, 2.25) == pytest.approx(0.5**3.25, abs=1e-13)
    with pytest.raises(ValueError, match=">= 0"):
        beta_stop_probability(-1, 0)


def test_incomplete_beta_continued_fraction_matches_the_binomial_tail():
    """At integer parameters I_{1/2}(a, b) is a binomial tail: the continued fraction (used for
    weighted counts) agrees with it, and it is monotone between integers."""
    for c1 in range(0, 70, 3):
        for c2 in range(0, 70, 5):
            m = c1 + c2 + 1
            exact = sum(math.comb(m, j) for j in range(c1 + 1)) / 2**m
            assert regularized_incomplete_beta(0.5, c2 + 1, c1 + 1) == pytest.approx(exact, rel=1e-12, abs=1e-14)
            assert beta_stop_probability(c1, c2) == exact
            if c1 > c2 and exact < 1 - 1e-6:  # (nearer 1 the three round to one float)
                assert beta_stop_probability(c1 - 0.5, c2) < exact < beta_stop_probability(c1 + 0.5, c2)
    assert regularized_incomplete_beta(0.3, 1, 3.5) == pytest.approx(1 - 0.7**3.5, rel=1e-13)


# --- adaptive majority and weighted ---------------------------------------------------------------
TOY_SAMPLING = tf.SamplingParams(temperature=0.6, max_tokens=192, seed=0)


@pytest.fixture(scope="module")
def toy_engine():
    from ttc_fast.toy.evaluate import policy_s

    return policy_s("cpu")


@pytest.fixture(scope="module")
def toy_problems():
    from ttc_fast.toy import eval_problems

    # at temperature 0.6 policy S agrees with itself on problem 0 (level 1) and is unsure on 6
    # (level 2) and 9 (level 5)
    every = eval_problems(10)
    return [every[i] for i in (0, 6, 9)], [0, 6, 9]


class Rounds(SearchObserver):
    """After every round: the problem, its solutions so far (answer, aggregated score, text) in
    sample order, and the kept frontier (whether it is the prompt, and how many to draw)."""

    def __init__(self):
        self.rounds = []
        self.results = {}

    def on_prune(self, state, children, kept):
        agg, delim = state.strategy.aggregation, state.strategy.delimiter
        drawn = [(extract_answer(delim.join(p.steps)), p.score(agg), delim.join(p.steps)) for p in state.completed]
        self.rounds.append((state.index, drawn, [(p is state.root, count) for p, count in kept]))

    def on_result(self, state, result):
        self.results[state.index] = result


def run_adaptive(engine, prm, strategy, problems, indices):
    rounds = Rounds()
    search = TreeSearch(engine, prm, strategy, TOY_SAMPLING, observer=rounds)
    list(search.run_with_problems(problems, indices))
    return rounds


def check_rounds(rounds: Rounds, strategy, weight) -> Counter:
    """Every round's decision against the rule recomputed from the recorded solutions; returns
    how many rounds each problem ran."""
    ran = Counter()
    for problem, drawn, kept in rounds.rounds:
        ran[problem] += 1
        expected_drawn = sum(min(strategy.round_size, strategy.n - strategy.round_size * r) for r in range(ran[problem]))
        assert len(drawn) == expected_drawn  # rounds of round_size, the last clamped to n
        totals: dict[str, float] = {}
        for answer, score, _ in drawn:
            if answer is not None:  # no answer, no vote
                totals[answer] = totals.get(answer, 0.0) + weight(score)
        c1, c2 = (sorted(totals.values(), reverse=True) + [0.0, 0.0])[:2]
        settled = beta_stop_probability(c1, c2) >= strategy.confidence
        if settled or len(drawn) >= strategy.n:
            assert kept == []
        else:
            assert kept == [(True, min(strategy.round_size, strategy.n - len(drawn)))]  # the prompt again
    for problem, result in rounds.results.items():
        last = [d for p, d, _ in rounds.rounds if p == problem][-1]
        assert [c.text for c in result.completions] == [text for _, _, text in last]  # every solution, in order
        assert sorted(result.picks) == powers_of_two(len(last))  # picks keyed up to the number drawn
    return ran


@pytest.fixture(scope="module")
def majority_run(toy_engine, toy_problems):
    strategy = tf.AdaptiveMajority(n=10, round_size=4, confidence=0.95)
    return strategy, run_adaptive(toy_engine, None, strategy, *toy_problems)


def test_adaptive_majority_stops_by_the_beta_rule_round_by_round(majority_run):
    """No verifier: counts are answers; four agreeing answers (31/32 >= 0.95) stop at the first
    round, split votes go on, the last round is clamped (4, 4, then 2 of n = 10) and no problem
    draws more than n."""
    strategy, rounds = majority_run
    ran = check_rounds(rounds, strategy, lambda score: 1.0)
    assert ran[0] == 1  # a unanimous first round
    assert max(ran.values()) == 3  # some problem ran into the cap
    for problem, drawn, _ in rounds.rounds:
        answers = [a for a, _, _ in drawn]
        if len(drawn) == strategy.round_size and None not in answers and len(set(answers)) == 1:
            assert ran[problem] == 1
    for r in rounds.results.values():
        assert len(r.completions) <= strategy.n
        assert set(r.picks[max(r.picks)]) == {"maj"}  # no verifier, no scores: the majority pick only


def test_each_round_draws_new_samples_whatever_else_is_in_flight(toy_engine, toy_problems, majority_run):
    """Rounds are iterations: their seeds differ (a round never repeats the one before); a
    problem run alone (same data-set position) draws the same solutions as in the batch."""
    strategy, rounds = majority_run
    by_problem: dict[int, list] = {}
    for problem, drawn, _ in rounds.rounds:
        by_problem[problem] = [text for _, _, text in drawn]
    problem = 6
    texts = by_problem[problem]
    k = strategy.round_size
    assert len(texts) > k and texts[:k] != texts[k: 2 * k]
    problems, indices = toy_problems
    alone = run_adaptive(toy_engine, None, strategy, [problems[indices.index(problem)]], [problem])
    assert [c.text for c in alone.results[problem].completions] == texts


def test_adaptive_weighted_counts_summed_scores(toy_engine, toy_problems):
    """Weighted: an answer's count is its solutions' summed scores (here the exact checker's
    mean step score, so real counts); round by round the decision follows the rule."""
    strategy = tf.AdaptiveWeighted(n=8, round_size=4, confidence=0.9, aggregation="mean")
    problems, indices = toy_problems
    rounds = run_adaptive(toy_engine, tf.load_prm("builtin:toy-checker"), strategy, problems[:2], indices[:2])
    ran = check_rounds(rounds, strategy, lambda score: max(score, 0.0))
    fractional = [score for _, drawn, _ in rounds.rounds for _, score, _ in drawn if 0 < score < 1]
    assert fractional  # the real-count (continued fraction) path was exercised
    assert ran[0] == 1 and max(ran.values()) > 1
    assert all(set(r.picks[1]) == {"maj", "naive", "weighted"} for r in rounds.results.values())


def test_adaptive_weighted_needs_a_verifier_and_majority_does_not(toy_engine):
    with pytest.raises(ValueError, match="AdaptiveWeighted needs a PRM"):
        TreeSearch(toy_engine, None, tf.AdaptiveWeighted())
    TreeSearch(toy_engine, None, tf.AdaptiveMajority())  # no error


@pytest.mark.parametrize("cls", [tf.AdaptiveMajority, tf.AdaptiveWeighted])
def test_adaptive_settings_are_validated(cls):
    s = cls()
    assert (s.n, s.round_size, s.confidence, s.aggregation) == (64, 4, 0.95, "last")
    with pytest.raises(ValueError, match="round_size must be >= 1"):
        cls(round_size=0)
    for confidence in (0.5, 1.0, 0.2, float("nan")):
        with pytest.raises(ValueError, match=r"confidence must be in \(0.5, 1\)"):
            cls(confidence=confidence)
    assert cls(n=2, round_size=4).first_frontier("root") == [("root", 2)]  # n below round_size: one round of n


# --- the CLI -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    import json

    from ttc_fast.toy import eval_problems

    path = tmp_path_factory.mktemp("toy_data") / "toy.jsonl"
    path.write_text("".join(json.dumps({"problem": p.question, "answer": p.answer, "unique_id": p.id}) + "\n"
                            for p in eval_problems(3)))
    return path


def _toy_run(data, out, strategy, *extra, prm=True):
    verifier = ["--prm", "builtin:toy-prm", "--prm-kind", "math-shepherd"] if prm else []
    return ["run", "--policy", "builtin:toy-policy-s", *verifier, "--strategy", strategy, "--data", str(data),
            "--out", str(out), "--device", "cpu", "--no-progress", "--temperature", "0.6", "--max-tokens", "192", *extra]


@pytest.mark.parametrize("strategy,extra,prm,cls,options", [
    ("rebase", ("--n", "4", "--iterations", "8", "--rebase-temperature", "0.3"), True, "Rebase",
     {"delimiter": "\n\n", "temperature": 0.3}),
    ("adaptive-majority", ("--n", "8", "--round-size", "2", "--confidence", "0.9"), False, "AdaptiveMajority",
     {"delimiter": "\n\n", "round_size": 2, "confidence": 0.9}),
    ("adaptive-weighted", ("--n", "8", "--round-size", "4"), True, "AdaptiveWeighted",
     {"delimiter": "\n\n", "round_size": 4, "confidence": 0.95}),
])
def test_cli_runs_each_new_strategy_on_the_toy_models(toy_data, tmp_path, strategy, extra, prm, cls, options):
    from ttc_fast.cli import main
    from ttc_fast.results import read_results

    out = tmp_path / f"{strategy}.jsonl"
    assert main(_toy_run(toy_data, out, strategy, *extra, prm=prm)) == 0
    records = read_results(out)
    assert sorted(r["id"] for r in records) == ["toy-eval-0", "toy-eval-1", "toy-eval-2"]
    n = int(extra[extra.index("--n") + 1])
    for r in records:
        assert (r["strategy"], r["n"], r["options"]) == (cls, n, options)
        drawn = len(r["completions"])
        if cls == "Rebase":
            assert r["iterations"] == 8 and drawn == n
        else:
            assert 1 <= drawn <= n and drawn % options["round_size"] == 0
        assert sorted(int(k) for k in r["picks"]) == powers_of_two(drawn)
        assert set(r["picks"][str(drawn)]) == ({"maj", "naive", "weighted"} if prm else {"maj"})


@pytest.mark.parametrize("strategy,flag,value,having", [
    ("rebase", "--pf-temperature", "0.5", "particle-filtering"),  # not REBASE's temperature
    ("particle-filtering", "--rebase-temperature", "0.5", "rebase"),
    ("beam", "--round-size", "2", "adaptive-majority, adaptive-weighted"),
    ("rebase", "--confidence", "0.9", "adaptive-majority, adaptive-weighted"),
])
def test_cli_flags_apply_only_to_their_strategies(toy_data, tmp_path, capsys, strategy, flag, value, having):
    from ttc_fast.cli import main

    assert main(_toy_run(toy_data, tmp_path / "x.jsonl", strategy, flag, value)) == 2
    err = capsys.readouterr().err
    assert f"{flag} does not apply to" in err and f"({having})" in err


def test_cli_bad_adaptive_and_rebase_settings_name_the_range(toy_data, tmp_path, capsys):
    from ttc_fast.cli import main

    for strategy, flag, value, message in (("adaptive-majority", "--confidence", "1.5", "confidence must be in (0.5, 1)"),
                                           ("adaptive-weighted", "--round-size", "0", "round_size must be >= 1"),
                                           ("rebase", "--rebase-temperature", "0", "temperature must be a finite number > 0")):
        assert main(_toy_run(toy_data, tmp_path / "x.jsonl", strategy, flag, value)) == 2
        assert message in capsys.readouterr().err
