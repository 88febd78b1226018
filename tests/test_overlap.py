"""Overlapped decoding (Engine(overlap=True), ttc_fast/overlap.py) draws exactly what the plain
loop draws: stops of every kind, n > 1, a tight pool (preemption), expand's kept branches and
chained expansions, the search. On the CPU it runs eagerly; this is where its logic is tested."""
import pytest
import torch

import ttc_fast as tf
from ttc_fast.testing import build_tiny_model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tf.load_model(build_tiny_model(tmp_path_factory.mktemp("llama"), "llama", seed=2), device="cpu")


def outputs(results):
    return [[(o.token_ids, o.text, o.finish_reason, o.stop_reason) for o in r.outputs] for r in results]


def both(model, fn, **engine_kwargs):
    engines = [tf.Engine(model, overlap=overlap, block_size=4, **engine_kwargs) for overlap in (False, True)]
    plain, overlapped = (fn(e) for e in engines)
    return plain, overlapped, engines


@pytest.mark.parametrize("num_blocks", [256, 40])  # 40: the pool runs dry, samples are preempted
def test_generate_draws_the_same_tokens(model, num_blocks):
    free = tf.Engine(model, num_blocks=256, block_size=4).generate(
        ["The answer is"], tf.SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))[0]
    params = [
        tf.SamplingParams(temperature=0.9, max_tokens=24, n=6, seed=1, ignore_eos=True),
        tf.SamplingParams(temperature=0.8, top_p=0.9, max_tokens=20, n=5, seed=2, stop_token_ids=[free.token_ids[3]]),
        tf.SamplingParams(temperature=0.7, top_k=20, max_tokens=16, n=4, seed=3, stop=[free.text[5:7]], ignore_eos=True),
    ]

    def run(engine):
        return [outputs(engine.generate(["The answer is", "How many clips", "Step 1:"], p)) for p in params]

    plain, overlapped, engines = both(model, run, num_blocks=num_blocks)
    assert overlapped == plain
    reasons = {o[2] for per in plain for r in per for o in r}
    assert {"length", "stop"} <= reasons, reasons
    assert engines[1].stats["overlap_wasted_rows"] > 0, "no sample stopped inside a speculated step"
    for e in engines:
        assert e.runner.blocks.num_sequences == 0
        e.runner.blocks.check_invariants()
    if num_blocks == 40:
        assert engines[1].stats["preemptions"] > 0


def test_expand_keeps_branches_that_continue_exactly(model):
    """Kept branches whose step stopped inside a speculated step hold exactly their tokens: a
    second expansion continues them like the plain loop's."""
    sampling = tf.SamplingParams(temperature=0.9, max_tokens=12, seed=5, stop=[" "])

    def run(engine):
        roots = [engine.start(p) for p in ("The answer is", "How many clips")]
        first = engine.expand(roots, [3, 2], sampling)
        branches = [b for res in first for b, _ in res]
        second = engine.expand(branches, [2] * len(branches), sampling)
        out = [[(o.token_ids, o.finish_reason) for _, o in res] for res in first + second]
        out.append([(b.token_ids, b.pending) for res in second for b, _ in res])
        for res in second:
            for b, _ in res:
                engine.release(b)
        return out

    plain, overlapped, engines = both(model, run, num_blocks=256)
    assert overlapped == plain
    assert engines[1].stats["overlap_wasted_rows"] > 0, "no kept branch stopped inside a speculated step"
    for e in engines:
        assert e.runner.blocks.num_sequences == 0
        e.runner.blocks.check_invariants()


def test_search_results_do_not_change(model):
    from ttc_fast.data import Problem

    problems = [Problem(f"p{i}", q, "1", "math", {}) for i, q in enumerate(["What is 1 + 1?", "Natalia sold 48 clips."])]
    strategy = tf.BeamSearch(n=4, width=2, iterations=3, delimiter=" ")
    sampling = tf.SamplingParams(temperature=0.8, max_tokens=10, seed=0)

    def run(engine):
        results = engine.search(problems, strategy, sampling, prm=tf.load_prm("builtin:toy-checker"), system_prompt="")
        return [[(c.text, c.score, c.finish_reason) for c in r.completions] for r in results]

    plain, overlapped, _ = both(model, run, num_blocks=256)
    assert overlapped == plain


@pytest.mark.parametrize("overlap", [False, True])
def test_static_decode_buffers_draw_the_same_tokens(model, overlap):
    """Engine(cuda_graphs=True) on the CPU: decode steps of up to 8 sequences run padded to a
    bucket (1, 2, 4, 8) from the static buffers, larger ones as usual; the tokens do not change."""
    params = [tf.SamplingParams(temperature=0.9, max_tokens=20, n=n, seed=n, stop_token_ids=[7]) for n in (3, 5, 12)]

    def run(engine):
        return [outputs(engine.generate(["The answer is", "Step 1:"], p)) for p in params]

    plain = run(tf.Engine(model, block_size=4, num_blocks=256))
    engine = tf.Engine(model, block_size=4, num_blocks=256, overlap=overlap, cuda_graphs=True, cuda_graph_max_batch=8)
    calls = []
    real = engine.runner.graphs.run
    engine.runner.graphs.run = lambda *a, **k: calls.append(len(a[-1])) or real(*a, **k)
    assert run(engine) == plain
    assert set(calls) - {1, 2, 4, 8}, "no step was padded to a bucket"
    assert max(calls) <= 8 and engine.stats["decode_tokens"] > sum(calls), "every step went through the buffers"
    assert engine.runner.graphs.nbytes > 0


@pytest.mark.slow
def test_static_decode_metadata_on_the_triton_path(model):
    """With the triton backend (interpreted here) a bucket runs the exact forward a CUDA graph
    captures: static buffers and metadata, the caller's split scratch. Tokens as the torch path's."""
    params = tf.SamplingParams(temperature=0.8, max_tokens=4, n=3, seed=9, ignore_eos=True)
    plain = outputs(tf.Engine(model, block_size=16, num_blocks=32, backend="torch").generate(["Step 1:"], params))
    engine = tf.Engine(model, block_size=16, num_blocks=32, backend="triton", cuda_graphs=True, cuda_graph_max_batch=4)
    engine.runner.graphs.splits = {b: 2 for b in engine.runner.graphs.buckets}  # as a long context would set
    engine.runner.graphs.scratch_out = torch.empty(4 * 2 * model.config.num_heads * model.config.head_dim)
    engine.runner.graphs.scratch_lse = torch.empty(4 * 2 * model.config.num_heads)
    calls = []
    real = engine.runner.graphs._forward_static
    engine.runner.graphs._forward_static = lambda B: calls.append(B) or real(B)
    assert outputs(engine.generate(["Step 1:"], params)) == plain
    assert calls and set(calls) <= {4}


@pytest.mark.cuda
@pytest.mark.slow
def test_switches_on_the_triton_path(tmp_path):
    """--overlap and --cuda-graphs on the triton path: on a GPU (benchmarks/run_gpu.sh runs
    `-m cuda`) real overlap and captured graphs, here the interpreter; the same tokens as the
    plain loop, sampled and greedy, with stops inside speculated steps."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    path = build_tiny_model(tmp_path / "m", "llama", seed=3, layers=1)
    model = tf.load_model(path, device=device, dtype="float32")
    params = tf.SamplingParams(temperature=0.9, max_tokens=5, n=3, seed=4, stop_token_ids=[9, 11, 13, 17])
    prompts = ["Step 1:", "The answer is"]

    def run(**switches):
        engine = tf.Engine(model, block_size=16, num_blocks=64, backend="triton", cuda_graph_max_batch=8, **switches)
        return outputs(engine.generate(prompts, params)), engine

    plain, _ = run()
    for switches in ({"overlap": True}, {"cuda_graphs": True}, {"overlap": True, "cuda_graphs": True}):
        got, engine = run(**switches)
        assert got == plain, switches
        if switches.get("cuda_graphs") and device == "cuda":
            assert engine.runner.graphs.graphs, "no decode step was captured"
