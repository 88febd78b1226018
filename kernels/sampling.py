"""Fused token sampling (temperature, top-k, top-p) by the Gumbel-max trick, without a sort.

sample(logits, temperature, top_k, top_p, seeds, positions) -> tokens [B] int64
  logits      [B, V] fp32 / fp16 / bf16 (vocab contiguous)
  temperature [B] fp32   0 = greedy argmax (ties -> lowest token id)
  top_k       [B] int32  0 = off; keep the k highest logits (ties at the k-th value all kept)
  top_p       [B] fp32   1.0 = off; then keep the nucleus of the top-k-renormalised distribution:
                         the highest tokens whose mass reaches top_p (every token whose value
                         ties the threshold kept)
  seeds       [B] int64, positions [B] int64: the random stream (see the hash below)
The sampled token is argmax over allowed tokens of logits/T + Gumbel(u), u = uniform(seed,
position, token id). One program per row; thresholds are found by bisection over the
order-preserving int32 image of the fp32 logits (exact: it converges to an actual logit value):
  t_k = largest value with count(x >= t_k) >= top_k
  t_p = largest value with sum_{x >= t_p} exp((x - max)/T) >= top_p * sum_{x >= t_k} exp((x - max)/T)
and allowed = x >= max(t_k, t_p).

Hash (counter based; identical in torch (int64 with 32-bit masking) and Triton (uint32)):
  mix32(x):  x ^= x >> 16; x = x * 0x21F0AAAD; x ^= x >> 15; x = x * 0x735A2D97; x ^= x >> 15
             (all mod 2**32; "lowbias32" by C. Wellons)
  row key:   h = mix32(seed_lo ^ 0x2545F491); h = mix32(h ^ seed_hi); h = mix32(h ^ pos_lo);
             h = mix32(h ^ pos_hi)    (lo/hi = low/high 32 bits of the int64)
  per token: x = mix32(mix32(h ^ token) ^ 0x5BD1E995)
  uniform:   u = ((x >> 9) + 0.5) * 2**-23, in (0, 1), exact in fp32
  gumbel:    g = -log(-log(u))
`sampling_uniform(seeds, positions, vocab_size)` gives u in torch. Kernel and reference draw the
same token except when two candidates' perturbed scores agree to within float rounding, or a
cumulative mass lands on top_p within rounding (sums are taken in a different order).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import FLOAT_DTYPES, GpuTarget, check_launchable, launch_target

SAMPLE_BLOCK = 4096
SAMPLE_BLOCK_INTERP = 256
I32_MIN = tl.constexpr(-(2 ** 31))
I32_MAX = tl.constexpr(2 ** 31 - 1)
_M32 = 0xFFFFFFFF
_C1, _C2 = 0x21F0AAAD, 0x735A2D97
_ROW_SALT, _TOK_SALT = 0x2545F491, 0x5BD1E995
# Largest gap between a row's best scaled logit and a token that can still win the Gumbel-max:
# 16.64 (largest noise) + 2.81 (largest negative noise), with a margin for rounding.
GUMBEL_SPAN = 19.5


# ---------------------------------------------------------------- hash, torch side (int64 math)
def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int64 tensors holding values in [0, 2**32); products stay below 2**63."""
    x = x ^ (x >> 16)
    x = (x * _C1) & _M32
    x = x ^ (x >> 15)
    x = (x * _C2) & _M32
    return x ^ (x >> 15)


def sampling_row_keys(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    s, p = seeds.long(), positions.long()
    h = _mix32((s & _M32) ^ _ROW_SALT)
    h = _mix32(h ^ ((s >> 32) & _M32))
    h = _mix32(h ^ (p & _M32))
    return _mix32(h ^ ((p >> 32) & _M32))


def sampling_uniform(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The uniforms u [B, V] fp32 in (0, 1) that `sample` draws for (seed, position, token id)."""
    tok = torch.arange(vocab_size, device=seeds.device, dtype=torch.int64)[None, :]
    return token_uniform(sampling_row_keys(seeds, positions)[:, None], tok)


def token_uniform(row_keys: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The uniform drawn for each (row key, token id) pair (broadcasting); row keys come from
    `sampling_row_keys`."""
    x = _mix32(_mix32(row_keys ^ tokens.long()) ^ _TOK_SALT)
    return ((x >> 9).float() + 0.5) * (2.0 ** -23)


# ---------------------------------------------------------------- hash, Triton side (uint32)
@triton.jit
def _mix32_tl(x):
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD).to(tl.uint32)
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97).to(tl.uint32)
    return x ^ (x >> 15)


@triton.jit
def _ordered(x):
    """fp32 -> int32 with the same order (used to bisect over actual float values)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _sample_kernel(
    x_ptr, temp_ptr, topk_ptr, topp_ptr, seed_ptr, pos_ptr, out_ptr, sx_b, V,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    row = x_ptr + b * sx_b
    temp = tl.load(temp_ptr + b)
    top_k = tl.load(topk_ptr + b)
    top_p = tl.load(topp_ptr + b)
    greedy = temp <= 0.0
    sampling = temp > 0.0
    inv_t = 1.0 / tl.where(greedy, 1.0, temp)
    ar = tl.arange(0, BLOCK)

    # pass 1: max and min of the row (in the order-preserving int image)
    kmax = tl.full([], I32_MIN, tl.int32)
    kmin = tl.full([], I32_MAX, tl.int32)
    for v0 in range(0, V, BLOCK):
        offs = v0 + ar
        m = offs < V
        x = tl.load(row + offs, mask=m, other=0.0).to(tl.float32)
        kx = _ordered(x)
        kmax = tl.maximum(kmax, tl.max(tl.where(m, kx, I32_MIN), 0))
        kmin = tl.minimum(kmin, tl.min(tl.where(m, kx, I32_MAX), 0))
    xmax = tl.where(kmax >= 0, kmax, kmax ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)

    # top-k threshold: largest t with count(key >= t) >= top_k  (bisection on int64 keys)
    lo = kmin.to(tl.int64)
    hi = kmax.to(tl.int64)
    if (top_k > 0) & (top_k < V) & sampling:
        while lo < hi:
            mid = lo + (hi - lo + 1) // 2
            cnt = tl.zeros([], tl.int32)
            for v0 in range(0, V, BLOCK):
                offs = v0 + ar
                m = offs < V
                kx = _ordered(tl.load(row + offs, mask=m, other=0.0).to(tl.float32))
                cnt += tl.sum((m & (kx.to(tl.int64) >= mid)).to(tl.int32), 0)
            ok = cnt >= top_k
            lo = tl.where(ok, mid, lo)
            hi = tl.where(ok, hi, mid - 1)
    t_k = lo

    # top-p threshold over the top-k-restricted distribution
    lo = t_k
    hi = kmax.to(tl.int64)
    if (top_p < 1.0) & sampling:
        total = tl.zeros([], tl.float32)
        for v0 in range(0, V, BLOCK):
            offs = v0 + ar
            m = offs < V
            x = tl.load(row + offs, mask=m, other=0.0).to(tl.float32)
            keep = m & (_ordered(x).to(tl.int64) >= t_k)
            total += tl.sum(tl.where(keep, tl.exp((x - xmax) * inv_t), 0.0), 0)
        target = top_p * total
        while lo < hi:
            mid = lo + (hi - lo + 1) // 2
            mass = tl.zeros([], tl.float32)
            for v0 in range(0, V, BLOCK):
                offs = v0 + ar
                m = offs < V
                x = tl.load(row + offs, mask=m, other=0.0).to(tl.float32)
                keep = m & (_ordered(x).to(tl.int64) >= mid)
                mass += tl.sum(tl.where(keep, tl.exp((x - xmax) * inv_t), 0.0), 0)
            ok = mass >= target
            lo = tl.where(ok, mid, lo)
            hi = tl.where(ok, hi, mid - 1)
    thresh = lo

    # final pass: argmax of x/T + gumbel over allowed tokens (plain argmax when greedy)
    seed = tl.load(seed_ptr + b)
    pos = tl.load(pos_ptr + b)
    h = _mix32_tl((seed & 0xFFFFFFFF).to(tl.uint32) ^ 0x2545F491)
    h = _mix32_tl(h ^ ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32))
    h = _mix32_tl(h ^ (pos & 0xFFFFFFFF).to(tl.uint32))
    h = _mix32_tl(h ^ ((pos >> 32) & 0xFFFFFFFF).to(tl.uint32))
    best = tl.full([], float("-inf"), tl.float32)
    best_i = tl.full([], I32_MAX, tl.int32)
    for v0 in range(0, V, BLOCK):
        offs = v0 + ar
        m = offs < V
        x = tl.load(row + offs, mask=m, other=0.0).to(tl.float32)
        allowed = m & (_ordered(x).to(tl.int64) >= thresh)
        r = _mix32_tl(_mix32_tl(h ^ offs.to(tl.uint32)) ^ 0x5BD1E995)
        u = ((r >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07
        g = -tl.log(-tl.log(u))
        score = tl.where(greedy, x, x * inv_t + g)
        score = tl.where(allowed, score, float("-inf"))
        tmax = tl.max(score, 0)
        targ = tl.min(tl.where(allowed & (score == tmax), offs, I32_MAX), 0)
        better = tmax > best
        best_i = tl.where(better, targ, best_i)
        best = tl.where(better, tmax, best)
    # a row whose allowed scores are all -inf (e.g. all logits -inf) falls back to token 0
    best_i = tl.where(best_i == I32_MAX, 0, best_i)
    tl.store(out_ptr + b, best_i.to(tl.int64))


def sample_launch_config(vocab: int, target: GpuTarget) -> dict:
    """Every constexpr and launch option of `_sample_kernel`: the launcher and the compile check
    (kernels/compile_check.py) both take them from here."""
    block = SAMPLE_BLOCK_INTERP if target.interpreter else SAMPLE_BLOCK
    return dict(BLOCK=min(block, triton.next_power_of_2(vocab)), num_warps=4, num_stages=3)


def _check_sample_args(logits, temperature, top_k, top_p, seeds, positions):
    name = "sample"
    assert logits.dim() == 2 and logits.dtype in FLOAT_DTYPES, f"{name}: logits must be [B, V] fp32/fp16/bf16"
    assert logits.stride(1) == 1, f"{name}: logits' vocab dimension must be contiguous"
    B = logits.shape[0]
    for t, nm, dt in ((temperature, "temperature", torch.float32), (top_k, "top_k", torch.int32),
                      (top_p, "top_p", torch.float32), (seeds, "seeds", torch.int64), (positions, "positions", torch.int64)):
        assert t.shape == (B,) and t.dtype == dt, f"{name}: {nm} must be {dt} [B={B}], got {t.dtype} {tuple(t.shape)}"


def sample(logits, temperature, top_k, top_p, seeds, positions, out=None):
    """Sample one token per row (see module docstring). Returns tokens [B] int64."""
    _check_sample_args(logits, temperature, top_k, top_p, seeds, positions)
    dev = check_launchable("sample", logits, temperature, top_k, top_p, seeds, positions)
    B, V = logits.shape
    if out is None:
        out = torch.empty(B, device=dev, dtype=torch.int64)
    assert out.shape == (B,) and out.dtype == torch.int64 and out.is_contiguous(), "sample: out must be int64 [B]"
    if B == 0:
        return out
    _sample_kernel[(B,)](
        logits, temperature.contiguous(), top_k.contiguous(), top_p.contiguous(), seeds.contiguous(),
        positions.contiguous(), out, logits.stride(0), V, **sample_launch_config(V, launch_target(dev)),
    )
    return out


def sample_allowed_mask_ref(logits, temperature, top_k, top_p):
    """[B, V] bool: the tokens `sample` may draw for each row (top-k, then top-p by sort/cumsum;
    ties at a threshold all allowed). Greedy rows allow only their maximal logits."""
    x = logits.float()
    B, V = x.shape
    greedy = temperature <= 0
    k = top_k.long()
    k_on = (k > 0) & (k < V)
    p_on = top_p < 1.0
    if not bool((k_on | p_on).any()):
        # No filtering anywhere: skip the sort (the common case of plain or greedy sampling).
        is_max = x >= x.max(dim=-1, keepdim=True).values
        return torch.where(greedy[:, None], is_max, torch.ones_like(is_max))
    t = torch.where(greedy, torch.ones_like(temperature), temperature)[:, None]
    xs, _ = torch.sort(x, dim=-1, descending=True)
    kth = xs.gather(1, (torch.where(k_on, k, torch.full_like(k, V)) - 1)[:, None])  # [B, 1]
    allowed = x >= kth
    # top-p over the top-k-renormalised distribution: a sorted token stays while the mass before it < top_p
    ps = torch.softmax((xs - xs[:, :1]) / t, dim=-1)
    ps = torch.where(xs >= kth, ps, torch.zeros_like(ps))
    ps = ps / ps.sum(-1, keepdim=True)
    before = torch.cumsum(ps, dim=-1) - ps
    keep_sorted = before < top_p[:, None]
    n_keep = keep_sorted.sum(-1).clamp_min(1)
    p_thresh = xs.gather(1, (n_keep - 1)[:, None])
    allowed &= torch.where(p_on[:, None], x >= p_thresh, torch.ones_like(allowed))
    allowed = torch.where(greedy[:, None], x >= xs[:, :1], allowed)
    return allowed


def sample_ref(logits, temperature, top_k, top_p, seeds, positions, out=None):
    """Pure-torch reference of `sample` (sort/cumsum for top-p, vectorized over rows)."""
    _check_sample_args(logits, temperature, top_k, top_p, seeds, positions)
    B, V = logits.shape
    x = logits.float()
    greedy = temperature <= 0
    if bool(greedy.all()):  # fast path: argmax gives the lowest index among ties, like the kernel
        tok = torch.argmax(x, dim=-1)
        return tok if out is None else out.copy_(tok)
    allowed = sample_allowed_mask_ref(logits, temperature, top_k, top_p)
    t = torch.where(greedy, torch.ones_like(temperature), temperature)[:, None]
    scaled = torch.where(greedy[:, None], x, x * (1.0 / t)).masked_fill(~allowed, float("-inf"))
    # The noise is bounded: u lies in [2^-24, 1 - 2^-24], so g = -log(-log u) lies in
    # [-2.81, 16.64]. A token more than 19.45 below its row's best scaled logit can never win,
    # so noise is only drawn for the others: the same tokens as drawing it for the whole row.
    best = scaled.amax(dim=-1, keepdim=True)
    cand = (scaled >= best - GUMBEL_SPAN) & ~greedy[:, None]
    rows, cols = cand.nonzero(as_tuple=True)
    u = token_uniform(sampling_row_keys(seeds, positions)[rows], cols)
    score = scaled.clone()
    score[rows, cols] += -torch.log(-torch.log(u))
    tok = torch.argmax(score, dim=-1)
    if out is None:
        return tok
    out.copy_(tok)
    return out
