"""Paged decode attention (one query token per sequence) with split-KV (flash-decoding).

Sequence b's query attends to the KV positions [kv_start[b], context_lens[b]) of its paged
context. The range is cut into `num_splits` partitions (per sequence: each partition holds
ceil(len / num_splits) positions, rounded up to the KV tile); one program per
(sequence, kv head, partition) computes a partial output and its log-sum-exp for ALL the GQA
query heads of that kv head at once (the KV tile is read once and multiplied against a
[group, D] query matrix); a second kernel merges the partitions by log-sum-exp. With one
partition the first kernel writes the final output directly.

Layouts:
  q:            [B, Hq, D]                        fp32 / fp16 / bf16, head_dim contiguous
  k_cache:      [num_blocks, block_size, Hkv, D]  same dtype as q (v_cache likewise)
  block_tables: [B, max_blocks] int32 (entries past a sequence's length are garbage)
  context_lens: [B] int32, KV positions of each sequence (this step's token included)
  kv_start:     [B] int32 or None (0): first attended position
  out:          [B, Hq, D] q.dtype (allocated when None), head_dim contiguous
  lse:          [B, Hq] fp32, natural log (returned with return_lse=True); -inf (and out = 0)
                for an empty range
GQA: q head h uses kv head h // (Hq // Hkv). Softmax scale is passed explicitly.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (LOG2E, GpuTarget, attend_paged_tiles, check_cache, check_launchable, check_pow2_head_dim,
                     launch_target, lse_merge_base, merged_lse, use_fp32_dot)

# KV positions per inner tile (GPU / interpreter).
DECODE_BLOCK_N = 64
DECODE_BLOCK_N_INTERP = 32
# Automatic split-KV: aim for this many programs per SM, with at least this many positions per split.
TARGET_PROGRAMS_PER_SM = 2
MIN_SPLIT_TOKENS = 256
MAX_SPLITS = 64


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, ctx_ptr, start_ptr, o_ptr, lse_ptr,
    sq_b, sq_h, sk_b, sk_p, sk_h, sv_b, sv_p, sv_h, sbt_b,
    so_b, so_h, so_s, sl_b, sl_h, sl_s,
    scale_log2, num_splits,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, HAS_START: tl.constexpr, FP32_DOT: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(ctx_ptr + b)
    if HAS_START:
        start = tl.maximum(tl.load(start_ptr + b), 0)
    else:
        start = ctx * 0
    length = tl.maximum(ctx - start, 0)
    part = tl.cdiv(tl.cdiv(length, num_splits), BLOCK_N) * BLOCK_N
    lo = start + split * part
    hi = tl.minimum(lo + part, ctx)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, HEAD_DIM)
    heads = (kvh * GROUP + g).to(tl.int64)
    gmask = g < GROUP
    q = tl.load(q_ptr + b * sq_b + heads[:, None] * sq_h + d[None, :], mask=gmask[:, None], other=0.0)
    if FP32_DOT:
        q = q.to(tl.float32)
    out, lse = attend_paged_tiles(q, k_ptr, v_ptr, bt_ptr + b * sbt_b, kvh, lo, hi, lo, sk_b, sk_p, sk_h, sv_b, sv_p, sv_h,
                                  scale_log2, BLOCK_G, HEAD_DIM, BLOCK_N, BLOCK_SIZE, False, FP32_DOT)
    tl.store(o_ptr + b * so_b + heads[:, None] * so_h + split * so_s + d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=gmask[:, None])
    tl.store(lse_ptr + b * sl_b + heads * sl_h + split * sl_s, lse, mask=gmask)


@triton.jit
def _merge_splits_kernel(
    po_ptr, plse_ptr, o_ptr, lse_ptr,
    spo_b, spo_h, spo_s, spl_b, spl_h, so_b, so_h, sl_b,
    num_splits, NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, WRITE_LSE: tl.constexpr,
):
    """Merge partial (out, lse) of `num_splits` KV partitions: one program per (sequence, q head)."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, HEAD_DIM)
    smask = s < num_splits
    lse = tl.load(plse_ptr + b * spl_b + h * spl_h + s, mask=smask, other=float("-inf"))
    m_safe = lse_merge_base(tl.max(lse, 0))
    w = tl.exp(lse - m_safe)
    w_sum = tl.sum(w, 0)
    po = tl.load(po_ptr + b * spo_b + h * spo_h + s[:, None] * spo_s + d[None, :], mask=smask[:, None], other=0.0)
    out = tl.sum(po * w[:, None], 0) / tl.where(w_sum > 0, w_sum, 1.0)
    tl.store(o_ptr + b * so_b + h * so_h + d, out.to(o_ptr.dtype.element_ty))
    if WRITE_LSE:
        tl.store(lse_ptr + b * sl_b + h, merged_lse(m_safe, w_sum))


def decode_launch_config(dtype: torch.dtype, head_dim: int, group: int, block_size: int, has_start: bool,
                         target: GpuTarget) -> dict:
    """Every constexpr and launch option of `_paged_decode_kernel`: the launcher and the compile
    check (kernels/compile_check.py) both take them from here."""
    fp32_dot = use_fp32_dot(dtype, target)
    # fp32 dots run on CUDA cores with the tiles in registers: 8 warps keep head_dim 128 unspilled
    warps = 8 if fp32_dot and not target.interpreter else 4
    return dict(GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
                BLOCK_N=DECODE_BLOCK_N_INTERP if target.interpreter else DECODE_BLOCK_N, BLOCK_SIZE=block_size,
                HAS_START=has_start, FP32_DOT=fp32_dot, num_warps=warps, num_stages=3)


def merge_splits_launch_config(num_heads: int, head_dim: int, num_splits: int, write_lse: bool) -> dict:
    """Every constexpr and launch option of `_merge_splits_kernel` (shared with the compile check)."""
    return dict(NUM_HEADS=num_heads, HEAD_DIM=head_dim, BLOCK_S=triton.next_power_of_2(num_splits),
                WRITE_LSE=write_lse, num_warps=4, num_stages=3)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def auto_num_splits(max_len: int, batch: int, num_kv_heads: int, device: torch.device) -> int:
    """Partitions per sequence: enough (batch x kv head x split) programs to fill the GPU, but
    never fewer than MIN_SPLIT_TOKENS positions per partition."""
    programs = max(1, batch * num_kv_heads)
    want = triton.cdiv(TARGET_PROGRAMS_PER_SM * _num_sms(device), programs)
    by_len = triton.cdiv(max(int(max_len), 1), MIN_SPLIT_TOKENS)
    return int(max(1, min(want, by_len, MAX_SPLITS)))


def _check_decode_args(q, k_cache, v_cache, block_tables, context_lens, out, kv_start):
    check_cache("paged_decode_attention", k_cache, v_cache)
    assert q.dim() == 3, f"paged_decode_attention: q must be [B, Hq, D], got {tuple(q.shape)}"
    B, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    assert D == k_cache.shape[3], f"paged_decode_attention: q head_dim {D} != cache head_dim {k_cache.shape[3]}"
    assert Hq % Hkv == 0, f"paged_decode_attention: Hq={Hq} must be a multiple of Hkv={Hkv}"
    assert q.dtype == k_cache.dtype, f"paged_decode_attention: q dtype {q.dtype} != cache dtype {k_cache.dtype}"
    assert q.stride(2) == 1, "paged_decode_attention: q head_dim must be contiguous"
    assert block_tables.dim() == 2 and block_tables.shape[0] == B and block_tables.dtype == torch.int32, (
        f"paged_decode_attention: block_tables must be int32 [B={B}, max_blocks], got "
        f"{block_tables.dtype} {tuple(block_tables.shape)}")
    assert block_tables.stride(1) == 1, "paged_decode_attention: block_tables rows must be contiguous"
    assert context_lens.shape == (B,) and context_lens.dtype == torch.int32, (
        f"paged_decode_attention: context_lens must be int32 [B={B}], got {context_lens.dtype} {tuple(context_lens.shape)}")
    if kv_start is not None:
        assert kv_start.shape == (B,) and kv_start.dtype == torch.int32, (
            f"paged_decode_attention: kv_start must be int32 [B={B}], got {kv_start.dtype} {tuple(kv_start.shape)}")
    if out is not None:
        assert out.shape == q.shape and out.dtype == q.dtype, (
            f"paged_decode_attention: out must be {q.dtype} {tuple(q.shape)}, got {out.dtype} {tuple(out.shape)}")
        assert out.stride(2) == 1, "paged_decode_attention: out head_dim must be contiguous"


def merge_split_states(part_out, part_lse, out, lse=None) -> None:
    """Merge [B, H, S, D] fp32 partial outputs with [B, H, S] lse into out [B, H, D] (and lse [B, H])."""
    B, H, S, D = part_out.shape
    _merge_splits_kernel[(B, H)](
        part_out, part_lse, out, lse if lse is not None else part_lse,
        part_out.stride(0), part_out.stride(1), part_out.stride(2), part_lse.stride(0), part_lse.stride(1),
        out.stride(0), out.stride(1), lse.stride(0) if lse is not None else 0,
        S, **merge_splits_launch_config(H, D, S, lse is not None),
    )


def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, out=None, kv_start=None,
                           return_lse=False, num_splits=None, max_context_len=None, scratch=None):
    """Decode attention of q [B, Hq, D] over each sequence's paged KV positions
    [kv_start[b] (default 0), context_lens[b]). Returns out [B, Hq, D], or (out, lse [B, Hq] fp32)
    with return_lse=True. num_splits=None picks the split-KV factor from the longest context
    (max_context_len, when given, saves reading context_lens back to the host). scratch: buffers
    the caller keeps (a CUDA graph's) instead of fresh ones: (partial outputs [B, Hq, S, D] fp32,
    partial lse [B, Hq, S] fp32) for S = num_splits > 1, or (None, lse [B, Hq] fp32) for one split."""
    _check_decode_args(q, k_cache, v_cache, block_tables, context_lens, out, kv_start)
    dev = check_launchable("paged_decode_attention", q, k_cache, v_cache, block_tables, context_lens,
                           *([] if kv_start is None else [kv_start]), *([] if out is None else [out]))
    B, Hq, D = q.shape
    Hkv, bs = k_cache.shape[2], k_cache.shape[1]
    check_pow2_head_dim("paged_decode_attention", D)
    group = Hq // Hkv
    if out is None:
        out = torch.empty_like(q)
    lse = torch.empty(B, Hq, device=dev, dtype=torch.float32) if return_lse else None
    if B == 0:
        return (out, lse) if return_lse else out
    if num_splits is None:
        if max_context_len is None:
            max_context_len = int(context_lens.max())
        num_splits = auto_num_splits(max_context_len, B, Hkv, dev)
    num_splits = int(num_splits)
    assert num_splits >= 1, f"paged_decode_attention: num_splits must be >= 1, got {num_splits}"
    if scratch is not None:
        want = ((B, Hq, num_splits, D), (B, Hq, num_splits)) if num_splits > 1 else (None, (B, Hq))
        got = tuple(None if t is None else tuple(t.shape) for t in scratch)
        assert got == want and all(t is None or t.dtype == torch.float32 for t in scratch), \
            f"paged_decode_attention: scratch must be fp32 buffers of shapes {want}, got {got}"
    if num_splits == 1:
        o_buf = out
        lse_buf = lse if lse is not None else (scratch[1] if scratch is not None else
                                                torch.empty(B, Hq, device=dev, dtype=torch.float32))
        so = (out.stride(0), out.stride(1), 0)
        sl = (lse_buf.stride(0), lse_buf.stride(1), 0)
    else:
        o_buf, lse_buf = scratch if scratch is not None else (
            torch.empty(B, Hq, num_splits, D, device=dev, dtype=torch.float32),
            torch.empty(B, Hq, num_splits, device=dev, dtype=torch.float32))
        so = (o_buf.stride(0), o_buf.stride(1), o_buf.stride(2))
        sl = (lse_buf.stride(0), lse_buf.stride(1), lse_buf.stride(2))
    start = kv_start if kv_start is not None else context_lens  # dummy pointer when absent
    _paged_decode_kernel[(B, Hkv, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, start, o_buf, lse_buf,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        *so, *sl, float(scale) * LOG2E, num_splits,
        **decode_launch_config(q.dtype, D, group, bs, kv_start is not None, launch_target(dev)),
    )
    if num_splits > 1:
        merge_split_states(o_buf, lse_buf, out, lse)
    return (out, lse) if return_lse else out


# ----------------------------------------------------------------------------------------------
# Pure-torch reference (the CPU path): padded gathers + batched matmul, chunked over sequences.
# ----------------------------------------------------------------------------------------------
# Upper bound on gathered K elements per chunk of sequences (keeps the CPU path's memory bounded).
REF_CHUNK_ELEMS = 1 << 24


def gather_paged_kv(cache, block_tables, length: int):
    """cache [NB, bs, H, D], block_tables [B, max_blocks] -> [B, length, H, D] (positions past a
    sequence's length hold whatever its table points at: mask them)."""
    bs = cache.shape[1]
    pos = torch.arange(length, device=cache.device)
    col = (pos // bs).clamp_max(block_tables.shape[1] - 1)
    blk = block_tables[:, col].long()  # [B, length]
    return cache[blk, (pos % bs)[None, :].expand_as(blk)]


def _chunks(n_rows: int, per_row: int):
    step = max(1, REF_CHUNK_ELEMS // max(per_row, 1))
    for i in range(0, n_rows, step):
        yield i, min(n_rows, i + step)


def paged_decode_attention_ref(q, k_cache, v_cache, block_tables, context_lens, scale, out=None, kv_start=None,
                               return_lse=False, num_splits=None, max_context_len=None):
    """Pure-torch reference of `paged_decode_attention` (same signature; num_splits ignored)."""
    _check_decode_args(q, k_cache, v_cache, block_tables, context_lens, out, kv_start)
    B, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    group = Hq // Hkv
    if out is None:
        out = torch.empty_like(q)
    lse = torch.empty(B, Hq, device=q.device, dtype=torch.float32)
    if B > 0:
        ctx = context_lens.long()
        start = torch.zeros_like(ctx) if kv_start is None else kv_start.long().clamp_min(0)
        L = max(int(ctx.max()), 1)
        for i, j in _chunks(B, max(L, 1) * Hkv * D):
            k = gather_paged_kv(k_cache, block_tables[i:j], L).float()  # [b, L, Hkv, D]
            v = gather_paged_kv(v_cache, block_tables[i:j], L).float()
            pos = torch.arange(L, device=q.device)
            valid = (pos[None, :] >= start[i:j, None]) & (pos[None, :] < ctx[i:j, None])  # [b, L]
            o, lse[i:j] = attend_with_lse(q[i:j].float().view(j - i, Hkv, group, D), k, v, valid, scale)
            out[i:j] = o.to(out.dtype)
    return (out, lse) if return_lse else out


def _attend_with_lse_einsum(q, k, v, valid, scale):
    R, Hkv, g, D = q.shape
    s = torch.einsum("rhgd,rlhd->rhgl", q, k) * scale
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [R, Hkv, g]
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))[..., None])
    o = torch.einsum("rhgl,rlhd->rhgd", p, v)
    return o.reshape(R, Hkv * g, D), lse.reshape(R, Hkv * g)


def attend_with_lse(q, k, v, valid, scale):
    """q [R, Hkv, g, D], k/v [R, L, Hkv, D] (fp32), valid [R, L] bool ->
    out [R, Hkv*g, D], lse [R, Hkv*g] (an empty row: out 0, lse -inf). On the CPU, through its
    fused flash-attention op, which returns the LSE too (several times faster than einsum);
    elsewhere, or when a row is empty (the fused op would give NaN), through einsum."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if q.device.type != "cpu" or op is None or not bool(valid.any(-1).all()):
        return _attend_with_lse_einsum(q, k, v, valid, scale)
    R, Hkv, g, D = q.shape
    mask = torch.zeros(valid.shape, dtype=q.dtype).masked_fill_(~valid, float("-inf"))[:, None, None, :]
    o, lse = op(q, k.transpose(1, 2), v.transpose(1, 2), 0.0, False, attn_mask=mask, scale=scale)
    return o.reshape(R, Hkv * g, D), lse.reshape(R, Hkv * g)
