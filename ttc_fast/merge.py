"""`ttc-fast merge`: the results files of shards (`ttc-fast run --shard I/K`, one per Slurm array
task or machine) as one file. Refuses a problem id in two files, and lines written with other
settings or other models (the same checks as `--resume`); the merged lines keep the shards'
order, so the file is the set of lines an unsharded run writes ("the same file" in results.py).
"""
from __future__ import annotations

import os
from pathlib import Path

from .identity import models_differ
from .results import SETTINGS, RunError, append_line, read_results


def parse_shard(text: str) -> tuple[int, int]:
    """"I/K" -> (I, K), I counted from 0."""
    try:
        index, count = (int(x) for x in str(text).split("/"))
    except ValueError:
        index = count = -1
    if not 0 <= index < count:
        raise RunError(f"--shard must be I/K with 0 <= I < K (I counted from 0, as a Slurm array's "
                       f"SLURM_ARRAY_TASK_ID), got {text!r}")
    return index, count


def shard_positions(num_problems: int, index: int, count: int) -> list[int]:
    """The positions (in the data file) of shard `index` of `count`: every count-th problem."""
    return list(range(index, num_problems, count))


def merge_results(paths: list, out, overwrite: bool = False) -> list[dict]:
    """Every record of `paths` in one file `out` (written whole, then renamed into place); returns them."""
    out = Path(out)
    if not paths:
        raise RunError("merge needs at least one results file")
    if out.exists() and out.stat().st_size > 0 and not overwrite:
        raise RunError(f"{out} already exists and is not empty: pass --overwrite to replace it")
    records, where, first = [], {}, None
    for path in map(Path, paths):
        if path.resolve() == out.resolve():
            raise RunError(f"{path} is both a shard and --out: write the merged file elsewhere")
        if not path.is_file():
            raise RunError(f"results file not found: {path}")
        for line, record in enumerate(read_results(path), start=1):
            if record["id"] in where:
                raise RunError(f"problem {record['id']!r} is in {where[record['id']]} and in {path} (line {line}): "
                               "merge shards of one run, each problem once")
            where[record["id"]] = f"{path} (line {line})"
            settings = {k: record.get(k) for k in SETTINGS}
            if first is None:
                first = (settings, f"{path} (line {line})")
                records.append(record)
                continue
            ref, ref_where = first
            diff = [k for k in SETTINGS if k != "models" and settings[k] != ref[k]]
            other_models = models_differ(settings["models"], ref["models"])
            if diff or other_models:
                what = ", ".join(diff + ([f"models: {other_models}"] if other_models else []))
                raise RunError(f"{path} (line {line}) was written with other settings than {ref_where} ({what}): "
                               "merge only shards of the same run")
            records.append(record)
    tmp = out.with_name(out.name + ".merging")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            append_line(f, record)
    os.replace(tmp, out)
    return records
