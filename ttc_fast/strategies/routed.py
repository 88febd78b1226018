"""Routing by difficulty (compute-optimal test-time compute, Snell et al. 2024): a small probe
estimates how hard a problem is, and a fitted map picks the search that runs next."""
from __future__ import annotations

import bisect
import functools
import json
from dataclasses import dataclass
from pathlib import Path as FilePath

from ..tree import Path
from .base import Strategy
from .beam_search import BeamSearch
from .best_of_n import BestOfN
from .dvts import DVTS
from .early_reject import EarlyReject

# choice name -> the strategy it runs after the probe ("stop": none, the probes are the answer)
CHOICES = {"bon": BestOfN, "beam": BeamSearch, "dvts": DVTS, "early-reject": EarlyReject}
TOY_ROUTING = FilePath(__file__).resolve().parents[1] / "toy" / "routing.json"


def parse_choice(choice: str) -> tuple[str, int]:
    """"stop" -> ("stop", 0); "beam:16" -> ("beam", 16). ValueError on anything else."""
    if choice == "stop":
        return "stop", 0
    name, _, count = choice.partition(":")
    if name not in CHOICES or not count.isdigit() or int(count) < 1:
        raise ValueError(f"Routed: a choice is 'stop' or NAME:N with NAME one of {', '.join(CHOICES)} and N >= 1, "
                         f"got {choice!r}")
    return name, int(count)


@dataclass(frozen=True)
class Routed(Strategy):
    """Per problem, a probe of n whole samples (`probe_n`, default 4) is scored by the PRM; its
    difficulty score is the mean of the probes' aggregated scores (high: easy). That is Snell et
    al.'s model-predicted difficulty (the verifier's mean final score over samples), on the few
    samples the probe pays for anyway; answer agreement was the other candidate, but with 4
    probes it takes only a handful of values, too coarse to bin. The score falls in bin
    b = #(thresholds <= score) (bin 0: the hardest), and choices[b] runs next:

        "stop"             no more search: the answer is the weighted pick of the probes
        "bon:N"            N more whole samples (best-of-N)
        "beam:N"           beam search of N beams, `width` children each, `iterations` steps
        "dvts:N"           DVTS of N, in N / width subtrees
        "early-reject:N"   N samples with early rejection (its defaults)

    A chosen search starts from the prompt with the iterations after the probe's, so its seeds
    differ from the probe's; every token it and the probe generate counts towards the problem.
    The probes join the final candidates, after the chosen search's completions: they are
    paid for and scored by the same PRM, and with "stop" they are the only ones. No choice may
    run more than `budget` paths (N <= budget; the probe comes on top). A routed problem's
    SearchResult names the strategy that finished it (its results line names Routed). The
    search admits problems by the probe's needs; a chosen search that outgrows the KV pool
    makes the engine evict and recompute, slower but not wrong.

    The map is fitted on development problems (`benchmarks/fit_routing.py`; `Routed.toy()` loads
    the toy task's). Defaults: n (the probe) 4, budget 64, width 4, iterations 40 (the fitted
    toy map sets its own width and iterations); thresholds and choices have none: give a map."""

    n: int = 4
    thresholds: tuple[float, ...] = ()
    choices: tuple[str, ...] = ()
    budget: int = 64
    width: int = 4
    iterations: int = 40

    def __post_init__(self):
        super().__post_init__()
        if not self.choices:
            raise ValueError(f"{self.name}: choices is empty: give a routing map (Routed.from_file, Routed.toy())")
        if len(self.choices) != len(self.thresholds) + 1:
            raise ValueError(f"{self.name}: {len(self.thresholds)} thresholds make {len(self.thresholds) + 1} bins, "
                             f"but there are {len(self.choices)} choices")
        if list(self.thresholds) != sorted(self.thresholds):
            raise ValueError(f"{self.name}: thresholds must be ascending, got {self.thresholds}")
        self._require_at_least_one("budget")
        if self.width < 1 or self.iterations < 1:
            raise ValueError(f"{self.name}: width and iterations must be >= 1, got {self.width} and {self.iterations}")
        for choice in self.choices:
            _, count = parse_choice(choice)
            if count > self.budget:
                raise ValueError(f"{self.name}: choice {choice!r} runs {count} paths, over the budget ({self.budget}): "
                                 f"each choice's N must be in [1, {self.budget}]")
            try:
                self.handoff(choice)
            except ValueError as e:
                raise ValueError(f"{self.name}: choice {choice!r}: {e}") from None

    @property
    def probe_n(self) -> int:
        return self.n

    @classmethod
    def from_file(cls, path, **overrides) -> "Routed":
        """The strategy a routing JSON (as `benchmarks/fit_routing.py` writes) describes;
        `overrides` replace its settings (n, width, iterations, aggregation, budget...)."""
        return cls(**{**routing_settings(path), **overrides})

    @classmethod
    def toy(cls, **overrides) -> "Routed":
        """The map fitted on the toy task's development problems (shipped in the package)."""
        return cls.from_file(TOY_ROUTING, **overrides)

    # --- the routing rule ------------------------------------------------------------------------
    def difficulty(self, probes: list[Path]) -> float:
        """The probes' mean aggregated PRM score: high is easy."""
        return sum(p.score(self.aggregation) for p in probes) / len(probes)

    def bin_of(self, difficulty: float) -> int:
        return bisect.bisect_right(self.thresholds, difficulty)

    def choice_for(self, probes: list[Path]) -> str:
        return self.choices[self.bin_of(self.difficulty(probes))]

    def handoff(self, choice: str) -> Strategy | None:
        """The strategy a choice runs after the probe (None for "stop"), one instance per choice
        so that the problems routed alike are pruned together."""
        return _handoff(self, choice)

    def select(self, states, children, ctx):
        """After the probe (every probe finished: its one expansion is the last): a problem routed
        to "stop" is over; any other is handed to its choice's strategy, its probes set aside,
        and its prompt expanded again."""
        frontiers = []
        for st in states:
            sub = self.handoff(self.choice_for(st.completed))
            if sub is None:
                frontiers.append([])
                continue
            st.set_aside, st.completed = st.completed, []
            st.strategy = sub
            frontiers.append([(st.root, sub.n)])
        return frontiers


def routing_settings(path) -> dict:
    """Routed's settings from a routing JSON (its other keys record how the map was fitted)."""
    data = json.loads(FilePath(path).read_text(encoding="utf-8"))
    return {"n": int(data["probe_n"]), "thresholds": tuple(float(t) for t in data["thresholds"]),
            "choices": tuple(str(c) for c in data["choices"]), "budget": int(data["budget"]), "width": int(data["width"]),
            "iterations": int(data["iterations"]), "aggregation": str(data["aggregation"])}


@functools.lru_cache(maxsize=64)
def _handoff(routed: Routed, choice: str) -> Strategy | None:
    name, count = parse_choice(choice)
    if name == "stop":
        return None
    cls = CHOICES[name]
    common = {"n": count, "aggregation": routed.aggregation, "delimiter": routed.delimiter}
    if cls is BestOfN:
        return cls(**common)
    # stepwise strategies count iterations from the problem's first expansion, the probe's
    # (iteration 0): one more, so that the chosen search still runs `iterations` expansions
    if cls is EarlyReject:  # (its checkpoints count a sample's steps, not iterations)
        return cls(**common, iterations=routed.iterations + 1)
    return cls(**common, width=min(routed.width, count), iterations=routed.iterations + 1)
