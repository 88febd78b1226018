"""Scoring a search's new steps with the verifier: each new step of each child, or every step of
whole solutions, all problems in one batched call per step index; a PRM input that several
children share (the same sequence and the same step) is scored once and forked to the others.
A problem is charged the PRM tokens its rows ran and the sum of their context lengths (for its
FLOPs, `ttc_fast.flops`)."""
from __future__ import annotations

from .tree import Path, ProblemState


def split_steps(text: str, delimiter: str) -> list[str]:
    return [s for s in text.split(delimiter) if s.strip()] or [text]


class StepScorer:
    def __init__(self, prm):
        self.prm = prm  # None: no verifier (majority vote); every step scores 0.0

    def start(self, st: ProblemState, question: str):
        """The verifier's handle for a problem's question (encoded once), charged to the problem."""
        before = self._processed()
        handle = self.prm.start(question)
        tokens, context = self._processed()
        st.prm_tokens += tokens - before[0]
        st.prm_context += context - before[1]
        return handle

    def _processed(self) -> tuple[float, float]:
        """The verifier's running counts: tokens, and their context lengths summed (0 for a
        verifier object that does not count them)."""
        return self.prm.tokens_processed, getattr(self.prm, "context_processed", 0)

    def score(self, children: list[tuple[ProblemState, Path]], parents: list[int]) -> None:
        if self.prm is None or not children:
            for _, path in children:
                path.scores = path.scores + [0.0]
            return
        stepwise = [(c, p) for c, p in zip(children, parents) if c[0].strategy.stepwise]
        whole = [c for c in children if not c[0].strategy.stepwise]
        if stepwise:
            self.score_new_steps([c for c, _ in stepwise], [p for _, p in stepwise])
        if whole:
            self.score_solutions(whole)

    def score_solutions(self, children: list[tuple[ProblemState, Path]]) -> None:
        """Whole solutions: their steps are scored one step index at a time, each index in one
        batch over every solution of every problem. Solutions of one problem that agree up to a
        step are one PRM input there (`_score_once`). `prefix[i]` names solution i's steps so
        far: its problem before the first step, then the child scored for them. A solution cut
        at the policy's context keeps its cut last step as text, unscored; one whose next step
        would not fit the PRM's context stops being scored there ("length")."""
        steps = [split_steps(path.steps[-1], st.strategy.delimiter) for st, path in children]
        scorable = [len(s) - path.cut for s, (_, path) in zip(steps, children)]
        for _, path in children:
            path.steps, path.scores = [], []
        prefix: list[int] = [id(st) for st, _ in children]
        for k in range(max(scorable)):
            live = [i for i in range(len(steps)) if k < scorable[i]]
            keys = [(prefix[i], steps[i][k]) for i in live]
            scores, scored_for = self.score_once([children[i] for i in live], keys, [steps[i][k] for i in live])
            for i, score, j in zip(live, scores, scored_for):
                if score is None:
                    scorable[i] = k
                    children[i][1].finish_reason = "length"
                    continue
                children[i][1].steps.append(steps[i][k])
                children[i][1].scores.append(score)
                prefix[i] = live[j]
        for (_, path), texts in zip(children, steps):
            path.steps += texts[len(path.steps):]

    def score_new_steps(self, children: list[tuple[ProblemState, Path]], parents: list[int]) -> None:
        """Score each child's new step. Children of one path that wrote the same step text are
        the same PRM input (`_score_once`): small policies at low temperature repeat their
        likeliest step in many samples. A step cut at the policy's context is not scored; one that
        does not fit the PRM's context ends its path ("length"): both keep their last complete
        step's score."""
        todo = [k for k, (_, path) in enumerate(children) if not path.cut]
        new_steps = [children[k][1].steps[-1] for k in todo]
        scores, _ = self.score_once([children[k] for k in todo], [(parents[k], step) for k, step in zip(todo, new_steps)],
                                     new_steps)
        for k, score in zip(todo, scores):
            path = children[k][1]
            if score is None:
                path.finish_reason = "length"
            else:
                path.scores = path.scores + [score]

    def score_once(self, children: list[tuple[ProblemState, Path]], keys: list,
                    steps: list[str]) -> tuple[list[float | None], list[int]]:
        """Score `steps[i]` on `children[i]`'s PRM sequence, once per distinct key: a key names a
        PRM input (the sequence's content and the step), and each copy frees its sequence, takes
        a fork of the scored one (extended by the step) and its score. Returns the scores and,
        per child, the position of the child that was scored for it (a score is None where the
        PRM's context cannot hold the step)."""
        if not children:
            return [], []
        first: dict[object, int] = {}
        for i, key in enumerate(keys):
            first.setdefault(key, i)
        scored = [first[key] for key in keys]
        unique = [i for i, j in enumerate(scored) if i == j]
        scores = dict(zip(unique, self.score_batch([(children[i][0], children[i][1].prm, steps[i]) for i in unique])))
        for i, j in enumerate(scored):
            if i != j:
                path = children[i][1]
                self.prm.free(path.prm)
                path.prm = self.prm.fork(children[j][1].prm, 1)[0]
        return [scores[j] for j in scored], scored

    def score_batch(self, items: list[tuple[ProblemState, object, str]]) -> list[float | None]:
        """One batched PRM call; each problem is charged the tokens its rows ran and the sum of
        their context lengths (a verifier object that does not report them per row: the call's
        split evenly over its items; one without `context_processed`: no context)."""
        before = self._processed()
        scores = self.prm.score_steps([handle for _, handle, _ in items], [step for _, _, step in items])
        after = self._processed()
        tokens = _per_row(getattr(self.prm, "last_row_tokens", None), after[0] - before[0], len(items))
        contexts = _per_row(getattr(self.prm, "last_row_context", None), after[1] - before[1], len(items))
        for (st, _, _), t, c in zip(items, tokens, contexts):
            st.prm_tokens += t
            st.prm_context += c
        return [None if s is None else float(s) for s in scores]


def _per_row(per_row: list | None, total: float, rows: int) -> list:
    """A verifier's per-row figures, or its call's total split evenly when it has none."""
    if per_row is None or len(per_row) != rows:
        return [total / max(1, rows)] * rows
    return per_row
