"""The model runner: one forward over a ragged batch of sequences in the paged cache.

It owns the model, the KV pool, the C++ block manager and the attention backend. A forward takes
(sequence, new tokens) pairs, reserves their slots (copy-on-write of shared partial blocks
included), builds the attention metadata once, runs the decoder and returns logits (and hidden
states on request) only at the requested token rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import kernels as K
from .attention import AttentionBackend
from .block_manager import BlockManager
from .kv_pool import KVPool, plan_num_blocks
from .loader import LoadedModel


@dataclass
class ForwardOutput:
    logits: torch.Tensor | None  # [R, vocab] fp32, rows in request order
    hidden: torch.Tensor | None  # [R, hidden]
    row_starts: list[int]  # rows of request i are row_starts[i] : row_starts[i + 1]


class ModelRunner:
    def __init__(
        self,
        model: LoadedModel,
        kv_cache_bytes: int | None = None,
        block_size: int = 16,
        backend: str | AttentionBackend = "auto",
        enable_prefix_cache: bool = True,
        num_blocks: int | None = None,
        gpu_memory_fraction: float = 0.9,
    ):
        if block_size < 1 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {block_size}")
        self.model = model
        self.config = model.config
        self.device = model.device
        self.block_size = block_size
        self.attention = backend if isinstance(backend, AttentionBackend) else AttentionBackend(backend, self.device)
        if num_blocks is None:
            num_blocks = plan_num_blocks(self.config, block_size, model.dtype, self.device, kv_cache_bytes, gpu_memory_fraction)
        self.pool = KVPool(self.config, num_blocks, block_size, model.dtype, self.device)
        self.enable_prefix_cache = enable_prefix_cache
        self.blocks = BlockManager(num_blocks, block_size, enable_prefix_cache)
        self.num_blocks = num_blocks
        # The shared segments' gathered K/V, reused across decode steps; valid until a block is freed.
        self.shared_kv_memo = K.SharedKVMemo()

    def reallocate(self, num_blocks: int) -> None:
        """A new pool of `num_blocks` blocks (and a new block manager) in place of the current
        one, whose memory is released first; no sequence may be live."""
        if self.blocks.num_sequences:
            raise ValueError(f"reallocate: {self.blocks.num_sequences} sequences are live in the pool")
        self.pool = self.blocks = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.pool = KVPool(self.config, num_blocks, self.block_size, self.model.dtype, self.device)
        self.blocks = BlockManager(num_blocks, self.block_size, self.enable_prefix_cache)
        self.num_blocks = num_blocks
        self.shared_kv_memo.clear()

    # --- sequences -----------------------------------------------------------------------------
    def new_sequence(self, prompt: list[int] | None = None) -> tuple[int, int]:
        """A new sequence; with `prompt`, the cached blocks its prefix matches are attached.
        Returns (sequence id, number of prompt tokens already in the cache)."""
        seq = self.blocks.new_sequence()
        cached = self.blocks.match_prefix(seq, prompt) if prompt else 0
        return seq, cached

    def fork(self, seq: int, n: int) -> list[int]:
        return list(self.blocks.fork(seq, n))

    def free(self, seq: int) -> None:
        """Free through here, never `self.blocks.free` directly: a freed block id may be reused,
        so the memo of gathered shared blocks is dropped."""
        self.blocks.free(seq)
        self.shared_kv_memo.clear()

    def seq_len(self, seq: int) -> int:
        return self.blocks.seq_len(seq)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # --- forward -------------------------------------------------------------------------------
    def forward(
        self,
        seqs: list[int],
        tokens: list[list[int]],
        output_offsets: list[list[int]] | None = None,
        want_logits: bool = True,
        want_hidden: bool = False,
    ) -> ForwardOutput:
        """Append `tokens[i]` to sequence `seqs[i]` and run them through the model.

        output_offsets[i] lists offsets within tokens[i] whose outputs are wanted (None: the last
        token of every sequence). Raises OutOfBlocks, with nothing changed, when the pool is full.
        """
        if len(seqs) != len(tokens):
            raise ValueError(f"{len(seqs)} sequences but {len(tokens)} token lists")
        counts = np.fromiter((len(t) for t in tokens), dtype=np.int64, count=len(tokens))
        if len(seqs) == 0 or (counts == 0).any():
            raise ValueError("every sequence in a forward needs at least one new token")
        if output_offsets is None:
            output_offsets = [[int(c) - 1] for c in counts]
        # Validate everything before reserving slots: a reserved slot joins the prefix cache.
        if len(output_offsets) != len(seqs):
            raise ValueError(f"{len(seqs)} sequences but {len(output_offsets)} output offset lists")
        for i, offsets in enumerate(output_offsets):
            for off in offsets:
                if not 0 <= off < counts[i]:
                    raise ValueError(f"output offset {off} is outside the {counts[i]} new tokens of request {i}")
        limit = self.config.max_context
        for seq, n in zip(seqs, counts):
            if self.blocks.seq_len(seq) + n > limit:
                raise ValueError(f"sequence {seq} would reach {self.blocks.seq_len(seq) + n} tokens; the model attends over at most {limit}")

        # Decode rows (one token) first, then extend rows; the backend's plan may reorder decodes.
        order = np.concatenate([np.flatnonzero(counts == 1), np.flatnonzero(counts > 1)])
        ordered_seqs = [seqs[i] for i in order]
        slots, copies = self.blocks.append_batch(ordered_seqs, [tokens[i] for i in order])
        if len(copies):
            self.attention.copy_blocks(self.pool.kv, torch.as_tensor(np.asarray(copies, dtype=np.int32).reshape(-1, 2), device=self.device))
        tables, ctx = self.blocks.block_tables(ordered_seqs)
        if self.attention.uses_prefix_tree:
            self.shared_kv_memo.begin_forward()
        plan = self.attention.plan(tables, ctx, counts[order], slots, self.block_size, self.device, memo=self.shared_kv_memo)
        order = order[plan.perm]
        cu, ordered_counts = plan.cu_q_lens, counts[order]
        starts = np.repeat(plan.context_lens.astype(np.int64) - ordered_counts, ordered_counts)
        positions = starts + np.arange(cu[-1]) - np.repeat(cu[:-1], ordered_counts)
        input_ids = np.fromiter((t for i in order for t in tokens[i]), dtype=np.int64, count=int(cu[-1]))

        # Output rows, in the caller's order.
        where = np.empty(len(order), dtype=np.int64)
        where[order] = cu[:-1]
        rows, row_starts = [], [0]
        for i, offsets in enumerate(output_offsets):
            rows += [where[i] + off for off in offsets]
            row_starts.append(len(rows))

        dev = self.device
        meta = plan.meta
        logits, hidden = self.model.module(
            torch.as_tensor(input_ids).to(dev),
            torch.as_tensor(positions).to(dev),
            self.pool.kv,
            self.attention,
            meta,
            torch.as_tensor(np.asarray(rows, dtype=np.int64)).to(dev),
            want_logits=want_logits,
            want_hidden=want_hidden,
        )
        return ForwardOutput(logits, hidden, row_starts)
