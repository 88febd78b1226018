"""What the kernel files share: launch checks, LOG2E, the online-softmax loop over paged KV
tiles (decode, cascade and extend attention) and the log-sum-exp merge of attention states."""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # the kernels exponentiate in base 2: exp(x) = exp2(x * LOG2E)
_LOG2E = tl.constexpr(LOG2E)  # the same, for use inside kernels
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreting() -> bool:
    """True when Triton kernels run through the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _fix_interpreter_scalar_index() -> None:
    """Triton 3.6's interpreter turns a scalar tensor into a Python int (for `range(lo, hi)` with
    runtime bounds) via `int(ndarray)`, which NumPy >= 2.3 rejects for its 1-element arrays.
    Re-register `__index__` so it reads the single element; no effect outside the interpreter."""
    try:
        import triton.runtime.interpreter as ti
    except ImportError:  # pragma: no cover
        return
    orig = getattr(ti, "_patch_lang_tensor", None)
    if orig is None or getattr(orig, "_ttc_fixed", False):
        return

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._ttc_fixed = True
    ti._patch_lang_tensor = patched


if interpreting():
    _fix_interpreter_scalar_index()


def check_launchable(name: str, *tensors: torch.Tensor) -> torch.device:
    """All tensors on one device, and that device able to run Triton (CUDA, or CPU + interpreter)."""
    dev = tensors[0].device
    for t in tensors:
        if t.device != dev:
            raise ValueError(f"{name}: all tensors must be on one device, got {dev} and {t.device}")
    if dev.type != "cuda" and not interpreting():
        raise RuntimeError(
            f"{name}: tensors are on {dev}; the Triton kernel needs CUDA tensors, or TRITON_INTERPRET=1 "
            f"set before importing ttc_fast.kernels. On the CPU use {name}_ref instead."
        )
    return dev


@dataclass(frozen=True)
class GpuTarget:
    """What a launch configuration may depend on: the compute capability (90 for sm_90; 0 for the
    CPU interpreter) and the shared memory one block may use (the opt-in maximum), in bytes."""
    capability: int
    max_shared: int

    @property
    def interpreter(self) -> bool:
        return self.capability == 0

    @property
    def name(self) -> str:
        return "interpreter" if self.interpreter else f"sm_{self.capability}"


# Opt-in shared memory per block by compute capability (CUDA programming guide, table of
# technical specifications): the fallback when torch does not report it.
MAX_SHARED_PER_BLOCK = {80: 166_912, 86: 101_376, 87: 166_912, 89: 101_376, 90: 232_448, 100: 232_448,
                        103: 232_448, 120: 101_376}
INTERPRETER = GpuTarget(0, 1 << 30)


def gpu_target(capability: int) -> GpuTarget:
    """The target of a GPU of this compute capability (e.g. 80 for A100), for ahead-of-time checks."""
    return GpuTarget(capability, MAX_SHARED_PER_BLOCK.get(capability, 101_376))


def launch_target(device: torch.device) -> GpuTarget:
    """The target kernels launched on `device` run on: the interpreter, or the CUDA device's own."""
    if interpreting() or device.type != "cuda":
        return INTERPRETER
    return _cuda_target(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_target(index: int) -> GpuTarget:
    props = torch.cuda.get_device_properties(index)
    capability = props.major * 10 + props.minor
    shared = getattr(props, "shared_memory_per_block_optin", 0) or gpu_target(capability).max_shared
    return GpuTarget(capability, int(shared))


def use_fp32_dot(dtype: torch.dtype, target: GpuTarget) -> bool:
    """Do tl.dot on fp32-cast operands (exact IEEE fp32): always in the interpreter (its bf16 dot is
    wrong) and for fp32 caches (so no TF32 rounding); fp16/bf16 on a GPU use the native MMA."""
    return target.interpreter or dtype == torch.float32


def check_pow2_head_dim(name: str, d: int) -> None:
    assert d >= 16 and (d & (d - 1)) == 0, f"{name}: head_dim must be a power of two >= 16, got {d}"


def check_cache(name: str, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    assert k_cache.dim() == 4, f"{name}: k_cache must be [num_blocks, block_size, Hkv, D], got {tuple(k_cache.shape)}"
    assert v_cache.shape == k_cache.shape, f"{name}: v_cache shape {tuple(v_cache.shape)} != k_cache {tuple(k_cache.shape)}"
    assert k_cache.dtype == v_cache.dtype and k_cache.dtype in FLOAT_DTYPES, (
        f"{name}: caches must share one dtype among fp32/fp16/bf16, got {k_cache.dtype}, {v_cache.dtype}")
    assert k_cache.stride(3) == 1 and v_cache.stride(3) == 1, f"{name}: cache head_dim must be contiguous"


@triton.jit
def attend_paged_tiles(q, k_ptr, v_ptr, table_ptr, kvh, lo, hi, qpos, sk_b, sk_p, sk_h, sv_b, sv_p, sv_h, scale_log2,
                       ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                       CAUSAL: tl.constexpr, FP32_DOT: tl.constexpr):
    """Online-softmax attention of q [ROWS, HEAD_DIM] (fp32 when FP32_DOT) over one sequence's
    paged KV positions [lo, hi) of kv head `kvh`, read through its block table `table_ptr` in
    tiles of BLOCK_N (a tile may span cache blocks). CAUSAL: row r sees positions <= qpos[r].
    Returns (out [ROWS, HEAD_DIM] fp32, lse [ROWS] fp32 natural log; -inf for a row that saw none)."""
    d = tl.arange(0, HEAD_DIM)
    m_i = tl.full([ROWS], -1.0e30, tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM], tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        nmask = offs < hi
        blk = tl.load(table_ptr + offs // BLOCK_SIZE, mask=nmask, other=0).to(tl.int64)
        pos = (offs % BLOCK_SIZE).to(tl.int64)
        k = tl.load(k_ptr + blk[:, None] * sk_b + pos[:, None] * sk_p + kvh * sk_h + d[None, :],
                    mask=nmask[:, None], other=0.0)
        v = tl.load(v_ptr + blk[:, None] * sv_b + pos[:, None] * sv_p + kvh * sv_h + d[None, :],
                    mask=nmask[:, None], other=0.0)
        if FP32_DOT:
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        if CAUSAL:
            valid = nmask[None, :] & (offs[None, :] <= qpos[:, None])
        else:
            valid = nmask[None, :]
        s = tl.where(valid, s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if FP32_DOT:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    nonempty = l_i > 0
    out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    lse = tl.where(nonempty, (m_i + tl.log2(tl.where(nonempty, l_i, 1.0))) / _LOG2E, float("-inf"))
    return out, lse


@triton.jit
def lse_merge_base(m):
    """The base of a log-sum-exp merge whose largest lse is m: m, or 0 when every part is empty."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def merged_lse(base, total):
    """The merged lse from the base and the summed weights exp(lse - base); -inf when empty."""
    return tl.where(total > 0, base + tl.log(tl.where(total > 0, total, 1.0)), float("-inf"))
