"""Every Triton kernel of ttc_fast against its torch reference, in fp32, fp16 and bf16 (stage 2
of benchmarks/run_gpu.sh).

On CUDA at realistic shapes: head_dim 64 and 128, GQA groups 1 / 4 / 8 (and the odd groups of
real checkpoints: 3, SmolLM2; 7, Qwen2.5-7B), block size 16, ragged context lengths around block
and tile edges up to 4K, shuffled block pools with garbage past each table's end, beams forked
from shared prefixes, vocabularies of 32,000 / 128,256 / 151,936. With --smoke every shape is
tiny and, without CUDA, the kernels run through Triton's interpreter (TRITON_INTERPRET=1, set
here). The interpreter always takes the kernels' fp32 path (`use_fp32_dot`), so the fp16/bf16
tensor-core branch (tl.dot on fp16/bf16 operands) is checked only on a GPU, by this script.

Every case is run and recorded; nothing stops at a failure. For attention outputs the truth is
the reference on float32 copies of the same (rounded) inputs; a case records the kernel's max
abs error against it, the error of the reference's own output rounded to the dtype (`floor`:
what any kernel writing that dtype must at least lose), the largest |truth|, the tolerance
(|err| <= atol + rtol * |truth| elementwise) and ok. Exact kernels (KV store, block copy,
segmented top-k) must match bit for bit; top-k and sampling record token mismatches and
whether each is a tie (top-k) or still an allowed token (sampling).

Work is split into units, one per (kernel family, dtype), shared among `--jobs` worker processes
(12 on CUDA: the kernels' compilation is most of the time, and it runs on the CPU). A worker
streams each case to its parent as it ends; a CUDA fault, a crash or a hang (no unit finished for
--unit-timeout seconds) costs only the unit it was in, recorded as an error, and a fresh worker
takes the slot's remaining units.

    python benchmarks/check_numerics.py [--json PATH] [--jobs N] [--only FAMILY ...] [--dtypes fp32 bf16]
    python benchmarks/check_numerics.py --smoke [--json PATH]      # tiny shapes (CPU: interpreter)

Exit status 0 when every case passed, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

if "--smoke" in sys.argv and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
BS = 16  # KV block size, as the engine's default
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Attention tolerances against the float32 truth (elementwise |err| <= atol + rtol * |truth|).
ATTN_TOL = {"fp32": (1e-4, 1e-4), "fp16": (3e-3, 3e-3), "bf16": (2e-2, 2e-2)}
LSE_TOL = {"fp32": (1e-4, 1e-5), "fp16": (2e-3, 1e-4), "bf16": (2e-2, 1e-4)}
FAMILIES = ("cascade", "decode", "extend", "sampling", "logsoftmax_topk", "kv_store", "block_copy", "merge",
            "segmented_topk")  # the costly ones (most kernel compilations) first
FP32_ONLY = {"segmented_topk"}  # its scores are fp32 by contract


# ---------------------------------------------------------------------------------------- shapes
def shapes(smoke: bool) -> dict:
    """(Hq, Hkv, D) head layouts and the sizes of each family's inputs."""
    if smoke:
        return {
            "heads": [(8, 2, 64)],   # GQA group 4
            "extra_heads": [],
            "ctx_edges": [1, 15, 16, 17, 33],
            "rows": 6, "max_ctx": 48, "splits": 2,
            "cascade_groups": [(3, 2), (2, 1), (1, 0)],   # (beams, prefix blocks)
            "cascade_suffix": 20,
            "extend": [(1, 1), (17, 17), (5, 40), (16, 48)],  # (q_len, context_len)
            "store": (40, 2, 64, 8), "copy": (2, 12, 2, 64, 5),
            "vocab": [300], "topk_k": [1, 5], "topk_rows": 3,
            "seg_sizes": [0, 1, 3, 9, 40], "seg_k": [2],
            "sample_rows": 8, "sample_vocab": [300],
            "merge": (6, 4, 64),
        }
    return {
        "heads": [(8, 8, 64), (32, 8, 64), (64, 8, 64), (8, 8, 128), (32, 8, 128), (64, 8, 128)],
        "extra_heads": [(9, 3, 64), (28, 4, 128)],  # SmolLM2 (group 3), Qwen2.5-7B (group 7)
        "ctx_edges": [1, 2, 15, 16, 17, 31, 32, 33, 63, 64, 65, 255, 256, 257, 1000, 2047, 2048, 4095, 4096, 4097],
        "rows": 40, "max_ctx": 4097, "splits": 7,
        "cascade_groups": [(64, 128), (16, 32), (4, 4), (3, 16), (1, 8), (2, 1)],
        "cascade_suffix": 300,
        "extend": [(1, 1), (17, 17), (300, 300), (64, 1000), (1, 2049), (128, 208), (5, 40), (512, 4096)],
        "store": (3000, 8, 128, 512), "copy": (4, 256, 8, 128, 200),
        "vocab": [128256, 151936, 32000], "topk_k": [1, 8, 32], "topk_rows": 64,
        "seg_sizes": [0, 1, 3, 7, 8, 9, 64, 255, 256, 1000, 4096], "seg_k": [4, 16],
        "sample_rows": 256, "sample_vocab": [128256, 32000],
        "merge": (512, 32, 128),
    }


# ---------------------------------------------------------------------------------------- helpers
_KERNELS = []


def kernel_fns(*names):
    """Functions of ttc_fast.kernels; when the package does not import (the C++ extension not
    built), of the same files imported as the top-level package `kernels` from the repository,
    so that this check does not depend on the build."""
    if not _KERNELS:
        try:
            import ttc_fast.kernels as k
        except ImportError as e:
            print(f"ttc_fast.kernels does not import ({e}); using {REPO / 'kernels'} directly", flush=True)
            sys.path.insert(0, str(REPO))
            import kernels as k
        _KERNELS.append(k)
    return tuple(getattr(_KERNELS[0], n) for n in names)


class Recorder:
    def __init__(self, family: str, dtype: str, device: torch.device, emit=None):
        self.family, self.dtype, self.device, self.cases, self.emit = family, dtype, device, [], emit

    def add(self, rec: dict):
        self.cases.append(rec)
        print(line(rec), flush=True)
        if self.emit:
            self.emit(rec)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def run(self, name: str, fn, **shape):
        """Run one case; its dict of measurements (with "ok") is recorded, an exception too."""
        t = time.perf_counter()
        rec = {"family": self.family, "dtype": self.dtype, "case": name, "shape": shape}
        try:
            rec.update(fn())
            self.sync()
        except Exception as e:  # noqa: BLE001 - every failure is a recorded result
            rec.update({"ok": False, "error": f"{type(e).__name__}: {e}"[:2000],
                        "traceback": traceback.format_exc(limit=6)[-3000:]})
        rec["seconds"] = round(time.perf_counter() - t, 3)
        self.add(rec)
        if "error" in rec and self.device.type == "cuda":
            try:
                torch.cuda.synchronize()
            except Exception as e:  # noqa: BLE001
                raise RuntimeError(f"CUDA context unusable after case {name}: {e}") from e


def line(rec: dict) -> str:
    status = "ok  " if rec.get("ok") else "FAIL"
    keys = ("max_abs_err", "floor_abs_err", "max_abs_truth", "lse_max_abs_err", "mismatches", "ties", "disallowed",
            "greedy_mismatches")
    vals = " ".join(f"{k}={rec[k]:.3g}" if isinstance(rec[k], float) else f"{k}={rec[k]}" for k in keys if k in rec)
    err = f" error={rec['error'].splitlines()[0][:200]}" if "error" in rec else ""
    return f"{status} {rec['family']:<16} {rec['dtype']:<4} {rec['case']:<44} {vals}{err}"


def compare(got, truth, floor_out, tol) -> dict:
    """Elementwise |got - truth| <= atol + rtol * |truth|; NaN/Inf anywhere fails."""
    atol, rtol = tol
    g, t = got.float(), truth.float()
    finite = bool(torch.isfinite(g).all())
    err = (g - t).abs()
    excess = (err - (atol + rtol * t.abs())).max().item() if err.numel() else 0.0
    out = {
        "max_abs_err": float(err.max()) if err.numel() else 0.0,
        "floor_abs_err": float((floor_out.float() - t).abs().max()) if err.numel() else 0.0,
        "max_abs_truth": float(t.abs().max()) if t.numel() else 0.0,
        "tol": [atol, rtol], "finite": finite,
        "worst_excess": excess,
        "ok": finite and excess <= 0,
    }
    if err.numel():
        out["worst_index"] = list(map(int, torch.unravel_index(err.argmax(), err.shape)))
    return out


def gen_for(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def randn(shape, dtype, device, g, scale=1.0):
    return (torch.randn(shape, generator=g, device=device) * scale).to(dtype)


def paged_tables(ctx: list[int], gen: torch.Generator, fork_of: dict | None = None, slack: int = 7):
    """Block tables over a shuffled pool (CPU int32). fork_of[i] = (parent, shared full blocks)
    makes row i reuse its parent's leading blocks; entries past a row's blocks are garbage ids."""
    need = [math.ceil(c / BS) for c in ctx]
    fork_of = fork_of or {}
    own = sum(n - fork_of.get(i, (0, 0))[1] for i, n in enumerate(need))
    num_blocks = own + slack
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    width = max(max(need), 1)
    tables = torch.randint(0, num_blocks, (len(ctx), width), generator=gen, dtype=torch.int32)
    for i, n in enumerate(need):
        shared = 0
        if i in fork_of:
            parent, shared = fork_of[i]
            tables[i, :shared] = tables[parent, :shared]
        for j in range(shared, n):
            tables[i, j] = perm.pop()
    return tables, num_blocks


def ragged_lengths(sh: dict, n: int, gen: torch.Generator) -> list[int]:
    edges = list(sh["ctx_edges"])
    extra = torch.randint(1, sh["max_ctx"] + 1, (max(0, n - len(edges)),), generator=gen).tolist()
    return (edges + extra)[:n]


def head_layouts(sh: dict) -> list[tuple[int, int, int]]:
    return sh["heads"] + sh["extra_heads"]


# ---------------------------------------------------------------------------------------- families
def check_decode(rec: Recorder, dt: str, sh: dict):
    paged_decode_attention, paged_decode_attention_ref = kernel_fns("paged_decode_attention", "paged_decode_attention_ref")

    dtype, dev = DTYPES[dt], rec.device
    for ci, (hq, hkv, d) in enumerate(head_layouts(sh)):
        cpu = torch.Generator().manual_seed(100 + ci)
        g = gen_for(dev, 100 + ci)
        half = sh["rows"] // 2
        ctx = ragged_lengths(sh, half, cpu)
        # the second half: forks of the first half, sharing their parents' full leading blocks
        ctx += [c + int(torch.randint(0, 70, (1,), generator=cpu)) for c in ctx]
        fork_of = {half + i: (i, ctx[i] // BS) for i in range(half)}
        order = torch.randperm(len(ctx), generator=cpu)  # forks not next to their parents
        tables, nb = paged_tables(ctx, cpu, fork_of)
        tables, ctx = tables[order].contiguous(), [ctx[i] for i in order.tolist()]
        bt = tables.to(dev)
        ctx_t = torch.tensor(ctx, dtype=torch.int32, device=dev)
        kc, vc = randn((nb, BS, hkv, d), dtype, dev, g), randn((nb, BS, hkv, d), dtype, dev, g)
        for q_scale in ((1.0,) if sh["rows"] < 16 else (1.0, 4.0)):  # 4: peaked softmax (large logits)
            q = randn((len(ctx), hq, d), dtype, dev, g, q_scale)
            scale = d ** -0.5
            truth, truth_lse = paged_decode_attention_ref(q.float(), kc.float(), vc.float(), bt, ctx_t, scale,
                                                          return_lse=True)
            floor = paged_decode_attention_ref(q, kc, vc, bt, ctx_t, scale)
            for splits in (None, sh["splits"]):
                def case(splits=splits, q=q, truth=truth, truth_lse=truth_lse, floor=floor):
                    out = torch.full_like(q, float("nan"))
                    got, lse = paged_decode_attention(q, kc, vc, bt, ctx_t, scale, out=out, return_lse=True,
                                                      num_splits=splits, max_context_len=max(ctx))
                    r = compare(got, truth, floor, ATTN_TOL[dt])
                    lr = compare(lse, truth_lse, truth_lse, LSE_TOL[dt])
                    r["lse_max_abs_err"], r["ok"] = lr["max_abs_err"], r["ok"] and lr["ok"]
                    return r
                rec.run(f"hq{hq}/hkv{hkv}/d{d} q*{q_scale:g} splits={splits or 'auto'}", case,
                        rows=len(ctx), hq=hq, hkv=hkv, d=d, max_ctx=max(ctx), num_blocks=nb)
        # kv_start (the cascade's suffix pass): ranges [start, ctx), some empty
        if (hq, hkv, d) in sh["heads"][1:2] + sh["heads"][-1:]:  # group 4 at d 64, group 8 at d 128
            start = torch.tensor([int(torch.randint(0, c + 1, (1,), generator=cpu)) for c in ctx], dtype=torch.int32)
            start[:3] = torch.tensor(ctx[:3], dtype=torch.int32)  # empty ranges: out 0, lse -inf
            start = start.to(dev)
            q = randn((len(ctx), hq, d), dtype, dev, g)

            def case_start(q=q, start=start):
                truth, tl_ = paged_decode_attention_ref(q.float(), kc.float(), vc.float(), bt, ctx_t, d ** -0.5,
                                                        kv_start=start, return_lse=True)
                floor = paged_decode_attention_ref(q, kc, vc, bt, ctx_t, d ** -0.5, kv_start=start)
                got, lse = paged_decode_attention(q, kc, vc, bt, ctx_t, d ** -0.5, kv_start=start, return_lse=True,
                                                  num_splits=sh["splits"])
                r = compare(got, truth, floor, ATTN_TOL[dt])
                empty = start >= ctx_t
                empty_ok = bool((got[empty] == 0).all()) and bool(torch.isneginf(lse[empty]).all())
                lr = compare(lse[~empty], tl_[~empty], tl_[~empty], LSE_TOL[dt])
                r.update({"lse_max_abs_err": lr["max_abs_err"], "empty_rows_ok": empty_ok,
                          "ok": r["ok"] and lr["ok"] and empty_ok})
                return r
            rec.run(f"hq{hq}/hkv{hkv}/d{d} kv_start", case_start, rows=len(ctx), hq=hq, hkv=hkv, d=d)


def cascade_batch(sh: dict, gen: torch.Generator):
    """Beams of several prompts: group j has `beams` rows sharing `pblocks` full blocks, each row
    with its own suffix; rows shuffled. -> (ctx, tables, num_blocks)."""
    ctx, fork_of = [], {}
    for beams, pblocks in sh["cascade_groups"]:
        parent = len(ctx)
        for j in range(beams):
            suffix = int(torch.randint(1, sh["cascade_suffix"] + 1, (1,), generator=gen))
            ctx.append(pblocks * BS + suffix)
            if j > 0:
                fork_of[parent + j] = (parent, pblocks)
    tables, nb = paged_tables(ctx, gen, fork_of)
    order = torch.randperm(len(ctx), generator=gen)
    return [ctx[i] for i in order.tolist()], tables[order].contiguous(), nb


def check_cascade(rec: Recorder, dt: str, sh: dict):
    cascade_decode_attention, paged_decode_attention_ref, plan_shared_prefix_groups = kernel_fns(
        "cascade_decode_attention", "paged_decode_attention_ref", "plan_shared_prefix_groups")

    dtype, dev = DTYPES[dt], rec.device
    for ci, (hq, hkv, d) in enumerate(sh["heads"]):
        cpu = torch.Generator().manual_seed(200 + ci)
        g = gen_for(dev, 200 + ci)
        ctx, tables, nb = cascade_batch(sh, cpu)
        ctx_t = torch.tensor(ctx, dtype=torch.int32)
        # the engine's planner finds the groups (low thresholds: every shared prefix qualifies,
        # the rest go to one trailing prefix-0 group)
        plan = plan_shared_prefix_groups(tables, ctx_t, BS, min_prefix_tokens=BS, min_group_size=2)
        if plan is None:
            rec.run(f"hq{hq}/hkv{hkv}/d{d} plan", lambda: {"ok": False, "error": "planner found no group"})
            continue
        order, indptr, plens = plan
        bt = tables[order].contiguous().to(dev)
        ctx_d = ctx_t[order].to(dev)
        indptr, plens = indptr.to(dev), plens.to(dev)
        kc, vc = randn((nb, BS, hkv, d), dtype, dev, g), randn((nb, BS, hkv, d), dtype, dev, g)
        q = randn((len(ctx), hq, d), dtype, dev, g)
        scale = d ** -0.5
        truth = paged_decode_attention_ref(q.float(), kc.float(), vc.float(), bt, ctx_d, scale)
        floor = paged_decode_attention_ref(q, kc, vc, bt, ctx_d, scale)
        sizes = (indptr[1:] - indptr[:-1]).tolist()
        bounds = {"max_group_rows": max(sizes), "max_prefix_len": int(plens.max()),
                  "max_suffix_len": int((ctx_t[order] - torch.repeat_interleave(plens.cpu(), torch.tensor(sizes))).max())}
        for with_bounds in (False, True):
            def case(with_bounds=with_bounds):
                out = torch.full_like(q, float("nan"))
                got = cascade_decode_attention(q, kc, vc, bt, ctx_d, indptr, plens, scale, out=out,
                                               **(bounds if with_bounds else {}))
                return compare(got, truth, floor, ATTN_TOL[dt])
            rec.run(f"hq{hq}/hkv{hkv}/d{d} groups={len(sizes)} bounds={with_bounds}", case, rows=len(ctx), hq=hq,
                    hkv=hkv, d=d, group_rows=sizes, prefix_lens=plens.tolist(), max_ctx=max(ctx))


def check_extend(rec: Recorder, dt: str, sh: dict):
    paged_extend_attention, paged_extend_attention_ref = kernel_fns("paged_extend_attention", "paged_extend_attention_ref")

    dtype, dev = DTYPES[dt], rec.device
    for ci, (hq, hkv, d) in enumerate(head_layouts(sh)):
        cpu = torch.Generator().manual_seed(300 + ci)
        g = gen_for(dev, 300 + ci)
        qlens = [q for q, _ in sh["extend"]]
        ctx = [c for _, c in sh["extend"]]
        # one more sequence: a fork of the longest cached one, extending after its shared blocks
        longest = max(range(len(ctx)), key=lambda i: ctx[i] - qlens[i])
        shared = (ctx[longest] - qlens[longest]) // BS
        qlens.append(9)
        ctx.append(shared * BS + 9)
        tables, nb = paged_tables(ctx, cpu, {len(ctx) - 1: (longest, shared)})
        bt = tables.to(dev)
        cu = torch.tensor([0] + torch.tensor(qlens).cumsum(0).tolist(), dtype=torch.int32, device=dev)
        ctx_t = torch.tensor(ctx, dtype=torch.int32, device=dev)
        kc, vc = randn((nb, BS, hkv, d), dtype, dev, g), randn((nb, BS, hkv, d), dtype, dev, g)
        q = randn((sum(qlens), hq, d), dtype, dev, g)
        scale = d ** -0.5

        def case(q=q, kc=kc, vc=vc, bt=bt, cu=cu, ctx_t=ctx_t, qlens=qlens):
            truth = paged_extend_attention_ref(q.float(), kc.float(), vc.float(), bt, cu, ctx_t, max(qlens), scale)
            floor = paged_extend_attention_ref(q, kc, vc, bt, cu, ctx_t, max(qlens), scale)
            # written into rows of a larger buffer, as the backend does after the decode rows
            big = torch.full((q.shape[0] + 3, hq, d), float("nan"), dtype=dtype, device=dev)
            paged_extend_attention(q, kc, vc, bt, cu, ctx_t, max(qlens), scale, out=big[3:])
            r = compare(big[3:], truth, floor, ATTN_TOL[dt])
            r["head_rows_untouched"] = bool(torch.isnan(big[:3]).all())
            r["ok"] = r["ok"] and r["head_rows_untouched"]
            return r
        rec.run(f"hq{hq}/hkv{hkv}/d{d} seqs={len(ctx)}", case, hq=hq, hkv=hkv, d=d, q_lens=qlens, context_lens=ctx)


def check_merge(rec: Recorder, dt: str, sh: dict):
    merge_attention_states, merge_attention_states_ref = kernel_fns("merge_attention_states", "merge_attention_states_ref")

    dtype, dev = DTYPES[dt], rec.device
    n, h, d = sh["merge"]
    g = gen_for(dev, 400)
    oa, ob = randn((n, h, d), dtype, dev, g), randn((n, h, d), dtype, dev, g)
    la, lb = randn((n, h), torch.float32, dev, g, 5.0), randn((n, h), torch.float32, dev, g, 5.0)
    la[0], lb[1] = float("-inf"), float("-inf")
    la[2, 0] = lb[2, 0] = float("-inf")

    def case():
        truth, truth_l = merge_attention_states_ref(oa.float(), la, ob.float(), lb)
        floor, _ = merge_attention_states_ref(oa, la, ob, lb)
        out = torch.full_like(oa, float("nan"))
        got, lse = merge_attention_states(oa, la, ob, lb, out=out)
        r = compare(got, truth, floor, ATTN_TOL[dt])
        fin = torch.isfinite(truth_l)
        lr = compare(lse[fin], truth_l[fin], truth_l[fin], (1e-5, 1e-6))
        both_empty_ok = bool((got[2, 0] == 0).all()) and bool(torch.isneginf(lse[2, 0]))
        r.update({"lse_max_abs_err": lr["max_abs_err"], "both_empty_ok": both_empty_ok,
                  "ok": r["ok"] and lr["ok"] and both_empty_ok})
        return r
    rec.run(f"n{n}/h{h}/d{d}", case, n=n, h=h, d=d)


def check_kv_store(rec: Recorder, dt: str, sh: dict):
    store_kv, store_kv_ref = kernel_fns("store_kv", "store_kv_ref")

    dtype, dev = DTYPES[dt], rec.device
    t, hkv, d, nb = sh["store"]
    for hkv_, d_ in ((hkv, d), (max(1, hkv // 2), d // 2)):
        cpu = torch.Generator().manual_seed(500 + d_)
        g = gen_for(dev, 500 + d_)
        kv_new = randn((t, 2, hkv_, d_), dtype, dev, g)  # a fused projection's output: strided views
        key, value = kv_new[:, 0], kv_new[:, 1]
        slots = torch.randperm(nb * BS, generator=cpu)[:t].to(torch.int32)
        slots[torch.randperm(t, generator=cpu)[: t // 10]] = -1  # padding tokens: not stored
        slots = slots.to(dev)
        layers = 2

        def case(key=key, value=value, slots=slots, hkv_=hkv_, d_=d_):
            pool = torch.full((layers, 2, nb, BS, hkv_, d_), 7.0, dtype=dtype, device=dev)  # the engine's pool layout
            ref = pool.clone()
            store_kv(key, value, pool[1, 0], pool[1, 1], slots)
            store_kv_ref(key, value, ref[1, 0], ref[1, 1], slots)
            mism = int((pool != ref).sum())
            return {"mismatches": mism, "ok": mism == 0}
        rec.run(f"t{t}/hkv{hkv_}/d{d_} pool view", case, tokens=t, hkv=hkv_, d=d_, num_blocks=nb)


def check_block_copy(rec: Recorder, dt: str, sh: dict):
    copy_blocks, copy_blocks_ref = kernel_fns("copy_blocks", "copy_blocks_ref")

    dtype, dev = DTYPES[dt], rec.device
    layers, nb, hkv, d, pairs = sh["copy"]
    cpu = torch.Generator().manual_seed(600)
    g = gen_for(dev, 600)
    kv = randn((layers, 2, nb, BS, hkv, d), dtype, dev, g)
    perm = torch.randperm(nb, generator=cpu)
    dst = perm[:pairs]
    src = perm[pairs:][torch.randint(0, nb - pairs, (pairs,), generator=cpu)]  # sources repeat (one parent, many forks)
    mapping = torch.stack([src, dst], 1).to(torch.int32).to(dev)

    def case():
        a, b = kv.clone(), kv.clone()
        copy_blocks(a, mapping)
        copy_blocks_ref(b, mapping)
        mism = int((a != b).sum())
        return {"mismatches": mism, "ok": mism == 0}
    rec.run(f"L{layers}/nb{nb}/hkv{hkv}/d{d} pairs={pairs}", case, layers=layers, num_blocks=nb, pairs=pairs)


def check_logsoftmax_topk(rec: Recorder, dt: str, sh: dict):
    logsoftmax_topk, logsoftmax_topk_ref = kernel_fns("logsoftmax_topk", "logsoftmax_topk_ref")

    dtype, dev = DTYPES[dt], rec.device
    b = sh["topk_rows"]
    for vi, v in enumerate(sh["vocab"]):
        g = gen_for(dev, 700 + vi)
        logits = randn((b, v), torch.float32, dev, g, 3.0)
        logits[1, 10:20] = logits[1].max()  # ties at the top: lower ids first
        logits[2, : v // 2] = float("-inf")
        logits = logits.to(dtype)
        cum = randn((b,), torch.float32, dev, g, 10.0)
        for k in sh["topk_k"]:
            def case(k=k, logits=logits, cum=cum):
                rs, rt = logsoftmax_topk_ref(logits, cum, k)  # float32 math on the same logits: the truth
                gs, gt = logsoftmax_topk(logits, cum, k)
                r = compare(gs, rs, rs, (2e-4, 1e-5))
                lp = torch.log_softmax(logits.float(), -1)
                own = cum[:, None] + lp.gather(1, gt.long().clamp_min(0))  # the truth's score of each kernel token
                mism = gt != rt
                ties = mism & ((own - rs).abs() <= 2e-4)
                r.update({"mismatches": int(mism.sum()), "ties": int(ties.sum()),
                          "ok": r["ok"] and bool((ties == mism).all())})
                return r
            rec.run(f"b{b}/v{v}/k{k}", case, rows=b, vocab=v, k=k)


def check_segmented_topk(rec: Recorder, dt: str, sh: dict):
    segmented_topk, segmented_topk_ref = kernel_fns("segmented_topk", "segmented_topk_ref")

    dev = rec.device
    cpu = torch.Generator().manual_seed(800)
    sizes = sh["seg_sizes"]
    m = sum(sizes)
    scores = torch.randn(m, generator=cpu)
    scores[torch.randint(0, m, (max(1, m // 8),), generator=cpu)] = 0.5  # ties
    scores[torch.randint(0, m, (2,), generator=cpu)] = float("-inf")
    parents = torch.randint(0, 1000, (m,), generator=cpu, dtype=torch.int32)
    indptr = torch.tensor([0] + torch.tensor(sizes).cumsum(0).tolist(), dtype=torch.int32)
    for k in sh["seg_k"]:
        def case(k=k):
            want = segmented_topk_ref(scores, indptr, k, parents)
            got = segmented_topk(scores.to(dev), indptr.to(dev), k, parents.to(dev))
            mism = sum(int((a.cpu() != b).sum()) for a, b in zip(got, want))
            return {"mismatches": mism, "ok": mism == 0}
        rec.run(f"segments={len(sizes)}/m{m}/k{k}", case, segment_sizes=sizes, k=k)


def check_sampling(rec: Recorder, dt: str, sh: dict):
    sample, sample_allowed_mask_ref, sample_ref = kernel_fns("sample", "sample_allowed_mask_ref", "sample_ref")

    dtype, dev = DTYPES[dt], rec.device
    b = sh["sample_rows"]
    for vi, v in enumerate(sh["sample_vocab"]):
        cpu = torch.Generator().manual_seed(900 + vi)
        logits = torch.randn(b, v, generator=cpu) * 2.5
        logits[: b // 4] *= 4.0  # peaked rows
        logits[3, [5, 40]] = logits[3].max() + 1.0  # a greedy tie: lowest id wins
        logits = logits.to(dtype).to(dev)
        temp = torch.rand(b, generator=cpu) * 0.9 + 0.4
        temp[: max(4, b // 8)] = 0.0  # greedy rows
        top_k = torch.tensor([0, 1, 20, 50])[torch.randint(0, 4, (b,), generator=cpu)].to(torch.int32)
        top_p = torch.tensor([1.0, 0.95, 0.9, 0.5])[torch.randint(0, 4, (b,), generator=cpu)]
        seeds = torch.randint(0, 2 ** 62, (b,), generator=cpu)
        pos = torch.randint(0, 10 ** 6, (b,), generator=cpu)
        args = [x.to(dev) for x in (temp, top_k, top_p, seeds, pos)]

        def case(logits=logits, args=args, temp=temp):
            got = sample(logits, *args)
            want = sample_ref(logits, *args)
            allowed = sample_allowed_mask_ref(logits, *args[:3])
            rows = torch.arange(b, device=dev)
            mism = got != want
            greedy = (temp <= 0).to(dev)
            disallowed = int((~allowed[rows, got.clamp(0, v - 1)]).sum())
            r = {"mismatches": int(mism.sum()), "disallowed": disallowed,
                 "greedy_mismatches": int((mism & greedy).sum()), "greedy_tie_row_token": int(got[3])}
            # a sampled row may differ only where two perturbed scores tie within rounding (module docstring)
            r["ok"] = (disallowed == 0 and r["greedy_mismatches"] == 0 and r["greedy_tie_row_token"] == 5
                       and r["mismatches"] <= max(2, b // 100))
            return r
        rec.run(f"b{b}/v{v} mixed greedy/top-k/top-p", case, rows=b, vocab=v)


CHECKS = {"decode": check_decode, "cascade": check_cascade, "extend": check_extend, "merge": check_merge,
          "kv_store": check_kv_store, "block_copy": check_block_copy, "logsoftmax_topk": check_logsoftmax_topk,
          "segmented_topk": check_segmented_topk, "sampling": check_sampling}


# ---------------------------------------------------------------------------------------- driver
def run_unit(family: str, dt: str, smoke: bool, emit=None) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":  # the float32 truths: exact fp32 matmuls, no TF32
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    rec = Recorder(family, dt, device, emit)
    try:
        CHECKS[family](rec, dt, shapes(smoke))
    except Exception as e:  # noqa: BLE001 - set-up failures are results too
        rec.add({"family": family, "dtype": dt, "case": "(unit)", "ok": False,
                 "error": f"{type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc(limit=8)[-3000:]})
    return rec.cases


def units(only, dtypes) -> list[str]:
    """FAMILY:DTYPE units, the costly families (many kernel compilations) first."""
    return [f"{fam}:{dt}" for fam in only for dt in dtypes if not (fam in FP32_ONLY and dt != "fp32")]


def worker(unit_list: list[str], smoke: bool, path: str) -> int:
    """Run units one after the other, appending each case and each finished unit to `path` (JSON
    lines, flushed), so that the parent keeps everything done before a crash or a hang."""
    with open(path, "a") as f:
        def emit(obj):
            f.write(json.dumps(obj, default=str) + "\n")
            f.flush()
        ok = True
        for unit in unit_list:
            fam, dt = unit.split(":")
            emit({"unit_start": unit})
            ok &= all(c.get("ok") for c in run_unit(fam, dt, smoke, lambda c: emit({"case": c})))
            emit({"unit_done": unit})
    return 0 if ok else 1


def read_progress(path: Path):
    cases, done, started = [], [], []
    if path.is_file():
        for ln in path.read_text().splitlines():
            try:
                obj = json.loads(ln)
            except json.JSONDecodeError:  # a line cut by a crash
                continue
            if "case" in obj:
                cases.append(obj["case"])
            elif "unit_done" in obj:
                done.append(obj["unit_done"])
            elif "unit_start" in obj:
                started.append(obj["unit_start"])
    return cases, done, started


def run_slot(slot: int, todo: list[str], args, tmp: Path) -> list[dict]:
    """One worker slot: a worker process runs the slot's units; when it dies or makes no progress
    for --unit-timeout seconds, the unit it was in is recorded as an error and a fresh worker
    takes the rest."""
    results: list[dict] = []
    attempt = 0
    while todo:
        attempt += 1
        path = tmp / f"slot{slot}_{attempt}.jsonl"
        log = tmp / f"slot{slot}_{attempt}.log"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", ",".join(todo), "--json", str(path)]
        if args.smoke:
            cmd.append("--smoke")
        t0 = time.perf_counter()
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
            last, n_done, why = time.perf_counter(), 0, None
            while proc.poll() is None:
                time.sleep(0.2)
                _, done, _ = read_progress(path)
                if len(done) > n_done:
                    n_done, last = len(done), time.perf_counter()
                elif time.perf_counter() - last > args.unit_timeout:
                    why = f"no progress for {args.unit_timeout:g} s (hang?): worker killed"
                    proc.kill()
                    proc.wait()
        cases, done, started = read_progress(path)
        text = log.read_text(errors="replace")
        print(f"--- worker {slot}.{attempt}: {len(done)}/{len(todo)} units, exit {proc.returncode}, "
              f"{time.perf_counter() - t0:.1f} s ---\n{text.rstrip()}", flush=True)
        results += cases
        todo = [u for u in todo if u not in done]
        if todo:  # the worker stopped inside todo[0] (or before starting it)
            bad = todo.pop(0)
            fam, dt = bad.split(":")
            results.append({"family": fam, "dtype": dt, "case": "(worker)", "ok": False,
                            "error": why or f"worker exited with status {proc.returncode} inside this unit",
                            "output_tail": text[-3000:]})
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (on a CPU through TRITON_INTERPRET=1)")
    ap.add_argument("--json", metavar="PATH", help="write every case as JSON")
    ap.add_argument("--only", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    ap.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    ap.add_argument("--jobs", type=int, default=None,
                    help="worker processes (default: 12 on CUDA, 1 on the CPU); 0 = everything in this process")
    ap.add_argument("--unit-timeout", type=float, default=None,
                    help="a worker with no finished unit for this long is killed (default 120 s)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # UNIT,UNIT,...: a worker process
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        ap.error("no CUDA device: run with --smoke (interpreter, tiny shapes)")
    if args.worker:
        return worker(args.worker.split(","), args.smoke, args.json)
    if args.unit_timeout is None:
        args.unit_timeout = 120.0
    todo = units(args.only, args.dtypes)
    jobs = args.jobs if args.jobs is not None else (min(12, max(1, (os.cpu_count() or 2) - 2)) if cuda else 1)
    t0 = time.perf_counter()
    if jobs == 0:
        cases = [c for u in todo for c in run_unit(*u.split(":"), args.smoke)]
    else:
        slots = [todo[i::jobs] for i in range(min(jobs, len(todo)))]  # round robin: each slot a mix
        with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(len(slots)) as pool:
            cases = [c for r in pool.map(lambda a: run_slot(a[0], a[1], args, Path(tmp)), enumerate(slots)) for c in r]
    failed = [c for c in cases if not c.get("ok")]
    import triton

    info = {
        "device": torch.cuda.get_device_name() if cuda else "cpu (TRITON_INTERPRET=1)",
        "capability": list(torch.cuda.get_device_capability()) if cuda else None,
        "torch": torch.__version__, "triton": triton.__version__, "smoke": args.smoke,
        "interpreter": os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
        "units": todo, "jobs": jobs, "seconds": round(time.perf_counter() - t0, 2),
        "cases": len(cases), "failed": len(failed),
        "tolerances": {"attention (abs, rel) vs the fp32 truth": ATTN_TOL, "lse": LSE_TOL},
    }
    print(f"\n{len(cases)} cases, {len(failed)} failed, {info['seconds']:.1f} s on {info['device']}")
    by_unit: dict[str, list[int]] = {}
    for c in cases:
        s = by_unit.setdefault(f"{c['family']}:{c['dtype']}", [0, 0])
        s[0] += 1
        s[1] += 0 if c.get("ok") else 1
    print("  " + "  ".join(f"{u} {n - f}/{n}" for u, (n, f) in by_unit.items()))
    for c in failed:
        print("  " + line(c))
    if args.json:
        Path(args.json).write_text(json.dumps({"info": info, "failed": [f"{c['family']}:{c['dtype']} {c['case']}"
                                                                         for c in failed], "cases": cases},
                                              indent=1, default=str))
        print(f"wrote {args.json}")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
