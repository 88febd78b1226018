"""Beam-search top-k kernels (segmented top-k, fused log-softmax + top-k) against their torch
references, and the references against naive Python sorting."""
import os

import pytest
import torch

from ttc_fast.kernels import logsoftmax_topk, logsoftmax_topk_ref, segmented_topk, segmented_topk_ref

pytestmark = pytest.mark.cuda  # run on the GPU by benchmarks/run_gpu.sh (tests/conftest.py)

# Kernels run on CPU tensors only through the interpreter (conftest sets it when there is no GPU).
DEVICES = (["cpu"] if os.environ.get("TRITON_INTERPRET") == "1" else []) + (["cuda"] if torch.cuda.is_available() else [])
KDEV = DEVICES[0]  # where single-device kernel checks run


def naive_segmented_topk(scores, indptr, k, parents):
    vals, idxs, pars = [], [], []
    for s in range(len(indptr) - 1):
        items = [(float(scores[i]), i) for i in range(indptr[s], indptr[s + 1])]
        items.sort(key=lambda t: (-t[0], t[1]))  # descending value, lower index first
        items = (items + [(float("-inf"), -1)] * k)[:k]
        vals.append([v for v, _ in items])
        idxs.append([i for _, i in items])
        pars.append([int(parents[i]) if i >= 0 else -1 for _, i in items])
    return torch.tensor(vals), torch.tensor(idxs, dtype=torch.int32), torch.tensor(pars, dtype=torch.int32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [1, 3, 4, 8])
def test_segmented_topk(device, k):
    gen = torch.Generator().manual_seed(k)
    sizes = [0, 1, 2, 5, 8, 13, 300]  # empty, single, fewer than k, more than k, several tiles
    m = sum(sizes)
    scores = torch.randn(m, generator=gen)
    scores[torch.randint(0, m, (40,), generator=gen)] = 0.5  # ties across and inside segments
    scores[[3, 20]] = float("-inf")
    parents = torch.randint(0, 50, (m,), generator=gen, dtype=torch.int32)
    indptr = torch.tensor([0] + torch.tensor(sizes).cumsum(0).tolist(), dtype=torch.int32)
    want = naive_segmented_topk(scores, indptr.tolist(), k, parents)
    ref = segmented_topk_ref(scores, indptr, k, parents)
    for a, b in zip(ref, want):
        assert torch.equal(a, b)
    got = segmented_topk(scores.to(device), indptr.to(device), k, parents.to(device))
    for a, b in zip(got, want):
        assert torch.equal(a.cpu(), b)
    v, i, p = segmented_topk(scores.to(device), indptr.to(device), k)
    assert p is None and torch.equal(i.cpu(), want[1]) and torch.equal(v.cpu(), want[0])


def test_segmented_topk_no_segments():
    v, i, p = segmented_topk(torch.zeros(0, device=KDEV), torch.zeros(1, dtype=torch.int32, device=KDEV), 2)
    assert v.shape == (0, 2) and i.shape == (0, 2) and p is None
    v, i, _ = segmented_topk_ref(torch.zeros(0), torch.zeros(1, dtype=torch.int32), 2)
    assert v.shape == (0, 2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("v,k", [(1000, 8), (257, 5), (64, 1), (5, 5)])
def test_logsoftmax_topk(device, dtype, v, k):
    gen = torch.Generator().manual_seed(v + k)
    b = 3
    logits = (torch.randn(b, v, generator=gen) * 3).to(dtype)
    logits[1, 10:20] = logits[1].max()  # ties at the top: lower ids first
    logits[2, : v // 2] = float("-inf")
    cum = torch.randn(b, generator=gen)
    # reference vs naive
    rs, rt = logsoftmax_topk_ref(logits, cum, k)
    x = logits.double()
    lsm = x - torch.log(torch.exp(x - x.max(1, keepdim=True).values).sum(1, keepdim=True)) - x.max(1, keepdim=True).values
    for r in range(b):
        order = sorted(range(v), key=lambda i: (-float(logits[r, i].float()), i))[:k]
        assert rt[r].tolist() == order
        torch.testing.assert_close(rs[r].double(), cum[r].double() + lsm[r, order], atol=1e-5, rtol=1e-5)
    gs, gt = logsoftmax_topk(logits.to(device), cum.to(device), k)
    assert torch.equal(gt.cpu(), rt)
    torch.testing.assert_close(gs.cpu(), rs, atol=2e-5, rtol=2e-5)


def test_logsoftmax_topk_many_tiles():
    """A vocab of many tiles (interpreter tile = 256) and a k that is not a power of two."""
    gen = torch.Generator().manual_seed(9)
    logits = torch.randn(2, 3001, generator=gen)
    logits[0, 2999] = 9.0  # the best token in the ragged last tile
    cum = torch.zeros(2)
    gs, gt = logsoftmax_topk(logits.to(KDEV), cum.to(KDEV), 6)
    gs, gt = gs.cpu(), gt.cpu()
    rs, rt = logsoftmax_topk_ref(logits, cum, 6)
    assert torch.equal(gt, rt) and gt[0, 0] == 2999
    torch.testing.assert_close(gs, rs, atol=2e-5, rtol=2e-5)
