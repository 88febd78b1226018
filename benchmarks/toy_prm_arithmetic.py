"""How well does the toy PRM still know the arithmetic it must check?

    python benchmarks/toy_prm_arithmetic.py                      # the shipped builtin:toy-prm
    python benchmarks/toy_prm_arithmetic.py --prm path/to/checkpoint --solutions 300
    python benchmarks/toy_prm_arithmetic.py --own-slips 600     # also S's own slips (about 2 min)

A PRM's verdict on a result digit can only be as good as its own prediction of that digit. This
reads the next-token prediction of the PRM's LM head at every result digit ("... = 960." and the
boxed answer) of fresh reference solutions written in the PRM's math-shepherd format, and the
same for policy L (the PRM's initialisation) in the policy's own format, and reports how often
each predicts the right digit. The toy PRM had fallen to 93.6% against L's 99.2% before its
arithmetic stages (see benchmarks/toy_training_notes.md).

`--own-slips N` asks the question a search asks: S samples 4 solutions of N fresh problems at the
toy job's temperature; each first wrong step is paired with the same step mended
(`own_slip_pairs`), and the script reports how often the mended step wins under the PRM's step
score (its verdict at the tag), under the PRM's own LM (the log-probability of the step's text),
and under L's (in its own format): whether a verdict that misses a slip lacks the arithmetic or
fails to use it.
"""
import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from ttc_fast.toy.evaluate import TEMPERATURE  # noqa: E402
from ttc_fast.toy.task import prefix_labels  # noqa: E402
from ttc_fast.toy.tokenizer import build_tokenizer  # noqa: E402
from toy_training import (  # noqa: E402
    BUILTIN, _fresh_problem, own_slip_pairs, policy_row, policy_view, prm_data, prm_row,
)


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
        logits = logits_of(model, ids)
        for i in where:
            hits += int(logits[i].argmax()) == ids[i + 1]
        total += len(where)
    return hits, total


def logits_of(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


def span_logprob(logits: torch.Tensor, ids: list[int], start: int, end: int) -> float:
    """log P(ids[start:end] | ids[:start]) from a causal LM's logits over ids."""
    logp = logits.log_softmax(-1)
    return sum(float(logp[i - 1, ids[i]]) for i in range(start, end))


def own_slip_wins(prm, policy, tok, pairs) -> dict[str, int]:
    """Per judge, how many (mended, slipped) pairs it ranks the mended step first."""
    good, bad = tok.convert_tokens_to_ids("+"), tok.convert_tokens_to_ids("-")
    wins = {"PRM step score": 0, "PRM's LM": 0, "policy L's LM": 0}
    for mended, slip in pairs:
        judged = []
        for q, steps, labels in (mended, slip):
            ids, tags, _, _ = prm_row(tok, q, steps, labels)
            logits = logits_of(prm, ids)  # one forward pass gives the verdict and the LM's view
            verdict = float(logits[tags[-1], [good, bad]].softmax(-1)[0])
            begin = tags[-2] + 1 if len(tags) > 1 else len(tok(q)["input_ids"])
            in_prm = span_logprob(logits, ids, begin, tags[-1])
            full, ends = policy_view(tok, q, steps)
            step_start = ends[-2] + 1 if len(ends) > 1 else len(tok(q + "\n\n")["input_ids"])  # after its "\n\n"
            in_policy = span_logprob(logits_of(policy, full), full, step_start, len(full))
            judged.append((verdict, in_prm, in_policy))
        for name, right, wrong in zip(wins, *judged):
            wins[name] += right > wrong
    return wins


def main() -> None:
    from transformers import LlamaForCausalLM

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prm", default=str(BUILTIN / "toy-prm"))
    ap.add_argument("--policy", default=str(BUILTIN / "toy-policy-l"))
    ap.add_argument("--solutions", type=int, default=150)
    ap.add_argument("--seed", type=int, default=12345)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--own-slips", type=int, default=0, metavar="N", help="also judge S's own slips on N fresh problems")
    ap.add_argument("--temperature", type=float, default=TEMPERATURE,
                    help="S's sampling temperature for its own slips (default: the toy job's)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tok = build_tokenizer()
    rng = random.Random(args.seed)
    problems = [_fresh_problem(rng) for _ in range(args.solutions)]
    prm_rows = [prm_row(tok, p.question, p.meta["steps"], prefix_labels(p.question, p.meta["steps"]))[0] for p in problems]
    policy_rows = [policy_row(tok, p)[0] for p in problems]
    prm, policy = (LlamaForCausalLM.from_pretrained(path).eval() for path in (args.prm, args.policy))
    for name, model, rows in (("PRM (math-shepherd format)", prm, prm_rows), ("policy L (its own format)", policy, policy_rows)):
        hits, total = digit_accuracy(model, rows, tok)
        print(f"{name}: result digits predicted right {hits / total:.3f} ({hits} of {total}, {args.solutions} solutions)")
    if args.own_slips:
        samples = prm_data(BUILTIN / "toy-policy-s", args.own_slips, 4, seed=args.seed + 1, temperature=args.temperature)
        pairs = own_slip_pairs(samples)
        for name, won in own_slip_wins(prm, policy, tok, pairs).items():
            print(f"S's own slips ({len(pairs)} from {len(samples)} samples at T = {args.temperature}): "
                  f"{name} ranks the mended step first {won / len(pairs):.3f}")


if __name__ == "__main__":
    main()
