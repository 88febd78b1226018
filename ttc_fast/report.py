"""`ttc-fast report RUN.jsonl [RUN2.jsonl ...]`: accuracy against n and against compute, for any
results files of `ttc-fast run` (any task, any strategy).

A run's point is its strategy, its n (the `n` its lines record), the accuracy of a pick over its
problems and the mean cost per problem (policy tokens generated, PRM tokens, FLOPs). A problem's
answer is its final pick: the pick at the LARGEST key of its `correct` (an adaptive strategy may
finish with fewer than n completions); a problem that failed on its own input counts as wrong.
The pick is --pick, by default "weighted" where a run's lines hold it, else "maj" (a run without
a verifier holds only "maj").

Best-of-N family lines (`BEST_OF_N_FAMILY`) hold picks at every power of two from one run, read
from its first samples; the report gives those smaller n as points of their own. Their cost is
the first n samples': policy tokens are the sum of the first n completions' `policy_tokens`,
policy FLOPs the formula of `ttc_fast.flops` on those tokens (the prompt once, each sample's
tokens after it); the PRM's tokens and FLOPs are not recorded per sample, so they are the run's
scaled by the first n samples' share of its policy tokens, an estimate (marked "~" in the table).

Runs are grouped into curves by strategy name: several files of one strategy at different n make
one curve. Where two runs give a point at the same (strategy, n), the plot takes a run's own n
over a smaller n of a larger run, then the larger run.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .flops import ModelCost, context_sum
from .results import RunError, read_results

BEST_OF_N_FAMILY = ("BestOfN", "WeightedBestOfN", "MajorityVote")
PICKS = ("maj", "naive", "weighted")
X_AXES = ("tokens", "flops")


@dataclass(frozen=True)
class Point:
    """One (run, n): the accuracy of `pick` over `problems` and the mean cost per problem (None:
    not recorded). `run_n` is the run's own n; a point with n < run_n reads its first n samples,
    and its PRM cost is an estimate."""

    run: str
    strategy: str
    n: int
    run_n: int
    pick: str
    accuracy: float
    problems: int
    policy_tokens: float
    prm_tokens: float | None
    flops: float | None

    @property
    def estimated(self) -> bool:
        return self.n < self.run_n


def load_runs(paths) -> list[tuple[str, list[dict]]]:
    """(path as given, its records) of each results file; a missing file or one with no lines is
    a RunError."""
    runs = []
    for path in paths:
        if not Path(path).is_file():
            raise RunError(f"results file not found: {path}")
        records = read_results(path)
        if not records:
            raise RunError(f"{path} holds no results lines")
        runs.append((str(path), records))
    return runs


def default_pick(records: list[dict]) -> str:
    """"weighted" when every answered line holds it, else "maj"."""
    finals = [_final(r) for r in records]
    answered = [c for c in finals if c is not None]
    return "weighted" if answered and all("weighted" in c for c in answered) else "maj"


def run_points(name: str, records: list[dict], pick: str | None = None) -> list[Point]:
    """The points of one run: its own n, and for best-of-N family lines each smaller n they hold."""
    if pick is not None and pick not in PICKS:
        raise RunError(f"--pick must be one of {', '.join(PICKS)}, got {pick!r}")
    chosen = pick or default_pick(records)
    for line, r in enumerate(records, start=1):
        final = _final(r)
        if final is not None and chosen not in final:
            raise RunError(f"{name}: line {line} holds no {chosen!r} pick (it has {', '.join(final)}); "
                           f"pass --pick {' or '.join(final)}")
    first = records[0]
    strategy, run_n = str(first.get("strategy")), int(first.get("n"))
    count = len(records)
    points = [Point(
        name, strategy, run_n, run_n, chosen,
        accuracy=sum(bool(c and c[chosen]) for c in map(_final, records)) / count,
        problems=count,
        policy_tokens=sum(int(r.get("policy_tokens", 0)) for r in records) / count,
        prm_tokens=_mean([r.get("prm_tokens") for r in records]),
        flops=_mean([(r.get("compute") or {}).get("flops") for r in records]),
    )]
    if strategy in BEST_OF_N_FAMILY:
        smaller = sorted({int(k) for r in records for k in r.get("correct", {}) if int(k) < run_n})
        points += [_prefix_point(name, strategy, run_n, chosen, records, n) for n in smaller]
    return sorted(points, key=lambda p: p.n)


def _prefix_point(name: str, strategy: str, run_n: int, pick: str, records: list[dict], n: int) -> Point:
    """The point at n < run_n of a best-of-N family run: its first n samples (module docstring)."""
    tokens, prm, flops = [], [], []
    for r in records:
        first = [int(c["policy_tokens"]) for c in r.get("completions", [])[:n]]
        every = sum(int(c["policy_tokens"]) for c in r.get("completions", []))
        share = sum(first) / every if every else 0.0
        tokens.append(sum(first))
        prm.append(None if r.get("prm_tokens") is None else share * r["prm_tokens"])
        flops.append(_prefix_flops(r, first, share))
    correct = [bool(r.get("correct", {}).get(str(n), {}).get(pick)) for r in records]
    return Point(name, strategy, n, run_n, pick, accuracy=sum(correct) / len(records), problems=len(records),
                 policy_tokens=sum(tokens) / len(records), prm_tokens=_mean(prm), flops=_mean(flops))


def _prefix_flops(record: dict, first: list[int], share: float) -> float | None:
    """FLOPs of a best-of-N line's first samples (token counts `first`): the policy's by the
    formula, the PRM's the line's scaled by `share`. None where the line lacks what it needs."""
    compute = record.get("compute") or {}
    cost = ((record.get("models") or {}).get("policy") or {}).get("cost")
    if record.get("error"):
        return 0.0
    if cost is None or compute.get("prm_flops") is None or "policy_tokens_processed" not in compute:
        return None
    prompt = int(compute["policy_tokens_processed"]) - int(record["policy_tokens"])
    # each sample is one expansion of the prompt: its tokens sit at positions prompt, prompt + 1, ...
    context = context_sum(0, prompt) + sum(context_sum(prompt, k) for k in first)
    return ModelCost.from_dict(cost).flops(prompt + sum(first), context) + share * compute["prm_flops"]


def _final(record: dict) -> dict | None:
    """The picks' correctness at the record's largest key (None: the line has none, a failed problem)."""
    correct = record.get("correct") or {}
    return correct[max(correct, key=int)] if correct else None


def _mean(values: list) -> float | None:
    """The mean, or None when any value is unknown (a line written before it was recorded)."""
    if any(v is None for v in values):
        return None
    return sum(values) / len(values)


def curves(points: list[Point]) -> dict[str, list[Point]]:
    """Per strategy, one point per n in increasing n (the choice between runs: module docstring)."""
    best: dict[tuple[str, int], Point] = {}
    for p in points:
        key = (p.strategy, p.n)
        held = best.get(key)
        if held is None or (p.estimated, -p.run_n) < (held.estimated, -held.run_n):
            best[key] = p
    out: dict[str, list[Point]] = {}
    for (strategy, _), p in sorted(best.items()):
        out.setdefault(strategy, []).append(p)
    return out


# --- output ----------------------------------------------------------------------------------------
def table(points: list[Point]) -> str:
    """One row per run and n: strategy, n, pick, accuracy and the mean cost per problem."""
    head = (f"{'run':<28} {'strategy':<18} {'n':>5} {'pick':>8} {'accuracy':>9} {'problems':>8} "
            f"{'policy tok':>11} {'PRM tok':>11} {'FLOPs':>11}")
    lines = [head]
    for p in points:
        mark = "~" if p.estimated else ""
        run = p.run if len(p.run) <= 28 else "..." + p.run[-25:]
        lines.append(f"{run:<28} {p.strategy:<18} {p.n:>5} {p.pick:>8} {100 * p.accuracy:8.1f}% {p.problems:>8} "
                     f"{p.policy_tokens:>11.1f} {_cell(p.prm_tokens, '.1f', mark):>11} {_cell(p.flops, '.3g', mark):>11}")
    if any(p.estimated for p in points):
        lines.append("~ a smaller n of a best-of-N run: the PRM's share estimated from the first n samples' policy tokens")
    return "\n".join(lines)


def _cell(value: float | None, fmt: str, mark: str) -> str:
    return "-" if value is None else mark + format(value, fmt)


def plot(points: list[Point], path, x: str = "tokens") -> list[str]:
    """Two panels in one PNG: accuracy against n, and against the mean policy tokens (x="tokens")
    or FLOPs (x="flops") per problem; a curve per strategy. Returns the strategies whose points
    lacked the x value and were left out of the second panel."""
    if x not in X_AXES:
        raise RunError(f"--x must be one of {', '.join(X_AXES)}, got {x!r}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_n, by_cost) = plt.subplots(1, 2, figsize=(11, 4.2))
    left_out = []
    for strategy, pts in curves(points).items():
        line, = by_n.plot([p.n for p in pts], [100 * p.accuracy for p in pts], marker="o", label=strategy)
        costs = [(p.policy_tokens if x == "tokens" else p.flops, p.accuracy) for p in pts]
        known = [(c, a) for c, a in costs if c is not None and c > 0]
        if len(known) < len(costs):
            left_out.append(strategy)
        if known:
            by_cost.plot([c for c, _ in known], [100 * a for _, a in known], marker="o", color=line.get_color(), label=strategy)
    by_n.set_xscale("log", base=2)
    ns = sorted({p.n for p in points})
    by_n.set_xticks(ns, [str(n) for n in ns])
    by_n.set_xlabel("n (completions per problem)")
    by_cost.set_xscale("log")
    by_cost.set_xlabel("mean policy tokens per problem" if x == "tokens" else "mean FLOPs per problem")
    for ax in (by_n, by_cost):
        ax.set_ylabel("accuracy (%)")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a flops panel may have no curve (none recorded)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return left_out


def report(paths, plot_path=None, x: str = "tokens", pick: str | None = None) -> str:
    """The table of `paths` (results files), and the plot at `plot_path` when given."""
    points = [p for name, records in load_runs(paths) for p in run_points(name, records, pick)]
    text = table(points)
    if plot_path is not None:
        left_out = plot(points, plot_path, x)
        if left_out:
            text += f"\nleft out of the {x} panel where their lines record no (or zero) {x}: {', '.join(left_out)}"
        text += f"\nplot: {plot_path}"
    return text
