"""The built-in toy evaluation, run by `ttc-fast run` with no arguments.

Policy S (`builtin:toy-policy-s`) searches with the toy PRM (`builtin:toy-prm`, Math-Shepherd
format) under every strategy at N in {1, 4, 16, 64}; greedy decoding of S and of the larger L
(`builtin:toy-policy-l`) are the references. Each (strategy, N) streams its problems to its own
JSONL file under the output folder (so `--resume` loses nothing), then a table and a PNG plot of
accuracy against N per strategy, with L's greedy accuracy as a reference line, are written.

Best-of-N, majority and weighted best-of-N read their picks at every N from one run of N = 64
samples (the first n samples give the n-sample result), as search-and-learn does. Beam search,
DVTS and particle filtering run once per N; their answer is the weighted pick over their N
completions. At N = 1 the three are one algorithm (one path, one sample per step, nothing to
prune or resample, the same seeds): it runs once and counts for all three.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

NS = (1, 4, 16, 64)
STEP_TOKENS = 48  # longest step of a toy solution, in tokens
SOLUTION_TOKENS = 192  # longest whole solution
ITERATIONS = 10  # toy solutions have at most 7 steps
# Sampling temperature of every search: at 0.4 even the exact checker's beam search stays below
# L greedy (0.912 at N = 64), from 0.6 up it passes it (0.944); search-and-learn's 0.8 suits real
# models, where tiny S writes worse samples.
TEMPERATURE = 0.6


def _greedy_accuracy(engine, problems) -> tuple[float, list[dict]]:
    from ..grading import extract_answer, grade
    from ..prompts import encode_prompt
    from ..sampling import SamplingParams

    prompts = [encode_prompt(p.question, engine.tokenizer) for p in problems]
    outs = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=SOLUTION_TOKENS))
    rows = []
    for p, o in zip(problems, outs):
        answer = extract_answer(o.text)
        rows.append({"id": p.id, "answer": answer, "gold": p.answer, "correct": bool(answer is not None and grade(answer, p.answer, p.kind))})
    return sum(r["correct"] for r in rows) / max(1, len(rows)), rows


def _configs(ns):
    from ..strategies import DVTS, BeamSearch, BestOfN, ParticleFiltering

    top = max(ns)
    yield "best-of-n", top, BestOfN(n=top)
    for n in ns:
        width = min(4, n)
        yield "beam", n, BeamSearch(n=n, width=width, iterations=ITERATIONS)
        if n > 1:  # at N = 1 DVTS and particle filtering are beam search (see the docstring)
            yield "dvts", n, DVTS(n=n, width=width, iterations=ITERATIONS)
            yield "particle-filtering", n, ParticleFiltering(n=n, iterations=ITERATIONS)


def policy_s(device: str | None = None, backend: str = "auto"):
    """A fresh engine for policy S, as every toy search runs it."""
    from ..engine import Engine
    from ..loader import load_model

    # A fixed 256 MiB of KV cache (on the CPU, the default): on a GPU the default would size
    # itself from free memory, which the previous run's pool may still hold
    return Engine(load_model("builtin:toy-policy-s", device=device), backend=backend, kv_cache_bytes=256 << 20)


def toy_prm(path: str | Path = "builtin:toy-prm", device: str | None = None, backend: str = "auto"):
    """A fresh math-shepherd PRM (the shipped toy PRM by default), as every toy search runs it."""
    from ..prm import load_prm

    # 1 GiB of PRM cache: enough for every beam of many problems in flight at N = 64
    return load_prm(str(path), kind="math-shepherd", device=device, backend=backend, kv_cache_bytes=1 << 30)


def run_toy(out_dir: str | Path = "runs/toy", limit: int | None = None, ns=NS, resume: bool = False,
            progress: bool = True, seed: int = 0, device: str | None = None, backend: str = "auto") -> dict:
    """Run the whole toy evaluation; returns the accuracy table (also written to summary.json)."""
    from ..engine import Engine
    from ..loader import load_model
    from ..run import run_search
    from ..sampling import SamplingParams
    from .task import eval_problems

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    problems = eval_problems()
    if limit is not None:
        problems = problems[:limit]
    started = time.perf_counter()
    policy = policy_s(device, backend)
    larger = Engine(load_model("builtin:toy-policy-l", device=device), backend=backend)

    table: dict[str, dict[int, float]] = {}
    acc_s, rows_s = _greedy_accuracy(policy, problems)
    acc_l, rows_l = _greedy_accuracy(larger, problems)
    (out_dir / "greedy.jsonl").write_text("".join(json.dumps({"model": m, **r}) + "\n" for m, rows in (("S", rows_s), ("L", rows_l)) for r in rows))
    table["greedy S"] = {1: acc_s}
    table["greedy L"] = {1: acc_l}
    if progress:
        print(f"greedy accuracy: S {acc_s:.3f}, L {acc_l:.3f} on {len(problems)} problems")

    tokens = 0
    for name, n, strategy in _configs(ns):
        if progress:
            print(f"{name}, N = {n}", flush=True)
        sampling = SamplingParams(temperature=TEMPERATURE, top_p=1.0, max_tokens=SOLUTION_TOKENS if name == "best-of-n" else STEP_TOKENS, seed=seed)
        # Fresh caches for each run: reused pools (their free blocks scattered, most likely) made
        # beam search at N = 64 twice as slow.
        policy = prm = None  # the previous run's pools go before the new ones are allocated
        policy, prm = policy_s(device, backend), toy_prm(device=device, backend=backend)
        path = out_dir / f"{name}-n{n}.jsonl"
        if resume and path.exists():
            outcome = run_search(policy, prm, strategy, sampling, problems, path, resume=True, progress=progress)
        else:
            outcome = run_search(policy, prm, strategy, sampling, problems, path, overwrite=True, progress=progress)
        records = outcome.records
        tokens += outcome.new_policy_tokens  # a resumed run counts only what it generated itself
        if name == "best-of-n":
            for label, key in (("majority", "maj"), ("best-of-n", "naive"), ("weighted best-of-n", "weighted")):
                table[label] = {m: _mean(r["correct"][str(m)][key] for r in records) for m in ns}
        else:
            acc = _mean(r["correct"][str(n)]["weighted"] for r in records)
            for same in ([name] if n > 1 else ["beam", "dvts", "particle-filtering"]):
                table.setdefault(same, {})[n] = acc
    seconds = time.perf_counter() - started
    summary = {"problems": len(problems), "ns": list(ns), "accuracy": table, "greedy_S": acc_s, "greedy_L": acc_l,
               "policy_tokens": tokens, "seconds": seconds}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    print(format_table(summary))
    plot(summary, out_dir / "accuracy.png")
    print(f"results in {out_dir}/ (one JSONL per strategy and N, summary.json, accuracy.png); {seconds:.0f} s")
    return summary


def _mean(values) -> float:
    values = list(values)
    return sum(bool(v) for v in values) / max(1, len(values))


def format_table(summary: dict) -> str:
    ns = summary["ns"]
    lines = [f"toy task, {summary['problems']} problems: accuracy of policy S with the toy PRM against N "
             f"(greedy S {summary['greedy_S']:.3f}, greedy L {summary['greedy_L']:.3f})",
             f"{'strategy':<22}" + "".join(f"{'N=' + str(n):>9}" for n in ns)]
    for name, by_n in summary["accuracy"].items():
        if name.startswith("greedy"):
            continue
        lines.append(f"{name:<22}" + "".join(f"{by_n[n]:>9.3f}" if n in by_n else f"{'':>9}" for n in ns))
    lines.append(f"policy tokens {summary['policy_tokens']}, wall time {summary['seconds']:.0f} s, "
                 f"{summary['policy_tokens'] / max(summary['seconds'], 1e-9):.0f} policy tokens/s")
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, by_n in summary["accuracy"].items():
        if name.startswith("greedy"):
            continue
        ns = sorted(int(n) for n in by_n)
        ax.plot(ns, [by_n[n] for n in ns], marker="o", label=name)
    ax.axhline(summary["greedy_L"], color="black", linestyle="--", label="greedy L (larger model)")
    ax.axhline(summary["greedy_S"], color="gray", linestyle=":", label="greedy S")
    ax.set_xscale("log", base=2)
    ax.set_xticks(summary["ns"], [str(n) for n in summary["ns"]])
    ax.set_xlabel("N (samples / beams)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"toy task: small policy + PRM search ({summary['problems']} problems)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
