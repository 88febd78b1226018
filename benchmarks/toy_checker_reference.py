"""The toy task's reference row: beam search of policy S guided by the exact step checker
(`builtin:toy-checker`) instead of the learned PRM, with the toy job's settings.

    python benchmarks/toy_checker_reference.py      # about 45 s on 2 CPU cores

It separates the two things the toy table measures: whether search over S's samples can reach
policy L at all (it can, with an exact verifier), and how much of that the learned PRM delivers.
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ttc_fast import BeamSearch, Engine, SamplingParams, load_model, load_prm  # noqa: E402
from ttc_fast.toy import eval_problems  # noqa: E402
from ttc_fast.toy.evaluate import ITERATIONS, STEP_TOKENS, TEMPERATURE  # noqa: E402


def main() -> None:
    problems = eval_problems()
    engine = Engine(load_model("builtin:toy-policy-s", device="cpu"))
    checker = load_prm("builtin:toy-checker")
    sampling = SamplingParams(temperature=TEMPERATURE, max_tokens=STEP_TOKENS, seed=0)
    for n in (4, 16, 64):
        started = time.perf_counter()
        results = engine.search(problems, BeamSearch(n=n, width=4, iterations=ITERATIONS), sampling, prm=checker)
        accuracy = sum(bool(r.correct[n]["weighted"]) for r in results) / len(results)
        print(f"beam + toy-checker, N = {n}: accuracy {accuracy:.3f} on {len(problems)} problems "
              f"({time.perf_counter() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
