"""Diverse verifier tree search: n / width independent subtrees, each a beam of one."""
from __future__ import annotations

from dataclasses import dataclass

from ..tree import Path
from .base import best_in_order
from .beam_search import BeamSearch


@dataclass(frozen=True)
class DVTS(BeamSearch):
    """Diverse verifier tree search: n/width independent subtrees; each keeps its best candidate
    per step and expands it `width` times. A subtree is done when its best candidate has
    finished (or at the last iteration); it returns its `width` best finished paths."""

    @property
    def keep(self) -> int:
        return 1

    def child_group(self, parent: Path, j: int, of_root: bool) -> int:
        # the prompt's n children form n / width subtrees
        return j // self.width if of_root else parent.group

    def select(self, states, children, ctx):
        """A subtree keeps its best candidate, finished or not: when that one has finished the
        subtree is done, else it alone goes on. Subtrees never stop one another."""
        live = []
        for paths in children:
            best: dict[int, tuple[float, Path]] = {}
            for path in paths:  # the first of equal scores wins, as argmax
                score = path.score(self.aggregation)
                if path.group not in best or score > best[path.group][0]:
                    best[path.group] = (score, path)
            live.append([p for p in paths if not p.done and best[p.group][1] is p])
        return self.keep_top(live, ctx)

    def final_paths(self, state):
        """`width` completions per subtree, subtree by subtree: the picks at n < N (n >= width)
        read the first n / width subtrees, a DVTS of n."""
        groups: dict[int, list[Path]] = {}
        for path in state.completed:
            groups.setdefault(path.group, []).append(path)
        done = [path for g in sorted(groups) for path in best_in_order(groups[g], self.width, self.aggregation)]
        return best_in_order(done, self.n, self.aggregation)
