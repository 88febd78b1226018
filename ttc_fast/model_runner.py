"""The model runner: one forward over a ragged batch of sequences in the paged cache.

It owns the model, the KV pool, the C++ block manager and the attention backend. A forward takes
(sequence, new tokens) pairs, reserves their slots (copy-on-write of shared partial blocks
included), builds the attention metadata once, runs the decoder and returns logits (and hidden
states on request) only at the requested token rows.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from . import kernels as K
from .attention import AttentionBackend
from .block_manager import BlockManager
from .cuda_graphs import DecodeGraphs
from .kv_pool import KVPool, plan_num_blocks
from .loader import LoadedModel


class PackedTokens(NamedTuple):
    """The new tokens of a forward as one array: sequence i's are the next counts[i] of flat.
    Overlapped decoding passes tokens not yet known on the host as -1 in `flat` (the block
    manager's unknown token) and the model's input ids, all of them, as `device`."""

    flat: np.ndarray
    counts: np.ndarray
    device: torch.Tensor | None = None


def _runs_index(counts: np.ndarray, order: np.ndarray) -> np.ndarray | None:
    """Index that puts the runs of counts[i] tokens of a flat array in `order` (None: already)."""
    if len(order) == 0 or (order == np.arange(len(order))).all():
        return None
    starts = np.zeros(len(counts), dtype=np.int64)
    np.cumsum(counts[:-1], out=starts[1:])
    lens = counts[order]
    run_begin = np.zeros(len(order), dtype=np.int64)
    np.cumsum(lens[:-1], out=run_begin[1:])
    return np.repeat(starts[order] - run_begin, lens) + np.arange(int(lens.sum()))


def _take(flat: np.ndarray, device_ids, index):
    if index is None:
        return flat, device_ids
    return flat[index], None if device_ids is None else device_ids[torch.as_tensor(index, device=device_ids.device)]


@dataclass
class ForwardOutput:
    logits: torch.Tensor | None  # [R, vocab] fp32, rows in request order
    hidden: torch.Tensor | None  # [R, hidden]
    row_starts: np.ndarray  # rows of request i are row_starts[i] : row_starts[i + 1]


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
        cuda_graphs: bool = False,
        cuda_graph_max_batch: int = 256,
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
        self.decode_plan_cache = K.DecodePlanCache()  # the last decode step's plan, for the next
        self.graphs = None
        if cuda_graphs:
            if self.device.type == "cuda" and self.attention.name != "triton":
                raise ValueError("cuda_graphs needs the triton attention backend on CUDA")
            self.graphs = DecodeGraphs(self, cuda_graph_max_batch)

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
        if self.graphs is not None:
            self.graphs.reset()  # the captured graphs point at the old pool

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

    def free_many(self, seqs: list[int]) -> None:
        """`free` of each, in one call."""
        if seqs:
            self.blocks.free_many(np.asarray(seqs, dtype=np.int64))
            self.shared_kv_memo.clear()

    def seq_len(self, seq: int) -> int:
        return self.blocks.seq_len(seq)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # --- forward -------------------------------------------------------------------------------
    def forward(
        self,
        seqs,
        tokens: list[list[int]],
        output_offsets=None,
        want_logits: bool = True,
        want_hidden: bool = False,
    ) -> ForwardOutput:
        """Append `tokens[i]` to sequence `seqs[i]` (a list or an int64 array) and run them
        through the model. `tokens`: a list of token lists, or `PackedTokens`.

        output_offsets: None (the last token of every sequence), a list per sequence of offsets
        within tokens[i] whose outputs are wanted, or an int64 array with one offset per sequence
        (-1: none), the engine's form. Raises OutOfBlocks, with nothing changed, when the pool
        is full.
        """
        seqs = np.asarray(seqs, dtype=np.int64)
        device_ids = None
        if isinstance(tokens, PackedTokens):
            flat, counts = np.asarray(tokens.flat, dtype=np.int64), np.asarray(tokens.counts, dtype=np.int64)
            if counts.sum() != len(flat) or (tokens.device is not None and len(tokens.device) != len(flat)):
                raise ValueError(f"packed tokens: counts sum to {counts.sum()} but {len(flat)} tokens are given")
            device_ids = tokens.device
        else:
            counts = np.fromiter(map(len, tokens), dtype=np.int64, count=len(tokens))
            flat = np.fromiter(itertools.chain.from_iterable(tokens), dtype=np.int64, count=int(counts.sum()))
        if len(seqs) != len(counts):
            raise ValueError(f"{len(seqs)} sequences but {len(counts)} token lists")
        if len(seqs) == 0 or (counts == 0).any():
            raise ValueError("every sequence in a forward needs at least one new token")
        # Validate everything before reserving slots: a reserved slot joins the prefix cache.
        out_seq, out_off = self._output_positions(output_offsets, counts)
        limit = self.config.max_context
        over = np.flatnonzero(self.blocks.seq_lens(seqs) + counts > limit)
        if len(over):
            i = int(over[0])
            raise ValueError(f"sequence {seqs[i]} would reach {self.blocks.seq_len(int(seqs[i])) + counts[i]} tokens; "
                             f"the model attends over at most {limit}")

        # Decode rows (one token) first, then extend rows; the backend's plan may reorder decodes.
        order = np.concatenate([np.flatnonzero(counts == 1), np.flatnonzero(counts > 1)])
        ordered_seqs = seqs[order]
        flat, device_ids = _take(flat, device_ids, _runs_index(counts, order))
        offsets = np.zeros(len(order) + 1, dtype=np.int64)
        np.cumsum(counts[order], out=offsets[1:])
        slots, copies = self.blocks.append_batch(ordered_seqs, flat, offsets)
        if len(copies):
            self.attention.copy_blocks(self.pool.kv, torch.as_tensor(np.asarray(copies, dtype=np.int32).reshape(-1, 2), device=self.device))
        tables, ctx = self.blocks.block_tables(ordered_seqs)
        if self._static_decode(counts, out_seq, out_off, want_logits, want_hidden):
            # A decode step with every row's logits: from the static buffers (cuda_graphs.py).
            # Rows are in the caller's order: with one token each, `order` is the identity.
            logits = self.graphs.run(flat if device_ids is None else device_ids, ctx.astype(np.int64) - 1, slots,
                                     tables, ctx)
            return ForwardOutput(logits, None, np.arange(len(seqs) + 1))
        if self.attention.uses_prefix_tree:
            self.shared_kv_memo.begin_forward()
        plan = self.attention.plan(tables, ctx, counts[order], slots, self.block_size, self.device, memo=self.shared_kv_memo,
                                   plan_cache=self.decode_plan_cache)
        cu, ordered_counts = plan.cu_q_lens, counts[order][plan.perm]
        flat, device_ids = _take(flat, device_ids, _runs_index(counts[order], plan.perm))
        order = order[plan.perm]
        starts = np.repeat(plan.context_lens.astype(np.int64) - ordered_counts, ordered_counts)
        positions = starts + np.arange(cu[-1]) - np.repeat(cu[:-1], ordered_counts)

        # Output rows, in the caller's order.
        where = np.empty(len(order), dtype=np.int64)
        where[order] = cu[:-1]
        rows = where[out_seq] + out_off
        row_starts = np.zeros(len(seqs) + 1, dtype=np.int64)
        np.cumsum(np.bincount(out_seq, minlength=len(seqs)), out=row_starts[1:])

        dev = self.device
        logits, hidden = self.model.module(
            torch.from_numpy(flat).to(dev) if device_ids is None else device_ids.to(dev),
            torch.from_numpy(positions).to(dev),
            self.pool.kv,
            self.attention,
            plan.meta,
            torch.from_numpy(rows).to(dev),
            want_logits=want_logits,
            want_hidden=want_hidden,
        )
        return ForwardOutput(logits, hidden, row_starts)

    def _static_decode(self, counts, out_seq, out_off, want_logits, want_hidden) -> bool:
        graphs = self.graphs
        n = len(counts)
        return (graphs is not None and want_logits and not want_hidden and n <= graphs.max_batch
                and bool((counts == 1).all()) and len(out_seq) == n and not out_off.any()
                and bool((out_seq == np.arange(n)).all()))

    @staticmethod
    def _output_positions(output_offsets, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(sequence index, offset) of every wanted output, grouped by sequence in order."""
        if output_offsets is None:
            return np.arange(len(counts)), counts - 1
        if isinstance(output_offsets, np.ndarray):
            if output_offsets.shape != counts.shape:
                raise ValueError(f"{len(counts)} sequences but {len(output_offsets)} output offsets")
            bad = np.flatnonzero((output_offsets < -1) | (output_offsets >= counts))
            if len(bad):
                i = int(bad[0])
                raise ValueError(f"output offset {output_offsets[i]} is outside the {counts[i]} new tokens of request {i}")
            seq = np.flatnonzero(output_offsets >= 0)
            return seq, output_offsets[seq].astype(np.int64)
        if len(output_offsets) != len(counts):
            raise ValueError(f"{len(counts)} sequences but {len(output_offsets)} output offset lists")
        seq, off = [], []
        for i, offsets in enumerate(output_offsets):
            for o in offsets:
                if not 0 <= o < counts[i]:
                    raise ValueError(f"output offset {o} is outside the {counts[i]} new tokens of request {i}")
                seq.append(i)
                off.append(o)
        return np.asarray(seq, dtype=np.int64), np.asarray(off, dtype=np.int64)
