"""Run a pytest selection in N parallel shards (pytest-xdist is not assumed), for stage 3 of
benchmarks/run_gpu.sh: most of the time of the CUDA tests is Triton compiling each kernel
specialisation on the CPU, so shards on a many-core GPU machine cut the wall time several-fold.

    python benchmarks/pytest_shards.py [--jobs N] [--json PATH] -- PYTEST_ARGS...
    e.g. python benchmarks/pytest_shards.py --jobs 8 -- -m cuda tests

Collects the selection once (`--collect-only`), deals the test ids round-robin to the shards,
runs `python -m pytest -q -rfE ID...` per shard (with --jobs 1: pytest once on PYTEST_ARGS), prints each shard's output and one summary
line, and writes the counts and the failed test ids as JSON.
Exit status: 0 all passed; 1 a failure or error; 3 pytest is not importable (nothing ran);
5 nothing collected.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COUNT = re.compile(r"(\d+) (passed|failed|errors?|skipped|deselected|xfailed|xpassed)")


def counts(text: str) -> dict:
    """The counts of pytest's last summary line ("3 passed, 1 failed in 2.0s")."""
    out: dict[str, int] = {}
    for ln in reversed(text.strip().splitlines()):
        found = COUNT.findall(ln)
        if found and (" in " in ln or ln.startswith("=")):
            for n, what in found:
                out["errors" if what.startswith("error") else what] = int(n)
            break
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=4)
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("pytest_args", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    pytest_args = [a for a in args.pytest_args if a != "--"] if args.pytest_args[:1] == ["--"] else args.pytest_args
    result: dict = {"pytest_args": pytest_args, "jobs": args.jobs}

    def finish(rc: int) -> int:
        result["rc"] = rc
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
        return rc

    try:
        import pytest
        result["pytest"] = pytest.__version__
    except ImportError:
        print("pytest is not importable on this machine: no test ran (install pytest to run this stage)")
        result["status"] = "pytest not importable"
        return finish(3)
    t0 = time.perf_counter()
    if args.jobs <= 1:  # one shard: no collection pass
        ids = None
    else:
        col = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *pytest_args],
                             cwd=REPO, capture_output=True, text=True)
        ids = [ln.strip() for ln in col.stdout.splitlines() if "::" in ln and not ln.startswith(("=", " "))]
        result["collected"] = len(ids)
        result["collect_s"] = round(time.perf_counter() - t0, 2)
        if col.returncode not in (0, 5) or not ids:
            print(col.stdout[-5000:] + col.stderr[-5000:])
            print(f"collection: exit {col.returncode}, {len(ids)} tests")
            result["status"] = "nothing collected" if col.returncode in (0, 5) else f"collection failed (exit {col.returncode})"
            return finish(5 if col.returncode in (0, 5) else 1)
    jobs = 1 if ids is None else max(1, min(args.jobs, len(ids)))
    shards = [pytest_args] if ids is None else [ids[i::jobs] for i in range(jobs)]
    if ids is not None:
        print(f"{len(ids)} tests in {jobs} shards (collected in {result['collect_s']} s)", flush=True)

    def run(shard):
        t = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfE", "--tb=short", "-p", "no:cacheprovider", *shard],
                           cwd=REPO, capture_output=True, text=True)
        return p.returncode, p.stdout + p.stderr, time.perf_counter() - t

    with ThreadPoolExecutor(jobs) as pool:
        runs = list(pool.map(run, shards))
    total: dict[str, int] = {}
    failed_ids: list[str] = []
    result["shards"] = []
    for i, (rc, text, secs) in enumerate(runs):
        print(f"--- shard {i + 1}/{jobs}: exit {rc}, {secs:.1f} s ---\n{text.rstrip()}", flush=True)
        c = counts(text)
        for k, v in c.items():
            total[k] = total.get(k, 0) + v
        failed_ids += [ln.split(" ", 1)[1].split(" - ")[0] for ln in text.splitlines() if ln.startswith(("FAILED ", "ERROR "))]
        result["shards"].append({"rc": rc, "seconds": round(secs, 2), "counts": c})
    if ids is None and runs[0][0] == 5:
        result.update({"status": "nothing collected", "counts": total})
        return finish(5)
    n_tests = len(ids) if ids is not None else sum(total.get(k, 0) for k in ("passed", "failed", "errors", "skipped",
                                                                              "xfailed", "xpassed"))
    bad = [r for r, _, _ in runs if r != 0]
    result.update({"counts": total, "failed_tests": failed_ids, "seconds": round(time.perf_counter() - t0, 2),
                   "status": "passed" if not bad else "failed"})
    print(f"\n{n_tests} tests: " + ", ".join(f"{v} {k}" for k, v in total.items())
          + f" ({result['seconds']} s, {jobs} shards)")
    for f in failed_ids:
        print(f"  FAILED {f}")
    return finish(0 if not bad else 1)


if __name__ == "__main__":
    sys.exit(main())
