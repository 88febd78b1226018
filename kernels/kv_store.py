"""Store this step's K/V into the paged KV cache.

`store_kv(key, value, k_cache, v_cache, slot_mapping)` writes token t's K and V to cache slot
`slot_mapping[t]` (slot = block * block_size + offset) in place; slot -1 means "skip" (padding,
or a token whose KV is already cached).

Layouts:
  key, value:    [T, Hkv, D]                      fp32 / fp16 / bf16 (any strides)
  k_cache:       [num_blocks, block_size, Hkv, D] same dtype as key (any strides, written in place)
  v_cache:       [num_blocks, block_size, Hkv, D] same dtype
  slot_mapping:  [T] int32, -1 = skip

"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import check_cache, check_launchable

@triton.jit
def _store_kv_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    sk_t, sk_h, sk_d, sv_t, sv_h, sv_d,
    skc_b, skc_p, skc_h, svc_b, svc_p, svc_h,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    mask = (h[:, None] < NUM_HEADS) & (d[None, :] < HEAD_DIM) & (slot >= 0)
    k = tl.load(key_ptr + t * sk_t + h[:, None] * sk_h + d[None, :] * sk_d, mask=mask)
    v = tl.load(value_ptr + t * sv_t + h[:, None] * sv_h + d[None, :] * sv_d, mask=mask)
    tl.store(k_cache_ptr + blk * skc_b + off * skc_p + h[:, None] * skc_h + d[None, :], k, mask=mask)
    tl.store(v_cache_ptr + blk * svc_b + off * svc_p + h[:, None] * svc_h + d[None, :], v, mask=mask)


def store_kv_launch_config(num_heads: int, head_dim: int, block_size: int) -> dict:
    """Every constexpr and launch option of `_store_kv_kernel` (shared with the compile check)."""
    return dict(NUM_HEADS=num_heads, HEAD_DIM=head_dim, BLOCK_SIZE=block_size, BLOCK_H=triton.next_power_of_2(num_heads),
                BLOCK_D=triton.next_power_of_2(head_dim), num_warps=4, num_stages=3)


def _check_store_args(key, value, k_cache, v_cache, slot_mapping):
    check_cache("store_kv", k_cache, v_cache)
    assert key.dim() == 3 and value.shape == key.shape, (
        f"store_kv: key/value must be [T, Hkv, D] of one shape, got {tuple(key.shape)}, {tuple(value.shape)}")
    assert key.shape[1:] == k_cache.shape[2:], (
        f"store_kv: key heads/dim {tuple(key.shape[1:])} != cache {tuple(k_cache.shape[2:])}")
    assert key.dtype == value.dtype == k_cache.dtype, (
        f"store_kv: key/value dtype ({key.dtype}, {value.dtype}) must equal cache dtype {k_cache.dtype}")
    assert slot_mapping.dim() == 1 and slot_mapping.shape[0] == key.shape[0], (
        f"store_kv: slot_mapping must be [T={key.shape[0]}], got {tuple(slot_mapping.shape)}")
    assert slot_mapping.dtype == torch.int32, f"store_kv: slot_mapping must be int32, got {slot_mapping.dtype}"


def store_kv(key, value, k_cache, v_cache, slot_mapping) -> None:
    """Write key/value [T, Hkv, D] into k_cache/v_cache at slot_mapping (in place; -1 skips)."""
    _check_store_args(key, value, k_cache, v_cache, slot_mapping)
    check_launchable("store_kv", key, value, k_cache, v_cache, slot_mapping)
    T, H, D = key.shape
    if T == 0:
        return
    _store_kv_kernel[(T,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), key.stride(2), value.stride(0), value.stride(1), value.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        **store_kv_launch_config(H, D, k_cache.shape[1]),
    )


def store_kv_ref(key, value, k_cache, v_cache, slot_mapping) -> None:
    """Pure-torch reference of `store_kv` (same signature, in place)."""
    _check_store_args(key, value, k_cache, v_cache, slot_mapping)
    bs = k_cache.shape[1]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    blk, off = slots // bs, slots % bs
    k_cache[blk, off] = key[keep]
    v_cache[blk, off] = value[keep]
