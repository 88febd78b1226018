"""The `ttc-fast` command line.

    ttc-fast demo                      build a tiny random model, load it, generate, report speed
    ttc-fast generate --model DIR ...  generate from a local checkpoint
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32, float16 or bfloat16")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    p.add_argument("--kv-cache-bytes", type=int, default=None)
    p.add_argument("--block-size", type=int, default=16)


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
        engine = tf.Engine(model, kv_cache_bytes=args.kv_cache_bytes, block_size=args.block_size, backend=args.backend)
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
    engine = tf.Engine(model, kv_cache_bytes=args.kv_cache_bytes, block_size=args.block_size, backend=args.backend)
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"ttc-fast: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
