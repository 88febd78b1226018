"""The results file of `ttc-fast run`: one JSON line per problem, read back, compared, summarized.

Each problem is written as ONE JSON line to OUT as soon as its search finishes (write, flush,
``os.fsync``), so a crash or Ctrl-C loses no finished problem. Lines therefore appear in
completion order, not input order.

Line schema (one object per problem)::

    {"id", "question", "gold", "strategy", "n", "width", "iterations", "aggregation",
     "options": {"delimiter", ...},                     # the strategy's other settings: lookahead
                                                        # (beam, DVTS), temperature (particle filtering)
     "config": {"temperature", "top_p", "max_tokens", "seed"},
     "prompt": {"system_prompt", "chat_template", "chat_template_kwargs"},  # the policy's prompt: the
                                                        # system text, "checkpoint" | "none" | "sha256:..."
     "models": {"policy": {"path", "config_sha256", "cost"},  # what made the line (ttc_fast/identity.py),
                "prm": null | {"spec", "kind", "config_sha256", "cost"}},  # or null from the API without it;
                                                        # cost: {"non_embedding_params", "layers", "q_heads",
                                                        # "head_dim"} (ttc_fast/flops.py), null without a model
     "completions": [{"text", "steps", "step_scores", "score", "answer", "finish_reason",
                      "policy_tokens"}, ...],           # n (adaptive strategies: those drawn, <= n)
     "picks":   {"1": {"maj", "naive", "weighted"}, "2": {...}, "4": {...}, ..., "N": {...}},
     "correct": {"1": {"maj": bool, "naive": bool, "weighted": bool}, ...},
     "policy_tokens",                                     # every token generated, pruned paths too
     "prm_tokens",                                        # tokens the verifier processed (see below)
     "compute": {"policy_tokens_processed",               # the prompt once + policy_tokens
                 "policy_context_sum",                    # their context lengths summed (position p: p + 1)
                 "prm_tokens_processed",                  # = prm_tokens
                 "prm_context_sum",
                 "policy_flops", "prm_flops", "flops"},   # by ttc_fast/flops.py from these and models' costs;
                                                          # null where a cost is not recorded
     "seconds",                                           # wall time of this problem
     "error"}                                             # only on a problem that failed on its own

A problem that fails on its own input (its prompt longer than a model's context, its text
rejected by the chat template) is written as such a line with its reason in "error" and no
completions or picks; the others go on, `--resume` skips it like any finished problem, and the
summary counts it as wrong. Only run-level faults (a missing model, a bad flag) stop a run.

``width`` / ``iterations`` are null for strategies that have none (best-of-N family). Without a
verifier (majority vote) the picks hold "maj" only. Lines written before ``compute`` and the
models' ``cost`` existed lack them; readers treat them as unknown.

What "the same file" means for ``--resume``: a resumed run and an uninterrupted run with the same
data, settings and seed hold the same SET of lines, one per problem id, and the lines of a given
id are the same except for the fields in `VOLATILE_FIELDS`: ``seconds`` (timing) and
``prm_tokens`` (what the PRM ran for a problem depends on what its prefix cache and its evictions
held, so on the problems in flight beside it), and the parts of ``compute`` that follow from the
PRM's tokens (`VOLATILE_COMPUTE`: its context sum, its FLOPs and the total). The policy's part of
``compute`` is not volatile: it counts the prompt whole and each generated token once, whatever
the cache held. Line ORDER is completion order and may differ.
Sampling is seeded per problem from ``--seed`` and the problem's position in the data file, so a
problem's texts, steps, answers and picks do not depend on which others ran beside it. A model
PRM's scores match to about 1e-6, not bit for bit: a batched forward's float sums depend on which
rows share it (so a near-tie between two paths, within that noise, may break the other way). `canonical(records)` gives the comparable form (records without the volatile
fields, sorted by id) and `differences(a, b)` compares two runs' records, floats within 1e-5.

`summarize(records)` renders the summary table from records alone (``python -m ttc_fast.results
OUT.jsonl`` prints it for a results file).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from pathlib import Path

VOLATILE_FIELDS = ("seconds", "prm_tokens")
VOLATILE_COMPUTE = ("prm_tokens_processed", "prm_context_sum", "prm_flops", "flops")  # keys of "compute"


class RunError(ValueError):
    """A problem with the run's inputs; the message names the problem and the fix."""


def strategy_options(strategy) -> dict:
    """The strategy's settings beyond n / width / iterations / aggregation (step delimiter,
    lookahead, particle filtering's temperature): recorded on every line, checked on resume."""
    shown = {"n", "width", "iterations", "aggregation"}
    # tuples as lists, as a line reads back from JSON, so that --resume compares like with like
    return {f.name: _as_json(getattr(strategy, f.name)) for f in dataclasses.fields(strategy) if f.name not in shown}


def _as_json(value):
    return [_as_json(v) for v in value] if isinstance(value, (tuple, list)) else value


# --- results file ----------------------------------------------------------------------------------
SETTINGS = ("strategy", "n", "width", "iterations", "aggregation", "options", "config", "prompt", "models")


def run_settings(strategy, sampling, prompt=None, models=None) -> dict:
    """The settings a results line records (`SETTINGS`); a resumed run must match them. `prompt`
    is the policy's `PromptFormat` (default: the default system prompt, the checkpoint's template);
    `models` the models' identity (`identity.run_models`; None: not recorded, not checked)."""
    from .prompts import PromptFormat

    return {
        "strategy": strategy.name,
        "n": strategy.n,
        "width": getattr(strategy, "width", None),
        "iterations": getattr(strategy, "iterations", None),
        "aggregation": strategy.aggregation,
        "options": strategy_options(strategy),
        "config": {"temperature": sampling.temperature, "top_p": sampling.top_p, "max_tokens": sampling.max_tokens, "seed": sampling.seed},
        "prompt": (prompt or PromptFormat()).settings(),
        "models": models,
    }


def result_to_record(result, strategy, sampling, prompt=None, models=None) -> dict:
    """The JSON line for one SearchResult (see the module docstring)."""
    record = {
        "id": result.problem_id,
        "question": result.question,
        "gold": result.gold,
        **run_settings(strategy, sampling, prompt, models),
        "completions": [
            {
                "text": c.text, "steps": list(c.steps), "step_scores": [float(s) for s in c.step_scores],
                "score": float(c.score), "answer": c.answer, "finish_reason": c.finish_reason, "policy_tokens": int(c.policy_tokens),
            }
            for c in result.completions
        ],
        "picks": {str(k): dict(v) for k, v in sorted(result.picks.items())},
        "correct": {str(k): {p: bool(b) for p, b in v.items()} for k, v in sorted(result.correct.items())},
        "policy_tokens": int(result.policy_tokens),
        "prm_tokens": int(result.prm_tokens),
        "seconds": round(float(result.seconds), 4),
    }
    record["compute"] = compute_fields(result, models)
    if result.error is not None:
        record["error"] = result.error
    return record


def compute_fields(result, models=None) -> dict:
    """A line's "compute": the FLOPs' ingredients of a SearchResult and the FLOPs they come to
    with the models' recorded costs (`flops.record_flops`)."""
    from .flops import record_flops

    compute = {
        "policy_tokens_processed": int(result.policy_tokens_processed),
        "policy_context_sum": int(result.policy_context_sum),
        "prm_tokens_processed": int(result.prm_tokens),
        "prm_context_sum": int(result.prm_context_sum),
    }
    return {**compute, **record_flops(compute, models)}


def line_settings(record: dict, strategy) -> dict:
    """A line's settings; a line from before lines recorded `options` (or `prompt`) was written
    with the strategy class's defaults (and the default prompt), the only ones the CLI could set then."""
    from .prompts import PromptFormat

    settings = {k: record.get(k) for k in SETTINGS}
    # Options a line does not name (it predates them) had the strategy class's defaults.
    defaults = {f.name: f.default for f in dataclasses.fields(strategy)}
    settings["options"] = {**{k: _as_json(defaults[k]) for k in strategy_options(strategy)}, **(record.get("options") or {})}
    if "prompt" not in record:
        settings["prompt"] = PromptFormat().settings()
    return settings


def read_results(path, repair: bool = False) -> list[dict]:
    """Records of a results file. A last line cut short by a killed run (no trailing newline, or
    not valid JSON) is dropped; with ``repair`` the file is truncated to its last complete line.
    Any other malformed line, or a repeated id, raises RunError with the line number."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    keep = len(data)
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    records, seen = [], {}
    offset = 0
    for i, raw in enumerate(lines, start=1):
        last = i == len(lines)
        complete = offset + len(raw) < len(data)  # followed by a newline
        try:
            rec = json.loads(raw.decode("utf-8")) if raw.strip() else None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            if last:
                keep = offset
                break
            raise RunError(f"{path}:{i}: not a results line ({e}); the file is damaged: fix or remove it, or use --overwrite") from None
        if rec is not None and last and not complete:
            keep = offset  # valid JSON but no newline: treat as cut short (it may be a prefix)
            break
        offset += len(raw) + 1
        if rec is None:
            continue
        if not isinstance(rec, dict) or "id" not in rec:
            raise RunError(f"{path}:{i}: a results line must be an object with an 'id'; use --overwrite to start over")
        if rec["id"] in seen:
            raise RunError(f"{path}:{i}: problem id {rec['id']!r} appears twice (first on line {seen[rec['id']]})")
        seen[rec["id"]] = i
        records.append(rec)
    if repair and keep < len(data):
        with open(path, "r+b") as f:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
    return records


def canonical(records: list[dict]) -> list[dict]:
    """Records as compared between runs: without `VOLATILE_FIELDS` (and `VOLATILE_COMPUTE` in
    "compute"), sorted by id."""
    def stable(r: dict) -> dict:
        out = {k: v for k, v in r.items() if k not in VOLATILE_FIELDS}
        if isinstance(out.get("compute"), dict):
            out["compute"] = {k: v for k, v in out["compute"].items() if k not in VOLATILE_COMPUTE}
        return out

    return sorted(map(stable, records), key=lambda r: str(r["id"]))


def differences(a: list[dict], b: list[dict], atol: float = 1e-5) -> list[str]:
    """Where two runs' records differ (see "the same file" above): every field but the volatile
    ones equal, floats within `atol`. Empty when they are the same."""
    found: list[str] = []

    def walk(x, y, where: str) -> None:
        if isinstance(x, float) or isinstance(y, float):
            numbers = isinstance(x, (int, float)) and isinstance(y, (int, float))
            if not (numbers and (x == y or (math.isnan(x) and math.isnan(y)) or abs(x - y) <= atol)):
                found.append(f"{where}: {x!r} != {y!r}")
        elif isinstance(x, dict) and isinstance(y, dict):
            if x.keys() != y.keys():
                found.append(f"{where}: keys {sorted(x)} != {sorted(y)}")
            for k in x.keys() & y.keys():
                walk(x[k], y[k], f"{where}.{k}")
        elif isinstance(x, list) and isinstance(y, list):
            if len(x) != len(y):
                found.append(f"{where}: {len(x)} items != {len(y)}")
            for i, (u, v) in enumerate(zip(x, y)):
                walk(u, v, f"{where}[{i}]")
        elif x != y:
            found.append(f"{where}: {x!r} != {y!r}")

    a, b = canonical(a), canonical(b)
    ids_a, ids_b = [r["id"] for r in a], [r["id"] for r in b]
    if ids_a != ids_b:
        return [f"problem ids differ: {ids_a} != {ids_b}"]
    for x, y in zip(a, b):
        walk(x, y, str(x["id"]))
    return found


def append_line(f, record: dict) -> None:
    """Write one line and make it durable (flush and fsync): a crash loses no finished problem."""
    f.write(json.dumps(record, ensure_ascii=False) + "\n")
    f.flush()
    os.fsync(f.fileno())


# --- summary ---------------------------------------------------------------------------------------
def summarize(records: list[dict], wall_seconds: float | None = None, new_policy_tokens: int | None = None) -> str:
    """The summary table of a results file's records: accuracy of each pick (maj / naive /
    weighted) at each n, tokens and time. `wall_seconds` (the run's wall time) and
    `new_policy_tokens` (tokens generated in that time) give the throughput; without them the
    sum of per-problem seconds is shown instead (problems overlap, so it exceeds wall time)."""
    if not records:
        return "no results"
    # without a verifier a line holds only the majority pick
    picks = tuple(p for p in ("maj", "naive", "weighted") if any(p in c for r in records for c in r.get("correct", {}).values()))
    ns = sorted({int(k) for r in records for k in r.get("correct", {})})
    first = records[0]
    head = f"{len(records)} problems   strategy {first.get('strategy')}  n={first.get('n')}"
    if first.get("width") is not None:
        head += f"  width={first.get('width')}"
    if first.get("iterations") is not None:
        head += f"  iterations={first.get('iterations')}"
    lines = [head, f"{'n':>6}  " + "  ".join(f"{p:>9}" for p in picks) + f"  {'problems':>8}"]
    failed = [r for r in records if r.get("error")]  # counted as wrong in every cell
    for n in ns:
        have = [r for r in records if str(n) in r.get("correct", {})]
        cells = []
        for p in picks:
            scored = [r["correct"][str(n)][p] for r in have if p in r["correct"][str(n)]] + [False] * len(failed)
            cells.append(f"{100 * sum(map(bool, scored)) / len(scored):8.1f}%" if scored else f"{'-':>9}")
        lines.append(f"{n:>6}  " + "  ".join(cells) + f"  {len(have) + len(failed):>8}")
    if failed:
        lines.append(f"failed: {len(failed)} problem{'s' * (len(failed) != 1)} (counted as wrong; their lines hold the "
                     f"error), e.g. {failed[0]['id']}: {failed[0]['error']}")
    policy = sum(int(r.get("policy_tokens", 0)) for r in records)
    prm = sum(int(r.get("prm_tokens", 0)) for r in records)
    lines.append(f"policy tokens: {policy}   PRM tokens: {prm}")
    if wall_seconds is not None:
        tokens = policy if new_policy_tokens is None else new_policy_tokens
        lines.append(f"wall time: {wall_seconds:.2f} s   throughput: {tokens / max(wall_seconds, 1e-9):.1f} policy tokens/s"
                     + ("" if new_policy_tokens is None else f" ({tokens} tokens generated in this run)"))
    else:
        secs = sum(float(r.get("seconds", 0.0)) for r in records)
        lines.append(f"problem-seconds (summed, overlapping): {secs:.2f} s   {policy / max(secs, 1e-9):.1f} policy tokens per problem-second")
    return "\n".join(lines)


def summarize_file(path) -> str:
    return summarize(read_results(path))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m ttc_fast.results RESULTS.jsonl", file=sys.stderr)
        sys.exit(2)
    try:
        print(summarize_file(sys.argv[1]))
    except (RunError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
