"""Fit `Routed`'s difficulty -> search map on the toy task's DEVELOPMENT problems (never the
eval set) and write it as the package's toy map (ttc_fast/toy/routing.json).

    python benchmarks/fit_routing.py [--problems 160] [--bins 4] [--tolerance 0.025]

Every candidate choice runs as `Routed` with a one-bin map (the probe, then that choice), so a
choice's accuracy and tokens are what routing to it costs, probe included, and the probe draws
the same samples in every run (same seeds). The probe's difficulty score per problem (the mean
of its probes' last-step PRM scores) comes from the "stop" run; the bin thresholds are its
quantiles over the dev problems (equal-sized bins, as Snell et al. bin by quantile).
With the toy PRM's near-0/1 scores the difficulty is about the share of the probes it
judges right.

Rule, per bin: the cheapest choice (mean policy tokens per problem) whose dev accuracy (the
final pick: the weighted pick over all of a problem's completions) is within `tolerance` of
the bin's best choice. Toy settings as `ttc_fast.toy.evaluate`: policy S, the toy PRM
(math-shepherd), temperature 0.6, steps "\\n\\n", width 4, 10 iterations; max_tokens 192 (a
whole solution: the probe and best-of-N need it; steps stop at the delimiter anyway).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ttc_fast.sampling import SamplingParams  # noqa: E402
from ttc_fast.search import TreeSearch  # noqa: E402
from ttc_fast.strategies.routed import TOY_ROUTING, Routed  # noqa: E402
from ttc_fast.toy import DEV_SEED, dev_problems  # noqa: E402
from ttc_fast.toy.evaluate import ITERATIONS, SOLUTION_TOKENS, TEMPERATURE, policy_s, toy_prm  # noqa: E402

CANDIDATES = ("stop", "bon:4", "bon:16", "early-reject:16", "beam:4", "beam:16", "dvts:16", "beam:64")
PROBE_N, WIDTH, AGGREGATION, SEED = 4, 4, "last", 0


def run_choice(choice: str, problems) -> dict[str, dict]:
    """Per problem id: final-pick correctness, policy tokens, and the probes' scores."""
    routed = Routed(n=PROBE_N, choices=(choice,), budget=64, width=WIDTH, iterations=ITERATIONS, aggregation=AGGREGATION)
    search = TreeSearch(policy_s("cpu"), toy_prm(device="cpu"), routed,
                        SamplingParams(temperature=TEMPERATURE, max_tokens=SOLUTION_TOKENS, seed=SEED))
    out = {}
    for result in search.run(problems):
        final = max(result.correct)
        # the probes are the last PROBE_N completions (they join after the chosen search's)
        out[result.problem_id] = {"correct": result.correct[final]["weighted"], "tokens": result.policy_tokens,
                                  "probe_scores": [c.score for c in result.completions[-PROBE_N:]]}
    return out


def quantile_thresholds(values: list[float], bins: int) -> list[float]:
    """Cuts into `bins` equal-sized bins, each halfway between the neighbouring dev scores: a cut
    on a score itself would route that problem by the PRM's float noise."""
    ordered = sorted(values)
    return [(ordered[len(ordered) * b // bins - 1] + ordered[len(ordered) * b // bins]) / 2 for b in range(1, bins)]


def fit(runs: dict[str, dict[str, dict]], ids: list[str], bins: int, tolerance: float) -> dict:
    difficulty = {i: sum(runs["stop"][i]["probe_scores"]) / PROBE_N for i in ids}
    thresholds = quantile_thresholds(list(difficulty.values()), bins)
    probe = Routed(n=PROBE_N, thresholds=tuple(thresholds), choices=("stop",) * bins)
    table, choices = [], []
    for b in range(bins):
        members = [i for i in ids if probe.bin_of(difficulty[i]) == b]
        results = {c: {"accuracy": sum(runs[c][i]["correct"] for i in members) / max(1, len(members)),
                       "policy_tokens": sum(runs[c][i]["tokens"] for i in members) / max(1, len(members))}
                   for c in runs}
        best = max(r["accuracy"] for r in results.values())
        fit_ = min((c for c in results if results[c]["accuracy"] >= best - tolerance - 1e-12),
                   key=lambda c: results[c]["policy_tokens"])
        choices.append(fit_)
        lo = thresholds[b - 1] if b > 0 else None
        hi = thresholds[b] if b < bins - 1 else None
        table.append({"bin": b, "difficulty_from": lo, "difficulty_to": hi, "problems": len(members), "choice": fit_,
                      "results": results})
    return {"thresholds": thresholds, "choices": choices, "table": table}


def format_table(fitted: dict) -> str:
    lines = [f"{'bin':<4}{'difficulty (probe mean score)':<32}{'n':>4}  " + "".join(f"{c:>18}" for c in fitted["table"][0]["results"])]
    for row in fitted["table"]:
        lo = "-inf" if row["difficulty_from"] is None else f"{row['difficulty_from']:.3f}"
        hi = "inf" if row["difficulty_to"] is None else f"{row['difficulty_to']:.3f}"
        cells = "".join(f"{r['accuracy']:>8.3f} {r['policy_tokens']:>7.0f}{'*' if c == row['choice'] else ' '}"
                        for c, r in row["results"].items())
        lines.append(f"{row['bin']:<4}{f'[{lo}, {hi})':<32}{row['problems']:>4}  {cells}")
    lines.append("cells: dev accuracy (final weighted pick), mean policy tokens per problem (probe included); * = fitted choice")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=160, help="the first K development problems (default 160)")
    parser.add_argument("--bins", type=int, default=4, help="difficulty bins, equal-sized on the dev problems (default 4)")
    parser.add_argument("--tolerance", type=float, default=0.025,
                        help="a choice within this much of the bin's best accuracy may be picked for being cheaper (default 0.025: one problem of a 40-problem bin)")
    parser.add_argument("--out", default=str(TOY_ROUTING), help=f"the map (default {TOY_ROUTING.relative_to(ROOT)})")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args(argv)
    if args.bins < 1 or args.problems < args.bins:
        parser.error("--bins must be >= 1 and --problems >= --bins")
    torch.set_num_threads(args.threads)
    problems = dev_problems()[: args.problems]
    ids = [p.id for p in problems]
    started = time.perf_counter()
    runs = {}
    for choice in CANDIDATES:
        t = time.perf_counter()
        runs[choice] = run_choice(choice, problems)
        acc = sum(r["correct"] for r in runs[choice].values()) / len(ids)
        print(f"{choice:<16} accuracy {acc:.3f}, {sum(r['tokens'] for r in runs[choice].values()) / len(ids):.0f} tokens "
              f"per problem, {time.perf_counter() - t:.0f} s", flush=True)
    for choice in CANDIDATES:  # the probe drew the same samples in every run
        # (to the PRM's batch noise: its float sums depend on which rows share a forward)
        assert all(max(abs(a - b) for a, b in zip(runs[choice][i]["probe_scores"], runs["stop"][i]["probe_scores"])) < 1e-4
                   for i in ids), choice
    fitted = fit(runs, ids, args.bins, args.tolerance)
    routing = {
        "probe_n": PROBE_N, "thresholds": fitted["thresholds"], "choices": fitted["choices"], "budget": 64,
        "width": WIDTH, "iterations": ITERATIONS, "aggregation": AGGREGATION,
        "difficulty": "mean of the probes' aggregated (last-step) PRM scores; bin b = #(thresholds <= score), bin 0 hardest",
        "rule": f"per bin, the cheapest choice (mean policy tokens, probe included) whose dev accuracy (final weighted "
                f"pick) is within {args.tolerance} of the bin's best",
        "fitted_on": {"problems": f"ttc_fast.toy.dev_problems()[:{args.problems}]", "dev_seed": DEV_SEED,
                      "first_id": ids[0], "last_id": ids[-1], "policy": "builtin:toy-policy-s", "prm": "builtin:toy-prm",
                      "prm_kind": "math-shepherd", "temperature": TEMPERATURE, "max_tokens": SOLUTION_TOKENS,
                      "delimiter": "\n\n", "seed": SEED, "bins": args.bins, "tolerance": args.tolerance,
                      "candidates": list(CANDIDATES)},
        "table": fitted["table"],
    }
    Path(args.out).write_text(json.dumps(routing, indent=1) + "\n", encoding="utf-8")
    print(format_table(fitted))
    print(f"map: {list(zip(['-inf'] + [f'{t:.3f}' for t in fitted['thresholds']], fitted['choices']))}")
    print(f"wrote {args.out} in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
