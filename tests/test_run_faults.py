"""One bad problem or one long path never stops a run (the toy models): a path that reaches the
policy's or the PRM's context ends with finish_reason "length", scored at its last complete step;
a problem whose prompt is too long for a model, or whose text the chat template rejects, is an
error record that the summary counts and `--resume` skips, and the other problems finish."""
import json
import shutil

import pytest

import ttc_fast as tf
from ttc_fast.data import Problem
from ttc_fast.loader import BUILTIN_DIR
from ttc_fast.prm import aggregate
from ttc_fast.results import canonical, summarize
from ttc_fast.run import run_search
from ttc_fast.toy import eval_problems

pytestmark = pytest.mark.slow  # searches with the toy models

SAMPLING = tf.SamplingParams(temperature=0.6, max_tokens=160, seed=0)


def _with_context(tmp_path, name: str, positions: int):
    """A copy of a built-in toy checkpoint that attends over only `positions` positions."""
    path = tmp_path / f"{name}-{positions}"
    shutil.copytree(BUILTIN_DIR / name, path)
    config = json.loads((path / "config.json").read_text())
    config["max_position_embeddings"] = positions
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def policy():
    return tf.load_model("builtin:toy-policy-s", device="cpu")


def _search(policy, prm, strategy, problems, sampling=SAMPLING):
    engine = tf.Engine(policy, kv_cache_bytes=32 << 20)
    return engine.search(problems, strategy, sampling, prm=prm)


def _check_cut_paths(results, aggregation="last") -> int:
    """Every completion scores its scored steps; those that ended at a context limit have one
    unscored step or more. Returns how many ended there."""
    ended = 0
    for r in results:
        assert r.error is None and r.completions
        for c in r.completions:
            assert c.score == (aggregate(c.step_scores, aggregation) if c.step_scores else 0.0)
            if len(c.step_scores) < len(c.steps):
                assert c.finish_reason == "length"
                ended += 1
            else:
                assert len(c.step_scores) == len(c.steps)
    return ended


@pytest.mark.parametrize("strategy", [tf.BeamSearch(n=4, width=2, iterations=8), tf.BestOfN(n=4)],
                         ids=["beam", "best-of-n"])
def test_paths_past_the_prms_context_end_and_the_search_goes_on(tmp_path, policy, strategy):
    """A 72-position PRM (the questions take 25-55 of them): longer paths end "length" at their
    last step that fits, the rest go on; no path's PRM text is longer than the PRM's context."""
    prm = tf.load_prm(_with_context(tmp_path, "toy-prm", 72), kind="math-shepherd", device="cpu", kv_cache_bytes=16 << 20)
    results = _search(policy, prm, strategy, eval_problems()[:6])
    assert _check_cut_paths(results) > 0
    for r in results:
        for c in r.completions:
            if c.step_scores:
                assert len(prm.full_ids(r.question, c.steps[: len(c.step_scores)])[0]) <= 72
    assert prm.runner.blocks.num_sequences == 0


def test_paths_at_the_policys_context_end_with_the_cut_step_unscored(tmp_path):
    """A policy that attends over 64 positions: a path that reaches them ends "length"; its cut
    last step is kept as text and not scored."""
    policy = tf.load_model(_with_context(tmp_path, "toy-policy-s", 64), device="cpu")
    prm = tf.load_prm("builtin:toy-prm", kind="math-shepherd", device="cpu", kv_cache_bytes=16 << 20)
    results = _search(policy, prm, tf.BeamSearch(n=4, width=2, iterations=8), eval_problems()[:6])
    assert _check_cut_paths(results) > 0
    for r in results:
        for c in r.completions:
            if c.finish_reason == "length":
                assert len(c.step_scores) == len(c.steps) - 1


def _problems_with_bad_ones():
    good = eval_problems()[:3]
    long = Problem("too-long", "Sam has 3 apples. " * 200 + "How many apples does he have now?", "3", "math", {})
    bad = Problem("bad-text", "BADTEXT Sam has 3 apples. How many apples does he have now?", "3", "math", {})
    return [good[0], long, good[1], bad, good[2]]


# The toy tokenizer has no chat template: this one renders the plain prompt and rejects one text.
REJECTING_TEMPLATE = ("{% if 'BADTEXT' in messages[-1]['content'] %}{{ raise_exception('unsupported text') }}{% endif %}"
                      "{{ messages[-1]['content'] + '\\n\\n' }}")


def test_problems_that_fail_on_their_own_are_error_records(tmp_path, policy, capsys):
    """A prompt longer than the policy's context and a text the chat template rejects: two error
    records with the reason; the other three finish as without them; --resume skips all five."""
    prm = tf.load_prm("builtin:toy-prm", kind="math-shepherd", device="cpu", kv_cache_bytes=16 << 20)
    engine = tf.Engine(policy, kv_cache_bytes=32 << 20)
    strategy = tf.BeamSearch(n=4, width=2, iterations=4)
    out = tmp_path / "run.jsonl"
    problems = _problems_with_bad_ones()
    records = run_search(engine, prm, strategy, SAMPLING, problems, out, progress=False, system_prompt="",
                         chat_template=REJECTING_TEMPLATE).records
    by_id = {r["id"]: r for r in records}
    assert len(records) == 5 and set(by_id) == {p.id for p in problems}
    assert "the model attends over at most 512" in by_id["too-long"]["error"]
    assert "unsupported text" in by_id["bad-text"]["error"] and "chat template failed" in by_id["bad-text"]["error"]
    for pid in ("too-long", "bad-text"):
        assert by_id[pid]["completions"] == [] and by_id[pid]["picks"] == {}
    good = [r for r in records if "error" not in r]
    assert len(good) == 3 and all(len(r["completions"]) == 4 for r in good)
    # the same three problems alone give the same lines
    alone = run_search(engine, prm, strategy, SAMPLING, [p for p in problems if p.id in {r["id"] for r in good}],
                       tmp_path / "alone.jsonl", progress=False, system_prompt="", chat_template=REJECTING_TEMPLATE).records
    assert canonical(alone) == canonical(good)
    table = summarize(records)
    assert "failed: 2 problems" in table
    correct4 = sum(r["correct"]["4"]["weighted"] for r in good)
    row4 = next(line for line in table.splitlines() if line.split()[0] == "4")
    assert f"{100 * correct4 / 5:8.1f}%" in row4 and row4.split()[-1] == "5"  # out of all five problems
    before = out.read_text()
    resumed = run_search(engine, prm, strategy, SAMPLING, problems, out, resume=True, progress=False, system_prompt="",
                         chat_template=REJECTING_TEMPLATE)
    assert out.read_text() == before and resumed.new_records == []


def test_a_question_too_long_for_the_prm_is_an_error_record(tmp_path, policy):
    prm = tf.load_prm(_with_context(tmp_path, "toy-prm", 96), kind="math-shepherd", device="cpu", kv_cache_bytes=16 << 20)
    long = Problem("long", "Sam has 3 apples. " * 30 + "How many apples does he have now?", "3", "math", {})
    results = _search(policy, prm, tf.BestOfN(n=2), [eval_problems()[0], long, eval_problems()[1]])
    assert [r.error is None for r in results] == [True, False, True]
    assert "the PRM" in results[1].error and "at most 96" in results[1].error
    assert prm.runner.blocks.num_sequences == 0
