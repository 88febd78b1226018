"""The search loop: expand (fork + sample), score (the PRM on the new steps), prune.

All problems in flight advance together: one `Engine.expand` call decodes the frontier of every
problem, one `score_steps` call scores every new step in the PRM's own prefix-shared cache (a
step several children of one path wrote alike is scored once, the copies forking it; so is a
best-of-N step after the same steps in another sample of the problem), and one `select` per
strategy prunes every problem it runs. The rules are the strategy's (`ttc_fast.strategies`);
this loop names none of them. How many problems are in flight is bounded by the KV pool: a new
problem starts only while the pool keeps enough free blocks for the problems already running.
An observer (`SearchObserver`) sees every pruning and every result.
"""
from __future__ import annotations

import inspect
import time
from collections import deque
from dataclasses import dataclass, replace

from . import kernels as K
from .data import Problem
from .flops import context_sum
from .grading import extract_answer, grade, picks_at_n
from .prompts import DEFAULT_SYSTEM_PROMPT, PromptFormat  # noqa: F401  (DEFAULT_SYSTEM_PROMPT: public name)
from .sampling import SamplingParams, fresh_seed, sample_seed
from .scores import path_score  # noqa: F401  (public here too)
from .step_scoring import StepScorer, split_steps  # noqa: F401  (split_steps: public here too)
from .strategies.base import SEARCH_SAMPLING, PruneContext, Strategy
from .tree import Path, ProblemState


@dataclass
class Completion:
    text: str
    steps: list[str]
    step_scores: list[float]
    score: float  # aggregated
    answer: str | None
    finish_reason: str
    policy_tokens: int  # tokens of this path


@dataclass
class SearchResult:
    problem_id: str
    question: str
    gold: str
    strategy: str
    completions: list[Completion]
    picks: dict[int, dict[str, str | None]]  # n -> {"maj", "naive", "weighted"} -> answer
    correct: dict[int, dict[str, bool]]
    policy_tokens: int  # every token the policy generated for this problem, pruned paths included
    prm_tokens: int  # every token the PRM processed for this problem
    seconds: float
    error: str | None = None  # the problem failed on its own (no completions): why
    # The FLOPs' ingredients (ttc_fast.flops): tokens the policy processed (the prompt once, then
    # policy_tokens) and the sums of their context lengths, the policy's and the PRM's
    policy_tokens_processed: int = 0
    policy_context_sum: int = 0
    prm_context_sum: int = 0


class SearchObserver:
    """Watches a search; override what you need (every method does nothing here).

    on_iteration(states)               before each iteration: the problems in flight
    on_lookahead(items)                before rollouts rescore these (state, path) pairs (every
                                       verifier call until the next on_prune is a rollout's)
    on_prune(state, children, kept)    after a problem's pruning: its new children (`done` ones
                                       joined its finished paths; `path.score(aggregation)`)
                                       and the kept frontier, [(path, times to expand)]
    on_result(state, result)           a problem's end: its state (finished paths in
                                       `state.completed`) and its SearchResult
    """

    def on_iteration(self, states: list[ProblemState]) -> None:
        pass

    def on_lookahead(self, items: list[tuple[ProblemState, Path]]) -> None:
        pass

    def on_prune(self, state: ProblemState, children: list[Path], kept: list[tuple[Path, int]]) -> None:
        pass

    def on_result(self, state: ProblemState, result: SearchResult) -> None:
        pass


class TreeSearch:
    """Runs a strategy over many problems on one engine and one PRM (None: no scoring)."""

    def __init__(self, engine, prm, strategy: Strategy, sampling: SamplingParams | None = None,
                 system_prompt: str | None = None, max_problems_in_flight: int | None = None,
                 chat_template: str | None = None, chat_template_kwargs: dict | None = None,
                 observer: SearchObserver | None = None):
        """engine: an `Engine` (or anything with its start / fork / expand / release; its
        expand's `on_finish` and its `release_many` are used where it has them);
        system_prompt: None is `DEFAULT_SYSTEM_PROMPT`, "" is no system message; chat_template:
        None is the policy tokenizer's own, "" none (plain prompt), else Jinja source;
        chat_template_kwargs go to `apply_chat_template` (see `ttc_fast.prompts`)."""
        if prm is None and strategy.needs_verifier:
            raise ValueError(f"{strategy.name} needs a PRM (load_prm) or a verifier callable; majority vote runs without one")
        self.engine, self.prm, self.strategy = engine, prm, strategy
        self.sampling = sampling or SEARCH_SAMPLING
        self.prompt = PromptFormat(system_prompt, chat_template, chat_template_kwargs)
        self.max_in_flight = max_problems_in_flight
        self.seed = fresh_seed() if self.sampling.seed is None else self.sampling.seed
        self.observer = observer or SearchObserver()
        # Tell the verifier of finished steps during expansion where both sides take part.
        expand = getattr(engine, "expand", None)
        self._prefetch = getattr(prm, "prefetch", None) if expand and _takes_keyword(expand, "on_finish") else None
        self.scorer = StepScorer(prm)

    # --- driver --------------------------------------------------------------------------------
    def run(self, problems: list[Problem]):
        """Yields a SearchResult per problem as soon as it finishes (not in input order)."""
        for result, _ in self.run_with_problems(problems):
            yield result

    def run_with_problems(self, problems: list[Problem], indices: list[int] | None = None):
        """Like `run`, yielding (SearchResult, the Problem it answers). `indices[i]` is problem
        i's position in its data set (default: i); it keys the problem's random streams, so a
        problem draws the same samples whatever subset of the data set is run. A problem that
        fails on its own input yields a result with `error` set; the others go on."""
        if indices is not None and len(indices) != len(problems):
            raise ValueError(f"{len(problems)} problems but {len(indices)} indices")
        yield from self.run_source(deque(zip(indices if indices is not None else range(len(problems)), problems)))

    def run_source(self, queue):
        """`run_with_problems` over a source of (index, problem) pairs that may grow while the
        search runs: `bool(queue)` says whether one is ready now (it may fetch one), and
        `queue.popleft()` takes it; the search ends when the source is empty and nothing is in
        flight. A deque is one; a distributed worker's pulls from its driver are another."""
        flight: list[ProblemState] = []
        while queue or flight:
            while queue and self._room_for_another(flight):
                index, problem = queue.popleft()
                started = time.perf_counter()
                try:
                    flight.append(self._start(index, problem))
                except ValueError as e:  # this problem's own input: the others go on
                    yield self._failed(problem, e, started), problem
            if not flight:
                continue
            self._iterate(flight)
            for st in [st for st in flight if not st.frontier]:
                flight.remove(st)
                result = self._result(st)
                self.observer.on_result(st, result)
                yield result, st.problem

    def _room_for_another(self, flight: list[ProblemState]) -> bool:
        if not flight:
            return True
        if self.max_in_flight is not None and len(flight) >= self.max_in_flight:
            return False
        if not self.strategy.stepwise:
            return self._room_for_whole_solutions(len(flight) + 1)
        # Keep half of each pool (the policy's and the PRM's) for the problems already running
        # (their beams grow every step), and two blocks per beam of every problem in flight,
        # this one included. Past this, the policy's engine evicts and recomputes branches
        # rather than fail, but thrashing costs time.
        headroom = 2 * self.strategy.n * (len(flight) + 1)
        return all(b.num_available_blocks > max(b.num_blocks // 2, headroom) for b in self._pools())

    def _pools(self) -> list:
        """The block managers admission watches: the policy's, and the PRM's when it has a cache."""
        pools = [self.engine.runner.blocks]
        if getattr(self.prm, "runner", None) is not None:
            pools.append(self.prm.runner.blocks)
        return pools

    def _room_for_whole_solutions(self, problems: int) -> bool:
        # Best-of-N and majority sample all n solutions of every problem in flight in one
        # expansion, then score them all: admit only as many problems as both pools can hold
        # when every solution runs to max_tokens (the PRM re-tokenizes the same text; the margin
        # of two blocks per solution covers its step tags and a different tokenizer).
        tokens = self.sampling.max_tokens
        return all(problems * self.strategy.solutions_at_once * (-(-tokens // b.block_size) + 2) <= b.num_available_blocks
                   for b in self._pools())

    def _start(self, index: int, problem: Problem) -> ProblemState:
        if self.engine.tokenizer is None:
            raise ValueError(f"{self.engine.model.path} has no tokenizer: a search prompts with text and needs one")
        prompt = self.prompt.encode(problem.question, self.engine.tokenizer, self.engine.model.path)
        strategy = self.strategy.for_problem(problem)
        root = Path([], [], branch=self.engine.start(prompt))
        st = ProblemState(index, problem, strategy, root, time.perf_counter())
        # The prompt is charged whole, once: its n children fork it, and a prefix-cache hit from
        # another problem is not subtracted (the count would then depend on the problems beside it).
        st.prompt_tokens = len(root.branch.token_ids)
        st.policy_context += context_sum(0, st.prompt_tokens)
        if self.prm is not None:
            try:
                root.prm = self.scorer.start(st, problem.question)
            except BaseException:
                self._drop(root)
                raise
        st.frontier = strategy.first_frontier(root)
        return st

    def _failed(self, problem: Problem, error: Exception, started: float) -> SearchResult:
        """The result of a problem that failed on its own input (its prompt too long for a model,
        its text rejected by the chat template): no completions, and why."""
        return SearchResult(
            problem_id=problem.id, question=problem.question, gold=problem.answer, strategy=self.strategy.name,
            completions=[], picks={}, correct={}, policy_tokens=0, prm_tokens=0,
            seconds=time.perf_counter() - started, error=f"{type(error).__name__}: {error}",
        )

    # --- one iteration: expand, score, prune ---------------------------------------------------
    def _iterate(self, flight: list[ProblemState]) -> None:
        self.observer.on_iteration(flight)
        children, parents = self._expand(flight)
        self.scorer.score(children, parents)
        for st, path in children:  # scoring may have ended a path (the PRM's context is full)
            path.done = st.strategy.is_done(path, st.iteration)
        live = [(st, path) for st, path in children if not path.done]
        for strategy, items in _by_strategy(live, lambda item: item[0].strategy):
            strategy.rescore(self, items)
        self._prune(flight, children)

    def _expand(self, flight: list[ProblemState]) -> tuple[list[tuple[ProblemState, Path]], list[int]]:
        """Continue every frontier path as often as its problem's strategy asks, all problems in
        one `Engine.expand`. Returns the children (with their problems) and, for each, which
        expanded path it came from. The root (the prompt) is expanded through a fork, so that
        a strategy may expand it again; other parents are consumed."""
        branches, counts, samplings, owners, seeds = [], [], [], [], []
        for st in flight:
            for k, (path, count) in enumerate(st.frontier):
                branches.append(self.engine.fork(path.branch, 1)[0] if path is st.root else path.branch)
                counts.append(count)
                samplings.append(st.strategy.expansion_sampling(self.sampling, st, k))
                owners.append((st, path))
                # Seeds depend only on (problem, iteration, path within the problem): a problem's
                # samples do not change with the other problems in flight (a resumed run repeats itself).
                seeds.append(sample_seed(self.seed, st.index, st.iteration, k))
        report = self._prefetch_steps(owners)
        if report is None:  # no verifier to tell (and an engine object may not take on_finish)
            results = self.engine.expand(branches, counts, samplings, seeds)
        else:
            results = self.engine.expand(branches, counts, samplings, seeds, on_finish=report)

        context = self.engine.model.config.max_context
        children: list[tuple[ProblemState, Path]] = []
        parents: list[int] = []
        consumed = []
        for k, ((st, parent), res) in enumerate(zip(owners, results)):
            of_root = parent is st.root
            prm_children = self.prm.fork(parent.prm, len(res)) if self.prm is not None else [None] * len(res)
            if not of_root:
                parent.branch = None  # consumed by the expansion
                consumed.append(parent)
            for j, ((branch, out), prm_handle) in enumerate(zip(res, prm_children)):
                st.charge_generated(len(branch.token_ids), len(out.token_ids))
                cut = out.finish_reason == "length" and len(branch.token_ids) >= context
                text = out.text if out.text is not None else " ".join(map(str, out.token_ids))
                child = Path(parent.steps + [text], parent.scores, parent.tokens + len(out.token_ids),
                             st.strategy.child_group(parent, j, of_root), st.strategy.child_finish(out.finish_reason, cut),
                             cut, branch=branch, prm=prm_handle)
                children.append((st, child))
                parents.append(k)
        self._drop_many(consumed)
        for st in flight:
            st.frontier = []
            st.iteration += 1
        return children, parents

    def _prefetch_steps(self, owners: list[tuple[ProblemState, Path]]):
        """`Engine.expand`'s on_finish report: the verifier starts on each finished child's new
        step (stepwise strategies score it next) while the other children still decode."""
        prefetch = self._prefetch
        if prefetch is None:
            return None

        def report(finished):
            items = [(text, owners[k][1].prm.num_steps) for k, _, text in finished
                     if text is not None and owners[k][0].strategy.stepwise]
            if items:
                prefetch(items)

        return report

    def rollout_scores(self, items: list[tuple[ProblemState, Path]], steps: int) -> list[float | None]:
        """Roll each path out `steps` greedy steps on forks of its policy and PRM sequences; the
        PRM's score at the end of each rollout (None: none of its steps fit the PRM's context).
        A rollout ends early at EOS or where the PRM's context is full."""
        self.observer.on_lookahead(items)
        ends: list[float | None] = [None] * len(items)
        rollouts = [(i, st, self.engine.fork(path.branch, 1)[0], self.prm.fork(path.prm, 1)[0])
                    for i, (st, path) in enumerate(items)]
        for _ in range(steps):
            if not rollouts:
                break
            greedy = [replace(st.strategy.step_sampling(self.sampling), temperature=0.0) for _, st, _, _ in rollouts]
            results = self.engine.expand([r[2] for r in rollouts], [1] * len(rollouts), greedy)
            scores = self.scorer.score_batch([(st, handle, res[0][1].text) for (_, st, _, handle), res in zip(rollouts, results)])
            still = []
            for (i, st, _, handle), res, score in zip(rollouts, results, scores):
                (branch, out), = res
                st.charge_generated(len(branch.token_ids), len(out.token_ids))
                if score is not None:
                    ends[i] = score
                if out.finish_reason == "stop" and score is not None:
                    still.append((i, st, branch, handle))
                else:
                    self.engine.release(branch)
                    self.prm.free(handle)
            rollouts = still
        for _, _, branch, handle in rollouts:
            self.engine.release(branch)
            self.prm.free(handle)
        return ends

    # --- prune ---------------------------------------------------------------------------------
    def _prune(self, flight: list[ProblemState], children: list[tuple[ProblemState, Path]]) -> None:
        """Finished paths (`done`, set after scoring) join their problem's completions; each
        strategy selects the next frontier of its problems; every other path is freed."""
        new: dict[int, list[Path]] = {id(st): [] for st in flight}
        finished = []
        for st, path in children:
            new[id(st)].append(path)
            if path.done:
                st.completed.append(path)
                finished.append(path)
        self._drop_many(finished)
        ctx = PruneContext(self.seed, self._topk)
        for strategy, states in _by_strategy(flight, lambda st: st.strategy):
            for st, frontier in zip(states, strategy.select(states, [new[id(st)] for st in states], ctx)):
                kept = {id(path) for path, _ in frontier}
                self._drop_many([path for path in new[id(st)] if id(path) not in kept])
                st.frontier = frontier
                self.observer.on_prune(st, new[id(st)], frontier)

    def _topk(self, scores, seg_ptr, k):
        if self.engine.runner.attention.name == "triton":
            dev = self.engine.model.device
            return K.segmented_topk(scores.to(dev), seg_ptr.to(dev), k)
        return K.segmented_topk_ref(scores, seg_ptr, k)

    def _drop(self, path: Path) -> None:
        self._drop_many([path])

    def _drop_many(self, paths: list[Path]) -> None:
        """Free the paths' policy and PRM sequences, each pool in one call."""
        branches = [p.branch for p in paths if p.branch is not None]
        if branches:
            if hasattr(self.engine, "release_many"):
                self.engine.release_many(branches)
            else:  # an engine object with `release` alone
                for branch in branches:
                    self.engine.release(branch)
        handles = [p.prm for p in paths if p.prm is not None]
        if handles and self.prm is not None:
            if hasattr(self.prm, "free_many"):
                self.prm.free_many(handles)
            else:  # a verifier object with `free` alone
                for handle in handles:
                    self.prm.free(handle)
        for p in paths:
            p.branch = p.prm = None

    # --- results -------------------------------------------------------------------------------
    def _result(self, st: ProblemState) -> SearchResult:
        self._drop(st.root)
        strategy = st.strategy
        agg, delimiter = strategy.aggregation, strategy.delimiter
        completions = [
            Completion(
                text=delimiter.join(path.steps), steps=path.steps, step_scores=path.scores, score=path.score(agg),
                answer=extract_answer(delimiter.join(path.steps)), finish_reason=path.finish_reason,
                policy_tokens=path.tokens,
            )
            for path in strategy.final_paths(st) + st.set_aside
        ]
        answers = [c.answer for c in completions]
        scores = [c.score for c in completions]
        picks = picks_at_n(answers, scores, powers_of_two(len(completions))) if completions else {}
        if self.prm is None:  # no verifier, no scores: only the majority pick means anything
            picks = {k: {"maj": p["maj"]} for k, p in picks.items()}
        kind = st.problem.kind
        correct = {n: {k: (a is not None and grade(a, st.problem.answer, kind)) for k, a in p.items()} for n, p in picks.items()}
        return SearchResult(
            problem_id=st.problem.id, question=st.problem.question, gold=st.problem.answer, strategy=strategy.name,
            completions=completions, picks=picks, correct=correct, policy_tokens=st.policy_tokens,
            prm_tokens=int(round(st.prm_tokens)), seconds=time.perf_counter() - st.started,
            policy_tokens_processed=st.prompt_tokens + st.policy_tokens, policy_context_sum=st.policy_context,
            prm_context_sum=int(round(st.prm_context)),
        )


def _takes_keyword(fn, name: str) -> bool:
    params = inspect.signature(fn).parameters
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _by_strategy(items: list, strategy_of) -> list[tuple[Strategy, list]]:
    """(strategy, its items) for each strategy `strategy_of(item)` names, in order of first use."""
    groups: dict[int, tuple[Strategy, list]] = {}
    for item in items:
        strategy = strategy_of(item)
        groups.setdefault(id(strategy), (strategy, []))[1].append(item)
    return list(groups.values())


def powers_of_two(n: int) -> list[int]:
    """1, 2, 4, ... up to n, and n itself: the n at which the picks are read."""
    out, k = [], 1
    while k <= n:
        out.append(k)
        k *= 2
    if out and out[-1] != n:
        out.append(n)
    return out
