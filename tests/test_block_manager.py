"""Tests of the paged KV-cache block manager: the C++ `BlockManager` against its pure-Python twin
`PyBlockManager` (identical policy, so identical block ids), plus a rule-by-rule unit suite run on
both. A simulated KV store checks that prefix hits, forks and copy-on-write give the right content.
"""
import numpy as np
import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from ttc_fast.block_manager import BlockManager, OutOfBlocks
from block_manager_ref import PyBlockManager

IMPLS = [BlockManager, PyBlockManager]


def _norm(x):
    """Make results comparable with ==: arrays -> (dtype, list), tuples/lists recursively."""
    if isinstance(x, np.ndarray):
        return (str(x.dtype), x.shape, x.tolist())
    if isinstance(x, (list, tuple)):
        return type(x).__name__, [_norm(v) for v in x]
    if isinstance(x, dict):
        return {k: _norm(v) for k, v in x.items()}
    return x


def _snapshot(m, seqs):
    return (m.stats(), {q: (m.block_table(q), m.seq_len(q)) for q in seqs},
            [m.refcount(b) for b in range(m.num_blocks)])


# ---------------------------------------------------------------------------------------------
# Differential stateful test: C++ vs Python oracle, with a simulated KV store.

class BlockManagerMachine(RuleBasedStateMachine):
    @initialize(num_blocks=st.integers(3, 14), block_size=st.integers(1, 4),
                cache=st.sampled_from([True, True, True, False]))
    def setup(self, num_blocks, block_size, cache):
        self.bs = block_size
        self.nb = num_blocks
        self.c = BlockManager(num_blocks, block_size, cache)
        self.p = PyBlockManager(num_blocks, block_size, cache)
        self.history = {}  # seq -> every token it holds, in order
        self.kv = np.full(num_blocks * block_size, -1, dtype=np.int64)  # slot -> token id

    # -- helpers
    def run_both(self, fn):
        """Run fn on both managers; assert identical results or identical exceptions."""
        results = []
        for m in (self.c, self.p):
            try:
                results.append(("ok", fn(m)))
            except Exception as e:  # compare the exception itself
                results.append(("err", type(e), str(e)))
        (kc, *rc), (kp, *rp) = results
        if kc == "ok" and kp == "ok":
            assert _norm(rc[0]) == _norm(rp[0])
            return True, rc[0]
        assert results[0] == results[1], results
        return False, results[0][1]

    def pick(self, i):
        live = sorted(self.history)
        return live[i % len(live)]

    def write_kv(self, slots, tokens, copies):
        bs = self.bs
        for src, dst in copies:  # copies first: they carry the pre-append content
            self.kv[dst * bs:(dst + 1) * bs] = self.kv[src * bs:(src + 1) * bs]
        self.kv[np.asarray(slots, dtype=np.int64)] = tokens

    def append_checked(self, seq, tokens):
        before = _snapshot(self.c, self.history)
        need = self.c.blocks_needed(seq, len(tokens))
        assert need == self.p.blocks_needed(seq, len(tokens))
        partial = self.c.seq_len(seq) % self.bs != 0
        shared_partial = partial and self.c.refcount(self.c.block_table(seq)[-1]) > 1
        old_last = self.c.block_table(seq)[-1] if partial else None
        ok, res = self.run_both(lambda m: m.append(seq, tokens))
        if not ok:
            assert res is OutOfBlocks
            event("append: OutOfBlocks")
            assert need > before[0]["num_available_blocks"]
            assert _snapshot(self.c, self.history) == before  # atomic
            return
        slots, copies = res
        assert len(slots) == len(tokens) and slots.dtype == np.int32
        expect_cow = bool(tokens) and shared_partial
        assert [s for s, _ in copies] == ([old_last] if expect_cow else [])
        if copies:
            event("append: copy-on-write")
        if self.c.num_cached_blocks < before[0]["num_cached_blocks"] and self.c.num_free_blocks == 0:
            event("append: evicted a cached block")
        assert before[0]["num_available_blocks"] - self.c.num_available_blocks == need
        self.write_kv(slots, tokens, copies)
        self.history[seq] = self.history[seq] + list(tokens)

    # -- rules
    @rule(prompt=st.lists(st.integers(0, 1), max_size=12), match=st.booleans())
    def new_prompt(self, prompt, match):
        ok, seq = self.run_both(lambda m: m.new_sequence())
        assert ok
        self.history[seq] = []
        n = 0
        if match:
            ok, n = self.run_both(lambda m: m.match_prefix(seq, prompt))
            assert ok
            assert n % self.bs == 0 and (n < len(prompt) or n == 0)
            if not self.c.enable_prefix_cache:
                assert n == 0
            self.history[seq] = list(prompt[:n])
            if n:
                event("match_prefix: hit")
        self.append_checked(seq, prompt[n:])

    @precondition(lambda self: self.history)
    @rule(i=st.integers(0, 100), tokens=st.lists(st.integers(0, 2), min_size=0, max_size=3))
    def decode(self, i, tokens):
        self.append_checked(self.pick(i), tokens)

    @precondition(lambda self: self.history)
    @rule(picks=st.lists(st.tuples(st.integers(0, 100),
                                   st.lists(st.integers(0, 2), max_size=3)), max_size=6))
    def batch(self, picks):
        seqs = [self.pick(i) for i, _ in picks]
        toks = [t for _, t in picks]
        before = _snapshot(self.c, self.history)
        # Expected copy-on-write sources: first non-empty append of a sequence whose partial
        # last block is still shared once earlier batch members have copied away from it.
        vref, seen, expect = {}, set(), []
        for q, t in zip(seqs, toks):
            if not t or q in seen:
                continue
            seen.add(q)
            if self.c.seq_len(q) % self.bs:
                b = self.c.block_table(q)[-1]
                r = vref.get(b, self.c.refcount(b))
                if r > 1:
                    expect.append(b)
                    vref[b] = r - 1
        ok, res = self.run_both(lambda m: m.append_batch(seqs, toks))
        if not ok:
            assert res is OutOfBlocks
            event("batch: OutOfBlocks")
            assert _snapshot(self.c, self.history) == before
            return
        slots, copies = res
        if len(copies) > 1:
            event("batch: several copies")
        assert len(slots) == sum(map(len, toks))
        assert [s for s, _ in copies] == expect
        self.write_kv(slots, [x for t in toks for x in t], copies)
        for q, t in zip(seqs, toks):
            self.history[q] = self.history[q] + list(t)

    @precondition(lambda self: self.history)
    @rule(i=st.integers(0, 100), token=st.integers(0, 2), learned=st.booleans())
    def decode_unknown(self, i, token, learned):
        """Overlapped decoding: a slot reserved before its token is known (-1), then the token is
        set, or the slot taken back (the sample had finished)."""
        seq = self.pick(i)
        pos = len(self.history[seq])
        ok, res = self.run_both(lambda m: m.append(seq, [-1]))
        if not ok:
            assert res is OutOfBlocks
            return
        slots, copies = res
        self.write_kv(slots, [token], copies)  # the device writes the token's KV meanwhile
        if learned:
            ok, _ = self.run_both(lambda m: m.set_tokens([seq], [pos], [token]))
            self.history[seq] = self.history[seq] + [token]
        else:
            ok, _ = self.run_both(lambda m: m.truncate(seq, 1))
        assert ok
        event("decode_unknown: " + ("set" if learned else "truncated"))

    @precondition(lambda self: self.history)
    @rule(i=st.integers(0, 100), n=st.integers(0, 3))
    def fork(self, i, n):
        parent = self.pick(i)
        ok, ids = self.run_both(lambda m: m.fork(parent, n))
        assert ok and len(ids) == n
        for q in ids:
            assert self.c.block_table(q) == self.c.block_table(parent)
            self.history[q] = list(self.history[parent])

    @precondition(lambda self: self.history)
    @rule(i=st.integers(0, 100))
    def free(self, i):
        seq = self.pick(i)
        ok, _ = self.run_both(lambda m: m.free(seq))
        assert ok
        del self.history[seq]

    @precondition(lambda self: self.history)
    @rule(picks=st.lists(st.integers(0, 100), min_size=1, max_size=4), repeat=st.booleans())
    def free_many(self, picks, repeat):
        """Several at once, as free() of each in order; a repeated or unknown id frees nothing."""
        seqs = list(dict.fromkeys(self.pick(i) for i in picks))
        bad = seqs + [seqs[0]] if repeat else seqs + [10**9]
        ok, _ = self.run_both(lambda m: m.free_many(np.asarray(bad, dtype=np.int64)))
        assert not ok
        ok, _ = self.run_both(lambda m: m.free_many(np.asarray(seqs, dtype=np.int64)))
        assert ok
        for seq in seqs:
            del self.history[seq]

    @rule()
    def bad_calls(self):
        ok, exc = self.run_both(lambda m: m.free(10**9))
        assert not ok and exc is KeyError
        nonempty = [q for q, h in self.history.items() if h]
        if nonempty:
            ok, exc = self.run_both(lambda m: m.match_prefix(nonempty[0], [0, 1, 2]))
            assert not ok and exc is ValueError

    @rule()
    def reset_cache(self):
        self.run_both(lambda m: m.reset_prefix_cache())
        assert self.c.num_cached_blocks == 0

    # -- checked after every step
    @invariant()
    def consistent(self):
        if not hasattr(self, "c"):
            return
        c, p = self.c, self.p
        c.check_invariants()
        p.check_invariants()
        assert c.stats() == p.stats()
        st_ = c.stats()
        assert st_["num_free_blocks"] + st_["num_cached_blocks"] + st_["num_used_blocks"] == self.nb
        assert st_["num_sequences"] == len(self.history)
        held = [0] * self.nb
        for q, hist in self.history.items():
            table = c.block_table(q)
            assert table == p.block_table(q)
            assert c.seq_len(q) == p.seq_len(q) == len(hist)
            for b in table:
                held[b] += 1
            # KV read back through the block table equals the sequence's token history.
            pos = np.arange(len(hist))
            slots = np.asarray(table, dtype=np.int64)[pos // self.bs] * self.bs + pos % self.bs
            assert self.kv[slots].tolist() == hist
        assert [c.refcount(b) for b in range(self.nb)] == held
        assert [p.refcount(b) for b in range(self.nb)] == held
        assert sum(h > 0 for h in held) == st_["num_used_blocks"]
        assert sum(h > 1 for h in held) == st_["num_shared_blocks"]
        if self.history:
            seqs = sorted(self.history)
            assert _norm(c.block_tables(seqs, 2)) == _norm(p.block_tables(seqs, 2))

    def teardown(self):
        if not hasattr(self, "c"):
            return
        for q in list(self.history):
            self.c.free(q)
            self.p.free(q)
        for m in (self.c, self.p):
            m.check_invariants()
            assert m.num_used_blocks == 0 and m.num_sequences == 0
            assert m.num_free_blocks + m.num_cached_blocks == self.nb
        assert self.c.stats() == self.p.stats()


BlockManagerMachine.TestCase.settings = settings(
    max_examples=400, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestBlockManagerDifferential = pytest.mark.slow(BlockManagerMachine.TestCase)


# ---------------------------------------------------------------------------------------------
# Unit tests, each run on both implementations.

@pytest.fixture(params=IMPLS, ids=["cpp", "py"])
def M(request):
    return request.param


def test_exports():
    import ttc_fast._C as C
    import block_manager_ref

    assert OutOfBlocks is C.OutOfBlocks and block_manager_ref.OutOfBlocks is OutOfBlocks
    assert issubclass(OutOfBlocks, RuntimeError)


def test_slots_and_sequence_ids(M):
    m = M(8, 4)
    assert [m.new_sequence() for _ in range(3)] == [0, 1, 2]
    slots, copies = m.append(0, list(range(6)))
    assert slots.dtype == np.int32 and slots.tolist() == [0, 1, 2, 3, 4, 5] and copies == []
    assert m.block_table(0) == [0, 1] and m.seq_len(0) == 6
    slots, _ = m.append(1, [7, 7])  # next free block is 2
    assert slots.tolist() == [8, 9]
    m.free(2)
    assert m.new_sequence() == 3  # ids are never reused


def test_fork_shares_all_blocks(M):
    m = M(8, 4)
    s = m.new_sequence()
    m.append(s, list(range(6)))
    kids = m.fork(s, 3)
    assert len(kids) == 3 and len(set(kids)) == 3
    for k in kids:
        assert m.block_table(k) == m.block_table(s) and m.seq_len(k) == 6
    assert [m.refcount(b) for b in m.block_table(s)] == [4, 4]
    assert m.num_shared_blocks == 2 and m.num_used_blocks == 2 and m.num_free_blocks == 6
    m.check_invariants()


def test_cow_only_for_shared_partial_block(M):
    m = M(8, 4)
    s = m.new_sequence()
    m.append(s, [1, 2, 3, 4, 5, 6])  # blocks 0 (full) + 1 (partial, 2 tokens)
    (k,) = m.fork(s, 1)
    assert m.blocks_needed(k, 1) == 1
    slots, copies = m.append(k, [9])
    assert copies == [(1, 2)]  # the partial block is copied; the full one stays shared
    assert m.block_table(k) == [0, 2] and slots.tolist() == [2 * 4 + 2]
    assert m.refcount(0) == 2 and m.refcount(1) == 1 and m.refcount(2) == 1
    slots, copies = m.append(s, [8])  # now the only holder: in place
    assert copies == [] and slots.tolist() == [1 * 4 + 2]


def test_no_cow_for_shared_full_block(M):
    m = M(8, 4)
    s = m.new_sequence()
    m.append(s, list(range(8)))  # two full blocks
    (k,) = m.fork(s, 1)
    assert m.blocks_needed(k, 1) == 1
    for q in (s, k):
        _, copies = m.append(q, [1])
        assert copies == []
    assert m.block_table(s) == [0, 1, 2] and m.block_table(k) == [0, 1, 3]


def test_append_batch_shared_partial_block_need(M):
    # r = 3 holders of a partial block, all 3 append: 2 copies (the last keeps the block).
    m = M(6, 4)
    s = m.new_sequence()
    m.append(s, [1, 2])
    a, b = m.fork(s, 2)
    m.append(m.new_sequence(), list(range(12)))  # use 3 more blocks: only 2 left
    assert m.num_available_blocks == 2
    before = _snapshot(m, [s, a, b])
    slots, copies = m.append_batch([s, a, b], [[5], [6], [7]])
    assert copies == [(0, 4), (0, 5)] and slots.tolist() == [18, 22, 2]
    assert m.num_available_blocks == 0
    m.check_invariants()
    # The same batch with one more token needed would not fit: nothing changes.
    m2 = M(6, 4)
    s = m2.new_sequence()
    m2.append(s, [1, 2])
    a, b = m2.fork(s, 2)
    m2.append(m2.new_sequence(), list(range(12)))
    with pytest.raises(OutOfBlocks, match=r"need 3 blocks, only 2 available \(free 2 \+ cached 0\)"):
        m2.append_batch([s, a, b], [[5], [6], [7, 7, 7]])
    assert _snapshot(m2, [s, a, b]) == before


def test_append_batch_partial_subset_copies_each(M):
    m = M(8, 4)
    s = m.new_sequence()
    m.append(s, [1, 2])
    a, b = m.fork(s, 2)  # r = 3, k = 2 -> 2 copies
    _, copies = m.append_batch([a, b], [[3], [4]])
    assert copies == [(0, 1), (0, 2)]
    assert m.refcount(0) == 1
    _, copies = m.append_batch([s, s], [[5], [6]])  # repeated sequence: in place
    assert copies == [] and m.block_table(s) == [0]


def test_match_prefix_never_covers_last_token(M):
    m = M(16, 4)
    prompt = list(range(8))
    s = m.new_sequence()
    m.append(s, prompt)
    t = m.new_sequence()
    assert m.match_prefix(t, prompt) == 4  # 2 full cached blocks, only 1 may be used
    assert m.block_table(t) == [0] and m.refcount(0) == 2 and m.seq_len(t) == 4
    u = m.new_sequence()
    assert m.match_prefix(u, prompt + [99]) == 8 and m.block_table(u) == [0, 1]
    v = m.new_sequence()
    assert m.match_prefix(v, [0]) == 0 and m.match_prefix(v, []) == 0
    w = m.new_sequence()
    assert m.match_prefix(w, [0, 1, 2, 3, 4, 5, 6, 99, 5]) == 4  # second block differs


def test_match_prefix_checks_chain(M):
    m = M(16, 2)
    a = m.new_sequence()
    m.append(a, [1, 1, 2, 2])
    b = m.new_sequence()
    assert m.match_prefix(b, [3, 3, 2, 2, 0]) == 0  # block [2, 2] exists but after [1, 1]
    c = m.new_sequence()
    assert m.match_prefix(c, [1, 1, 2, 2, 0]) == 4


def test_match_prefix_disabled_cache(M):
    m = M(8, 2, enable_prefix_cache=False)
    s = m.new_sequence()
    m.append(s, [1, 2, 3, 4])
    m.free(s)
    assert m.num_cached_blocks == 0 and m.num_free_blocks == 8
    t = m.new_sequence()
    assert m.match_prefix(t, [1, 2, 3, 4, 5]) == 0


def test_free_caches_full_blocks_and_lru_evicts_tail_first(M):
    m = M(4, 2)
    s = m.new_sequence()
    m.append(s, [1, 2, 3, 4, 5, 6, 7])  # blocks 0, 1, 2 full; 3 partial
    m.free(s)
    assert m.num_cached_blocks == 3 and m.num_free_blocks == 1 and m.num_used_blocks == 0
    t = m.new_sequence()
    slots, _ = m.append(t, [9, 9, 9])  # free block 3, then evicts the tail (block 2)
    assert m.block_table(t) == [3, 2]
    assert m.num_cached_blocks == 2
    u = m.new_sequence()
    assert m.match_prefix(u, [1, 2, 3, 4, 5, 6, 7]) == 4  # head blocks 0, 1 survived
    assert m.block_table(u) == [0, 1] and m.num_cached_blocks == 0
    m.free(t)
    m.free(u)
    v = m.new_sequence()
    m.append(v, [8] * 6)
    # t's partial block 2 went to the free list; its full block 3 and u's blocks were cached
    # (tick order 3, 1, 0): free list first, then least recently released.
    assert m.block_table(v) == [2, 3, 1]
    m.check_invariants()


def test_match_hit_refreshes_lru(M):
    m = M(2, 1)
    a = m.new_sequence()
    m.append(a, [5])
    b = m.new_sequence()
    m.append(b, [6])
    m.free(a)  # block 0 cached (tick 1)
    m.free(b)  # block 1 cached (tick 2)
    c = m.new_sequence()
    assert m.match_prefix(c, [5, 0]) == 1  # touches block 0
    m.free(c)  # block 0 now newest
    d = m.new_sequence()
    m.append(d, [7])
    assert m.block_table(d) == [1]  # least recently used goes first


def test_out_of_blocks_leaves_state_unchanged(M):
    m = M(4, 2)
    s = m.new_sequence()
    m.append(s, [1, 2, 3])
    (k,) = m.fork(s, 1)
    before = _snapshot(m, [s, k])
    assert m.blocks_needed(k, 5) == 3  # copy + 2 new
    with pytest.raises(OutOfBlocks, match=r"need 3 blocks, only 2 available \(free 2 \+ cached 0\)"):
        m.append(k, [1, 2, 3, 4, 5])
    assert _snapshot(m, [s, k]) == before
    with pytest.raises(OutOfBlocks):
        m.append_batch([s, k], [[1], [1, 2, 3, 4]])
    assert _snapshot(m, [s, k]) == before
    with pytest.raises(KeyError):
        m.append_batch([s, 12345], [[1], [1]])
    assert _snapshot(m, [s, k]) == before
    m.check_invariants()
    m.append(k, [1, 2, 3])  # exactly fits
    assert m.num_available_blocks == 0


def test_cached_blocks_count_as_available(M):
    m = M(3, 2)
    s = m.new_sequence()
    m.append(s, [1, 2, 3, 4, 5, 6])
    m.free(s)
    assert m.num_free_blocks == 0 and m.num_cached_blocks == 3 and m.num_available_blocks == 3
    t = m.new_sequence()
    m.append(t, [0] * 6)
    assert m.block_table(t) == [2, 1, 0]


def test_reset_prefix_cache(M):
    m = M(4, 2)
    s = m.new_sequence()
    m.append(s, [1, 2, 3, 4])
    keep = m.new_sequence()
    m.append(keep, [7, 8])
    m.free(s)
    assert m.num_cached_blocks == 2
    m.reset_prefix_cache()
    assert m.num_cached_blocks == 0 and m.num_free_blocks == 3 and m.num_used_blocks == 1
    t = m.new_sequence()
    assert m.match_prefix(t, [1, 2, 3, 4, 5]) == 0
    u = m.new_sequence()
    assert m.match_prefix(u, [7, 8, 9]) == 2  # in-use blocks stay registered
    m.check_invariants()


def test_block_tables(M):
    m = M(8, 2)
    a, b = m.new_sequence(), m.new_sequence()
    m.append(a, [1, 2, 3])
    tables, lens = m.block_tables([a, b, a])
    assert tables.dtype == np.int32 and lens.dtype == np.int32
    assert tables.tolist() == [[0, 1], [0, 0], [0, 1]] and lens.tolist() == [3, 0, 3]
    tables, _ = m.block_tables([b], width=4)
    assert tables.shape == (1, 4)
    tables, lens = m.block_tables([])
    assert tables.shape == (0, 0) and lens.shape == (0,)


def test_stats_counters(M):
    m = M(8, 2)
    s = m.new_sequence()
    m.append(s, [1, 2, 3])
    m.fork(s, 2)
    assert m.stats() == {
        "num_blocks": 8, "block_size": 2, "num_sequences": 3, "num_free_blocks": 6,
        "num_cached_blocks": 0, "num_available_blocks": 6, "num_used_blocks": 2,
        "num_shared_blocks": 2,
    }


def test_bad_args(M):
    with pytest.raises(ValueError, match="num_blocks must be >= 1"):
        M(0, 4)
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        M(4, 0)
    m = M(4, 2)
    s = m.new_sequence()
    m.append(s, [1])
    with pytest.raises(ValueError, match="needs an empty sequence"):
        m.match_prefix(s, [1, 2, 3])
    with pytest.raises(KeyError, match="unknown sequence 99"):
        m.free(99)
    for call in (lambda: m.append(99, [1]), lambda: m.block_table(99), lambda: m.seq_len(99),
                 lambda: m.fork(99, 1), lambda: m.block_tables([99]), lambda: m.blocks_needed(99, 1)):
        with pytest.raises(KeyError):
            call()
    with pytest.raises(ValueError, match="n must be >= 0"):
        m.fork(s, -1)
    with pytest.raises(IndexError):
        m.refcount(4)
    with pytest.raises(ValueError, match="width"):
        m.block_tables([s], -1)
    with pytest.raises(ValueError, match="sequences but"):
        m.append_batch([s], [[1], [2]])
    with pytest.raises(ValueError, match="int32"):
        m.append(s, [2**40])
    m.free(s)
    with pytest.raises(KeyError):
        m.free(s)  # double free
    m.check_invariants()


def test_unknown_tokens_enter_the_prefix_cache_only_once_set(M):
    """A block completed with a token not yet known (-1) is not matchable; set_tokens makes it
    so. Only unknown tokens of a block owned alone can be set or truncated."""
    m = M(8, 4)
    a = m.new_sequence()
    m.append(a, [5, 6, 7])
    m.append(a, [-1])  # completes block 0 while its last token is unknown
    probe = m.new_sequence()
    assert m.match_prefix(probe, [5, 6, 7, 8, 9]) == 0
    m.free(probe)
    with pytest.raises(ValueError):
        m.set_tokens([a], [2], [9])  # a known token
    with pytest.raises(ValueError):
        m.truncate(a, 2)  # the second-to-last token is known
    m.set_tokens([a], [3], [8])
    probe = m.new_sequence()
    assert m.match_prefix(probe, [5, 6, 7, 8, 9]) == 4
    m.free(probe)
    m.append(a, [-1])  # a new block for one unknown token
    used = m.num_used_blocks
    m.truncate(a, 1)
    assert m.seq_len(a) == 4 and m.num_used_blocks == used - 1
    b, = m.fork(a, 1)
    m.append(a, [-1])
    m.append(b, [-1])
    with pytest.raises(ValueError):
        m.set_tokens([a, b], [4, 4], [1, -3])  # a negative token: nothing is written
    m.set_tokens([a, b], [4, 4], [1, 2])
    m.check_invariants()
