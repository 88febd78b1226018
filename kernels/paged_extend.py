"""Paged prefill / extend attention (causal, online softmax over paged KV tiles).

Sequence b has q_len_b = cu_q_lens[b+1] - cu_q_lens[b] new query tokens; its query i sits at
absolute position context_lens[b] - q_len_b + i and attends to the paged KV positions
0 .. that position (cached context + the new tokens, whose KV is already stored).
One program per (sequence, kv head, tile of BLOCK_M query rows), where a row is a
(query token, GQA head) pair of that kv head, so each KV tile is loaded once for the whole
GQA group. KV tiles of BLOCK_N positions are gathered through the block table (a tile may span
several cache blocks), and combined with an online (flash-attention) softmax.

Layouts:
  q:            [T, Hq, D]  fp32 / fp16 / bf16 (T = cu_q_lens[-1]), head_dim contiguous
  k_cache:      [num_blocks, block_size, Hkv, D] same dtype as q (v_cache likewise)
  block_tables: [S, max_blocks] int32
  cu_q_lens:    [S+1] int32 prefix sums of query lengths
  context_lens: [S] int32 KV length of each sequence, this step's tokens included (>= q_len)
  out:          [T, Hq, D] q.dtype, head_dim contiguous (allocated when None)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .common import (LOG2E, GpuTarget, attend_paged_tiles, check_cache, check_launchable, check_pow2_head_dim,
                     launch_target, use_fp32_dot)
from .paged_decode import _chunks, gather_paged_kv

EXTEND_BLOCK_M, EXTEND_BLOCK_N = 64, 64
# fp32 dots run on CUDA cores with whole tiles in registers: half the KV tile, twice the warps
EXTEND_BLOCK_M_FP32, EXTEND_BLOCK_N_FP32, EXTEND_WARPS_FP32 = 64, 32, 8
EXTEND_BLOCK_M_INTERP, EXTEND_BLOCK_N_INTERP = 32, 32


@triton.jit
def _paged_extend_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, bt_ptr, cu_ptr, ctx_ptr,
    sq_t, sq_h, sk_b, sk_p, sk_h, sv_b, sv_p, sv_h, so_t, so_h, sbt_b,
    scale_log2,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, FP32_DOT: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    mt = tl.program_id(2)
    q_start = tl.load(cu_ptr + b)
    q_len = tl.load(cu_ptr + b + 1) - q_start
    ctx = tl.load(ctx_ptr + b)

    rows = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    tok = rows // GROUP
    heads = (kvh * GROUP + rows % GROUP).to(tl.int64)
    rmask = tok < q_len
    qpos = ctx - q_len + tok  # absolute position of each row's query
    d = tl.arange(0, HEAD_DIM)
    t_idx = (q_start + tok).to(tl.int64)
    q = tl.load(q_ptr + t_idx[:, None] * sq_t + heads[:, None] * sq_h + d[None, :], mask=rmask[:, None], other=0.0)
    if FP32_DOT:
        q = q.to(tl.float32)
    last_tok = tl.minimum((mt * BLOCK_M + BLOCK_M - 1) // GROUP, q_len - 1)
    kv_end = tl.minimum(ctx, ctx - q_len + last_tok + 1)

    out, _ = attend_paged_tiles(q, k_ptr, v_ptr, bt_ptr + b * sbt_b, kvh, 0, kv_end, qpos, sk_b, sk_p, sk_h, sv_b, sv_p, sv_h,
                                scale_log2, BLOCK_M, HEAD_DIM, BLOCK_N, BLOCK_SIZE, True, FP32_DOT)
    tl.store(o_ptr + t_idx[:, None] * so_t + heads[:, None] * so_h + d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=rmask[:, None])


def extend_launch_config(dtype: torch.dtype, head_dim: int, group: int, block_size: int, target: GpuTarget) -> dict:
    """Every constexpr and launch option of `_paged_extend_kernel`: the launcher and the compile
    check (kernels/compile_check.py) both take them from here."""
    fp32_dot = use_fp32_dot(dtype, target)
    if target.interpreter:
        bm, bn, warps = EXTEND_BLOCK_M_INTERP, EXTEND_BLOCK_N_INTERP, 4
    elif fp32_dot:
        bm, bn, warps = EXTEND_BLOCK_M_FP32, EXTEND_BLOCK_N_FP32, EXTEND_WARPS_FP32
    else:
        # sm_8x's mma.sync holds a 64 x 128 tile's operands and accumulator in more than 255
        # registers per thread at 4 warps (spills); sm_90's wgmma fits
        bm, bn, warps = EXTEND_BLOCK_M, EXTEND_BLOCK_N, 8 if head_dim >= 128 and target.capability < 90 else 4
    return dict(GROUP=group, HEAD_DIM=head_dim, BLOCK_M=max(bm, triton.next_power_of_2(group)), BLOCK_N=bn,
                BLOCK_SIZE=block_size, FP32_DOT=fp32_dot, num_warps=warps, num_stages=3)


def _check_extend_args(q, k_cache, v_cache, block_tables, cu_q_lens, context_lens, out):
    name = "paged_extend_attention"
    check_cache(name, k_cache, v_cache)
    assert q.dim() == 3, f"{name}: q must be [T, Hq, D], got {tuple(q.shape)}"
    T, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    assert D == k_cache.shape[3], f"{name}: q head_dim {D} != cache head_dim {k_cache.shape[3]}"
    assert Hq % Hkv == 0, f"{name}: Hq={Hq} must be a multiple of Hkv={Hkv}"
    assert q.dtype == k_cache.dtype, f"{name}: q dtype {q.dtype} != cache dtype {k_cache.dtype}"
    assert q.stride(2) == 1, f"{name}: q head_dim must be contiguous"
    S = context_lens.shape[0]
    assert context_lens.dim() == 1 and context_lens.dtype == torch.int32, f"{name}: context_lens must be int32 [S]"
    assert cu_q_lens.shape == (S + 1,) and cu_q_lens.dtype == torch.int32, (
        f"{name}: cu_q_lens must be int32 [S+1={S + 1}], got {cu_q_lens.dtype} {tuple(cu_q_lens.shape)}")
    assert block_tables.dim() == 2 and block_tables.shape[0] == S and block_tables.dtype == torch.int32, (
        f"{name}: block_tables must be int32 [S={S}, max_blocks], got {block_tables.dtype} {tuple(block_tables.shape)}")
    assert block_tables.stride(1) == 1, f"{name}: block_tables rows must be contiguous"
    if out is not None:
        assert out.shape == q.shape and out.dtype == q.dtype, (
            f"{name}: out must be {q.dtype} {tuple(q.shape)}, got {out.dtype} {tuple(out.shape)}")
        assert out.stride(2) == 1, f"{name}: out head_dim must be contiguous"


def paged_extend_attention(q, k_cache, v_cache, block_tables, cu_q_lens, context_lens, max_q_len: int, scale,
                           out=None):
    """Causal prefill/extend attention of q [T, Hq, D] over the paged KV. Returns out [T, Hq, D]."""
    _check_extend_args(q, k_cache, v_cache, block_tables, cu_q_lens, context_lens, out)
    check_launchable("paged_extend_attention", q, k_cache, v_cache, block_tables, cu_q_lens, context_lens,
                     *([] if out is None else [out]))
    T, Hq, D = q.shape
    Hkv, bs = k_cache.shape[2], k_cache.shape[1]
    check_pow2_head_dim("paged_extend_attention", D)
    group = Hq // Hkv
    if out is None:
        out = torch.empty_like(q)
    S = context_lens.shape[0]
    if T == 0 or S == 0 or max_q_len <= 0:
        return out
    cfg = extend_launch_config(q.dtype, D, group, bs, launch_target(q.device))
    grid = (S, Hkv, triton.cdiv(int(max_q_len) * group, cfg["BLOCK_M"]))
    _paged_extend_kernel[grid](
        q, k_cache, v_cache, out, block_tables, cu_q_lens, context_lens,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1), block_tables.stride(0),
        float(scale) * LOG2E,
        **cfg,
    )
    return out


def paged_extend_attention_ref(q, k_cache, v_cache, block_tables, cu_q_lens, context_lens, max_q_len: int, scale,
                               out=None):
    """Pure-torch reference of `paged_extend_attention`: queries padded to [S, max_q_len] and KV
    gathered to [S, max_context], one batched masked matmul per chunk of sequences."""
    _check_extend_args(q, k_cache, v_cache, block_tables, cu_q_lens, context_lens, out)
    T, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    if out is None:
        out = torch.empty_like(q)
    S = context_lens.shape[0]
    if T == 0 or S == 0:
        return out
    dev = q.device
    cu = cu_q_lens.long()
    qlen = cu[1:] - cu[:-1]
    ctx = context_lens.long()
    Qm = max(int(qlen.max()), 1)
    L = max(int(ctx.max()), 1)
    ii = torch.arange(Qm, device=dev)
    pos = torch.arange(L, device=dev)
    for a, z in _chunks(S, L * Hkv * D + Qm * L * Hq):
        tok = cu[a:z, None] + ii[None, :]  # [n, Qm]
        qmask = ii[None, :] < qlen[a:z, None]
        tok = torch.where(qmask, tok, torch.zeros_like(tok))
        qq = q[tok].float().transpose(1, 2)  # [n, Hq, Qm, D]
        k = gather_paged_kv(k_cache, block_tables[a:z], L).float().transpose(1, 2)  # [n, Hkv, L, D]
        v = gather_paged_kv(v_cache, block_tables[a:z], L).float().transpose(1, 2)
        qpos = ctx[a:z, None] - qlen[a:z, None] + ii[None, :]  # [n, Qm]
        valid = (pos[None, None, :] <= qpos[:, :, None]) & (pos[None, None, :] < ctx[a:z, None, None])
        # SDPA (fused on the CPU). Every query row has key 0 valid (a sequence's context is >= 1
        # and padded rows sit past its end), so no row is fully masked.
        o = F.scaled_dot_product_attention(qq, k, v, attn_mask=valid[:, None], scale=scale, enable_gqa=True)
        out[tok[qmask]] = o.transpose(1, 2)[qmask].to(out.dtype)
    return out
