"""Fused sampling kernel against its torch reference (same hash -> same tokens), greedy and
top-k/top-p semantics, and distribution sanity of the reference over many seeds."""
import os

import pytest
import torch

from ttc_fast.kernels import sample, sample_allowed_mask_ref, sample_ref, sampling_uniform

pytestmark = pytest.mark.cuda  # run on the GPU by benchmarks/run_gpu.sh (tests/conftest.py)

# Kernels run on CPU tensors only through the interpreter (conftest sets it when there is no GPU).
DEVICES = (["cpu"] if os.environ.get("TRITON_INTERPRET") == "1" else []) + (["cuda"] if torch.cuda.is_available() else [])
KDEV = DEVICES[0]  # where single-device kernel checks run


def params(b, gen, temp=1.0, top_k=0, top_p=1.0):
    return (torch.full((b,), temp), torch.full((b,), top_k, dtype=torch.int32), torch.full((b,), top_p),
            torch.randint(0, 2 ** 62, (b,), generator=gen), torch.randint(0, 10 ** 6, (b,), generator=gen))


def to(device, *ts):
    return [t.to(device) for t in ts]


def test_uniform_hash():
    seeds = torch.tensor([0, 1, 2 ** 62 + 12345, 7], dtype=torch.int64)
    pos = torch.tensor([0, 0, 3, 2 ** 40], dtype=torch.int64)
    u = sampling_uniform(seeds, pos, 5000)
    assert u.dtype == torch.float32 and ((u > 0) & (u < 1)).all()
    assert torch.equal(u, sampling_uniform(seeds, pos, 5000))  # deterministic
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[1], u[2])  # seed and position matter
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.005


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_sample_matches_reference(device, dtype):
    gen = torch.Generator().manual_seed(0)
    b, v = 16, 300
    logits = (torch.randn(b, v, generator=gen) * 2).to(dtype)
    temp = torch.rand(b, generator=gen) + 0.3
    temp[:3] = 0.0  # greedy rows
    top_k = torch.randint(0, 20, (b,), generator=gen, dtype=torch.int32)
    top_p = torch.rand(b, generator=gen) * 0.9 + 0.1
    top_p[5:9] = 1.0
    seeds = torch.randint(0, 2 ** 62, (b,), generator=gen)
    pos = torch.randint(0, 5000, (b,), generator=gen)
    args = to(device, logits, temp, top_k, top_p, seeds, pos)
    got = sample(*args)
    want = sample_ref(logits, temp, top_k, top_p, seeds, pos)
    assert got.dtype == torch.int64 and torch.equal(got.cpu(), want)
    allowed = sample_allowed_mask_ref(logits, temp, top_k, top_p)
    assert allowed[torch.arange(b), want].all()


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_greedy_and_top_k_1(device):
    gen = torch.Generator().manual_seed(1)
    b, v = 6, 97
    logits = torch.randn(b, v, generator=gen)
    logits[0, [5, 40]] = 10.0  # tie: lowest id wins
    temp, top_k, top_p, seeds, pos = params(b, gen, temp=0.0)
    want = torch.argmax(logits, dim=-1)
    assert want[0] == 5
    assert torch.equal(sample(*to(device, logits, temp, top_k, top_p, seeds, pos)).cpu(), want)
    assert torch.equal(sample_ref(logits, temp, top_k, top_p, seeds, pos), want)
    # temperature > 0 but top_k = 1 is greedy too (no ties in rows 1..)
    temp, top_k, top_p, seeds, pos = params(b, gen, temp=0.8, top_k=1)
    got = sample(*to(device, logits, temp, top_k, top_p, seeds, pos)).cpu()
    assert torch.equal(got[1:], want[1:]) and got[0] in (5, 40)
    assert torch.equal(sample_ref(logits, temp, top_k, top_p, seeds, pos)[1:], want[1:])


def target_distribution(logits, temp, top_k, top_p):
    probs = torch.softmax(logits.double() / temp, -1)
    sp, si = torch.sort(probs, descending=True)
    keep = torch.zeros_like(sp, dtype=torch.bool)
    if top_k:
        keep[:top_k] = True
    else:
        keep[:] = True
    sp = torch.where(keep, sp, torch.zeros_like(sp))
    sp = sp / sp.sum()
    before = torch.cumsum(sp, 0) - sp
    keep &= before < top_p
    p = torch.zeros_like(probs)
    p[si[keep]] = sp[keep]
    return p / p.sum()


@pytest.mark.slow
@pytest.mark.parametrize("temp,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 0.8), (1.3, 5, 1.0), (1.0, 6, 0.7)])
def test_sampling_distribution(temp, top_k, top_p):
    """Empirical frequencies over many seeds match the target distribution; masked tokens never
    appear. The kernel draws exactly the reference's tokens on a subset of the same seeds."""
    gen = torch.Generator().manual_seed(2)
    v, n = 12, 40000
    logits = torch.randn(v, generator=gen) * 1.5
    target = target_distribution(logits, temp, top_k, top_p)
    temps, ks, ps, seeds, pos = params(n, gen, temp, top_k, top_p)
    rows = logits.expand(n, v).contiguous()
    toks = sample_ref(rows, temps, ks, ps, seeds, pos)
    freq = torch.bincount(toks, minlength=v).double() / n
    assert (freq[target == 0] == 0).all(), "a masked token was sampled"
    assert (freq - target).abs().max() < 0.015
    m = 24
    got = sample(*to(KDEV, rows[:m], temps[:m], ks[:m], ps[:m], seeds[:m], pos[:m]))
    assert torch.equal(got.cpu(), toks[:m])
