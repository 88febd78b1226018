"""Prefix-tree attention: the CPU path's attention over sequences that share ancestors.

In beam search the live beams of a problem form a tree: all share the prompt, siblings share
every earlier step, and only the current step is a beam's own. Plain paged attention gathers
each row's whole context; a one-level cascade reads once only what ALL of a group's rows share,
and after a few iterations most of each context is past that point. Here every run of blocks
that two or more rows share is read once, for exactly the rows that share it:

  plan_prefix_tree: sorts the rows by their block tables and cuts their contexts into segments,
                    the nodes of the rows' prefix trie: a run of full blocks shared by two or
                    more rows (read once, for all their queries) or a row's own remainder (its
                    leaf: the blocks no other row shares, its new tokens included; causal).
  tree_attention_torch: attends each segment's queries to its blocks, many segments per
                    batched call (segments bucketed by row count, length and query count), and
                    merges each token's partial results by log-sum-exp.
  SharedKVMemo:     keeps the shared segments' gathered keys and values from one forward to the
                    next: in a decode loop the tree's shared part does not change, so the prompt
                    and the parents' steps are gathered once per loop instead of once per token.

Rows may carry one new token (decode) or many (extend: a PRM step, a prompt), in one batch.
The result equals `paged_decode_attention_ref` / `paged_extend_attention_ref`. Sharing is read
from block ids: rows holding the same physical block at the same position share its keys.

Layouts: q [T, Hq, D] (row i's tokens are q[cu[i]:cu[i+1]], cu the prefix sum of q_lens);
k_cache/v_cache [num_blocks, block_size, Hkv, D]; block_tables [B, max_blocks];
context_lens [B] (this step's tokens included); q_lens [B] >= 1.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch

from .common import check_cache

_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


@dataclass
class SegmentBucket:
    """Segments of up to R rows, NB blocks and Qm queries per row, padded to one shape."""

    tokens: torch.Tensor  # [S, R * Qm] int64 query token index; padding points at token 0 (dropped)
    blocks: torch.Tensor  # [S, NB] int64 block ids; padding points at block 0 (masked)
    bias: torch.Tensor  # [S, 1, 1 or R * Qm, NB * block_size] fp32: 0 where a query may attend, else -inf
    by_group: dict = field(default_factory=dict)  # bias per GQA group size, built once per forward
    shared_key: tuple | None = None  # (shape, bytes) of the block ids, padding -1, when every segment is shared (SharedKVMemo)


class SharedKVMemo:
    """The gathered keys and values of shared segments, kept from one forward to the next.

    A decode loop plans the same tree step after step: only the leaves grow, while the prompt
    and the parents' steps stay shared. A block that two rows share is full and never written
    (a write into a shared block copies it first), so its gathered copy stays right until a
    block is freed, after which its id may be handed out again: the owner calls `clear()` on
    every free. Entries that the last forward did not use are dropped (`begin_forward`). Keys
    name the real block ids of each segment (padding apart). Memory: fp32 copies of every layer's
    shared segments, for at most the last forward and the current one."""

    def __init__(self):
        self._last, self._current = {}, {}
        self.hits = self.misses = 0

    def begin_forward(self) -> None:
        self._last, self._current = self._current, {}

    def clear(self) -> None:
        self._last, self._current = {}, {}

    def get(self, key, gather):
        kv = self._current.get(key)
        if kv is None:
            kv = self._last.get(key)
            if kv is None:
                kv = gather()
                self.misses += 1
            else:
                self.hits += 1
            self._current[key] = kv
        return kv


class DecodePlanCache:
    """The last decode-only plan, kept for the next decode step. While no row's blocks change,
    the next step's tree is the same and only the leaves' lengths grow by one: their masks are
    redrawn and everything else is reused. That holds between block boundaries for rows that
    decode in lockstep (the samples of one prompt); ragged rows (a beam tree) cross boundaries
    at different steps and are planned afresh. The key is the rows' whole block tables and
    block counts, so a stale entry cannot match."""

    def __init__(self):
        self.key = None
        self.tree: PrefixTree | None = None
        self.leaves: list = []  # (bucket index, member row per segment [S], kv positions [S, L])
        self.leaf_rows = self.leaf_b0 = None  # for the `own_tokens` count

    def replan(self, ctx: np.ndarray, block_size: int, device, memo) -> PrefixTree:
        buckets = list(self.tree.buckets)
        for k, rows, kv_pos in self.leaves:
            bias = np.where(kv_pos < ctx[rows][:, None], 0.0, -np.inf).astype(np.float32)[:, None, None]
            buckets[k] = replace(buckets[k], bias=torch.as_tensor(bias, device=device), by_group={})
        own = int((ctx[self.leaf_rows] - self.leaf_b0 * block_size).sum())
        return replace(self.tree, buckets=buckets, own_tokens=own, memo=memo)


@dataclass
class PrefixTree:
    buckets: list[SegmentBucket]
    num_tokens: int
    keep: torch.Tensor  # [C] int64: over all buckets' query slots in order, those of real tokens
    keep_tokens: torch.Tensor  # [C] int64: their token indices
    shared_tokens: int  # KV positions read once for several rows (for reports)
    own_tokens: int  # KV positions read for one row only
    memo: SharedKVMemo | None = None  # reuses the shared segments' gathered K/V across forwards


def _pow2s(n: np.ndarray) -> np.ndarray:
    """The smallest power of two >= each n (1 for n <= 1)."""
    return np.left_shift(1, np.ceil(np.log2(np.maximum(n, 1))).astype(np.int64))


def _attend(q, k, v, bias, scale):
    """q [S, H, M, D], k/v [S, H, L, D] fp32, bias [S, 1, 1 or M, L] (every query may attend at
    least one position) -> out [S, H, M, D], lse [S, H, M]. On the CPU through its fused
    flash-attention op, which returns the log-sum-exp too; elsewhere, plain matrix products."""
    if q.device.type == "cpu" and _FLASH_CPU is not None:
        return _FLASH_CPU(q, k, v, 0.0, False, attn_mask=bias, scale=scale)[:2]
    s = torch.matmul(q, k.transpose(-1, -2)) * scale + bias
    lse = torch.logsumexp(s, dim=-1)
    return torch.matmul(torch.exp(s - lse[..., None]), v), lse


def _trie_segments(keyed: np.ndarray, nfull: np.ndarray):
    """Sorted row order, the trie's internal segments (first sorted row, last sorted row, first
    block, end block) and each sorted row's depth (blocks it shares with some other row)."""
    B = len(nfull)
    order = np.lexsort(keyed[:, ::-1].T) if keyed.shape[1] else np.arange(B)
    skeyed, snfull = keyed[order], nfull[order]
    lcp = np.zeros(max(B - 1, 0), dtype=np.int64)  # full blocks shared by sorted rows i, i + 1
    if B > 1:
        same = np.cumprod(skeyed[:-1] == skeyed[1:], axis=1).sum(axis=1)
        lcp = np.minimum(same, np.minimum(snfull[:-1], snfull[1:]))
    segments, stack = [], [(0, 0)]  # open intervals: (depth in blocks, first sorted row)
    for i in range(1, B + 1):
        cur = int(lcp[i - 1]) if i < B else 0
        first = i - 1
        while cur < stack[-1][0]:
            depth, first = stack.pop()
            segments.append((first, i - 1, max(stack[-1][0], cur), depth))
        if cur > stack[-1][0]:
            stack.append((cur, first))
    depth = np.zeros(B, dtype=np.int64)
    if B > 1:
        depth[:-1] = lcp
        depth[1:] = np.maximum(depth[1:], lcp)
    return order, segments, depth


def plan_prefix_tree(block_tables, context_lens, q_lens, block_size: int, device=None,
                     memo: SharedKVMemo | None = None, cache: DecodePlanCache | None = None) -> PrefixTree:
    """Cut the rows' contexts into the segments of their prefix trie and bucket them.
    block_tables [B, max_blocks], context_lens [B], q_lens [B]: numpy arrays or host tensors.
    `memo`: keep the shared segments' gathered K/V across forwards (its owner clears it when a
    block is freed). `cache`: reuse the last decode-only plan when only the lengths moved."""
    bt = np.asarray(block_tables, dtype=np.int64)
    ctx = np.asarray(context_lens, dtype=np.int64)
    ql = np.asarray(q_lens, dtype=np.int64)
    B = len(ctx)
    if len(ql) != B or bt.shape[0] != B:
        raise ValueError(f"block_tables, context_lens and q_lens must have one entry per row: "
                         f"{bt.shape[0]}, {B}, {len(ql)}")
    if (ql < 1).any() or (ctx < ql).any():
        raise ValueError("every row needs at least one new token (q_lens >= 1) and context_lens >= q_lens")
    cu = np.concatenate([[0], np.cumsum(ql)])
    T = int(cu[-1])
    # A row can share only full blocks that end before its first new token: its new tokens (and
    # a block they share with older tokens) are its own, so every row keeps a non-empty leaf.
    start = ctx - ql
    nfull = np.minimum(start // block_size, bt.shape[1])
    decode_only = cache is not None and B > 0 and bool((ql == 1).all())
    if decode_only:
        key = (bt.shape, bt.tobytes(), nfull.tobytes(), block_size, str(device))
        if cache.key == key:
            return cache.replan(ctx, block_size, device, memo)
        cache.key, cache.leaves = None, []
    keyed = np.where(np.arange(bt.shape[1])[None, :] < nfull[:, None], bt, -1)
    order, internal, depth = _trie_segments(keyed, nfull) if B else (np.zeros(0, np.int64), [], np.zeros(0, np.int64))

    # Segments: the internal nodes, then one leaf per row (its blocks past its depth). A segment's
    # rows are a run of the sorted rows: sorted rows first .. first + size - 1.
    seg_arr = np.asarray(internal, dtype=np.int64).reshape(-1, 4)
    first = np.concatenate([seg_arr[:, 0], np.arange(B)])
    size = np.concatenate([seg_arr[:, 1] - seg_arr[:, 0] + 1, np.ones(B, np.int64)])
    rep = order[first] if B else first  # a member, to read the blocks from
    b0 = np.concatenate([seg_arr[:, 2], depth])
    b1 = np.concatenate([seg_arr[:, 3], -(-ctx[order] // block_size)])
    leaf = np.arange(len(first)) >= len(seg_arr)
    # the most new tokens of a member: max over the run [first, first + size) of the sorted q_lens
    bounds = np.stack([first, first + size], axis=1).reshape(-1)
    qmax = np.maximum.reduceat(np.append(ql[order], 0), bounds)[::2] if B else np.zeros(0, np.int64)
    shared = int(((b1 - b0) * block_size)[~leaf].sum())
    own = int((ctx[rep] - b0 * block_size)[leaf].sum())
    # Bucket key: (rows, blocks, queries) rounded up to powers of two, as one int (lexicographic
    # order kept; np.unique over rows of a 2-D array is many times slower).
    code = (_pow2s(size) << 42) | (_pow2s(b1 - b0) << 21) | _pow2s(qmax)
    codes, bucket_of = np.unique(code, return_inverse=True)
    bucket_keys = np.stack([codes >> 42, (codes >> 21) & (2 ** 21 - 1), codes & (2 ** 21 - 1)], axis=1)

    buckets, slot_tokens, slot_valid = [], [], []
    for k, (R, _, _) in enumerate(bucket_keys.tolist()):
        segs = np.flatnonzero(bucket_of.reshape(-1) == k)
        S, NB, Qm = len(segs), int((b1 - b0)[segs].max()), int(qmax[segs].max())
        L = NB * block_size
        j = np.arange(R)[None, :]
        rows = np.where(j < size[segs][:, None], order[np.minimum(first[segs][:, None] + j, B - 1)], -1)
        present, rows = rows >= 0, np.maximum(rows, 0)
        t = np.arange(Qm)
        valid = present[:, :, None] & (t < ql[rows][:, :, None])  # [S, R, Qm]
        tokens = np.where(valid, cu[rows][:, :, None] + t, 0)
        j = np.arange(NB)[None, :]
        s0, s1, r = b0[segs][:, None], b1[segs][:, None], rep[segs][:, None]
        ids = np.where(j < s1 - s0, bt[r, np.minimum(s0 + j, bt.shape[1] - 1)], -1)  # padding -1
        blocks = np.maximum(ids, 0)  # padding read from block 0 (masked)
        kv_pos = s0 * block_size + np.arange(L)  # [S, L] absolute positions
        if leaf[segs].all() and Qm > 1:  # new tokens of one row each: causal, query t at start + t
            qpos = start[r] + np.minimum(t, ql[r] - 1)  # [S, Qm]
            allowed = kv_pos[:, None, :] <= qpos[:, :, None]
        else:  # full shared blocks (all seen by every query), or decode leaves up to the context
            end = np.where(leaf[segs][:, None], ctx[r], s1 * block_size)
            allowed = (kv_pos < end)[:, None, :]
        bias = np.where(allowed, 0.0, -np.inf).astype(np.float32)[:, None]
        # Shared segments (R >= 2: a leaf has one row) hold full blocks only, all seen by every
        # query. The key keeps padding -1, not block 0: block 0 may be a live block still being
        # written, and a later segment that really holds it must not match this one.
        shared_key = (ids.shape, ids.tobytes()) if R > 1 else None
        if decode_only and R == 1:
            cache.leaves.append((len(buckets), r[:, 0], kv_pos))
        buckets.append(SegmentBucket(torch.as_tensor(tokens.reshape(S, R * Qm), device=device),
                                     torch.as_tensor(blocks, device=device), torch.as_tensor(bias, device=device),
                                     shared_key=shared_key))
        slot_tokens.append(tokens.reshape(-1))
        slot_valid.append(valid.reshape(-1))
    slot_tokens = np.concatenate(slot_tokens) if slot_tokens else np.zeros(0, np.int64)
    slot_valid = np.concatenate(slot_valid) if slot_valid else np.zeros(0, bool)
    tree = PrefixTree(buckets, T, torch.as_tensor(np.flatnonzero(slot_valid), device=device),
                      torch.as_tensor(slot_tokens[slot_valid], device=device), shared, own, memo)
    if decode_only:
        cache.key, cache.tree, cache.leaf_rows, cache.leaf_b0 = key, tree, rep[leaf], b0[leaf]
    return tree


def _bias_for_group(bucket: SegmentBucket, g: int) -> torch.Tensor:
    """The bucket's bias over queries ordered (row, token, GQA head): each row of it g times."""
    if bucket.bias.shape[2] == 1:
        return bucket.bias
    if g not in bucket.by_group:
        bucket.by_group[g] = bucket.bias.repeat_interleave(g, dim=2)
    return bucket.by_group[g]


def tree_attention_torch(q, k_cache, v_cache, tree: PrefixTree, scale, out=None):
    """Attention of every new token over its row's paged context, each shared segment read once
    (see the module docstring). q [T, Hq, D]; returns out [T, Hq, D] (q.dtype)."""
    check_cache("tree_attention", k_cache, v_cache)
    assert q.dim() == 3 and q.shape[2] == k_cache.shape[3] and q.shape[1] % k_cache.shape[2] == 0, (
        f"tree_attention: q must be [T, Hq, D] with D = {k_cache.shape[3]} and Hq a multiple of "
        f"{k_cache.shape[2]} kv heads, got {tuple(q.shape)}")
    assert out is None or out.shape == q.shape, f"tree_attention: out {tuple(out.shape)} != q {tuple(q.shape)}"
    T, Hq, D = q.shape
    if tree.num_tokens != T:
        raise ValueError(f"the prefix tree was planned for {tree.num_tokens} tokens, got {T}")
    bs, Hkv = k_cache.shape[1], k_cache.shape[2]
    g = Hq // Hkv
    if out is None:
        out = torch.empty_like(q)
    if T == 0:
        return out
    qf = q.float().view(T, Hkv, g, D)
    outs, lses = [], []
    for bucket in tree.buckets:
        S, M = bucket.tokens.shape
        L = bucket.blocks.shape[1] * bs
        # index_select along dim 0: several times faster on the CPU than advanced indexing
        qs = qf.index_select(0, bucket.tokens.view(-1)).view(S, M, Hkv, g, D).permute(0, 2, 1, 3, 4).reshape(S, Hkv, M * g, D)

        def gather(blocks=bucket.blocks.view(-1), S=S, L=L):
            return (k_cache.index_select(0, blocks).view(S, L, Hkv, D).float().transpose(1, 2),
                    v_cache.index_select(0, blocks).view(S, L, Hkv, D).float().transpose(1, 2))

        if tree.memo is not None and bucket.shared_key is not None:
            k, v = tree.memo.get((k_cache.data_ptr(), v_cache.data_ptr(), bucket.shared_key), gather)
        else:
            k, v = gather()
        o, lse = _attend(qs, k, v, _bias_for_group(bucket, g), scale)  # [S, Hkv, M*g, D], [S, Hkv, M*g]
        outs.append(o.view(S, Hkv, M, g, D).permute(0, 2, 1, 3, 4).reshape(S * M, Hq, D))
        lses.append(lse.view(S, Hkv, M, g).permute(0, 2, 1, 3).reshape(S * M, Hq))
    tokens = tree.keep_tokens
    o, lse = torch.cat(outs).index_select(0, tree.keep), torch.cat(lses).index_select(0, tree.keep)
    # Merge each token's segments: weights exp(lse - the token's largest lse).
    top = torch.zeros(T, Hq, device=q.device).scatter_reduce_(0, tokens[:, None].expand(-1, Hq), lse, "amax",
                                                              include_self=False)
    w = torch.exp(lse - top.index_select(0, tokens))
    num = torch.zeros(T, Hq, D, device=q.device).index_add_(0, tokens, o * w[..., None])
    den = torch.zeros(T, Hq, device=q.device).index_add_(0, tokens, w)
    out.copy_((num / den[..., None]).to(out.dtype))
    return out
