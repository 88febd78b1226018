"""Compute accounting (ttc_fast.flops, the "compute" of a results line) and `ttc-fast report`.

The parameter counts are checked against the models transformers builds; the per-line
ingredients against what the search actually generated (a spy on `Engine.expand`) and what the
PRM's runner actually ran (a spy on its forwards); the report's numbers against synthetic lines
whose answers are known.
"""
import json

import pytest

import ttc_fast as tf
from ttc_fast.cli import main
from ttc_fast.data import Problem
from ttc_fast.flops import ModelCost, context_sum
from ttc_fast.identity import run_models
from ttc_fast.prompts import PromptFormat
from ttc_fast.report import Point, curves, load_runs, report, run_points, table
from ttc_fast.results import RunError, canonical, differences, read_results
from ttc_fast.run import run_search
from ttc_fast.testing import build_tiny_model, tiny_config

DELIM = "e"  # the random policy never writes "\n\n"; "e" ends steps often
SAMPLING = tf.SamplingParams(temperature=1.0, max_tokens=10, seed=0)


def hand_flops(cost: dict, tokens: int, context: int) -> int:
    """The formula as the flops module's docstring states it, written out again."""
    return 2 * cost["non_embedding_params"] * tokens + 4 * cost["layers"] * cost["q_heads"] * cost["head_dim"] * context


# --- the formula and the parameter count ------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "llama2", "mistral", "qwen2", "qwen3"])
def test_non_embedding_params_equal_transformers_count_without_the_embedding(family):
    """llama: tied head (not counted); llama2 / qwen2: untied head (counted); qwen2: q/k/v biases;
    qwen3: per-head q/k norms and head_dim 32 != hidden / heads."""
    import transformers as hf

    cfg = tiny_config(family, 300, hidden=48, layers=3, heads=6, kv_heads=2)
    cls = {"llama": hf.LlamaForCausalLM, "llama2": hf.LlamaForCausalLM, "mistral": hf.MistralForCausalLM,
           "qwen2": hf.Qwen2ForCausalLM, "qwen3": hf.Qwen3ForCausalLM}[family]
    model = cls(cfg)
    want = sum(p.numel() for p in model.parameters()) - model.model.embed_tokens.weight.numel()
    cost = ModelCost.from_config(cfg)
    assert cost.non_embedding_params == want
    assert (cost.layers, cost.q_heads, cost.head_dim) == (3, 6, 32 if family == "qwen3" else 8)
    assert ModelCost.from_config(cfg.to_dict()) == cost  # a config.json dict gives the same


def test_a_loaded_checkpoint_and_a_prm_score_head_are_counted_as_built(tmp_path):
    """The policy's cost from the loaded checkpoint; a Qwen PRM's score head replaces the lm head
    it does not have (transformers' own PRM class counts the same)."""
    from prm_builders import build_qwen_prm, prm_model_classes

    path = build_tiny_model(tmp_path / "policy", "qwen2", seed=1)
    models = run_models(tf.load_model(path, device="cpu"))
    import transformers as hf

    ref = hf.Qwen2ForCausalLM.from_pretrained(str(path))
    assert models["policy"]["cost"]["non_embedding_params"] == \
        sum(p.numel() for p in ref.parameters()) - ref.model.embed_tokens.weight.numel()

    prm_path = build_qwen_prm(tmp_path / "prm", seed=2)
    prm = tf.load_prm(prm_path, device="cpu", dtype="float32", num_blocks=64)
    ref = prm_model_classes()["qwen-prm"].from_pretrained(str(prm_path))
    cost = run_models(tf.load_model(path, device="cpu"), prm, str(prm_path))["prm"]["cost"]
    assert cost["non_embedding_params"] == sum(p.numel() for p in ref.parameters()) - ref.model.embed_tokens.weight.numel()


def test_flops_formula_and_context_sums():
    cost = ModelCost(non_embedding_params=1000, layers=3, q_heads=4, head_dim=8)
    assert cost.flops(10, 55) == 2 * 1000 * 10 + 4 * 3 * 4 * 8 * 55
    assert cost.flops(0, 0) == 0
    for start, count in [(0, 1), (0, 7), (5, 3), (17, 0), (100, 41)]:
        assert context_sum(start, count) == sum(p + 1 for p in range(start, start + count))
    assert ModelCost.from_dict(cost.as_dict()) == cost
    with pytest.raises(ValueError, match="layers must be an int >= 0"):
        ModelCost(1000, -1, 4, 8)
    with pytest.raises(ValueError, match="missing head_dim"):
        ModelCost.from_dict({"non_embedding_params": 1, "layers": 1, "q_heads": 1})


# --- the ingredients on a real search ---------------------------------------------------------------
@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = build_tiny_model(tmp_path_factory.mktemp("llama"), "llama", seed=5)
    return tf.Engine(tf.load_model(path, device="cpu"), num_blocks=1024, block_size=4)


@pytest.fixture(scope="module")
def prm_path(tmp_path_factory):
    from prm_builders import build_math_shepherd_prm

    return build_math_shepherd_prm(tmp_path_factory.mktemp("prm"), seed=3)


@pytest.fixture(scope="module")
def model_prm(prm_path):
    return tf.load_prm(prm_path, kind="math-shepherd", device="cpu", dtype="float32", num_blocks=2048, block_size=4)


def problems(k: int) -> list[Problem]:
    return [Problem(f"p{i}", f"What is {i} plus {i + 2}?", str(2 * i + 2), "math", {}) for i in range(k)]


def spy_generated(engine, monkeypatch) -> list[int]:
    """Every generated token's position, from what `Engine.expand` returns."""
    positions = []
    real = engine.expand

    def spy(branches, counts, sampling, seeds=None, **kw):
        results = real(branches, counts, sampling, seeds, **kw)
        for res in results:
            for branch, out in res:
                end = len(branch.token_ids)
                positions.extend(range(end - len(out.token_ids), end))
        return results

    monkeypatch.setattr(engine, "expand", spy)
    return positions


def spy_prm_forwards(prm, monkeypatch) -> list[int]:
    """The position of every token the PRM's runner runs through its model."""
    positions = []
    runner = prm.runner
    real = runner.forward

    def spy(seqs, tokens, *args, **kwargs):
        starts = [runner.seq_len(int(s)) for s in seqs]
        out = real(seqs, tokens, *args, **kwargs)
        for start, toks in zip(starts, tokens):
            positions.extend(range(start, start + len(toks)))
        return out

    monkeypatch.setattr(runner, "forward", spy)
    return positions


@pytest.mark.parametrize("kind", ["math-shepherd", "outcome:math-shepherd"])
@pytest.mark.parametrize("num_blocks", [2048, 12], ids=["room", "evicting"])
def test_prm_rows_report_the_context_their_tokens_ran_with(prm_path, kind, num_blocks, monkeypatch):
    """Per row, as `last_row_tokens`: step bodies, outcome probes on forks, re-encodes of evicted
    handles; `context_processed` grows by the same."""
    prm = tf.load_prm(prm_path, kind=kind, device="cpu", dtype="float32", num_blocks=num_blocks, block_size=4)
    ran = spy_prm_forwards(prm, monkeypatch)
    handles = prm.fork(prm.start("What is 2 plus 3?"), 3)
    for steps in (["Add them.", "Two and three.", "It is 5."], ["So 5.", "Five.", "The answer is 5."]):
        before, start = prm.context_processed, len(ran)
        prm.score_steps(handles, steps)
        assert sum(prm.last_row_context) == prm.context_processed - before == sum(p + 1 for p in ran[start:])
        assert sum(prm.last_row_tokens) == len(ran) - start
    assert prm.context_processed == sum(p + 1 for p in ran)
    if num_blocks == 12:
        assert prm.stats["evictions"] > 0


@pytest.mark.parametrize("strategy", [tf.BeamSearch(n=4, width=2, iterations=3, delimiter=DELIM), tf.BestOfN(n=4)],
                         ids=["beam", "best-of-n"])
def test_each_line_records_what_the_models_processed_and_its_flops(engine, model_prm, strategy, tmp_path, monkeypatch):
    """The policy: the prompt once (its samples fork it) and every generated token once, at its
    position; the PRM: every token its runner ran. FLOPs recomputed from the line alone equal the
    recorded ones."""
    generated = spy_generated(engine, monkeypatch)
    prm_ran = spy_prm_forwards(model_prm, monkeypatch)
    models = run_models(engine.model, model_prm, "prm")
    out = tmp_path / "run.jsonl"
    run_search(engine, model_prm, strategy, SAMPLING, problems(2), out, progress=False, models=models)
    records = read_results(out)
    prompt = PromptFormat()
    prompts = [len(prompt.encode(p.question, engine.tokenizer, engine.model.path)) for p in problems(2)]

    compute = [r["compute"] for r in records]
    assert sum(c["policy_tokens_processed"] for c in compute) == sum(prompts) + len(generated)
    assert sum(r["policy_tokens"] for r in records) == len(generated)
    assert sum(c["policy_context_sum"] for c in compute) == \
        sum(context_sum(0, p) for p in prompts) + sum(p + 1 for p in generated)
    for r, p in zip(sorted(records, key=lambda r: r["id"]), prompts):
        assert r["compute"]["policy_tokens_processed"] == p + r["policy_tokens"]
    assert sum(c["prm_tokens_processed"] for c in compute) == len(prm_ran) > 0
    assert sum(c["prm_context_sum"] for c in compute) == sum(p + 1 for p in prm_ran)

    for r in json.loads("[" + ",".join(out.read_text().splitlines()) + "]"):  # the line alone
        c, m = r["compute"], r["models"]
        policy = hand_flops(m["policy"]["cost"], c["policy_tokens_processed"], c["policy_context_sum"])
        prm = hand_flops(m["prm"]["cost"], c["prm_tokens_processed"], c["prm_context_sum"])
        assert (c["policy_flops"], c["prm_flops"], c["flops"]) == (policy, prm, policy + prm) and prm > 0
        if strategy.name == "BestOfN":
            # each sample is one expansion of the prompt: the report's per-n cost at n = N is the line's
            start = c["policy_tokens_processed"] - r["policy_tokens"]
            tokens = [x["policy_tokens"] for x in r["completions"]]
            assert sum(tokens) == r["policy_tokens"]
            ctx = context_sum(0, start) + sum(context_sum(start, k) for k in tokens)
            assert hand_flops(m["policy"]["cost"], start + sum(tokens), ctx) == c["policy_flops"]


def test_a_callable_verifier_costs_nothing_and_a_line_without_models_has_no_flops(engine, tmp_path):
    verifier = tf.load_prm(lambda q, steps: 1.0 if "a" in steps[-1] else 0.0)
    out = tmp_path / "run.jsonl"
    run_search(engine, verifier, tf.BestOfN(n=2), SAMPLING, problems(1), out, progress=False,
               models=run_models(engine.model, verifier, "python:x:y"))
    (line,) = read_results(out)
    assert line["models"]["prm"]["cost"] is None
    assert line["compute"]["prm_flops"] == 0 and line["compute"]["flops"] == line["compute"]["policy_flops"] > 0
    out2 = tmp_path / "bare.jsonl"
    run_search(engine, verifier, tf.BestOfN(n=2), SAMPLING, problems(1), out2, progress=False)  # models=None
    (bare,) = read_results(out2)
    assert bare["compute"]["policy_flops"] is None and bare["compute"]["flops"] is None
    assert bare["compute"]["policy_context_sum"] == line["compute"]["policy_context_sum"]


def test_only_the_prm_part_of_compute_is_volatile():
    base = {"id": "a", "seconds": 1.0, "prm_tokens": 5, "policy_tokens": 3,
            "compute": {"policy_tokens_processed": 10, "policy_context_sum": 55, "policy_flops": 100,
                        "prm_tokens_processed": 5, "prm_context_sum": 15, "prm_flops": 50, "flops": 150}}
    other_cache = {**base, "prm_tokens": 4, "compute": {**base["compute"], "prm_tokens_processed": 4, "prm_context_sum": 10,
                                                         "prm_flops": 40, "flops": 140}}
    assert differences([base], [other_cache]) == []
    assert "policy_context_sum" in json.dumps(canonical([base]))
    other_policy = {**base, "compute": {**base["compute"], "policy_context_sum": 56}}
    assert differences([base], [other_policy]) == ["a.compute.policy_context_sum: 55 != 56"]


# --- the report -------------------------------------------------------------------------------------
COST = {"non_embedding_params": 1000, "layers": 2, "q_heads": 4, "head_dim": 8}


def bon_line(pid: str, tokens: list[int], correct: dict, prompt: int = 10, prm_tokens: int = 40, strategy="BestOfN") -> dict:
    """A best-of-N line: completions of `tokens` tokens after a `prompt`-token prompt."""
    ctx = context_sum(0, prompt) + sum(context_sum(prompt, k) for k in tokens)
    policy = hand_flops(COST, prompt + sum(tokens), ctx)
    prm_flops = 7 * prm_tokens
    return {"id": pid, "strategy": strategy, "n": len(tokens), "width": None, "iterations": None,
            "models": {"policy": {"path": "p", "config_sha256": "x", "cost": COST}, "prm": None},
            "completions": [{"policy_tokens": k} for k in tokens],
            "correct": {str(n): c for n, c in correct.items()}, "policy_tokens": sum(tokens), "prm_tokens": prm_tokens,
            "compute": {"policy_tokens_processed": prompt + sum(tokens), "policy_context_sum": ctx, "policy_flops": policy,
                        "prm_tokens_processed": prm_tokens, "prm_context_sum": 0, "prm_flops": prm_flops,
                        "flops": policy + prm_flops}}


def both(maj: bool, weighted: bool) -> dict:
    return {"maj": maj, "naive": False, "weighted": weighted}


def write(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_table_numbers_recomputed_from_synthetic_lines(tmp_path):
    bon = [bon_line("a", [3, 5, 7, 9], {1: both(True, False), 2: both(False, True), 4: both(True, True)}),
           bon_line("b", [2, 2, 4, 4], {1: both(False, False), 2: both(False, False), 4: both(False, True)}, prm_tokens=20)]
    points = {p.n: p for p in run_points("bon.jsonl", bon)}
    assert set(points) == {1, 2, 4} and {p.pick for p in points.values()} == {"weighted"}  # the lines hold it
    assert points[4].accuracy == 1.0 and points[2].accuracy == 0.5 and points[1].accuracy == 0.0
    assert points[4].policy_tokens == (24 + 12) / 2 and points[4].prm_tokens == 30
    assert points[4].flops == (bon[0]["compute"]["flops"] + bon[1]["compute"]["flops"]) / 2
    # n = 2: the first two samples' tokens; the PRM's share estimated from them
    assert points[2].policy_tokens == (8 + 4) / 2 and points[2].estimated and not points[4].estimated
    assert points[2].prm_tokens == pytest.approx((40 * 8 / 24 + 20 * 4 / 12) / 2)
    want = [hand_flops(COST, 10 + a + b, context_sum(0, 10) + context_sum(10, a) + context_sum(10, b)) + 7 * prm * (a + b) / total
            for (a, b), prm, total in (((3, 5), 40, 24), ((2, 2), 20, 12))]
    assert points[2].flops == pytest.approx(sum(want) / 2)
    assert {p.n: p.accuracy for p in run_points("bon.jsonl", bon, pick="maj")} == {1: 0.5, 2: 0.0, 4: 0.5}

    # an adaptive run: its final pick is at each line's largest key; a failed problem counts as wrong
    beam = [{"id": "a", "strategy": "BeamSearch", "n": 8, "correct": {"1": {"maj": True}, "3": {"maj": False}},
             "policy_tokens": 30, "prm_tokens": 12},
            {"id": "b", "strategy": "BeamSearch", "n": 8, "correct": {"1": {"maj": False}, "2": {"maj": True}},
             "policy_tokens": 50, "prm_tokens": 16},
            {"id": "c", "strategy": "BeamSearch", "n": 8, "correct": {}, "policy_tokens": 0, "prm_tokens": 0, "error": "x"}]
    (point,) = run_points("beam.jsonl", beam)
    assert (point.n, point.pick, point.problems) == (8, "maj", 3)  # no weighted pick: maj
    assert point.accuracy == pytest.approx(1 / 3) and point.policy_tokens == pytest.approx(80 / 3)
    assert point.flops is None  # lines from before compute was recorded

    text = table(run_points("bon.jsonl", bon) + [point])
    rows = {tuple(line.split()[:3]): line.split() for line in text.splitlines()[1:] if line.startswith(("bon", "beam"))}
    assert rows[("beam.jsonl", "BeamSearch", "8")][3:] == ["maj", "33.3%", "3", "26.7", "9.3", "-"]
    assert rows[("bon.jsonl", "BestOfN", "4")][4:7] == ["100.0%", "2", "18.0"]
    assert rows[("bon.jsonl", "BestOfN", "2")][-1].startswith("~") and "estimated" in text


def test_pick_must_be_in_the_lines():
    lines = [{"id": "a", "strategy": "MajorityVote", "n": 2, "correct": {"2": {"maj": True}}, "policy_tokens": 1, "prm_tokens": 0}]
    with pytest.raises(RunError, match="holds no 'weighted' pick.*--pick maj"):
        run_points("maj.jsonl", lines, pick="weighted")
    with pytest.raises(RunError, match="--pick must be one of maj, naive, weighted"):
        run_points("maj.jsonl", lines, pick="best")


def test_curves_group_runs_by_strategy_and_prefer_a_runs_own_n():
    def pt(strategy, n, run_n, acc):
        return Point("r", strategy, n, run_n, "maj", acc, 1, 1.0, 0.0, None)

    got = curves([pt("BeamSearch", 4, 4, 0.1), pt("BeamSearch", 16, 16, 0.3), pt("BestOfN", 4, 16, 0.5),
                  pt("BestOfN", 4, 4, 0.6), pt("BestOfN", 2, 4, 0.7), pt("BestOfN", 2, 16, 0.8), pt("BestOfN", 16, 16, 0.9)])
    assert [(p.n, p.accuracy) for p in got["BeamSearch"]] == [(4, 0.1), (16, 0.3)]
    assert [(p.n, p.accuracy) for p in got["BestOfN"]] == [(2, 0.8), (4, 0.6), (16, 0.9)]


def test_report_cli_writes_the_table_and_the_plot(tmp_path, capsys):
    bon = write(tmp_path / "bon.jsonl", [bon_line("a", [3, 5, 7, 9], {1: both(True, False), 2: both(False, True), 4: both(True, True)})])
    beam = write(tmp_path / "beam.jsonl", [{**bon_line("a", [6, 6], {2: both(True, True)}), "strategy": "BeamSearch"}])
    for x in ("tokens", "flops"):
        png = tmp_path / f"acc-{x}.png"
        assert main(["report", bon, beam, "--plot", str(png), "--x", x]) == 0
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
        out = capsys.readouterr().out
        assert "BeamSearch" in out and "BestOfN" in out and f"plot: {png}" in out
    # an old line (no compute): the FLOPs panel leaves its curve out and says so
    old = write(tmp_path / "old.jsonl", [{"id": "a", "strategy": "DVTS", "n": 4, "correct": {"4": {"maj": True}},
                                          "policy_tokens": 9, "prm_tokens": 3}])
    assert "left out of the flops panel where their lines record no (or zero) flops: DVTS" in \
        report([bon, old], tmp_path / "old.png", x="flops")


def test_report_errors_exit_2(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing.jsonl")]) == 2
    assert "results file not found" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["report", str(empty)]) == 2
    assert "holds no results lines" in capsys.readouterr().err
    with pytest.raises(RunError, match="holds no results lines"):
        load_runs([empty])
