"""Search strategies on a tiny random policy with a hard-coded verifier as the PRM.

The random policy never writes "\\n\\n", so the step delimiter here is a frequent character ("e"):
steps then end often, which is all the tree logic needs.
"""
import threading

import pytest

import ttc_fast as tf
from ttc_fast.data import Problem
from ttc_fast.prompts import encode_prompt
from ttc_fast.search import TreeSearch
from ttc_fast.testing import build_tiny_model

DELIM = "e"
SAMPLING = tf.SamplingParams(temperature=1.0, max_tokens=10, seed=0)
PATTERN = "a"


def step_has_pattern(question: str, steps: list[str]) -> float:
    """Verifier: rewards a step that contains PATTERN."""
    return 1.0 if PATTERN in steps[-1] else 0.0


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = build_tiny_model(tmp_path_factory.mktemp("llama"), "llama", seed=5)
    return tf.Engine(tf.load_model(path, device="cpu"), num_blocks=1024, block_size=4)


@pytest.fixture(scope="module")
def verifier():
    return tf.load_prm(step_has_pattern)


def problems(k: int) -> list[Problem]:
    return [Problem(f"p{i}", f"What is {i} plus {i + 2}?", str(2 * i + 2), "math", {}) for i in range(k)]


def record_expansions(engine, monkeypatch) -> list[list[int]]:
    calls = []
    real = engine.expand

    def spy(branches, counts, sampling, seeds=None, **kw):
        calls.append(list(counts))
        return real(branches, counts, sampling, seeds, **kw)

    monkeypatch.setattr(engine, "expand", spy)
    return calls


def record_scored_items(prm, monkeypatch) -> list[int]:
    """How many (sequence, step) items each `score_steps` call of `prm` scores."""
    sizes = []
    real = prm.score_steps

    def spy(handles, steps):
        sizes.append(len(handles))
        return real(handles, steps)

    monkeypatch.setattr(prm, "score_steps", spy)
    return sizes


def assert_scores_match_fresh_scoring(prm, results) -> None:
    """Every completion's step scores equal its steps scored one by one on a fresh sequence."""
    for r in results:
        for c in r.completions:
            handle = prm.start(r.question)
            fresh = [prm.score_steps([handle], [step])[0] for step in c.steps]
            prm.free(handle)
            assert fresh == pytest.approx(c.step_scores, abs=1e-4)


@pytest.mark.parametrize("strategy", [
    tf.BestOfN(n=8), tf.MajorityVote(n=4), tf.WeightedBestOfN(n=8),
    tf.BeamSearch(n=8, width=4, iterations=4, delimiter=DELIM), tf.DVTS(n=8, width=2, iterations=4, delimiter=DELIM),
    tf.BeamSearch(n=8, width=4, iterations=3, delimiter=DELIM, lookahead=1),
    tf.ParticleFiltering(n=8, iterations=4, delimiter=DELIM),
], ids=lambda s: f"{s.name}")
def test_each_strategy_returns_n_completions_with_its_tree_shape(engine, verifier, strategy, monkeypatch):
    calls = record_expansions(engine, monkeypatch)
    verifier_calls = verifier.stats["calls"]
    results = engine.search(problems(3), strategy, SAMPLING, prm=verifier if not isinstance(strategy, tf.MajorityVote) else None)
    assert [r.problem_id for r in results] == ["p0", "p1", "p2"]
    for r in results:
        assert len(r.completions) == strategy.n
        assert all(c.steps and len(c.step_scores) == len(c.steps) for c in r.completions)
        assert sorted(r.picks) == [n for n in (1, 2, 4, 8) if n <= strategy.n]
        assert r.policy_tokens >= max(c.policy_tokens for c in r.completions)
    # First expansion: n children of each problem's prompt.
    assert calls[0] == [strategy.n] * 3
    for counts in calls[1:]:
        if isinstance(strategy, tf.DVTS):
            assert set(counts) == {strategy.width} and len(counts) <= 3 * strategy.n // strategy.width
        elif isinstance(strategy, tf.BeamSearch):
            if strategy.lookahead and set(counts) == {1}:
                continue  # a greedy rollout of every live candidate
            assert set(counts) == {strategy.width} and len(counts) <= 3 * strategy.keep
        elif isinstance(strategy, tf.ParticleFiltering):
            assert sum(counts) <= 3 * strategy.n
    if isinstance(strategy, tf.BestOfN):
        assert len(calls) == 1  # whole solutions in one expansion
    assert engine.runner.blocks.num_used_blocks == 0
    scored = verifier.stats["calls"] - verifier_calls
    assert scored == 0 if isinstance(strategy, tf.MajorityVote) else scored > 0  # majority runs without it


@pytest.fixture(scope="module")
def word_engine(tmp_path_factory):
    """A policy that writes random words: its weights make every input give the same uniform
    distribution over the one-character tokens " ", "a", "b", "c", "d" (all layers output zero,
    every embedding is one vector u, lm_head rows are 0 for those tokens and -30 u/|u|^2 else)."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    path = build_tiny_model(tmp_path_factory.mktemp("words"), "llama2", seed=0)
    tok = AutoTokenizer.from_pretrained(str(path))
    allowed = [tok.convert_tokens_to_ids(t) for t in ("\u0120", "a", "b", "c", "d")]
    state = load_file(str(path / "model.safetensors"))
    hidden = state["model.embed_tokens.weight"].shape[1]
    u = torch.ones(hidden)
    state["model.embed_tokens.weight"][:] = u
    for key in state:
        if key.endswith(("o_proj.weight", "down_proj.weight")):
            state[key].zero_()
    state["model.norm.weight"].fill_(1.0)
    head = (-30.0 * u / u.dot(u)).repeat(state["lm_head.weight"].shape[0], 1)
    head[allowed] = 0.0
    state["lm_head.weight"] = head.contiguous()
    save_file(state, str(path / "model.safetensors"))
    return tf.Engine(tf.load_model(path, device="cpu"), num_blocks=2048, block_size=4)


@pytest.mark.slow
def test_beam_search_finds_the_rewarded_pattern_far_more_often_than_best_of_n(word_engine, verifier):
    """Steps are words and the verifier rewards a word that holds PATTERN. Found: some completion
    of the problem whose first K words all hold it, read the same way from both strategies'
    texts. Beam search prunes towards such words one by one (its first K words are K search
    steps); best-of-N must be lucky in K words of one of its n samples."""
    n, k, qs = 8, 8, problems(12)
    sampling = tf.SamplingParams(temperature=1.0, max_tokens=80, seed=0)  # ~13 words per solution
    beam = word_engine.search(qs, tf.BeamSearch(n=n, width=2, iterations=k + 2, delimiter=" ", aggregation="min"),
                              sampling, prm=verifier)
    best = word_engine.search(qs, tf.BestOfN(n=n, delimiter=" ", aggregation="min"), sampling, prm=verifier)

    def found(results):
        def first_words_hold_it(text):
            words = [w for w in text.split(" ") if w][:k]
            return len(words) == k and all(PATTERN in w for w in words)

        return sum(any(first_words_hold_it(c.text) for c in r.completions) for r in results) / len(results)

    assert found(beam) >= found(best) + 0.5, (found(beam), found(best))


def test_blocks_in_use_stay_within_the_beam_bound(engine, tmp_path):
    """Policy pool: prompt blocks + N x (blocks of the longest path the search wrote, pruned ones
    included, + 1); the PRM's pool likewise in PRM tokens (question + format prefix, then each
    path's step tokens), watched after every forward of either model."""
    from prm_builders import build_math_shepherd_prm

    prm = tf.load_prm(build_math_shepherd_prm(tmp_path / "prm", seed=3), kind="math-shepherd", device="cpu",
                      dtype="float32", num_blocks=1024, block_size=4)
    n = 8
    peaks = {"policy": 0, "prm": 0}
    for name, runner in (("policy", engine.runner), ("prm", prm.runner)):
        real = runner.forward

        def watched(*args, _real=real, _name=name, _runner=runner, **kwargs):
            out = _real(*args, **kwargs)
            peaks[_name] = max(peaks[_name], _runner.blocks.num_used_blocks)
            return out

        runner.forward = watched
    longest = {"policy": 0, "prm": 0}

    class Watching(tf.search.SearchObserver):
        def on_prune(self, state, children, kept):
            for path in children:  # every path written
                longest["policy"] = max(longest["policy"], path.tokens)
                ids, _ = prm.full_ids(state.problem.question, path.steps)
                longest["prm"] = max(longest["prm"], len(ids) - len(prm.fmt.prefix_ids(state.problem.question)))

    try:
        search = tf.search.TreeSearch(engine, prm, tf.BeamSearch(n=n, width=4, iterations=4, delimiter=DELIM), SAMPLING,
                                      observer=Watching())
        [result] = list(search.run(problems(1)))
    finally:
        del engine.runner.forward
    prompt = {"policy": len(encode_prompt(result.question, engine.tokenizer)),
              "prm": len(prm.fmt.prefix_ids(result.question))}
    for name, bs in (("policy", engine.runner.block_size), ("prm", prm.runner.block_size)):
        bound = -(-prompt[name] // bs) + n * (-(-longest[name] // bs) + 1)
        assert 0 < peaks[name] <= bound, (name, peaks[name], bound)
    assert prm.runner.blocks.num_sequences == 0


def test_strategy_arguments_are_checked():
    with pytest.raises(ValueError, match="multiple of width"):
        tf.BeamSearch(n=6, width=4)
    with pytest.raises(ValueError, match="aggregation"):
        tf.BestOfN(n=4, aggregation="max")
    with pytest.raises(ValueError, match="needs a PRM"):
        tf.search.TreeSearch(None, None, tf.BeamSearch(n=4, width=2))


def text_score(question: str, steps: list[str]) -> float:
    """A verifier whose scores vary from sample to sample (order unrelated to sample order)."""
    return (sum(map(ord, steps[-1])) % 97) / 97


def test_best_of_n_keeps_sample_order_so_picks_at_small_n_read_the_first_samples(engine):
    """picks at n < N must come from the first n samples, not from the n best-scored ones."""
    prm = tf.load_prm(text_score)
    sampling = tf.SamplingParams(temperature=1.0, max_tokens=12, seed=3)
    results = engine.search(problems(3), tf.BestOfN(n=8), sampling, prm=prm)
    unsorted = 0
    for r in results:
        scores = [c.score for c in r.completions]
        unsorted += scores != sorted(scores, reverse=True)
        assert r.picks[1]["naive"] == r.completions[0].answer
    assert unsorted >= 2  # 8 scores in sample order are (almost) never sorted


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_best_of_n_solutions_that_agree_up_to_a_step_are_scored_once_there(engine, tmp_path, monkeypatch, temperature):
    """Best-of-N scores step k once per distinct run of steps 0..k in a problem's samples (greedy:
    one solution N times, so once per problem; sampled: samples that differ before k are not
    merged even where step k agrees), and every completion's step scores still equal the same
    steps scored one by one on a fresh sequence."""
    from prm_builders import build_math_shepherd_prm

    path = build_math_shepherd_prm(tmp_path / "prm", seed=3)
    prm = tf.load_prm(path, kind="math-shepherd", device="cpu", dtype="float32")
    scored = record_scored_items(prm, monkeypatch)
    sampling = tf.SamplingParams(temperature=temperature, max_tokens=24, seed=0)
    results = engine.search(problems(2), tf.BestOfN(n=6, delimiter=DELIM), sampling, prm=prm)
    steps = [[c.steps for c in r.completions] for r in results]
    depth = max(len(s) for per in steps for s in per)
    assert depth > 1  # several step indices, or the test shows nothing
    assert scored == [sum(len({tuple(s[: k + 1]) for s in per if len(s) > k}) for per in steps) for k in range(depth)]
    if temperature == 0.0:
        assert scored == [sum(len(per[0]) > k for per in steps) for k in range(depth)]
    assert_scores_match_fresh_scoring(prm, results)


@pytest.mark.slow
def test_children_that_wrote_the_same_step_are_scored_once(engine, tmp_path, monkeypatch):
    """Greedy expansion makes every child of a branch write the same step: the PRM scores one per
    branch (the copies fork its sequence and take its score), and every completion's step scores
    still equal the same steps scored one by one on a fresh sequence."""
    from prm_builders import build_math_shepherd_prm

    prm = tf.load_prm(build_math_shepherd_prm(tmp_path / "prm", seed=3), kind="math-shepherd", device="cpu", dtype="float32")
    expansions = record_expansions(engine, monkeypatch)
    scored = record_scored_items(prm, monkeypatch)
    greedy = tf.SamplingParams(temperature=0.0, max_tokens=10, seed=0)
    strategy = tf.BeamSearch(n=8, width=4, iterations=3, delimiter=DELIM)
    results = engine.search(problems(2), strategy, greedy, prm=prm)
    assert scored == [len(counts) for counts in expansions]  # one new step per expanded branch
    assert_scores_match_fresh_scoring(prm, results)


@pytest.mark.slow
def test_policy_and_prm_with_different_tokenizers(tmp_path):
    """The PRM tokenizes the step text itself: a policy whose tokenizer splits text otherwise
    (another BPE vocabulary) searches with it, and every step score equals the PRM's own
    scoring of the same step texts."""
    from prm_builders import build_math_shepherd_prm

    policy = tf.Engine(tf.load_model(build_tiny_model(tmp_path / "policy", "llama", seed=5, vocab_size=272), device="cpu"),
                       num_blocks=1024, block_size=4)
    prm = tf.load_prm(build_math_shepherd_prm(tmp_path / "prm", seed=3), kind="math-shepherd", device="cpu", dtype="float32")
    text = "What is 3 plus 5? Add them: 3 + 5 = 8."
    assert policy.tokenizer(text)["input_ids"] != prm.tokenizer(text)["input_ids"]
    results = policy.search(problems(2), tf.BeamSearch(n=4, width=2, iterations=3, delimiter=DELIM), SAMPLING, prm=prm)
    assert any(len(c.steps) > 1 for r in results for c in r.completions)  # steps scored one after another
    assert_scores_match_fresh_scoring(prm, results)


def test_steps_are_encoded_for_the_prm_as_the_policy_finishes_them(engine, tmp_path, monkeypatch):
    """Each step index's new steps reach the PRM's encoder from `Engine.expand`'s on_finish
    reports (steps of different lengths finish in different decode steps), so the scoring call
    finds them encoded; the results are those of a search without the reports."""
    from prm_builders import build_math_shepherd_prm

    prm = tf.load_prm(build_math_shepherd_prm(tmp_path / "prm", seed=3), kind="math-shepherd", device="cpu", dtype="float32")
    strategy = tf.BeamSearch(n=8, width=4, iterations=3, delimiter=DELIM)

    def run():
        return [[(c.steps, c.step_scores) for c in r.completions] for r in engine.search(problems(3), strategy, SAMPLING, prm=prm)]

    on_worker, on_caller = [], []
    rows = prm.fmt.rows

    def spy(steps, indices, outcome=False):
        (on_caller if threading.current_thread() is threading.main_thread() else on_worker).append(len(steps))
        return rows(steps, indices, outcome)

    monkeypatch.setattr(prm.fmt, "rows", spy)
    with_reports = run()
    assert len(on_worker) > 3 and on_caller == []  # every step encoded ahead, in several reports
    monkeypatch.setattr(prm, "prefetch", lambda items: None)
    assert run() == with_reports


def test_an_engine_object_without_the_newer_methods_still_searches(engine, tmp_path):
    """TreeSearch takes any object with start / fork / expand / release: one whose expand has no
    on_finish and that has no release_many searches as the engine itself does."""
    from prm_builders import build_math_shepherd_prm

    class Plain:
        def __init__(self, inner):
            self.inner = inner
            self.tokenizer, self.model, self.runner = inner.tokenizer, inner.model, inner.runner

        def start(self, prompt):
            return self.inner.start(prompt)

        def fork(self, branch, n):
            return self.inner.fork(branch, n)

        def expand(self, branches, counts, sampling, seeds=None):
            return self.inner.expand(branches, counts, sampling, seeds)

        def release(self, branch):
            self.inner.release(branch)

    prm = tf.load_prm(build_math_shepherd_prm(tmp_path / "prm", seed=3), kind="math-shepherd", device="cpu", dtype="float32")
    strategy = tf.BeamSearch(n=4, width=2, iterations=2, delimiter=DELIM)

    def run(eng):
        return [[(c.steps, c.step_scores) for c in r.completions] for r, _ in
                TreeSearch(eng, prm, strategy, SAMPLING).run_with_problems(problems(2))]

    assert run(Plain(engine)) == run(engine)
    assert engine.runner.blocks.num_used_blocks == 0
