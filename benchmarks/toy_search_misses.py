"""Why a PRM-guided search of the toy task misses: each problem it gets wrong is put in one class.

    python benchmarks/toy_search_misses.py                         # beam search, N = 64, development set
    python benchmarks/toy_search_misses.py --strategy dvts --prm CKPT --dev-size 500

Classes (first that applies, walking the search's iterations in order):
  pick     a fully right completion was returned, and the weighted pick chose another answer;
  pruned   a pruning had right candidates and kept none of them (the PRM preferred wrong paths),
           or right paths finished and none was among the n best returned;
  unwritten  an expansion wrote no right step at all; reported with how many of the beams it
           expanded were right: when all were, the policy alone missed (no verifier could help),
           when fewer, the PRM's earlier choices cut the right beams down first.
The exact step checker labels every path (`prefix_labels`). Settings are the toy job's (width
4, T = 0.6, 10 iterations, aggregation "last"); the development set, never the eval set.
"""
import argparse
import collections
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ttc_fast import DVTS, BeamSearch, SamplingParams  # noqa: E402
from ttc_fast.search import SearchObserver, TreeSearch  # noqa: E402
from ttc_fast.toy import dev_problems  # noqa: E402
from ttc_fast.toy.evaluate import ITERATIONS, STEP_TOKENS, TEMPERATURE, policy_s, toy_prm  # noqa: E402
from ttc_fast.toy.task import prefix_labels  # noqa: E402


class Rounds(SearchObserver):
    """Records, per problem and iteration, every candidate path and the beams kept after pruning."""

    def __init__(self):
        self.rounds: dict[str, list[tuple[list, list]]] = collections.defaultdict(list)

    def on_prune(self, state, children, kept):
        if children:
            self.rounds[state.problem.id].append(([p.steps for p in children], [p.steps for p, _ in kept]))


def classify(question: str, result, rounds) -> tuple[str, int, int]:
    """(class, right beams expanded, beams expanded) for a missed problem (the counts only for
    `unwritten`; for the first iteration, the prompt counts as one right beam)."""
    def right(steps):
        return all(prefix_labels(question, [s.strip() for s in steps]))

    if any(right(c.steps) for c in result.completions):
        return "pick", 0, 0
    expanded, expanded_right = 1, 1
    for candidates, kept in rounds:
        if not any(right(steps) for steps in candidates):
            return "unwritten", expanded_right, expanded
        if kept and not any(right(steps) for steps in kept):
            return "pruned", 0, 0
        expanded, expanded_right = len(kept), sum(right(steps) for steps in kept)
    return "pruned", 0, 0  # right paths finished, and the n best returned held none of them


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--strategy", choices=("beam", "dvts"), default="beam")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--prm", default="builtin:toy-prm", help="the PRM checkpoint to search with")
    ap.add_argument("--dev-size", type=int, default=250, help="development problems (the first 250 are always the same)")
    args = ap.parse_args()
    problems = dev_problems(args.dev_size)
    strategy = (BeamSearch if args.strategy == "beam" else DVTS)(n=args.n, width=min(4, args.n), iterations=ITERATIONS)
    rounds = Rounds()
    search = TreeSearch(policy_s("cpu"), toy_prm(args.prm, "cpu"), strategy,
                        SamplingParams(temperature=TEMPERATURE, max_tokens=STEP_TOKENS, seed=0), observer=rounds)
    questions = {p.id: p.question for p in problems}
    classes = collections.Counter()
    results = list(search.run(problems))
    for result in results:
        if result.correct[args.n]["weighted"]:
            continue
        name, expanded_right, expanded = classify(questions[result.problem_id], result, rounds.rounds[result.problem_id])
        if name == "unwritten":
            name = "unwritten, all beams right" if expanded_right == expanded else "unwritten, some beams wrong"
        classes[name] += 1
    share = {pick: sum(bool(r.correct[args.n][pick]) for r in results) / len(results)
             for pick in ("weighted", "naive", "maj")}
    # the toy job's accuracy is the weighted pick's
    print(f"{args.strategy} N = {args.n}, {args.prm}, {len(results)} development problems: "
          f"accuracy {share['weighted']:.3f}")
    for pick, value in share.items():
        print(f"  {pick} pick: {value:.3f}")
    for name in ("pick", "pruned", "unwritten, some beams wrong", "unwritten, all beams right"):
        print(f"  misses, {name}: {classes[name]}")


if __name__ == "__main__":
    main()
