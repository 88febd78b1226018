"""Early rejection and routing by difficulty, decision by decision through the search loop: the
samples each checkpoint stops (recomputed from the recorded scores), the survivors left alone
between checkpoints, rounds and min_keep, the tokens saved against best-of-N; the probe's
difficulty bin choosing the search that runs next, its seeds, tokens and budget; the shipped toy
map; both end to end through `ttc-fast run` on the toy task's models.

As in test_strategy_rules.py, the tiny random policy never writes "\\n\\n", so the step
delimiter there is "e".
"""
import json
import math

import pytest
from strategy_helpers import DELIM, path_score, problems, tiny_engine

import ttc_fast as tf
from ttc_fast.cli import main
from ttc_fast.results import read_results
from ttc_fast.search import SearchObserver, TreeSearch
from ttc_fast.strategies import DVTS, BeamSearch, BestOfN, EarlyReject, Routed
from ttc_fast.strategies.routed import TOY_ROUTING
from ttc_fast.tree import Path


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return tiny_engine(tmp_path_factory, num_blocks=2048)


class Prunings(SearchObserver):
    """Every pruning: (problem, its strategy then, the children, the kept frontier), and every
    result with its state."""

    def __init__(self):
        self.prunings = []
        self.results = {}

    def on_prune(self, state, children, kept):
        self.prunings.append((state, state.strategy, list(children), list(kept)))

    def on_result(self, state, result):
        self.results[state.index] = (state, result)


def run_recorded(engine, strategy, sampling, k: int, prm=None):
    observer = Prunings()
    search = TreeSearch(engine, prm or tf.load_prm(path_score), strategy, sampling, observer=observer)
    results = list(search.run(problems(k)))
    assert engine.runner.blocks.num_used_blocks == 0  # every rejected or set-aside path was freed
    return observer, results


# --- early rejection -------------------------------------------------------------------------------
def expected_survivors(live: list[Path], fraction: float, min_keep: int, aggregation: str = "last") -> list[Path]:
    """The rule, written out again: drop the floor(fraction x live) lowest scores (among equal
    scores the later sample goes first), leaving at least min_keep; survivors in sample order."""
    drop = max(0, min(math.floor(fraction * len(live) + 1e-9), len(live) - min_keep))
    ranked = sorted(live, key=lambda p: (p.score(aggregation), -p.group))  # worst first
    gone = {id(p) for p in ranked[:drop]}
    return sorted((p for p in live if id(p) not in gone), key=lambda p: p.group)


@pytest.mark.parametrize("n,fraction,checkpoint_steps,rounds,min_keep", [
    (8, 0.5, 1, 1, 1),  # the defaults' rule at n = 8
    (8, 0.5, 2, 2, 1),  # a checkpoint every second step, twice
    (8, 0.75, 1, 3, 3),  # min_keep stops the third round's cut
])
def test_early_reject_stops_the_lowest_fraction_at_each_checkpoint_only(engine, n, fraction, checkpoint_steps, rounds, min_keep):
    strategy = EarlyReject(n=n, reject_fraction=fraction, checkpoint_steps=checkpoint_steps, rounds=rounds,
                           min_keep=min_keep, iterations=8, delimiter=DELIM)
    observer, results = run_recorded(engine, strategy, tf.SamplingParams(temperature=1.0, max_tokens=24, seed=0), 4)
    rejections: dict[int, int] = {}
    previous_kept: dict[int, list[int]] = {}
    for state, _, children, kept in observer.prunings:
        # a survivor is continued once, by one step: its child is the only one of its sample
        groups = [c.group for c in children]
        assert groups == sorted(set(groups))
        if state.index in previous_kept:
            assert groups == previous_kept[state.index]
        live = [c for c in children if not c.done]
        assert len({len(c.steps) for c in live}) <= 1  # the live samples advance together
        steps = len(live[0].steps) if live else 0
        checkpoint = steps % checkpoint_steps == 0 and steps // checkpoint_steps <= rounds
        expected = expected_survivors(live, fraction, min_keep) if checkpoint else live  # else untouched
        assert [(id(p), count) for p, count in kept] == [(id(p), 1) for p in expected]
        if checkpoint and live:
            rejections[state.index] = rejections.get(state.index, 0) + 1
            assert len(kept) == max(min(min_keep, len(live)), len(live) - math.floor(fraction * len(live) + 1e-9))
        previous_kept[state.index] = [p.group for p, _ in kept]
    assert max(rejections.values()) == rounds  # every round happened somewhere, none more
    fewer = 0
    for index, (state, result) in observer.results.items():
        finished = [c for s, _, children, _ in observer.prunings if s is state for c in children if c.done]
        # the finished samples are the completions, in sample order; the rejected are not among them
        assert len(result.completions) == len(finished) <= n
        fewer += len(finished) < n
        assert [c.steps for c in result.completions] == [p.steps for p in sorted(finished, key=lambda p: p.group)]
        assert max(result.correct) == len(result.completions)  # the final pick reads them all
    assert fewer > 0


def test_early_reject_ties_keep_the_earlier_sample():
    strategy = EarlyReject(n=4, reject_fraction=0.5)
    paths = [Path(["s"], [score], group=g) for g, score in enumerate([0.5, 0.5, 0.9, 0.5])]
    assert sorted(p.group for p in strategy.rejected(paths)) == [1, 3]  # of three equal scores, the last two go
    assert strategy.rejected(list(reversed(paths))) == strategy.rejected(paths)


def test_early_reject_without_rejection_is_stepwise_best_of_n(engine):
    """reject_fraction 0 (or rounds 0): every sample runs to its end."""
    sampling = tf.SamplingParams(temperature=1.0, max_tokens=24, seed=3)
    for strategy in (EarlyReject(n=6, reject_fraction=0.0, iterations=6, delimiter=DELIM),
                     EarlyReject(n=6, rounds=0, iterations=6, delimiter=DELIM)):
        observer, results = run_recorded(engine, strategy, sampling, 3)
        for _, _, children, kept in observer.prunings:
            assert [p for p, _ in kept] == [c for c in children if not c.done]
        assert all(len(r.completions) == 6 for r in results)


@pytest.fixture(scope="module")
def toy_models():
    from ttc_fast.toy.evaluate import policy_s, toy_prm

    return policy_s("cpu"), toy_prm(device="cpu")


def test_early_reject_spends_fewer_policy_tokens_than_best_of_n(toy_models):
    """On the toy task, same seeds: best-of-N writes n whole samples; early rejection stops half
    of them after their first step. Without rejection, the same stepwise samples cost as much."""
    from ttc_fast.toy import dev_problems

    policy, prm = toy_models
    data = dev_problems()[:6]

    def tokens(strategy, max_tokens):
        results = list(TreeSearch(policy, prm, strategy, tf.SamplingParams(temperature=0.6, max_tokens=max_tokens, seed=0)).run(data))
        return {r.problem_id: r.policy_tokens for r in results}, {r.problem_id: len(r.completions) for r in results}

    bon, bon_count = tokens(BestOfN(n=8), 192)
    rejecting, count = tokens(EarlyReject(n=8, iterations=10), 48)
    keeping, keep_count = tokens(EarlyReject(n=8, iterations=10, reject_fraction=0.0), 48)
    assert sum(rejecting.values()) < 0.8 * sum(bon.values())
    assert all(rejecting[i] < keeping[i] for i in rejecting)  # per problem: the same first steps, then fewer samples
    assert set(bon_count.values()) == set(keep_count.values()) == {8} and set(count.values()) == {4}


@pytest.mark.parametrize("settings,message", [
    ({"reject_fraction": -0.1}, r"reject_fraction must be in \[0, 1\]"),
    ({"reject_fraction": 1.5}, r"reject_fraction must be in \[0, 1\]"),
    ({"checkpoint_steps": 0}, "checkpoint_steps must be >= 1"),
    ({"rounds": -1}, "rounds must be >= 0"),
    ({"min_keep": 0}, r"min_keep must be in \[1, n = 16\]"),
    ({"min_keep": 17}, r"min_keep must be in \[1, n = 16\]"),
    ({"iterations": 0}, "iterations must be >= 1"),
])
def test_early_reject_bad_settings(settings, message):
    with pytest.raises(ValueError, match=message):
        EarlyReject(**settings)


def test_early_reject_defaults():
    s = EarlyReject()
    assert (s.n, s.reject_fraction, s.checkpoint_steps, s.rounds, s.min_keep, s.iterations) == (16, 0.5, 1, 1, 1, 40)


# --- routing by difficulty -------------------------------------------------------------------------
CHOICE_CLASS = {"bon": BestOfN, "beam": BeamSearch, "dvts": DVTS, "early-reject": EarlyReject}


def test_routed_runs_the_choice_of_the_probes_difficulty_bin(engine):
    strategy = Routed(n=4, thresholds=(0.45, 0.55), choices=("beam:8", "bon:4", "stop"), budget=8, width=2,
                      iterations=3, delimiter=DELIM)
    observer, results = run_recorded(engine, strategy, tf.SamplingParams(temperature=1.0, max_tokens=16, seed=0), 12)
    bins_seen = set()
    for index, (state, result) in observer.results.items():
        # the problem's first pruning is the probe's (`state.strategy` is already the choice's there)
        _, strategy_after, probes, kept = next(p for p in observer.prunings if p[0] is state)
        assert len(probes) == 4 and all(p.done for p in probes)
        difficulty = sum(p.score("last") for p in probes) / 4
        b = sum(t <= difficulty for t in strategy.thresholds)
        bins_seen.add(b)
        name, _, count = strategy.choices[b].partition(":")
        texts = [c.text for c in result.completions]
        probe_texts = [DELIM.join(p.steps) for p in probes]
        if name == "stop":
            assert kept == [] and strategy_after is state.strategy is strategy and state.set_aside == []
            assert texts == probe_texts  # the answer is the weighted pick of the probes
            continue
        sub = state.strategy
        assert strategy_after is sub and type(sub) is CHOICE_CLASS[name] and sub.n == int(count) and kept == [(state.root, int(count))]
        assert state.set_aside == probes and texts[-4:] == probe_texts  # the probes join after the search's own
        assert len(result.completions) == 4 + int(count) <= 4 + strategy.budget
        own = [c for c in result.completions[:-4]]
        assert not {c.text for c in own} & set(probe_texts)  # other seeds than the probe's
        if name == "bon":  # nothing pruned: every token is a completion's, the probe's included
            assert result.policy_tokens == sum(c.policy_tokens for c in result.completions)
        else:  # beam search: `iterations` expansions after the probe's, the last to EOS
            assert all(len(c.steps) <= strategy.iterations for c in own)
            assert result.policy_tokens > sum(c.policy_tokens for c in result.completions[-4:])
    assert bins_seen == {0, 1, 2}


def test_routed_probe_is_the_problems_first_samples_whatever_the_choice(engine):
    """The probe draws the same samples whatever the map: its seeds are the problem's first."""
    sampling = tf.SamplingParams(temperature=1.0, max_tokens=16, seed=1)
    texts = []
    for choice in ("stop", "bon:2", "beam:4"):
        strategy = Routed(n=3, choices=(choice,), width=2, iterations=2, delimiter=DELIM)
        _, results = run_recorded(engine, strategy, sampling, 2)
        texts.append({r.problem_id: [c.text for c in r.completions[-3:]] for r in results})
    assert texts[0] == texts[1] == texts[2]


@pytest.mark.parametrize("settings,message", [
    ({}, "choices is empty"),
    ({"choices": ("stop", "beam:16")}, "0 thresholds make 1 bins, but there are 2 choices"),
    ({"thresholds": (0.6, 0.4), "choices": ("stop",) * 3}, "thresholds must be ascending"),
    ({"choices": ("beam",)}, "a choice is 'stop' or NAME:N"),
    ({"choices": ("mcts:4",)}, "a choice is 'stop' or NAME:N"),
    ({"choices": ("beam:128",)}, r"over the budget \(64\): each choice's N must be in \[1, 64\]"),
    ({"choices": ("beam:6",)}, r"choice 'beam:6': .*multiple of width"),
    ({"choices": ("stop",), "budget": 0}, "budget must be >= 1"),
])
def test_routed_bad_settings(settings, message):
    with pytest.raises(ValueError, match=message):
        Routed(**settings)


def test_the_shipped_toy_map_was_fitted_on_dev_problems_and_loads():
    data = json.loads(TOY_ROUTING.read_text())
    assert data["fitted_on"]["problems"].startswith("ttc_fast.toy.dev_problems()")
    from ttc_fast.toy import dev_problems, eval_problems

    dev_ids = [p.id for p in dev_problems()]
    assert {data["fitted_on"]["first_id"], data["fitted_on"]["last_id"]} <= set(dev_ids)
    assert not set(dev_ids) & {p.id for p in eval_problems()}
    routed = Routed.toy()
    assert routed.choices == tuple(row["choice"] for row in data["table"])
    assert routed.thresholds == tuple(data["thresholds"]) and routed.n == data["probe_n"]
    for row in data["table"]:  # the fit's rule: the cheapest choice within the tolerance of the best
        results = row["results"]
        best = max(r["accuracy"] for r in results.values())
        near = [c for c, r in results.items() if r["accuracy"] >= best - data["fitted_on"]["tolerance"] - 1e-12]
        assert row["choice"] == min(near, key=lambda c: results[c]["policy_tokens"])
    assert Routed.toy(n=8).n == 8


# --- the command line ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    from ttc_fast.toy import dev_problems

    path = tmp_path_factory.mktemp("toy_cli") / "dev3.jsonl"
    path.write_text("".join(json.dumps({"problem": p.question, "answer": p.answer, "unique_id": p.id}) + "\n"
                            for p in dev_problems()[:3]))
    return path


def _toy_args(data, out, strategy, *extra):
    return ["run", "--policy", "builtin:toy-policy-s", "--prm", "builtin:toy-prm", "--prm-kind", "math-shepherd",
            "--strategy", strategy, "--temperature", "0.6", "--data", str(data), "--out", str(out), "--device", "cpu",
            "--kv-cache-bytes", str(128 << 20), "--prm-kv-cache-bytes", str(256 << 20), "--no-progress", *extra]


def test_cli_early_reject_end_to_end(toy_data, tmp_path, capsys):
    out = tmp_path / "er.jsonl"
    args = _toy_args(toy_data, out, "early-reject", "--n", "8", "--iterations", "10", "--max-tokens", "48",
                     "--reject-fraction", "0.25", "--checkpoint-steps", "2", "--reject-rounds", "1")
    assert main(args) == 0
    records = read_results(out)
    assert sorted(r["id"] for r in records) == ["toy-dev-0", "toy-dev-1", "toy-dev-2"]
    for r in records:
        assert r["strategy"] == "EarlyReject" and r["n"] == 8 and r["iterations"] == 10
        assert (r["options"]["reject_fraction"], r["options"]["checkpoint_steps"], r["options"]["rounds"]) == (0.25, 2, 1)
        assert 1 <= len(r["completions"]) <= 8 and str(len(r["completions"])) in r["correct"]
    capsys.readouterr()
    assert main(args + ["--resume"]) == 0  # the recorded settings read back as given


def test_cli_routed_end_to_end_with_the_toy_map_and_a_file(toy_data, tmp_path, capsys):
    out = tmp_path / "routed.jsonl"
    args = _toy_args(toy_data, out, "routed", "--max-tokens", "192")
    assert main(args) == 0
    toy = Routed.toy()
    records = read_results(out)
    assert len(records) == 3
    for r in records:
        assert r["strategy"] == "Routed" and r["n"] == toy.n and r["iterations"] == toy.iterations
        assert r["options"]["choices"] == list(toy.choices) and r["options"]["thresholds"] == list(toy.thresholds)
        assert len(r["completions"]) >= toy.n
    assert main(args + ["--resume"]) == 0  # tuples recorded as JSON lists compare equal on resume
    routing = tmp_path / "map.json"
    routing.write_text(json.dumps({**json.loads(TOY_ROUTING.read_text()), "thresholds": [], "choices": ["bon:2"]}))
    out2 = tmp_path / "routed2.jsonl"
    assert main(_toy_args(toy_data, out2, "routed", "--max-tokens", "192", "--routing", str(routing), "--probe-n", "2")) == 0
    assert [len(r["completions"]) for r in read_results(out2)] == [4, 4, 4]  # 2 more samples after a probe of 2


def test_cli_flags_of_other_strategies_are_refused(toy_data, tmp_path, capsys):
    for strategy, flag, value, owner in (("beam", "--reject-fraction", "0.5", "early-reject"),
                                         ("routed", "--reject-rounds", "2", "early-reject"),
                                         ("early-reject", "--probe-n", "4", "routed"),
                                         ("beam", "--routing", "x.json", "routed")):
        assert main(_toy_args(toy_data, tmp_path / "x.jsonl", strategy, flag, value)) == 2
        err = capsys.readouterr().err
        assert f"{flag} does not apply" in err and owner in err
    assert main(_toy_args(toy_data, tmp_path / "x.jsonl", "routed", "--routing", str(tmp_path / "missing.json"))) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(_toy_args(toy_data, tmp_path / "x.jsonl", "early-reject", "--reject-fraction", "2")) == 2
    assert "reject_fraction must be in [0, 1]" in capsys.readouterr().err
