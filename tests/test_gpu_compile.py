"""Every Triton kernel compiles for real GPUs (sm_90, sm_80, sm_89) at the launch configuration its
launcher uses, within the target's shared memory and without register spill (fp32 attention
paths: at most 1 KB per thread). No GPU needed: Triton compiles ahead of time and ptxas, shipped
in the triton wheel, reports the usage (kernels/compile_check.py). The quick set runs by
default; the full set (every GQA group, fp16, every k) is marked slow."""
import os

import pytest
import triton

from ttc_fast import kernels
from ttc_fast.kernels import compile_check as cc

QUICK = cc.quick_cases()
_QUICK_NAMES = {c.name for c in QUICK}
REST = [c for c in cc.full_cases() if c.name not in _QUICK_NAMES]


@pytest.fixture(scope="module")
def pool(request):
    """Worker processes that compile without the interpreter; every selected case is queued at
    once, so the workers run ahead of the tests that wait on them."""
    p = cc.CompilePool(jobs=min(8, os.cpu_count() or 1))
    selected = [item.callspec.params["case"] for item in request.session.items
                if item.module is request.module and hasattr(item, "callspec") and "case" in item.callspec.params]
    p.submit(selected)
    yield p
    p.close()


def _check(pool, case):
    found = cc.problems(case, pool.result(case))
    assert not found, "\n".join(found)


@pytest.mark.parametrize("case", QUICK, ids=lambda c: c.name)
def test_kernel_compiles_within_limits(pool, case):
    _check(pool, case)


@pytest.mark.slow
@pytest.mark.parametrize("case", REST, ids=lambda c: c.name)
def test_kernel_compiles_within_limits_full(pool, case):
    _check(pool, case)


def _jit_kernels():
    """Every top-level Triton kernel (a jit function named *_kernel) of the kernel modules."""
    found = {}
    for mod_name in ("beam_topk", "block_copy", "cascade_decode", "kv_store", "paged_decode", "paged_extend",
                     "sampling", "tree_attention"):
        mod = getattr(kernels, mod_name)
        for name, obj in vars(mod).items():
            if name.endswith("_kernel") and isinstance(obj, triton.runtime.KernelInterface):
                found[f"{mod_name}.{name}"] = obj
    return found


def test_every_kernel_is_checked_on_every_target():
    """A new kernel (or target) without quick compile-check cases fails here, not silently."""
    checked = {}
    for case in QUICK:
        fn, _, _ = cc._kernel_launch(case, cc.TARGETS[case.target])
        checked.setdefault(id(fn), set()).add(case.target)
    missing = [name for name, fn in _jit_kernels().items() if checked.get(id(fn)) != set(cc.TARGETS)]
    assert len(_jit_kernels()) >= 11 and not missing, f"kernels without quick compile checks on every target: {missing}"


def test_problems_names_the_case_and_the_numbers():
    case = cc.Case("paged_extend", "sm_89", "bf16", 128, 4)
    ok = cc.Usage(config={"BLOCK_M": 64}, registers=200, shared=101_376)
    assert cc.problems(case, ok) == []
    over = cc.problems(case, cc.Usage(config={"BLOCK_M": 64}, shared=101_377, spill_stores=8, spill_loads=4))
    assert len(over) == 2 and all("paged_extend on sm_89, bf16, config {'BLOCK_M': 64}" in m for m in over)
    assert "101,377" in over[0] and "101,376" in over[0] and "8 bytes stored" in over[1]
    fp32 = cc.Case("paged_extend", "sm_80", "fp32", 128, 4)
    assert cc.problems(fp32, cc.Usage(config={"FP32_DOT": True}, spill_stores=1024, spill_loads=1024)) == []
    assert cc.problems(fp32, cc.Usage(config={"FP32_DOT": True}, spill_loads=1025))
    assert "boom" in cc.problems(case, cc.Usage(error="boom"))[0]


def test_pool_reports_a_compile_error():
    """A kernel that does not compile (head_dim 48: tl.arange needs a power of two) comes back
    as a failing case with Triton's error."""
    case = cc.Case("paged_extend", "sm_90", "bf16", 48, 4)
    p = cc.CompilePool(jobs=1)
    try:
        usage = p.result(case)
    finally:
        p.close()
    assert "arange" in usage.error and "power of 2" in usage.error, usage.error
    assert "compile failed" in cc.problems(case, usage)[0]
