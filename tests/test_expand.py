"""Engine.start / expand / fork / release: step-wise continuation of branches in the cache."""
import pytest

import ttc_fast as tf
from ttc_fast.testing import build_tiny_model


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = build_tiny_model(tmp_path_factory.mktemp("llama"), "llama", seed=3)
    return tf.Engine(tf.load_model(path, device="cpu"), num_blocks=256, block_size=4)


def greedy(max_tokens, **kw):
    return tf.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def test_chained_expansions_continue_exactly_like_one_generation(engine):
    prompt = "Step 1: add 3 and 4 to get 7."
    whole = engine.generate([prompt], greedy(24))[0].token_ids
    branch = engine.start(prompt)
    got = []
    for size in (5, 1, 11, 7):
        [[(branch, out)]] = engine.expand([branch], [1], greedy(size))
        assert out.finish_reason == "length" and len(out.token_ids) == size
        got += out.token_ids
    assert got == whole
    assert branch.token_ids[-len(whole):] == whole and branch.pending == [whole[-1]]
    engine.release(branch)
    assert engine.runner.blocks.num_used_blocks == 0


def test_children_share_the_parent_and_stop_at_the_delimiter(engine):
    roots = [engine.start("How many clips did Natalia sell"), engine.start([5, 6, 7, 8, 9])]
    sampling = tf.SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True, stop=["e"], seed=1)
    results = engine.expand(roots, [4, 3], sampling)
    assert [len(r) for r in results] == [4, 3]
    children = [child for r in results for child, _ in r]
    assert len({c.seq for c in children}) == 7
    outs = [out for r in results for _, out in r]
    assert all(out.finish_reason in ("stop", "length") for out in outs)
    stopped = [out for out in outs if out.finish_reason == "stop"]
    assert stopped and len(stopped) < len(outs)  # both ends happen with this seed
    assert all(out.stop_reason == "e" and "e" not in out.text for out in stopped)
    # the prompt was computed once per root, not once per child
    used_before = engine.runner.blocks.num_used_blocks
    assert engine.runner.blocks.num_shared_blocks > 0
    for child in children:
        engine.release(child)
    assert used_before > 0 and engine.runner.blocks.num_used_blocks == 0
    engine.runner.blocks.check_invariants()


def test_expansion_is_seeded_per_branch(engine):
    sampling = tf.SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True)
    outs = []
    for _ in range(2):
        a, b = engine.start([9, 8, 7]), engine.start([1, 2, 3, 4])
        res = engine.expand([a, b], [2, 2], sampling, seeds=[11, 12])
        outs.append([[o.token_ids for _, o in r] for r in res])
        for r in res:
            for child, _ in r:
                engine.release(child)
    assert outs[0] == outs[1]
    with pytest.raises(ValueError, match="one count >= 1 per branch"):
        engine.expand([engine.start([1, 2])], [0], sampling)


def test_finished_children_are_evicted_under_pressure_and_recomputed(engine):
    """A pool too small to hold every child of one expansion: finished children are evicted
    (seq None) and transparently recomputed by the next expansion, with identical results."""
    small = tf.Engine(engine.model, num_blocks=24, block_size=4)
    prompts = [[3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]]
    sampling = tf.SamplingParams(temperature=1.0, max_tokens=9, ignore_eos=True)

    def two_rounds(eng):
        first = eng.expand([eng.start(p) for p in prompts], [4, 4], sampling, seeds=[1, 2])
        children = [child for r in first for child, _ in r]
        second = eng.expand(children, [1] * len(children), sampling, seeds=list(range(10, 18)))
        outs = [[o.token_ids for _, o in r] for r in first + second]
        for r in second:
            for child, _ in r:
                eng.release(child)
        return outs

    assert two_rounds(small) == two_rounds(engine)
    assert small.stats["evictions"] > 0
    assert small.runner.blocks.num_used_blocks == 0


@pytest.mark.parametrize("overlap", [False, True])
def test_on_finish_reports_each_child_once_at_the_step_it_finishes(engine, overlap):
    """`on_finish` hears of every child exactly once, with its final text, in the step that
    finished it: children that stop sooner are reported before the others finish (and the
    outputs are the same as without the report)."""
    sampling = [tf.SamplingParams(temperature=1.0, max_tokens=m, ignore_eos=True, seed=2) for m in (3, 9)]
    reports = []

    def on_finish(finished):
        reports.append((engine.stats["steps"], finished))

    engine.overlap = overlap
    try:
        runs = []
        for hook in (None, on_finish):
            roots = [engine.start([5, 6, 7]), engine.start([9, 8, 7, 6])]
            runs.append(engine.expand(roots, [3, 2], sampling, seeds=[4, 5], on_finish=hook))
    finally:
        engine.overlap = False
    plain, heard = runs
    assert [[o.token_ids for _, o in r] for r in plain] == [[o.token_ids for _, o in r] for r in heard]
    told = {(k, j): text for _, finished in reports for k, j, text in finished}
    assert sum(len(f) for _, f in reports) == len(told) == 5
    assert told == {(k, j): out.text for k, r in enumerate(heard) for j, (_, out) in enumerate(r)}
    step_of = {(k, j): step for step, finished in reports for k, j, _ in finished}
    assert max(step_of[0, j] for j in range(3)) < min(step_of[1, j] for j in range(2))
    for r in plain + heard:
        for child, _ in r:
            engine.release(child)
    assert engine.runner.blocks.num_used_blocks == 0
