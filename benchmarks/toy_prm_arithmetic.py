"""How well does the toy PRM still know the arithmetic it must check?

    python benchmarks/toy_prm_arithmetic.py                      # the shipped builtin:toy-prm
    python benchmarks/toy_prm_arithmetic.py --prm path/to/checkpoint --solutions 300

A PRM's verdict on a result digit can only be as good as its own prediction of that digit. This
reads the next-token prediction of the PRM's LM head at every result digit ("... = 960." and the
boxed answer) of fresh reference solutions written in the PRM's math-shepherd format, and the
same for policy L (the PRM's initialisation) in the policy's own format, and reports how often
each predicts the right digit. The toy PRM had fallen to 93.6% against L's 99.2% before its
arithmetic stages (see benchmarks/RESULTS.md).
"""
import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from ttc_fast.toy.task import prefix_labels  # noqa: E402
from ttc_fast.toy.tokenizer import build_tokenizer  # noqa: E402
from ttc_fast.toy.train import BUILTIN, _fresh_problem, policy_row, prm_row  # noqa: E402


def result_digit_targets(tokens: list[str]) -> list[int]:
    """Positions whose next token is a digit of a result: the digits right after " =" or "{"."""
    out, in_result = [], False
    for i, t in enumerate(tokens):
        if t in (" =", "{"):
            in_result = True
        elif in_result and t.strip().isdigit():
            out.append(i - 1)
        else:
            in_result = False
    return out


def digit_accuracy(model, rows: list[list[int]], tok) -> tuple[int, int]:
    hits = total = 0
    for ids in rows:
        where = result_digit_targets(tok.convert_ids_to_tokens(ids))
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0]
        for i in where:
            hits += int(logits[i].argmax()) == ids[i + 1]
        total += len(where)
    return hits, total


def main() -> None:
    from transformers import LlamaForCausalLM

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prm", default=str(BUILTIN / "toy-prm"))
    ap.add_argument("--policy", default=str(BUILTIN / "toy-policy-l"))
    ap.add_argument("--solutions", type=int, default=150)
    ap.add_argument("--seed", type=int, default=12345)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tok = build_tokenizer()
    rng = random.Random(args.seed)
    problems = [_fresh_problem(rng) for _ in range(args.solutions)]
    prm_rows = [prm_row(tok, p.question, p.meta["steps"], prefix_labels(p.question, p.meta["steps"]))[0] for p in problems]
    policy_rows = [policy_row(tok, p)[0] for p in problems]
    for name, path, rows in (("PRM (math-shepherd format)", args.prm, prm_rows), ("policy L (its own format)", args.policy, policy_rows)):
        hits, total = digit_accuracy(LlamaForCausalLM.from_pretrained(path).eval(), rows, tok)
        print(f"{name}: result digits predicted right {hits / total:.3f} ({hits} of {total}, {args.solutions} solutions)")


if __name__ == "__main__":
    main()
