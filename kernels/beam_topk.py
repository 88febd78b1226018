"""Top-k kernels for beam search: segmented top-k and fused log-softmax + top-k.

Index recovery: `tl.topk` returns values only, so both kernels rank packed int64 sort keys
    key = (ordered_bits(value) << 32) | (0xFFFFFFFF - index)
where ordered_bits maps the fp32 bit pattern to a signed int32 with the same order as the float
(non-negative floats keep their bits, negative ones flip the low 31 bits). A larger key is a
larger value, and among equal values the lower index; keys are unique, so the top-k is taken by
k rounds of "max key, then drop it" (`_extract_topk`), and value and index are unpacked from the
winning keys. Empty slots carry the key INT64_MIN and come out as (-inf, -1).

segmented_topk(scores, seg_indptr, k, parents=None) -> (values, indices, kept_parents):
  scores [M] fp32; seg_indptr [S+1] int32 (segment s = scores[seg_indptr[s]:seg_indptr[s+1]]);
  parents [M] int32 or None -> values [S, k] fp32 (descending), indices [S, k] int32 (global
  indices into scores, -1 padding), kept_parents [S, k] int32 (parents[indices], -1 padding;
  None when parents is None). One program per segment; it takes k passes over its segment, which
  is fine for beam candidate sets (a few thousand entries).

logsoftmax_topk(logits, cum_logprobs, k) -> (scores, token_ids):
  logits [B, V] fp32/fp16/bf16 (vocab contiguous), cum_logprobs [B] fp32 -> scores [B, k] fp32 =
  cum_logprobs + log_softmax(logits) of the k best tokens (descending), token_ids [B, k] int32.
  Stage 1, grid (B, vocab tiles): each tile's max, sum of exp(x - max), and its own top-k keys.
  Stage 2, grid (B,): log-normaliser from the tile statistics, top-k over the tiles' candidates.
  The full log-softmax is never written to memory.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import FLOAT_DTYPES, GpuTarget, check_launchable, launch_target

INT64_MIN = -(2 ** 63)
SEG_BLOCK = 1024
VOCAB_TILE = 4096
VOCAB_TILE_INTERP = 256
MAX_K = 1024
# The reduce holds every tile's K_PAD candidates at once; past this many int64 keys even 32 warps
# (64 registers a thread) spill, so the vocabulary is cut into fewer, larger tiles.
MAX_REDUCE_KEYS = 16384
KEY_NONE = tl.constexpr(-(2 ** 63))  # empty slot
KEY_MAX = tl.constexpr(2 ** 63 - 1)


@triton.jit
def _pack_keys(x, idx):
    """fp32 values and int indices -> unique int64 keys ordered by (value, -index)."""
    bits = x.to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return ordered.to(tl.int64) * 4294967296 + (4294967295 - idx.to(tl.int64))


@triton.jit
def _unpack_keys(key):
    """Inverse of _pack_keys -> (fp32 value, int64 index); INT64_MIN -> (-inf, -1)."""
    valid = key != KEY_NONE
    ordered = (key >> 32).to(tl.int32)
    bits = tl.where(ordered >= 0, ordered, ordered ^ 0x7FFFFFFF)
    value = tl.where(valid, bits.to(tl.float32, bitcast=True), float("-inf"))
    idx = tl.where(valid, 4294967295 - (key & 4294967295), -1)
    return value, idx


@triton.jit
def _extract_topk(keys, K_PAD: tl.constexpr, K: tl.constexpr):
    """Top-K of a block of unique int64 keys by K rounds of max-and-drop; -> [K_PAD] keys, descending."""
    out = tl.full([K_PAD], KEY_NONE, tl.int64)
    slot = tl.arange(0, K_PAD)
    for j in range(K):
        best = tl.max(keys, 0)
        out = tl.where(slot == j, best, out)
        keys = tl.where(keys == best, KEY_NONE, keys)
    return out


@triton.jit
def _segmented_topk_kernel(
    scores_ptr, indptr_ptr, parents_ptr, val_ptr, idx_ptr, par_ptr,
    K: tl.constexpr, K_PAD: tl.constexpr, BLOCK: tl.constexpr, HAS_PARENTS: tl.constexpr,
):
    s = tl.program_id(0).to(tl.int64)
    lo = tl.load(indptr_ptr + s)
    hi = tl.load(indptr_ptr + s + 1)
    slot = tl.arange(0, K_PAD)
    res = tl.full([K_PAD], KEY_NONE, tl.int64)
    prev = tl.full([], KEY_MAX, tl.int64)
    # k passes: pass j finds the largest key strictly below the (j-1)-th winner.
    for j in range(K):
        best = tl.full([], KEY_NONE, tl.int64)
        for start in range(lo, hi, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            m = offs < hi
            x = tl.load(scores_ptr + offs, mask=m, other=0.0)
            keys = _pack_keys(x, offs)
            keys = tl.where(m & (keys < prev), keys, KEY_NONE)
            best = tl.maximum(best, tl.max(keys, 0))
        res = tl.where(slot == j, best, res)
        prev = best
    value, idx = _unpack_keys(res)
    kmask = slot < K
    tl.store(val_ptr + s * K + slot, value, mask=kmask)
    tl.store(idx_ptr + s * K + slot, idx.to(tl.int32), mask=kmask)
    if HAS_PARENTS:
        par = tl.load(parents_ptr + tl.maximum(idx, 0), mask=idx >= 0, other=-1)
        tl.store(par_ptr + s * K + slot, par, mask=kmask)


def segmented_topk_launch_config(k: int, has_parents: bool, target: GpuTarget) -> dict:
    """Every constexpr and launch option of `_segmented_topk_kernel`: the launcher and the compile
    check (kernels/compile_check.py) both take them from here."""
    return dict(K=k, K_PAD=triton.next_power_of_2(k), BLOCK=128 if target.interpreter else SEG_BLOCK,
                HAS_PARENTS=has_parents, num_warps=4, num_stages=3)


def _check_seg_args(scores, seg_indptr, k, parents):
    name = "segmented_topk"
    assert scores.dim() == 1 and scores.dtype == torch.float32, f"{name}: scores must be fp32 [M]"
    assert seg_indptr.dim() == 1 and seg_indptr.dtype == torch.int32 and seg_indptr.shape[0] >= 1, (
        f"{name}: seg_indptr must be int32 [S+1]")
    assert 1 <= k <= MAX_K, f"{name}: k must be in [1, {MAX_K}], got {k}"
    if parents is not None:
        assert parents.shape == scores.shape and parents.dtype == torch.int32, f"{name}: parents must be int32 [M]"


def segmented_topk(scores, seg_indptr, k: int, parents=None):
    """Top-k of each ragged segment of scores. Returns (values [S,k] fp32, indices [S,k] int32,
    kept_parents [S,k] int32 or None); -inf / -1 pad segments shorter than k; ties -> lower index."""
    _check_seg_args(scores, seg_indptr, k, parents)
    dev = check_launchable("segmented_topk", scores, seg_indptr, *([] if parents is None else [parents]))
    S = seg_indptr.shape[0] - 1
    values = torch.empty(S, k, device=dev, dtype=torch.float32)
    indices = torch.empty(S, k, device=dev, dtype=torch.int32)
    kept = torch.empty(S, k, device=dev, dtype=torch.int32) if parents is not None else None
    if S == 0:
        return values, indices, kept
    scores = scores.contiguous()
    _segmented_topk_kernel[(S,)](
        scores, seg_indptr.contiguous(), parents if parents is not None else seg_indptr, values, indices,
        kept if kept is not None else indices,
        **segmented_topk_launch_config(k, parents is not None, launch_target(dev)),
    )
    return values, indices, kept


def segmented_topk_ref(scores, seg_indptr, k: int, parents=None):
    """Pure-torch reference of `segmented_topk`: segments padded to [S, max_len] with -inf, one
    stable descending sort."""
    _check_seg_args(scores, seg_indptr, k, parents)
    dev = scores.device
    S = seg_indptr.shape[0] - 1
    ip = seg_indptr.long()
    lens = ip[1:] - ip[:-1]
    W = max(int(lens.max()) if S > 0 else 0, k)
    j = torch.arange(W, device=dev)
    valid = j[None, :] < lens[:, None]
    M = scores.shape[0]
    gidx = torch.where(valid, ip[:-1, None] + j[None, :], torch.full((), M, device=dev, dtype=torch.long))
    padded = torch.cat([scores, scores.new_full((1,), float("-inf"))])
    vals = padded[gidx]
    # Padding sits after every real entry of its row, so a stable descending sort keeps real
    # entries (even -inf ones) ahead of it and lower indices first among ties.
    perm = torch.sort(vals, dim=1, descending=True, stable=True).indices[:, :k]
    ok = valid.gather(1, perm)
    values = torch.where(ok, vals.gather(1, perm), torch.full((), float("-inf"), device=dev))
    indices = torch.where(ok, gidx.gather(1, perm), torch.full((), -1, device=dev, dtype=torch.long))
    kept = None
    if parents is not None:
        pp = torch.cat([parents, parents.new_full((1,), -1)])
        kept = pp[torch.where(ok, indices, torch.full((), M, device=dev, dtype=torch.long))]
    return values, indices.to(torch.int32), kept


@triton.jit
def _lsm_topk_tile_kernel(
    x_ptr, stat_ptr, cand_ptr, sx_b, V, num_tiles,
    K: tl.constexpr, K_PAD: tl.constexpr, TILE: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1)
    offs = t * TILE + tl.arange(0, TILE)
    m = offs < V
    x = tl.load(x_ptr + b * sx_b + offs, mask=m, other=float("-inf")).to(tl.float32)
    mx = tl.max(x, 0)
    mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
    se = tl.sum(tl.where(m, tl.exp(x - mx_safe), 0.0), 0)
    keys = tl.where(m, _pack_keys(x, offs), KEY_NONE)
    top = _extract_topk(keys, K_PAD, K)
    base = b * num_tiles + t
    tl.store(stat_ptr + base * 2, mx)
    tl.store(stat_ptr + base * 2 + 1, se)
    tl.store(cand_ptr + base * K_PAD + tl.arange(0, K_PAD), top)


@triton.jit
def _lsm_topk_reduce_kernel(
    stat_ptr, cand_ptr, cum_ptr, score_ptr, tok_ptr, num_tiles,
    K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    t = tl.arange(0, BLOCK_T)
    tm = t < num_tiles
    mx = tl.load(stat_ptr + (b * num_tiles + t) * 2, mask=tm, other=float("-inf"))
    se = tl.load(stat_ptr + (b * num_tiles + t) * 2 + 1, mask=tm, other=0.0)
    gm = tl.max(mx, 0)
    gm_safe = tl.where(gm == float("-inf"), 0.0, gm)
    total = tl.sum(tl.where(mx == float("-inf"), 0.0, se * tl.exp(mx - gm_safe)), 0)
    log_z = gm_safe + tl.log(total)
    c = tl.arange(0, BLOCK_T * K_PAD)
    keys = tl.load(cand_ptr + b * num_tiles * K_PAD + c, mask=c < num_tiles * K_PAD, other=KEY_NONE)
    top = _extract_topk(keys, K_PAD, K)
    value, idx = _unpack_keys(top)
    cum = tl.load(cum_ptr + b)
    slot = tl.arange(0, K_PAD)
    km = slot < K
    tl.store(score_ptr + b * K + slot, cum + (value - log_z), mask=km)
    tl.store(tok_ptr + b * K + slot, idx.to(tl.int32), mask=km)


def _warps_for_keys(num_keys: int) -> int:
    """Warps (4 to 32) for a block of int64 keys held in registers: the keys take at most half of
    a thread's registers (255, or 65,536 over the block's threads when fewer)."""
    warps = 4
    while warps < 32 and num_keys > warps * 32 * (min(255, 65536 // (32 * warps)) // 4):
        warps *= 2
    return warps


def lsm_topk_launch_configs(vocab: int, k: int, target: GpuTarget) -> tuple[dict, dict]:
    """Every constexpr and launch option of `_lsm_topk_tile_kernel` and of `_lsm_topk_reduce_kernel`
    (the launcher and the compile check both take them from here); the tile kernel's grid has
    cdiv(vocab, TILE) tiles."""
    k_pad = triton.next_power_of_2(k)
    tile = VOCAB_TILE_INTERP if target.interpreter else VOCAB_TILE
    tile = max(min(tile, triton.next_power_of_2(vocab)), k_pad,
               triton.next_power_of_2(triton.cdiv(vocab * k_pad, MAX_REDUCE_KEYS)))
    block_t = triton.next_power_of_2(triton.cdiv(vocab, tile))
    return (dict(K=k, K_PAD=k_pad, TILE=tile, num_warps=_warps_for_keys(tile), num_stages=3),
            dict(K=k, K_PAD=k_pad, BLOCK_T=block_t, num_warps=_warps_for_keys(block_t * k_pad), num_stages=3))


def _check_lsm_args(logits, cum_logprobs, k):
    name = "logsoftmax_topk"
    assert logits.dim() == 2 and logits.dtype in FLOAT_DTYPES, f"{name}: logits must be [B, V] fp32/fp16/bf16"
    assert logits.stride(1) == 1, f"{name}: logits' vocab dimension must be contiguous"
    B, V = logits.shape
    assert cum_logprobs.shape == (B,) and cum_logprobs.dtype == torch.float32, f"{name}: cum_logprobs must be fp32 [B={B}]"
    assert 1 <= k <= min(V, MAX_K), f"{name}: k must be in [1, min(V, {MAX_K})], got {k}"


def logsoftmax_topk(logits, cum_logprobs, k: int):
    """Fused cum_logprobs + log_softmax(logits) and its top-k per row.
    Returns (scores [B, k] fp32 descending, token_ids [B, k] int32); ties -> lower token id."""
    _check_lsm_args(logits, cum_logprobs, k)
    dev = check_launchable("logsoftmax_topk", logits, cum_logprobs)
    B, V = logits.shape
    scores = torch.empty(B, k, device=dev, dtype=torch.float32)
    tokens = torch.empty(B, k, device=dev, dtype=torch.int32)
    if B == 0:
        return scores, tokens
    tile_cfg, reduce_cfg = lsm_topk_launch_configs(V, k, launch_target(dev))
    num_tiles = triton.cdiv(V, tile_cfg["TILE"])
    stats = torch.empty(B, num_tiles, 2, device=dev, dtype=torch.float32)
    cand = torch.empty(B, num_tiles, tile_cfg["K_PAD"], device=dev, dtype=torch.int64)
    _lsm_topk_tile_kernel[(B, num_tiles)](logits, stats, cand, logits.stride(0), V, num_tiles, **tile_cfg)
    _lsm_topk_reduce_kernel[(B,)](stats, cand, cum_logprobs.contiguous(), scores, tokens, num_tiles, **reduce_cfg)
    return scores, tokens


def logsoftmax_topk_ref(logits, cum_logprobs, k: int):
    """Pure-torch reference of `logsoftmax_topk` (log_softmax + stable descending sort)."""
    _check_lsm_args(logits, cum_logprobs, k)
    lp = torch.log_softmax(logits.float(), dim=-1)
    vals, idx = torch.sort(lp, dim=-1, descending=True, stable=True)
    return cum_logprobs[:, None] + vals[:, :k], idx[:, :k].to(torch.int32)
