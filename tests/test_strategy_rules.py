"""Each strategy's own rule, checked decision by decision on a tiny random policy: DVTS's
independent subtrees, particle filtering's softmax resampling, lookahead's rollout score, the
last iteration running to EOS, the defaults, and admission bounded by the KV pool.

As in test_search.py, the random policy never writes "\\n\\n", so the step delimiter is "e".
"""
from collections import Counter

import pytest
import torch
from strategy_helpers import DELIM, path_score, problems

import ttc_fast as tf
from ttc_fast.search import SearchObserver, TreeSearch
from ttc_fast.testing import build_tiny_model
from ttc_fast.tree import Path

SAMPLING = tf.SamplingParams(temperature=1.0, max_tokens=10, seed=0)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("llama"), "llama", seed=5)


@pytest.fixture(scope="module")
def engine(model_path):
    return tf.Engine(tf.load_model(model_path, device="cpu"), num_blocks=1024, block_size=4)


class Recorder(SearchObserver):
    """Records every pruning, grouped by iteration: the candidates (problem, subtree, aggregated
    score, finished?) and the frontier it left (problem -> [(candidate, subtree, times to
    expand)]); and each problem's finished paths' subtrees."""

    def __init__(self):
        self.prunings = []
        self.completed_groups = {}
        self._iteration = None

    def on_iteration(self, states):
        self._iteration = None

    def on_prune(self, state, children, kept):
        agg = state.strategy.aggregation
        if self._iteration is None:
            self._iteration = ([], {})
            self.prunings.append(self._iteration)
        candidates, frontier = self._iteration
        candidates += [(state.index, p.group, p.score(agg), p.done, id(p)) for p in children]
        frontier[state.index] = [(id(p), p.group, count) for p, count in kept]

    def on_result(self, state, result):
        self.completed_groups[state.index] = Counter(p.group for p in state.completed)


def recording_search(engine, prm, strategy, sampling):
    recorder = Recorder()
    return TreeSearch(engine, prm, strategy, sampling, observer=recorder), recorder


def test_dvts_subtrees_keep_their_best_candidate_and_end_on_their_own(engine):
    """Each subtree keeps its best candidate, finished or not: when it has finished the subtree
    ends (its other candidates go), else that one candidate is expanded `width` times; a subtree
    never stops because others finished; each returns `width` paths."""
    n, width = 8, 2
    strategy = tf.DVTS(n=n, width=width, iterations=5, delimiter=DELIM)
    search, recorder = recording_search(engine, tf.load_prm(path_score), strategy, SAMPLING)
    results = [r for r in search.run(problems(3))]
    ended_on_a_finished_best = continued_after_another_ended = 0
    ended: set[tuple[int, int]] = set()
    for candidates, frontier in recorder.prunings:
        by_subtree = {}
        for problem, group, score, done, node in candidates:
            by_subtree.setdefault((problem, group), []).append((score, done, node))
        assert all(len(c) == width for c in by_subtree.values())  # `width` children per kept node
        for (problem, group), cands in by_subtree.items():
            assert (problem, group) not in ended  # an ended subtree is never expanded again
            score, done, node = max(cands, key=lambda c: c[0])  # the first of equal scores, as argmax
            kept = [(i, c) for i, g, c in frontier[problem] if g == group]
            if done:
                assert kept == []
                ended.add((problem, group))
                ended_on_a_finished_best += 1
            else:
                assert kept == [(node, width)]
                continued_after_another_ended += any(p == problem for p, _ in ended)
    assert ended_on_a_finished_best > 0 and continued_after_another_ended > 0  # both rules were exercised
    for r in results:
        assert len(r.completions) == n
    for groups in recorder.completed_groups.values():
        assert sorted(groups) == list(range(n // width))  # every subtree ran to a finished path


def test_beam_search_keeps_the_top_n_over_width_of_the_whole_problem(engine):
    n, width = 8, 4
    strategy = tf.BeamSearch(n=n, width=width, iterations=4, delimiter=DELIM)
    search, recorder = recording_search(engine, tf.load_prm(path_score), strategy, SAMPLING)
    list(search.run(problems(2)))
    checked = 0
    for candidates, frontier in recorder.prunings:
        for problem in {c[0] for c in candidates}:
            live = sorted((c for c in candidates if c[0] == problem and not c[3]), key=lambda c: -c[2])
            kept = frontier[problem]
            if not kept:
                continue  # the problem had n finished paths
            assert [count for _, _, count in kept] == [width] * len(kept)
            assert len(kept) == min(n // width, len(live))
            kept_ids = {node for node, _, _ in kept}
            kept_scores = sorted((c[2] for c in live if c[4] in kept_ids), reverse=True)
            assert kept_scores == [c[2] for c in live[: len(kept)]]  # the best live candidates
            checked += 1
    assert checked > 0


def test_particle_filtering_resamples_in_proportion_to_softmax_of_the_scores(engine):
    """Draw after draw, how often each particle is expanded matches softmax(score / T)."""
    scores, temperature = [0.1, 0.5, 0.9, 0.2], 0.5
    strategy = tf.ParticleFiltering(n=4, temperature=temperature)
    paths = [Path(["step"], [s]) for s in scores]
    drawn = torch.zeros(len(paths))
    g = torch.Generator().manual_seed(0)
    for _ in range(2000):
        frontier = strategy.resample(paths, g)
        assert sum(count for _, count in frontier) == len(paths)  # as many particles as before
        for path, count in frontier:
            drawn[paths.index(path)] += count
    expected = torch.softmax(torch.tensor(scores) / temperature, dim=0)
    assert torch.allclose(drawn / drawn.sum(), expected, atol=0.02), (drawn / drawn.sum(), expected)


class RollingOut(SearchObserver):
    """Marks the verifier calls made by the lookahead's rollouts: from on_lookahead to the
    pruning that follows."""

    rolling = False

    def on_lookahead(self, items):
        RollingOut.rolling = True

    def on_prune(self, state, children, kept):
        RollingOut.rolling = False


def test_lookahead_scores_each_step_at_the_end_of_its_greedy_rollout(engine):
    """With lookahead 1, every step a path went on from carries the score the verifier gave its
    rollout (the candidate plus one greedy step), not its own."""
    own: dict[tuple, float] = {}
    rolled: dict[tuple, float] = {}

    def recording(question, steps):
        (rolled if RollingOut.rolling else own)[(question, *steps)] = path_score(question, steps)
        return path_score(question, steps)

    strategy = tf.BeamSearch(n=4, width=2, iterations=3, delimiter=DELIM, lookahead=1)
    results = list(TreeSearch(engine, tf.load_prm(recording), strategy, SAMPLING, observer=RollingOut()).run(problems(2)))
    checked = 0
    for r in results:
        for c in r.completions:
            for k, score in enumerate(c.step_scores[:-1]):  # the last step was not rolled out
                path = (r.question, *c.steps[: k + 1])
                rollouts = {v for p, v in rolled.items() if len(p) == len(path) + 1 and p[: len(path)] == path}
                assert score in rollouts and score != own[path]
                checked += 1
    assert checked > 0


def test_steps_end_at_the_delimiter_and_the_last_iteration_runs_to_eos(engine, monkeypatch):
    iterations = 3
    stops = []
    real = engine.expand

    def spy(branches, counts, sampling, seeds=None, **kw):
        stops.append({p.stop for p in sampling})
        return real(branches, counts, sampling, seeds, **kw)

    monkeypatch.setattr(engine, "expand", spy)
    strategy = tf.BeamSearch(n=4, width=2, iterations=iterations, delimiter=DELIM)
    results = engine.search(problems(2), strategy, tf.SamplingParams(temperature=1.0, max_tokens=16, seed=1),
                            prm=tf.load_prm(path_score))
    assert stops[: iterations - 1] == [{(DELIM,)}] * (iterations - 1)
    assert stops[iterations - 1] == {()}  # no step delimiter: the last step runs to EOS / max tokens
    finals = [c.steps[-1] for r in results for c in r.completions if len(c.steps) == iterations]
    assert finals and any(DELIM in step for step in finals)  # it ran past the delimiter
    for r in results:
        for c in r.completions:
            assert not any(DELIM in step for step in c.steps[: iterations - 1][: len(c.steps) - 1])


def test_defaults_are_search_and_learns():
    for strategy in (tf.BeamSearch(), tf.DVTS()):
        assert (strategy.n, strategy.width, strategy.iterations, strategy.aggregation, strategy.delimiter,
                strategy.lookahead, strategy.filter_duplicates) == (16, 4, 40, "last", "\n\n", 0, False)
    assert tf.ParticleFiltering().iterations == 40
    sampling = TreeSearch(None, tf.load_prm(path_score), tf.BeamSearch()).sampling
    assert (sampling.temperature, sampling.top_p, sampling.max_tokens) == (0.8, 1.0, 2048)


class InFlight(SearchObserver):
    """Records the most problems in flight at once."""

    most = 0

    def on_iteration(self, states):
        self.most = max(self.most, len(states))


def _search_on_a_pool(model_path, num_blocks: int, k: int):
    engine = tf.Engine(tf.load_model(model_path, device="cpu"), num_blocks=num_blocks, block_size=4)
    strategy = tf.BeamSearch(n=4, width=2, iterations=3, delimiter=DELIM)
    in_flight = InFlight()
    search = TreeSearch(engine, tf.load_prm(path_score), strategy, SAMPLING, observer=in_flight)
    results = {r.problem_id: [c.text for c in r.completions] for r in search.run(problems(k))}
    assert engine.runner.blocks.num_used_blocks == 0
    return in_flight.most, results


@pytest.mark.slow
def test_problems_in_flight_are_bounded_by_the_pool_not_a_batch_size(model_path):
    """A larger pool runs more problems at once; a pool that holds only one problem's beams
    still finishes every problem, with the same completions (seeds are per problem)."""
    k = 8
    small, small_results = _search_on_a_pool(model_path, 32, k)
    large, large_results = _search_on_a_pool(model_path, 2048, k)
    assert small < large == k
    assert small_results == large_results and len(large_results) == k


def test_a_pool_too_small_for_the_beams_evicts_and_recomputes_instead_of_failing(model_path):
    """The beams of one problem outgrow a pool of 40 blocks; the engine evicts branches and
    recomputes them, and the search ends with the completions a large pool gives."""
    engine = tf.Engine(tf.load_model(model_path, device="cpu"), num_blocks=40, block_size=4)
    strategy = tf.BeamSearch(n=8, width=2, iterations=4, delimiter=DELIM)
    verifier = tf.load_prm(path_score)
    tight = engine.search(problems(2), strategy, SAMPLING, prm=verifier)
    assert engine.stats["evictions"] + engine.stats["preemptions"] > 0
    roomy = tf.Engine(tf.load_model(model_path, device="cpu"), num_blocks=2048, block_size=4)
    wide = roomy.search(problems(2), strategy, SAMPLING, prm=verifier)
    assert [[c.text for c in r.completions] for r in tight] == [[c.text for c in r.completions] for r in wide]


def test_a_pool_that_cannot_hold_one_sequence_raises_out_of_blocks(model_path):
    engine = tf.Engine(tf.load_model(model_path, device="cpu"), num_blocks=6, block_size=4)
    with pytest.raises(tf.OutOfBlocks, match="kv_cache_bytes"):
        engine.search(problems(1), tf.BeamSearch(n=4, width=2, iterations=3, delimiter=DELIM),
                      tf.SamplingParams(temperature=1.0, max_tokens=40, seed=0), prm=tf.load_prm(path_score))


class FrontierTexts(SearchObserver):
    """Records, after every pruning, each problem's kept beams as their step texts."""

    def __init__(self):
        self.kept = []

    def on_prune(self, state, children, kept):
        self.kept.append({state.index: [tuple(p.steps) for p, _ in kept]})


@pytest.mark.parametrize("filter_duplicates", [False, True])
def test_beam_search_filter_duplicates(engine, filter_duplicates):
    """search-and-learn's filter_duplicates: greedy children of one beam write the same step, and
    only the first of equal texts competes, so the kept beams are distinct; without it the copies
    fill the beam slots."""
    strategy = tf.BeamSearch(n=4, width=2, iterations=3, delimiter=DELIM, filter_duplicates=filter_duplicates)
    texts = FrontierTexts()
    search = TreeSearch(engine, tf.load_prm(path_score), strategy, tf.SamplingParams(temperature=0.0, max_tokens=10, seed=0),
                        observer=texts)
    list(search.run(problems(2)))
    kept = [beams for step in texts.kept for beams in step.values() if beams]
    assert kept
    for beams in kept:
        if filter_duplicates:
            assert len(beams) == len(set(beams)) == 1  # greedy: every candidate has the same text
        else:
            assert len(beams) == strategy.keep and len(set(beams)) == 1
