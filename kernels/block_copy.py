"""Copy whole KV blocks (copy-on-write of a forked sequence's partially filled last block).

`copy_blocks(kv, block_mapping)` copies block `src` to block `dst` for every (src, dst) row of
block_mapping, in every layer, for K and V, in one launch.

Layouts:
  kv:            [num_layers, 2, num_blocks, block_size, Hkv, D] fp32 / fp16 / bf16, written in
                 place; each block (the last three dims) must be contiguous.
  block_mapping: [C, 2] int32 rows (src, dst). dst blocks must be distinct and must not be any
                 src of the same call (copies run in parallel).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import FLOAT_DTYPES, GpuTarget, check_launchable, launch_target

# Elements copied per program iteration.
COPY_BLOCK = 4096


@triton.jit
def _copy_blocks_kernel(kv_ptr, map_ptr, s_layer, s_kv, s_block, NUMEL: tl.constexpr, BLOCK: tl.constexpr):
    c = tl.program_id(0)
    lk = tl.program_id(1).to(tl.int64)  # layer * 2 + (0 for K, 1 for V)
    chunk = tl.program_id(2)
    src = tl.load(map_ptr + 2 * c).to(tl.int64)
    dst = tl.load(map_ptr + 2 * c + 1).to(tl.int64)
    base = (lk // 2) * s_layer + (lk % 2) * s_kv
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < NUMEL
    x = tl.load(kv_ptr + base + src * s_block + offs, mask=mask)
    tl.store(kv_ptr + base + dst * s_block + offs, x, mask=mask)


def copy_blocks_launch_config(numel: int, target: GpuTarget) -> dict:
    """Every constexpr and launch option of `_copy_blocks_kernel` (shared with the compile check);
    the grid has cdiv(numel, BLOCK) chunks per block."""
    # the interpreter is slow: one program per block there
    block = triton.next_power_of_2(numel) if target.interpreter else min(COPY_BLOCK, triton.next_power_of_2(numel))
    return dict(NUMEL=numel, BLOCK=block, num_warps=4, num_stages=3)


def _check_copy_args(kv, block_mapping):
    assert kv.dim() == 6 and kv.shape[1] == 2, (
        f"copy_blocks: kv must be [L, 2, num_blocks, block_size, Hkv, D], got {tuple(kv.shape)}")
    assert kv.dtype in FLOAT_DTYPES, f"copy_blocks: kv dtype must be fp32/fp16/bf16, got {kv.dtype}"
    _, _, _, bs, h, d = kv.shape
    assert kv.stride(5) == 1 and kv.stride(4) == d and kv.stride(3) == h * d, (
        "copy_blocks: each block of kv (its last three dims) must be contiguous")
    assert block_mapping.dim() == 2 and block_mapping.shape[1] == 2, (
        f"copy_blocks: block_mapping must be [C, 2] (src, dst), got {tuple(block_mapping.shape)}")
    assert block_mapping.dtype == torch.int32, f"copy_blocks: block_mapping must be int32, got {block_mapping.dtype}"


def copy_blocks(kv, block_mapping) -> None:
    """Copy kv[:, :, src] -> kv[:, :, dst] for each (src, dst) row of block_mapping, in place."""
    _check_copy_args(kv, block_mapping)
    check_launchable("copy_blocks", kv, block_mapping)
    C = block_mapping.shape[0]
    if C == 0:
        return
    mapping = block_mapping if block_mapping.is_contiguous() else block_mapping.contiguous()
    L = kv.shape[0]
    numel = kv.shape[3] * kv.shape[4] * kv.shape[5]
    cfg = copy_blocks_launch_config(numel, launch_target(kv.device))
    grid = (C, 2 * L, triton.cdiv(numel, cfg["BLOCK"]))
    _copy_blocks_kernel[grid](kv, mapping, kv.stride(0), kv.stride(1), kv.stride(2), **cfg)


def copy_blocks_ref(kv, block_mapping) -> None:
    """Pure-torch reference of `copy_blocks` (same signature, in place)."""
    _check_copy_args(kv, block_mapping)
    if block_mapping.shape[0] == 0:
        return
    src = block_mapping[:, 0].long()
    dst = block_mapping[:, 1].long()
    kv[:, :, dst] = kv[:, :, src]
