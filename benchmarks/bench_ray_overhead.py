"""What the Ray path of `ttc-fast run --workers K` costs per problem, beside the search itself.

A worker's traffic per problem (`ttc_fast/distributed.py`): it takes the problem from the
driver's work queue, puts a claim and later the finished line on the result queue, which the
driver reads; and whenever its source is empty at an iteration, one poll of the work queue.
This times exactly those queue operations (the same `ray.util.queue.Queue`s, a worker actor
with no model) on lines of the toy's sizes, so that nothing but the traffic is measured.

    python benchmarks/bench_ray_overhead.py [--problems 200] [--completions 16 64]
"""
from __future__ import annotations

import argparse
import json
import time


def fake_line(completions: int) -> dict:
    """A results line about the size of a toy beam-search line with this many completions."""
    step = "He buys 17 more, so 35 + 17 = 52."
    return {"id": "toy-eval-0", "question": "Sam has 3 apples. He finds 16 more. How many apples does he have now?",
            "completions": [{"text": "\n\n".join([step] * 4), "steps": [step] * 4, "step_scores": [0.99] * 4, "score": 0.99,
                             "answer": "52", "finish_reason": "eos", "policy_tokens": 120} for _ in range(completions)],
            "picks": {str(2**k): {"maj": "52", "naive": "52", "weighted": "52"} for k in range(7)}}


def main() -> None:
    import ray
    from ray.util.queue import Empty, Queue

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--problems", type=int, default=200)
    ap.add_argument("--completions", type=int, nargs="+", default=[16, 64])
    args = ap.parse_args()
    started = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    print(f"ray.init: {time.perf_counter() - started:.1f} s")

    @ray.remote(num_cpus=1)
    class Worker:
        def serve(self, work, results, idle, line, polls: int) -> float:
            """Per problem: take it, claim it, poll an empty queue `polls` times (as a worker polls
            its work queue when the driver has nothing queued), send the line."""
            begun = time.perf_counter()
            while True:
                item = work.get(block=True)
                if item is None:
                    return time.perf_counter() - begun
                results.put(("claim", 0, item, None))
                for _ in range(polls):
                    try:
                        idle.get_nowait()
                    except Empty:
                        pass
                results.put(("result", 0, item, line))

    worker = Worker.remote()
    ray.get(worker.__ray_ready__.remote())
    print(f"{'line':>22} {'polls':>6} {'ms per problem':>15}")
    for completions in args.completions:
        line = fake_line(completions)
        for polls in (0, 1):
            work, results, idle = (Queue(actor_options={"num_cpus": 0}) for _ in range(3))
            begun = time.perf_counter()
            work.put_nowait_batch(list(range(args.problems)) + [None])
            done = worker.serve.remote(work, results, idle, line, polls)
            got = 0
            while got < args.problems:
                kind, _, _, _ = results.get(timeout=60)
                got += kind == "result"
            ray.get(done)
            per = (time.perf_counter() - begun) / args.problems * 1e3
            size = len(json.dumps(line)) // 1024
            print(f"{f'{completions} completions, {size} KB':>22} {polls:>6} {per:>15.2f}")
    ray.shutdown()


if __name__ == "__main__":
    main()
