"""Kernel benchmarks of ttc_fast (for a GPU session), with a CPU smoke mode.

  python benchmarks/bench_kernels.py [--json PATH]    # CUDA: full shapes, triton.testing.do_bench
  python benchmarks/bench_kernels.py --smoke          # tiny shapes; on a CPU it runs the kernels
                                                      # through TRITON_INTERPRET=1 (set here)
Sections:
  1. paged decode attention: achieved bandwidth (all KV bytes of the contexts + q + out) / time,
     Llama-3.1-8B shapes (32 q heads, 8 kv heads, head_dim 128, bf16), vs the card's measured
     device-to-device copy bandwidth (2 x bytes / time of a large torch copy).
  2. cascade vs plain paged decode: 128 beams sharing a prefix of 128..4096 tokens + 64-token
     own suffixes; speed-up ratio.
  3. fused logsoftmax_topk vs torch log_softmax + topk, vocab 128256, 64 beams, k = 8.
  4. fused sampling vs torch sort-based top-p/top-k sampling.
Targets printed beside the results: decode >= 80% of copy bandwidth, cascade 8x at a 1K prefix,
top-k 3x.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

if "--smoke" in sys.argv and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402

from ttc_fast.kernels import (  # noqa: E402
    cascade_decode_attention, logsoftmax_topk, paged_decode_attention, sample,
)

TARGETS = {"decode_bw_frac": 0.80, "cascade_speedup_1k": 8.0, "topk_speedup": 3.0}


def bench(fn, device, smoke):
    """Median time in ms: triton.testing.do_bench on CUDA, a few wall-clock runs elsewhere."""
    if device.type == "cuda":
        return float(triton.testing.do_bench(fn, warmup=25 if smoke else 100, rep=50 if smoke else 300))
    fn()
    ts = []
    for _ in range(1 if smoke else 3):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    return sorted(ts)[len(ts) // 2]


def copy_bandwidth(device, smoke):
    n = (1 << 20) if smoke or device.type != "cuda" else (1 << 30)
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    ms = bench(lambda: b.copy_(a), device, smoke)
    return 2 * n / (ms * 1e-3) / 1e9


def make_paged(batch, ctx_lens, hkv, d, bs, dtype, device, shared_prefix=0):
    """Random caches and block tables; with shared_prefix, all rows share the prefix's blocks."""
    gen = torch.Generator().manual_seed(0)
    pre_blocks = shared_prefix // bs
    own = [triton.cdiv(c, bs) - pre_blocks for c in ctx_lens]
    nb = pre_blocks + sum(own) + 1
    max_blocks = max(pre_blocks + o for o in own)
    perm = torch.randperm(nb, generator=gen).to(torch.int32)
    tables = torch.zeros(batch, max_blocks, dtype=torch.int32)
    nxt = pre_blocks
    for i, o in enumerate(own):
        tables[i, :pre_blocks] = perm[:pre_blocks]
        tables[i, pre_blocks:pre_blocks + o] = perm[nxt:nxt + o]
        nxt += o
    k = torch.randn(nb, bs, hkv, d, dtype=dtype, device=device)
    v = torch.randn(nb, bs, hkv, d, dtype=dtype, device=device)
    return k, v, tables.to(device), torch.tensor(ctx_lens, dtype=torch.int32, device=device)


def bench_decode(device, smoke, dtype, rows, copy_bw):
    hq, hkv, d, bs = (4, 2, 32, 16) if smoke else (32, 8, 128, 16)
    batch = 2 if smoke else 64
    for ctx in ([40] if smoke else [1024, 2048, 4096, 8192]):
        k, v, bt, lens = make_paged(batch, [ctx] * batch, hkv, d, bs, dtype, device)
        q = torch.randn(batch, hq, d, dtype=dtype, device=device)
        out = torch.empty_like(q)
        ms = bench(lambda: paged_decode_attention(q, k, v, bt, lens, d ** -0.5, out=out, max_context_len=ctx),
                   device, smoke)
        nbytes = 2 * batch * ctx * hkv * d * k.element_size() + 2 * q.numel() * q.element_size()
        bw = nbytes / (ms * 1e-3) / 1e9
        rows.append({"bench": "decode", "batch": batch, "ctx": ctx, "ms": ms, "GB/s": bw,
                     "frac_of_copy": bw / copy_bw, "target": TARGETS["decode_bw_frac"]})


def bench_cascade(device, smoke, dtype, rows):
    hq, hkv, d, bs = (4, 2, 32, 16) if smoke else (32, 8, 128, 16)
    beams, suffix = (4, 5) if smoke else (128, 64)
    for prefix in ([32] if smoke else [128, 256, 512, 1024, 2048, 4096]):
        ctx = [prefix + suffix] * beams
        k, v, bt, lens = make_paged(beams, ctx, hkv, d, bs, dtype, device, shared_prefix=prefix)
        q = torch.randn(beams, hq, d, dtype=dtype, device=device)
        indptr = torch.tensor([0, beams], dtype=torch.int32, device=device)
        plens = torch.tensor([prefix], dtype=torch.int32, device=device)
        out = torch.empty_like(q)
        plain = bench(lambda: paged_decode_attention(q, k, v, bt, lens, d ** -0.5, out=out,
                                                     max_context_len=prefix + suffix), device, smoke)
        casc = bench(lambda: cascade_decode_attention(q, k, v, bt, lens, indptr, plens, d ** -0.5, out=out),
                     device, smoke)
        rows.append({"bench": "cascade", "beams": beams, "prefix": prefix, "suffix": suffix, "plain_ms": plain,
                     "cascade_ms": casc, "speedup": plain / casc,
                     "target": TARGETS["cascade_speedup_1k"] if prefix == 1024 else None})


def bench_topk(device, smoke, rows):
    b, vocab, k = (2, 1000, 8) if smoke else (64, 128256, 8)
    logits = torch.randn(b, vocab, device=device, dtype=torch.float32)
    cum = torch.randn(b, device=device)

    def torch_impl():
        s = cum[:, None] + torch.log_softmax(logits, -1)
        return torch.topk(s, k, dim=-1)

    t_torch = bench(torch_impl, device, smoke)
    t_fused = bench(lambda: logsoftmax_topk(logits, cum, k), device, smoke)
    rows.append({"bench": "logsoftmax_topk", "batch": b, "vocab": vocab, "k": k, "torch_ms": t_torch,
                 "fused_ms": t_fused, "speedup": t_torch / t_fused, "target": TARGETS["topk_speedup"]})


def bench_sampling(device, smoke, rows):
    b, vocab = (2, 1000) if smoke else (64, 128256)
    logits = torch.randn(b, vocab, device=device, dtype=torch.float32) * 3
    temp = torch.full((b,), 0.8, device=device)
    top_k = torch.full((b,), 50, dtype=torch.int32, device=device)
    top_p = torch.full((b,), 0.9, device=device)
    seeds = torch.arange(b, device=device, dtype=torch.int64)
    pos = torch.zeros(b, device=device, dtype=torch.int64)

    def torch_impl():
        x = logits / temp[:, None]
        sv, si = torch.sort(x, dim=-1, descending=True)
        kth = sv.gather(1, (top_k.long() - 1)[:, None])
        sv = sv.masked_fill(sv < kth, float("-inf"))
        p = torch.softmax(sv, -1)
        mask = (torch.cumsum(p, -1) - p) >= top_p[:, None]
        p = p.masked_fill(mask, 0.0)
        pick = torch.multinomial(p, 1)
        return si.gather(1, pick)

    t_torch = bench(torch_impl, device, smoke)
    t_fused = bench(lambda: sample(logits, temp, top_k, top_p, seeds, pos), device, smoke)
    rows.append({"bench": "sampling", "batch": b, "vocab": vocab, "torch_ms": t_torch, "fused_ms": t_fused,
                 "speedup": t_torch / t_fused})


def fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU interpreter when no GPU)")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    ap.add_argument("--only", choices=["decode", "cascade", "topk", "sampling"], action="append")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        ap.error("no CUDA device: run with --smoke (interpreter, tiny shapes)")
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    only = set(args.only or ["decode", "cascade", "topk", "sampling"])
    info = {
        "device": torch.cuda.get_device_name() if cuda else "cpu (TRITON_INTERPRET=1)",
        "torch": torch.__version__, "triton": triton.__version__, "smoke": args.smoke, "dtype": str(dtype),
    }
    rows: list[dict] = []
    copy_bw = copy_bandwidth(device, args.smoke)
    info["copy_GB/s"] = copy_bw
    if "decode" in only:
        bench_decode(device, args.smoke, dtype, rows, copy_bw)
    if "cascade" in only:
        bench_cascade(device, args.smoke, dtype, rows)
    if "topk" in only:
        bench_topk(device, args.smoke, rows)
    if "sampling" in only:
        bench_sampling(device, args.smoke, rows)
    print(" | ".join(f"{k}: {fmt(v)}" for k, v in info.items()))
    print(f"targets: decode >= {TARGETS['decode_bw_frac']:.0%} of copy bandwidth, cascade "
          f"{TARGETS['cascade_speedup_1k']:g}x at a 1K prefix, logsoftmax_topk {TARGETS['topk_speedup']:g}x")
    for r in rows:
        print("  " + "  ".join(f"{k}={fmt(v)}" for k, v in r.items() if v is not None))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "results": rows}, f, indent=2)
        print(f"wrote {args.json}")
    return rows


if __name__ == "__main__":
    main()
