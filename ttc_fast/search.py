"""The search loop: expand (fork + sample one step), score (PRM on the new step), prune.

All problems in flight advance together: one `Engine.expand` call decodes the live beams of every
problem, one `score_steps` call scores every new step in the PRM's own prefix-shared cache (a
step several children of one branch wrote alike is scored once, the copies forking it; so is a
best-of-N step after the same steps in another sample of the problem), and one segmented
top-k keeps the best candidates of every problem (beam search) or subtree (DVTS). How many
problems are in flight is bounded by the KV pool: a new problem starts only while the pool
keeps enough free blocks for the problems already running.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field, replace

import torch

from . import kernels as K
from .data import Problem
from .engine import Branch, Engine
from .grading import extract_answer, grade, picks_at_n
from .prm import aggregate
from .prompts import DEFAULT_SYSTEM_PROMPT, PromptFormat  # noqa: F401  (DEFAULT_SYSTEM_PROMPT: public name)
from .sampling import SamplingParams, fresh_seed, sample_seed
from .strategies import DVTS, SEARCH_SAMPLING, BeamSearch, MajorityVote, ParticleFiltering, Strategy


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


@dataclass
class _Node:
    branch: Branch | None
    prm: object | None
    steps: list[str]
    scores: list[float]
    tokens: int
    group: int  # pruning group inside the problem (DVTS subtree; 0 for beam search)
    finish_reason: str = "stop"
    cut: bool = False  # its last step was cut at the policy's context: kept as text, not scored


@dataclass
class _Problem:
    index: int
    problem: Problem
    root: Branch | None  # consumed by the first expansion
    prm_root: object | None
    started: float
    frontier: list[tuple[_Node, int]] = field(default_factory=list)  # (node, times to expand it)
    completed: list[_Node] = field(default_factory=list)
    iteration: int = 0
    policy_tokens: int = 0
    prm_tokens: int = 0


def split_steps(text: str, delimiter: str) -> list[str]:
    return [s for s in text.split(delimiter) if s.strip()] or [text]


class TreeSearch:
    """Runs one strategy over many problems on one engine and one PRM (None: no scoring)."""

    def __init__(self, engine: Engine, prm, strategy: Strategy, sampling: SamplingParams | None = None,
                 system_prompt: str | None = None, max_problems_in_flight: int | None = None,
                 step_lengths=None, chat_template: str | None = None, chat_template_kwargs: dict | None = None):
        """system_prompt: None is `DEFAULT_SYSTEM_PROMPT`, "" is no system message; chat_template:
        None is the policy tokenizer's own, "" none (plain prompt), else Jinja source;
        chat_template_kwargs go to `apply_chat_template` (see `ttc_fast.prompts`).
        step_lengths: for benchmarks with random-weight models, which never write a delimiter:
        a callable (problem index, iteration, k) -> int, k numbering the branches the problem
        expands in that iteration (all children of one branch share the length); a step then
        ends after that many tokens (EOS ignored) instead of at the delimiter."""
        if prm is None and not isinstance(strategy, MajorityVote):
            raise ValueError(f"{strategy.name} needs a PRM (load_prm) or a verifier callable; MajorityVote runs without one")
        self.engine, self.prm, self.strategy = engine, prm, strategy
        self.sampling = sampling or SEARCH_SAMPLING
        self.prompt = PromptFormat(system_prompt, chat_template, chat_template_kwargs)
        self.max_in_flight = max_problems_in_flight
        self.seed = fresh_seed() if self.sampling.seed is None else self.sampling.seed
        self.step_sampling = replace(self.sampling, stop=(strategy.delimiter,), n=1)
        self.final_sampling = replace(self.sampling, stop=(), n=1)
        self.step_lengths = step_lengths

    # --- driver --------------------------------------------------------------------------------
    def run(self, problems: list[Problem]):
        """Yields a SearchResult per problem as soon as it finishes (not in input order)."""
        for result, _ in self.run_with_problems(problems):
            yield result

    def run_with_problems(self, problems: list[Problem], indices: list[int] | None = None):
        """Like `run`, yielding (SearchResult, the Problem it answers). `indices[i]` is problem
        i's position in its data set (default: i); it keys the problem's random streams, so a
        problem draws the same samples whatever subset of the data set is run."""
        if indices is not None and len(indices) != len(problems):
            raise ValueError(f"{len(problems)} problems but {len(indices)} indices")
        queue = deque(zip(indices if indices is not None else range(len(problems)), problems))
        flight: list[_Problem] = []
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
                yield self._result(st), st.problem

    def _room_for_another(self, flight: list[_Problem]) -> bool:
        if not flight:
            return True
        if self.max_in_flight is not None and len(flight) >= self.max_in_flight:
            return False
        if not self._stepwise():
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
        tokens = self.final_sampling.max_tokens
        return all(problems * self.strategy.n * (-(-tokens // b.block_size) + 2) <= b.num_available_blocks
                   for b in self._pools())

    def _start(self, index: int, problem: Problem) -> _Problem:
        if self.engine.tokenizer is None:
            raise ValueError(f"{self.engine.model.path} has no tokenizer: a search prompts with text and needs one")
        prompt = self.prompt.encode(problem.question, self.engine.tokenizer, self.engine.model.path)
        root = self.engine.start(prompt)
        st = _Problem(index, problem, root, None, time.perf_counter())
        if self.prm is not None:
            before = self.prm.tokens_processed
            try:
                st.prm_root = self.prm.start(problem.question)
            except BaseException:
                self.engine.release(root)
                raise
            st.prm_tokens += self.prm.tokens_processed - before  # the question, encoded once
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
    def _iterate(self, flight: list[_Problem]) -> None:
        branches, counts, samplings, owners = [], [], [], []
        for st in flight:
            if st.iteration == 0:
                # The first expansion samples n children of the prompt (shared, prefilled once);
                # it consumes the root branch.
                items = [(None, self.strategy.n)]
                branches.append(st.root)
                st.root = None
            else:
                items = st.frontier
                branches += [node.branch for node, _ in items]
            counts += [count for _, count in items]
            owners += [(st, node) for node, _ in items]
            final = self._is_final_iteration(st)
            if self.step_lengths is None:
                samplings += [self.final_sampling if final else self.step_sampling] * len(items)
            else:
                samplings += [replace(self.final_sampling, max_tokens=self.step_lengths(st.index, st.iteration, k), ignore_eos=True)
                              for k in range(len(items))]
        # Seeds depend only on (problem, iteration, branch within the problem): a problem's samples
        # do not change with the other problems in flight (so a resumed run repeats itself).
        seeds, within = [], {}
        for st, _ in owners:
            k = within.get(id(st), 0)
            within[id(st)] = k + 1
            seeds.append(sample_seed(self.seed, st.index, st.iteration, k))
        results = self.engine.expand(branches, counts, samplings, seeds)

        children: list[tuple[_Problem, _Node]] = []
        parents: list[int] = []  # which expanded branch each child came from
        for k, ((st, parent), res) in enumerate(zip(owners, results)):
            prm_parent = st.prm_root if parent is None else parent.prm
            prm_children = self.prm.fork(prm_parent, len(res)) if self.prm is not None else [None] * len(res)
            if parent is not None and self.prm is not None:
                self.prm.free(parent.prm)
            for j, ((branch, out), prm_handle) in enumerate(zip(res, prm_children)):
                st.policy_tokens += len(out.token_ids)
                group = self._group_of_first_child(j) if parent is None else parent.group
                base = parent or _Node(None, None, [], [], 0, 0)
                finish = out.finish_reason
                cut = finish == "length" and len(branch.token_ids) >= self.engine.model.config.max_context
                if self.step_lengths is not None and finish == "length" and not cut:
                    finish = "stop"  # an emulated step end
                text = out.text if out.text is not None else " ".join(map(str, out.token_ids))
                node = _Node(branch, prm_handle, base.steps + [text], base.scores, base.tokens + len(out.token_ids), group,
                             finish, cut)
                children.append((st, node))
                parents.append(k)
        for st in flight:
            st.frontier = []
            st.iteration += 1
        self._score(children, parents)
        if getattr(self.strategy, "lookahead", 0):
            self._lookahead([(st, node) for st, node in children if not self._is_done(st, node)])
        self._prune(flight, children)

    def _group_of_first_child(self, j: int) -> int:
        # DVTS: the n first children form n/width subtrees; beam search prunes the problem as one group.
        return j // self.strategy.width if isinstance(self.strategy, DVTS) else 0

    def _stepwise(self) -> bool:
        return isinstance(self.strategy, (BeamSearch, ParticleFiltering))

    def _is_final_iteration(self, st: _Problem) -> bool:
        """Whether the expansion about to run is the last one (it then runs to EOS)."""
        return not self._stepwise() or st.iteration >= self.strategy.iterations - 1

    def _is_done(self, st: _Problem, node: _Node) -> bool:
        # Called after st.iteration advanced: a path ends at EOS / max tokens, or with the last expansion.
        return node.finish_reason != "stop" or not self._stepwise() or st.iteration >= self.strategy.iterations

    # --- score ---------------------------------------------------------------------------------
    def _score(self, children: list[tuple[_Problem, _Node]], parents: list[int]) -> None:
        if self.prm is None or not children:
            for _, node in children:
                node.scores = node.scores + [0.0]
            return
        if self._stepwise():
            self._score_new_steps(children, parents)
            return
        # Best-of-N: whole solutions; their steps are scored one step index at a time, each index
        # in one batch over every solution of every problem. Solutions of one problem that agree
        # up to a step are one PRM input there (`_score_once`). `prefix[i]` names solution i's
        # steps so far: its problem before the first step, then the child scored for them (each
        # index's keys are all of one kind, since a solution live at k was live at k - 1).
        # A solution cut at the policy's context keeps its cut last step as text, unscored; one
        # whose next step would not fit the PRM's context stops being scored there.
        steps = [split_steps(node.steps[-1], self.strategy.delimiter) for _, node in children]
        scorable = [len(s) - node.cut for s, (_, node) in zip(steps, children)]
        for _, node in children:
            node.steps, node.scores = [], []
        prefix: list[int] = [id(st) for st, _ in children]
        for k in range(max(scorable)):
            live = [i for i in range(len(steps)) if k < scorable[i]]
            keys = [(prefix[i], steps[i][k]) for i in live]
            scores, scored_for = self._score_once([children[i] for i in live], keys, [steps[i][k] for i in live])
            for i, score, j in zip(live, scores, scored_for):
                if score is None:
                    scorable[i] = k
                    children[i][1].finish_reason = "length"
                    continue
                children[i][1].steps.append(steps[i][k])
                children[i][1].scores.append(score)
                prefix[i] = live[j]
        for (_, node), texts in zip(children, steps):
            node.steps += texts[len(node.steps):]

    def _score_new_steps(self, children: list[tuple[_Problem, _Node]], parents: list[int]) -> None:
        """Score each child's new step. Children of one branch that wrote the same step text are
        the same PRM input (`_score_once`): small policies at low temperature repeat their
        likeliest step in many samples. A step cut at the policy's context is not scored; one that
        does not fit the PRM's context ends its path ("length"): both keep their last complete
        step's score."""
        todo = [k for k, (_, node) in enumerate(children) if not node.cut]
        new_steps = [children[k][1].steps[-1] for k in todo]
        scores, _ = self._score_once([children[k] for k in todo], [(parents[k], step) for k, step in zip(todo, new_steps)],
                                     new_steps)
        for k, score in zip(todo, scores):
            node = children[k][1]
            if score is None:
                node.finish_reason = "length"
            else:
                node.scores = node.scores + [score]

    def _score_once(self, children: list[tuple[_Problem, _Node]], keys: list,
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
        scores = dict(zip(unique, self._score_batch([(children[i][0], children[i][1].prm, steps[i]) for i in unique])))
        for i, j in enumerate(scored):
            if i != j:
                node = children[i][1]
                self.prm.free(node.prm)
                node.prm = self.prm.fork(children[j][1].prm, 1)[0]
        return [scores[j] for j in scored], scored

    def _score_batch(self, items: list[tuple[_Problem, object, str]]) -> list[float | None]:
        """One batched PRM call; each problem is charged the tokens its rows ran (a verifier
        object that does not report them per row: the call's tokens split evenly over its items)."""
        before = self.prm.tokens_processed
        scores = self.prm.score_steps([handle for _, handle, _ in items], [step for _, _, step in items])
        per_row = getattr(self.prm, "last_row_tokens", None)
        if per_row is None or len(per_row) != len(items):
            per_row = [(self.prm.tokens_processed - before) / max(1, len(items))] * len(items)
        for (st, _, _), tokens in zip(items, per_row):
            st.prm_tokens += tokens
        return [None if s is None else float(s) for s in scores]

    def _lookahead(self, children: list[tuple[_Problem, _Node]]) -> None:
        """Roll each live candidate out `lookahead` greedy steps on forks of its policy and PRM
        sequences; its step score becomes the PRM score at the end of the rollout."""
        greedy = replace(self.step_sampling, temperature=0.0)
        rollouts = [(st, node, self.engine.fork(node.branch, 1)[0], self.prm.fork(node.prm, 1)[0]) for st, node in children]
        for _ in range(self.strategy.lookahead):
            if not rollouts:
                break
            results = self.engine.expand([r[2] for r in rollouts], [1] * len(rollouts), greedy)
            scores = self._score_batch([(st, prm_handle, res[0][1].text) for (st, _, _, prm_handle), res in zip(rollouts, results)])
            still = []
            for (st, node, _, prm_handle), res, score in zip(rollouts, results, scores):
                (branch, out), = res
                st.policy_tokens += len(out.token_ids)
                if score is not None:  # None: the PRM's context is full; the rollout ends here
                    node.scores = node.scores[:-1] + [score]
                if out.finish_reason == "stop" and score is not None:
                    still.append((st, node, branch, prm_handle))
                else:
                    self.engine.release(branch)
                    self.prm.free(prm_handle)
            rollouts = still
        for _, _, branch, prm_handle in rollouts:
            self.engine.release(branch)
            self.prm.free(prm_handle)

    # --- prune ---------------------------------------------------------------------------------
    def _prune(self, flight: list[_Problem], children: list[tuple[_Problem, _Node]]) -> None:
        """Finished paths leave the frontier; the rest compete in their group."""
        live: dict[int, list[_Node]] = {id(st): [] for st in flight}
        for st, node in children:
            if self._is_done(st, node):
                st.completed.append(node)
                self._drop(node)
            else:
                live[id(st)].append(node)
        if isinstance(self.strategy, DVTS):
            self._end_finished_subtrees(children, live)
        else:
            for st in flight:
                if len(st.completed) >= self.strategy.n:  # enough finished paths: stop this problem
                    for node in live[id(st)]:
                        self._drop(node)
                    live[id(st)] = []
        if isinstance(self.strategy, ParticleFiltering):
            for st in flight:
                st.frontier = self._resample(st, live[id(st)])
            return
        self._keep_top(flight, live)

    def _end_finished_subtrees(self, children: list[tuple[_Problem, _Node]], live: dict[int, list[_Node]]) -> None:
        """DVTS: a subtree keeps its best candidate, finished or not: when that one has finished
        the subtree is done, else it alone stays live (the top-1 that follows keeps it). The
        other candidates go. Subtrees never stop one another."""
        agg = self.strategy.aggregation
        best: dict[tuple[int, int], tuple[float, _Node]] = {}
        for st, node in children:  # the first of equal scores wins, as argmax
            score = path_score(node.scores, agg)
            key = (id(st), node.group)
            if key not in best or score > best[key][0]:
                best[key] = (score, node)
        for st_id, nodes in live.items():
            for node in nodes:
                if best[(st_id, node.group)][1] is not node:
                    self._drop(node)
            live[st_id] = [node for node in nodes if best[(st_id, node.group)][1] is node]

    def _keep_top(self, flight: list[_Problem], live: dict[int, list[_Node]]) -> None:
        """Beam search / DVTS: one segmented top-k over the groups of every problem in flight."""
        candidates, seg_ptr, owners = [], [0], []
        for st in flight:
            groups: dict[int, list[_Node]] = {}
            seen: set[tuple[int, tuple[str, ...]]] = set()
            for node in live[id(st)]:
                if getattr(self.strategy, "filter_duplicates", False):
                    text = (node.group, tuple(node.steps))
                    if text in seen:
                        self._drop(node)
                        continue
                    seen.add(text)
                groups.setdefault(node.group, []).append(node)
            for g in sorted(groups):
                candidates += groups[g]
                seg_ptr.append(len(candidates))
                owners.append(st)
        if not candidates:
            return
        scores = torch.tensor([path_score(n.scores, self.strategy.aggregation) for n in candidates], dtype=torch.float32)
        seg = torch.tensor(seg_ptr, dtype=torch.int32)
        if self.engine.runner.attention.name == "triton":
            dev = self.engine.model.device
            _, kept, _ = K.segmented_topk(scores.to(dev), seg.to(dev), self.strategy.keep)
        else:
            _, kept, _ = K.segmented_topk_ref(scores, seg, self.strategy.keep)
        kept_ids = {int(i) for i in kept.flatten().tolist() if i >= 0}
        for i, node in enumerate(candidates):
            if i not in kept_ids:
                self._drop(node)
        for (start, end), st in zip(zip(seg_ptr[:-1], seg_ptr[1:]), owners):
            st.frontier += [(candidates[i], self.strategy.width) for i in range(start, end) if i in kept_ids]

    def _resample(self, st: _Problem, nodes: list[_Node]) -> list[tuple[_Node, int]]:
        """Particle filtering: draw len(nodes) particles with replacement, p ~ softmax(score / T);
        a particle drawn k times is expanded k times (its copies share its blocks)."""
        if not nodes:
            return []
        scores = torch.tensor([path_score(n.scores, self.strategy.aggregation) for n in nodes], dtype=torch.float64)
        probs = torch.softmax(scores / self.strategy.temperature, dim=0)
        g = torch.Generator().manual_seed(sample_seed(self.seed, st.index, st.iteration, 1 << 20))
        draws = torch.multinomial(probs, len(nodes), replacement=True, generator=g)
        counts = torch.bincount(draws, minlength=len(nodes)).tolist()
        frontier = []
        for node, count in zip(nodes, counts):
            if count:
                frontier.append((node, count))
            else:
                self._drop(node)
        return frontier

    def _drop(self, node: _Node) -> None:
        if node.branch is not None:
            self.engine.release(node.branch)
            node.branch = None
        if node.prm is not None and self.prm is not None:
            self.prm.free(node.prm)
            node.prm = None

    # --- results -------------------------------------------------------------------------------
    def _result(self, st: _Problem) -> SearchResult:
        if st.prm_root is not None:
            self.prm.free(st.prm_root)
            st.prm_root = None
        agg = self.strategy.aggregation
        if isinstance(self.strategy, DVTS):
            # width completions per subtree, subtree by subtree: the picks at n < N (n >= width)
            # read the first n / width subtrees, a DVTS of n
            groups: dict[int, list[_Node]] = {}
            for node in st.completed:
                groups.setdefault(node.group, []).append(node)
            done = [node for g in sorted(groups) for node in _best_in_order(groups[g], self.strategy.width, agg)]
            done = _best_in_order(done, self.strategy.n, agg)
        else:
            done = _best_in_order(st.completed, self.strategy.n, agg)
        completions = [
            Completion(
                text=self.strategy.delimiter.join(node.steps), steps=node.steps, step_scores=node.scores,
                score=path_score(node.scores, agg), answer=extract_answer(self.strategy.delimiter.join(node.steps)),
                finish_reason=node.finish_reason, policy_tokens=node.tokens,
            )
            for node in done
        ]
        answers = [c.answer for c in completions]
        scores = [c.score for c in completions]
        ns = [n for n in powers_of_two(len(completions))]
        picks = picks_at_n(answers, scores, ns) if completions else {}
        if self.prm is None:  # no verifier, no scores: only the majority pick means anything
            picks = {k: {"maj": p["maj"]} for k, p in picks.items()}
        kind = st.problem.kind
        correct = {n: {k: (a is not None and grade(a, st.problem.answer, kind)) for k, a in p.items()} for n, p in picks.items()}
        return SearchResult(
            problem_id=st.problem.id, question=st.problem.question, gold=st.problem.answer, strategy=self.strategy.name,
            completions=completions, picks=picks, correct=correct, policy_tokens=st.policy_tokens,
            prm_tokens=int(round(st.prm_tokens)), seconds=time.perf_counter() - st.started,
        )


def path_score(step_scores: list[float], aggregation: str) -> float:
    """A path's score; 0.0, a model PRM's lowest, for a path whose first step did not fit the
    PRM's context (or was cut at the policy's) and so has no score."""
    return aggregate(step_scores, aggregation) if step_scores else 0.0


def _best_in_order(nodes: list[_Node], n: int, aggregation: str) -> list[_Node]:
    """Exactly n of `nodes`, as search-and-learn: the n best by aggregated score, kept in the
    order they finished (best-of-N: sample order, so that the picks at n < N read the first n
    samples, not the n best); if fewer finished, they are repeated in turn (a, b, a, b, ...)."""
    best = sorted(range(len(nodes)), key=lambda i: path_score(nodes[i].scores, aggregation), reverse=True)[:n]
    done = [nodes[i] for i in sorted(best)]
    if done and len(done) < n:
        done = (done * -(-n // len(done)))[:n]
    return done


def powers_of_two(n: int) -> list[int]:
    """1, 2, 4, ... up to n, and n itself: the n at which the picks are read."""
    out, k = [], 1
    while k <= n:
        out.append(k)
        k *= 2
    if out and out[-1] != n:
        out.append(n)
    return out
