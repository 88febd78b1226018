"""Shared-prefix (cascade) decode attention, the Hydragen / FlashInfer-cascade idea.

Beams forked from one prompt share the KV blocks of that prompt. Plain decode reads the shared
prefix once per beam; here it is read once per group:
  1. `_prefix_attn_kernel`: per (group, kv head, query tile, KV split) all the group's queries
     (beams x GQA heads, flattened to one [rows, D] matrix, tiled by BLOCK_M rows) attend to the
     prefix positions [0, prefix_lens[g]) through the group's first block table -> partial
     (out, lse) per split, merged over splits by log-sum-exp.
  2. per sequence, paged decode over its own suffix [prefix_len, context_len) (kv_start).
  3. `merge_attention_states` merges the two (out, lse) pairs; an empty part has lse = -inf.

Layouts:
  q:            [B, Hq, D] fp32 / fp16 / bf16; rows of group g are group_indptr[g] .. [g+1]-1
  k_cache:      [num_blocks, block_size, Hkv, D] (v_cache likewise), same dtype as q
  block_tables: [B, max_blocks] int32, rows of one group agree on the prefix blocks
  context_lens: [B] int32
  group_indptr: [G+1] int32, group_indptr[0] = 0, group_indptr[G] = B
  prefix_lens:  [G] int32, multiples of block_size, <= every member's context_len
  out:          [B, Hq, D] q.dtype
merge_attention_states: out_a/out_b [N, H, D] any float dtype, lse_a/lse_b [N, H] fp32 (natural
log) -> (out [N, H, D] (out_a.dtype by default), lse [N, H] fp32).

`plan_shared_prefix_groups` is the host-side planner that finds such groups in a decode batch.
The CPU path uses `tree_attention.py` instead, which also shares the runs common to fewer rows.
"""
from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from .common import (LOG2E, GpuTarget, attend_paged_tiles, check_launchable, check_pow2_head_dim,
                     launch_target, lse_merge_base, merged_lse, use_fp32_dot)
from .paged_decode import _check_decode_args, _num_sms, merge_split_states, \
    paged_decode_attention, paged_decode_attention_ref

# Larger query tiles mean fewer passes over the prefix (one per tile): 128 rows, 8 warps on GPU.
PREFIX_BLOCK_M, PREFIX_BLOCK_N, PREFIX_WARPS = 128, 64, 8
PREFIX_BLOCK_M_INTERP, PREFIX_BLOCK_N_INTERP = 32, 32
# fp32 dots run on CUDA cores with whole tiles in registers (and their operands staged through
# shared memory): 128 x 64 tiles spill and need 164 KB of shared memory at head_dim 128
PREFIX_BLOCK_M_FP32, PREFIX_BLOCK_N_FP32 = 64, 32
PREFIX_MIN_SPLIT_TOKENS = 256
PREFIX_MAX_SPLITS = 16


@triton.jit
def _prefix_attn_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, indptr_ptr, plen_ptr, po_ptr, plse_ptr,
    sq_b, sq_h, sk_b, sk_p, sk_h, sv_b, sv_p, sv_h, sbt_b,
    spo_b, spo_h, spo_s, spl_b, spl_h, spl_s,
    scale_log2, num_splits,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, FP32_DOT: tl.constexpr,
):
    g = tl.program_id(0)
    kvh = tl.program_id(1)
    mt = tl.program_id(2) // num_splits
    split = tl.program_id(2) % num_splits
    r0 = tl.load(indptr_ptr + g)
    r1 = tl.load(indptr_ptr + g + 1)
    plen = tl.load(plen_ptr + g)
    part = tl.cdiv(tl.cdiv(plen, num_splits), BLOCK_N) * BLOCK_N
    lo = split * part
    hi = tl.minimum(lo + part, plen)

    rows = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    seq = (r0 + rows // GROUP).to(tl.int64)
    heads = (kvh * GROUP + rows % GROUP).to(tl.int64)
    rmask = seq < r1
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + seq[:, None] * sq_b + heads[:, None] * sq_h + d[None, :], mask=rmask[:, None], other=0.0)
    if FP32_DOT:
        q = q.to(tl.float32)
    table = bt_ptr + r0.to(tl.int64) * sbt_b  # the group's shared prefix blocks
    out, lse = attend_paged_tiles(q, k_ptr, v_ptr, table, kvh, lo, hi, lo, sk_b, sk_p, sk_h, sv_b, sv_p, sv_h,
                                  scale_log2, BLOCK_M, HEAD_DIM, BLOCK_N, BLOCK_SIZE, False, FP32_DOT)
    tl.store(po_ptr + seq[:, None] * spo_b + heads[:, None] * spo_h + split * spo_s + d[None, :], out,
             mask=rmask[:, None])
    tl.store(plse_ptr + seq * spl_b + heads * spl_h + split * spl_s, lse, mask=rmask)


@triton.jit
def _merge_states_kernel(
    oa_ptr, la_ptr, ob_ptr, lb_ptr, o_ptr, l_ptr,
    soa_n, soa_h, sla_n, sla_h, sob_n, sob_h, slb_n, slb_h, so_n, so_h, sl_n, sl_h,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    la = tl.load(la_ptr + n * sla_n + h * sla_h)
    lb = tl.load(lb_ptr + n * slb_n + h * slb_h)
    m_safe = lse_merge_base(tl.maximum(la, lb))
    wa = tl.exp(la - m_safe)
    wb = tl.exp(lb - m_safe)
    tot = wa + wb
    inv = 1.0 / tl.where(tot > 0, tot, 1.0)
    oa = tl.load(oa_ptr + n * soa_n + h * soa_h + d, mask=dmask, other=0.0).to(tl.float32)
    ob = tl.load(ob_ptr + n * sob_n + h * sob_h + d, mask=dmask, other=0.0).to(tl.float32)
    # where() keeps a NaN-free result when one side is empty (weight 0) whatever its out holds
    o = tl.where(wa > 0, oa * (wa * inv), 0.0) + tl.where(wb > 0, ob * (wb * inv), 0.0)
    tl.store(o_ptr + n * so_n + h * so_h + d, o.to(o_ptr.dtype.element_ty), mask=dmask)
    tl.store(l_ptr + n * sl_n + h * sl_h, merged_lse(m_safe, tot))


def prefix_launch_config(dtype: torch.dtype, head_dim: int, group: int, block_size: int, target: GpuTarget) -> dict:
    """Every constexpr and launch option of `_prefix_attn_kernel`: the launcher and the compile
    check (kernels/compile_check.py) both take them from here."""
    fp32_dot = use_fp32_dot(dtype, target)
    if target.interpreter:
        bm, bn, warps = PREFIX_BLOCK_M_INTERP, PREFIX_BLOCK_N_INTERP, 4
    elif fp32_dot:
        bm, bn, warps = PREFIX_BLOCK_M_FP32, PREFIX_BLOCK_N_FP32, PREFIX_WARPS
    else:
        bm, bn, warps = PREFIX_BLOCK_M, PREFIX_BLOCK_N, PREFIX_WARPS
    return dict(GROUP=group, HEAD_DIM=head_dim, BLOCK_M=max(bm, triton.next_power_of_2(group)), BLOCK_N=bn,
                BLOCK_SIZE=block_size, FP32_DOT=fp32_dot, num_warps=warps, num_stages=3)


def merge_states_launch_config(head_dim: int) -> dict:
    """Every constexpr and launch option of `_merge_states_kernel` (shared with the compile check)."""
    return dict(HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), num_warps=4, num_stages=3)


def _check_merge_args(out_a, lse_a, out_b, lse_b, out):
    name = "merge_attention_states"
    assert out_a.dim() == 3 and out_b.shape == out_a.shape, (
        f"{name}: out_a/out_b must be [N, H, D] of one shape, got {tuple(out_a.shape)}, {tuple(out_b.shape)}")
    assert lse_a.shape == out_a.shape[:2] and lse_b.shape == out_a.shape[:2], (
        f"{name}: lse_a/lse_b must be [N, H] = {tuple(out_a.shape[:2])}, got {tuple(lse_a.shape)}, {tuple(lse_b.shape)}")
    assert lse_a.dtype == torch.float32 and lse_b.dtype == torch.float32, f"{name}: lse must be fp32"
    assert out_a.stride(2) == 1 and out_b.stride(2) == 1, f"{name}: head_dim must be contiguous"
    if out is not None:
        assert out.shape == out_a.shape and out.stride(2) == 1, (
            f"{name}: out must be {tuple(out_a.shape)} with contiguous head_dim, got {tuple(out.shape)}")


def merge_attention_states(out_a, lse_a, out_b, lse_b, out=None):
    """Merge two attention states over disjoint KV sets by log-sum-exp. Returns (out, lse)."""
    _check_merge_args(out_a, lse_a, out_b, lse_b, out)
    check_launchable("merge_attention_states", out_a, lse_a, out_b, lse_b, *([] if out is None else [out]))
    N, H, D = out_a.shape
    if out is None:
        out = torch.empty_like(out_a)
    lse = torch.empty(N, H, device=out_a.device, dtype=torch.float32)
    if N * H == 0:
        return out, lse
    _merge_states_kernel[(N, H)](
        out_a, lse_a, out_b, lse_b, out, lse,
        out_a.stride(0), out_a.stride(1), lse_a.stride(0), lse_a.stride(1),
        out_b.stride(0), out_b.stride(1), lse_b.stride(0), lse_b.stride(1),
        out.stride(0), out.stride(1), lse.stride(0), lse.stride(1),
        **merge_states_launch_config(D),
    )
    return out, lse


def merge_attention_states_ref(out_a, lse_a, out_b, lse_b, out=None):
    """Pure-torch reference of `merge_attention_states`."""
    _check_merge_args(out_a, lse_a, out_b, lse_b, out)
    if out is None:
        out = torch.empty_like(out_a)
    m = torch.maximum(lse_a, lse_b)
    m = torch.where(torch.isinf(m) & (m < 0), torch.zeros_like(m), m)
    wa, wb = torch.exp(lse_a - m), torch.exp(lse_b - m)
    tot = wa + wb
    inv = 1.0 / torch.where(tot > 0, tot, torch.ones_like(tot))
    oa = torch.where((wa > 0)[..., None], out_a.float() * (wa * inv)[..., None], 0.0)
    ob = torch.where((wb > 0)[..., None], out_b.float() * (wb * inv)[..., None], 0.0)
    out.copy_((oa + ob).to(out.dtype))
    lse = torch.where(tot > 0, m + torch.log(torch.where(tot > 0, tot, torch.ones_like(tot))),
                      torch.full_like(tot, float("-inf")))
    return out, lse


def _check_groups(B, group_indptr, prefix_lens):
    name = "cascade_decode_attention"
    assert group_indptr.dim() == 1 and group_indptr.dtype == torch.int32, f"{name}: group_indptr must be int32 [G+1]"
    G = group_indptr.shape[0] - 1
    assert G >= 0 and prefix_lens.shape == (G,) and prefix_lens.dtype == torch.int32, (
        f"{name}: prefix_lens must be int32 [G={G}], got {prefix_lens.dtype} {tuple(prefix_lens.shape)}")
    if group_indptr.device.type == "cpu":
        gi = group_indptr.tolist()
        assert gi[0] == 0 and gi[-1] == B and all(x <= y for x, y in zip(gi, gi[1:])), (
            f"{name}: group_indptr must rise from 0 to B={B}, got {gi}")
    return G


def cascade_decode_attention(q, k_cache, v_cache, block_tables, context_lens, group_indptr, prefix_lens, scale,
                             out=None, max_group_rows=None, max_prefix_len=None, max_suffix_len=None):
    """Decode attention of q [B, Hq, D] where the rows of each group share a prefix of KV blocks.
    Mathematically equal to paged_decode_attention; returns out [B, Hq, D].
    max_group_rows / max_prefix_len / max_suffix_len: host-side bounds the caller already knows
    (largest group, longest prefix, longest suffix); with them no value is read back from the GPU."""
    _check_decode_args(q, k_cache, v_cache, block_tables, context_lens, out, None)
    check_launchable("cascade_decode_attention", q, k_cache, v_cache, block_tables, context_lens, group_indptr,
                     prefix_lens, *([] if out is None else [out]))
    B, Hq, D = q.shape
    Hkv, bs = k_cache.shape[2], k_cache.shape[1]
    check_pow2_head_dim("cascade_decode_attention", D)
    G = _check_groups(B, group_indptr, prefix_lens)
    group = Hq // Hkv
    if out is None:
        out = torch.empty_like(q)
    if B == 0:
        return out
    dev = q.device
    # Step 1: the shared prefixes, one pass per group.
    target = launch_target(dev)
    cfg = prefix_launch_config(q.dtype, D, group, bs, target)
    bm = cfg["BLOCK_M"]
    if max_group_rows is not None and max_prefix_len is not None:
        max_rows, max_plen = max_group_rows, max_prefix_len
    elif group_indptr.device.type == "cpu":  # exact tile count for free; on the GPU avoid a host sync
        max_rows = int((group_indptr[1:] - group_indptr[:-1]).max()) if G > 0 else 0
        max_plen = int(prefix_lens.max()) if G > 0 else 0
    else:
        max_rows, max_plen = B, int(block_tables.shape[1]) * bs
    m_tiles = max(1, triton.cdiv(max_rows * group, bm))
    programs = max(1, G * Hkv * m_tiles)
    splits = max(1, min(triton.cdiv(2 * _num_sms(dev), programs), triton.cdiv(max(max_plen, 1), PREFIX_MIN_SPLIT_TOKENS),
                        PREFIX_MAX_SPLITS))
    if target.interpreter:
        splits = min(splits, 2)
    po = torch.empty(B, Hq, splits, D, device=dev, dtype=torch.float32)
    plse = torch.full((B, Hq, splits), float("-inf"), device=dev, dtype=torch.float32)
    if G > 0:
        po.zero_()  # rows of a group with no program tile stay a valid empty state
        _prefix_attn_kernel[(G, Hkv, m_tiles * splits)](
            q, k_cache, v_cache, block_tables, group_indptr, prefix_lens, po, plse,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
            po.stride(0), po.stride(1), po.stride(2), plse.stride(0), plse.stride(1), plse.stride(2),
            float(scale) * LOG2E, splits,
            **cfg,
        )
    if splits > 1:
        out_p = torch.empty(B, Hq, D, device=dev, dtype=torch.float32)
        lse_p = torch.empty(B, Hq, device=dev, dtype=torch.float32)
        merge_split_states(po, plse, out_p, lse_p)
    else:
        out_p, lse_p = po[:, :, 0], plse[:, :, 0]
    # Step 2: each row's own suffix.
    counts = (group_indptr[1:] - group_indptr[:-1]).long()
    row_start = torch.repeat_interleave(prefix_lens, counts, output_size=B)
    row_start = row_start.to(torch.int32)
    max_suffix = max_suffix_len if max_suffix_len is not None else int((context_lens - row_start).max())
    out_s, lse_s = paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale,
                                          kv_start=row_start, return_lse=True, max_context_len=max(max_suffix, 1))
    # Step 3: merge.
    merge_attention_states(out_p, lse_p, out_s, lse_s, out=out)
    return out


def cascade_decode_attention_ref(q, k_cache, v_cache, block_tables, context_lens, group_indptr, prefix_lens, scale,
                                 out=None, max_group_rows=None, max_prefix_len=None, max_suffix_len=None):
    """Reference: the cascade is mathematically plain decode attention over each row's context."""
    _check_decode_args(q, k_cache, v_cache, block_tables, context_lens, out, None)
    _check_groups(q.shape[0], group_indptr, prefix_lens)
    return paged_decode_attention_ref(q, k_cache, v_cache, block_tables, context_lens, scale, out=out)


def plan_shared_prefix_groups(block_tables, context_lens, block_size: int, min_prefix_tokens: int = 256,
                              min_group_size: int = 4):
    """Group decode rows by their first block id and measure each group's shared prefix.

    A group's prefix is the longest run of leading block ids identical across all its rows,
    counted in full blocks and capped so that it is strictly shorter than every member's context
    (each row keeps >= 1 suffix token). Groups with >= min_group_size rows and a prefix of
    >= min_prefix_tokens tokens take the cascade path; all other rows are gathered into one trailing
    group with prefix 0 (plain decode for them).

    Returns (order [B] int64: new row i is old row order[i], group_indptr [G+1] int32,
    prefix_lens [G] int32), all on block_tables' device, or None when no group qualifies.
    """
    bt = block_tables.detach().cpu().numpy()
    ctx = context_lens.detach().cpu().numpy().astype(np.int64)
    B = bt.shape[0]
    if B == 0 or bt.shape[1] == 0:
        return None
    nfull = np.clip((ctx - 1) // block_size, 0, bt.shape[1])  # usable full prefix blocks per row
    key = np.where(nfull > 0, bt[:, 0].astype(np.int64), -1 - np.arange(B))  # rows without a full block: alone
    order = np.argsort(key, kind="stable")
    skey, sbt, snfull = key[order], bt[order], nfull[order]
    starts = np.flatnonzero(np.r_[True, skey[1:] != skey[:-1]])
    sizes = np.diff(np.r_[starts, B])
    leader = np.repeat(starts, sizes)  # index (in sorted order) of each row's group leader
    same = np.cumprod(sbt == sbt[leader], axis=1)  # 1 while the row's blocks still match the leader's
    run = np.minimum(same.sum(axis=1), snfull)  # per-row matching full blocks
    gblocks = np.minimum.reduceat(run, starts)
    plen = gblocks * block_size
    good = (sizes >= min_group_size) & (plen >= min_prefix_tokens)
    if not good.any():
        return None
    good_rows = np.repeat(good, sizes)
    new_order = np.r_[order[good_rows], order[~good_rows]]
    g_sizes = sizes[good]
    g_plen = plen[good]
    n_rest = int((~good_rows).sum())
    if n_rest:
        g_sizes = np.r_[g_sizes, n_rest]
        g_plen = np.r_[g_plen, 0]
    indptr = np.r_[0, np.cumsum(g_sizes)]
    dev = block_tables.device
    return (torch.as_tensor(new_order, dtype=torch.int64, device=dev),
            torch.as_tensor(indptr, dtype=torch.int32, device=dev),
            torch.as_tensor(g_plen, dtype=torch.int32, device=dev))
