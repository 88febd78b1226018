"""Engine.generate: sampling, seeds, stop conditions, text prompts, prefix sharing."""
import pytest

import ttc_fast as tf
from ttc_fast.testing import build_tiny_model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = build_tiny_model(tmp_path_factory.mktemp("llama"), "llama", seed=2)
    return tf.load_model(path, device="cpu")


@pytest.mark.slow
def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(model):
    engine = tf.Engine(model, num_blocks=256, block_size=4)
    params = tf.SamplingParams(temperature=1.0, top_p=0.9, top_k=50, max_tokens=20, seed=123, ignore_eos=True, n=4)
    alone = engine.generate(["Step 1: add 3"], params)[0]
    again = engine.generate(["Step 1: add 3"], params)[0]
    assert [o.token_ids for o in alone.outputs] == [o.token_ids for o in again.outputs]
    # Counter-based randomness: the first prompt's samples do not change when others join the batch.
    batched = engine.generate(["Step 1: add 3", "How many clips"], params)[0]
    assert [o.token_ids for o in batched.outputs] == [o.token_ids for o in alone.outputs]
    # Different samples of one prompt differ (with overwhelming probability at temperature 1).
    assert len({tuple(o.token_ids) for o in alone.outputs}) > 1


def test_stop_strings_stop_token_ids_and_max_tokens(model):
    engine = tf.Engine(model, num_blocks=256, block_size=4)
    free = engine.generate(["The answer is"], tf.SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 40
    # Stop at a string that greedy decoding is known to produce (taken from its own output).
    text = free.text
    # Two printable ASCII characters from the middle of the text (byte tokens may decode to U+FFFD).
    starts = [i for i in range(len(text) // 3, len(text) - 1) if text[i:i + 2].isascii() and text[i:i + 2].strip()]
    assert starts, f"greedy text has no ASCII pair to stop at: {text!r}"
    stop = text[starts[0]: starts[0] + 2]
    out = engine.generate(["The answer is"], tf.SamplingParams(temperature=0.0, max_tokens=40, stop=[stop], ignore_eos=True))[0]
    assert out.finish_reason == "stop" and out.outputs[0].stop_reason == stop
    assert stop not in out.text and text.startswith(out.text)
    kept = engine.generate(["The answer is"], tf.SamplingParams(temperature=0.0, max_tokens=40, stop=[stop], ignore_eos=True, include_stop_str_in_output=True))[0]
    assert kept.text.endswith(stop)
    third = free.token_ids[2]
    by_id = engine.generate(["The answer is"], tf.SamplingParams(temperature=0.0, max_tokens=40, stop_token_ids=[third], ignore_eos=True))[0]
    assert by_id.finish_reason == "stop" and by_id.token_ids[-1] == third
    assert by_id.token_ids == free.token_ids[: free.token_ids.index(third) + 1]


def test_eos_ends_generation_unless_ignored(model):
    engine = tf.Engine(model, num_blocks=256, block_size=4)
    free = engine.generate(["How many"], tf.SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))[0]
    engine.model.eos_token_ids = (free.token_ids[4],)
    try:
        out = engine.generate(["How many"], tf.SamplingParams(temperature=0.0, max_tokens=12))[0]
    finally:
        engine.model.eos_token_ids = ()
    assert out.finish_reason == "eos"
    assert out.token_ids == free.token_ids[: free.token_ids.index(free.token_ids[4]) + 1]


def test_samples_share_the_prompt_blocks(model):
    engine = tf.Engine(model, num_blocks=256, block_size=4)
    prompt = list(range(1, 41))  # 10 full blocks
    params = tf.SamplingParams(temperature=1.0, max_tokens=3, ignore_eos=True, n=16, seed=0)
    engine.generate([prompt], params)
    # The prompt was prefilled once: 40 prompt tokens, not 16 x 40.
    assert engine.stats["prefill_tokens"] == 40
    assert engine.runner.blocks.num_used_blocks == 0
    assert engine.runner.blocks.num_cached_blocks >= 10


def test_bad_inputs_raise_clear_errors(model):
    engine = tf.Engine(model, num_blocks=8, block_size=4)
    with pytest.raises(ValueError, match="pool holds only 8"):
        engine.generate([list(range(1, 100))], tf.SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="at most 512 positions"):
        tf.Engine(model, num_blocks=1024, block_size=4).generate([[1] * 600], tf.SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.generate([[1, 10**6]], tf.SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="empty"):
        engine.generate([[]], tf.SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="top_p"):
        tf.SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        tf.SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="unknown backend"):
        tf.Engine(model, num_blocks=8, backend="cuda-magic")


def test_prompts_sharing_a_prefix_in_one_call_compute_it_once(model):
    engine = tf.Engine(model, num_blocks=256, block_size=4)
    shared = list(range(1, 65))
    prompts = [shared + [100 + i, 101 + i] for i in range(8)]
    greedy = tf.SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    outs = engine.generate(prompts, greedy)
    assert engine.stats["cached_prompt_tokens"] >= 7 * 64
    assert engine.stats["prefill_tokens"] <= 64 + 8 * 2 + 8 * 4
    alone = tf.Engine(model, num_blocks=256, block_size=4)
    assert [o.token_ids for o in outs] == [alone.generate([p], greedy)[0].token_ids for p in prompts]


@pytest.mark.parametrize("n", [1, 3])
def test_preemption_of_a_partly_prefilled_prompt(model, n):
    """A tight pool while long prompts are prefilled in chunks: the chunked prompt's blocks are
    freed and recomputed, and every output equals the one from a roomy pool."""
    prompts = [list(range(1 + 30 * i, 24 + 30 * i)) for i in range(3)]
    params = tf.SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, n=n)
    roomy = tf.Engine(model, num_blocks=256, block_size=4).generate(prompts, params)
    tight_engine = tf.Engine(model, num_blocks=10, block_size=4, max_batch_tokens=64)
    tight = tight_engine.generate(prompts, params)
    assert tight_engine.stats["preemptions"] > 0
    assert [[o.token_ids for o in r.outputs] for r in tight] == [[o.token_ids for o in r.outputs] for r in roomy]


def test_a_rejected_forward_changes_nothing(model):
    runner = tf.ModelRunner(model, num_blocks=16, block_size=4)
    seq, _ = runner.new_sequence()
    with pytest.raises(ValueError, match="output offset 99"):
        runner.forward([seq], [list(range(1, 13))], output_offsets=[[99]])
    assert runner.seq_len(seq) == 0 and runner.blocks.num_used_blocks == 0
    fresh, cached = runner.new_sequence(list(range(1, 13)))
    assert cached == 0  # nothing unwritten entered the prefix cache


def test_stop_strings_with_a_sentencepiece_style_tokenizer(tmp_path):
    """Metaspace tokenizers drop the leading space when one token is decoded alone; stop strings
    must be matched on properly decoded text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["hello", "world", "one", "two", "three", "four", "five", "six", "seven", "eight"]
    vocab = {"<unk>": 0}
    for w in words:
        vocab["\u2581" + w] = len(vocab)
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    path = build_tiny_model(tmp_path, "llama2", seed=6, with_tokenizer=False, vocab_size=len(vocab))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(str(path))
    engine = tf.Engine(tf.load_model(path, device="cpu"), num_blocks=64, block_size=4)
    free = engine.generate(["hello world"], tf.SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))[0]
    assert " " in free.text.strip()
    stop = " " + free.text.strip().split(" ")[2][:3]  # a space-led piece from the middle of the text
    out = engine.generate(["hello world"], tf.SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, stop=[stop]))[0]
    assert out.finish_reason == "stop" and out.outputs[0].stop_reason == stop
    assert free.text.startswith(out.text) and stop not in out.text
    assert (free.text[: len(out.text) + len(stop)]).endswith(stop)
