"""PRM scorer: cached incremental scores == uncached score_full == transformers on the same ids,
the real formats' tokenization, token accounting, callables, outcome mode, aggregation, errors."""
import shutil
import threading

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ttc_fast import OutOfBlocks
from ttc_fast.prm import KINDS, PRMOutOfBlocks, aggregate, load_prm
from prm_builders import PRM_BUILDERS, prm_model_classes

ATOL = 1e-4
QUESTIONS = ["What is 2 + 3?", "Natalia sold 48 clips in April and half as many in May. How many in all?"]
# STEPS[problem][beam][iteration]
STEPS = [
    [["Step 1: add 2 and 3.", "So 2 + 3 = 5.", "The answer is \\boxed{5}."],
     ["Step 1: 2 + 3 = 6.", "Step 2: check:\n6 - 3 = 3.", "The answer is 6."],
     ["Let x = 2 + 3.", "Then x = 5.", "Therefore, the final answer is 5."]],
    [["In May she sold 48 / 2 = 24.", "Altogether 48 + 24 = 72.", "The answer is \\boxed{72}."],
     ["In May she sold 96.", "Total 144.", "The answer is 144."],
     ["Half of 48 is 24.", "  48 + 24 = 72  ", "So 72."]],
]


@pytest.fixture(scope="module", params=KINDS)
def prm_case(request, tmp_path_factory):
    kind = request.param
    path = PRM_BUILDERS[kind](tmp_path_factory.mktemp(kind), seed=3)
    prm = load_prm(path, kind=kind, device="cpu", dtype="float32", num_blocks=512, block_size=4)
    return kind, path, prm


def test_incremental_matches_full(prm_case):
    kind, _, prm = prm_case
    before = dict(prm.stats)
    roots = prm.start_many(QUESTIONS)
    beams = [prm.fork(r, 3) for r in roots]
    for r in roots:
        prm.free(r)
    handles = [h for bs in beams for h in bs]
    history = {id(h): [] for h in handles}
    for it in range(3):
        steps = [STEPS[p][b][it] for p in range(2) for b in range(3)]
        new_tokens = sum(len(prm.fmt.step_ids(s, it)[0]) for s in steps)
        fw, st, tp = prm.stats["forwards"], prm.stats["step_tokens"], prm.tokens_processed
        if it == 2:
            prm.max_batch_tokens = 16  # chunked: several forwards, same scores
        got = prm.score_steps(handles, steps)
        prm.max_batch_tokens = 8192
        assert sum(prm.last_row_tokens) == prm.tokens_processed - tp == new_tokens
        # Only the new step tokens were run; one forward for all handles of both problems.
        assert prm.stats["step_tokens"] - st == new_tokens
        if it < 2:
            assert prm.stats["forwards"] - fw == 1
        else:
            assert prm.stats["forwards"] - fw > 1
        for h, s, g in zip(handles, steps, got):
            history[id(h)].append(g)
            assert h.num_steps == it + 1
            ids, _ = prm.full_ids(h.question, h.steps)
            assert prm.runner.seq_len(h.seq) == len(ids)  # the cached sequence holds exactly the full ids
    for p, bs in enumerate(beams):
        for b, h in enumerate(bs):
            full = prm.score_full(QUESTIONS[p], STEPS[p][b])
            torch.testing.assert_close(torch.tensor(history[id(h)]), torch.tensor(full), atol=ATOL, rtol=0)
    prefix_tokens = sum(len(prm.fmt.prefix_ids(q)) for q in QUESTIONS)
    assert prm.stats["prefix_tokens"] - before["prefix_tokens"] + prm.stats["prefix_tokens_cached"] - before["prefix_tokens_cached"] == prefix_tokens
    for h in handles:
        prm.free(h)
    assert prm.runner.blocks.num_sequences == 0


def test_prefix_cache_reused_across_starts(prm_case):
    _, _, prm = prm_case
    a = prm.start(QUESTIONS[1])
    cached = prm.stats["prefix_tokens_cached"]
    b = prm.start(QUESTIONS[1])
    assert prm.stats["prefix_tokens_cached"] > cached
    sa, sb = prm.score_steps([a, b], ["Half of 48 is 24.", "Half of 48 is 24."])
    assert abs(sa - sb) < ATOL
    prm.free(a), prm.free(b)


def _reference_scores(kind, path, prm, ids, positions):
    x = torch.tensor([ids])
    with torch.no_grad():
        if kind in ("rlhflow", "math-shepherd"):
            ref = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
            logits = ref(x).logits[0, positions][:, [prm.fmt.good, prm.fmt.bad]]
            return logits.softmax(-1)[:, 0]
        ref = prm_model_classes()[kind].from_pretrained(str(path), dtype=torch.float32).eval()
        out = ref(x)[0, positions]
        return out.softmax(-1)[:, 1] if kind == "qwen-prm" else torch.sigmoid(out)


def test_full_matches_transformers(prm_case):
    kind, path, prm = prm_case
    steps = STEPS[1][2] + STEPS[0][1]
    ids, positions = prm.full_ids(QUESTIONS[1], steps)
    expected = _reference_scores(kind, path, prm, ids, positions)
    got = torch.tensor(prm.score_full(QUESTIONS[1], steps))
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_full_ids_are_the_formats(prm_case):
    """A loaded PRM scores exactly its format's ids (tests/test_prm_formats.py checks each format
    against its reference code); the steps are used as written."""
    kind, path, prm = prm_case
    q, steps = QUESTIONS[0], ["Step 1: add 2 and 3.", " So 2 + 3 = 5.  ", "The answer is 5."]
    assert prm.full_ids(q, steps) == prm.fmt.full_ids(q, steps)
    stripped = prm.fmt.full_ids(q, [s.strip() for s in steps])
    if kind == "rlhflow":  # the test checkpoint's Llama 3.1-style template trims message content
        assert prm.fmt.full_ids(q, steps) == stripped
    else:
        assert prm.fmt.full_ids(q, steps) != stripped


def test_many_rows_are_encoded_in_one_batch_in_order(prm_case):
    """The steps of a call are tokenized in one batch call of the tokenizer (spread over the
    cores by it): every row still gets its own step's ids (a row's score equals scoring it
    alone), and the batch gives the ids of encoding each row on its own."""
    kind, path, prm = prm_case
    n = 70
    steps = [f"Step 1: add {i} and {i + 1}." for i in range(n)]
    root, = prm.start_many([QUESTIONS[0]])
    handles = prm.fork(root, n)  # sharing the question's blocks
    together = prm.score_steps(handles, steps)
    for h in handles + [root]:
        prm.free(h)
    for i in (0, 17, n - 1):
        h, = prm.start_many([QUESTIONS[0]])
        alone, = prm.score_steps([h], [steps[i]])
        prm.free(h)
        assert abs(alone - together[i]) < ATOL
    assert len(set(round(x, 5) for x in together)) > 1
    for outcome in (False, True):
        indices = [i % 3 for i in range(n)]
        ragged = [s * (1 + i % 4) + ("\n" if i % 5 == 0 else "") for i, s in enumerate(steps)] + ["", " ", "\n\nx\n"]
        indices += [0, 1, 2]
        one_by_one = [prm.fmt.rows([s], [k], outcome)[0] for s, k in zip(ragged, indices)]
        assert prm.fmt.rows(ragged, indices, outcome) == one_by_one


def test_prefetched_steps_score_as_steps_encoded_on_demand(prm_case, monkeypatch):
    """Steps prefetched (some of them, one with another step index, one twice, one no call
    uses) give the same scores as none prefetched: the call takes the prefetched encodings,
    encodes the rest in one batch and drops what it did not use; a prefetched batch that failed
    whole is encoded again; a step the format rejects raises its error in the call that scores it."""
    kind, path, prm = prm_case
    steps = [f"Step 1: add {i} and {i + 1}." for i in range(6)]

    def score(prefetch):
        root, = prm.start_many([QUESTIONS[0]])
        handles = prm.fork(root, len(steps))
        prm.free(root)
        prm.prefetch(prefetch)
        try:
            return prm.score_steps(handles, steps)
        finally:
            for h in handles:
                prm.free(h)

    plain = score([])
    calls = []
    rows = prm.fmt.rows
    monkeypatch.setattr(prm.fmt, "rows", lambda s, k, outcome=False: calls.append(list(zip(s, k))) or rows(s, k, outcome))
    ahead = [(steps[0], 0), (steps[2], 0), (steps[2], 0), (steps[3], 1), ("never scored", 0)]
    assert score(ahead) == pytest.approx(plain, abs=ATOL)
    assert calls == [list(dict.fromkeys(ahead)), [(s, 0) for i, s in enumerate(steps) if i not in (0, 2)]]
    assert prm.encoder._ahead == {}
    # A prefetched batch that failed as a whole (the tokenizer raised): its rows are encoded again.
    def fail_ahead(s, k, outcome=False):
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("tokenizer failed")
        return rows(s, k, outcome)

    monkeypatch.setattr(prm.fmt, "rows", fail_ahead)
    assert score([(s, 0) for s in steps]) == pytest.approx(plain, abs=ATOL)
    # A step the format rejects: raised by the call that uses it, prefetched or not.
    monkeypatch.setattr(prm.fmt, "rows", lambda s, k, outcome=False: [ValueError(f"bad {x}") for x in s])
    for prefetch in ([("x", 0)], []):
        root, = prm.start_many([QUESTIONS[0]])
        prm.prefetch(prefetch)
        with pytest.raises(ValueError, match="bad x"):
            prm.score_steps([root], ["x"])
        prm.free(root)


@pytest.fixture(scope="module")
def outcome_case(prm_case):
    kind, path, prm = prm_case
    out = load_prm(path, kind=f"outcome:{kind}", device="cpu", dtype="float32", num_blocks=512, block_size=4)
    return kind, path, prm, out


def _outcome_kept_len(prm, question, steps):
    """prefix + every step's body: what an outcome handle's cached sequence must hold."""
    return len(prm.fmt.prefix_ids(question)) + sum(len(prm.fmt.outcome_ids(s, k)[0]) for k, s in enumerate(steps))


def test_outcome_mode(outcome_case):
    kind, _, prm, out = outcome_case
    assert out.outcome and out.default_aggregation == "last" and out.kind == f"outcome:{kind}"
    steps = STEPS[0][0]
    per_step = prm.score_full(QUESTIONS[0], steps)
    whole = out.score_full(QUESTIONS[0], steps)
    assert len(whole) == 1 and out.score(QUESTIONS[0], steps) == whole[0]
    step_ids, step_positions = prm.full_ids(QUESTIONS[0], steps)
    if kind == "skywork":  # no tags: the same tokens as step mode, scored at the last step's end
        assert out.full_ids(QUESTIONS[0], steps) == (step_ids, step_positions[-1:])
        assert abs(whole[0] - per_step[-1]) < ATOL
    else:  # the whole solution with one tag at its end, not the step-by-step text
        assert out.full_ids(QUESTIONS[0], steps)[0] != step_ids
    h = out.start(QUESTIONS[0])
    inc = [out.score_steps([h], [s])[0] for s in steps]
    assert abs(inc[-1] - whole[0]) < ATOL
    out.free(h)
    assert out.runner.blocks.num_sequences == 0


def test_outcome_incremental_matches_full_and_transformers(outcome_case):
    """Outcome mode, cached: each call appends the new bodies, probes the tag on forks and drops
    them; every score equals score_full of the same partial solution, which equals transformers."""
    kind, path, _, prm = outcome_case
    tagged = kind != "skywork"
    roots = prm.start_many(QUESTIONS)
    beams = [prm.fork(r, 3) for r in roots]
    for r in roots:
        prm.free(r)
    handles = [h for bs in beams for h in bs]
    for it in range(3):
        steps = [STEPS[p][b][it] for p in range(2) for b in range(3)]
        segs = [prm.fmt.outcome_ids(s, it) for s in steps]
        fw, before, probe = prm.stats["forwards"], prm.tokens_processed, prm.stats["probe_tokens"]
        if it == 2:
            prm.max_batch_tokens = 16  # chunked: several forwards, same scores
        got = prm.score_steps(handles, steps)
        prm.max_batch_tokens = 8192
        assert sum(prm.last_row_tokens) == prm.tokens_processed - before
        assert prm.last_row_tokens == [len(body) + len(tag) for body, tag, _ in segs]
        assert prm.stats["probe_tokens"] - probe == sum(len(tag) for _, tag, _ in segs)
        if it < 2:
            assert prm.stats["forwards"] - fw == (2 if tagged else 1)  # bodies, then the tags on forks
        assert prm.runner.blocks.num_sequences == len(handles)  # the probe forks were freed
        for h, g in zip(handles, got):
            assert h.num_steps == it + 1
            assert prm.runner.seq_len(h.seq) == _outcome_kept_len(prm, h.question, h.steps)  # no tag left behind
            assert abs(g - prm.score_full(h.question, h.steps)[0]) < ATOL
    for p in range(2):
        ids, positions = prm.full_ids(QUESTIONS[p], STEPS[p][1])
        assert len(positions) == 1 and positions[0] == len(ids) - 1
        expected = _reference_scores(kind, path, prm, ids, positions)
        torch.testing.assert_close(torch.tensor(prm.score_full(QUESTIONS[p], STEPS[p][1])), expected, atol=ATOL, rtol=0)
    for h in handles:
        prm.free(h)
    assert prm.runner.blocks.num_sequences == 0


def test_outcome_tokens_match_format(outcome_case):
    """The outcome text is the question and the whole solution, with the scoring tag once."""
    kind, path, step_prm, prm = outcome_case
    tok = AutoTokenizer.from_pretrained(str(path))
    q, steps = QUESTIONS[0], ["Step 1: add 2 and 3.", " So 2 + 3 = 5. ", "The answer is 5."]
    clean = steps  # used as written, as the references do
    ids, positions = prm.full_ids(q, steps)
    assert positions == [len(ids) - 1]
    if kind == "math-shepherd":
        text = f"{q} " + "\n".join(clean) + " ки"
        body = ids[1:] if ids[0] == tok.bos_token_id else ids
        assert tok.decode(body) == text
        assert ids == tok.encode(text)
        tag = tok.encode("ки", add_special_tokens=False)[-1]
        assert ids.count(tag) == 1 and ids[-1] == tag
    elif kind == "rlhflow":
        conv = [{"role": "user", "content": f"{q} " + "\n\n".join(clean)}]
        ref = tok.encode(tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True), add_special_tokens=False)
        assert ids == ref
        start, end = tok.convert_tokens_to_ids("<|start_header_id|>"), tok.convert_tokens_to_ids("<|end_header_id|>")
        roles = [tok.decode(ids[i + 1: ids.index(end, i)]) for i, t in enumerate(ids) if t == start]
        assert roles == ["system", "user", "assistant"]  # one user turn, one assistant header, no "+" turns
        assert tok.decode(ids).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    elif kind == "qwen-prm":
        msgs = [{"role": "system", "content": "Please reason step by step, and put your final answer within \\boxed{}."},
                {"role": "user", "content": q}, {"role": "assistant", "content": "\n\n".join(clean) + "<extra_0>"}]
        ref = tok.encode(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)
        tag = tok.convert_tokens_to_ids("<extra_0>")
        assert ref[: len(ids)] == ids and ids.count(tag) == 1 and ids[-1] == tag
    else:  # skywork: no tags, the step-mode tokens
        assert ids == step_prm.full_ids(q, steps)[0]


@pytest.mark.parametrize("mode", ["", "outcome:"])
def test_pool_short_evicts_and_rescores_exactly(prm_case, mode):
    """A pool too small for a call's rows: other handles are evicted and the rows are scored in
    chunks; evicted handles are re-encoded on their next step. Every score equals a full re-encode
    (outcome mode too: the tag probes on forks need room as well)."""
    kind, path, prm_big = prm_case
    if mode:
        prm_big = load_prm(path, kind=mode + kind, device="cpu", dtype="float32", num_blocks=512, block_size=4)
    first = [f"step {i} " + "with quite a few words in it " * 2 for i in range(4)]
    prefix = len(prm_big.fmt.prefix_ids(QUESTIONS[0]))
    row = max(-(-len(body + tag) // 4) + bool(tag) for body, tag, _ in (prm_big.fmt.row_ids(f, 0, prm_big.outcome) for f in first))
    # Room for the prefix and about two of the four rows: the call must evict and chunk.
    prm = load_prm(path, kind=mode + kind, device="cpu", dtype="float32", num_blocks=-(-prefix // 4) + 2 * row + 6,
                   block_size=4)
    h = prm.start(QUESTIONS[0])
    idle = prm.fork(h, 2)  # held, never scored in this test: evicted first
    beams = prm.fork(h, 4)
    prm.free(h)

    def call(handles, steps):
        before = prm.tokens_processed
        got = prm.score_steps(handles, steps)
        assert sum(prm.last_row_tokens) == prm.tokens_processed - before
        live = [b for b in beams + idle if b.seq is not None]
        assert prm.runner.blocks.num_sequences == len(live)  # probe forks freed
        for b in live:
            if mode:
                assert prm.runner.seq_len(b.seq) == _outcome_kept_len(prm, b.question, b.steps)
        return got

    got = call(beams, first)
    assert prm.stats["evictions"] > 0
    assert all(b.seq is None for b in idle)
    for b, step, g in zip(beams, first, got):
        assert abs(g - prm_big.score_full(QUESTIONS[0], [step])[-1]) < ATOL
    second = [f"then {i} more" for i in range(4)]
    got2 = call(beams, second)
    assert prm.stats["recomputed_tokens"] > 0
    for step1, step2, g in zip(first, second, got2):
        assert abs(g - prm_big.score_full(QUESTIONS[0], [step1, step2])[-1]) < ATOL
    assert abs(call(idle[:1], ["late"])[0] - prm_big.score_full(QUESTIONS[0], ["late"])[-1]) < ATOL
    for b in beams + idle:
        prm.free(b)
    assert prm.runner.blocks.num_used_blocks == 0


@pytest.mark.parametrize("mode", ["", "outcome:"])
def test_row_longer_than_pool_raises_and_changes_nothing(prm_case, mode):
    kind, path, _ = prm_case
    prm = load_prm(path, kind=mode + kind, device="cpu", dtype="float32", num_blocks=64, block_size=4)
    h = prm.start(QUESTIONS[0])
    beams = prm.fork(h, 2)
    n = prm.runner.seq_len(beams[0].seq)
    with pytest.raises(PRMOutOfBlocks, match="kv_cache_bytes") as e:
        prm.score_steps(beams, ["short", "a very long step " * 30])
    assert isinstance(e.value, OutOfBlocks)
    assert all(b.num_steps == 0 and b.alive for b in beams)
    assert all(b.seq is None or prm.runner.seq_len(b.seq) == n for b in beams)
    prm.score_steps(beams[:1], ["a short step"])  # the pool still works


def test_callable_verifier():
    calls = []

    def verifier(question, steps):
        calls.append((question, list(steps)))
        return [1.0 if "5" in s else 0.25 for s in steps]

    prm = load_prm(verifier)
    h = prm.start(QUESTIONS[0])
    a, b = prm.fork(h, 2)
    assert prm.score_steps([a, b], ["2 + 3 = 5", "2 + 3 = 6"]) == [1.0, 0.25]
    assert prm.score_steps([a, b], ["so 5", "hmm"]) == [1.0, 0.25]
    assert calls[-1] == (QUESTIONS[0], ["2 + 3 = 6", "hmm"])
    assert prm.score_full(QUESTIONS[0], ["x", "5"]) == [0.25, 1.0]
    assert prm.tokens_processed == 0
    scalar = load_prm(lambda q, steps: float(len(steps)))
    assert scalar.score_full("q", ["a", "b", "c"]) == [1.0, 2.0, 3.0]
    def judge(question, steps):
        assert len(steps) == 1  # outcome mode: one joined text
        return float(len(steps[0]))

    outcome = load_prm(judge, kind="outcome")
    assert outcome.score_full("q", ["ab", "c"]) == [5.0]  # "ab\n\nc": one text, scored once
    oh = outcome.start("q")
    assert outcome.score_steps([oh], ["ab"]) == [2.0] and outcome.score_steps([oh], ["c"]) == [5.0]


def test_aggregate():
    s = [0.5, 0.8, 0.25]
    assert aggregate(s, "last") == 0.25
    assert aggregate(s, "min") == 0.25
    assert aggregate(s, "prod") == pytest.approx(0.1)
    assert aggregate(s, "mean") == pytest.approx(1.55 / 3)
    with pytest.raises(ValueError, match="last, min, prod, mean"):
        aggregate(s, "max")
    with pytest.raises(ValueError, match="no step scores"):
        aggregate([], "min")


def test_clear_errors(tmp_path):
    qwen = PRM_BUILDERS["qwen-prm"](tmp_path / "qwen", seed=1)
    rlhf = PRM_BUILDERS["rlhflow"](tmp_path / "rlhf", seed=1)
    with pytest.raises(ValueError, match="rlhflow, math-shepherd, qwen-prm, skywork"):
        load_prm(qwen, kind="orm")
    # the checkpoint lacks the head its kind reads
    with pytest.raises(ValueError, match="no skywork head: missing v_head.summary.weight"):
        load_prm(qwen, kind="skywork", device="cpu")
    # a Qwen2.5-Math-PRM ships no lm_head: the logit kinds cannot run it
    with pytest.raises(ValueError, match="no lm_head"):
        load_prm(qwen, kind="math-shepherd", device="cpu")
    # token strings missing from the tokenizer
    with pytest.raises(ValueError, match="'ки'.*not a token"):
        load_prm(rlhf, kind="math-shepherd", device="cpu")
    broken = tmp_path / "qwen-no-extra"
    shutil.copytree(qwen, broken)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tmp_path / "rlhf" / f, broken / f)
    with pytest.raises(ValueError, match="<extra_0>"):
        load_prm(broken, kind="qwen-prm", device="cpu")
    # kind inferred from the architecture; plain causal LMs need an explicit kind
    assert load_prm(qwen, device="cpu", num_blocks=64).kind == "qwen-prm"
    with pytest.raises(ValueError, match="cannot infer the PRM kind"):
        load_prm(rlhf, device="cpu")
    # the causal-LM loader refuses a PRM architecture with a pointer to load_prm
    import ttc_fast as tf
    with pytest.raises(ValueError, match="load_prm"):
        tf.load_model(qwen, device="cpu")


def test_a_failing_forward_keeps_no_half_step(outcome_case):
    """A forward that fails mid-call (here the outcome probe, after the bodies ran) leaves every
    handle as it was: its sequence evicted, its steps unchanged, no fork left; the next call
    re-encodes it and scores as a fresh solution would."""
    kind, _, _, prm = outcome_case
    handles = prm.fork(root := prm.start(QUESTIONS[0]), 2)
    prm.free(root)
    prm.score_steps(handles, [STEPS[0][0][0], STEPS[0][1][0]])
    real, calls = prm.runner.forward, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == (2 if kind != "skywork" else 1):  # the probe, or skywork's only forward
            raise RuntimeError("device lost")
        return real(*args, **kwargs)

    prm.runner.forward = failing
    with pytest.raises(RuntimeError, match="device lost"):
        prm.score_steps(handles, [STEPS[0][0][1], STEPS[0][1][1]])
    del prm.runner.forward
    assert [h.num_steps for h in handles] == [1, 1] and all(h.seq is None for h in handles)
    assert prm.runner.blocks.num_sequences == 0
    got = prm.score_steps(handles, [STEPS[0][0][1], STEPS[0][1][1]])
    for h, g in zip(handles, got):
        assert abs(g - prm.score_full(h.question, h.steps)[0]) < ATOL
        prm.free(h)
