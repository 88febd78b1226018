"""The memory planner's arithmetic with stated device sizes and real model shapes, the runner's
pool reallocation, and the plan the CLI prints."""
import pytest
import torch

import ttc_fast as tf
from ttc_fast.cli import main
from ttc_fast.config import ModelConfig
from ttc_fast.kv_pool import bytes_per_block
from ttc_fast.memory_plan import GiB, parameter_count, plan_memory, weight_bytes
from ttc_fast.testing import build_tiny_model

# config.json of each published checkpoint, as far as the shapes go
LLAMA_32_1B = {"architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
               "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
               "max_position_embeddings": 131072, "tie_word_embeddings": True, "rope_theta": 500000.0,
               "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192}}
LLAMA_31_8B = {**LLAMA_32_1B, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "head_dim": 128,
               "tie_word_embeddings": False, "rope_scaling": {**LLAMA_32_1B["rope_scaling"], "factor": 8.0}}
QWEN25_MATH_PRM_7B = {"architectures": ["Qwen2ForProcessRewardModel"], "vocab_size": 152064, "hidden_size": 3584,
                      "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
                      "num_key_value_heads": 4, "max_position_embeddings": 4096, "rope_theta": 10000.0,
                      "tie_word_embeddings": False}
BF16 = torch.bfloat16


def config(raw) -> ModelConfig:
    return ModelConfig.from_dict(raw, allow_prm=True)


def test_parameter_counts_match_the_published_models():
    assert parameter_count(config(LLAMA_32_1B)) == 1_235_814_400
    assert parameter_count(config(LLAMA_31_8B)) == 8_030_261_248
    qwen = config(QWEN25_MATH_PRM_7B)
    assert parameter_count(qwen) == 7_615_616_512  # Qwen2.5-7B's decoder with its lm_head
    assert parameter_count(qwen, lm_head=False) == 7_615_616_512 - 152064 * 3584  # the PRM ships none
    assert weight_bytes(config(LLAMA_31_8B), BF16) == 2 * 8_030_261_248


H200 = 141 * 10**9  # bytes, as NVIDIA states the H200's memory


@pytest.mark.parametrize("prm_raw", [LLAMA_31_8B, QWEN25_MATH_PRM_7B], ids=["llama-3.1-8b", "qwen2.5-math-prm-7b"])
def test_equal_tokens_by_default(prm_raw):
    policy, prm = config(LLAMA_32_1B), config(prm_raw)
    weights = weight_bytes(policy, BF16) + weight_bytes(prm, BF16, lm_head=prm_raw is LLAMA_31_8B)
    in_use, headroom = weights + 1 * GiB, 3 * GiB
    plan = plan_memory(H200, 0.9, in_use, headroom, policy, BF16, prm, BF16, block_size=16)
    assert plan.policy_blocks == plan.prm_blocks and plan.policy_tokens == plan.prm_tokens
    per_pair = bytes_per_block(policy, 16, BF16) + bytes_per_block(prm, 16, BF16)
    kv = int(0.9 * H200) - in_use - headroom
    assert plan.policy_blocks == kv // per_pair  # as many block pairs as fit, no more
    used = in_use + headroom + plan.policy_blocks * per_pair
    assert used <= 0.9 * H200 < used + per_pair
    # Llama-3.2-1B: 32 KiB of K and V a token in bf16; Llama-3.1-8B: 128 KiB
    assert bytes_per_block(policy, 16, BF16) == 16 * 32 * 1024
    text = plan.describe()
    assert f"{plan.policy_tokens:,} tokens" in text and "activation headroom 3.00 GiB" in text


def test_prm_kv_fraction_splits_the_bytes():
    policy, prm = config(LLAMA_32_1B), config(LLAMA_31_8B)
    in_use = weight_bytes(policy, BF16) + weight_bytes(prm, BF16)
    plan = plan_memory(80 * GiB, 0.9, in_use, 2 * GiB, policy, BF16, prm, BF16, prm_kv_fraction=0.25)
    kv = int(0.9 * 80 * GiB) - in_use - 2 * GiB
    prm_bytes, policy_bytes = plan.prm_blocks * plan.prm_block_bytes, plan.policy_blocks * plan.policy_block_bytes
    assert kv * 0.25 - plan.prm_block_bytes < prm_bytes <= kv * 0.25
    assert kv - prm_bytes - plan.policy_block_bytes < policy_bytes <= kv - prm_bytes


def test_cuda_graphs_pool_is_reserved_and_the_static_buffers_are_counted():
    """--cuda-graphs: the graphs' pool comes out of the KV budget; the static buffers (Llama-3.2-1B
    at 128K context, 256 sequences) are what the engine allocates and so count as in use."""
    from ttc_fast.cuda_graphs import buckets_up_to

    policy = config(LLAMA_32_1B)
    in_use = weight_bytes(policy, BF16) + GiB
    plain = plan_memory(H200, 0.9, in_use, 3 * GiB, policy, BF16)
    graphs = plan_memory(H200, 0.9, in_use, 3 * GiB, policy, BF16, graph_pool_bytes=2 * GiB)
    assert graphs.policy_blocks == (int(0.9 * H200) - in_use - 3 * GiB - 2 * GiB) // plain.policy_block_bytes
    assert graphs.policy_blocks < plain.policy_blocks
    assert "CUDA graphs' pool 2.00 GiB" in graphs.describe()
    assert buckets_up_to(256) == [1, 2, 4, 8, 16, 32, 64, 128, 256] and buckets_up_to(48)[-1] == 48


def test_static_decode_buffers_size(tmp_path):
    model = tf.load_model(build_tiny_model(tmp_path / "m", "llama", seed=0), device="cpu")
    engine = tf.Engine(model, num_blocks=64, block_size=16, cuda_graphs=True, cuda_graph_max_batch=32)
    g, cfg = engine.runner.graphs, model.config
    width = -(-cfg.max_context // 16)
    # ids, positions (int64); slots, context lengths (int32); block tables; cu_q_lens; output rows
    assert g.nbytes == 32 * (8 + 8 + 4 + 4 + 4 * width) + 4 * 33 + 8 * 32  # no split scratch on the CPU


def test_a_budget_too_small_names_the_flag_to_change():
    policy, prm = config(LLAMA_32_1B), config(LLAMA_31_8B)
    in_use = weight_bytes(policy, BF16) + weight_bytes(prm, BF16)  # about 17.5 GiB
    with pytest.raises(ValueError, match="leaves 0.00 GiB.*raise --gpu-memory-utilization"):
        plan_memory(24 * GiB, 0.7, in_use, 2 * GiB, policy, BF16, prm, BF16)
    # room for some blocks, but not for one path of a 16K-token prompt + 16K tokens
    with pytest.raises(ValueError, match="fewer than one path.*raise --gpu-memory-utilization.*or lower --max-tokens"):
        plan_memory(24 * GiB, 0.9, in_use, 2 * GiB, policy, BF16, prm, BF16, path_tokens=32768)
    with pytest.raises(ValueError, match="PRM's KV pool.*--prm-kv-fraction"):
        plan_memory(80 * GiB, 0.9, in_use, 2 * GiB, policy, BF16, prm, BF16, prm_kv_fraction=0.001, path_tokens=4096)
    with pytest.raises(ValueError, match="must be in"):
        plan_memory(80 * GiB, 1.5, in_use, 0, policy, BF16, prm, BF16)


def test_runner_reallocates_its_pool(tmp_path):
    model = tf.load_model(build_tiny_model(tmp_path, "llama"), device="cpu")
    engine = tf.Engine(model, num_blocks=8, block_size=4)
    engine.runner.reallocate(32)
    assert engine.runner.num_blocks == engine.runner.blocks.num_blocks == 32 and engine.runner.pool.num_blocks == 32
    out = engine.generate(["Step 1: add 3"], tf.SamplingParams(max_tokens=40, ignore_eos=True))[0]
    assert len(out.token_ids) == 40  # 40 + prompt tokens do not fit 8 blocks of 4; they fit 32
    seq, _ = engine.runner.new_sequence()
    with pytest.raises(ValueError, match="1 sequences are live"):
        engine.runner.reallocate(16)
    engine.runner.free(seq)


def test_cli_prints_the_pools_and_refuses_gpu_flags_on_the_cpu(tmp_path, capsys):
    from prm_builders import build_math_shepherd_prm

    policy = build_tiny_model(tmp_path / "policy", "llama")
    prm = build_math_shepherd_prm(tmp_path / "prm")
    data = tmp_path / "data.jsonl"
    data.write_text('{"problem": "What is 2 + 3?", "answer": "5", "unique_id": "p0"}\n')
    args = ["run", "--policy", str(policy), "--prm", str(prm), "--prm-kind", "math-shepherd", "--strategy", "best-of-n",
            "--n", "2", "--max-tokens", "8", "--data", str(data), "--device", "cpu", "--no-progress", "--block-size", "16",
            "--kv-cache-bytes", str(2 << 20), "--prm-kv-cache-bytes", str(1 << 20)]
    assert main(args + ["--out", str(tmp_path / "a.jsonl")]) == 0
    out = capsys.readouterr().out
    per_policy = bytes_per_block(tf.load_model(policy, device="cpu").config, 16, torch.float32)
    per_prm = bytes_per_block(tf.load_model(prm, device="cpu").config, 16, torch.float32)
    assert f"KV pools: policy {(2 << 20) // per_policy * 16:,} tokens" in out
    assert f"PRM {(1 << 20) // per_prm * 16:,} tokens" in out
    assert main(args + ["--out", str(tmp_path / "b.jsonl"), "--gpu-memory-utilization", "0.8"]) == 2
    assert "--gpu-memory-utilization and --prm-kv-fraction plan a CUDA device" in capsys.readouterr().err


def test_plan_device_memory_reallocates_both_pools_to_the_plan(tmp_path):
    """The glue around the arithmetic, with a stated (free, total) instead of a CUDA device's:
    what is in use beside the small profiling pools is counted once, and both pools get the plan."""
    from ttc_fast.memory_plan import plan_device_memory
    from prm_builders import build_math_shepherd_prm

    engine = tf.Engine(tf.load_model(build_tiny_model(tmp_path / "policy", "llama"), device="cpu"), num_blocks=8)
    prm = tf.load_prm(build_math_shepherd_prm(tmp_path / "prm"), kind="math-shepherd", device="cpu", num_blocks=8)
    pools = engine.runner.pool.nbytes + prm.runner.pool.nbytes
    total, other = 64 << 20, 10 << 20  # a 64 MiB device with 10 MiB in use beside the two pools
    plan = plan_device_memory(engine, prm, 0.5, memory=(total - other - pools, total), path_tokens=100)
    assert plan.in_use_bytes == other and plan.headroom_bytes == 0
    per_pair = plan.policy_block_bytes + plan.prm_block_bytes
    assert plan.policy_blocks == plan.prm_blocks == (int(0.5 * total) - other) // per_pair
    assert engine.runner.num_blocks == plan.policy_blocks and prm.runner.num_blocks == plan.prm_blocks
    assert set(plan.weight_bytes) == {"policy", "prm"} and all(v > 0 for v in plan.weight_bytes.values())
    out = engine.search(["What is 2 + 3?"], tf.BestOfN(n=2), tf.SamplingParams(max_tokens=8, seed=0), prm=prm)
    assert out[0].error is None and len(out[0].completions) == 2
