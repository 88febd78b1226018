"""The toy task's reference row: beam search of policy S guided by the exact step checker
(`builtin:toy-checker`) instead of the learned PRM, with the toy job's settings.

    python benchmarks/toy_checker_reference.py      # about 45 s on 2 CPU cores
    python benchmarks/toy_checker_reference.py --temperatures 0.4 0.6 0.8 1.0 --strategies beam dvts
    python benchmarks/toy_checker_reference.py --verifier prm --temperatures 0.6 0.8 --ns 16
    python benchmarks/toy_checker_reference.py --verifier prm --ns 64 --aggregations last min prod
    python benchmarks/toy_checker_reference.py --verifier prm --ns 64 --width 8 --lookahead 1 --problems dev

It separates the two things the toy table measures: whether search over S's samples can reach
policy L at all (it can, with an exact verifier), and how much of that the learned PRM delivers.
`--temperatures` asks the same question at other sampling temperatures (the toy job runs at 0.6,
where an exact verifier passes L; it gains from more varied samples); `--verifier prm` runs the
learned PRM under the same settings; `--aggregations` compares ways of turning step scores into
a path score. `--problems dev` runs the development set instead of the eval set: settings are
chosen there, so that the eval set only reports; `--prm` compares a training run's checkpoints.
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ttc_fast import DVTS, BeamSearch, Engine, SamplingParams, load_model, load_prm  # noqa: E402
from ttc_fast.toy import dev_problems, eval_problems  # noqa: E402
from ttc_fast.toy.evaluate import ITERATIONS, STEP_TOKENS, TEMPERATURE  # noqa: E402

STRATEGIES = {"beam": BeamSearch, "dvts": DVTS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--verifier", choices=("checker", "prm"), default="checker")
    ap.add_argument("--temperatures", type=float, nargs="+", default=[TEMPERATURE])
    ap.add_argument("--strategies", choices=sorted(STRATEGIES), nargs="+", default=["beam"])
    ap.add_argument("--ns", type=int, nargs="+", default=[4, 16, 64])
    ap.add_argument("--aggregations", choices=("last", "min", "prod", "mean"), nargs="+", default=["last"],
                    help="step scores -> path score (the toy job uses last)")
    ap.add_argument("--prm", default="builtin:toy-prm",
                    help="with --verifier prm: the PRM checkpoint (a training run's --checkpoints step-N/)")
    ap.add_argument("--width", type=int, default=4, help="children per kept node (min(width, N); the toy job's 4)")
    ap.add_argument("--lookahead", type=int, default=0, help="greedy rollout steps before a step is scored (the toy job's 0)")
    ap.add_argument("--problems", choices=("eval", "dev"), default="eval",
                    help="the eval set (the toy job's) or the development set (for choosing settings)")
    ap.add_argument("--dev-size", type=int, default=None,
                    help="with --problems dev: this many problems (default 250; the first 250 are always the same)")
    args = ap.parse_args()
    if args.dev_size is not None and args.problems != "dev":
        ap.error("--dev-size sizes the development set: add --problems dev")
    if args.prm != "builtin:toy-prm" and args.verifier != "prm":
        ap.error("--prm names the learned PRM to search with: add --verifier prm")
    if args.problems == "eval":
        problems = eval_problems()
    else:
        problems = dev_problems() if args.dev_size is None else dev_problems(args.dev_size)
    engine = Engine(load_model("builtin:toy-policy-s", device="cpu"))
    if args.verifier == "checker":
        verifier = load_prm("builtin:toy-checker")
    else:
        verifier = load_prm(args.prm, kind="math-shepherd", device="cpu", kv_cache_bytes=1 << 30)
    for temperature in args.temperatures:
        sampling = SamplingParams(temperature=temperature, max_tokens=STEP_TOKENS, seed=0)
        for name in args.strategies:
            for n in args.ns:
                for how in args.aggregations:
                    started = time.perf_counter()
                    strategy = STRATEGIES[name](n=n, width=min(args.width, n), iterations=ITERATIONS, aggregation=how,
                                                lookahead=args.lookahead)
                    results = engine.search(problems, strategy, sampling, prm=verifier)
                    accuracy = sum(bool(r.correct[n]["weighted"]) for r in results) / len(results)
                    seconds = time.perf_counter() - started
                    print(f"{name} + toy-{args.verifier}, temperature {temperature}, N = {n}, width {strategy.width}, "
                          f"lookahead {args.lookahead}, aggregation {how}: "
                          f"accuracy {accuracy:.3f} on {len(problems)} {args.problems} problems ({seconds:.0f} s)",
                          flush=True)


if __name__ == "__main__":
    main()
