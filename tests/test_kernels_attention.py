"""Attention kernels (paged decode, paged extend, cascade decode, merge) against their torch
references, and the references against a naive per-token dense attention.

Runs on the CPU through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1) and on
CUDA when available; shapes are tiny because the interpreter is slow.
"""
import math
import os

import pytest
import torch

from ttc_fast.kernels import (
    cascade_decode_attention,
    cascade_decode_attention_ref,
    merge_attention_states,
    merge_attention_states_ref,
    paged_decode_attention,
    paged_decode_attention_ref,
    paged_extend_attention,
    paged_extend_attention_ref,
    plan_shared_prefix_groups,
)

pytestmark = pytest.mark.cuda  # run on the GPU by benchmarks/run_gpu.sh (tests/conftest.py)

# Kernels run on CPU tensors only through the interpreter (conftest sets it when there is no GPU).
DEVICES = (["cpu"] if os.environ.get("TRITON_INTERPRET") == "1" else []) + (["cuda"] if torch.cuda.is_available() else [])
KDEV = DEVICES[0]  # where single-device kernel checks run
DTYPES = [
    (torch.float32, 2e-5, 2e-5),
    (torch.float16, 2e-3, 2e-3),
    (torch.bfloat16, 1.6e-2, 1.6e-2),
]
HEADS = [(4, 2), (4, 1), (2, 2)]  # (Hq, Hkv): GQA group 2, MQA group 4, MHA
BS = 16


def make_cache(num_blocks, hkv, d, dtype, device, gen):
    k = torch.randn(num_blocks, BS, hkv, d, generator=gen).to(dtype).to(device)
    v = torch.randn(num_blocks, BS, hkv, d, generator=gen).to(dtype).to(device)
    return k, v


def make_tables(ctx_lens, num_blocks, gen, fork_of=None, max_blocks=None):
    """Block tables over a shuffled pool; fork_of[i] = (parent, n_shared_blocks) makes sequence i
    share its parent's leading blocks. Padding past a sequence's blocks is garbage (random ids)."""
    need = [math.ceil(c / BS) for c in ctx_lens]
    max_blocks = max_blocks or max(max(need), 1)
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables = torch.randint(0, num_blocks, (len(ctx_lens), max_blocks), generator=gen, dtype=torch.int32)
    fork_of = fork_of or {}
    for i, n in enumerate(need):
        shared = 0
        if i in fork_of:
            parent, shared = fork_of[i]
            tables[i, :shared] = tables[parent, :shared]
        for j in range(shared, n):
            tables[i, j] = perm.pop()
    return tables


def naive_attention(q_row, k_cache, v_cache, table_row, positions, scale):
    """q_row [Hq, D]; gathers each KV position one by one; float64 softmax. -> ([Hq, D], lse [Hq])."""
    hq, d = q_row.shape
    hkv = k_cache.shape[2]
    g = hq // hkv
    if len(positions) == 0:
        return torch.zeros(hq, d, dtype=torch.float64), torch.full((hq,), float("-inf"), dtype=torch.float64)
    ks, vs = [], []
    for p in positions:
        blk = int(table_row[p // BS])
        ks.append(k_cache[blk, p % BS].double())
        vs.append(v_cache[blk, p % BS].double())
    k, v = torch.stack(ks), torch.stack(vs)  # [n, Hkv, D]
    out, lse = torch.empty(hq, d, dtype=torch.float64), torch.empty(hq, dtype=torch.float64)
    for h in range(hq):
        s = (k[:, h // g] @ q_row[h].double()) * scale
        lse[h] = torch.logsumexp(s, 0)
        out[h] = torch.softmax(s, 0) @ v[:, h // g]
    return out, lse


def assert_close(a, b, atol, rtol):
    torch.testing.assert_close(a.float().cpu(), b.float().cpu(), atol=atol, rtol=rtol)


# ------------------------------------------------------------------ references vs naive
def test_references_match_naive_dense_attention():
    gen = torch.Generator().manual_seed(0)
    hq, hkv, d = 4, 2, 16
    kc, vc = make_cache(24, hkv, d, torch.float32, "cpu", gen)
    ctx = [1, 16, 17, 40]
    bt = make_tables(ctx, 24, gen, fork_of={3: (2, 1)})
    ctx_t = torch.tensor(ctx, dtype=torch.int32)
    scale = d ** -0.5
    # decode, with and without kv_start (empty range included)
    q = torch.randn(4, hq, d, generator=gen)
    start = torch.tensor([0, 16, 5, 40], dtype=torch.int32)
    for st in (None, start):
        out, lse = paged_decode_attention_ref(q, kc, vc, bt, ctx_t, scale, kv_start=st, return_lse=True)
        for b in range(4):
            s0 = 0 if st is None else int(st[b])
            o, l = naive_attention(q[b], kc, vc, bt[b], list(range(s0, ctx[b])), scale)
            assert_close(out[b], o, 1e-5, 1e-5)
            assert_close(lse[b], l, 1e-5, 1e-5)
    # extend: query i of a sequence attends to positions <= ctx - q_len + i
    qlens = [1, 16, 5, 20]
    cu = torch.tensor([0] + list(torch.tensor(qlens).cumsum(0)), dtype=torch.int32)
    qx = torch.randn(int(cu[-1]), hq, d, generator=gen)
    outx = paged_extend_attention_ref(qx, kc, vc, bt, cu, ctx_t, max(qlens), scale)
    for b in range(4):
        for i in range(qlens[b]):
            p = ctx[b] - qlens[b] + i
            o, _ = naive_attention(qx[int(cu[b]) + i], kc, vc, bt[b], list(range(p + 1)), scale)
            assert_close(outx[int(cu[b]) + i], o, 1e-5, 1e-5)
    # merge reference: merging [0, s) and [s, ctx) equals the full attention
    out_a, lse_a = paged_decode_attention_ref(q, kc, vc, bt, ctx_t, scale, kv_start=torch.zeros(4, dtype=torch.int32),
                                              return_lse=True)
    split = torch.minimum(torch.tensor([0, 8, 10, 40], dtype=torch.int32), ctx_t)
    ctx_a = split.clone()
    oa, la = paged_decode_attention_ref(q, kc, vc, bt, ctx_a, scale, return_lse=True)
    ob, lb = paged_decode_attention_ref(q, kc, vc, bt, ctx_t, scale, kv_start=split, return_lse=True)
    om, lm = merge_attention_states_ref(oa, la, ob, lb)
    assert_close(om, out_a, 1e-5, 1e-5)
    assert_close(lm, lse_a, 1e-5, 1e-5)


# ------------------------------------------------------------------ paged decode
@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("hq,hkv", HEADS)
def test_paged_decode(device, dtype, atol, rtol, hq, hkv):
    gen = torch.Generator().manual_seed(1)
    d = 32
    ctx = [1, 15, 16, 17, 33, 50]
    kc, vc = make_cache(40, hkv, d, dtype, device, gen)
    bt = make_tables(ctx, 40, gen, fork_of={3: (2, 1), 5: (4, 2)}).to(device)
    ctx_t = torch.tensor(ctx, dtype=torch.int32, device=device)
    q = torch.randn(len(ctx), hq, d, generator=gen).to(dtype).to(device)
    scale = d ** -0.5
    ref, ref_lse = paged_decode_attention_ref(q, kc, vc, bt, ctx_t, scale, return_lse=True)
    for splits in (1, 3, None):
        out = torch.full_like(q, float("nan"))
        got, lse = paged_decode_attention(q, kc, vc, bt, ctx_t, scale, out=out, return_lse=True, num_splits=splits)
        assert got.data_ptr() == out.data_ptr()
        assert not torch.isnan(out).any()
        assert_close(out, ref, atol, rtol)
        assert_close(lse, ref_lse, 1e-4, 1e-4)
    # no lse requested, allocated output
    assert_close(paged_decode_attention(q, kc, vc, bt, ctx_t, scale), ref, atol, rtol)
    # out as a row slice of a larger buffer: the rows around it stay untouched
    big = torch.full((len(ctx) + 2, hq, d), float("nan"), dtype=dtype, device=device)
    paged_decode_attention(q, kc, vc, bt, ctx_t, scale, out=big[1:-1], num_splits=2)
    assert torch.isnan(big[0]).all() and torch.isnan(big[-1]).all()
    assert_close(big[1:-1], ref, atol, rtol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("d", [16, 64, 128])
def test_paged_decode_head_dims_and_kv_start(device, d):
    gen = torch.Generator().manual_seed(2)
    hq, hkv = 4, 2
    ctx = [3, 32, 45]
    kc, vc = make_cache(12, hkv, d, torch.float16, device, gen)
    bt = make_tables(ctx, 12, gen).to(device)
    ctx_t = torch.tensor(ctx, dtype=torch.int32, device=device)
    start = torch.tensor([3, 16, 7], dtype=torch.int32, device=device)  # row 0: empty range
    q = torch.randn(3, hq, d, generator=gen).half().to(device)
    scale = d ** -0.5
    ref, ref_lse = paged_decode_attention_ref(q, kc, vc, bt, ctx_t, scale, kv_start=start, return_lse=True)
    out = torch.full_like(q, float("nan"))
    _, lse = paged_decode_attention(q, kc, vc, bt, ctx_t, scale, out=out, kv_start=start, return_lse=True,
                                    num_splits=2)
    assert torch.isinf(lse[0]).all() and (lse[0] < 0).all() and (out[0] == 0).all()
    assert torch.isinf(ref_lse[0]).all() and (ref[0] == 0).all()
    assert_close(out, ref, 2e-3, 2e-3)
    assert_close(lse[1:], ref_lse[1:], 1e-3, 1e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_paged_decode_into_caller_scratch(device):
    """A CUDA graph's decode writes its split-KV partials into the caller's buffers (poisoned here)
    and gives what fresh buffers give; wrong shapes are refused."""
    gen = torch.Generator().manual_seed(4)
    hq, hkv, d = 8, 2, 32
    ctx = [5, 17, 40, 33]
    kc, vc = make_cache(30, hkv, d, torch.float32, device, gen)
    bt = make_tables(ctx, 30, gen, fork_of={3: (2, 1)}).to(device)
    ctx_t = torch.tensor(ctx, dtype=torch.int32, device=device)
    q = torch.randn(len(ctx), hq, d, generator=gen).to(device)
    ref = paged_decode_attention_ref(q, kc, vc, bt, ctx_t, d ** -0.5)
    for splits in (1, 3):
        lse = torch.full((len(ctx), hq) + ((splits,) if splits > 1 else ()), float("nan"), device=device)
        part = torch.full((len(ctx), hq, splits, d), float("nan"), device=device) if splits > 1 else None
        out = paged_decode_attention(q, kc, vc, bt, ctx_t, d ** -0.5, num_splits=splits, scratch=(part, lse))
        assert_close(out, ref, 1e-4, 1e-4)
        assert not torch.isnan(lse).any(), "the kernel did not write the caller's scratch"
    with pytest.raises(AssertionError, match="scratch"):
        paged_decode_attention(q, kc, vc, bt, ctx_t, d ** -0.5, num_splits=2, scratch=(None, lse))


def test_decode_rejects_bad_inputs(monkeypatch):
    kc = torch.zeros(4, BS, 2, 16)
    q = torch.zeros(2, 4, 16)
    bt = torch.zeros(2, 1, dtype=torch.int32)
    ctx = torch.ones(2, dtype=torch.int32)
    with pytest.raises(AssertionError, match="context_lens"):
        paged_decode_attention(q, kc, kc, bt, ctx.long(), 0.25)
    with pytest.raises(AssertionError, match="dtype"):
        paged_decode_attention(q.half(), kc, kc, bt, ctx, 0.25)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="_ref"):
        paged_decode_attention(q, kc, kc, bt, ctx, 0.25)


# ------------------------------------------------------------------ paged extend
@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("hq,hkv", HEADS[:2])
def test_paged_extend(device, dtype, atol, rtol, hq, hkv):
    gen = torch.Generator().manual_seed(3)
    d = 32
    qlens = [1, 17, 5, 16, 9]
    ctx = [1, 17, 40, 48, 20]  # pure prefill (ctx == q_len), and extends after a cached context
    kc, vc = make_cache(30, hkv, d, dtype, device, gen)
    bt = make_tables(ctx, 30, gen, fork_of={3: (2, 2)}).to(device)
    ctx_t = torch.tensor(ctx, dtype=torch.int32, device=device)
    cu = torch.tensor([0] + torch.tensor(qlens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    q = torch.randn(sum(qlens), hq, d, generator=gen).to(dtype).to(device)
    scale = d ** -0.5
    ref = paged_extend_attention_ref(q, kc, vc, bt, cu, ctx_t, max(qlens), scale)
    out = torch.full_like(q, float("nan"))
    got = paged_extend_attention(q, kc, vc, bt, cu, ctx_t, max(qlens), scale, out=out)
    assert got.data_ptr() == out.data_ptr() and not torch.isnan(out).any()
    assert_close(out, ref, atol, rtol)
    # decode rows first, then this extend batch, in one output buffer (as the attention backend does)
    big = torch.full((sum(qlens) + 3, hq, d), float("nan"), dtype=dtype, device=device)
    paged_extend_attention(q, kc, vc, bt, cu, ctx_t, max(qlens), scale, out=big[3:])
    assert torch.isnan(big[:3]).all()
    assert_close(big[3:], ref, atol, rtol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("d", [64, 128])
def test_paged_extend_head_dims(device, d):
    gen = torch.Generator().manual_seed(4)
    qlens, ctx = [3, 12], [3, 30]
    kc, vc = make_cache(8, 1, d, torch.bfloat16, device, gen)
    bt = make_tables(ctx, 8, gen).to(device)
    cu = torch.tensor([0, *torch.tensor(qlens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    ctx_t = torch.tensor(ctx, dtype=torch.int32, device=device)
    q = torch.randn(15, 2, d, generator=gen).bfloat16().to(device)
    ref = paged_extend_attention_ref(q, kc, vc, bt, cu, ctx_t, 12, d ** -0.5)
    assert_close(paged_extend_attention(q, kc, vc, bt, cu, ctx_t, 12, d ** -0.5), ref, 1.6e-2, 1.6e-2)


# ------------------------------------------------------------------ cascade decode
def make_groups(group_sizes, prefix_blocks, suffix_lens, gen, num_blocks=64):
    """Beams of group g fork from one prompt of prefix_blocks[g] full blocks; each beam adds its own
    suffix (suffix 0 = empty suffix)."""
    ctx, fork_of, row = [], {}, 0
    for g, n in enumerate(group_sizes):
        for j in range(n):
            ctx.append(prefix_blocks[g] * BS + suffix_lens[(row + j) % len(suffix_lens)])
            if j > 0:
                fork_of[row + j] = (row, prefix_blocks[g])
        row += n
    ctx = [max(c, 1) for c in ctx]
    tables = make_tables(ctx, num_blocks, gen, fork_of=fork_of)
    indptr = torch.tensor([0] + torch.tensor(group_sizes).cumsum(0).tolist(), dtype=torch.int32)
    return ctx, tables, indptr


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES[:2])
@pytest.mark.parametrize("hq,hkv", HEADS[:2])
def test_cascade_decode(device, dtype, atol, rtol, hq, hkv):
    gen = torch.Generator().manual_seed(5)
    d = 32
    sizes, pblocks = [1, 3, 8], [2, 1, 3]
    ctx, bt, indptr = make_groups(sizes, pblocks, [5, 0, 17, 1, 16], gen)
    kc, vc = make_cache(64, hkv, d, dtype, device, gen)
    plens = torch.tensor([p * BS for p in pblocks], dtype=torch.int32)
    q = torch.randn(len(ctx), hq, d, generator=gen).to(dtype).to(device)
    ctx_t = torch.tensor(ctx, dtype=torch.int32, device=device)
    bt = bt.to(device)
    ref = paged_decode_attention_ref(q, kc, vc, bt, ctx_t, d ** -0.5)
    assert_close(cascade_decode_attention_ref(q, kc, vc, bt, ctx_t, indptr.to(device), plens.to(device), d ** -0.5),
                 ref, 0, 0)
    out = torch.full_like(q, float("nan"))
    cascade_decode_attention(q, kc, vc, bt, ctx_t, indptr.to(device), plens.to(device), d ** -0.5, out=out)
    assert not torch.isnan(out).any()
    assert_close(out, ref, atol, rtol)
    # a zero prefix in a group is just plain decode for its rows
    plens0 = plens.clone()
    plens0[1] = 0
    out0 = cascade_decode_attention(q, kc, vc, bt, ctx_t, indptr.to(device), plens0.to(device), d ** -0.5)
    assert_close(out0, ref, atol, rtol)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_cascade_large_group_tiles(device):
    """A group of 40 beams x 4 GQA heads = 160 query rows spans several query tiles."""
    gen = torch.Generator().manual_seed(6)
    d, hq, hkv = 16, 4, 1
    ctx, bt, indptr = make_groups([40], [2], [1, 3, 0, 16], gen, num_blocks=128)
    kc, vc = make_cache(128, hkv, d, torch.float32, device, gen)
    q = torch.randn(len(ctx), hq, d, generator=gen).to(device)
    ctx_t = torch.tensor(ctx, dtype=torch.int32, device=device)
    plens = torch.tensor([2 * BS], dtype=torch.int32, device=device)
    ref = paged_decode_attention_ref(q, kc, vc, bt.to(device), ctx_t, d ** -0.5)
    out = cascade_decode_attention(q, kc, vc, bt.to(device), ctx_t, indptr.to(device), plens, d ** -0.5)
    assert_close(out, ref, 2e-5, 2e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_merge_attention_states(device):
    gen = torch.Generator().manual_seed(7)
    n, h, d = 5, 3, 32
    oa, ob = torch.randn(n, h, d, generator=gen), torch.randn(n, h, d, generator=gen)
    la, lb = torch.randn(n, h, generator=gen), torch.randn(n, h, generator=gen)
    la[0] = float("-inf")  # empty a
    lb[1] = float("-inf")  # empty b
    la[2, 0] = lb[2, 0] = float("-inf")  # both empty
    oa[0] = float("nan")  # an empty state's out must not leak into the result
    oa, ob, la, lb = (t.to(device) for t in (oa, ob, la, lb))
    ref_o, ref_l = merge_attention_states_ref(oa, la, ob, lb)
    out = torch.full_like(oa, float("nan"))
    got_o, got_l = merge_attention_states(oa, la, ob, lb, out=out)
    assert not torch.isnan(out).any() and got_o.data_ptr() == out.data_ptr()
    assert_close(got_o, ref_o, 1e-5, 1e-5)
    assert_close(got_l, ref_l, 1e-5, 1e-5)
    assert (got_o[2, 0] == 0).all() and got_l[2, 0] == float("-inf")
    assert_close(got_o[0], ob[0], 1e-6, 1e-6)
    assert_close(got_o[1], oa[1], 1e-6, 1e-6)


# ------------------------------------------------------------------ planner
def test_plan_shared_prefix_groups_on_forks():
    gen = torch.Generator().manual_seed(8)
    # group A: 5 beams sharing 3 blocks; group B: 4 beams sharing 2 blocks (one ends exactly at the
    # prefix end + 1 token); group C: 2 beams (too small); plus 2 unrelated sequences.
    ctx, fork_of, row = [], {}, 0
    for n, shared, extra in ((5, 3, 7), (4, 2, 1), (2, 4, 3)):
        for j in range(n):
            ctx.append(shared * BS + extra + j)
            if j:
                fork_of[row + j] = (row, shared)
        row += n
    ctx += [20, 70]
    bt = make_tables(ctx, 128, gen, fork_of=fork_of)
    perm = torch.randperm(len(ctx), generator=gen)  # the runner's rows come in any order
    bt, ctx_t = bt[perm], torch.tensor(ctx, dtype=torch.int32)[perm]
    plan = plan_shared_prefix_groups(bt, ctx_t, BS, min_prefix_tokens=2 * BS, min_group_size=3)
    assert plan is not None
    order, indptr, plens = plan
    assert sorted(order.tolist()) == list(range(len(ctx)))
    assert order.dtype == torch.int64 and indptr.dtype == torch.int32 and plens.dtype == torch.int32
    sizes = (indptr[1:] - indptr[:-1]).tolist()
    assert sorted(zip(sizes[:-1], plens[:-1].tolist())) == [(4, 2 * BS), (5, 3 * BS)]
    assert sizes[-1] == 4 and plens[-1] == 0  # the rest: plain decode
    bt_o, ctx_o = bt[order], ctx_t[order]
    for g in range(len(sizes)):
        rows = range(int(indptr[g]), int(indptr[g + 1]))
        nb = int(plens[g]) // BS
        for r in rows:
            assert torch.equal(bt_o[r, :nb], bt_o[rows[0], :nb])
            assert int(ctx_o[r]) > int(plens[g])
    # and the planned cascade equals plain decode
    d = 16
    kc, vc = make_cache(128, 1, d, torch.float32, KDEV, gen)
    q = torch.randn(len(ctx), 2, d, generator=gen).to(KDEV)
    bt_o, ctx_o = bt_o.to(KDEV), ctx_o.to(KDEV)
    ref = paged_decode_attention_ref(q, kc, vc, bt_o, ctx_o, 0.25)
    got = cascade_decode_attention(q, kc, vc, bt_o, ctx_o, indptr.to(KDEV), plens.to(KDEV), 0.25)
    assert_close(got, ref, 2e-5, 2e-5)
    # not worth it -> None
    assert plan_shared_prefix_groups(bt, ctx_t, BS, min_prefix_tokens=10 * BS, min_group_size=3) is None
    assert plan_shared_prefix_groups(bt, ctx_t, BS, min_prefix_tokens=BS, min_group_size=6) is None


def test_planner_prefix_strictly_below_context():
    """Every beam ends exactly at a block boundary of the shared prompt: the prefix must leave a suffix."""
    bt = torch.tensor([[7, 3, 9], [7, 3, 9], [7, 3, 9], [7, 3, 9]], dtype=torch.int32)
    ctx = torch.tensor([48, 48, 48, 48], dtype=torch.int32)
    order, indptr, plens = plan_shared_prefix_groups(bt, ctx, BS, min_prefix_tokens=16, min_group_size=2)
    assert indptr.tolist() == [0, 4] and plens.tolist() == [32]
