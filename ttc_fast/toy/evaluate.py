"""The built-in toy evaluation, run by `ttc-fast run` with no arguments.

Policy S (`builtin:toy-policy-s`) searches with the toy PRM (`builtin:toy-prm`, Math-Shepherd
format) under every strategy at N in {1, 4, 16, 64}; greedy decoding of S, of the middle M
(`builtin:toy-policy-m`, about 5x S) and of the larger L (`builtin:toy-policy-l`) are the
references. Each (strategy, N) streams its problems to its own JSONL file under the output
folder (so `--resume` loses nothing), then a table and a PNG plot of accuracy against N and
against policy tokens per strategy, with the greedy accuracies as reference lines, are written.

Best-of-N, majority and weighted best-of-N read their picks at every N from one run of N = 64
samples (the first n samples give the n-sample result), as search-and-learn does. Beam search,
DVTS and particle filtering run once per N; their answer is the weighted pick over their N
completions. At N = 1 the three are one algorithm (one path, one sample per step, nothing to
prune or resample, the same seeds): it runs once and counts for all three.

Beyond them, the strategies that spend compute adaptively run at a few larger N: REBASE
(`REBASE_NS`) and early rejection (`EARLY_REJECT_NS`), adaptive majority and adaptive weighted
best-of-N with the largest N as their cap, and routing by difficulty (its map fitted on the
development problems) with it as its budget. Each cell
records the mean policy tokens per problem beside its accuracy (best-of-N at n: its first n
samples' tokens), and the plot draws accuracy against those tokens beside accuracy against N.
A strategy's answer is its weighted pick over its completions (adaptive majority: the majority
pick), read at the last n it drew.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

NS = (1, 4, 16, 64)
# The adaptive strategies run at fewer N, to keep the job under 10 minutes on 2 cores (at 64,
# REBASE and early rejection took 87 s and 52 s). N = 32 spends half the policy tokens of beam
# search at N = 64: the goal's budget.
REBASE_NS = (16, 32)
EARLY_REJECT_NS = (16, 32)
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
    """(name, N, strategy, the pick that is its answer) of every toy search run."""
    from ..strategies import DVTS, AdaptiveMajority, AdaptiveWeighted, BeamSearch, BestOfN, EarlyReject, ParticleFiltering, Rebase, Routed

    top = max(ns)
    yield "best-of-n", top, BestOfN(n=top), None  # read at every n (see the docstring)
    for n in ns:
        width = min(4, n)
        yield "beam", n, BeamSearch(n=n, width=width, iterations=ITERATIONS), "weighted"
        if n > 1:  # at N = 1 DVTS and particle filtering are beam search (see the docstring)
            yield "dvts", n, DVTS(n=n, width=width, iterations=ITERATIONS), "weighted"
            yield "particle-filtering", n, ParticleFiltering(n=n, iterations=ITERATIONS), "weighted"
    for n in [n for n in REBASE_NS if n <= top]:
        yield "rebase", n, Rebase(n=n, iterations=ITERATIONS), "weighted"
    for n in [n for n in EARLY_REJECT_NS if n <= top]:
        yield "early-reject", n, EarlyReject(n=n, iterations=ITERATIONS), "weighted"
    if top >= 16:  # N is the cap of the adaptive samplers, and routing's budget (its fitted map's)
        yield "adaptive-majority", top, AdaptiveMajority(n=top), "maj"
        yield "adaptive-weighted", top, AdaptiveWeighted(n=top), "weighted"
        routed = Routed.toy(iterations=ITERATIONS)
        yield "routed", routed.budget, routed, "weighted"


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
    from ..identity import run_models
    from ..loader import load_model
    from ..report import run_points
    from ..run import run_search
    from ..sampling import SamplingParams
    from .task import eval_problems

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    problems = eval_problems()
    if limit is not None:
        problems = problems[:limit]
    started = time.perf_counter()

    greedy, greedy_rows = {}, []
    for label, path in (("S", "builtin:toy-policy-s"), ("M", "builtin:toy-policy-m"), ("L", "builtin:toy-policy-l")):
        engine = policy_s(device, backend) if label == "S" else Engine(load_model(path, device=device), backend=backend)
        greedy[label], rows = _greedy_accuracy(engine, problems)
        greedy_rows += [{"model": label, **r} for r in rows]
    (out_dir / "greedy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in greedy_rows))
    if progress:
        print("greedy accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in greedy.items()) + f" on {len(problems)} problems")

    table: dict[str, dict[int, float]] = {}
    tokens_table: dict[str, dict[int, float]] = {}  # mean policy tokens per problem
    tokens = 0
    for name, n, strategy, pick in _configs(ns):
        if progress:
            print(f"{name}, N = {n}", flush=True)
        sampling = SamplingParams(temperature=TEMPERATURE, top_p=1.0, max_tokens=STEP_TOKENS if strategy.stepwise else SOLUTION_TOKENS, seed=seed)
        # Fresh caches for each run: reused pools (their free blocks scattered, most likely) made
        # beam search at N = 64 twice as slow.
        policy = prm = None  # the previous run's pools go before the new ones are allocated
        policy = policy_s(device, backend)
        prm = toy_prm(device=device, backend=backend) if strategy.needs_verifier else None  # majority votes alone
        path = out_dir / f"{name}-n{n}.jsonl"
        # the lines record the models (their FLOPs constants too: `ttc-fast report --x flops`)
        models = run_models(policy.model, prm, "builtin:toy-prm" if prm is not None else None)
        if resume and path.exists():
            outcome = run_search(policy, prm, strategy, sampling, problems, path, resume=True, progress=progress, models=models)
        else:
            outcome = run_search(policy, prm, strategy, sampling, problems, path, overwrite=True, progress=progress, models=models)
        records = outcome.records
        tokens += outcome.new_policy_tokens  # a resumed run counts only what it generated itself
        # `ttc-fast report`'s points: a run's final pick, and best-of-N's first n samples at each n
        if name == "best-of-n":
            for label, key in (("majority", "maj"), ("best-of-n", "naive"), ("weighted best-of-n", "weighted")):
                at = {p.n: p for p in run_points(str(path), records, key)}
                table[label] = {m: at[m].accuracy for m in ns}
                tokens_table[label] = {m: at[m].policy_tokens for m in ns}
        else:
            point, = run_points(str(path), records, pick)
            for same in ([name] if n > 1 or name != "beam" else ["beam", "dvts", "particle-filtering"]):
                table.setdefault(same, {})[n] = point.accuracy
                tokens_table.setdefault(same, {})[n] = point.policy_tokens
    seconds = time.perf_counter() - started
    summary = {"problems": len(problems), "ns": list(ns), "accuracy": table, "policy_tokens_per_problem": tokens_table,
               "greedy": greedy, "greedy_S": greedy["S"], "greedy_L": greedy["L"], "policy_tokens": tokens, "seconds": seconds}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    print(format_table(summary))
    plot(summary, out_dir / "accuracy.png")
    print(f"results in {out_dir}/ (one JSONL per strategy and N, summary.json, accuracy.png); {seconds:.0f} s")
    return summary


def _interpolate(points: list[tuple[float, float]], x: float) -> float | None:
    """Accuracy of a curve of (tokens, accuracy) points at `x` tokens, linear in log tokens
    between measured points; None outside them."""
    points = sorted(points)
    if points and points[-1][0] < x <= 1.02 * points[-1][0]:  # the same cost as the last point, within 2 %
        return points[-1][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            if x1 == x0:
                return max(y0, y1)
            t = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return y0 + t * (y1 - y0)
    return points[0][1] if len(points) == 1 and points[0][0] == x else None


def equal_token_lines(summary: dict) -> list[str]:
    """Each adaptive strategy's cells against beam search and best-of-N at the same mean policy
    tokens per problem (their curves interpolated), and the goal: beam search's accuracy at its
    largest N with at most half its tokens."""
    acc, cost = summary["accuracy"], summary["policy_tokens_per_problem"]

    def curve(name):
        return [(float(cost[name][n]), float(acc[name][n])) for n in acc.get(name, {}) if n in cost.get(name, {})]

    def fmt(value):
        return "-" if value is None else f"{value:.3f}"

    beam, bon = curve("beam"), curve("weighted best-of-n")
    lines = []
    for name in ("rebase", "early-reject", "adaptive-majority", "adaptive-weighted", "routed"):
        for n in sorted(acc.get(name, {}), key=int):
            x, y = float(cost[name][n]), float(acc[name][n])
            b, w = _interpolate(beam, x), _interpolate(bon, x)
            lines.append(f"{name + ' N=' + str(n):<24}{y:>9.3f}{x:>10.0f}{fmt(b):>14}{fmt(w):>16}")
    if beam:
        top = max(acc["beam"], key=int)
        target, budget = float(acc["beam"][top]), float(cost["beam"][top]) / 2
        met = [f"{name} N={n}" for name in acc for n in acc[name]
               if name in cost and n in cost[name] and float(acc[name][n]) >= target and float(cost[name][n]) <= budget]
        lines.append(f"goal: beam search's N={top} accuracy ({target:.3f}) with at most {budget:.0f} policy tokens per problem "
                     f"(half its {2 * budget:.0f}): " + (", ".join(met) if met else "not met"))
    if not lines:
        return []
    return [f"{'at equal tokens':<24}{'accuracy':>9}{'tokens':>10}{'beam there':>14}{'w. bo-N there':>16}"] + lines


def format_table(summary: dict) -> str:
    ns = sorted({int(n) for by_n in summary["accuracy"].values() for n in by_n} | set(summary["ns"]))
    greedy = summary.get("greedy") or {"S": summary["greedy_S"], "L": summary["greedy_L"]}
    tokens = summary.get("policy_tokens_per_problem", {})
    lines = [f"toy task, {summary['problems']} problems: accuracy of policy S with the toy PRM against N "
             "(greedy " + ", ".join(f"{k} {v:.3f}" for k, v in greedy.items()) + "); in brackets, mean policy tokens per problem",
             f"{'strategy':<22}" + "".join(f"{'N=' + str(n):>16}" for n in ns)]

    def cell(name, n):
        by_n = summary["accuracy"][name]
        if n not in by_n and str(n) not in by_n:
            return f"{'':>16}"
        key = n if n in by_n else str(n)
        spent = tokens.get(name, {}).get(key)
        return f"{by_n[key]:>7.3f}" + (f" ({spent:>6.0f})" if spent is not None else " " * 9)

    for name in summary["accuracy"]:
        lines.append(f"{name:<22}" + "".join(cell(name, n) for n in ns))
    lines += equal_token_lines(summary)
    lines.append(f"policy tokens {summary['policy_tokens']}, wall time {summary['seconds']:.0f} s, "
                 f"{summary['policy_tokens'] / max(summary['seconds'], 1e-9):.0f} policy tokens/s")
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> None:
    """Two panels: accuracy against N, and accuracy against mean policy tokens per problem; the
    greedy accuracies of S, M and L as reference lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    greedy = summary.get("greedy") or {"S": summary["greedy_S"], "L": summary["greedy_L"]}
    tokens = summary.get("policy_tokens_per_problem", {})
    fig, (by_n_ax, by_tokens_ax) = plt.subplots(1, 2, figsize=(12.8, 4.8))
    palette = plt.get_cmap("tab20")
    adaptive = ("rebase", "early-reject", "adaptive-majority", "adaptive-weighted", "routed")
    for i, (name, by_n) in enumerate(summary["accuracy"].items()):
        ns = sorted(by_n, key=int)
        # 11 strategies: tab20's dark shades first, then its light ones, so that no two share a colour
        style = dict(marker="s" if name in adaptive else "o", label=name, linestyle="-" if len(ns) > 1 else "none",
                     color=palette((2 * i) % 20 + (2 * i) // 20))
        by_n_ax.plot([int(n) for n in ns], [by_n[n] for n in ns], **style)
        if name in tokens:
            by_tokens_ax.plot([tokens[name][n] for n in ns], [by_n[n] for n in ns], **style)
    for ax in (by_n_ax, by_tokens_ax):
        for (label, acc), style in zip(greedy.items(), (":", "-.", "--")):
            ax.axhline(acc, color="black" if label == "L" else "gray", linestyle=style, label=f"greedy {label}")
        ax.set_ylabel("accuracy")
        ax.set_xscale("log", base=2)
    ticks = sorted({int(n) for by_n in summary["accuracy"].values() for n in by_n} | set(summary["ns"]))
    by_n_ax.set_xticks(ticks, [str(n) for n in ticks])
    by_n_ax.set_xlabel("N (samples / beams; the cap of adaptive strategies)")
    by_tokens_ax.set_xlabel("policy tokens per problem (mean)")
    by_n_ax.set_title(f"toy task: policy S + PRM search ({summary['problems']} problems)")
    by_tokens_ax.set_title("accuracy against compute")
    by_n_ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
