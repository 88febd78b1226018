"""KV store and block copy kernels against their torch references (and a naive per-token loop)."""
import os

import pytest
import torch

from ttc_fast.kernels import copy_blocks, copy_blocks_ref, store_kv, store_kv_ref

pytestmark = pytest.mark.cuda  # run on the GPU by benchmarks/run_gpu.sh (tests/conftest.py)

# Kernels run on CPU tensors only through the interpreter (conftest sets it when there is no GPU).
DEVICES = (["cpu"] if os.environ.get("TRITON_INTERPRET") == "1" else []) + (["cuda"] if torch.cuda.is_available() else [])
KDEV = DEVICES[0]  # where single-device kernel checks run
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hkv,d", [(2, 16), (1, 64), (3, 24)])
def test_store_kv(device, dtype, hkv, d):
    gen = torch.Generator().manual_seed(0)
    nb, bs, t = 6, 8, 11
    # key/value as strided views of a fused [T, 2, Hkv, D] projection output
    kv_new = torch.randn(t, 2, hkv, d, generator=gen).to(dtype).to(device)
    key, value = kv_new[:, 0], kv_new[:, 1]
    slots = torch.randperm(nb * bs, generator=gen)[:t].to(torch.int32)
    slots[[1, 4, 9]] = -1
    slots = slots.to(device)
    sentinel = 7.0
    caches = [torch.full((nb, bs, hkv, d), sentinel, dtype=dtype, device=device) for _ in range(4)]
    store_kv(key, value, caches[0], caches[1], slots)
    store_kv_ref(key, value, caches[2], caches[3], slots)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    # naive check: every stored token where it belongs, everything else untouched
    written = torch.zeros(nb * bs, dtype=torch.bool)
    for i, s in enumerate(slots.tolist()):
        if s >= 0:
            assert torch.equal(caches[0][s // bs, s % bs], key[i])
            assert torch.equal(caches[1][s // bs, s % bs], value[i])
            written[s] = True
    untouched = caches[0].view(nb * bs, hkv, d)[~written.to(device)]
    assert (untouched == sentinel).all()


@pytest.mark.parametrize("device", DEVICES)
def test_store_kv_into_pool_view_and_validation(device):
    """Caches are views kv[l, 0] / kv[l, 1] of the pool; all-skip mapping is a no-op."""
    kv = torch.zeros(2, 2, 4, 4, 2, 16, device=device)
    key = torch.randn(3, 2, 16, device=device)
    slots = torch.tensor([5, -1, 12], dtype=torch.int32, device=device)
    store_kv(key, key * 2, kv[1, 0], kv[1, 1], slots)
    assert torch.equal(kv[1, 0, 1, 1], key[0]) and torch.equal(kv[1, 1, 3, 0], 2 * key[2])
    assert kv[0].abs().sum() == 0
    before = kv.clone()
    store_kv(key, key, kv[0, 0], kv[0, 1], torch.full((3,), -1, dtype=torch.int32, device=device))
    assert torch.equal(kv, before)
    with pytest.raises(AssertionError, match="int32"):
        store_kv(key, key, kv[0, 0], kv[0, 1], slots.long())
    with pytest.raises(AssertionError, match="dtype"):
        store_kv(key.half(), key.half(), kv[0, 0], kv[0, 1], slots)


def test_store_kv_needs_interpreter_on_cpu(monkeypatch):
    kc = torch.zeros(2, 4, 1, 16)
    key = torch.zeros(1, 1, 16)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="store_kv_ref"):
        store_kv(key, key, kc, kc, torch.zeros(1, dtype=torch.int32))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_copy_blocks(device, dtype):
    gen = torch.Generator().manual_seed(1)
    L, nb, bs, h, d = 3, 10, 4, 2, 16
    kv = torch.randn(L, 2, nb, bs, h, d, generator=gen).to(dtype).to(device)
    mapping = torch.tensor([[0, 5], [3, 7], [3, 9], [8, 1]], dtype=torch.int32, device=device)
    a, b = kv.clone(), kv.clone()
    copy_blocks(a, mapping)
    copy_blocks_ref(b, mapping)
    assert torch.equal(a, b)
    # naive: per (layer, k/v, pair)
    c = kv.clone()
    for l in range(L):
        for j in range(2):
            for s, t in mapping.tolist():
                c[l, j, t] = kv[l, j, s]
    assert torch.equal(a, c)
    untouched = [i for i in range(nb) if i not in (5, 7, 9, 1)]
    assert torch.equal(a[:, :, untouched], kv[:, :, untouched])
    copy_blocks(a, torch.zeros(0, 2, dtype=torch.int32, device=device))  # no-op
    assert torch.equal(a, b)


def test_copy_blocks_validation():
    kv = torch.zeros(1, 2, 4, 4, 2, 16)
    with pytest.raises(AssertionError, match="contiguous"):
        copy_blocks(kv.transpose(4, 5), torch.zeros(1, 2, dtype=torch.int32))
    with pytest.raises(AssertionError, match="block_mapping"):
        copy_blocks(kv, torch.zeros(2, dtype=torch.int32))
