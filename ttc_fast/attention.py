"""Attention metadata for one ragged batch, and the backend that stores K/V and attends.

Two backends run behind one interface: `torch` calls the pure-torch references in
`ttc_fast.kernels` (the CPU path), `triton` calls the Triton kernels (the CUDA path, or the CPU
under TRITON_INTERPRET=1). "auto" picks triton on CUDA and torch elsewhere.

Batch layout: decode sequences (one new token each) come first, then prefill/extend sequences.
The metadata is planned once per forward (`plan`) and shared by every layer (`forward`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from . import kernels as K
from .cpu_sampler import sample_cpu

BACKENDS = ("auto", "torch", "triton")
# The triton shared-prefix (cascade) decode path pays off only when a prefix is read by enough
# beams: min prefix tokens, min group size. The torch path reads every shared run once
# (prefix-tree attention, decode and extend rows alike), which costs nothing when nothing is shared.
CASCADE_MIN_PREFIX_TOKENS, CASCADE_MIN_GROUP_SIZE = 256, 4


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int32, -1 = do not store
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32
    context_lens: torch.Tensor  # [num_seqs] int32, KV length including this step's tokens
    cu_q_lens: torch.Tensor  # [num_seqs + 1] int32
    max_q_len: int
    max_context_len: int
    num_decode_seqs: int  # the first num_decode_seqs sequences (and tokens) are decode tokens
    # The torch path's plan of all rows: their prefix tree (kernels/tree_attention.py).
    prefix_tree: K.PrefixTree | None = None
    # Shared-prefix groups over the decode rows, when the triton cascade path is taken:
    group_indptr: torch.Tensor | None = None  # [num_groups + 1] int32
    prefix_lens: torch.Tensor | None = None  # [num_groups] int32
    # Host-side bounds of the decode rows, so kernels size their grids without a device sync.
    max_decode_context_len: int = 0
    max_group_rows: int = 0
    max_prefix_len: int = 0
    max_suffix_len: int = 0
    # Static decode (cuda_graphs.py): the split-KV factor fixed at capture and the caller's scratch.
    decode_num_splits: int | None = None
    decode_scratch: tuple | None = None


@dataclass
class BatchPlan:
    """`AttentionBackend.plan` of one forward: the row order it chose (`perm`, into the caller's
    decodes-first order), the rows' token offsets `cu_q_lens` [rows + 1] and `context_lens`
    [rows] on the host, in that order, and the metadata every layer reads."""

    perm: np.ndarray
    cu_q_lens: np.ndarray
    context_lens: np.ndarray
    meta: AttentionMetadata


def resolve_backend(name: str, device: torch.device) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: use one of {', '.join(BACKENDS)}")
    if name == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if name == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "backend='triton' on the CPU needs Triton's interpreter: set TRITON_INTERPRET=1 before "
            "importing ttc_fast, or use backend='torch'"
        )
    return name


class AttentionBackend:
    """Stores K/V into the paged pool and attends over each sequence's paged context."""

    def __init__(
        self,
        name: str,
        device: torch.device,
        use_cascade: bool = True,
        cascade_min_prefix_tokens: int | None = None,
        cascade_min_group_size: int | None = None,
    ):
        self.name = resolve_backend(name, device)
        self.use_cascade = use_cascade
        self.cascade_min_prefix_tokens = CASCADE_MIN_PREFIX_TOKENS if cascade_min_prefix_tokens is None else cascade_min_prefix_tokens
        self.cascade_min_group_size = CASCADE_MIN_GROUP_SIZE if cascade_min_group_size is None else cascade_min_group_size
        triton = self.name == "triton"
        self.store_kv = K.store_kv if triton else K.store_kv_ref
        self.copy_blocks = K.copy_blocks if triton else K.copy_blocks_ref
        self.decode = K.paged_decode_attention if triton else K.paged_decode_attention_ref
        self.cascade = K.cascade_decode_attention
        self.tree_attention = K.tree_attention_torch
        self.extend = K.paged_extend_attention if triton else K.paged_extend_attention_ref
        # The reference's draws; on the CPU through the filter that skips most of its noise.
        self.sample = K.sample if triton else (sample_cpu if torch.device(device).type == "cpu" else K.sample_ref)

    @property
    def uses_prefix_tree(self) -> bool:
        """The torch path attends over the rows' prefix tree (`plan_prefix_tree`)."""
        return self.use_cascade and self.name == "torch"

    def plan_prefix_tree(self, block_tables, context_lens, q_lens, block_size: int, device, memo=None,
                         plan_cache=None) -> K.PrefixTree:
        """block_tables, context_lens, q_lens: host arrays of every row of the forward; memo: a
        `SharedKVMemo` its caller clears whenever a block is freed; plan_cache: a
        `DecodePlanCache` its caller keeps from one forward to the next."""
        return K.plan_prefix_tree(block_tables, context_lens, q_lens, block_size, device=device, memo=memo,
                                  cache=plan_cache)

    def plan_decode_groups(self, block_tables, context_lens, block_size: int):
        """Order and groups of decode rows for the triton cascade path, or None for the plain
        path. block_tables, context_lens: host tensors of the decode rows."""
        if not self.use_cascade or self.name != "triton" or len(context_lens) < self.cascade_min_group_size:
            return None
        return K.plan_shared_prefix_groups(
            block_tables, context_lens, block_size,
            min_prefix_tokens=self.cascade_min_prefix_tokens, min_group_size=self.cascade_min_group_size,
        )

    def plan(self, block_tables: np.ndarray, context_lens: np.ndarray, q_lens: np.ndarray, slots: np.ndarray,
             block_size: int, device, memo=None, plan_cache=None) -> BatchPlan:
        """Once per forward, shared by every layer (FlashInfer's plan / run split): the metadata
        of a batch whose rows come decodes first. block_tables [rows, max_blocks], context_lens
        [rows], q_lens [rows] (new tokens), slots [tokens]: host arrays in that order. The triton
        cascade path may reorder the decode rows into shared-prefix groups (`BatchPlan.perm`);
        the torch path plans the rows' prefix tree (`memo`: a `SharedKVMemo` its caller clears
        whenever a block is freed; `plan_cache`: a `DecodePlanCache` the caller keeps)."""
        rows = len(q_lens)
        num_decode = int((q_lens == 1).sum())
        perm = np.arange(rows)
        group_indptr = prefix_lens = None
        groups = None
        if num_decode:
            groups = self.plan_decode_groups(torch.from_numpy(block_tables[:num_decode]),
                                             torch.from_numpy(context_lens[:num_decode]), block_size)
        if groups is not None:
            decode_perm, group_indptr, prefix_lens = (x.numpy() for x in groups)
            # Decode rows carry one token each, so the same permutation reorders tokens and slots.
            perm[:num_decode] = decode_perm
            block_tables, context_lens, q_lens = block_tables[perm], context_lens[perm], q_lens[perm]
            slots = np.concatenate([slots[:num_decode][decode_perm], slots[num_decode:]])
        prefix_tree = None
        if self.uses_prefix_tree:
            prefix_tree = self.plan_prefix_tree(block_tables, context_lens, q_lens, block_size, device, memo=memo,
                                                plan_cache=plan_cache)
        cu = np.zeros(rows + 1, dtype=np.int64)
        np.cumsum(q_lens, out=cu[1:])
        bounds = {"max_decode_context_len": int(context_lens[:num_decode].max()) if num_decode else 0}
        if group_indptr is not None:
            row_prefix = np.repeat(prefix_lens, np.diff(group_indptr))
            bounds.update(max_group_rows=int(np.diff(group_indptr).max()), max_prefix_len=int(prefix_lens.max()),
                          max_suffix_len=max(1, int((context_lens[:num_decode] - row_prefix).max())))
        meta = AttentionMetadata(
            slot_mapping=torch.as_tensor(slots, dtype=torch.int32).to(device),
            block_tables=torch.as_tensor(block_tables, dtype=torch.int32).to(device),
            context_lens=torch.as_tensor(context_lens, dtype=torch.int32).to(device),
            cu_q_lens=torch.as_tensor(cu, dtype=torch.int32).to(device),
            max_q_len=int(q_lens.max()),
            max_context_len=int(context_lens.max()),
            num_decode_seqs=num_decode,
            prefix_tree=prefix_tree,
            group_indptr=None if group_indptr is None else torch.as_tensor(group_indptr, dtype=torch.int32).to(device),
            prefix_lens=None if prefix_lens is None else torch.as_tensor(prefix_lens, dtype=torch.int32).to(device),
            **bounds,
        )
        return BatchPlan(perm, cu, context_lens, meta)

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """q: [T, Hq, D]; k, v: [T, Hkv, D]. Returns attention output [T, Hq, D]."""
        self.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        if meta.prefix_tree is not None:
            return self.tree_attention(q, k_cache, v_cache, meta.prefix_tree, scale)
        out = torch.empty_like(q)
        nd = meta.num_decode_seqs
        if nd > 0:
            tables, lens = meta.block_tables[:nd], meta.context_lens[:nd]
            if meta.group_indptr is not None:
                self.cascade(
                    q[:nd], k_cache, v_cache, tables, lens, meta.group_indptr, meta.prefix_lens, scale, out=out[:nd],
                    max_group_rows=meta.max_group_rows, max_prefix_len=meta.max_prefix_len, max_suffix_len=meta.max_suffix_len,
                )
            else:
                static = {} if meta.decode_num_splits is None else {"num_splits": meta.decode_num_splits,
                                                                      "scratch": meta.decode_scratch}
                self.decode(q[:nd], k_cache, v_cache, tables, lens, scale, out=out[:nd],
                            max_context_len=meta.max_decode_context_len, **static)
        if nd < meta.context_lens.shape[0]:
            cu = meta.cu_q_lens[nd:] - nd
            self.extend(
                q[nd:], k_cache, v_cache, meta.block_tables[nd:], cu, meta.context_lens[nd:],
                meta.max_q_len, scale, out=out[nd:],
            )
        return out
