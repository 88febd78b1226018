"""Pure-Python twin of the C++ `BlockManager` (see `ttc_fast.block_manager` for the API).

Same API, same errors and messages, and the same deterministic policy as csrc/block_manager.cpp,
so identical operation sequences give identical block ids, slots and copies: FIFO free list,
LRU eviction of unused cached blocks by tick, splitmix64-chained block hashes. It is the oracle
of tests/test_block_manager.py and the baseline of benchmarks/bench_block_manager.py; keep the
two implementations in lockstep.
"""
from __future__ import annotations

import operator
from collections import deque

import numpy as np

from ttc_fast._C import OutOfBlocks

__all__ = ["PyBlockManager", "OutOfBlocks", "hash_block", "HASH_SEED"]

_MASK = (1 << 64) - 1
HASH_SEED = 0x9E3779B97F4A7C15
_I32_MIN, _I32_MAX = -(1 << 31), (1 << 31) - 1


def _mix64(x: int) -> int:
    """splitmix64 finalizer on 64-bit unsigned ints (matches mix64 in block_manager.cpp)."""
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & _MASK
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & _MASK
    x ^= x >> 31
    return x


def hash_block(parent_hash: int, tokens) -> int:
    """Chained hash of a full block: parent block's hash (HASH_SEED for the first) + tokens."""
    h = _mix64((parent_hash + HASH_SEED) & _MASK)
    for t in tokens:
        h = _mix64(h ^ (t & 0xFFFFFFFF))
    return h


UNKNOWN_TOKEN = -1  # a slot reserved before its token is known (overlapped decoding)


def _as_tokens(tokens) -> list[int]:
    toks = [operator.index(t) for t in tokens]
    for t in toks:
        if t < _I32_MIN or t > _I32_MAX:
            raise ValueError(f"token {t} does not fit in int32")
    return toks


class _Block:
    __slots__ = ("ref", "tokens", "hash", "parent", "registered", "tick")

    def __init__(self):
        self.ref = 0
        self.tokens: list[int] = []  # tokens written so far
        self.hash = 0  # valid once full (and the prefix cache is on)
        self.parent = -1  # previous block of the sequence that filled it
        self.registered = False  # owns its key in _cached
        self.tick = 0  # last touch; LRU order while evictable


class _Seq:
    __slots__ = ("blocks", "len")

    def __init__(self, blocks=None, length=0):
        self.blocks: list[int] = blocks if blocks is not None else []
        self.len = length


class PyBlockManager:
    """Plain-Python block manager with exactly the C++ `BlockManager` semantics."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_cache: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if num_blocks * block_size > _I32_MAX:
            raise ValueError(f"num_blocks * block_size must fit in int32, got {num_blocks * block_size}")
        self._num_blocks = int(num_blocks)
        self._block_size = int(block_size)
        self._enable_prefix_cache = bool(enable_prefix_cache)
        self._blocks = [_Block() for _ in range(num_blocks)]
        self._free: deque[int] = deque(range(num_blocks))  # FIFO: pop left, push right
        # Evictable cached blocks (refcount 0, registered) -> tick. Ticks only grow, so dict
        # insertion order is tick order and the first key is the least recently touched.
        self._lru: dict[int, int] = {}
        self._cached: dict[int, int] = {}  # block hash -> registered block
        self._seqs: dict[int, _Seq] = {}
        self._next_seq = 0
        self._tick = 0
        self._used = 0
        self._shared = 0

    # ------------------------------------------------------------------ helpers
    def _get(self, seq: int) -> _Seq:
        s = self._seqs.get(seq)
        if s is None:
            raise KeyError(f"unknown sequence {seq}")
        return s

    def _new_blocks_for(self, length: int, n: int) -> int:
        if n <= 0:
            return 0
        bs = self._block_size
        off = length % bs
        room = 0 if off == 0 else bs - off
        if n <= room:
            return 0
        return (n - room + bs - 1) // bs

    def _out_of_blocks(self, need: int) -> OutOfBlocks:
        f, c = len(self._free), len(self._lru)
        return OutOfBlocks(f"need {need} blocks, only {f + c} available (free {f} + cached {c})")

    def _inc_ref(self, b: int, by: int = 1) -> None:
        blk = self._blocks[b]
        if by <= 0:
            return
        if blk.ref == 0:
            self._used += 1
        if blk.ref <= 1 < blk.ref + by:
            self._shared += 1
        blk.ref += by

    def _dec_ref(self, b: int) -> None:
        blk = self._blocks[b]
        if blk.ref == 2:
            self._shared -= 1
        blk.ref -= 1
        if blk.ref > 0:
            return
        self._used -= 1
        if blk.registered:
            self._tick += 1
            blk.tick = self._tick
            self._lru[b] = blk.tick
        else:
            blk.tokens = []
            blk.parent = -1
            self._free.append(b)

    def _allocate(self) -> int:
        if self._free:
            b = self._free.popleft()
        else:  # evict the least recently touched cached block
            b = next(iter(self._lru))
            del self._lru[b]
            blk = self._blocks[b]
            del self._cached[blk.hash]
            blk.registered = False
            blk.tokens = []
            blk.parent = -1
        self._inc_ref(b)
        return b

    def _on_block_full(self, s: _Seq, index: int) -> None:
        if not self._enable_prefix_cache:
            return
        b = s.blocks[index]
        blk = self._blocks[b]
        if UNKNOWN_TOKEN in blk.tokens:  # hashed when set_tokens completes it
            return
        blk.parent = s.blocks[index - 1] if index >= 1 else -1
        ph = self._blocks[blk.parent].hash if blk.parent >= 0 else HASH_SEED
        blk.hash = hash_block(ph, blk.tokens)
        if blk.hash not in self._cached:  # first writer wins
            self._cached[blk.hash] = b
            blk.registered = True

    def _append_unchecked(self, s: _Seq, toks: list[int], slots: list[int], copies: list) -> None:
        if not toks:
            return
        bs = self._block_size
        blocks = self._blocks
        if s.len % bs != 0:
            old = s.blocks[-1]
            if blocks[old].ref > 1:  # copy-on-write of the shared partial block
                nb = self._allocate()
                blocks[nb].tokens = list(blocks[old].tokens)
                self._dec_ref(old)
                s.blocks[-1] = nb
                copies.append((old, nb))
        for t in toks:
            off = s.len % bs
            if off == 0:
                s.blocks.append(self._allocate())
            b = s.blocks[-1]
            blocks[b].tokens.append(t)
            slots.append(b * bs + off)
            s.len += 1
            if off + 1 == bs:
                self._on_block_full(s, len(s.blocks) - 1)

    # ------------------------------------------------------------------ operations
    def new_sequence(self) -> int:
        sid = self._next_seq
        self._next_seq += 1
        self._seqs[sid] = _Seq()
        return sid

    def match_prefix(self, seq: int, tokens) -> int:
        toks = _as_tokens(tokens)
        s = self._get(seq)
        if s.len != 0 or s.blocks:
            raise ValueError(f"match_prefix needs an empty sequence; sequence {seq} has {s.len} tokens")
        n = len(toks)
        if not self._enable_prefix_cache or n <= 1:
            return 0
        bs = self._block_size
        parent, ph = -1, HASH_SEED
        for i in range((n - 1) // bs):
            chunk = toks[i * bs:(i + 1) * bs]
            b = self._cached.get(hash_block(ph, chunk))
            if b is None:
                break
            blk = self._blocks[b]
            if blk.parent != parent or blk.tokens != chunk:  # verify chain and content
                break
            if blk.ref == 0:
                del self._lru[b]
            self._inc_ref(b)
            self._tick += 1
            blk.tick = self._tick
            s.blocks.append(b)
            parent, ph = b, blk.hash
        s.len = len(s.blocks) * bs
        return s.len

    def blocks_needed(self, seq: int, n: int) -> int:
        s = self._get(seq)
        if n <= 0:
            return 0
        cow = s.len % self._block_size != 0 and self._blocks[s.blocks[-1]].ref > 1
        return int(cow) + self._new_blocks_for(s.len, n)

    def append(self, seq: int, tokens):
        toks = _as_tokens(tokens)
        s = self._get(seq)
        need = self.blocks_needed(seq, len(toks))
        if need > self.num_available_blocks:
            raise self._out_of_blocks(need)
        slots: list[int] = []
        copies: list[tuple[int, int]] = []
        self._append_unchecked(s, toks, slots, copies)
        return np.array(slots, dtype=np.int32), copies

    def append_batch(self, seqs, tokens):
        seqs = [operator.index(q) for q in seqs]
        if len(tokens) != len(seqs):
            raise ValueError(f"append_batch: {len(seqs)} sequences but {len(tokens)} token lists")
        toks = [_as_tokens(t) for t in tokens]
        ss = [self._get(q) for q in seqs]
        # Dry run (see append_batch in block_manager.cpp): pending refcount drops of shared
        # partial blocks, and each sequence's virtual length after its earlier batch entries.
        bs = self._block_size
        need = 0
        pending: dict[int, int] = {}
        vlen: dict[int, int] = {}
        for q, s, t in zip(seqs, ss, toks):
            n = len(t)
            if n == 0:
                continue
            if q not in vlen:
                vlen[q] = s.len
                if s.len % bs != 0:
                    b = s.blocks[-1]
                    if self._blocks[b].ref - pending.get(b, 0) > 1:
                        need += 1
                        pending[b] = pending.get(b, 0) + 1
            need += self._new_blocks_for(vlen[q], n)
            vlen[q] += n
        if need > self.num_available_blocks:
            raise self._out_of_blocks(need)
        slots: list[int] = []
        copies: list[tuple[int, int]] = []
        for s, t in zip(ss, toks):
            self._append_unchecked(s, t, slots, copies)
        return np.array(slots, dtype=np.int32), copies

    def _check_unknown(self, s: _Seq, seq: int, pos: int, what: str) -> None:
        blk = self._blocks[s.blocks[pos // self._block_size]]
        if blk.tokens[pos % self._block_size] != UNKNOWN_TOKEN or blk.ref != 1:
            raise ValueError(f"{what}: position {pos} of sequence {seq} is not an unknown token of a block it owns alone")

    def set_tokens(self, seqs, positions, tokens) -> None:
        seqs, positions, tokens = ([operator.index(x) for x in a] for a in (seqs, positions, tokens))
        if not len(seqs) == len(positions) == len(tokens):
            raise ValueError("set_tokens: seqs, positions and tokens must have the same length")
        for q, pos, t in zip(seqs, positions, tokens):
            s = self._get(q)
            if not 0 <= pos < s.len:
                raise ValueError(f"set_tokens: position {pos} is outside sequence {q} ({s.len} tokens)")
            self._check_unknown(s, q, pos, "set_tokens")
            if t < 0:
                raise ValueError("set_tokens: token ids must be >= 0")
        for q, pos, t in zip(seqs, positions, tokens):
            s = self._get(q)
            index = pos // self._block_size
            blk = self._blocks[s.blocks[index]]
            blk.tokens[pos % self._block_size] = t
            if len(blk.tokens) == self._block_size:
                self._on_block_full(s, index)

    def truncate(self, seq: int, n: int) -> None:
        s = self._get(seq)
        if not 0 <= n <= s.len:
            raise ValueError(f"truncate: cannot remove {n} of the {s.len} tokens of sequence {seq}")
        for i in range(n):
            self._check_unknown(s, seq, s.len - 1 - i, "truncate")
        for _ in range(n):
            b = s.blocks[-1]
            self._blocks[b].tokens.pop()
            s.len -= 1
            if not self._blocks[b].tokens:
                s.blocks.pop()
                self._dec_ref(b)

    def fork(self, parent: int, n: int) -> list[int]:
        if n < 0:
            raise ValueError(f"fork: n must be >= 0, got {n}")
        src = self._get(parent)
        if n == 0:
            return []
        for b in src.blocks:
            self._inc_ref(b, n)
        ids = []
        for _ in range(n):
            sid = self._next_seq
            self._next_seq += 1
            self._seqs[sid] = _Seq(list(src.blocks), src.len)
            ids.append(sid)
        return ids

    def free(self, seq: int) -> None:
        s = self._get(seq)
        del self._seqs[seq]
        for b in reversed(s.blocks):  # tail first: it gets the older tick, evicted first
            self._dec_ref(b)

    def free_many(self, seqs) -> None:
        seqs = [int(s) for s in seqs]
        seen = set()
        for s in seqs:
            self._get(s)
            if s in seen:
                raise ValueError(f"free_many: sequence {s} is listed twice")
            seen.add(s)
        for s in seqs:
            self.free(s)

    # ------------------------------------------------------------------ queries
    def block_table(self, seq: int) -> list[int]:
        return list(self._get(seq).blocks)

    def seq_len(self, seq: int) -> int:
        return self._get(seq).len

    def refcount(self, block: int) -> int:
        if block < 0 or block >= self._num_blocks:
            raise IndexError(f"block {block} out of range [0, {self._num_blocks})")
        return self._blocks[block].ref

    def block_tables(self, seqs, width: int = 0):
        if width < 0:
            raise ValueError("width must be >= 0")
        ss = [self._get(q) for q in seqs]
        w = max([width] + [len(s.blocks) for s in ss])
        tables = np.zeros((len(ss), w), dtype=np.int32)
        lens = np.zeros(len(ss), dtype=np.int32)
        for i, s in enumerate(ss):
            tables[i, :len(s.blocks)] = s.blocks
            lens[i] = s.len
        return tables, lens

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def enable_prefix_cache(self) -> bool:
        return self._enable_prefix_cache

    @property
    def num_sequences(self) -> int:
        return len(self._seqs)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._lru)

    @property
    def num_available_blocks(self) -> int:
        return len(self._free) + len(self._lru)

    @property
    def num_used_blocks(self) -> int:
        return self._used

    @property
    def num_shared_blocks(self) -> int:
        return self._shared

    def stats(self) -> dict:
        return {
            "num_blocks": self._num_blocks,
            "block_size": self._block_size,
            "num_sequences": self.num_sequences,
            "num_free_blocks": self.num_free_blocks,
            "num_cached_blocks": self.num_cached_blocks,
            "num_available_blocks": self.num_available_blocks,
            "num_used_blocks": self.num_used_blocks,
            "num_shared_blocks": self.num_shared_blocks,
        }

    # ------------------------------------------------------------------ maintenance
    def reset_prefix_cache(self) -> None:
        for b in self._lru:  # oldest first; in-use blocks stay registered
            blk = self._blocks[b]
            del self._cached[blk.hash]
            blk.registered = False
            blk.tokens = []
            blk.parent = -1
            self._free.append(b)
        self._lru.clear()

    def check_invariants(self) -> None:
        def fail(msg):
            raise RuntimeError("invariant: " + msg)

        bs = self._block_size
        counted = [0] * self._num_blocks
        for sid, s in self._seqs.items():
            nb = len(s.blocks)
            if nb != (s.len + bs - 1) // bs:
                fail(f"sequence {sid} has {nb} blocks for {s.len} tokens")
            for i, b in enumerate(s.blocks):
                if b < 0 or b >= self._num_blocks:
                    fail(f"sequence holds bad block {b}")
                counted[b] += 1
                filled = bs if i + 1 < nb else s.len - (nb - 1) * bs
                if len(self._blocks[b].tokens) != filled:
                    fail(f"block {b} holds {len(self._blocks[b].tokens)} tokens, sequence {sid} expects {filled}")
        used = shared = 0
        for b, blk in enumerate(self._blocks):
            if counted[b] != blk.ref:
                fail(f"block {b} refcount {blk.ref} but held by {counted[b]} sequences")
            used += blk.ref > 0
            shared += blk.ref > 1
        if used != self._used or shared != self._shared:
            fail("used/shared counters out of sync")
        seen = set()
        for b in self._free:
            if b in seen:
                fail(f"block {b} listed twice as free/cached")
            seen.add(b)
            if self._blocks[b].ref != 0 or self._blocks[b].registered:
                fail(f"free block {b} is in use or registered")
        for b, tick in self._lru.items():
            if b in seen:
                fail(f"block {b} listed twice as free/cached")
            seen.add(b)
            blk = self._blocks[b]
            if blk.ref != 0 or not blk.registered or blk.tick != tick:
                fail(f"cached block {b} is in use, unregistered or mis-ticked")
        if used + len(self._free) + len(self._lru) != self._num_blocks:
            fail("free + cached + used != num_blocks")
        if sum(blk.registered for blk in self._blocks) != len(self._cached):
            fail("registered flags != cache size")
        for h, b in self._cached.items():
            blk = self._blocks[b]
            if not blk.registered or blk.hash != h or len(blk.tokens) != bs:
                fail(f"cache entry for block {b} is stale")
