"""Host time per engine decode step and per search iteration: what a GPU would wait for.

The models' own work is made tiny (a random Llama: hidden 32, one layer, vocab 320; one torch
thread; CPU) so that what remains is the host's: scheduling, block tables, metadata, sampling
(counted as host work here), stop checks, and the search's and the PRM's bookkeeping. As in
`ttc-fast run`, the objects loaded before the measurement are frozen out of the garbage
collector's way (gc.freeze).

  decode step       `Engine.generate` of S samples of one 40-token prompt, 32 new tokens each
                    (EOS ignored): (wall - time inside the decoder's forward) / decode steps
  search iteration  beam search over S live beams (S/64 problems x 64 beams, width 4) with a tiny
                    math-shepherd PRM: (wall - time inside `Engine.expand` - time inside the
                    PRM's forwards) / iterations, i.e. the search loop and the PRM's bookkeeping;
                    of which the PRM's tokenization of each beam's new step (its format's ids)
                    that the loop waited for, reported on its own. Two settings of the emulated
                    steps: all of 8 tokens (every beam's step ends in the same decode step), and
                    of 4-12 tokens (mean 8; the paths of a problem differ), where work started
                    on a finished step while others still decode (the PRM's tokenization) can
                    overlap the decoding. The time inside `Engine.expand` per iteration is
                    reported too: on the CPU, work overlapped with decoding makes it longer.

`--baseline REV` measures the same on a checkout of REV (a git worktree built in place) in the
same run, its runs alternating with ours (each in a fresh process, so both see the machine in
the same state), and prints both side by side.

    python benchmarks/bench_host.py [--sizes 64 256 1024 4096] [--repeats 3] [--baseline REV] [--json host.json]
    python benchmarks/bench_host.py --smoke     # 64 live sequences only, a few seconds
"""
from __future__ import annotations

import argparse
import contextlib
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
BEAMS, WIDTH, ITERATIONS = 64, 4, 4
# Emulated step lengths: "fixed" (every step 8 tokens) and "varied" (4-12 tokens, by problem,
# iteration and path: the beams of a problem finish their steps in different decode steps).
STEP_SETTINGS = {"fixed": (8,), "varied": (4, 6, 8, 10, 12)}


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


def search_host_ms(policy, prm_path, size: int, lengths: tuple[int, ...]) -> tuple[float, float | None, float]:
    """(host ms, of which PRM tokenization waited for (None: not timed apart), ms inside
    Engine.expand), per iteration."""
    from bench_search import emulated_steps

    import ttc_fast as tf
    from ttc_fast.data import Problem
    from ttc_fast.prm import scorer as prm_scorer
    from ttc_fast.search import TreeSearch

    engine = tf.Engine(policy, num_blocks=size * 8 + 256, block_size=16, max_batch_tokens=max(1024, size * 2))
    prm = tf.load_prm(prm_path, kind="math-shepherd", device="cpu", num_blocks=size * 8 + 256)
    problems = [Problem(f"p{i}", " ".join(["Natalia sold 48 clips."] * 5), "1", "math", {}) for i in range(size // BEAMS)]
    strategy = emulated_steps(tf.BeamSearch(n=BEAMS, width=WIDTH, iterations=ITERATIONS), lambda p, it, k: lengths[(p * 7 + it * 3 + k) % len(lengths)])
    sampling = tf.SamplingParams(temperature=0.8, max_tokens=64, seed=0)
    list(TreeSearch(engine, prm, strategy, sampling, system_prompt="").run(problems[:1]))  # warm-up
    expand, prm_forward = ForwardClock(engine, "expand"), ForwardClock(prm.runner, "forward")
    start_many = ForwardClock(prm, "start_many")  # the questions' prefixes: once per problem, not per iteration
    # The PRM's step tokenization the loop waited for (builds before the StepEncoder: all of it).
    if hasattr(prm, "encoder"):
        encode = ForwardClock(prm.encoder, "rows")
    else:
        encode = ForwardClock(prm_scorer, "_map_threaded") if hasattr(prm_scorer, "_map_threaded") else None
    t = time.perf_counter()
    list(TreeSearch(engine, prm, strategy, sampling, system_prompt="").run(problems))
    wall = time.perf_counter() - t
    del engine.expand, prm.runner.forward, prm.start_many
    host = 1e3 * (wall - expand.seconds - prm_forward.seconds - start_many.seconds) / ITERATIONS
    # The PRM's tokenization of every beam's new step (in builds that time it on its own).
    tokenize = None
    if encode is not None:
        if hasattr(prm, "encoder"):
            del prm.encoder.rows
        else:
            prm_scorer._map_threaded = encode.original
        tokenize = 1e3 * encode.seconds / ITERATIONS
    return host, tokenize, 1e3 * expand.seconds / ITERATIONS


def measure_once(policy, prm_path, size: int) -> dict:
    """One run at `size`: the decode step's host ms, and per step setting (host ms, tokenization
    waited for, expand ms) of the search."""
    run = {"decode": decode_host_ms(policy, size)}
    for setting, lengths in STEP_SETTINGS.items():
        run[setting] = list(search_host_ms(policy, prm_path, size, lengths))
    return run


def summarize(size: int, runs: list[dict]) -> dict:
    """A table row: each figure the median of the runs (kept in the row)."""
    row = {"live_sequences": size, "decode_step_host_ms": statistics.median(r["decode"] for r in runs)}
    for setting in STEP_SETTINGS:
        search, tokenize, expand = zip(*(r[setting] for r in runs))
        row[setting] = {"search_iteration_host_ms": statistics.median(search),
                        "of_which_prm_tokenize_ms": None if tokenize[0] is None else statistics.median(tokenize),
                        "expand_ms": statistics.median(expand)}
    row["runs"] = runs
    return row


def measure(sizes: list[int], repeats: int, freeze: bool = True) -> list[dict]:
    """`repeats` runs per size, in this process (the checkout it imports).
    `freeze`: the loaded models out of the garbage collector's way first, as the CLI does."""
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        policy, prm_path = build_models(Path(tmp))
        if freeze:  # as `ttc-fast run` does once its models are loaded
            gc.collect()
            gc.freeze()
        return [[measure_once(policy, prm_path, size) for _ in range(repeats)] for size in sizes]


def run_in(tree: Path, size: int) -> dict:
    """One run at `size` in a fresh process importing the checkout at `tree`."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run.json"
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--sizes", str(size), "--repeats", "1",
                        "--json", str(out), "--tree-only"], cwd=tree, env=dict(os.environ, PYTHONPATH=str(tree)),
                       check=True, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())[0][0]


@contextlib.contextmanager
def worktree(rev: str):
    """A worktree of `rev`, its extension built in place."""
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), rev], check=True,
                       capture_output=True)
        try:
            subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=tree, check=True,
                           capture_output=True)
            (tree / "ttc_fast" / "kernels").symlink_to(tree / "kernels")  # as the installed package lays it out
            yield tree
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], capture_output=True)


def side_by_side(rev: str, sizes: list[int], repeats: int) -> tuple[list[dict], list[dict]]:
    """Rows of this checkout and of `rev`, their runs alternating (each in a fresh process; ours
    first in even repeats, the baseline's in odd ones), so that both see the machine in the same
    state."""
    ours, theirs = [], []
    with worktree(rev) as tree:
        for size in sizes:
            pairs = []
            for r in range(repeats):
                if r % 2 == 0:
                    pairs.append((run_in(REPO, size), run_in(tree, size)))
                else:
                    b = run_in(tree, size)
                    pairs.append((run_in(REPO, size), b))
            ours.append(summarize(size, [a for a, _ in pairs]))
            theirs.append(summarize(size, [b for _, b in pairs]))
            print(json.dumps({"ours": ours[-1], "baseline": theirs[-1]}), flush=True)
    return ours, theirs


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

    if args.tree_only:  # one process's runs, for side_by_side
        Path(args.json).write_text(json.dumps(measure(args.sizes, args.repeats)))
        return
    if args.baseline:
        rows, base_rows = side_by_side(args.baseline, args.sizes, args.repeats)
    else:
        rows, base_rows = [summarize(size, runs) for size, runs in zip(args.sizes, measure(args.sizes, args.repeats))], []
    ours = {"rows": rows, "repeats": args.repeats}
    result = {"info": {"machine": platform.machine(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                       "python": platform.python_version(), "ttc_fast": str(Path(ttc_fast.__file__).parent),
                       "settings": {"prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS, "beams": BEAMS,
                                    "width": WIDTH, "step_tokens": STEP_SETTINGS, "iterations": ITERATIONS,
                                    "model": "random Llama, hidden 32, 1 layer, vocab 320, 1 torch thread"}},
              "ours": ours}
    if args.baseline:
        result["baseline"] = {"rev": args.baseline, "rows": base_rows, "repeats": args.repeats}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    base = {r["live_sequences"]: r for r in result.get("baseline", {}).get("rows", [])}
    print(f"{'live':>6} {'decode step':>14}" + "".join(f" {'search, ' + k + ' steps':>22} {'tokenize':>14} {'expand':>14}"
                                                       for k in STEP_SETTINGS))
    for r in ours["rows"]:
        b = base.get(r["live_sequences"])

        def cell(get, width):
            theirs = _read(b, get) if b else None
            text = _ms(_read(r, get)) + (f" ({_ms(theirs)})" if b else "")
            return f" {text:>{width}}"

        line = f"{r['live_sequences']:>6}" + cell(lambda x: x["decode_step_host_ms"], 14)
        for k in STEP_SETTINGS:
            line += (cell(lambda x: x[k]["search_iteration_host_ms"], 22) + cell(lambda x: x[k]["of_which_prm_tokenize_ms"], 14)
                     + cell(lambda x: x[k]["expand_ms"], 14))
        print(line)
    print("host ms per decode step / per search iteration; of which PRM tokenization waited for; ms inside Engine.expand"
          + ("; in parentheses: the baseline revision" if base else ""))


def _read(row, get):
    try:
        return get(row)
    except (KeyError, TypeError):  # a baseline whose JSON predates a column
        return None


def _ms(x) -> str:
    return "-" if x is None else f"{x:.2f}"


if __name__ == "__main__":
    main()
