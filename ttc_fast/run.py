"""The `ttc-fast run` job: a search strategy over a problem file, streamed to a JSONL results file.

Each problem is written as ONE JSON line to OUT as soon as its search finishes (write, flush,
``os.fsync``), so a crash or Ctrl-C loses no finished problem; `--resume` skips the problems
already in OUT. The line schema, reading, comparing and the summary table are
`ttc_fast.results`. `run_search` returns a `RunOutcome` (every record, the new ones, wall time).
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .identity import models_differ
from .results import RunError, append_line, line_settings, read_results, result_to_record, run_settings

TEMPLATE_PROBE = "What is 1 + 1?"  # rendered once before a run: a broken chat template stops it

# CLI names (case-insensitive) -> class names in ttc_fast.strategies.STRATEGIES. Every class name
# there (lower-cased, e.g. "beamsearch") is accepted too.
STRATEGY_ALIASES = {
    "best-of-n": "BestOfN",
    "majority": "MajorityVote",
    "weighted-best-of-n": "WeightedBestOfN",
    "beam": "BeamSearch",
    "dvts": "DVTS",
    "particle-filtering": "ParticleFiltering",
    "rebase": "Rebase",
    "early-reject": "EarlyReject",
    "adaptive-majority": "AdaptiveMajority",
    "adaptive-weighted": "AdaptiveWeighted",
    "routed": "Routed",
}


# --- strategies and verifiers ----------------------------------------------------------------------
def strategy_names() -> list[str]:
    from .strategies import STRATEGIES

    return [alias for alias, cls in STRATEGY_ALIASES.items() if cls in STRATEGIES]


def strategy_class(name: str) -> type:
    """The strategy class a CLI name (case-insensitive) or class name means."""
    from .strategies import STRATEGIES

    key = name.strip().lower()
    by_lower = {cls_name.lower(): cls_name for cls_name in STRATEGIES}
    cls_name = STRATEGY_ALIASES.get(key) or by_lower.get(key.replace("-", "").replace("_", ""))
    if cls_name is None or cls_name not in STRATEGIES:
        raise RunError(f"unknown strategy {name!r}: use one of {', '.join(strategy_names())}")
    return STRATEGIES[cls_name]


# A strategy option (its CLI flag without "--") -> the field it sets and the strategies (with their
# subclasses) that have it: a field name alone would not do, particle filtering's and REBASE's
# "temperature" are different settings.
STRATEGY_OPTIONS = {
    "lookahead": ("lookahead", ("BeamSearch",)),
    "filter_duplicates": ("filter_duplicates", ("BeamSearch",)),
    "pf_temperature": ("temperature", ("ParticleFiltering",)),
    "rebase_temperature": ("temperature", ("Rebase",)),
    "reject_fraction": ("reject_fraction", ("EarlyReject",)),
    "checkpoint_steps": ("checkpoint_steps", ("EarlyReject",)),
    "reject_rounds": ("rounds", ("EarlyReject",)),
    "round_size": ("round_size", ("AdaptiveMajority",)),
    "confidence": ("confidence", ("AdaptiveMajority",)),
    "probe_n": ("n", ("Routed",)),  # routed's n is its probe's size
}


def make_strategy(name: str, n: int, width: int | None = None, iterations: int | None = None, aggregation: str = "last",
                  routing: str | None = None, **options):
    """A strategy from its CLI name (case-insensitive); width/iterations go where the class has
    them; each of `options` (`STRATEGY_OPTIONS`: lookahead, pf_temperature, ...; None: not given)
    only to the strategies that have it, else a RunError naming them; routing (routed's map,
    default the toy task's) likewise."""
    from .strategies import STRATEGIES

    cls = strategy_class(name)
    cls_name = cls.__name__
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {**_routed_settings(cls_name, routing), "n": n, "aggregation": aggregation}
    if width is not None and "width" in fields:
        kwargs["width"] = width
    if iterations is not None and "iterations" in fields:
        kwargs["iterations"] = iterations
    for option, value in options.items():
        if option not in STRATEGY_OPTIONS:
            raise TypeError(f"make_strategy: unknown option {option!r} (one of {', '.join(STRATEGY_OPTIONS)})")
        if value is None:
            continue
        field, owners = STRATEGY_OPTIONS[option]
        bases = tuple(STRATEGIES[o] for o in owners if o in STRATEGIES)
        if not issubclass(cls, bases) or field not in fields:
            having = [alias for alias, c in STRATEGY_ALIASES.items() if c in STRATEGIES and issubclass(STRATEGIES[c], bases)]
            raise RunError(f"--{option.replace('_', '-')} does not apply to {cls_name}: drop it, or pick a strategy that "
                           f"has it ({', '.join(having)})")
        kwargs[field] = value
    try:
        return cls(**kwargs)
    except ValueError as e:
        flags = ["--n", "--width", "--iterations", *(f"--{o.replace('_', '-')}" for o in STRATEGY_OPTIONS), "--routing"]
        raise RunError(f"{e} (check {' / '.join(flags)})") from None


def _routed_settings(cls_name: str, routing: str | None) -> dict:
    """Routed's map (from --routing FILE.json, else the toy task's), less its probe size (the
    caller's: --probe-n, else --n) and aggregation; nothing for the other strategies, which
    refuse the flag."""
    if cls_name != "Routed":
        if routing is not None:
            raise RunError(f"--routing does not apply to {cls_name}: drop it, or pick a strategy that has it (routed)")
        return {}
    import json

    from .strategies.routed import TOY_ROUTING, routing_settings

    path = Path(routing) if routing is not None else TOY_ROUTING
    try:
        settings = routing_settings(path)
    except FileNotFoundError:
        raise RunError(f"--routing {routing}: no such file") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise RunError(f"--routing {path}: not a routing map as benchmarks/fit_routing.py writes ({type(e).__name__}: {e})") from None
    settings.pop("n")  # the probe's size is --probe-n, else --n
    settings.pop("aggregation")  # --aggregation's, as for every strategy
    return settings


def needs_prm(strategy) -> bool:
    return strategy.needs_verifier


def _is_verifier(obj) -> bool:
    return all(hasattr(obj, a) for a in ("start", "fork", "free", "score_steps"))


def import_callable(spec: str):
    """``python:MODULE:NAME`` (or ``MODULE:NAME``) -> the object; ``NAME`` may be dotted."""
    import importlib

    body = spec[len("python:"):] if spec.startswith("python:") else spec
    module_name, sep, attr = body.partition(":")
    if not sep or not module_name or not attr:
        raise RunError(f"bad verifier {spec!r}: write python:MODULE:FUNCTION")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise RunError(f"cannot import module {module_name!r} for --prm {spec}: {e}") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise RunError(f"module {module_name!r} has no attribute {attr!r} (--prm {spec})") from None
    return obj


def resolve_prm(spec, kind: str | None = None, device=None, dtype=None, **options):
    """A verifier for TreeSearch from a checkpoint path, ``python:MODULE:FUNCTION``, a callable,
    or an object that already has the verifier interface (start/fork/free/score_steps).
    `options` (layout, step_separator, system_prompt) go to `load_prm`."""
    if spec is None:
        return None
    obj = spec
    if isinstance(spec, str) and spec.startswith("python:"):
        obj = import_callable(spec)
        if isinstance(obj, type):  # a class: instantiate it
            obj = obj()
    if _is_verifier(obj):
        return obj
    try:
        from .prm import load_prm
    except ImportError as e:
        raise RunError(f"loading the verifier {spec!r} needs ttc_fast.prm.load_prm, which is not available ({e})") from None
    kwargs = {"device": device, "dtype": dtype, **options}
    if kind is not None:
        kwargs["kind"] = kind
    return load_prm(obj, **kwargs)


# --- progress --------------------------------------------------------------------------------------
class _Progress:
    """tqdm on stderr (problems done/total, tokens/s); a plain line per problem without tqdm."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.enabled, self.total, self.done = enabled, total, initial
        self.start, self.tokens = time.perf_counter(), 0
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, initial=initial, unit="problem", file=sys.stderr, dynamic_ncols=True)

    def update(self, tokens: int) -> None:
        self.done += 1
        self.tokens += tokens
        rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
        if self.bar is not None:
            self.bar.set_postfix_str(f"{rate:.0f} tok/s", refresh=False)
            self.bar.update(1)
        elif self.enabled:
            print(f"[{self.done}/{self.total}] {rate:.0f} tok/s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --- the job ---------------------------------------------------------------------------------------
def _indexed_search(search, indexed):
    """`TreeSearch.run_with_problems` over (position in the data file, problem) pairs: the position
    seeds the problem's sampling, so a resumed run (a subset of the problems) draws the same
    samples for each problem as an uninterrupted one."""
    yield from search.run_with_problems([p for _, p in indexed], indices=[i for i, _ in indexed])


@dataclass
class RunOutcome:
    """What `run_search` did: every record of OUT (old, then new), the new ones, its wall time."""

    records: list[dict]
    new_records: list[dict]
    wall_seconds: float

    @property
    def new_policy_tokens(self) -> int:
        return sum(r["policy_tokens"] for r in self.new_records)


def run_search(engine, prm, strategy, sampling, problems, out_path, resume: bool = False, progress: bool = True,
               overwrite: bool = False, max_problems_in_flight: int | None = None, system_prompt: str | None = None,
               chat_template: str | None = None, chat_template_kwargs: dict | None = None,
               positions: list[int] | None = None, models: dict | None = None) -> RunOutcome:
    """Search every problem and stream one JSON line per finished problem to `out_path`.

    Without `resume`, an existing non-empty `out_path` is an error (unless `overwrite`). With
    `resume`, the problems whose ids are already in the file are skipped (a cut-short last line
    is dropped and the file repaired first). Returns a `RunOutcome`.
    system_prompt / chat_template / chat_template_kwargs: the policy's prompt (`ttc_fast.prompts`:
    None is the default system prompt and the checkpoint's template). positions: each problem's
    position in its data file, which seeds its sampling (default 0, 1, ...; a shard passes its
    own). models: the models' identity recorded in each line and checked on resume
    (`identity.run_models`)."""
    from .search import TreeSearch

    out_path, prompt, previous, todo = open_run(engine.tokenizer, engine.model.path, prm is not None, strategy, sampling,
                                                 problems, out_path, resume, overwrite, system_prompt, chat_template,
                                                 chat_template_kwargs, positions, models)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    records = list(previous)
    bar = _Progress(len(problems), len(problems) - len(todo), progress)
    start = time.perf_counter()
    try:
        with open(out_path, "a" if resume else "w", encoding="utf-8") as f:
            if todo:
                search = TreeSearch(engine, prm, strategy, sampling, system_prompt=prompt.system_prompt,
                                    max_problems_in_flight=max_problems_in_flight, chat_template=prompt.chat_template,
                                    chat_template_kwargs=prompt.chat_template_kwargs)
                for result, _ in _indexed_search(search, todo):
                    record = result_to_record(result, strategy, sampling, prompt, models)
                    append_line(f, record)
                    records.append(record)
                    bar.update(record["policy_tokens"])
    finally:
        bar.close()
    return RunOutcome(records, records[len(previous):], time.perf_counter() - start)


def open_run(tokenizer, model_path, has_verifier: bool, strategy, sampling, problems, out_path, resume, overwrite,
             system_prompt, chat_template, chat_template_kwargs, positions, models):
    """The checks before a run writes OUT (see `run_search`; the policy's tokenizer renders a
    probe prompt); returns (OUT as a Path, the prompt's PromptFormat, the records already in
    OUT, the (position, problem) pairs left to search)."""
    from .prompts import PromptFormat

    out_path = Path(out_path)
    if resume and overwrite:
        raise RunError("--resume and --overwrite exclude each other: --resume continues OUT, --overwrite starts it over")
    exists = out_path.exists() and out_path.stat().st_size > 0
    if exists and not resume and not overwrite:
        raise RunError(f"{out_path} already exists and is not empty: pass --resume to continue it or --overwrite to start over")
    if sampling.seed is None:
        raise RunError("a run needs a fixed seed (--seed) so that it can be resumed")

    previous = read_results(out_path, repair=True) if resume else []
    done_ids = {r["id"] for r in previous}
    prompt = PromptFormat(system_prompt, chat_template, chat_template_kwargs)
    if tokenizer is not None:  # a template that fails on any text is the run's fault, not a problem's
        prompt.encode(TEMPLATE_PROBE, tokenizer, model_path)
    mine = run_settings(strategy, sampling, prompt, models)
    picks = {"maj", "naive", "weighted"} if has_verifier else {"maj"}  # no verifier: majority only
    for line, record in enumerate(previous, start=1):
        theirs = line_settings(record, strategy)
        diff = ", ".join(f"{k}: {theirs.get(k)!r} in the file, {mine[k]!r} now" for k in mine
                         if k != "models" and theirs.get(k) != mine[k])
        if diff:
            raise RunError(f"{out_path}: line {line} was written with other settings ({diff}): resume with the same "
                           "settings, or use --overwrite")
        if any(set(p) != picks for p in record.get("picks", {}).values()):
            raise RunError(f"{out_path}: line {line} was written {'without' if has_verifier else 'with'} a verifier: "
                           f"resume {'with' if not has_verifier else 'without'} --prm as it was, or use --overwrite")
        other_models = models_differ(theirs["models"], models)
        if other_models:
            raise RunError(f"{out_path}: line {line} was written with other settings (models: {other_models}): resume "
                           "with the same models, or use --overwrite")

    if positions is None:
        positions = list(range(len(problems)))
    elif len(positions) != len(problems):
        raise RunError(f"{len(problems)} problems but {len(positions)} positions")
    todo = [(i, p) for i, p in zip(positions, problems) if p.id not in done_ids]
    return out_path, prompt, previous, todo
