"""The engine on the Triton path (on CUDA when available, else interpreted on the CPU) against
the torch path and transformers.

Thresholds of the shared-prefix (cascade) path are lowered so that the tiny batch takes it; a
spy on the cascade kernel proves it ran.
"""
import pytest
import torch
from transformers import AutoModelForCausalLM

import ttc_fast as tf
import ttc_fast.kernels as K
from ttc_fast.attention import AttentionBackend
from ttc_fast.testing import build_tiny_model

NEW_TOKENS = 6
# The Triton path runs on CUDA when there is one (conftest sets TRITON_INTERPRET=1 only without it).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.cuda  # run on the GPU by benchmarks/run_gpu.sh (tests/conftest.py)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("qwen3"), "qwen3", seed=4, with_tokenizer=False, layers=1)


@pytest.mark.slow
def test_triton_path_with_cascade_matches_torch_and_transformers(model_dir, monkeypatch):
    model = tf.load_model(model_dir, device=DEVICE, dtype="float32")
    calls = []
    real = K.cascade_decode_attention
    monkeypatch.setattr(K, "cascade_decode_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    backend = AttentionBackend("triton", model.device, cascade_min_prefix_tokens=16, cascade_min_group_size=2)
    prompts = [list(range(5, 41)), list(range(50, 63))]  # 36 tokens: 2 full shared blocks of 16
    params = tf.SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, n=3)
    triton_out = tf.Engine(model, num_blocks=32, block_size=16, backend=backend).generate(prompts, params)
    torch_out = tf.Engine(model, num_blocks=32, block_size=16, backend="torch").generate(prompts, params)
    assert calls, "the cascade path was not taken"
    ref = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    for prompt, a, b in zip(prompts, triton_out, torch_out):
        ids = torch.tensor([prompt])
        expected = ref.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW_TOKENS,
                                min_new_tokens=NEW_TOKENS, eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert [o.token_ids for o in a.outputs] == [expected] * 3
        assert [o.token_ids for o in b.outputs] == [expected] * 3


@pytest.mark.slow
def test_triton_sampling_matches_torch_sampling(model_dir):
    model = tf.load_model(model_dir, device=DEVICE, dtype="float32")
    params = tf.SamplingParams(temperature=0.9, top_p=0.8, top_k=20, max_tokens=NEW_TOKENS, ignore_eos=True, n=2, seed=7)
    a = tf.Engine(model, num_blocks=16, block_size=16, backend="triton").generate([[3, 4, 5, 6, 7]], params)[0]
    b = tf.Engine(model, num_blocks=16, block_size=16, backend="torch").generate([[3, 4, 5, 6, 7]], params)[0]
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        AttentionBackend("triton", torch.device("cpu"))
