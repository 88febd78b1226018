"""Host time per engine decode step and per search iteration: what a GPU would wait for.

The models' own work is made tiny (a random Llama: hidden 32, one layer, vocab 320; one torch
thread; CPU) so that what remains is the host's: scheduling, block tables, metadata, sampling
(counted as host work here), stop checks, and the search's and the PRM's bookkeeping. As in
`ttc-fast run`, the objects loaded before the measurement are frozen out of the garbage
collector's way (gc.freeze).

  decode step       `Engine.generate` of S samples of one 40-token prompt, 32 new tokens each
                    (EOS ignored): (wall - time inside the decoder's forward) / decode steps
  search iteration  beam search over S live beams (S/64 problems x 64 beams, width 4, steps of
                    8 emulated tokens) with a tiny math-shepherd PRM: (wall - time inside
                    `Engine.expand` - time inside the PRM's forwards) / iterations, i.e. the
                    search loop and the PRM's bookkeeping; of which the PRM's tokenization of
                    each beam's new step (its format's ids), reported on its own

`--baseline REV` measures the same on a checkout of REV (a git worktree built in place) in the
same run, and prints both side by side.

    python benchmarks/bench_host.py [--sizes 64 256 1024 4096] [--repeats 3] [--baseline REV] [--json host.json]
    python benchmarks/bench_host.py --smoke     # 64 live sequences only, a few seconds
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tests"))

PROMPT_TOKENS, NEW_TOKENS = 40, 32
BEAMS, WIDTH, STEP_TOKENS, ITERATIONS = 64, 4, 8, 4


class ForwardClock:
    """Time spent inside one object's method (the model forward, the PRM's forwards)."""

    def __init__(self, obj, attr: str):
        self.seconds, fn = 0.0, getattr(obj, attr)
        self.original = fn

        def timed(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.seconds += time.perf_counter() - t

        setattr(obj, attr, timed)


def build_models(tmp: Path):
    from prm_builders import build_math_shepherd_prm

    import ttc_fast as tf
    from ttc_fast.testing import build_tiny_model

    tiny = dict(hidden=32, layers=1, heads=4, kv_heads=2, max_position_embeddings=2048)
    policy = tf.load_model(build_tiny_model(tmp / "policy", "llama", seed=0, **tiny), device="cpu")
    prm = build_math_shepherd_prm(tmp / "prm", seed=0, **tiny)
    return policy, prm


def decode_host_ms(policy, size: int) -> float:
    import ttc_fast as tf

    engine = tf.Engine(policy, num_blocks=size * 8 + 64, block_size=16, max_batch_tokens=max(1024, size + 64))
    prompt = list(range(3, 3 + PROMPT_TOKENS))
    params = tf.SamplingParams(temperature=0.8, max_tokens=NEW_TOKENS, n=size, seed=0, ignore_eos=True)
    engine.generate([prompt], tf.SamplingParams(max_tokens=2, n=2, seed=0, ignore_eos=True))  # warm-up
    clock = ForwardClock(policy.module, "forward")
    steps0 = engine.stats["steps"]
    t = time.perf_counter()
    engine.generate([prompt], params)
    wall = time.perf_counter() - t
    steps = engine.stats["steps"] - steps0
    del policy.module.forward
    return 1e3 * (wall - clock.seconds) / steps


def search_host_ms(policy, prm_path, size: int) -> tuple[float, float | None]:
    from bench_search import emulated_steps

    import ttc_fast as tf
    from ttc_fast.data import Problem
    from ttc_fast.prm import scorer as prm_scorer
    from ttc_fast.search import TreeSearch

    engine = tf.Engine(policy, num_blocks=size * 8 + 256, block_size=16, max_batch_tokens=max(1024, size * 2))
    prm = tf.load_prm(prm_path, kind="math-shepherd", device="cpu", num_blocks=size * 8 + 256)
    problems = [Problem(f"p{i}", " ".join(["Natalia sold 48 clips."] * 5), "1", "math", {}) for i in range(size // BEAMS)]
    strategy = emulated_steps(tf.BeamSearch(n=BEAMS, width=WIDTH, iterations=ITERATIONS), lambda p, it, k: STEP_TOKENS)
    sampling = tf.SamplingParams(temperature=0.8, max_tokens=64, seed=0)
    list(TreeSearch(engine, prm, strategy, sampling, system_prompt="").run(problems[:1]))  # warm-up
    expand, prm_forward = ForwardClock(engine, "expand"), ForwardClock(prm.runner, "forward")
    start_many = ForwardClock(prm, "start_many")  # the questions' prefixes: once per problem, not per iteration
    encode = ForwardClock(prm_scorer, "_map_threaded") if hasattr(prm_scorer, "_map_threaded") else None
    t = time.perf_counter()
    list(TreeSearch(engine, prm, strategy, sampling, system_prompt="").run(problems))
    wall = time.perf_counter() - t
    del engine.expand, prm.runner.forward, prm.start_many
    host = 1e3 * (wall - expand.seconds - prm_forward.seconds - start_many.seconds) / ITERATIONS
    # The PRM's tokenization of every beam's new step (in builds that time it on its own).
    tokenize = None
    if encode is not None:
        prm_scorer._map_threaded = encode.original
        tokenize = 1e3 * encode.seconds / ITERATIONS
    return host, tokenize


def measure(sizes: list[int], repeats: int, freeze: bool = True) -> dict:
    """Each figure: the median of `repeats` runs (this shared 2-core machine varies run to run).
    `freeze`: the loaded models out of the garbage collector's way first, as the CLI does."""
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        policy, prm_path = build_models(Path(tmp))
        if freeze:  # as `ttc-fast run` does once its models are loaded
            gc.collect()
            gc.freeze()
        rows = []
        for size in sizes:
            runs = [(decode_host_ms(policy, size), *search_host_ms(policy, prm_path, size)) for _ in range(repeats)]
            decode, search, tokenize = zip(*runs)
            rows.append({"live_sequences": size, "decode_step_host_ms": statistics.median(decode),
                         "search_iteration_host_ms": statistics.median(search),
                         "of_which_prm_tokenize_ms": None if tokenize[0] is None else statistics.median(tokenize),
                         "runs": [list(r) for r in runs]})
            print(json.dumps(rows[-1]), flush=True)
    return {"rows": rows, "repeats": repeats}


def baseline(rev: str, sizes: list[int], repeats: int) -> dict:
    """The same measurement on a worktree of `rev`, its extension built in place."""
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), rev], check=True,
                       capture_output=True)
        try:
            subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=tree, check=True,
                           capture_output=True)
            (tree / "ttc_fast" / "kernels").symlink_to(tree / "kernels")  # as the installed package lays it out
            out = Path(tmp) / "baseline.json"
            env = dict(os.environ, PYTHONPATH=str(tree))
            subprocess.run([sys.executable, str(Path(__file__).resolve()), "--sizes", *map(str, sizes), "--json", str(out),
                            "--repeats", str(repeats), "--tree-only"], cwd=tree, env=env, check=True)
            return json.loads(out.read_text())
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], capture_output=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 1024, 4096])
    ap.add_argument("--baseline", default=None, help="a git revision to measure side by side")
    ap.add_argument("--json", default=None)
    ap.add_argument("--repeats", type=int, default=3, help="runs per size; each figure is their median")
    ap.add_argument("--tree-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--smoke", action="store_true", help="a quick end-to-end check: --sizes 64 only")
    args = ap.parse_args()
    if args.smoke:
        args.sizes, args.repeats = [64], 1
    for size in args.sizes:
        if size % BEAMS:
            ap.error(f"--sizes must be multiples of {BEAMS} (the search runs {BEAMS} beams a problem)")
    import ttc_fast

    ours = measure(args.sizes, args.repeats)
    result = {"info": {"machine": platform.machine(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                       "python": platform.python_version(), "ttc_fast": str(Path(ttc_fast.__file__).parent),
                       "settings": {"prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS, "beams": BEAMS,
                                    "width": WIDTH, "step_tokens": STEP_TOKENS, "iterations": ITERATIONS,
                                    "model": "random Llama, hidden 32, 1 layer, vocab 320, 1 torch thread"}},
              "ours": ours}
    if args.baseline and not args.tree_only:
        result["baseline"] = {"rev": args.baseline, **baseline(args.baseline, args.sizes, args.repeats)}
    if args.json:
        Path(args.json).write_text(json.dumps(result if not args.tree_only else ours, indent=1))
    if args.tree_only:
        return
    base = {r["live_sequences"]: r for r in result.get("baseline", {}).get("rows", [])}
    print(f"{'live sequences':>14} {'decode step host ms':>20} {'search iteration host ms':>25} {'of which PRM tokenize':>22}")
    for r in ours["rows"]:
        b = base.get(r["live_sequences"])
        dec = f"{r['decode_step_host_ms']:.2f}" + (f" ({b['decode_step_host_ms']:.2f})" if b else "")
        srch = f"{r['search_iteration_host_ms']:.2f}" + (f" ({b['search_iteration_host_ms']:.2f})" if b else "")
        tok = "-" if r.get("of_which_prm_tokenize_ms") is None else f"{r['of_which_prm_tokenize_ms']:.2f}"
        print(f"{r['live_sequences']:>14} {dec:>20} {srch:>25} {tok:>22}")
    if base:
        print("(in parentheses: the baseline revision)")


if __name__ == "__main__":
    main()
