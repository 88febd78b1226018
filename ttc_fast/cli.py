"""The `ttc-fast` command line.

    ttc-fast demo                      build a tiny random model, load it, generate, report speed
    ttc-fast generate --model DIR ...  generate from a local checkpoint
    ttc-fast run --policy DIR --prm R --strategy beam --data F.jsonl --out OUT.jsonl
                                       search a problem file, one JSON line per problem (resumable)
    ttc-fast export --format sal OUT.jsonl --out FILE
                                       the results in search-and-learn's columns
    ttc-fast report RUN.jsonl [RUN2.jsonl ...] [--plot FILE.png]
                                       accuracy against n and against tokens or FLOPs, per strategy
"""
from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time

from .run import STRATEGY_OPTIONS


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32, float16 or bfloat16")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    p.add_argument("--kv-cache-bytes", type=int, default=None, help="the policy's KV pool (default: 256 MiB on the CPU)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--overlap", action="store_true",
                   help="prepare and launch each decode step before the previous one is settled (off until checked on a GPU)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="decode from static buffers at batch-size buckets, replayed as CUDA graphs (off until checked on a GPU)")
    p.add_argument("--cuda-graph-max-batch", type=int, default=256, help="largest decode batch run from the static buffers")


def _engine_options(args) -> dict:
    return dict(kv_cache_bytes=args.kv_cache_bytes, block_size=args.block_size, backend=args.backend,
                overlap=args.overlap, cuda_graphs=args.cuda_graphs, cuda_graph_max_batch=args.cuda_graph_max_batch)


def _sampling(args):
    import ttc_fast as tf

    return tf.SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, max_tokens=args.max_tokens,
        n=args.n, seed=args.seed, stop=args.stop or (),
    )


def cmd_demo(args) -> int:
    """End to end on any machine: a tiny random Llama in HF format, loaded by the real loader."""
    import ttc_fast as tf
    from ttc_fast.testing import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_model(tmp, "llama", seed=0)
        model = tf.load_model(path, device=args.device, dtype=args.dtype)
        engine = tf.Engine(model, **_engine_options(args))
        print(f"model: tiny random Llama ({sum(p.numel() for p in model.module.parameters()) / 1e6:.2f} M params) "
              f"on {model.device}, {model.dtype}, backend {engine.runner.attention.name}, {engine.runner.num_blocks} KV blocks")
        prompt = "Natalia sold clips to 48 of her friends in April. How many clips did she sell?"
        params = tf.SamplingParams(temperature=0.8, max_tokens=args.max_tokens, n=args.n, seed=0, ignore_eos=True)
        start = time.perf_counter()
        out = engine.generate([prompt], params)[0]
        seconds = time.perf_counter() - start
        generated = sum(len(o.token_ids) for o in out.outputs)
        print(f"{args.n} samples of one prompt ({len(out.prompt_token_ids)} prompt tokens, prefilled once): "
              f"{generated} tokens in {seconds:.2f} s = {generated / seconds:.0f} tokens/s")
        print(f"engine stats: {engine.stats}")
        print(f"block manager: {engine.runner.blocks.stats()}")
        print(f"sample 0: {out.outputs[0].text[:80]!r}")
    return 0


def cmd_generate(args) -> int:
    import ttc_fast as tf

    model = tf.load_model(args.model, device=args.device, dtype=args.dtype)
    engine = tf.Engine(model, **_engine_options(args))
    start = time.perf_counter()
    outs = engine.generate(args.prompt, _sampling(args))
    seconds = time.perf_counter() - start
    tokens = 0
    for out in outs:
        for o in out.outputs:
            tokens += len(o.token_ids)
            print(f"[{o.index}] ({o.finish_reason}) {o.text if o.text is not None else o.token_ids}")
    print(f"{tokens} tokens in {seconds:.2f} s = {tokens / max(seconds, 1e-9):.0f} tokens/s", file=sys.stderr)
    return 0


# Flags that mean nothing to the toy task (`ttc-fast run` without --policy), which has its own settings.
POLICY_ONLY_FLAGS = ("data", "prm", "prm_kind", "out", *STRATEGY_OPTIONS, "routing", "preset", "system_prompt",
                     "chat_template", "chat_template_kwargs", "prm_layout", "prm_step_separator", "n", "width",
                     "iterations", "aggregation", "temperature", "top_p", "max_tokens", "prm_kv_cache_bytes",
                     "gpu_memory_utilization", "prm_kv_fraction", "shard", "workers", "ray_address")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _profile_blocks(args) -> int:
    """A pool that holds the largest forward (8192 tokens on a GPU) of the engine and the PRM."""
    from .memory_plan import profile_blocks

    # ... and the static decode step of --cuda-graphs (one block per sequence)
    return max(profile_blocks(8192, args.block_size), args.cuda_graph_max_batch + 8)


def _path_tokens(problems, prompt, tokenizer, max_tokens: int, max_context: int | None = None) -> int:
    """One path's length: the longest prompt (of those that encode) and max_tokens, within the
    context when it is given."""
    longest = 0
    for p in problems:
        try:
            longest = max(longest, len(prompt.encode(p.question, tokenizer)))
        except ValueError:
            continue  # that problem will be an error record
    return longest + max_tokens if max_context is None else min(longest + max_tokens, max_context)


def _print_outcome(outcome, problems, out, workers: int | None = None) -> None:
    """The summary of this run's problems (OUT may hold others) and where the lines are."""
    from .results import summarize

    ids = {p.id for p in problems}
    mine = [r for r in outcome.records if r["id"] in ids]
    print(summarize(mine, wall_seconds=outcome.wall_seconds, new_policy_tokens=outcome.new_policy_tokens))
    on = f", {workers} workers" if workers is not None else ""
    print(f"results: {out} ({len(outcome.new_records)} new, {len(mine)} of {len(problems)} problems{on})")


def _describe_pools(engine, prm) -> str:
    def pool(runner):
        return f"{runner.num_blocks * runner.block_size:,} tokens ({runner.pool.nbytes / 2**20:.0f} MiB)"

    text = f"KV pools: policy {pool(engine.runner)}"
    if getattr(prm, "runner", None) is not None:
        text += f", PRM {pool(prm.runner)}"
    return text


def cmd_run(args) -> int:
    """Search a problem file with a policy and a verifier; see `ttc_fast.run` for the output."""
    from .run import RunError, make_strategy, needs_prm, resolve_prm, run_search

    if args.policy is None:
        given = [_flag(f) for f in POLICY_ONLY_FLAGS if getattr(args, f) is not None]
        if given:
            raise RunError(f"{', '.join(given)} need --policy; without --policy, `ttc-fast run` runs the built-in toy "
                           "task (its own settings), which writes to --out-dir")
        from .toy.evaluate import run_toy

        run_toy(out_dir=args.out_dir, limit=args.limit, resume=args.resume, progress=not args.no_progress,
                seed=0 if args.seed is None else args.seed, device=args.device, backend=args.backend)
        return 0
    for flag in ("data", "out"):
        if getattr(args, flag) is None:
            raise RunError(f"--{flag} is required with --policy")
    from .run_options import chat_template_for, prm_options, resolve_run_settings

    settings = resolve_run_settings(args)
    strategy = make_strategy(args.strategy, settings["n"], settings.get("width"), settings.get("iterations"),
                             settings["aggregation"], routing=settings.get("routing"),
                             **{option: settings.get(option) for option in STRATEGY_OPTIONS})
    if needs_prm(strategy) and args.prm is None:
        raise RunError(f"strategy {args.strategy!r} ranks paths with a verifier: pass --prm CHECKPOINT (with --prm-kind) "
                       f"or --prm python:MODULE:FUNCTION, or use --strategy majority or adaptive-majority, which need none")
    import ttc_fast as tf
    from .data import load_problems
    from .prompts import PromptFormat

    problems = load_problems(args.data)
    if args.limit is not None:
        if args.limit < 1:
            raise RunError(f"--limit must be >= 1, got {args.limit}")
        problems = problems[: args.limit]
    if not problems:
        raise RunError(f"{args.data} holds no problems")
    positions = list(range(len(problems)))
    if args.shard is not None:
        from .merge import parse_shard, shard_positions

        index, count = parse_shard(args.shard)
        positions = shard_positions(len(problems), index, count)
        if not positions:
            raise RunError(f"--shard {args.shard}: no problem falls in it ({len(problems)} problems)")
        problems = [problems[p] for p in positions]
    from pathlib import Path

    out = Path(args.out)
    if out.exists() and out.stat().st_size > 0 and not args.resume and not args.overwrite:
        raise RunError(f"{out} already exists and is not empty: pass --resume to continue it or --overwrite to start over")
    if args.resume and args.overwrite:
        raise RunError("--resume and --overwrite exclude each other: --resume continues OUT, --overwrite starts it over")
    sampling = tf.SamplingParams(temperature=settings["temperature"], top_p=settings["top_p"],
                                 max_tokens=settings["max_tokens"], seed=settings["seed"])
    if not Path(args.policy).exists() and not str(args.policy).startswith("builtin:"):
        raise RunError(f"policy checkpoint not found: {args.policy} (pass a Hugging Face checkpoint directory)")
    if args.ray_address is not None and args.workers is None:
        raise RunError("--ray-address needs --workers K")
    if args.workers is not None:
        return _run_on_workers(args, settings, strategy, sampling, problems, positions, out)
    model = tf.load_model(args.policy, device=args.device, dtype=args.dtype)
    prompt = PromptFormat(settings["system_prompt"], chat_template_for(settings["chat_template"], model.tokenizer),
                          settings["chat_template_kwargs"])
    # On a GPU the two pools are planned together unless their sizes are given; the models start
    # on pools just large enough to profile their largest forward.
    planned = model.device.type == "cuda" and args.kv_cache_bytes is None and args.prm_kv_cache_bytes is None
    if not planned and (args.gpu_memory_utilization is not None or args.prm_kv_fraction is not None):
        raise RunError("--gpu-memory-utilization and --prm-kv-fraction plan a CUDA device's memory; with --kv-cache-bytes / "
                       "--prm-kv-cache-bytes, or on the CPU, the pools have the sizes given")
    model_prm = args.prm is not None and not str(args.prm).startswith("python:")
    if model.device.type == "cuda" and model_prm and (args.kv_cache_bytes is None) != (args.prm_kv_cache_bytes is None):
        raise RunError("on a GPU give both --kv-cache-bytes and --prm-kv-cache-bytes, or neither (then "
                       "--gpu-memory-utilization plans both pools together)")
    engine = tf.Engine(model, **_engine_options(args), num_blocks=_profile_blocks(args) if planned else None)
    # majority needs no verifier, but one given still scores its paths (naive / weighted picks)
    pool = {"num_blocks": _profile_blocks(args)} if planned else {"kv_cache_bytes": args.prm_kv_cache_bytes}
    prm = (resolve_prm(args.prm, kind=args.prm_kind, device=args.device, dtype=args.dtype, block_size=args.block_size,
                       backend=args.backend, **pool, **prm_options(args, settings))
           if args.prm is not None else None)
    if planned:
        from .memory_plan import plan_device_memory

        plan = plan_device_memory(engine, prm, 0.9 if args.gpu_memory_utilization is None else args.gpu_memory_utilization,
                                  args.prm_kv_fraction, path_tokens=_path_tokens(problems, prompt, engine.tokenizer, sampling.max_tokens,
                                                                       engine.model.config.max_context))
        print(plan.describe())
    else:
        print(_describe_pools(engine, prm))
    from .identity import run_models

    # The process is ours: take what is loaded so far out of the cyclic collector's way (as vLLM
    # does after start-up). The search makes many short-lived objects, and every full collection
    # would also walk the models', tokenizers' and data's objects (2x host time at 4,096 beams).
    gc.collect()
    gc.freeze()
    outcome = run_search(engine, prm, strategy, sampling, problems, out, resume=args.resume, overwrite=args.overwrite,
                         progress=not args.no_progress, max_problems_in_flight=args.max_in_flight,
                         system_prompt=prompt.system_prompt, chat_template=prompt.chat_template,
                         chat_template_kwargs=prompt.chat_template_kwargs, positions=positions,
                         models=run_models(model, prm, args.prm))
    _print_outcome(outcome, problems, out)
    return 0


def _run_on_workers(args, settings, strategy, sampling, problems, positions, out) -> int:
    """`ttc-fast run --workers K`: the search on K Ray actors (ttc_fast/distributed.py)."""
    from .distributed import WorkerSpec, run_distributed
    from .loader import load_model, load_tokenizer, resolve_path
    from .prompts import PromptFormat
    from .run_options import chat_template_for, prm_options

    path = resolve_path(args.policy)
    # The driver only renders the prompt: the policy's tokenizer, not its weights (a .gguf keeps
    # its tokenizer inside, so it is read whole, on the CPU).
    tokenizer = load_model(args.policy, device="cpu").tokenizer if str(path).endswith(".gguf") else load_tokenizer(path)
    prompt = PromptFormat(settings["system_prompt"], chat_template_for(settings["chat_template"], tokenizer),
                          settings["chat_template_kwargs"])
    import torch

    cuda = args.device == "cuda" or (args.device is None and torch.cuda.is_available())
    spec = WorkerSpec(
        policy=str(args.policy), prm=args.prm, device=args.device, dtype=args.dtype,
        engine_options=_engine_options(args), prm_kind=args.prm_kind,
        prm_options={"kv_cache_bytes": args.prm_kv_cache_bytes, **prm_options(args, settings)}, strategy=strategy,
        sampling=sampling, prompt={"system_prompt": prompt.system_prompt, "chat_template": prompt.chat_template,
                                   "chat_template_kwargs": prompt.chat_template_kwargs},
        models=None, max_in_flight=args.max_in_flight, gpus=1.0 if cuda else 0.0)
    if cuda and args.kv_cache_bytes is None and args.prm_kv_cache_bytes is None:
        # each worker plans its GPU's memory as a single process does (see cmd_run), the path
        # within its model's context
        spec.memory_plan = (0.9 if args.gpu_memory_utilization is None else args.gpu_memory_utilization,
                            args.prm_kv_fraction, _path_tokens(problems, prompt, tokenizer, sampling.max_tokens),
                            _profile_blocks(args))
    outcome = run_distributed(spec, args.workers, problems, out, tokenizer, path, resume=args.resume,
                              overwrite=args.overwrite, positions=positions, ray_address=args.ray_address,
                              progress=not args.no_progress)
    _print_outcome(outcome, problems, out, args.workers)
    return 0


def cmd_merge(args) -> int:
    from .merge import merge_results
    from .results import summarize

    records = merge_results(args.results, args.out, overwrite=args.overwrite)
    print(summarize(records))
    print(f"merged {len(records)} problems from {len(args.results)} files into {args.out}")
    return 0


def cmd_export(args) -> int:
    from .export import export

    rows = export(args.results, args.out, fmt=args.format, data_path=args.data)
    print(f"{args.out}: {rows} rows in {args.format} format")
    return 0


def cmd_report(args) -> int:
    from .report import report

    print(report(args.results, args.plot, x=args.x, pick=args.pick))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ttc-fast", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="tiny random model end to end: load, generate 16 samples sharing a prompt")
    _engine_args(demo)
    demo.add_argument("--n", type=int, default=16)
    demo.add_argument("--max-tokens", type=int, default=64)
    demo.set_defaults(func=cmd_demo)

    gen = sub.add_parser("generate", help="generate from a local Hugging Face checkpoint")
    gen.add_argument("--model", required=True, help="checkpoint directory or builtin:NAME")
    gen.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    _engine_args(gen)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--n", type=int, default=1)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=None)
    gen.set_defaults(func=cmd_generate)

    run = sub.add_parser("run", help="search a problem file (best-of-N, beam, DVTS...) and stream results to JSONL",
                         description="Search every problem of --data with --policy and the verifier --prm; each finished "
                                     "problem is one JSON line of --out, written as soon as it finishes. Without --policy: "
                                     "the built-in toy task: policy S with the toy PRM under every strategy at N in {1, 4, 16, 64}, against greedy "
                                     "S, the middle M and the larger L (results, table and accuracy.png against N and against "
                                     "policy tokens in --out-dir).")
    run.add_argument("--policy", default=None, help="policy checkpoint directory (Hugging Face format)")
    run.add_argument("--prm", default=None, help="verifier: PRM checkpoint directory, or python:MODULE:FUNCTION")
    run.add_argument("--prm-kind", default=None, help="PRM format: rlhflow, math-shepherd, qwen-prm, skywork, outcome")
    run.add_argument("--prm-layout", default=None, choices=["model-card", "sal"],
                     help="math-shepherd input layout: its model card's (default) or search-and-learn's (its system "
                          "prompt before the question, steps joined by a blank line)")
    run.add_argument("--prm-step-separator", default=None,
                     help="math-shepherd: text between a step tag and the next step (escapes \\n \\t; default: the layout's)")
    run.add_argument("--preset", default=None, choices=["sal"],
                     help="sal: search-and-learn's configuration and recipes (system prompt, its Llama 3 chat template for "
                          "Llama 3 policies, n 4, temperature 0.8, top_p 1, max_tokens 2048, width 4, 40 iterations, "
                          "lookahead 0, aggregation last, seed 0, its math-shepherd layout, filter_duplicates for beam "
                          "search); explicit flags override it")
    run.add_argument("--strategy", default="beam",
                     help="best-of-n, majority, weighted-best-of-n, beam, dvts, particle-filtering, rebase, early-reject, "
                          "adaptive-majority, adaptive-weighted, routed (case-insensitive)")
    run.add_argument("--n", type=int, default=None, help="completions per problem (default 4)")
    run.add_argument("--width", type=int, default=None, help="beam/DVTS: children per kept beam (default: the strategy's, 4)")
    run.add_argument("--iterations", type=int, default=None,
                     help="beam/DVTS/particle filtering/REBASE: search steps (default: the strategy's, 40)")
    run.add_argument("--aggregation", default=None, choices=["last", "min", "prod", "mean"],
                     help="step scores -> path score (default last)")
    run.add_argument("--lookahead", type=int, default=None,
                     help="beam/DVTS: roll each candidate out K more greedy steps and score it at the end (default 0)")
    run.add_argument("--filter-duplicates", default=None, action=argparse.BooleanOptionalAction,
                     help="beam/DVTS: of candidates with the same text only the first competes (search-and-learn's "
                          "filter_duplicates; default off, on in --preset sal for beam)")
    run.add_argument("--pf-temperature", type=float, default=None,
                     help="particle filtering: resample in proportion to softmax(score / T) (default 1.0)")
    run.add_argument("--rebase-temperature", type=float, default=None,
                     help="rebase: share each step's expansions in proportion to softmax(score / T) (default 0.2)")
    run.add_argument("--round-size", type=int, default=None,
                     help="adaptive-majority/-weighted: solutions drawn per round, before each stopping check (default 4)")
    run.add_argument("--confidence", type=float, default=None,
                     help="adaptive-majority/-weighted: stop once P(leading answer beats the second | votes) reaches "
                          "this, in (0.5, 1) (default 0.95); --n caps the solutions drawn")
    run.add_argument("--reject-fraction", type=float, default=None,
                     help="early-reject: at each checkpoint stop this fraction of the live samples, the lowest scored (default 0.5)")
    run.add_argument("--checkpoint-steps", type=int, default=None,
                     help="early-reject: a checkpoint after every K steps (default 1)")
    run.add_argument("--reject-rounds", type=int, default=None,
                     help="early-reject: how many checkpoints reject (default 1); then the survivors run to the end")
    run.add_argument("--probe-n", type=int, default=None,
                     help="routed: whole samples in the probe that estimates a problem's difficulty (default: --n, 4)")
    run.add_argument("--routing", default=None, metavar="FILE.json",
                     help="routed: the difficulty -> search map (benchmarks/fit_routing.py writes one; default: the "
                          "map fitted on the toy task's development problems)")
    run.add_argument("--system-prompt", default=None,
                     help="the policy's system message, TEXT or @FILE; \"\" for none (default: ttc_fast's math prompt)")
    run.add_argument("--chat-template", default=None,
                     help="checkpoint (the policy's own, default), none (plain prompt: the question and a blank line), "
                          "sal-llama3 (search-and-learn's Llama 3 template), sal-auto (that template for a Llama 3 "
                          "policy, else the checkpoint's: --preset sal's choice), or a Jinja file (FILE or @FILE)")
    run.add_argument("--chat-template-kwargs", default=None,
                     help="JSON object passed to the chat template, e.g. '{\"enable_thinking\": false}' for Qwen3")
    run.add_argument("--data", default=None, help="problems: MATH-500 or GSM8K JSONL")
    run.add_argument("--out", default=None, help="results JSONL (one line per problem)")
    run.add_argument("--out-dir", default="runs/toy", help="toy task (no --policy): folder for its results and plot")
    run.add_argument("--resume", action="store_true", help="continue OUT: skip the problems already in it")
    run.add_argument("--overwrite", action="store_true", help="start OUT over")
    run.add_argument("--limit", type=int, default=None, help="only the first K problems")
    run.add_argument("--shard", default=None, metavar="I/K",
                     help="only shard I of K (I from 0): the problems at positions I, I+K, I+2K, ... (after --limit); "
                          "`ttc-fast merge` joins the shards' files")
    _engine_args(run)
    run.add_argument("--temperature", type=float, default=None, help="default 0.8")
    run.add_argument("--top-p", type=float, default=None, help="default 1.0")
    run.add_argument("--max-tokens", type=int, default=None, help="default 2048")
    run.add_argument("--seed", type=int, default=None, help="default 0")
    run.add_argument("--prm-kv-cache-bytes", type=int, default=None, help="the PRM's KV pool (default: 256 MiB on the CPU)")
    run.add_argument("--gpu-memory-utilization", type=float, default=None,
                     help="CUDA: the share of the device's memory for both models' weights, both KV pools and "
                          "activations (default 0.9, as vLLM); the plan is printed at start")
    run.add_argument("--prm-kv-fraction", type=float, default=None,
                     help="CUDA: the PRM pool's share of the KV memory (default: both pools hold the same number of tokens)")
    run.add_argument("--max-in-flight", type=int, default=None, help="most problems searched at once (default: as the KV pool allows)")
    run.add_argument("--workers", type=int, default=None,
                     help='K Ray actors, a GPU each (CPU actors without GPUs), pulling problems as they finish; '
                          'needs pip install "ttc_fast[ray]"')
    run.add_argument("--ray-address", default=None,
                     help="a running Ray cluster to join (auto: the local node's); default: start a local instance")
    run.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    run.set_defaults(func=cmd_run)

    merge = sub.add_parser("merge", help="join the results files of shards (run --shard I/K) into one",
                           description="Join results files of one run's shards; refuses a problem in two files and "
                                       "lines written with other settings or models.")
    merge.add_argument("results", nargs="+", help="the shards' results JSONL files")
    merge.add_argument("--out", required=True, help="the merged file")
    merge.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    merge.set_defaults(func=cmd_merge)

    export = sub.add_parser("export", help="write a results file in another tool's format",
                            description="--format sal: search-and-learn's columns (completions, scores, pred, "
                                        "pred_weighted@n / pred_maj@n / pred_naive@n as \\boxed{...}), one JSON line "
                                        "per problem, for its evaluation harness.")
    export.add_argument("results", help="a results JSONL written by `ttc-fast run`")
    export.add_argument("--format", default="sal", choices=["sal"])
    export.add_argument("--out", required=True, help="the file to write")
    export.add_argument("--data", default=None, help="the data file the run read: adds its other columns, keeps its order")
    export.set_defaults(func=cmd_export)

    rep = sub.add_parser("report", help="accuracy against n and against compute for results files, as a table and a plot",
                         description="One row per run and n: strategy, n, the accuracy of the final pick, and the mean "
                                     "policy tokens, PRM tokens and FLOPs per problem; best-of-N runs also give each "
                                     "smaller n they hold. Runs of one strategy make one curve.")
    rep.add_argument("results", nargs="+", help="results JSONL files written by `ttc-fast run`")
    rep.add_argument("--plot", default=None, metavar="FILE.png",
                     help="also write a PNG: accuracy against n, and against --x, a curve per strategy")
    rep.add_argument("--x", default="tokens", choices=["tokens", "flops"],
                     help="the second panel's axis: mean policy tokens (default) or FLOPs per problem")
    rep.add_argument("--pick", default=None, choices=["maj", "naive", "weighted"],
                     help="which pick is a problem's answer (default: weighted where the lines hold it, else maj)")
    rep.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .loader import MissingExtra

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, MissingExtra) as e:
        print(f"ttc-fast: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if getattr(args, "command", None) == "run" and getattr(args, "out", None):
            print(f"\nttc-fast: interrupted; every finished problem is in {args.out}: rerun with --resume to continue",
                  file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
