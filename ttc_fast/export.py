"""`ttc-fast export --format sal RUN.jsonl --out FILE`: a results file in search-and-learn's columns.

search-and-learn saves its completions as JSON lines (`dataset.to_json(..., lines=True)` in
src/sal/utils/data.py) that its evaluation (a fork of the Qwen2.5-Math harness) reads: the data
set's own columns, then `completions`, `scores` (per completion, its step scores), `pred` (the
completion with the best aggregated score), `completion_tokens`, `agg_scores`, and for every
power of two n up to N `pred_weighted@n`, `pred_maj@n`, `pred_naive@n`, each the picked answer
as `\\boxed{...}` (`\\boxed{}` where no answer was found, as its extract_answer gives "").

The picks written are ttc_fast's own (`picks` of each line: the run's aggregation, answers grouped
by math-verify equivalence), so the harness grades exactly what `ttc-fast run` reported. With
`--data` the data set's other columns (MATH-500's solution, subject, level) are joined by id.
"""
from __future__ import annotations

import json
from pathlib import Path

from .results import RunError, read_results
from .search import powers_of_two

FORMATS = ("sal",)
PICKS = ("weighted", "maj", "naive")


def boxed(answer: str | None) -> str:
    return "\\boxed{" + (answer or "") + "}"


def sal_row(record: dict, columns: dict | None = None) -> dict:
    """One results line as search-and-learn's row; `columns`: the data set's row for its id. A
    problem that failed on its own has no completions, empty picks and its `error`."""
    completions = record.get("completions") or []
    scores = [float(c["score"]) for c in completions]
    row = dict(columns or {})
    row.update({"problem": record["question"], "answer": record["gold"], "unique_id": record["id"]})
    row.update({
        "completions": [c["text"] for c in completions],
        "scores": [list(c["step_scores"]) for c in completions],
        "pred": completions[max(range(len(scores)), key=scores.__getitem__)]["text"] if completions else "",
        "completion_tokens": [int(c["policy_tokens"]) for c in completions],
        "agg_scores": scores,
    })
    picks = record.get("picks") or {}
    if record.get("error"):
        row["error"] = record["error"]
        picks = {str(n): {p: None for p in PICKS} for n in powers_of_two(int(record.get("n") or 1))}
    for n, chosen in sorted(picks.items(), key=lambda kv: int(kv[0])):
        for pick in PICKS:
            if pick in chosen:
                row[f"pred_{pick}@{n}"] = boxed(chosen[pick])
    return row


def _data_columns(path) -> dict[str, dict]:
    """The data set's other columns by problem id, in the file's order."""
    from .data import load_problems

    return {p.id: dict(p.meta) for p in load_problems(path)}


def export(run_path, out_path, fmt: str = "sal", data_path=None) -> int:
    """Write `run_path`'s lines in format `fmt` to `out_path`; returns the number of rows."""
    if fmt not in FORMATS:
        raise RunError(f"unknown export format {fmt!r}: one of {', '.join(FORMATS)}")
    run_path, out_path = Path(run_path), Path(out_path)
    if not run_path.is_file():
        raise FileNotFoundError(f"results file {str(run_path)!r} does not exist")
    records = read_results(run_path)
    if not records:
        raise RunError(f"{run_path} holds no results to export")
    columns = _data_columns(data_path) if data_path is not None else {}
    if columns:  # the data set's order, as search-and-learn writes its rows
        order = {pid: i for i, pid in enumerate(columns)}
        missing = [r["id"] for r in records if r["id"] not in order]
        if missing:
            raise RunError(f"{data_path} has no problem {missing[0]!r} of {run_path}: pass the data file the run read")
        records = sorted(records, key=lambda r: order[r["id"]])
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(sal_row(record, columns.get(record["id"])), ensure_ascii=False) + "\n")
    return len(records)
