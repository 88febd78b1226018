"""The PRM's tokenization of real step texts: what a search's PRM spends on each new step.

Steps are the GSM8K test solutions' lines and the MATH-500 solutions' paragraphs (../shared/data),
encoded in the math-shepherd format with SmolLM2-135M-Instruct's tokenizer (a 49K BPE; the
checkpoint fetched as the tests fetch it) plus the format's step tag "ки". Timed, each the
median of 5:
  one batch      one `Format.rows` call over --steps steps (the search's path)
  one at a time  the same texts, one call of the tokenizer's `encode` each (the path before)
  on threads     that, split over a thread per core (as the path before did past 64 rows)

    python benchmarks/bench_prm_tokenize.py [--steps 1024] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SOURCES = {"gsm8k lines": ("gsm8k_test.jsonl", "answer", "\n"), "math500 paragraphs": ("math500.jsonl", "solution", "\n\n")}


def step_texts(name: str, limit: int) -> list[str]:
    file, key, sep = SOURCES[name]
    out = []
    with open(DATA / file) as f:
        for line in f:
            out += [s for s in json.loads(line)[key].split(sep) if s.strip()]
            if len(out) >= limit:
                break
    return out[:limit]


def median_seconds(fn, repeats: int = 5) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1024)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    from ttc_fast.prm.formats import make_format
    from ttc_fast.testing_smollm2 import smollm2_dir

    tok = AutoTokenizer.from_pretrained(str(smollm2_dir()))
    tok.add_tokens([AddedToken("ки", normalized=False)])
    fmt = make_format("math-shepherd", tok)
    rows, threads = [], os.cpu_count() or 1
    for name in SOURCES:
        steps = step_texts(name, args.steps)
        indices = [1] * len(steps)
        tokens = statistics.mean(len(fmt.row_ids(s, 1)[0]) for s in steps)
        batch = median_seconds(lambda: fmt.rows(steps, indices))
        # The texts the format encodes for these steps (model-card layout, a step after the first).
        texts = ["\n" + step + " ки" for step in steps]
        encode = tok._tokenizer.encode

        def one_at_a_time(chunk):
            return [encode(text, add_special_tokens=False).ids for text in chunk]

        alone = median_seconds(lambda: one_at_a_time(texts))
        with ThreadPoolExecutor(threads) as pool:
            chunks = [texts[k::threads] for k in range(threads)]
            threaded = median_seconds(lambda: list(pool.map(one_at_a_time, chunks)))
        assert [row[0] for row in fmt.rows(steps, indices)] == one_at_a_time(texts)
        us = {k: 1e6 * v / len(steps) for k, v in (("batch", batch), ("alone", alone), ("threads", threaded))}
        rows.append({"steps": name, "count": len(steps), "tokens_per_step": tokens, "batch_us_per_step": us["batch"],
                     "one_at_a_time_us_per_step": us["alone"], f"one_at_a_time_{threads}_threads_us_per_step": us["threads"]})
        print(f"{name:>20}: {len(steps)} steps, {tokens:.0f} tokens a step; µs a step: one batch {us['batch']:.1f}, "
              f"one at a time {us['alone']:.1f}, one at a time on {threads} threads {us['threads']:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu_count": os.cpu_count(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
