"""Decode steps from static buffers at a few batch sizes, replayed as CUDA graphs.

A decode step of n sequences runs at the smallest bucket B >= n (1, 2, 4, ... up to
`max_batch`): its inputs are copied into static buffers, and rows n..B-1 are padding (slot -1,
so nothing is stored; one position of block 0, attended and discarded). On CUDA the bucket's
graph, captured on first use, replays every kernel of the forward in one launch. The decode
kernel's split-KV scratch is allocated here, once, sized for the longest context, and handed to
the kernel through the metadata (kernels allocate nothing inside a graph); the number of splits is
fixed per bucket at capture. On the CPU the same buffers and padding are used and the forward runs
eagerly: with the triton backend (the interpreter) exactly the forward a graph captures, static
metadata included; with the torch backend planned like any other forward.

Static memory: `nbytes` (the buffers, allocated with the engine) plus, on CUDA, the graphs'
private pool (the activations of one decode forward per bucket, sharing one pool); the memory
plan reserves both (`memory_plan.plan_device_memory`).
"""
from __future__ import annotations

import numpy as np
import torch

from . import kernels as K
from .attention import AttentionMetadata

DEFAULT_MAX_BATCH = 256


def buckets_up_to(max_batch: int) -> list[int]:
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return out + [max_batch]


class DecodeGraphs:
    def __init__(self, runner, max_batch: int = DEFAULT_MAX_BATCH):
        if max_batch < 1:
            raise ValueError(f"cuda_graph_max_batch must be >= 1, got {max_batch}")
        self.runner, self.max_batch = runner, max_batch
        self.buckets = buckets_up_to(max_batch)
        cfg, dev = runner.config, runner.device
        self.width = -(-cfg.max_context // runner.block_size)  # block-table columns at the longest context
        B = max_batch
        self.input_ids = torch.zeros(B, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(B, dtype=torch.int64, device=dev)
        self.slots = torch.full((B,), -1, dtype=torch.int32, device=dev)
        self.tables = torch.zeros(B, self.width, dtype=torch.int32, device=dev)
        self.context_lens = torch.ones(B, dtype=torch.int32, device=dev)
        self.cu_q_lens = torch.arange(B + 1, dtype=torch.int32, device=dev)
        self.rows = torch.arange(B, dtype=torch.int64, device=dev)
        self.triton = runner.attention.name == "triton"
        # Split-KV scratch of the decode kernel: [B, Hq, splits, D] outputs and [B, Hq, splits] lse.
        self.splits = {b: self._num_splits(b) for b in self.buckets}
        most = max(b * s for b, s in self.splits.items()) if self.triton else 0
        split = max(self.splits.values()) > 1
        self.scratch_out = torch.empty(most * cfg.num_heads * cfg.head_dim * split, dtype=torch.float32, device=dev)
        self.scratch_lse = torch.empty(most * cfg.num_heads, dtype=torch.float32, device=dev)
        self.graphs: dict[int, tuple] = {}  # bucket -> (CUDAGraph, its logits)
        self.pool = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.input_ids, self.positions, self.slots, self.tables,
                                                           self.context_lens, self.cu_q_lens, self.rows,
                                                           self.scratch_out, self.scratch_lse))

    def _num_splits(self, batch: int) -> int:
        if self.runner.device.type != "cuda":
            return 1
        cfg = self.runner.config
        return K.auto_num_splits(cfg.max_context, batch, cfg.num_kv_heads, self.runner.device)

    def reset(self) -> None:
        """Drop the captured graphs (they point at the KV pool: call when it is reallocated)."""
        self.graphs.clear()
        self.pool = None

    def bucket(self, n: int) -> int | None:
        return next((b for b in self.buckets if b >= n), None)

    def run(self, input_ids, positions: np.ndarray, slots: np.ndarray, tables: np.ndarray,
            context_lens: np.ndarray) -> torch.Tensor:
        """Logits [n, vocab] of a decode step of n sequences (input_ids: a device tensor or a
        numpy array). On CUDA the result is a view of the graph's output, valid until the next
        replay of that bucket."""
        n, w = len(context_lens), tables.shape[1]
        B = self.bucket(n)
        if B is None or w > self.width:
            raise ValueError(f"a decode step of {n} sequences and {w} blocks does not fit the static buffers "
                             f"({self.max_batch} sequences, {self.width} blocks)")
        dev = self.runner.device
        ids = input_ids if isinstance(input_ids, torch.Tensor) else torch.from_numpy(np.asarray(input_ids))
        self.input_ids[:n].copy_(ids.to(dev, non_blocking=True))
        self.positions[:n].copy_(torch.from_numpy(positions), non_blocking=True)
        self.slots[:n].copy_(torch.from_numpy(slots.astype(np.int32, copy=False)), non_blocking=True)
        self.tables[:n, :w].copy_(torch.from_numpy(tables), non_blocking=True)
        self.tables[:n, w:] = 0
        self.context_lens[:n].copy_(torch.from_numpy(context_lens.astype(np.int32, copy=False)), non_blocking=True)
        # Padding rows: store nothing, attend to one position.
        self.input_ids[n:B] = 0
        self.positions[n:B] = 0
        self.slots[n:B] = -1
        self.tables[n:B] = 0
        self.context_lens[n:B] = 1
        if dev.type == "cuda":
            graph, logits = self.graphs.get(B) or self._capture(B)
            graph.replay()
            return logits[:n]
        if self.triton:  # the interpreter: the very forward a graph captures, run eagerly
            return self._forward_static(B)[:n]
        return self._forward_eager(B, tables, context_lens, slots)[:n]

    def _forward_static(self, B: int) -> torch.Tensor:
        """The bucket's forward on the static buffers and metadata: what a graph captures."""
        runner = self.runner
        return runner.model.module(self.input_ids[:B], self.positions[:B], runner.pool.kv, runner.attention,
                                   self._static_meta(B), self.rows[:B])[0]

    def _forward_eager(self, B: int, tables, context_lens, slots) -> torch.Tensor:
        """The CPU: the padded batch through an ordinary plan and forward."""
        n = len(context_lens)
        pad = B - n
        padded_tables = np.zeros((B, max(tables.shape[1], 1)), dtype=np.int32)
        padded_tables[:n, :tables.shape[1]] = tables
        ctx = np.concatenate([context_lens.astype(np.int32), np.ones(pad, dtype=np.int32)])
        slot_map = np.concatenate([slots.astype(np.int32), np.full(pad, -1, dtype=np.int32)])
        runner = self.runner
        plan = runner.attention.plan(padded_tables, ctx, np.ones(B, dtype=np.int64), slot_map, runner.block_size,
                                     runner.device, memo=None)
        perm = torch.as_tensor(plan.perm, device=runner.device)
        logits, _ = runner.model.module(self.input_ids[:B][perm], self.positions[:B][perm], runner.pool.kv,
                                        runner.attention, plan.meta, self.rows[:B])
        out = torch.empty_like(logits)
        out[perm] = logits  # rows back in the caller's order
        return out

    def _static_meta(self, B: int) -> AttentionMetadata:
        cfg = self.runner.config
        s, h, d = self.splits[B], cfg.num_heads, cfg.head_dim
        if s > 1:
            scratch = (self.scratch_out[:B * h * s * d].view(B, h, s, d), self.scratch_lse[:B * h * s].view(B, h, s))
        else:
            scratch = (None, self.scratch_lse[:B * h].view(B, h))
        return AttentionMetadata(
            slot_mapping=self.slots[:B], block_tables=self.tables[:B], context_lens=self.context_lens[:B],
            cu_q_lens=self.cu_q_lens[:B + 1], max_q_len=1, max_context_len=cfg.max_context, num_decode_seqs=B,
            max_decode_context_len=cfg.max_context, decode_num_splits=s, decode_scratch=scratch,
        )

    def _capture(self, B: int):
        runner = self.runner

        def forward():
            return self._forward_static(B)

        # Warm up on a side stream (Triton compiles, the allocator settles), then capture. The
        # static inputs hold padding or the current step; slots of padding store nothing.
        stream = torch.cuda.Stream(runner.device)
        stream.wait_stream(torch.cuda.current_stream(runner.device))
        with torch.cuda.stream(stream):
            forward()
        torch.cuda.current_stream(runner.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = forward()
        self.pool = graph.pool()
        self.graphs[B] = (graph, logits)
        return self.graphs[B]
