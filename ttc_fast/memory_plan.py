"""One device's memory planned for the policy and the PRM together.

    budget = gpu_memory_utilization x the device's memory
           = memory in use after loading both models (their weights, the CUDA context, the static
             decode buffers of --cuda-graphs, anything else)
           + activation headroom (the peak of a profiled forward at the largest batch, of either model)
           + the CUDA graphs' private pool (--cuda-graphs: decode activations kept by the graphs)
           + the policy's KV pool + the PRM's KV pool

Every beam lives in both caches, so by default the two pools hold the same number of tokens;
`prm_kv_fraction` gives the PRM's pool that share of the KV bytes instead. A pool that cannot
hold one path (the longest prompt and max_tokens) is an error naming the flag to change.

`plan_memory` is the arithmetic alone (tested with stated device sizes and real model shapes);
`profile_headroom` measures a model's activation peak on CUDA.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .config import ModelConfig
from .kv_pool import bytes_per_block

GiB = 1 << 30


def layer_parameter_count(config: ModelConfig) -> int:
    """Parameters of one decoder layer: attention (with q/k/v/o biases and q/k norms where the
    family has them), MLP, and its two norms."""
    h, hd = config.hidden_size, config.head_dim
    q, kv = config.num_heads * hd, config.num_kv_heads * hd
    attention = h * q + 2 * h * kv + q * h
    if config.qkv_bias:
        attention += q + 2 * kv
    if config.o_bias:
        attention += h
    if config.qk_norm:
        attention += 2 * hd
    mlp = 3 * h * config.intermediate_size + (2 * config.intermediate_size + h if config.mlp_bias else 0)
    return attention + mlp + 2 * h


def parameter_count(config: ModelConfig, lm_head: bool = True) -> int:
    """Parameters of our decoder for `config`: embeddings, every layer (`layer_parameter_count`),
    the final norm, and an untied lm_head."""
    h = config.hidden_size
    embed = config.vocab_size * h
    head = embed if lm_head and not config.tie_word_embeddings else 0
    return embed + config.num_layers * layer_parameter_count(config) + h + head


def weight_bytes(config: ModelConfig, dtype: torch.dtype, lm_head: bool = True, extra_parameters: int = 0) -> int:
    """Bytes of the weights (`extra_parameters`: a PRM's score or value head, kept in float32)."""
    elem = torch.tensor([], dtype=dtype).element_size()
    return parameter_count(config, lm_head) * elem + 4 * extra_parameters


@dataclass(frozen=True)
class MemoryPlan:
    total_bytes: int
    utilization: float
    in_use_bytes: int  # after loading both models: their weights and everything else on the device
    weight_bytes: dict  # {"policy": bytes, "prm": bytes} (part of in_use_bytes)
    headroom_bytes: int
    block_size: int
    policy_blocks: int
    prm_blocks: int
    policy_block_bytes: int
    prm_block_bytes: int
    graph_pool_bytes: int = 0

    @property
    def policy_tokens(self) -> int:
        return self.policy_blocks * self.block_size

    @property
    def prm_tokens(self) -> int:
        return self.prm_blocks * self.block_size

    def describe(self) -> str:
        def gib(x):
            return f"{x / GiB:.2f} GiB"

        weights = ", ".join(f"{k} {gib(v)}" for k, v in self.weight_bytes.items())
        lines = [f"memory plan: {self.utilization:g} x {gib(self.total_bytes)} = {gib(self.utilization * self.total_bytes)}",
                 f"  in use after loading {gib(self.in_use_bytes)} (weights: {weights})",
                 f"  activation headroom {gib(self.headroom_bytes)}"
                 + (f", CUDA graphs' pool {gib(self.graph_pool_bytes)}" if self.graph_pool_bytes else ""),
                 f"  policy KV pool {gib(self.policy_blocks * self.policy_block_bytes)}: {self.policy_tokens:,} tokens"]
        if self.prm_blocks:
            lines.append(f"  PRM KV pool {gib(self.prm_blocks * self.prm_block_bytes)}: {self.prm_tokens:,} tokens")
        return "\n".join(lines)


def plan_memory(total_bytes: int, utilization: float, in_use_bytes: int, headroom_bytes: int,
                policy: ModelConfig, policy_dtype: torch.dtype, prm: ModelConfig | None = None,
                prm_dtype: torch.dtype | None = None, block_size: int = 16, prm_kv_fraction: float | None = None,
                path_tokens: int = 0, weights: dict | None = None, graph_pool_bytes: int = 0) -> MemoryPlan:
    """Split what `utilization` of the device leaves after `in_use_bytes` and `headroom_bytes`
    between the two KV pools: equal tokens, or `prm_kv_fraction` of the bytes to the PRM's.
    `path_tokens`: one path's length (the longest prompt + max_tokens); a pool that cannot hold
    it raises ValueError naming the flag to change."""
    if not 0 < utilization <= 1:
        raise ValueError(f"--gpu-memory-utilization must be in (0, 1], got {utilization}")
    if prm_kv_fraction is not None and not 0 < prm_kv_fraction < 1:
        raise ValueError(f"--prm-kv-fraction must be in (0, 1), got {prm_kv_fraction}")
    if prm_kv_fraction is not None and prm is None:
        raise ValueError("--prm-kv-fraction needs a model PRM (it splits the KV memory between the two pools)")
    per_policy = bytes_per_block(policy, block_size, policy_dtype)
    per_prm = bytes_per_block(prm, block_size, prm_dtype or policy_dtype) if prm is not None else 0
    kv = int(utilization * total_bytes) - in_use_bytes - headroom_bytes - graph_pool_bytes
    if kv < per_policy + per_prm:
        graphs = f" and {graph_pool_bytes / GiB:.2f} GiB for CUDA graphs" if graph_pool_bytes else ""
        raise ValueError(
            f"--gpu-memory-utilization {utilization:g} of {total_bytes / GiB:.2f} GiB leaves {max(kv, 0) / GiB:.2f} GiB "
            f"for the KV pools after {in_use_bytes / GiB:.2f} GiB in use (the weights) and {headroom_bytes / GiB:.2f} GiB "
            f"of activation headroom{graphs}: raise --gpu-memory-utilization, or use smaller models")
    if prm is None:
        policy_blocks, prm_blocks = kv // per_policy, 0
    elif prm_kv_fraction is None:  # the same number of blocks (tokens) in both pools
        policy_blocks = prm_blocks = kv // (per_policy + per_prm)
    else:
        prm_blocks = int(kv * prm_kv_fraction) // per_prm
        policy_blocks = (kv - prm_blocks * per_prm) // per_policy
    need = -(-path_tokens // block_size)
    pools = [("policy", policy_blocks, "--gpu-memory-utilization")]
    if prm is not None:
        pools.append(("PRM", prm_blocks, "--gpu-memory-utilization or --prm-kv-fraction"))
    for name, blocks, flag in pools:
        if blocks < need:
            raise ValueError(f"the memory plan gives the {name}'s KV pool {blocks * block_size} tokens, fewer than one path "
                             f"({path_tokens} tokens: the longest prompt and --max-tokens): raise {flag}, or lower --max-tokens")
    return MemoryPlan(total_bytes, utilization, in_use_bytes, dict(weights or {}), headroom_bytes, block_size,
                      int(policy_blocks), int(prm_blocks), per_policy, per_prm, graph_pool_bytes)


def profile_headroom(runner, max_batch_tokens: int, want_hidden: bool = False) -> int:
    """CUDA: the activation peak of one forward of `max_batch_tokens` tokens (prefills, the
    largest batch the engine builds; several sequences where the model's context is shorter) on
    `runner`, whose pool must hold them (`profile_blocks`); 0 on the CPU."""
    if runner.device.type != "cuda":
        return 0
    longest = runner.config.max_context - 1
    lengths = [min(longest, max_batch_tokens - start) for start in range(0, max_batch_tokens, longest)]
    torch.cuda.synchronize(runner.device)
    base = torch.cuda.memory_allocated(runner.device)
    torch.cuda.reset_peak_memory_stats(runner.device)
    seqs = [runner.new_sequence()[0] for _ in lengths]
    try:
        runner.forward(seqs, [[0] * n for n in lengths], [[n - 1] for n in lengths], want_logits=not want_hidden,
                       want_hidden=want_hidden)
        torch.cuda.synchronize(runner.device)
    finally:
        for seq in seqs:
            runner.free(seq)
    return torch.cuda.max_memory_allocated(runner.device) - base


def profile_graph_pool(runner) -> int:
    """CUDA with --cuda-graphs: the memory the largest bucket's capture keeps (its graph's private
    pool; smaller buckets share it), measured by capturing it on the current pool; the graphs are
    dropped again (the pool is reallocated after planning). 0 otherwise."""
    graphs = runner.graphs
    if runner.device.type != "cuda" or graphs is None:
        return 0
    torch.cuda.synchronize(runner.device)
    base = torch.cuda.memory_allocated(runner.device)
    seqs = [runner.new_sequence()[0] for _ in range(graphs.max_batch)]
    try:
        runner.forward(seqs, [[0]] * len(seqs), np.zeros(len(seqs), dtype=np.int64))
        torch.cuda.synchronize(runner.device)
        kept = torch.cuda.memory_allocated(runner.device) - base
    finally:
        for seq in seqs:
            runner.free(seq)
        graphs.reset()
    return kept


def profile_blocks(max_batch_tokens: int, block_size: int) -> int:
    """A pool that holds a profiled forward of `max_batch_tokens` tokens, however they are split."""
    return -(-max_batch_tokens // block_size) + 8


def plan_device_memory(engine, prm, utilization: float = 0.9, prm_kv_fraction: float | None = None,
                       path_tokens: int = 0, memory: tuple[int, int] | None = None) -> MemoryPlan:
    """CUDA: plan the policy's and the PRM's pools together and reallocate both to the plan.
    `engine` and a model `prm` must hold no sequences; their pools should be small (they are
    counted as freed). Headroom: the larger activation peak of the two models' profiled
    forwards at their largest batch; with --cuda-graphs, the graphs' pool beside it (their static
    buffers are allocated with the engine, so in use).
    `memory`: the device's (free, total) bytes now, measured on CUDA when None."""
    runners = [engine.runner] + ([prm.runner] if getattr(prm, "runner", None) is not None else [])
    device = engine.runner.device
    if memory is None and device.type != "cuda":
        raise ValueError("planning device memory needs a CUDA device; on the CPU pass --kv-cache-bytes and --prm-kv-cache-bytes")
    headroom = profile_headroom(engine.runner, engine.max_batch_tokens)
    graph_pool = profile_graph_pool(engine.runner)
    if len(runners) == 2:
        headroom = max(headroom, profile_headroom(prm.runner, prm.max_batch_tokens, want_hidden=prm.fmt.needs == "hidden"))
    if memory is None:
        torch.cuda.empty_cache()
        memory = torch.cuda.mem_get_info(device)
    free, total = memory
    in_use = total - free - sum(r.pool.nbytes for r in runners)
    weights = {"policy": _module_bytes(engine.model.module)}
    if len(runners) == 2:
        weights["prm"] = _module_bytes(prm.model.module) + sum(t.numel() * t.element_size() for t in (prm.head or {}).values())
    plan = plan_memory(total, utilization, in_use, headroom, engine.model.config, engine.model.dtype,
                       prm.model.config if len(runners) == 2 else None, prm.model.dtype if len(runners) == 2 else None,
                       block_size=engine.runner.block_size, prm_kv_fraction=prm_kv_fraction, path_tokens=path_tokens,
                       weights=weights, graph_pool_bytes=graph_pool)
    engine.runner.reallocate(plan.policy_blocks)
    if len(runners) == 2:
        prm.runner.reallocate(plan.prm_blocks)
    return plan


def _module_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())
