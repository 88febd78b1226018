"""Benchmark: C++ BlockManager vs the pure-Python PyBlockManager on beam-search block churn.

Workload (identical operation sequence for both, pre-generated so only the manager is timed):
one prompt of --prompt tokens, forked into --beams beams; each iteration runs --steps decode
steps (append_batch of one token per beam), keeps the best --keep beams (frees the others), forks
each kept beam --beams/--keep times and frees the parent. Reports ops/s (one op = one sequence's
append in a batch, one forked child, or one free), per-decode-step latency, and the cost of
building the [beams, W] block table. Usage:

    python benchmarks/bench_block_manager.py [--json results.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the Python twin lives with the tests

from ttc_fast.block_manager import BlockManager  # noqa: E402
from block_manager_ref import PyBlockManager  # noqa: E402


def make_trace(args):
    rng = np.random.default_rng(args.seed)
    prompt = rng.integers(0, 32000, args.prompt).tolist()
    steps = [[[int(t)] for t in rng.integers(0, 32000, args.beams)]
             for _ in range(args.iters * args.steps)]
    keeps = [np.sort(rng.permutation(args.beams)[:args.keep]).tolist() for _ in range(args.iters)]
    return prompt, steps, keeps


def run(cls, args, trace):
    """Replay the beam-search churn; returns (seconds, ops, decode-step seconds, manager, beams)."""
    prompt, steps, keeps = trace
    fan = args.beams // args.keep
    m = cls(args.num_blocks, args.block_size)
    ops = 0
    decode_s = 0.0
    t0 = time.perf_counter()
    root = m.new_sequence()
    m.match_prefix(root, prompt)
    m.append(root, prompt)
    beams = m.fork(root, args.beams)
    m.free(root)
    ops += 3 + args.beams
    k = 0
    for it in range(args.iters):
        for _ in range(args.steps):
            s0 = time.perf_counter()
            m.append_batch(beams, steps[k])
            decode_s += time.perf_counter() - s0
            k += 1
            ops += len(beams)
        keep = set(keeps[it])
        for i, b in enumerate(beams):
            if i not in keep:
                m.free(b)
        nxt = []
        for i in keeps[it]:
            nxt.extend(m.fork(beams[i], fan))
            m.free(beams[i])
        ops += (len(beams) - len(keep)) + len(keep) * (fan + 1)
        beams = nxt
    return time.perf_counter() - t0, ops, decode_s, m, beams


def time_block_tables(m, beams, reps):
    m.block_tables(beams)
    t0 = time.perf_counter()
    for _ in range(reps):
        m.block_tables(beams)
    return (time.perf_counter() - t0) / reps


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--beams", type=int, default=256)
    ap.add_argument("--keep", type=int, default=64)
    ap.add_argument("--steps", type=int, default=40, help="decode steps per iteration")
    ap.add_argument("--iters", type=int, default=15)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--num-blocks", type=int, default=16384)
    ap.add_argument("--repeat", type=int, default=3, help="best of N runs per implementation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = ap.parse_args()
    if args.beams % args.keep:
        ap.error("--beams must be a multiple of --keep")

    trace = make_trace(args)
    results = {}
    finals = {}
    for name, cls in (("cpp", BlockManager), ("python", PyBlockManager)):
        best = None
        for _ in range(args.repeat):
            secs, ops, decode_s, m, beams = run(cls, args, trace)
            if best is None or secs < best[0]:
                best = (secs, ops, decode_s)
        m.check_invariants()
        finals[name] = (m.stats(), m.block_tables(beams))
        bt = time_block_tables(m, beams, reps=200 if name == "cpp" else 20)
        secs, ops, decode_s = best
        results[name] = {
            "seconds": secs,
            "ops": ops,
            "ops_per_s": ops / secs,
            "decode_step_us": decode_s / (args.iters * args.steps) * 1e6,
            "block_tables_us": bt * 1e6,
            "block_tables_shape": list(m.block_tables(beams)[0].shape),
            "final_stats": m.stats(),
        }
    # Same policy, same trace: both must end in the very same state.
    (sc, (tc, lc)), (sp, (tp, lp)) = finals["cpp"], finals["python"]
    assert sc == sp and np.array_equal(tc, tp) and np.array_equal(lc, lp), "implementations diverged"

    machine = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "numpy": np.__version__,
    }
    c, p = results["cpp"], results["python"]
    print(f"machine: {machine['platform']} | {machine['processor']} | python {machine['python']} "
          f"| {machine['cpu_count']} cores")
    print(f"workload: prompt {args.prompt}, {args.beams} beams (keep {args.keep} x{args.beams // args.keep}), "
          f"{args.steps} decode steps x {args.iters} iters, block_size {args.block_size}, "
          f"{args.num_blocks} blocks, best of {args.repeat}")
    rows = [
        ("total time (s)", f"{c['seconds']:.3f}", f"{p['seconds']:.3f}", p["seconds"] / c["seconds"]),
        ("ops/s", f"{c['ops_per_s']:,.0f}", f"{p['ops_per_s']:,.0f}", c["ops_per_s"] / p["ops_per_s"]),
        (f"decode step ({args.beams} seqs, us)", f"{c['decode_step_us']:.1f}", f"{p['decode_step_us']:.1f}",
         p["decode_step_us"] / c["decode_step_us"]),
        (f"block_tables {tuple(c['block_tables_shape'])} (us)", f"{c['block_tables_us']:.1f}",
         f"{p['block_tables_us']:.1f}", p["block_tables_us"] / c["block_tables_us"]),
    ]
    w0 = max(len(r[0]) for r in rows)
    print(f"{'metric':<{w0}} | {'C++':>12} | {'Python':>12} | speedup")
    print("-" * (w0 + 44))
    for name, cv, pv, sp_ in rows:
        print(f"{name:<{w0}} | {cv:>12} | {pv:>12} | {sp_:6.1f}x")
    print(f"ops per run: {c['ops']:,}; final: {c['final_stats']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "args": vars(args), "results": results}, f, indent=2)
        print(f"saved {args.json}")


if __name__ == "__main__":
    main()
