"""The built-in toy task: generator, checker, tokenizer, shipped checkpoints, and a real
measurement that PRM-guided search beats greedy decoding of the same small policy."""
from __future__ import annotations

import random

import pytest
import torch

from ttc_fast import BeamSearch, Engine, SamplingParams, load_model, load_prm
from ttc_fast.grading import extract_answer, grade
from ttc_fast.loader import BUILTIN_DIR
from ttc_fast.prompts import encode_prompt
from ttc_fast.toy import check_step, eval_problems, make_dataset, make_problem, prefix_labels, solve
from ttc_fast.toy.task import LEVELS

NAMES = ("toy-policy-s", "toy-policy-m", "toy-policy-l", "toy-prm")


def _shipped() -> bool:
    return all((BUILTIN_DIR / n / "model.safetensors").is_file() for n in NAMES)


@pytest.fixture(scope="module")
def toy_checkpoints():
    assert _shipped(), f"the toy checkpoints in {BUILTIN_DIR} are missing: they ship with the package (benchmarks/train_toy.py rebuilds them)"


needs_ckpt = pytest.mark.usefixtures("toy_checkpoints")  # missing is a failure, not a skip


# --- generator ----------------------------------------------------------------------------------
def test_generator_deterministic():
    a, b = make_dataset(30, seed=7), make_dataset(30, seed=7)
    assert [(p.question, p.answer, p.meta["solution"]) for p in a] == [(p.question, p.answer, p.meta["solution"]) for p in b]
    c = make_dataset(30, seed=8)
    assert [p.question for p in a] != [p.question for p in c]
    p1, p2 = make_problem(random.Random(3), 4), make_problem(random.Random(3), 4)
    assert p1.question == p2.question and p1.meta == p2.meta


def test_problem_structure_and_levels():
    rng = random.Random(0)
    for level, (n_ops, *_rest) in LEVELS.items():
        for _ in range(20):
            p = make_problem(rng, level)
            steps = p.meta["solution"].split("\n\n")
            assert steps == p.meta["steps"] and len(steps) == n_ops + 1
            assert extract_answer(p.meta["solution"]) == p.answer
            assert grade(p.meta["solution"], p.answer, "math")
            chain = solve(p.question)
            assert len(chain) == n_ops and str(chain[-1][3]) == p.answer
    with pytest.raises(ValueError):
        make_problem(rng, 9)


def test_eval_set_fixed():
    ev = eval_problems()
    assert len(ev) >= 200 and all(p.kind == "math" for p in ev)
    assert len({p.id for p in ev}) == len(ev)
    assert [p.question for p in ev] == [p.question for p in eval_problems()]
    assert {p.meta["level"] for p in ev} == set(LEVELS)


def test_dev_set_fixed_and_apart_from_the_eval_set():
    from collections import Counter

    from ttc_fast.toy import dev_problems

    dev = dev_problems()
    assert [p.question for p in dev] == [p.question for p in dev_problems()]
    assert len({p.question for p in dev}) == len(dev) == len(eval_problems())
    assert not {p.question for p in dev} & {p.question for p in eval_problems()}
    assert Counter(p.meta["level"] for p in dev) == Counter(p.meta["level"] for p in eval_problems())


# --- checker ------------------------------------------------------------------------------------
def test_checker_accepts_correct_steps():
    for p in make_dataset(50, seed=11):
        steps = p.meta["steps"]
        assert all(check_step(p.question, steps[: k + 1]) == 1.0 for k in range(len(steps)))
        assert prefix_labels(p.question, steps) == [1] * len(steps)


def test_checker_rejects_wrong_steps():
    q = "Tom has 7 apples. He buys 5 more. He gives away 3. How many apples does he have now?"
    good = ["He buys 5 more, so 7 + 5 = 12.", "He gives away 3, so 12 - 3 = 9.", "The answer is \\boxed{9}."]
    assert [check_step(q, good[: k + 1]) for k in range(3)] == [1.0, 1.0, 1.0]
    assert check_step(q, ["He buys 5 more, so 7 + 5 = 13."]) == 0.0  # wrong arithmetic
    assert check_step(q, ["He buys 5 more, so 7 + 6 = 13."]) == 0.0  # right arithmetic, wrong operand
    assert check_step(q, ["He buys 5 more, so 7 * 5 = 35."]) == 0.0  # wrong operation
    assert check_step(q, ["He buys 5 more."]) == 0.0  # no arithmetic
    assert check_step(q, [good[0], "He gives away 3, so 13 - 3 = 10."]) == 0.0  # not from the true value
    assert check_step(q, good[:2] + ["The answer is \\boxed{10}."]) == 0.0
    assert check_step(q, good + ["extra"]) == 0.0
    bad = [good[0], "He gives away 3, so 12 - 3 = 8.", "The answer is \\boxed{8}."]
    assert prefix_labels(q, bad) == [1, 0, 0]
    for prm in (load_prm(check_step), load_prm("builtin:toy-checker")):
        assert prm.score_full(q, bad) == [1.0, 0.0, 0.0]


def test_prm_token_labels_mark_the_first_wrong_character():
    """The PRM's per-token training labels (train.expression_labels, via prm_row): 1 on the
    arithmetic of right steps, 0 from the first digit that cannot be right, and 0 on every later
    step; a wrong operand is marked at the operand; a step in another form gets none."""
    from ttc_fast.toy.tokenizer import build_tokenizer
    from toy_training import prm_row

    tok = build_tokenizer()
    q = "Tom has 7 apples. He buys 5 more. He gives away 3. How many apples does he have now?"

    def marked(steps):
        ids, tags, labels, dense = prm_row(tok, q, steps, prefix_labels(q, steps))
        toks = tok.convert_ids_to_tokens(ids)
        return "".join(toks[i] + "+-"[1 - g] for i, g in dense)

    good = ["He buys 5 more, so 7 + 5 = 12.", "He gives away 3, so 12 - 3 = 9.", "The answer is \\boxed{9}."]
    assert marked(good) == " 7+ ++ 5+ =+ 1+2+.+ 1+2+ -+ 3+ =+ 9+.+ \\+boxed+{+9+}+.+"
    slip = [good[0], "He gives away 3, so 12 - 3 = 8.", "The answer is \\boxed{8}."]
    assert marked(slip) == " 7+ ++ 5+ =+ 1+2+.+ 1+2+ -+ 3+ =+ 8-.- \\-boxed-{-8-}-.-"
    operand = ["He buys 5 more, so 7 + 6 = 13."]
    assert marked(operand) == " 7+ ++ 6- =- 1-3-.-"
    short = ["He buys 5 more, so 7 + 5 = 1."]  # "1" could still be "12": wrong at the "."
    assert marked(short) == " 7+ ++ 5+ =+ 1+.-"
    assert marked(["He buys 5 more and has 12."]) == ""


def test_prm_arithmetic_targets_are_the_right_tokens_only():
    """The PRM's next-token targets on arithmetic (train.expression_targets): every token that
    keeps a step right is predicted from the position before it; the wrong digit and all after
    it are not targets."""
    from ttc_fast.toy.tokenizer import build_tokenizer
    from toy_training import expression_targets, prm_row

    tok = build_tokenizer()
    q = "Tom has 7 apples. He buys 5 more. He gives away 3. How many apples does he have now?"
    good = ["He buys 5 more, so 7 + 5 = 12.", "He gives away 3, so 12 - 3 = 9."]
    slip = [good[0], "He gives away 3, so 12 - 3 = 8."]
    rows = [prm_row(tok, q, s, prefix_labels(q, s)) for s in (good, slip)]
    which, where = expression_targets(rows)
    targets = {0: "", 1: ""}
    for i, p in zip(which.tolist(), where.tolist()):
        targets[i] += tok.convert_ids_to_tokens([rows[i][0][p]])[0]
    assert targets[0] == " 7 + 5 = 12. 12 - 3 = 9."
    assert targets[1] == " 7 + 5 = 12. 12 - 3 ="


def test_teacher_view_aligns_the_arithmetic_of_both_formats():
    """train.teacher_view: L's row is the policies' own training text (question, blank line,
    steps joined by blank lines), and each arithmetic token of the PRM row, right or wrong, is
    matched with the same token of L's row (also after a slip and in later steps)."""
    from ttc_fast.toy.tokenizer import build_tokenizer
    from toy_training import policy_row, prm_row, teacher_view

    tok = build_tokenizer()
    q = "Tom has 7 apples. He buys 5 more. He gives away 3. How many apples does he have now?"
    slip = ["He buys 5 more, so 7 + 5 = 13.", "He gives away 3, so 13 - 3 = 10.", "The answer is \\boxed{10}."]
    row = prm_row(tok, q, slip, prefix_labels(q, slip))
    policy, student, teacher = teacher_view(tok, q, slip, row)
    assert tok.decode(policy, skip_special_tokens=True) == q + "\n\n" + "\n\n".join(slip)
    predicted = lambda ids, where: "".join(tok.convert_ids_to_tokens([ids[p + 1] for p in where]))
    assert predicted(row[0], student) == predicted(policy, teacher) == " 7 + 5 = 13. 13 - 3 = 10. \\boxed{10}."
    assert len(student) == len(row[3])
    problem = make_problem(random.Random(5), 4, "x")
    steps = problem.meta["steps"]
    view = teacher_view(tok, problem.question, steps, prm_row(tok, problem.question, steps, [1] * len(steps)))
    assert view[0] == policy_row(tok, problem)[0][:-1]  # L's training text, without its EOS


def test_own_slip_pairs_mend_the_first_wrong_step():
    """train.own_slip_pairs: a sample's first wrong step, cut there, paired with the same step
    mended (its words kept, the right arithmetic written); wrong answers are mended too, and a
    sample with no wrong step gives no pair."""
    from toy_training import own_slip_pairs

    q = "Tom has 7 apples. He buys 5 more. He gives away 3. How many apples does he have now?"
    right = ["He buys 5 more, so 7 + 5 = 12.", "He gives away 3, so 12 - 3 = 9.", "The answer is \\boxed{9}."]
    samples = [right, [right[0], "He gives away 3, so 12 - 3 = 8.", "The answer is \\boxed{8}."],
               [right[0], right[1], "The answer is \\boxed{10}."], ["He buys 5 more, so 7 + 5 = 13.", right[1]]]
    pairs = own_slip_pairs([(q, s, prefix_labels(q, s)) for s in samples])
    assert [(r[1], w[1]) for r, w in pairs] == [
        (right[:2], [right[0], "He gives away 3, so 12 - 3 = 8."]),
        (right, [right[0], right[1], "The answer is \\boxed{10}."]),
        (right[:1], ["He buys 5 more, so 7 + 5 = 13."]),
    ]
    for r, w in pairs:
        assert r[0] == w[0] == q and all(r[2]) and w[2] == [1] * (len(w[1]) - 1) + [0]



def test_search_hard_pairs_keep_the_wrong_steps_a_search_would_pick():
    """train.search_hard_pairs: a wrong candidate scored at or above its best right sibling (or
    above the floor when no sibling is right) is a hard case, paired with the same step mended;
    a wrong step scored below the right one is not, and copies of a step count once."""
    from toy_training import search_hard_pairs

    q = "Tom has 7 apples. He buys 5 more. He gives away 3. How many apples does he have now?"
    first = "He buys 5 more, so 7 + 5 = 12."
    right, above, below = "He gives away 3, so 12 - 3 = 9.", "He gives away 3, so 12 - 3 = 8.", "He gives away 3, so 12 - 3 = 7."
    alone_high, alone_low = "He buys 5 more, so 7 + 5 = 13.", "He buys 5 more, so 7 + 5 = 11."
    scores = {right: 0.90, above: 0.95, below: 0.40, alone_high: 0.60, alone_low: 0.30}
    seen = []

    def p_good(items):
        seen.extend(items)
        return [scores[steps[-1]] for _, steps in items]

    candidates = [(q, [first], [right, above, above, below]), (q, [], [alone_high, alone_low, alone_high])]
    pairs = search_hard_pairs(candidates, p_good)
    assert len(seen) == 5  # distinct candidates only
    assert [(r[1], w[1]) for r, w in pairs] == [([first, right], [first, above]), ([first], [alone_high])]
    for r, w in pairs:
        assert all(r[2]) and w[2] == [1] * (len(w[1]) - 1) + [0]


def test_pruning_hard_pairs_pair_wrong_paths_with_the_best_right_one():
    """train.pruning_hard_pairs: in a recorded pruning, each distinct wrong path scored at or above
    the best right one is paired with that right path, including a path whose last step is
    right arithmetic on a value an earlier slip made wrong; a pruning without a right path gives
    none, and a path seen in two prunings counts once."""
    from toy_training import pruning_hard_pairs

    q = "Tom has 7 apples. He buys 5 more. He gives away 3. How many apples does he have now?"
    ok1, slip1 = "He buys 5 more, so 7 + 5 = 12.", "He buys 5 more, so 7 + 5 = 13."
    ok2, slip2, carried = "He gives away 3, so 12 - 3 = 9.", "He gives away 3, so 12 - 3 = 8.", "He gives away 3, so 13 - 3 = 10."
    decision = [([ok1, ok2], 0.80), ([ok1, ok2], 0.80), ([ok1, slip2], 0.85), ([slip1, carried], 0.95),
                ([ok1, "He gives away 3, so 12 - 3 = 7."], 0.30)]
    no_right = [([slip1], 0.9), (["He buys 5 more, so 7 + 5 = 11."], 0.5)]
    pairs = pruning_hard_pairs([(q, decision), (q, no_right), (q, decision)])
    assert [(r[1], w[1]) for r, w in pairs] == [([ok1, ok2], [ok1, slip2]), ([ok1, ok2], [slip1, carried])]
    assert [w[2] for _, w in pairs] == [[1, 0], [0, 0]]
    assert all(r[0] == w[0] == q and all(r[2]) for r, w in pairs)


def test_final_pick_is_a_decision_only_when_the_finished_paths_differ():
    """train.final_pick: a search result's completions become one decision (stripped steps and
    aggregated scores, in order), unless every completion is the same path."""
    from ttc_fast.search import Completion, SearchResult
    from toy_training import final_pick

    q = "Tom has 7 apples. He buys 5 more. How many apples does he have now?"

    def result(paths):
        completions = [Completion(text="", steps=steps, step_scores=[score], score=score, answer=None,
                                  finish_reason="stop", policy_tokens=0) for steps, score in paths]
        return SearchResult(problem_id="p", question=q, gold="12", strategy="beam", completions=completions, picks={},
                            correct={}, policy_tokens=0, prm_tokens=0, seconds=0.0)

    right = [" He buys 5 more, so 7 + 5 = 12.", "\nThe answer is \\boxed{12}."]
    wrong = [" He buys 5 more, so 7 + 5 = 13.", "\nThe answer is \\boxed{13}."]
    assert final_pick(result([(right, 0.9)] * 4)) is None
    assert final_pick(result([(right, 0.4), (wrong, 0.8), (right, 0.4)])) == (
        q, [([s.strip() for s in right], 0.4), ([s.strip() for s in wrong], 0.8), ([s.strip() for s in right], 0.4)])


def test_search_misses_are_classified_at_the_first_iteration_that_lost_the_right_path():
    """benchmarks/toy_search_misses.classify: a returned right completion is a pick miss; right
    candidates none of which was kept, or right paths finished and not returned, a pruning miss;
    an expansion without a right step, an unwritten one, with how many expanded beams were right."""
    import importlib.util
    from pathlib import Path
    from types import SimpleNamespace

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "toy_search_misses.py"
    spec = importlib.util.spec_from_file_location("toy_search_misses", path)
    misses = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(misses)

    q = "Tom has 7 apples. He buys 5 more. He gives away 3. How many apples does he have now?"
    ok1, slip1 = "He buys 5 more, so 7 + 5 = 12.", "He buys 5 more, so 7 + 5 = 13."
    ok2, slip2 = "He gives away 3, so 12 - 3 = 9.", "He gives away 3, so 12 - 3 = 8."
    ok3, slip3 = "The answer is \\boxed{9}.", "The answer is \\boxed{8}."
    returned = lambda *paths: SimpleNamespace(completions=[SimpleNamespace(steps=p) for p in paths])  # noqa: E731
    wrong_only = returned([slip1, "He gives away 3, so 13 - 3 = 10.", "The answer is \\boxed{10}."])
    assert misses.classify(q, returned([ok1, slip2, slip3], [ok1, ok2, ok3]), []) == ("pick", 0, 0)
    assert misses.classify(q, wrong_only, [([[ok1], [slip1]], [[slip1], [slip1]])]) == ("pruned", 0, 0)
    finished = [([[ok1], [slip1]], [[ok1], [slip1]]), ([[ok1, ok2], [slip1, ok2]], [[ok1, ok2]]),
                ([[ok1, ok2, ok3], [ok1, ok2, slip3]], [])]
    assert misses.classify(q, wrong_only, finished) == ("pruned", 0, 0)
    assert misses.classify(q, wrong_only, [([[slip1]] * 4, [[slip1]])]) == ("unwritten", 1, 1)
    some_wrong = [([[ok1], [slip1]], [[ok1], [slip1], [slip1]]), ([[ok1, slip2], [slip1, ok2]], [])]
    assert misses.classify(q, wrong_only, some_wrong) == ("unwritten", 1, 3)
    all_right = [([[ok1], [slip1]], [[ok1], [ok1]]), ([[ok1, slip2]] * 8, [])]
    assert misses.classify(q, wrong_only, all_right) == ("unwritten", 2, 2)


@pytest.mark.slow
@needs_ckpt
def test_pruning_candidates_record_every_pruning_of_beam_search():
    """train.pruning_candidates: every pruning of beam search (more live candidates than it
    keeps) on fresh problems is recorded with each candidate's steps and its score in [0, 1];
    with final_picks, each problem's finished paths follow as one more decision."""
    from toy_training import BUILTIN, pruning_candidates

    decisions, accuracy = pruning_candidates(BUILTIN / "toy-prm", 2, 4, seed=3)
    assert decisions and 0.0 <= accuracy <= 1.0
    eval_questions = {p.question for p in eval_problems()}
    for q, cands in decisions:
        assert q not in eval_questions and len(cands) > 1  # N = 4, width 4: one kept of up to 4
        for steps, score in cands:
            assert steps and all(s == s.strip() and s for s in steps) and 0.0 <= score <= 1.0
    depths = {len(steps) for _, cands in decisions for steps, _ in cands}
    assert len(depths) > 1  # later prunings weigh longer paths


@needs_ckpt
def test_step_candidates_sample_next_steps_from_right_partial_solutions():
    """train.step_candidates: fresh (non-eval) problems, each a right partial solution cut before
    one of its steps, and k one-step samples of S from it (no blank line inside a step)."""
    from toy_training import BUILTIN, step_candidates

    cands = step_candidates(BUILTIN / "toy-policy-s", 6, 4, seed=5)
    assert len(cands) == 6
    eval_questions = {p.question for p in eval_problems()}
    for q, prefix, steps in cands:
        assert q not in eval_questions and len(solve(q)) >= len(prefix)
        assert all(prefix_labels(q, prefix)) and 1 <= len(steps) <= 4
        assert all(s and "\n\n" not in s for s in steps)
    assert sum(check_step(q, prefix + [s]) for q, prefix, steps in cands for s in steps) > 0


# --- tokenizer + checkpoints --------------------------------------------------------------------
@needs_ckpt
def test_checkpoints_load_and_tokenizer():
    import os

    total = sum(f.stat().st_size for n in NAMES for f in (BUILTIN_DIR / n).iterdir())
    assert total < 20 * 2**20
    sizes = {}
    for name in ("toy-policy-s", "toy-policy-m", "toy-policy-l"):
        m = load_model(f"builtin:{name}", device="cpu")
        tok = m.tokenizer
        assert not getattr(tok, "chat_template", None)
        assert len(tok.encode("\n\n", add_special_tokens=False)) == 1
        assert tok.eos_token_id in m.eos_token_ids
        text = "Tom has 17 apples.\n\nHe buys 5 more, so 17 + 5 = 22.\n\nThe answer is \\boxed{22}."
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id and tok.decode(ids, skip_special_tokens=True) == text
        assert tok.unk_token_id not in ids
        sizes[name] = sum(p.numel() for p in m.module.parameters())
    assert sizes["toy-policy-l"] >= 3 * sizes["toy-policy-s"]
    assert 4 * sizes["toy-policy-s"] <= sizes["toy-policy-m"] <= 8 * sizes["toy-policy-s"]  # the middle size
    prm = load_prm("builtin:toy-prm", kind="math-shepherd", device="cpu")
    p = eval_problems()[0]
    steps = p.meta["steps"]
    good = prm.score_full(p.question, steps)
    assert len(good) == len(steps) and all(0.0 <= s <= 1.0 for s in good)
    assert os.path.isdir(BUILTIN_DIR / "toy-prm")


@pytest.mark.slow
@needs_ckpt
def test_prm_separates_right_from_wrong_steps_of_policy_samples():
    """On policy S's own samples for eval problems (which the PRM never trained on), the PRM's
    step scores rank the checker's good steps above its bad ones: AUC well above chance (0.5)."""
    from ttc_fast.loader import BUILTIN_DIR as ckpts
    from toy_training import auc, sample_solutions

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    samples = sample_solutions(ckpts / "toy-policy-s", eval_problems()[:20], 4, temperature=1.0, seed=11)
    prm = load_prm("builtin:toy-prm", kind="math-shepherd", device="cpu")
    scores, labels = [], []
    for p, steps in samples:
        if steps:
            scores += prm.score_full(p.question, steps)
            labels += prefix_labels(p.question, steps)
    assert 0.2 < sum(labels) / len(labels) < 0.8  # both kinds present
    assert auc(scores, labels) >= 0.85


# --- the claim, measured ------------------------------------------------------------------------
SUBSET = [i for i in range(250) if i % 5 in (3, 4)][:20]  # a fixed spread of the eval set: levels 4 and 5


# Levels 2 and 3: S greedy is neither near-perfect (level 1: 96%) nor mostly hopeless (level 5:
# 24%), so one slip is what usually separates a wrong answer from a right one.
MIDDLE_SUBSET = [i for i in range(250) if i % 5 in (1, 2)][:60]


def greedy_and_beam_search(prm, subset, n=16):
    """Problems of `subset` (eval set indices) solved by policy S: greedy, and beam search (n
    beams, width 4, 8 iterations, temperature 0.4) guided by `prm` (weighted pick)."""
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    problems = [eval_problems()[i] for i in subset]
    engine = Engine(load_model("builtin:toy-policy-s", device="cpu"))
    prompts = [encode_prompt(p.question, engine.tokenizer, "") for p in problems]
    outs = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=160))
    greedy = sum(grade(extract_answer(o.outputs[0].text) or "", p.answer, "math") for o, p in zip(outs, problems))
    results = engine.search(problems, BeamSearch(n=n, width=4, iterations=8),
                            SamplingParams(temperature=0.4, max_tokens=48, seed=0), prm=prm)
    searched = sum(bool(r.correct.get(n, {}).get("weighted")) for r in results)
    print(f"greedy {greedy}/{len(problems)}, guided beam search (n={n}) {searched}/{len(problems)}")
    return greedy, searched


@pytest.mark.slow
@needs_ckpt
def test_verifier_guided_search_beats_greedy():
    """Beam search of policy S guided by the toy verifier (builtin:toy-checker, through load_prm)
    solves clearly more problems than S's greedy decoding."""
    greedy, searched = greedy_and_beam_search(load_prm("builtin:toy-checker"), SUBSET)
    assert searched >= greedy + 3, (greedy, searched)  # measured: 7/20 -> 11/20


@pytest.mark.slow
@needs_ckpt
def test_learned_prm_guided_search_beats_greedy():
    """The same with the learned PRM (builtin:toy-prm, math-shepherd format): S + PRM-guided
    beam search solves clearly more of 60 level-2 and level-3 problems than S's greedy decoding."""
    prm = load_prm("builtin:toy-prm", kind="math-shepherd", device="cpu")
    greedy, searched = greedy_and_beam_search(prm, MIDDLE_SUBSET, n=4)
    assert searched >= greedy + 4, (greedy, searched)  # measured: 46/60 -> 53/60


@pytest.mark.slow
@needs_ckpt
def test_toy_job_end_to_end_on_a_few_problems(tmp_path):
    """`ttc-fast run` without arguments, shrunk: every strategy's run (the adaptive ones and the
    routed one included) writes its lines, the summary holds each cell's accuracy and tokens,
    the equal-token comparison is printed and the two-panel plot written."""
    from ttc_fast.results import read_results
    from ttc_fast.toy.evaluate import format_table, run_toy

    summary = run_toy(out_dir=tmp_path, limit=3, ns=(1, 4, 16), progress=False)
    names = {"majority", "best-of-n", "weighted best-of-n", "beam", "dvts", "particle-filtering", "rebase",
             "early-reject", "adaptive-majority", "adaptive-weighted", "routed"}
    assert set(summary["accuracy"]) == names == set(summary["policy_tokens_per_problem"])
    assert set(summary["greedy"]) == {"S", "M", "L"}
    for name in names:
        for n, acc in summary["accuracy"][name].items():
            assert 0.0 <= acc <= 1.0 and summary["policy_tokens_per_problem"][name][n] > 0, (name, n)
    for f in ("rebase-n16", "early-reject-n16", "adaptive-majority-n16", "adaptive-weighted-n16", "routed-n64"):
        records = read_results(tmp_path / f"{f}.jsonl")
        assert len(records) == 3 and all(r["compute"]["policy_tokens_processed"] > 0 for r in records), f
        assert all(r["compute"]["flops"] > 0 for r in records), f  # the lines record the models' constants
    # best-of-N at n reads its first n samples: their tokens, not the whole run's
    bon = read_results(tmp_path / "best-of-n-n16.jsonl")
    assert summary["policy_tokens_per_problem"]["best-of-n"][4] == sum(
        sum(c["policy_tokens"] for c in r["completions"][:4]) for r in bon) / 3
    table = format_table(summary)
    assert "at equal tokens" in table and "goal: beam search's N=16 accuracy" in table
    assert (tmp_path / "accuracy.png").stat().st_size > 10_000
