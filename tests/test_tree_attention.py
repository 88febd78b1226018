"""The CPU path's prefix-tree attention (kernels/tree_attention.py) against plain paged decode
and extend attention, on beam trees with shuffled block ids, ragged lengths, GQA and forks."""
import random

import pytest
import torch

from ttc_fast.kernels import (
    paged_decode_attention_ref,
    paged_extend_attention_ref,
    plan_prefix_tree,
    SharedKVMemo,
    tree_attention_torch,
)

from test_kernels_attention import BS, DTYPES, HEADS, assert_close, make_cache


def beam_tree(rng: random.Random, num_blocks: int, problems=3, iterations=3, prompt=(20, 70), steps=(1, 40),
              keep=2, width=3):
    """Block tables of the live beams of a beam search: each problem's prompt, then `iterations`
    rounds in which `keep` random beams are each forked `width` times and every child appends a
    step of its own (a forked partial last block is copied, as the block manager does)."""
    free = list(range(num_blocks))
    rng.shuffle(free)
    rows = []
    for _ in range(problems):
        n = rng.randint(*prompt)
        live = [([free.pop() for _ in range(-(-n // BS))], n)]
        for _ in range(iterations):
            children = []
            for table, n in rng.sample(live, min(keep, len(live))):
                for _ in range(width):
                    full = n // BS
                    m = n + rng.randint(*steps)
                    children.append((table[:full] + [free.pop() for _ in range(-(-m // BS) - full)], m))
            live = children
        rows += live
    rng.shuffle(rows)
    width_blocks = max(len(t) for t, _ in rows) + 2
    tables = torch.tensor([t + [rng.randrange(num_blocks) for _ in range(width_blocks - len(t))] for t, _ in rows],
                          dtype=torch.int32)  # garbage past each row's blocks
    return tables, torch.tensor([n for _, n in rows], dtype=torch.int32)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("hq,hkv", HEADS)
@pytest.mark.parametrize("seed", [0, 1])
def test_tree_decode_equals_plain_decode(dtype, atol, rtol, hq, hkv, seed):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    tables, ctx = beam_tree(rng, 400)
    d = 32
    kc, vc = make_cache(400, hkv, d, dtype, "cpu", gen)
    q = torch.randn(len(ctx), hq, d, generator=gen).to(dtype)
    ref = paged_decode_attention_ref(q, kc, vc, tables, ctx, d ** -0.5)
    tree = plan_prefix_tree(tables.numpy(), ctx.numpy(), [1] * len(ctx), BS)
    assert tree.shared_tokens > 0, "the beams share nothing: the test would not exercise the tree"
    out = tree_attention_torch(q, kc, vc, tree, d ** -0.5)
    assert not torch.isnan(out).any()
    assert_close(out, ref, atol, rtol)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES[::2])
@pytest.mark.parametrize("hq,hkv", HEADS[:2])
@pytest.mark.parametrize("seed", [0, 1])
def test_tree_extend_and_mixed_rows_equal_plain_extend(dtype, atol, rtol, hq, hkv, seed):
    """Each beam scores a new step of 1 to 40 tokens (a PRM iteration; some rows decode one
    token), mixed with fresh prompts that share nothing: equal to plain extend attention."""
    rng = random.Random(10 + seed)
    gen = torch.Generator().manual_seed(10 + seed)
    tables, ctx = beam_tree(rng, 400)
    q_lens = torch.tensor([min(int(c), rng.choice([1, rng.randint(2, 40)])) for c in ctx], dtype=torch.int32)
    fresh = [rng.randint(1, 50) for _ in range(2)]  # prompts: every token new
    free = sorted(set(range(400)) - set(tables.flatten().tolist()))
    rows = [free[:4], free[4:8]]
    tables = torch.cat([tables, torch.tensor([r + [0] * (tables.shape[1] - 4) for r in rows], dtype=torch.int32)])
    ctx = torch.cat([ctx, torch.tensor(fresh, dtype=torch.int32)])
    q_lens = torch.cat([q_lens, torch.tensor(fresh, dtype=torch.int32)])
    d = 32
    kc, vc = make_cache(400, hkv, d, dtype, "cpu", gen)
    cu = torch.cat([torch.zeros(1, dtype=torch.int32), q_lens.cumsum(0).to(torch.int32)])
    q = torch.randn(int(cu[-1]), hq, d, generator=gen).to(dtype)
    ref = paged_extend_attention_ref(q, kc, vc, tables, cu, ctx, int(q_lens.max()), d ** -0.5)
    tree = plan_prefix_tree(tables.numpy(), ctx.numpy(), q_lens.numpy(), BS)
    assert tree.shared_tokens > 0
    out = tree_attention_torch(q, kc, vc, tree, d ** -0.5)
    assert not torch.isnan(out).any()
    assert_close(out, ref, atol, rtol)


def test_tree_attention_edge_rows():
    """Rows sharing nothing, a one-token row, rows ending exactly on a block boundary, and two
    rows with identical tables (their last block read by both as their own)."""
    gen = torch.Generator().manual_seed(3)
    d, hq, hkv = 16, 4, 2
    kc, vc = make_cache(64, hkv, d, torch.float32, "cpu", gen)
    tables = torch.tensor([[5, 9, 2, 0], [5, 9, 2, 0], [5, 9, 7, 0], [11, 0, 0, 0], [12, 13, 14, 15], [5, 9, 2, 3]],
                          dtype=torch.int32)
    ctx = torch.tensor([40, 40, 2 * BS, 1, 4 * BS, 3 * BS + 1], dtype=torch.int32)
    q = torch.randn(len(ctx), hq, d, generator=gen)
    tree = plan_prefix_tree(tables.numpy(), ctx.numpy(), [1] * len(ctx), BS)
    # block 5 is shared by rows 0, 1, 2, 5 and block 9 by rows 0, 1, 5; block 2 holds the last
    # token of rows 0 and 1, so it is each one's own (and row 5's)
    assert tree.shared_tokens == 2 * BS
    assert tree.own_tokens == 8 + 8 + 16 + 1 + 64 + 17
    out = tree_attention_torch(q, kc, vc, tree, d ** -0.5)
    assert_close(out, paged_decode_attention_ref(q, kc, vc, tables, ctx, d ** -0.5), 2e-5, 2e-5)


def test_tree_attention_rejects_a_plan_for_other_tokens():
    tables = torch.zeros(2, 1, dtype=torch.int32)
    kc = vc = torch.zeros(4, BS, 1, 16)
    tree = plan_prefix_tree(tables[:1].numpy(), [3], [1], BS)
    with pytest.raises(ValueError, match="planned for 1 tokens"):
        tree_attention_torch(torch.zeros(2, 1, 16), kc, vc, tree, 0.25)
    with pytest.raises(ValueError, match="at least one new token"):
        plan_prefix_tree(tables.numpy(), [3, 0], [1, 1], BS)
    with pytest.raises(ValueError, match="one entry per row"):
        plan_prefix_tree(tables.numpy(), [3, 3], [1], BS)


def test_shared_kv_memo_across_decode_steps_and_after_a_free():
    """A decode loop: every row whose last block has room appends a token (written into its own
    block) and the tree is planned again with one memo: the shared segments' gathered K/V are
    reused and every step equals plain decode. Then a shared block is rewritten, as a freed and
    reused block would be: after clear() the result is right again; the kept memo would be stale."""
    rng = random.Random(5)
    gen = torch.Generator().manual_seed(5)
    tables, ctx = beam_tree(rng, 400)
    d, hq, hkv = 16, 4, 2
    kc, vc = make_cache(400, hkv, d, torch.float32, "cpu", gen)
    memo = SharedKVMemo()

    def step():
        memo.begin_forward()
        q = torch.randn(len(ctx), hq, d, generator=gen)
        tree = plan_prefix_tree(tables.numpy(), ctx.numpy(), [1] * len(ctx), BS, memo=memo)
        return tree_attention_torch(q, kc, vc, tree, d ** -0.5), paged_decode_attention_ref(q, kc, vc, tables, ctx, d ** -0.5), tree

    for _ in range(4):
        out, ref, tree = step()
        assert_close(out, ref, 2e-5, 2e-5)
        room = (ctx % BS) != 0  # a row's partial last block is its own (forks copy it)
        for row in torch.nonzero(room).flatten().tolist():
            pos = int(ctx[row])
            block = int(tables[row, pos // BS])
            kc[block, pos % BS] = torch.randn(hkv, d, generator=gen)
            vc[block, pos % BS] = torch.randn(hkv, d, generator=gen)
        ctx = ctx + room.to(ctx.dtype)
    assert memo.hits > 0, "no shared segment was reused across steps"
    shared = next(b for b in tree.buckets if b.shared_key is not None).blocks[0, 0]
    kc[shared] = torch.randn(BS, hkv, d, generator=gen)
    stale, ref, _ = step()
    assert (stale - ref).abs().max() > 1e-3, "a rewritten shared block went unnoticed: the test would not catch a stale memo"
    memo.clear()
    out, ref, _ = step()
    assert_close(out, ref, 2e-5, 2e-5)


def test_shared_kv_memo_does_not_match_a_padded_segment_that_now_holds_block_0():
    """Two shared segments of 4 and 3 blocks fall in one bucket, the shorter padded with block 0,
    which is live and still being written (no free in between). When block 0 fills and becomes
    the shorter segment's fourth shared block, the bucket's block matrix is the same, but its
    memo key must differ: the gathered copy of the padding holds block 0's old content."""
    gen = torch.Generator().manual_seed(6)
    d, hq, hkv = 16, 4, 2
    kc, vc = make_cache(16, hkv, d, torch.float32, "cpu", gen)
    memo = SharedKVMemo()

    def forward(tables, ctx):
        tables, ctx = torch.tensor(tables, dtype=torch.int32), torch.tensor(ctx, dtype=torch.int32)
        memo.begin_forward()
        q = torch.randn(len(ctx), hq, d, generator=gen)
        tree = plan_prefix_tree(tables.numpy(), ctx.numpy(), [1] * len(ctx), BS, memo=memo)
        assert any(b.shared_key is not None and b.blocks.shape == (2, 4) for b in tree.buckets)
        out = tree_attention_torch(q, kc, vc, tree, d ** -0.5)
        assert_close(out, paged_decode_attention_ref(q, kc, vc, tables, ctx, d ** -0.5), 2e-5, 2e-5)

    # rows 0, 1 share blocks 1-4; rows 2, 3 share blocks 5-7; the last block of each row is its own
    forward([[1, 2, 3, 4, 8], [1, 2, 3, 4, 9], [5, 6, 7, 10, 0], [5, 6, 7, 11, 0]], [4 * BS + 1] * 2 + [3 * BS + 1] * 2)
    kc[0], vc[0] = torch.randn(BS, hkv, d, generator=gen), torch.randn(BS, hkv, d, generator=gen)
    forward([[1, 2, 3, 4, 8], [1, 2, 3, 4, 9], [5, 6, 7, 0, 12], [5, 6, 7, 0, 13]], [4 * BS + 1] * 4)


@pytest.mark.parametrize("lockstep", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_decode_plan_cache_across_steps_equals_fresh_plans(seed, lockstep):
    """Decode steps planned through a DecodePlanCache (lengths growing by one, rows crossing
    into new blocks, a row replaced by a fork of another) attend exactly as plans made from
    scratch. Lockstep rows (samples of one prompt) reuse the plan between block boundaries;
    ragged rows (a beam tree) almost never can, and must still be right."""
    from ttc_fast.kernels import DecodePlanCache

    rng = random.Random(20 + seed)
    gen = torch.Generator().manual_seed(20 + seed)
    tables, ctx = beam_tree(rng, 400)
    if lockstep:  # every row one step past the same shared prompt, like n samples of a request
        tables[:, 0] = tables[0, 0]
        ctx = torch.full_like(ctx, BS + 1)
    used = set(tables.flatten().tolist())
    spare = [b for b in range(400) if b not in used]
    d, hq, hkv = 32, 4, 2
    kc, vc = make_cache(400, hkv, d, torch.float32, "cpu", gen)
    cache, reused = DecodePlanCache(), 0
    for step in range(2 * BS + 3):
        ctx = ctx + 1
        for i in range(len(ctx)):
            need = -(-int(ctx[i]) // BS)
            if need > tables.shape[1]:
                tables = torch.cat([tables, torch.zeros(len(ctx), 1, dtype=torch.int32)], dim=1)
            if (int(ctx[i]) - 1) % BS == 0:
                tables[i, need - 1] = spare.pop()  # a new block for the new token
        if step == 5:
            tables[0], ctx[0] = tables[1], ctx[1]  # the row now forks another's context
        q = torch.randn(len(ctx), hq, d, generator=gen)
        key_before = cache.key
        cached = plan_prefix_tree(tables.numpy(), ctx.numpy(), [1] * len(ctx), BS, cache=cache)
        reused += key_before is not None and cache.key == key_before
        fresh = plan_prefix_tree(tables.numpy(), ctx.numpy(), [1] * len(ctx), BS)
        assert (cached.shared_tokens, cached.own_tokens) == (fresh.shared_tokens, fresh.own_tokens)
        assert torch.equal(tree_attention_torch(q, kc, vc, cached, d ** -0.5),
                           tree_attention_torch(q, kc, vc, fresh, d ** -0.5))
    if lockstep:
        assert reused >= 2 * (BS - 2), f"the plan was reused {reused} times: the test would not exercise it"
