"""The KV pool: every layer's K and V blocks in one tensor, sized from a memory budget.

Layout `kv: [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]`; layer l's K and V
are the views `kv[l, 0]` and `kv[l, 1]` (`[num_blocks, block_size, num_kv_heads, head_dim]`), so
one block copy for copy-on-write moves that block in every layer in one launch.
"""
from __future__ import annotations

import torch

from .config import ModelConfig

DEFAULT_CPU_KV_BYTES = 256 << 20  # 256 MiB: CPU-sized models need little
DEFAULT_GPU_MEMORY_FRACTION = 0.9


def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.tensor([], dtype=dtype).element_size()
    return 2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim * elem


def plan_num_blocks(
    config: ModelConfig,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
    kv_cache_bytes: int | None = None,
    gpu_memory_fraction: float = DEFAULT_GPU_MEMORY_FRACTION,
) -> int:
    """How many blocks fit: `kv_cache_bytes` if given, else a fraction of free GPU memory (CUDA)
    or a fixed default (CPU)."""
    per_block = bytes_per_block(config, block_size, dtype)
    if kv_cache_bytes is None:
        if device.type == "cuda":
            if not 0 < gpu_memory_fraction <= 1:
                raise ValueError(f"gpu_memory_fraction must be in (0, 1], got {gpu_memory_fraction}")
            free, _ = torch.cuda.mem_get_info(device)
            kv_cache_bytes = int(free * gpu_memory_fraction)
        else:
            kv_cache_bytes = DEFAULT_CPU_KV_BYTES
    num_blocks = int(kv_cache_bytes) // per_block
    if num_blocks < 1:
        raise ValueError(
            f"kv_cache_bytes={kv_cache_bytes} holds no block: one block of {block_size} tokens takes "
            f"{per_block} bytes for this model; raise kv_cache_bytes"
        )
    return num_blocks


class KVPool:
    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device):
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (config.num_layers, 2, num_blocks, block_size, config.num_kv_heads, config.head_dim)
        try:
            # Zeroed, not empty: slots past a sequence's length are read (and masked) by padded
            # attention, and uninitialised memory may hold NaN, which masking cannot cancel.
            self.kv = torch.zeros(shape, dtype=dtype, device=device)
        except (RuntimeError, torch.OutOfMemoryError) as e:
            size = bytes_per_block(config, block_size, dtype) * num_blocks
            raise ValueError(f"cannot allocate a KV pool of {size / 2**30:.2f} GiB on {device}: {e}; lower kv_cache_bytes") from e

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.kv[index, 0], self.kv[index, 1]
