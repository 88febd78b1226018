"""Parity with transformers on tiny random models of every supported family (CPU, fp32).

Ours loads the checkpoint through `ttc_fast.load_model` and runs its own decoder over the paged
cache; the reference is transformers' own model class on the same files.
"""
import pytest
import torch
from transformers import AutoModelForCausalLM

import ttc_fast as tf
from ttc_fast.testing import FAMILIES, build_tiny_model

LOGITS_ATOL = 1e-4
GREEDY_TOKENS = 32


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request, tmp_path_factory):
    path = build_tiny_model(tmp_path_factory.mktemp(request.param), request.param, seed=1)
    ours = tf.load_model(path, device="cpu", dtype="float32")
    ref = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    return ours, ref


def random_prompts(vocab: int, lengths, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lengths]


def ref_greedy(ref, prompt: list[int], max_new: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = ref.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new,
                       min_new_tokens=max_new, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_logits_match_transformers(family_model):
    ours, ref = family_model
    runner = tf.ModelRunner(ours, num_blocks=64, block_size=4)
    prompts = random_prompts(ours.config.vocab_size, [13, 1, 7])
    seqs = [runner.new_sequence()[0] for _ in prompts]
    out = runner.forward(seqs, prompts, output_offsets=[list(range(len(p))) for p in prompts])
    for i, prompt in enumerate(prompts):
        expected = ref(torch.tensor([prompt])).logits[0]
        got = out.logits[out.row_starts[i]: out.row_starts[i + 1]]
        torch.testing.assert_close(got, expected, atol=LOGITS_ATOL, rtol=0)


def test_mixed_prefill_and_decode_batch_matches(family_model):
    """One forward holding a decode token of one sequence, a forked child, and a fresh prefill."""
    ours, ref = family_model
    runner = tf.ModelRunner(ours, num_blocks=64, block_size=4)
    a, b = random_prompts(ours.config.vocab_size, [10, 9], seed=3)
    seq_a, _ = runner.new_sequence()
    runner.forward([seq_a], [a[:-1]])
    (child,) = runner.fork(seq_a, 1)  # shares a partial block: the next append copies it
    seq_b, _ = runner.new_sequence()
    out = runner.forward([seq_a, seq_b, child], [[a[-1]], b, [7]])
    with torch.inference_mode():
        exp_a = ref(torch.tensor([a])).logits[0, -1]
        exp_b = ref(torch.tensor([b])).logits[0, -1]
        exp_child = ref(torch.tensor([a[:-1] + [7]])).logits[0, -1]
    for row, exp in zip(range(3), (exp_a, exp_b, exp_child)):
        torch.testing.assert_close(out.logits[row], exp, atol=LOGITS_ATOL, rtol=0)
    runner.blocks.check_invariants()


def test_greedy_generation_matches_transformers(family_model):
    ours, ref = family_model
    engine = tf.Engine(ours, num_blocks=128, block_size=4, max_batch_tokens=12)  # forces chunked prefill
    prompts = random_prompts(ours.config.vocab_size, [5, 17, 1, 9], seed=5)
    params = tf.SamplingParams(temperature=0.0, max_tokens=GREEDY_TOKENS, ignore_eos=True)
    outs = engine.generate(prompts, params)
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == ref_greedy(ref, prompt, GREEDY_TOKENS)
        assert out.finish_reason == "length"


def test_greedy_after_forks_and_prefix_hits(family_model):
    ours, ref = family_model
    engine = tf.Engine(ours, num_blocks=128, block_size=4)
    base = random_prompts(ours.config.vocab_size, [14], seed=7)[0]
    params = tf.SamplingParams(temperature=0.0, max_tokens=GREEDY_TOKENS, ignore_eos=True, n=3)
    first = engine.generate([base], params)[0]
    expected = ref_greedy(ref, base, GREEDY_TOKENS)
    assert [o.token_ids for o in first.outputs] == [expected] * 3  # forks of one prefill
    if engine.runner.attention.uses_prefix_tree:  # the shared prompt blocks were gathered once, then reused
        assert engine.runner.shared_kv_memo.hits > 0
    # The same prompt again and a longer one sharing its prefix: both hit the prefix cache.
    longer = base + [3, 4, 5]
    before = engine.stats["cached_prompt_tokens"]
    again, extended = engine.generate([base, longer], tf.SamplingParams(temperature=0.0, max_tokens=GREEDY_TOKENS, ignore_eos=True))
    assert engine.stats["cached_prompt_tokens"] - before >= 2 * 12
    assert again.token_ids == expected
    assert extended.token_ids == ref_greedy(ref, longer, GREEDY_TOKENS)
    assert engine.runner.blocks.num_used_blocks == 0


@pytest.mark.slow
def test_greedy_under_pool_pressure_preempts_and_matches(family_model):
    ours, ref = family_model
    # 12 blocks of 4 tokens cannot hold four 10-token prompts growing to 42 tokens at once.
    engine = tf.Engine(ours, num_blocks=14, block_size=4)
    prompts = random_prompts(ours.config.vocab_size, [10, 10, 10, 10], seed=9)
    outs = engine.generate(prompts, tf.SamplingParams(temperature=0.0, max_tokens=GREEDY_TOKENS, ignore_eos=True))
    assert engine.stats["preemptions"] > 0
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == ref_greedy(ref, prompt, GREEDY_TOKENS)


def test_hidden_states_at_requested_rows_only(family_model):
    ours, ref = family_model
    runner = tf.ModelRunner(ours, num_blocks=32, block_size=4)
    prompt = random_prompts(ours.config.vocab_size, [11], seed=11)[0]
    seq, _ = runner.new_sequence()
    out = runner.forward([seq], [prompt], output_offsets=[[2, 10]], want_logits=False, want_hidden=True)
    assert out.logits is None and out.hidden.shape == (2, ours.config.hidden_size)
    with torch.inference_mode():
        expected = ref.model(torch.tensor([prompt])).last_hidden_state[0, [2, 10]]
    torch.testing.assert_close(out.hidden, expected, atol=LOGITS_ATOL, rtol=0)


def test_forks_on_the_cpu_cascade_path_match_transformers(family_model, monkeypatch):
    """Greedy forks of a long prompt take the torch prefix-tree path (spied) and still match."""
    import ttc_fast.kernels as K

    ours, ref = family_model
    calls = []
    real = K.tree_attention_torch
    monkeypatch.setattr(K, "tree_attention_torch", lambda *a, **kw: calls.append(a[3].shared_tokens) or real(*a, **kw))
    engine = tf.Engine(ours, num_blocks=128, block_size=4)
    prompt = random_prompts(ours.config.vocab_size, [70], seed=13)[0]
    out = engine.generate([prompt], tf.SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, n=3))[0]
    assert calls and max(calls) > 0, "the prefix-tree path was not taken, or read no shared prefix"
    assert [o.token_ids for o in out.outputs] == [ref_greedy(ref, prompt, 12)] * 3
