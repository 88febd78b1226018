"""PRM-guided beam search: ttc_fast's `TreeSearch` against a search-and-learn-style loop.

Default mode (CPU, side by side in one run, same random models, same step lengths):

  ours:     `TreeSearch` + `BeamSearch(n, width, iterations)`: the policy's beams share the
            prompt's and their ancestors' KV blocks, each iteration decodes only the new step;
            the PRM keeps every beam's prefix in its own paged cache and encodes only the new
            step's tokens.
  baseline: the loop of search-and-learn's beam search written on transformers: every
            iteration regenerates each live beam's next step with `model.generate` from its
            FULL context (prompt + steps so far; no cache survives an iteration), the PRM
            (transformers' model class) re-encodes every beam's FULL text (question + all
            steps) in batches of `--prm-batch`, the step scores are read at the step tags,
            the top n/width beams are kept and each is expanded `width` times.
            search-and-learn runs the policy on vLLM, whose prefix cache at least reuses the
            prompt (and, with automatic prefix caching, earlier steps); the baseline here
            caches nothing across iterations, as its transformers PRM never does.

Random-weight models never write the step delimiter, so a step ends after an emulated number
of tokens (`emulated_steps` below), drawn per (problem, iteration, parent) uniformly in
mean +- spread; both sides use the same lengths, so both generate exactly the same number of
policy tokens. A policy token id decodes to one character of a set the PRM tokenizer never
merges, so the PRM sees one token per policy token (as with a shared Llama 3 tokenizer).

Real-shapes mode (`--real-shapes`, meant for a GPU; ours only): random bf16 weights of a
Llama-3.2-1B-shaped policy and a Llama-3.1-8B-shaped math-shepherd-format PRM built directly on
the device; reports seconds per problem, tokens/s, peak KV blocks against the bound, and the
split of time between policy, PRM and host. `--scale 1/16` shrinks every width for a CPU smoke.

    python benchmarks/bench_search.py [--json out.json]     # 40 iterations, about 7 min on 2 cores
    python benchmarks/bench_search.py --iterations 4          # a shallow search, about 30 s
    python benchmarks/bench_search.py --real-shapes --n 16 --iterations 15 --json rs16.json
    python benchmarks/bench_search.py --real-shapes --scale 1/16 --problems 2 --iterations 3
    python benchmarks/bench_search.py [--real-shapes] --smoke   # every shape tiny, a few seconds

The questions are the first MATH-500 problems, from benchmarks/math500_head.json (in the
repository, so that a GPU machine with the repository alone runs this; `--data` reads another
MATH-500 / GSM8K JSONL file).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test PRM checkpoints' builders

# The first 16 MATH-500 problems, kept in the repository (the GPU machine has no ../shared; the
# file names its source and how it was cut): the same questions as ../shared/data/math500.jsonl.
DEFAULT_DATA = str(Path(__file__).resolve().parent / "math500_head.json")
# Printable characters absent from the training corpus of `ttc_fast.testing.build_tokenizer`:
# the byte-level BPE has no merge involving them, so each is exactly one PRM token.
CLEAN_CHARS = "jkqvzBCDEFGJKOPQRUVWXYZ09!#%&*<>@[]^_|~"


class StepTokenizer:
    """The policy's tokenizer for random-weight models: prompts are encoded by a real (byte-level
    BPE) tokenizer; generated ids decode to one clean character each (id mod the alphabet)."""

    chat_template = None

    def __init__(self, base, alphabet: str = CLEAN_CHARS):
        self.base, self.alphabet = base, alphabet
        self.eos_token_id = None
        self.bos_token_id = getattr(base, "bos_token_id", None)

    def __call__(self, text, **kw):
        return self.base(text, **kw)

    def encode(self, text, **kw):
        return self.base.encode(text, **kw)

    def decode(self, ids, skip_special_tokens: bool = True, **kw) -> str:
        a = self.alphabet
        return "".join(a[int(i) % len(a)] for i in ids)

    def __len__(self):
        return len(self.base)


def step_length_fn(seed: int, mean: int, spread: int):
    from ttc_fast.sampling import sample_seed

    def length(problem: int, iteration: int, branch: int) -> int:
        return mean - spread + sample_seed(seed, problem, iteration, branch) % (2 * spread + 1)

    return length


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Timers:
    """Wraps bound methods (engine.expand, prm.score_steps, runner.forward) to time them."""

    def __init__(self, device):
        self.device, self.seconds, self.calls = device, {}, {}

    def wrap(self, obj, attr: str, name: str):
        fn = getattr(obj, attr)

        def timed(*a, **kw):
            sync(self.device)
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                sync(self.device)
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t
                self.calls[name] = self.calls.get(name, 0) + 1

        setattr(obj, attr, timed)

    def reset(self):
        self.seconds, self.calls = {}, {}


def wrap_timers(timers: "Timers", engine, prm) -> None:
    """Time the policy's expansions and forwards, and the PRM's prefix encodings, step scoring
    and forwards (every engine forward happens inside `expand`, every PRM forward inside
    `start_many` or `score_steps`)."""
    timers.wrap(engine, "expand", "policy_expand")
    timers.wrap(engine.runner, "forward", "policy_forward")
    timers.wrap(prm, "start_many", "prm_start")
    timers.wrap(prm, "score_steps", "prm_score_steps")
    timers.wrap(prm.runner, "forward", "prm_forward")


def time_split(ours: dict) -> dict:
    """policy forward / policy engine host (scheduling, sampling, stops) / PRM forward / PRM host
    (tokenizing steps, block bookkeeping) / search host (fork, free, top-k, bookkeeping)."""
    t = ours["timers_s"]
    prm_total = t.get("prm_start", 0.0) + t.get("prm_score_steps", 0.0)
    return {
        "policy_forward": t.get("policy_forward", 0.0),
        "policy_engine_host": t.get("policy_expand", 0.0) - t.get("policy_forward", 0.0),
        "prm_forward": t.get("prm_forward", 0.0),
        "prm_host": prm_total - t.get("prm_forward", 0.0),
        "search_host": ours["wall_s"] - t.get("policy_expand", 0.0) - prm_total,
    }


def machine_info(device, extra: dict) -> dict:
    import transformers
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # noqa: BLE001
        triton_version = None
    info = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "triton": triton_version,
    }
    info.update(extra)
    return info


def load_questions(path: str, k: int) -> list:
    """The first k problems of a MATH-500 / GSM8K JSONL file, or of benchmarks/math500_head.json
    (MATH-500 records under "problems", read as `load_problems` reads a MATH-500 line)."""
    from ttc_fast.data import Problem, load_problems

    if path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            records = json.load(f)["problems"]
        if k > len(records):
            raise SystemExit(f"{path} holds {len(records)} problems, {k} asked for: pass --data ../shared/data/math500.jsonl")
        meta_keys = ("problem", "answer", "unique_id")
        return [Problem(str(r["unique_id"]), r["problem"], r["answer"].strip(), "math",
                        {key: v for key, v in r.items() if key not in meta_keys}) for r in records[:k]]
    return load_problems(path)[:k]


# --- ours ----------------------------------------------------------------------------------------
def emulated_steps(strategy, lengths):
    """`strategy` whose steps end after `lengths(problem index, iteration, k)` tokens (EOS ignored;
    k numbers the paths a problem expands in that iteration, whose children share the length)
    instead of at the delimiter, which random-weight models never write."""
    import functools
    from dataclasses import fields, replace

    @functools.lru_cache(maxsize=1024)  # the harness's own work stays out of the host time measured
    def emulated(params, max_tokens):
        return replace(params, stop=(), max_tokens=max_tokens, ignore_eos=True)

    class Emulated(type(strategy)):
        def expansion_sampling(self, sampling, state, k):
            return emulated(super().expansion_sampling(sampling, state, k), lengths(state.index, state.iteration, k))

        def child_finish(self, finish_reason, cut):
            return "stop" if finish_reason == "length" and not cut else finish_reason  # an emulated step end

    Emulated.__name__ = type(strategy).__name__
    return Emulated(**{f.name: getattr(strategy, f.name) for f in fields(strategy)})


def run_ours(engine, prm, problems, strategy, lengths, seed: int, timers: Timers, max_in_flight=None) -> dict:
    from ttc_fast.sampling import SamplingParams
    from ttc_fast.search import TreeSearch

    sampling = SamplingParams(temperature=0.8, top_p=1.0, max_tokens=2048, seed=seed)
    before = dict(engine.stats)
    prm_before = prm.tokens_processed
    engine.stats["peak_used_blocks"] = 0
    timers.reset()
    search = TreeSearch(engine, prm, emulated_steps(strategy, lengths), sampling, system_prompt="",
                        max_problems_in_flight=max_in_flight)
    sync(engine.model.device)
    t0 = time.perf_counter()
    results = list(search.run(problems))
    sync(engine.model.device)
    wall = time.perf_counter() - t0
    s = engine.stats
    return {
        "wall_s": wall, "s_per_problem": wall / len(problems),
        "policy_tokens_generated": sum(r.policy_tokens for r in results),
        "policy_prefill_tokens": s["prefill_tokens"] - before["prefill_tokens"],
        "policy_decode_tokens": s["decode_tokens"] - before["decode_tokens"],
        "policy_cached_prompt_tokens": s["cached_prompt_tokens"] - before["cached_prompt_tokens"],
        "preemptions": s["preemptions"] - before["preemptions"],
        "engine_steps": s["steps"] - before["steps"],
        "peak_used_blocks": s["peak_used_blocks"],
        "prm_tokens": prm.tokens_processed - prm_before,
        "prm_tokens_by_results": sum(r.prm_tokens for r in results),
        "completions_per_problem": [len(r.completions) for r in results],
        "best_scores": [max(c.score for c in r.completions) for r in results],
        "timers_s": dict(timers.seconds), "timer_calls": dict(timers.calls),
    }


# --- the search-and-learn-style baseline ---------------------------------------------------------
class _RowLengths:
    """Stopping criterion: row i is done once it has `lengths[i]` new tokens."""

    def __init__(self, start: int, lengths: torch.Tensor):
        self.start, self.lengths = start, lengths

    def __call__(self, input_ids, scores, **kw):
        return (input_ids.shape[1] - self.start) >= self.lengths


def hf_generate_rows(model, contexts: list[list[int]], lengths: list[int], temperature: float, pad: int) -> list[list[int]]:
    """One `generate` call: left-padded contexts, each row sampled for its own number of tokens
    (finished rows are padded until the longest is done, as HF batches do)."""
    from transformers import StoppingCriteriaList

    width = max(map(len, contexts))
    ids = torch.full((len(contexts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, c in enumerate(contexts):
        ids[i, width - len(c):] = torch.tensor(c)
        mask[i, width - len(c):] = 1
    lens = torch.tensor(lengths)
    crit = StoppingCriteriaList([_RowLengths(width, lens)])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                             max_new_tokens=max(lengths), stopping_criteria=crit, pad_token_id=pad, eos_token_id=None)
    return [out[i, width:width + n].tolist() for i, n in enumerate(lengths)]


def hf_prm_scores(model, items: list[tuple[list[int], list[int]]], good: int, bad: int, batch: int, pad: int) -> list[list[float]]:
    """Full re-encode of each (ids, score positions), `batch` sequences per forward (right padded);
    step scores = softmax(logits[pos, [good, bad]])[0] at each step tag."""
    out = []
    for b in range(0, len(items), batch):
        chunk = items[b:b + batch]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, (seq, _) in enumerate(chunk):
            ids[i, :len(seq)] = torch.tensor(seq)
            mask[i, :len(seq)] = 1
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=mask).logits  # all positions, as the reference PRM code does
        for i, (_, pos) in enumerate(chunk):
            pair = logits[i, pos][:, [good, bad]].float().softmax(-1)[:, 0]
            out.append(pair.tolist())
    return out


def run_baseline(hf_policy, hf_prm, prm, prompt_ids: list[list[int]], problems, strategy, lengths, decode,
                 temperature: float, prm_batch: int, seed: int) -> dict:
    """search-and-learn's beam search loop over transformers, no cache across iterations."""
    torch.manual_seed(seed)
    n, width, keep, iters = strategy.n, strategy.width, strategy.keep, strategy.iterations
    stats = {"policy_tokens_generated": 0, "policy_prefill_tokens": 0, "policy_decode_tokens": 0, "prm_tokens": 0,
             "generate_calls": 0, "prm_forwards": 0}
    best = []
    t_gen = t_prm = 0.0
    t0 = time.perf_counter()
    for p, problem in enumerate(problems):
        # a beam: (generated token ids, step texts, step scores)
        frontier = [(([], [], []), n)]  # (parent beam, times to expand it)
        completed = []
        for it in range(iters):
            rows = []
            for k, (parent, count) in enumerate(frontier):
                rows += [(parent, lengths(p, it, k))] * count
            contexts = [prompt_ids[p] + parent[0] for parent, _ in rows]
            t = time.perf_counter()
            new = hf_generate_rows(hf_policy, contexts, [L for _, L in rows], temperature, pad=0)
            t_gen += time.perf_counter() - t
            stats["generate_calls"] += 1
            stats["policy_tokens_generated"] += sum(map(len, new))
            stats["policy_prefill_tokens"] += sum(map(len, contexts))
            stats["policy_decode_tokens"] += sum(len(x) - 1 for x in new)
            children = [(parent[0] + toks, parent[1] + [decode(toks)]) for (parent, _), toks in zip(rows, new)]
            items = [prm.full_ids(problem.question, steps) for _, steps in children]
            stats["prm_tokens"] += sum(len(ids) for ids, _ in items)
            stats["prm_forwards"] += -(-len(items) // prm_batch)
            t = time.perf_counter()
            scores = hf_prm_scores(hf_prm, items, prm.fmt.good, prm.fmt.bad, prm_batch, pad=0)
            t_prm += time.perf_counter() - t
            beams = [(gen, steps, sc) for (gen, steps), sc in zip(children, scores)]
            if it == iters - 1:
                completed += beams
                break
            agg = [sc[-1] for _, _, sc in beams]  # aggregation "last"
            top = sorted(sorted(range(len(beams)), key=lambda i: agg[i], reverse=True)[:keep])
            frontier = [(beams[i], width) for i in top]
        best.append(max(sc[-1] for _, _, sc in completed))
    wall = time.perf_counter() - t0
    stats.update({"wall_s": wall, "s_per_problem": wall / len(problems), "generate_s": t_gen, "prm_s": t_prm,
                  "best_scores": best})
    return stats


# --- modes ---------------------------------------------------------------------------------------
def cpu_side_by_side(args) -> dict:
    from transformers import AutoModelForCausalLM

    import ttc_fast as tf
    from ttc_fast.testing import build_tiny_model
    from prm_builders import build_math_shepherd_prm

    device = torch.device(args.device or "cpu")
    # One more problem than measured: the warm-up runs on it, so the prefix caches of the timed
    # run start cold for the measured prompts.
    problems = load_questions(args.data, args.problems + 1)
    warm_problem, problems = problems[-1:], problems[:-1]
    strategy = tf.BeamSearch(n=args.n, width=args.width, iterations=args.iterations)
    lengths = step_length_fn(args.seed, args.step_mean, args.step_spread)
    with tempfile.TemporaryDirectory() as tmp:
        pol_path = build_tiny_model(Path(tmp) / "policy", "llama", seed=1, hidden=args.hidden, layers=args.layers,
                                    heads=args.heads, kv_heads=args.kv_heads, max_position_embeddings=4096)
        prm_path = build_math_shepherd_prm(Path(tmp) / "prm", seed=2, hidden=args.prm_hidden, layers=args.prm_layers,
                                           heads=args.heads, kv_heads=args.kv_heads, max_position_embeddings=4096)
        policy = tf.load_model(pol_path, device=device)
        policy.tokenizer = StepTokenizer(policy.tokenizer)
        prm = tf.load_prm(prm_path, kind="math-shepherd", device=device, kv_cache_bytes=args.prm_kv_mb << 20,
                          backend=args.backend)
        hf_policy = AutoModelForCausalLM.from_pretrained(str(pol_path), dtype=policy.dtype).to(device).eval()
        hf_prm = AutoModelForCausalLM.from_pretrained(str(prm_path), dtype=policy.dtype).to(device).eval()
    engine = tf.Engine(policy, kv_cache_bytes=args.kv_mb << 20, backend=args.backend)
    decode = policy.tokenizer.decode
    # One PRM token per policy token: check on a sample step.
    probe = decode(list(range(50)))
    ids0, _ = prm.full_ids("q", [probe])
    ids1, _ = prm.full_ids("q", [])
    assert len(ids0) - len(ids1) == 50 + 1 + len(prm.fmt.tag_ids), (len(ids0), len(ids1))

    from ttc_fast.prompts import encode_prompt
    def encode(p):
        return encode_prompt(p.question, policy.tokenizer, "")

    prompt_ids = [encode(p) for p in problems]
    prm_prefix = [len(prm.fmt.prefix_ids(p.question)) for p in problems]

    timers = Timers(device)
    wrap_timers(timers, engine, prm)

    # Warm-up both sides on one problem, two iterations (first-call costs out of the timings).
    warm = tf.BeamSearch(n=args.width, width=args.width, iterations=2)
    run_ours(engine, prm, warm_problem, warm, lengths, args.seed + 1, timers)
    run_baseline(hf_policy, hf_prm, prm, [encode(warm_problem[0])], warm_problem, warm, lengths, decode, 0.8, args.prm_batch,
                 args.seed + 1)

    ours = run_ours(engine, prm, problems, strategy, lengths, args.seed, timers)
    base = run_baseline(hf_policy, hf_prm, prm, prompt_ids, problems, strategy, lengths, decode, 0.8, args.prm_batch, args.seed)
    ours["split_s"] = time_split(ours)
    info = machine_info(device, {
        "mode": "cpu side by side",
        "policy": f"random Llama 3 (llama3 rope, tied), hidden {args.hidden}, {args.layers} layers, {args.heads} q / {args.kv_heads} kv heads, "
                  f"intermediate {2 * args.hidden}, vocab {len(policy.tokenizer)}, {policy.dtype}",
        "prm": f"random math-shepherd-format Mistral, hidden {args.prm_hidden}, {args.prm_layers} layers, {args.heads} q / {args.kv_heads} kv heads, "
               f"vocab {prm.model.config.vocab_size}, {policy.dtype}",
        "search": f"BeamSearch n={args.n} width={args.width} iterations={args.iterations}, temperature 0.8, aggregation last",
        "step_lengths": f"uniform {args.step_mean - args.step_spread}..{args.step_mean + args.step_spread} tokens per (problem, iteration, parent)",
        "problems": [p.id for p in problems], "prompt_tokens": [len(x) for x in prompt_ids], "prm_prefix_tokens": prm_prefix,
        "prm_batch": args.prm_batch, "backend": engine.runner.attention.name, "block_size": engine.runner.block_size,
    })
    ratios = {
        "wall": base["wall_s"] / ours["wall_s"],
        "prm_tokens": base["prm_tokens"] / max(1, ours["prm_tokens"]),
        "policy_tokens_processed": (base["policy_prefill_tokens"] + base["policy_decode_tokens"])
        / max(1, ours["policy_prefill_tokens"] + ours["policy_decode_tokens"]),
    }
    print(json.dumps(info, indent=1))
    k = len(problems)
    rows = [
        ("wall s per problem", f"{ours['s_per_problem']:.2f}", f"{base['s_per_problem']:.2f}", f"{ratios['wall']:.1f}x  (target >= 10x)"),
        ("PRM tokens processed", ours["prm_tokens"], base["prm_tokens"], f"{ratios['prm_tokens']:.1f}x"),
        ("policy tokens generated", ours["policy_tokens_generated"], base["policy_tokens_generated"], ""),
        ("policy tokens processed (prefill+decode)", ours["policy_prefill_tokens"] + ours["policy_decode_tokens"],
         base["policy_prefill_tokens"] + base["policy_decode_tokens"], f"{ratios['policy_tokens_processed']:.1f}x"),
        ("  of which prefill", ours["policy_prefill_tokens"], base["policy_prefill_tokens"], ""),
    ]
    print(f"\n{k} MATH-500 problems, prompt tokens {info['prompt_tokens']}")
    print(f"{'':<42} {'ttc_fast':>10} {'baseline':>10}   baseline / ttc_fast")
    for name, a, b, r in rows:
        print(f"{name:<42} {a!s:>10} {b!s:>10}   {r}")
    print("\nttc_fast time split (s, whole run): " + ", ".join(f"{k2} {v:.2f}" for k2, v in ours["split_s"].items()))
    print(f"baseline time split (s, whole run): generate {base['generate_s']:.2f}, prm {base['prm_s']:.2f}")
    return {"info": info, "ours": ours, "baseline": base, "ratios": ratios}


def parse_scale(text: str) -> Fraction:
    f = Fraction(text)
    if not 0 < f <= 1:
        raise SystemExit(f"--scale must be in (0, 1], got {text}")
    return f


def random_model(cfg, device, dtype, tokenizer, name: str, seed: int):
    from ttc_fast.config import rope_inv_freq
    from ttc_fast.loader import LoadedModel
    from ttc_fast.model import CausalLM

    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            module = CausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    module.inv_freq = rope_inv_freq(cfg.rope, cfg.head_dim).to(device)
    module.tie_weights()
    module.eval().requires_grad_(False)
    return LoadedModel(module, cfg, tokenizer, Path(f"random:{name}"), device, dtype, ())


def real_shapes(args) -> dict:
    import ttc_fast as tf
    from ttc_fast.config import ModelConfig, RopeConfig
    from ttc_fast.kv_pool import bytes_per_block
    from ttc_fast.prm import ModelPRM, make_format
    from ttc_fast.prompts import encode_prompt
    from prm_builders import _tokenizer

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[
        args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    s = parse_scale(args.scale)

    def w(x: int) -> int:
        return max(1, int(x * s))

    def config(hidden, layers, heads, kv_heads, inter, tie, rope, vocab=128256, eps=1e-5):
        heads_s, kv_s = w(heads), w(kv_heads)
        head_dim = hidden // heads
        return ModelConfig(model_type="llama", vocab_size=max(1024, w(vocab)), hidden_size=heads_s * head_dim,
                           intermediate_size=w(inter), num_layers=layers, num_heads=heads_s, num_kv_heads=kv_s,
                           head_dim=head_dim, max_position_embeddings=131072, rms_norm_eps=eps, rope=rope,
                           tie_word_embeddings=tie)

    llama3_rope = RopeConfig(theta=500000.0, rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                             original_max_position_embeddings=8192)
    llama31_rope = RopeConfig(theta=500000.0, rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                              original_max_position_embeddings=8192)
    pol_cfg = config(2048, 16, 32, 8, 8192, True, llama3_rope)
    prm_cfg = config(4096, 32, 32, 8, 14336, False, llama31_rope)
    with tempfile.TemporaryDirectory() as tmp:
        tok = _tokenizer(Path(tmp), [], plain=["ки"])  # byte-level BPE + the math-shepherd tag
    t_build = time.perf_counter()
    policy = random_model(pol_cfg, device, dtype, StepTokenizer(tok), "llama-3.2-1b-shape", 1)
    prm_model = random_model(prm_cfg, device, dtype, tok, "llama-3.1-8b-prm-shape", 2)
    sync(device)
    t_build = time.perf_counter() - t_build
    fmt = make_format("math-shepherd", tok, "random PRM")

    bs = args.block_size
    gb = 1 << 30
    pol_kv = int((args.kv_gb if args.kv_gb is not None else (12 if device.type == "cuda" else 0.5)) * gb)
    prm_kv = int((args.prm_kv_gb if args.prm_kv_gb is not None else (32 if device.type == "cuda" else 1)) * gb)
    engine = tf.Engine(policy, kv_cache_bytes=pol_kv, block_size=bs, backend=args.backend)
    prm = ModelPRM(prm_model, fmt, None, kv_cache_bytes=prm_kv, block_size=bs, backend=args.backend)

    problems = load_questions(args.data, args.problems + 1)
    warm_problem, problems = problems[-1:], problems[:-1]
    strategy = tf.BeamSearch(n=args.n, width=args.width, iterations=args.iterations)
    lengths = step_length_fn(args.seed, args.step_mean, args.step_spread)
    prompt_len = [len(encode_prompt(p.question, policy.tokenizer, "")) for p in problems]
    prefix_len = [len(fmt.prefix_ids(p.question)) for p in problems]
    max_step = args.step_mean + args.step_spread

    def blocks(t):
        return -(-t // bs)

    # Per problem: prompt blocks + N x (suffix blocks + 1); the suffix is every step at its longest.
    suffix = strategy.iterations * max_step
    pol_bound = [blocks(p) + args.n * (blocks(suffix) + 1) for p in prompt_len]
    prm_suffix = strategy.iterations * (max_step + 1 + len(fmt.tag_ids))
    prm_bound = [blocks(p) + args.n * (blocks(prm_suffix) + 1) for p in prefix_len]
    in_flight = max(1, min(len(problems), engine.runner.num_blocks // max(pol_bound), prm.runner.num_blocks // max(prm_bound)))
    bound_total = sum(sorted(pol_bound, reverse=True)[:in_flight])

    timers = Timers(device)
    wrap_timers(timers, engine, prm)
    prm_peak = [0]
    inner = prm.score_steps

    def score_and_track(*a, **kw):
        out = inner(*a, **kw)
        prm_peak[0] = max(prm_peak[0], prm.runner.blocks.num_used_blocks)
        return out

    prm.score_steps = score_and_track

    warm = tf.BeamSearch(n=args.width, width=args.width, iterations=2)
    run_ours(engine, prm, warm_problem, warm, lengths, args.seed + 1, timers)
    prm_peak[0] = 0
    ours = run_ours(engine, prm, problems, strategy, lengths, args.seed, timers, max_in_flight=in_flight)
    wall = ours["wall_s"]
    split = time_split(ours)
    ours.update({
        "split_s": split, "split_frac": {k: v / wall for k, v in split.items()},
        "policy_tok_s_generated": ours["policy_tokens_generated"] / wall,
        "policy_tok_s_processed": (ours["policy_prefill_tokens"] + ours["policy_decode_tokens"]) / wall,
        "prm_tok_s": ours["prm_tokens"] / wall,
        "peak_blocks_bound": bound_total, "problems_in_flight": in_flight,
        "policy_pool_blocks": engine.runner.num_blocks, "prm_pool_blocks": prm.runner.num_blocks,
        "prm_peak_used_blocks_after_scoring": prm_peak[0], "prm_peak_blocks_bound": sum(sorted(prm_bound, reverse=True)[:in_flight]),
    })
    desc = lambda c: (f"hidden {c.hidden_size}, {c.num_layers} layers, {c.num_heads} q / {c.num_kv_heads} kv heads x {c.head_dim}, "
                      f"intermediate {c.intermediate_size}, vocab {c.vocab_size}, tied {c.tie_word_embeddings}")
    info = machine_info(device, {
        "mode": "real shapes", "scale": str(s), "dtype": str(dtype), "build_s": t_build,
        "policy": "random Llama-3.2-1B shape: " + desc(pol_cfg), "prm": "random Llama-3.1-8B-shape math-shepherd PRM: " + desc(prm_cfg),
        "search": f"BeamSearch n={args.n} width={args.width} iterations={args.iterations}, temperature 0.8",
        "step_lengths": f"uniform {args.step_mean - args.step_spread}..{max_step}",
        "problems": [p.id for p in problems], "prompt_tokens": prompt_len, "prm_prefix_tokens": prefix_len,
        "block_size": bs, "backend": engine.runner.attention.name,
        "policy_kv_bytes_per_block": bytes_per_block(pol_cfg, bs, dtype), "prm_kv_bytes_per_block": bytes_per_block(prm_cfg, bs, dtype),
    })
    print(json.dumps(info, indent=1))
    print(f"\nN={args.n}: {ours['s_per_problem']:.2f} s/problem ({len(problems)} problems, {in_flight} in flight)")
    print(f"policy: {ours['policy_tokens_generated']} generated, {ours['policy_tok_s_generated']:.0f} tok/s generated, "
          f"{ours['policy_tok_s_processed']:.0f} tok/s processed; PRM: {ours['prm_tokens']} tokens, {ours['prm_tok_s']:.0f} tok/s")
    print(f"peak policy KV blocks {ours['peak_used_blocks']} / bound {bound_total} (prompt blocks + N x (suffix blocks + 1), "
          f"summed over {in_flight} in flight); PRM peak after scoring {prm_peak[0]} / bound {ours['prm_peak_blocks_bound']}")
    print("time split: " + ", ".join(f"{k} {v:.2f}s ({100 * v / wall:.0f}%)" for k, v in split.items()))
    return {"info": info, "ours": ours}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real-shapes", action="store_true", help="Llama-3.2-1B policy + Llama-3.1-8B PRM shapes (GPU), ours only")
    parser.add_argument("--scale", default="1", help="real shapes: fraction of every width (e.g. 1/16 for a CPU smoke)")
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--problems", type=int, default=None, help="first K MATH-500 problems (default 3 CPU, 8 real shapes)")
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--width", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=None,
                        help="default 40, search-and-learn's beam search depth (CPU side by side); 15 (real shapes)")
    parser.add_argument("--step-mean", type=int, default=40)
    parser.add_argument("--step-spread", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=256, help="CPU mode: policy hidden size")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prm-hidden", type=int, default=256)
    parser.add_argument("--prm-layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--prm-batch", type=int, default=8, help="baseline PRM batch size")
    parser.add_argument("--kv-mb", type=int, default=256, help="CPU mode: policy KV pool (MiB)")
    parser.add_argument("--prm-kv-mb", type=int, default=256, help="CPU mode: PRM KV pool (MiB)")
    parser.add_argument("--kv-gb", type=float, default=None, help="real shapes: policy KV pool (GiB; 12 on CUDA)")
    parser.add_argument("--prm-kv-gb", type=float, default=None, help="real shapes: PRM KV pool (GiB; 32 on CUDA: N=256 needs ~28 GiB for one problem in flight)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--smoke", action="store_true",
                        help="every shape tiny, for a quick end-to-end check (overrides --scale 1/32, --problems 1, "
                             "--iterations 2, --step-mean 8, --step-spread 2, --kv-gb 0.125, --prm-kv-gb 0.25; CPU mode: "
                             "hidden 32, 1 layer)")
    args = parser.parse_args()
    if args.smoke:
        args.scale, args.problems, args.iterations, args.step_mean, args.step_spread = "1/32", 1, 2, 8, 2
        args.kv_gb, args.prm_kv_gb = 0.125, 0.25  # real shapes: zeroing the CPU defaults would take longer
        args.hidden = args.prm_hidden = 32
        args.layers = args.prm_layers = 1
        args.heads, args.kv_heads = 4, 2
    if args.problems is None:
        args.problems = 8 if args.real_shapes else 3
    if args.iterations is None:
        args.iterations = 15 if args.real_shapes else 40
    out = real_shapes(args) if args.real_shapes else cpu_side_by_side(args)
    out["command"] = " ".join(sys.argv)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)


if __name__ == "__main__":
    main()
