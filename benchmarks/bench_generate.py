"""Tokens/s of `Engine.generate` against transformers' `generate`, same model, batch and lengths.

Two workloads, both run side by side in one process on the same random-weight model:
  batch:   B distinct prompts, greedy, fixed lengths;
  samples: N samples of one prompt at temperature 1 (ours prefills the prompt once and forks it;
           transformers expands the prompt N times with num_return_sequences).
Generation ignores EOS so both sides produce exactly the same number of tokens.

    python benchmarks/bench_generate.py [--device cpu] [--json out.json]
    python benchmarks/bench_generate.py --model PATH   # a real checkpoint instead (e.g. SmolLM2:
                                                       # python -m ttc_fast.testing_smollm2 prints its path)
    python benchmarks/bench_generate.py --smoke        # every shape tiny, a few seconds
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path
import time

import torch


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    import transformers
    from transformers import AutoModelForCausalLM

    import ttc_fast as tf
    from ttc_fast.testing import build_tiny_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a checkpoint directory (default: a random Llama of --hidden/--layers/--vocab)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", default=None)
    parser.add_argument("--switches", action="store_true",
                        help="also time an engine with --overlap and --cuda-graphs, side by side, and check its tokens")
    parser.add_argument("--smoke", action="store_true",
                        help="every shape tiny, a quick end-to-end check (overrides --hidden 64 --layers 1 --vocab 512 "
                             "--batch 2 --samples 4 --prompt-len 16 --new-tokens 4 --repeats 1)")
    args = parser.parse_args()
    if args.smoke:
        args.hidden, args.layers, args.vocab, args.batch, args.samples = 64, 1, 512, 2, 4
        args.prompt_len, args.new_tokens, args.repeats = 16, 4, 1

    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or build_tiny_model(tmp, "llama", with_tokenizer=False, vocab_size=args.vocab, hidden=args.hidden,
                                              layers=args.layers, heads=8, kv_heads=4, max_position_embeddings=4096)
        ours = tf.load_model(path, device=args.device, dtype=args.dtype)
        ref = AutoModelForCausalLM.from_pretrained(str(path), dtype=ours.dtype).to(ours.device).eval()
    if args.model:
        cfg = ours.config
        args.vocab = cfg.vocab_size
        model_name = (f"{Path(args.model).name}: {sum(p.numel() for p in ours.module.parameters()) / 1e6:.0f}M parameters, hidden "
                      f"{cfg.hidden_size}, {cfg.num_layers} layers, {cfg.num_heads} q / {cfg.num_kv_heads} kv heads, "
                      f"vocab {cfg.vocab_size}, {ours.dtype}")
    else:
        model_name = f"random Llama, hidden {args.hidden}, {args.layers} layers, 8 q / 4 kv heads, vocab {args.vocab}, {ours.dtype}"
    engine = tf.Engine(ours, kv_cache_bytes=256 << 20)
    switched = tf.Engine(ours, kv_cache_bytes=256 << 20, overlap=True, cuda_graphs=True) if args.switches else None
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, args.vocab, (args.prompt_len,), generator=g).tolist() for _ in range(args.batch)]
    n_new = args.new_tokens

    def ours_batch(e=engine):
        return e.generate(prompts, tf.SamplingParams(temperature=0.0, max_tokens=n_new, ignore_eos=True))

    def ref_batch():
        ids = torch.tensor(prompts, device=ours.device)
        with torch.inference_mode():
            ref.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n_new,
                         min_new_tokens=n_new, eos_token_id=None, pad_token_id=0)

    def ours_samples(e=engine):
        return e.generate([prompts[0]], tf.SamplingParams(temperature=1.0, max_tokens=n_new, n=args.samples,
                                                          ignore_eos=True, seed=0))

    def ref_samples():
        ids = torch.tensor([prompts[0]], device=ours.device)
        with torch.inference_mode():
            ref.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                         num_return_sequences=args.samples, max_new_tokens=n_new, min_new_tokens=n_new,
                         eos_token_id=None, pad_token_id=0)

    rows = []
    for name, seqs, ours_fn, ref_fn in (
        (f"batch of {args.batch} prompts, greedy", args.batch, ours_batch, ref_batch),
        (f"{args.samples} samples of one prompt", args.samples, ours_samples, ref_samples),
    ):
        t_ours, t_ref = timed(ours_fn, args.repeats), timed(ref_fn, args.repeats)
        tokens = seqs * n_new
        rows.append({"workload": name, "generated_tokens": tokens, "ours_s": t_ours, "transformers_s": t_ref,
                     "ours_tok_s": tokens / t_ours, "transformers_tok_s": tokens / t_ref, "speedup": t_ref / t_ours})
        if switched is not None:
            t_sw = timed(lambda: ours_fn(switched), args.repeats)
            same = ([o.token_ids for r in ours_fn(switched) for o in r.outputs]
                    == [o.token_ids for r in ours_fn() for o in r.outputs])
            rows[-1].update(switched_s=t_sw, switched_tok_s=tokens / t_sw, switched_speedup=t_ours / t_sw,
                            switched_same_tokens=same)

    info = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "device": str(ours.device),
        "gpu": torch.cuda.get_device_name() if ours.device.type == "cuda" else None,
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "model": model_name,
        "prompt_len": args.prompt_len, "new_tokens": n_new, "backend": engine.runner.attention.name,
    }
    print(json.dumps(info, indent=1))
    print(f"{'workload':<36} {'ours tok/s':>11} {'HF tok/s':>10} {'speed-up':>9}")
    for r in rows:
        print(f"{r['workload']:<36} {r['ours_tok_s']:>11.0f} {r['transformers_tok_s']:>10.0f} {r['speedup']:>8.2f}x")
        if "switched_s" in r:
            print(f"  with --overlap --cuda-graphs: {r['switched_tok_s']:.0f} tok/s ({r['switched_speedup']:.2f}x ours), "
                  f"same tokens: {r['switched_same_tokens']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
