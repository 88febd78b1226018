"""Training the toy task's checkpoints on a CPU: policies S and L, then the math-shepherd PRM.

    python benchmarks/train_toy.py all          # policy-s, policy-l, prm (needs both), eval
    python benchmarks/train_toy.py policy-s     # one part; also policy-l, prm, eval

Policies: tiny LlamaForCausalLM (tied embeddings, 2 and 4 layers) trained with next-token loss on
the solution (the prompt, BOS + question + "\n\n", is masked out) on freshly generated problems of
every level (an eval question is never trained on). Greedy accuracy on the eval set is measured
with ttc_fast's own Engine every `eval_every` steps; training runs its cosine schedule (or stops
when that accuracy has not improved for `patience` evaluations) and the best checkpoint is kept.
Policy L gets a second, lower-lr cosine stage (`then`): it was still improving at the end of the
first. S's width was chosen so that S is clearly weaker than L at its plateau (a 0.1M-parameter
S, hidden 64, reached 88% greedy: see "candidates_rejected" in the log).

PRM (math-shepherd format, kind="math-shepherd"): policy L (as real PRMs are fine-tuned from a
strong LM) with two more decoder layers on top, each starting as the identity. Checking a result
digit means comparing the digit the policy would write with the one written, a position after
the policy's prediction is formed: the extra layers give room for that comparison. Trained on
policy S's own samples (at temperatures 0.4 and 1) and,
in every batch, fresh pairs of a reference solution and the same solution with one slip (a wrong
result, operand or running value, continued from there), both cut after the same step: S's own
slips are all wrong results, mostly one wrong digit, and the slip data is drawn like them. Each
step is labelled good iff it and every step before it pass the checker (Math-Shepherd's label: a
correct continuation from it reaches the right answer). Text = question + " " + step0 + " ки" +
"\n" + step1 + " ки" ..., tokenized segment by segment exactly as `load_prm` does; the loss is
the cross-entropy of "+" vs "-" at each tag plus `lm_weight` times the next-token loss on the
fully right solutions (keeping the arithmetic L learnt as a policy, which checking a result
needs).
Then (`then`) cosine stages continue from the checkpoint on fresh samples and pairs, adding
`dense_weight` times the same "+"/"-" loss at every token of each step's arithmetic, labelled
by whether the text so far can still become the right step (`expression_labels`): a slip is
then taught at the digit where it is written, where the PRM can compare it with the digit it
expects, instead of only through the step's tag. The last ten stages add `expr_lm_weight` times a
next-token loss on the right steps' arithmetic (`expression_targets`): a verdict on a digit is
only as good as the PRM's own prediction of it, and by then that prediction had decayed from L's
(a result digit predicted right 93.6% of the time in the PRM's format, against L's 99.2%).
The third of them adds two identity-initialised layers (`deepen`; a digit whose prediction
forms in the last layers, a carry into the tens, left no layer to compare it with the written
one); it and the ones after it give half the slip pairs (the last, 6 of 8) to S's own first
slips, each paired with the same step mended (`own_slip_pairs`): S slips where the arithmetic
is hard, the synthetic slips at random digits mostly where it is easy. The two stages after
them also distil policy L into the PRM (`distil_weight`): the KL divergence from L's
next-token distribution, read in L's own format (`teacher_view`), at every arithmetic token of
every row, slipped ones included; the PRM's own prediction of the digits it checks had stayed
below L's (a result digit 97.4% against 99.2%). The last five stages train the verdict on the
search's own hard cases (`hard_pairs`, `search_hard_pairs`): from right partial solutions of
fresh problems S samples 16 next steps (`step_candidates`), and each wrong one the PRM scores at
or above its best right sibling is paired with the same step mended; they are mined again with
the current PRM at every evaluation. Beam search had lost most of its prunable problems to
exactly such steps, S's likeliest slips, which it writes in many candidates at once. The third
does the same at temperature 0.6 (`temperature`: S's samples, slips and next steps, mined and
held out, are drawn at the temperature of the searches the PRM is for; 0.4 before), where S
offers a search a right step more often, and more kinds of slip. The fourth takes two pairs a
batch from the siblings' hard cases and two from hard cases of beam search's own prunings
(`prune_pairs`, `pruning_candidates`, `pruning_hard_pairs`): S searches fresh problems (levels
3 to 5) with the current PRM, and each wrong path a pruning scored at or above its best right
path is paired with that path, mined again at every evaluation, at 0.4 and 0.6 in turn. A
pruning also weighs other beams' paths, whose earlier slips one prefix's siblings never show:
about half the pruning misses were a right step losing to right arithmetic on a value an
earlier slip had made wrong, the verdict read at the last step having forgotten the slip.
The fifth mines at 0.6 only, with S's samples, slips and next steps at 0.6 too, and also mines
the final pick (`prune_final`): the finished paths of each searched problem are one more
decision, where a right solution, once found, can still lose to a wrong one. Its checkpoints
were also compared by beam search and DVTS on the development set (`dev_problems`, RESULTS).
Logged over training: the AUC on held-out labelled steps of S (other problems, other samples),
how often a held-out right solution's last step outscores the same solution with a slip
(synthetic, and S's own at the stage's temperature, mended), how often the PRM predicts the
right steps' arithmetic, and how often, among S's sampled next steps from right partial
solutions of held-out problems (when some are right and some wrong), the best-scored one is
right (`heldout_sibling_top1`). The checkpoint kept is the one that best ranks S's own held-out
slips below their mended steps (the held-out AUC, which had saturated near 0.996, breaks ties;
the first seven stages were chosen by that AUC); the hard-case stages keep the one that best
picks a right sibling (`select="siblings"`).

`eval` measures S and L greedy on the whole eval set and S + beam search / best-of-16 with the
PRM (and with the exact checker, for reference) on 50 eval problems.

Writes ttc_fast/builtin/toy-{policy-s,policy-l,prm}/ (config.json, model.safetensors,
generation_config.json, tokenizer) and benchmarks/toy_train_log.json (per model: params, wall
time, steps, loss and eval accuracy over training).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch

from ttc_fast.toy.evaluate import TEMPERATURE
from ttc_fast.toy.task import _APPLY, eval_problems, final_value, make_problem, prefix_labels, solve
from ttc_fast.toy.tokenizer import build_tokenizer

REPO = Path(__file__).resolve().parents[1]
BUILTIN = REPO / "ttc_fast" / "builtin"
LOG = REPO / "benchmarks" / "toy_train_log.json"

# name -> (hidden, layers, heads, kv_heads, intermediate)
SIZES = {
    # hidden=64/inter=176 (0.1M) reached 88% greedy, too close to L: the shipped S is narrower
    "policy-s": dict(hidden=32, layers=2, heads=4, kv_heads=2, inter=96),
    "policy-l": dict(hidden=128, layers=4, heads=4, kv_heads=2, inter=384),
    # the middle policy (about 5x S, 1/5 of L) for the toy's "small + search against larger" table
    "policy-m": dict(hidden=64, layers=3, heads=4, kv_heads=2, inter=176),
}
TRAIN = {
    "policy-s": dict(steps=6000, batch=64, lr=3e-3, eval_every=250, patience=5, seed=1),
    # L was still improving at the end of its first schedule (84%): a second cosine stage follows
    "policy-l": dict(steps=2600, batch=32, lr=2e-3, eval_every=200, patience=5, seed=2,
                     then=dict(steps=1000, lr=7e-4)),
    # M: L's recipe on its own seeds, time-boxed to one hour of one CPU thread in all
    "policy-m": dict(steps=2600, batch=32, lr=2e-3, eval_every=200, patience=5, seed=4,
                     then=dict(steps=1000, lr=7e-4)),
    # each batch: S's samples plus `pairs` fresh (right, slipped) solution pairs
    # the PRM was still improving (held-out AUC) at the end of its first schedule: four more
    # stages on fresh data with the per-token verdict loss, two that also restore the
    # arithmetic L knew (next-token loss on the right steps' arithmetic), then two on a PRM two
    # layers deeper with half the slip pairs taken from S's own slips, then two that also distil
    # L's arithmetic into the PRM (the second, with 6 of 8 pairs S's own, found no better
    # checkpoint), then two on the search's own hard cases, mined afresh at every evaluation,
    # then one more on hard cases, slips and samples at temperature 0.6, then one that adds hard
    # cases from beam search's own prunings (`prune_pairs`), mined at 0.4 and 0.6 in turn, then
    # one at 0.6 that also mines beam search's final picks among its finished paths (`prune_final`)
    # `temperature`: S's sampling temperature in the searches a stage trains the PRM for
    "prm": dict(steps=6000, batch=32, pairs=8, lr=7e-4, eval_every=500, seed=3, samples=12000, extra_layers=2,
                lm_weight=0.5, temperature=0.4, then=[dict(steps=3000, lr=3e-4, dense_weight=1.0)] * 4
                + [dict(steps=3000, lr=3e-4, dense_weight=1.0, expr_lm_weight=2.0)] * 2
                + [dict(steps=3000, lr=3e-4, dense_weight=1.0, expr_lm_weight=2.0, pairs=4, own_pairs=4, deepen=2),
                   dict(steps=3000, lr=3e-4, dense_weight=1.0, expr_lm_weight=2.0, pairs=4, own_pairs=4),
                   dict(steps=3000, lr=3e-4, dense_weight=1.0, expr_lm_weight=2.0, pairs=4, own_pairs=4, distil_weight=2.0),
                   dict(steps=3000, lr=3e-4, dense_weight=1.0, expr_lm_weight=2.0, pairs=2, own_pairs=6, distil_weight=2.0)]
                + [dict(steps=3000, lr=3e-4, dense_weight=1.0, expr_lm_weight=2.0, pairs=2, own_pairs=3, hard_pairs=3,
                        distil_weight=2.0, select="siblings"),
                   dict(steps=2000, lr=3e-4, dense_weight=1.0, expr_lm_weight=2.0, pairs=2, own_pairs=3, hard_pairs=3,
                        distil_weight=2.0, select="siblings"),
                   dict(steps=3000, lr=3e-4, dense_weight=1.0, expr_lm_weight=2.0, pairs=2, own_pairs=3, hard_pairs=3,
                        distil_weight=2.0, select="siblings", temperature=0.6),
                   dict(steps=3000, lr=3e-4, dense_weight=1.0, expr_lm_weight=2.0, pairs=2, own_pairs=3, hard_pairs=2,
                        prune_pairs=2, prune_temperatures=(0.4, 0.6), distil_weight=2.0, select="siblings"),
                   dict(steps=3000, lr=3e-4, dense_weight=1.0, expr_lm_weight=2.0, pairs=2, own_pairs=3, hard_pairs=2,
                        prune_pairs=2, prune_temperatures=(0.6,), prune_final=True, distil_weight=2.0,
                        select="siblings", temperature=0.6)]),
}


def llama_config(tok, hidden, layers, heads, kv_heads, inter):
    from transformers import LlamaConfig

    vocab = -(-len(tok) // 8) * 8
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
                       rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def save(model, tok, path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
    model.save_pretrained(str(path), safe_serialization=True)
    tok.save_pretrained(str(path))
    for f in path.iterdir():
        f.chmod(0o644)


# --- policy data ------------------------------------------------------------------------------
_EVAL_QUESTIONS: set[str] | None = None


def _eval_questions() -> set[str]:
    global _EVAL_QUESTIONS
    if _EVAL_QUESTIONS is None:
        _EVAL_QUESTIONS = {p.question for p in eval_problems()}
    return _EVAL_QUESTIONS


def _fresh_problem(rng: random.Random, index: str = "prm", lowest_level: int = 1):
    """A problem of a random level (from `lowest_level` to 5) that is not in the eval set."""
    while True:
        p = make_problem(rng, rng.randint(lowest_level, 5), index)
        if p.question not in _eval_questions():
            return p


def policy_row(tok, problem):
    """(input_ids, labels) of a problem's reference solution in the policies' format: BOS +
    question + "\n\n" + solution + EOS; labels -100 on the prompt."""
    prompt = tok(problem.question + "\n\n")["input_ids"]
    sol = tok(problem.meta["solution"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return prompt + sol, [-100] * len(prompt) + sol


def policy_batch(rng: random.Random, tok, batch: int):
    """(input_ids, labels, attention_mask) for `batch` fresh problems; labels -100 on the prompt."""
    return _pad([policy_row(tok, _fresh_problem(rng)) for _ in range(batch)], tok.pad_token_id)


def _pad(rows, pad_id):
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return ids, labels, mask


def greedy_accuracy(path: Path, problems, max_tokens: int = 160) -> float:
    """Greedy accuracy of a saved checkpoint on problems, decoded by ttc_fast's Engine."""
    from ttc_fast.engine import Engine
    from ttc_fast.grading import extract_answer, grade
    from ttc_fast.loader import load_model
    from ttc_fast.sampling import SamplingParams
    from ttc_fast.prompts import encode_prompt

    engine = Engine(load_model(str(path), device="cpu"))
    prompts = [encode_prompt(p.question, engine.tokenizer, "") for p in problems]
    outs = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens))
    ok = [grade(extract_answer(o.outputs[0].text) or "", p.answer, p.kind) for o, p in zip(outs, problems)]
    return sum(ok) / len(ok)


def _optimizer_step(model, opt, loss) -> float:
    """Backward, clip the gradient norm to 1, step; returns the loss."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.item()


def _lr(step, total, base, warmup=100):
    if step < warmup:
        return base * (step + 1) / warmup
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup)))))


def train_policy(name: str, log: dict, steps: int | None = None, threads: int = 1, size: dict | None = None,
                 tag: str | None = None, init: str | None = None, lr: float | None = None) -> Path:
    """Train policy `name` (SIZES/TRAIN entries); `size` overrides its shape and `tag` names the
    output directory toy-{tag} and log entry instead (to compare candidate sizes);
    `init` continues from a saved checkpoint (the log keeps its curve; steps count on from it)."""
    from transformers import LlamaForCausalLM

    torch.set_num_threads(threads)
    cfg_t = dict(TRAIN[name])
    if steps is not None:
        cfg_t["steps"] = steps
    torch.manual_seed(cfg_t["seed"])
    rng = random.Random(1000 + cfg_t["seed"])
    tok = build_tokenizer()
    shape = dict(SIZES[name], **(size or {}))
    model = LlamaForCausalLM(llama_config(tok, **shape)) if init is None else LlamaForCausalLM.from_pretrained(init)
    if lr is not None:
        cfg_t["lr"] = lr
    model.generation_config.eos_token_id = tok.eos_token_id
    opt = torch.optim.AdamW(model.parameters(), lr=cfg_t["lr"], weight_decay=0.01, betas=(0.9, 0.98))
    tag = tag or name
    out = BUILTIN / f"toy-{tag}"
    evals = eval_problems()
    entry = {"params": n_params(model), "size": shape, "train": cfg_t, "curve": []}
    step0 = 0
    if init is not None:
        old = json.loads(LOG.read_text()).get(tag, {}) if LOG.is_file() else {}
        entry = dict(old, params=n_params(model), size=shape, curve=list(old.get("curve", [])),
                     stages=old.get("stages", [old.get("train")]) + [dict(cfg_t, init=str(init))])
        step0 = entry["curve"][-1]["step"] if entry["curve"] else 0
        t_before = old.get("train_seconds", 0.0)
        best = old.get("greedy_acc", -1.0)
    log[tag] = entry
    rng = random.Random(1000 + cfg_t["seed"] + 7919 * step0)  # a continuation draws fresh problems
    if init is None:
        best, t_before = -1.0, 0.0
    since_best, t0, losses = 0, time.perf_counter() - t_before, []
    tmp = Path(tempfile.mkdtemp(prefix=f"toy-{name}-"))
    for step in range(cfg_t["steps"]):
        for g in opt.param_groups:
            g["lr"] = _lr(step, cfg_t["steps"], cfg_t["lr"])
        ids, labels, mask = policy_batch(rng, tok, cfg_t["batch"])
        losses.append(_optimizer_step(model, opt, model(input_ids=ids, attention_mask=mask, labels=labels).loss))
        if (step + 1) % cfg_t["eval_every"] == 0 or step + 1 == cfg_t["steps"]:
            model.eval()
            save(model, tok, tmp)
            acc = greedy_accuracy(tmp, evals)
            model.train()
            point = {"step": step0 + step + 1, "loss": sum(losses[-50:]) / len(losses[-50:]), "greedy_acc": acc,
                     "seconds": round(time.perf_counter() - t0, 1)}
            entry["curve"].append(point)
            print(f"[{tag}] {point}", flush=True)
            if acc > best:
                best, since_best = acc, 0
                save(model, tok, out)
                entry.update(best_step=step0 + step + 1, greedy_acc=acc)
            else:
                since_best += 1
            entry["train_seconds"] = round(time.perf_counter() - t0, 1)
            write_log(log)
            if since_best >= cfg_t.get("patience", 10**9):
                print(f"[{name}] plateau: no gain in {since_best} evaluations", flush=True)
                break
    shutil.rmtree(tmp, ignore_errors=True)
    entry["train_seconds"] = round(time.perf_counter() - t0, 1)
    write_log(log)
    return out


# --- PRM ----------------------------------------------------------------------------------------
def sample_solutions(policy: Path, problems, n: int, temperature: float = 1.0, seed: int = 0):
    """n samples per problem from a policy, split into steps: [(problem, steps)]."""
    from ttc_fast.engine import Engine
    from ttc_fast.loader import load_model
    from ttc_fast.sampling import SamplingParams
    from ttc_fast.prompts import encode_prompt
    from ttc_fast.search import split_steps

    engine = Engine(load_model(str(policy), device="cpu"))
    prompts = [encode_prompt(p.question, engine.tokenizer, "") for p in problems]
    outs = engine.generate(prompts, SamplingParams(temperature=temperature, max_tokens=160, n=n, seed=seed))
    return [(p, [s.strip() for s in split_steps(c.text, "\n\n")]) for o, p in zip(outs, problems) for c in o.outputs]


def prm_row(tok, question, steps, labels, sep="\n"):
    """Token ids of the math-shepherd text (segment by segment, as load_prm builds them), the
    tag positions, their labels, and (position, label) pairs for the tokens of each step's
    arithmetic (`expression_labels`)."""
    ids = list(tok(question)["input_ids"])
    tag = tok(" ки", add_special_tokens=False)["input_ids"]
    chain = solve(question)
    answer = final_value(question, chain)
    pos, dense, ok_before = [], [], True
    for k, s in enumerate(steps):
        text = (" " if k == 0 else sep) + s.strip()
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        for i, good in expression_labels(text, enc["offset_mapping"], chain, answer, k, ok_before):
            dense.append((len(ids) + i, good))
        ids += enc["input_ids"] + tag
        pos.append(len(ids) - 1)
        ok_before = ok_before and bool(labels[k])
    return ids, pos, list(labels), dense


def expression_labels(text, offsets, chain, answer, k, ok_before):
    """(token index, label) for the tokens of step k's "a op b = c." (or the answer's
    "\\boxed{v}."): 1 while the text so far can still become the right step, 0 from the first
    character that cannot (and everywhere after an earlier wrong step). A slip is then marked at
    the digit where it is written, where the PRM can compare it with the digit it expects, not
    only at the step's tag. Steps not in the expected form get none."""
    if k < len(chain):
        a, sym, b, c = chain[k]
        at, right = text.find(", so "), f" {a} {sym} {b} = {c}."
        at = at + 4 if at >= 0 else -1
    elif k == len(chain):
        at, right = text.find(" \\boxed{"), f" \\boxed{{{answer}}}."
    else:
        return []
    if at < 0:
        return []
    out, good = [], ok_before
    for i, (lo, hi) in enumerate(offsets):
        if hi <= at:
            continue
        good = good and right.startswith(text[at:hi])
        out.append((i, int(good)))
    return out


def expression_targets(rows):
    """(row, position) tensors of the arithmetic tokens that keep a step right (label 1 in
    `expression_labels`, after the first): each is a next-token target from the position before."""
    pairs = [(i, p) for i, r in enumerate(rows) for p, good in r[3] if good and p > 0]
    return (torch.tensor([i for i, _ in pairs], dtype=torch.long), torch.tensor([p for _, p in pairs], dtype=torch.long))


def policy_view(tok, question, steps):
    """Token ids of a (partial) solution in the policies' format, BOS + question + "\n\n" +
    steps joined by "\n\n" (`policy_row` without its EOS), and where each step's tokens end."""
    ids = list(tok(question + "\n\n")["input_ids"])
    ends = []
    for k, step in enumerate(steps):
        ids += tok(step.strip(), add_special_tokens=False)["input_ids"]
        ends.append(len(ids))
        if k + 1 < len(steps):
            ids += tok("\n\n", add_special_tokens=False)["input_ids"]
    return ids, ends


def teacher_view(tok, question, steps, row):
    """Policy L's view of a `prm_row` row, for distilling L's arithmetic into the PRM: the same
    question and steps in the policies' format (BOS + question + "\n\n" + steps joined by
    "\n\n"), and, for every arithmetic token of the row (`expression_labels`, right or not),
    the position predicting it in the PRM row and in L's row. A step's tokens are the same in
    both formats from its second token on (word-level pieces; only its first piece may carry the
    format's leading space), so positions are matched from each step's end."""
    ids, tags, _, dense = row
    tag_len = len(tok(" ки", add_special_tokens=False)["input_ids"])
    policy, ends = policy_view(tok, question, steps)
    student, teacher, k = [], [], 0
    for p, _ in dense:
        while tags[k] < p:
            k += 1
        q = ends[k] - (tags[k] - tag_len + 1 - p)
        if ids[p] != policy[q]:
            raise RuntimeError(f"teacher_view: token {p} of the PRM row does not match token {q} of L's row")
        student.append(p - 1)
        teacher.append(q - 1)
    return policy, student, teacher


def auc(scores, labels) -> float:
    pairs = sorted(zip(scores, labels))
    pos = sum(labels)
    neg = len(labels) - pos
    if not pos or not neg:
        return float("nan")
    rank_sum, i = 0.0, 0
    while i < len(pairs):
        j = i
        while j < len(pairs) and pairs[j][0] == pairs[i][0]:
            j += 1
        avg_rank = (i + j + 1) / 2
        rank_sum += avg_rank * sum(l for _, l in pairs[i:j])
        i = j
    return (rank_sum - pos * (pos + 1) / 2) / (pos * neg)


def prm_data(policy: Path, n_problems: int, per_problem: int, seed: int, temperature: float = 1.0):
    """S's own samples (`per_problem` for each of `n_problems` fresh problems), with their labels."""
    rng = random.Random(seed)
    problems = [_fresh_problem(rng, f"prm-{i}") for i in range(n_problems)]
    samples = sample_solutions(policy, problems, per_problem, temperature=temperature, seed=seed)
    return [(p.question, steps, prefix_labels(p.question, steps)) for p, steps in samples if steps]


def contrast_pair(rng: random.Random):
    """A fresh problem's reference solution and the same solution with one slip, both cut after
    the same step at or past the slip, with their labels: the PRM sees the right step and the
    slipped one side by side, so it must check the arithmetic to tell them apart."""
    p = _fresh_problem(rng)
    bad = slipped(rng, p)
    good = p.meta["steps"][: len(bad)]
    return [(p.question, s, prefix_labels(p.question, s)) for s in (good, bad)]


def mended_step(question, steps, k):
    """Step k of `steps` (its first wrong step) with the right arithmetic: its text before ", so "
    kept, the right "a op b = c." after it (or the right answer step); None when it has no such
    place to mend."""
    chain = solve(question)
    if k < len(chain):
        at = steps[k].find(", so ")
        if at < 0:
            return None
        a, sym, b, c = chain[k]
        return f"{steps[k][:at]}, so {a} {sym} {b} = {c}."
    if k == len(chain):
        return f"The answer is \\boxed{{{final_value(question, chain)}}}."
    return None


def own_slip_pairs(data):
    """From S's labelled samples: each first wrong step, cut there, paired with the same solution
    whose wrong step is mended (`mended_step`).
    S's own slips sit where S and the PRM find arithmetic hard (a carry into the tens, mostly),
    unlike synthetic slips at random digits; the pair teaches the verdict on exactly those."""
    pairs = []
    for q, steps, labels in data:
        if all(labels):
            continue
        k = labels.index(0)
        pair = mended_pair(q, steps[: k + 1], labels[: k + 1])
        if pair is not None:
            pairs.append(pair)
    return pairs


def mended_pair(question, steps, labels):
    """[(right solution, labels), (slipped, labels)] for steps whose last step is the first wrong
    one, the right one being the same steps with the last mended; None when it cannot be mended."""
    mended = mended_step(question, steps, len(steps) - 1)
    if mended is None:
        return None
    right = steps[:-1] + [mended]
    right_labels = prefix_labels(question, right)
    return [(question, right, right_labels), (question, steps, labels)] if all(right_labels) else None


def step_candidates(policy: Path, n_problems: int, k: int, seed: int, temperature: float = TEMPERATURE):
    """The siblings a search ranks: for `n_problems` fresh problems, a right partial solution (the
    reference cut before a random step) and `k` samples of the policy's next step from it, at
    `temperature` (default the toy job's): [(question, prefix, [candidate steps])]."""
    from ttc_fast.engine import Engine
    from ttc_fast.loader import load_model
    from ttc_fast.sampling import SamplingParams
    from ttc_fast.toy.evaluate import STEP_TOKENS

    rng = random.Random(seed)
    problems = [_fresh_problem(rng, f"hard-{i}") for i in range(n_problems)]
    prefixes = [p.meta["steps"][: rng.randrange(len(p.meta["steps"]))] for p in problems]
    engine = Engine(load_model(str(policy), device="cpu"))
    # The toy tokenizer has no chat template: the prompt is the question and a blank line.
    prompts = [p.question + "\n\n" + "".join(s + "\n\n" for s in pre)
               for p, pre in zip(problems, prefixes)]
    outs = engine.generate(prompts, SamplingParams(temperature=temperature, max_tokens=STEP_TOKENS, n=k, seed=seed,
                                                   stop=("\n\n",)))
    return [(p.question, pre, [c.text.strip() for c in o.outputs if c.text.strip()])
            for p, pre, o in zip(problems, prefixes, outs)]


def search_hard_pairs(candidates, p_good, floor: float = 0.5):
    """The search's own hard cases: each distinct wrong candidate step that `p_good` (scores of a
    list of (question, steps) at their last step) ranks at or above its best right sibling, or
    above `floor` when it has none, paired with the same step mended (`mended_pair`). A search
    keeps exactly these over the right step; S writes its likeliest slips in many candidates,
    so one such verdict fills the beams."""
    pairs = []
    for q, prefix, steps in candidates:
        distinct = sorted(set(steps))
        labels = [prefix_labels(q, prefix + [s]) for s in distinct]
        scores = p_good([(q, prefix + [s]) for s in distinct])
        right = [sc for sc, l in zip(scores, labels) if l[-1]]
        bar = max(right) if right else floor
        for s, l, sc in zip(distinct, labels, scores):
            if not l[-1] and sc >= bar:
                pair = mended_pair(q, prefix + [s], l)
                if pair is not None:
                    pairs.append(pair)
    return pairs


def pruning_candidates(prm_path: Path, n_problems: int, n: int, seed: int, temperature: float = TEMPERATURE,
                       final_picks: bool = False):
    """The choices beam search itself makes: S searches `n_problems` fresh problems (beam search,
    N = `n`, width 4, the toy job's settings) with the PRM at `prm_path`, and every pruning that
    drops candidates is recorded: [(question, [(steps, aggregated score)] of every live candidate)].
    Unlike one prefix's siblings (`step_candidates`), a pruning also weighs other beams' paths,
    including those an earlier slip has already made wrong. With `final_picks`, each problem's
    finished paths are recorded as one more decision, where a right solution, once found, can
    still be lost. A proxy: the toy job picks by weighted score (the answer whose paths' scores
    sum highest), and a pair here only says a wrong path scored at or above the best right one.
    Returns (decisions, how often the best-scored finished path's answer is right)."""
    from ttc_fast.sampling import SamplingParams
    from ttc_fast.search import SearchObserver, TreeSearch
    from ttc_fast.strategies import BeamSearch
    from ttc_fast.toy.evaluate import ITERATIONS, STEP_TOKENS, policy_s, toy_prm

    class Recording(SearchObserver):
        """Every top-k pruning with more live candidates than beams kept (a problem that has n
        finished paths stops without one)."""

        def on_prune(self, state, children, kept):
            strategy = state.strategy
            live = [p for p in children if not p.done]
            if len(live) > strategy.keep and len(state.completed) < strategy.n:
                decisions.append(_decision(state.problem.question, [(p.steps, p.score(strategy.aggregation)) for p in live]))

    decisions: list = []
    rng = random.Random(seed)
    # levels 1 and 2 gave almost no hard cases: S rarely slips there
    problems = [_fresh_problem(rng, f"prune-{i}", lowest_level=3) for i in range(n_problems)]
    engine, prm = policy_s("cpu"), toy_prm(prm_path, "cpu")
    sampling = SamplingParams(temperature=temperature, top_p=1.0, max_tokens=STEP_TOKENS, seed=seed)
    right = 0
    search = TreeSearch(engine, prm, BeamSearch(n=n, width=4, iterations=ITERATIONS), sampling, observer=Recording())
    for result in search.run(problems):
        right += result.correct[n]["naive"]
        decision = final_pick(result) if final_picks else None
        if decision is not None:
            decisions.append(decision)
    return decisions, right / len(problems)


def final_pick(result):
    """A search result's finished paths as a decision (question, [(steps, aggregated score)]), or
    None when they are all one path (beam search often returns n copies of its best path)."""
    if len({tuple(c.steps) for c in result.completions}) < 2:
        return None
    return _decision(result.question, [(c.steps, c.score) for c in result.completions])


def _decision(question, paths):
    """A recorded decision: (question, [(stripped steps, aggregated score)] of its paths)."""
    return question, [([s.strip() for s in steps], score) for steps, score in paths]


def pruning_hard_pairs(decisions):
    """The hard cases of recorded prunings (`pruning_candidates`): each distinct wrong candidate
    path scored at or above the best right one of its pruning, paired with that right path (both
    labelled step by step, `prefix_labels`). The wrong path may have slipped steps before its
    last: a score read at the last step must carry that slip along."""
    pairs, seen = [], set()
    for q, cands in decisions:
        distinct = {tuple(steps): score for steps, score in cands}
        labelled = [(list(steps), prefix_labels(q, list(steps)), score) for steps, score in distinct.items()]
        right = [c for c in labelled if c[1][-1]]
        if not right:
            continue
        best_right = max(right, key=lambda c: c[2])
        for steps, labels, score in labelled:
            if not labels[-1] and score >= best_right[2] and (q, tuple(steps)) not in seen:
                seen.add((q, tuple(steps)))
                pairs.append([(q, best_right[0], best_right[1]), (q, steps, labels)])
    return pairs


def _wrong_result(rng: random.Random, c: int) -> int:
    """c with one digit moved by 1 to 3 (S's own slips: a wrong units or tens digit, mostly)."""
    while True:
        place = 10 ** rng.randrange(len(str(c)))
        wrong = c + rng.choice([-3, -2, -1, 1, 2, 3]) * place
        if wrong >= 0:
            return wrong


def slipped(rng: random.Random, problem) -> list[str]:
    """The reference solution with one wrong step (a wrong result, operand or running value),
    continued from the wrong value with right arithmetic, cut after a random step at or past it."""
    chain = solve(problem.question)
    phrases = [s.split(", so ")[0] for s in problem.meta["steps"][:-1]]
    k = rng.randrange(len(chain))
    a, sym, b, c = chain[k]
    delta = rng.choice([-10, -2, -1, 1, 2, 10])
    what = rng.random()
    if what < 0.8 or sym == "/" or (sym == "-" and a - b - abs(delta) < 0):
        c = _wrong_result(rng, c)  # wrong result: all of S's own slips are of this kind
    elif what < 0.9:
        b = b + delta if b + delta >= 2 else b + abs(delta)  # wrong operand
        c = _APPLY[sym](a, b)
    else:
        a = a + delta if a + delta >= 2 else a + abs(delta)  # wrong running value
        c = _APPLY[sym](a, b)
    steps = list(problem.meta["steps"][:k]) + [f"{phrases[k]}, so {a} {sym} {b} = {c}."]
    value = c
    for _, sym_next, b_next, _ in chain[k + 1:]:
        if (sym_next == "/" and value % b_next) or (sym_next == "-" and value < b_next):
            break
        new = _APPLY[sym_next](value, b_next)
        steps.append(f"{phrases[len(steps)]}, so {value} {sym_next} {b_next} = {new}.")
        value = new
    else:
        steps.append(f"The answer is \\boxed{{{value}}}.")
    return steps[: rng.randint(k + 1, len(steps))]


def deepened(path: Path, extra: int):
    """The checkpoint at `path` with `extra` decoder layers on top, each starting as the identity
    (zero output projections), so training starts from the policy's own predictions. Checking a
    result digit means comparing the digit the policy predicts with the one written, a step
    after the prediction is made: the extra layers give the PRM room for that comparison."""
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(str(path))
    config = base.config
    config.num_hidden_layers += extra
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    new = {f"model.layers.{i}." for i in range(config.num_hidden_layers - extra, config.num_hidden_layers)}
    if unexpected or any(not any(k.startswith(n) for n in new) for k in missing):
        raise RuntimeError(f"deepening {path}: unexpected {unexpected}, missing {missing}")
    with torch.no_grad():
        for layer in model.model.layers[-extra:]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    return model


def train_prm(log: dict, threads: int = 1, steps: int | None = None, init: str | None = None,
              lr: float | None = None, dense_weight: float | None = None, expr_lm_weight: float | None = None,
              deepen: int = 0, pairs: int | None = None, own_pairs: int | None = None,
              distil_weight: float | None = None, hard_pairs: int | None = None, select: str | None = None,
              temperature: float | None = None, prune_pairs: int | None = None,
              prune_temperatures: tuple[float, ...] | None = None, prune_final: bool | None = None,
              prune_problems: int | None = None, checkpoints: str | None = None) -> Path:
    """Fine-tune policy L, deepened by `extra_layers`, into the math-shepherd PRM; `init`
    continues from a saved PRM on freshly sampled solutions (the log keeps its curve, steps count
    on from it, and the checkpoint is only replaced by a better one on S's held-out own slips,
    or on held-out siblings with `select="siblings"`),
    with `deepen` more identity-initialised layers on top when asked. `distil_weight` adds the
    KL divergence from policy L's next-token distribution (in its own format, `teacher_view`) to
    the PRM's at every arithmetic token of every row. `hard_pairs` per batch come from the
    search's own hard cases (`search_hard_pairs`), mined again with the current PRM at every
    evaluation; such a stage keeps the checkpoint that best picks a right step among held-out
    siblings (`select="siblings"`). `temperature` is that of the searches the PRM is trained for:
    S samples its solutions, slips and next steps at it, for training and for the held-out
    measures that pick the checkpoint. `prune_pairs` per batch come from beam search's own
    prunings with the current PRM (`pruning_hard_pairs`), mined at every evaluation, each round
    at the next of `prune_temperatures` (default: the stage's temperature), on `prune_problems`
    fresh problems (default 200); with `prune_final`, the final picks among finished paths are
    mined too. `checkpoints`: a folder that keeps every
    evaluated checkpoint (step-N/), to be compared afterwards by search on the development set."""
    from transformers import LlamaForCausalLM

    torch.set_num_threads(threads)
    cfg_t = {k: v for k, v in TRAIN["prm"].items() if k != "then"}
    cfg_t.update({k: v for k, v in (("steps", steps), ("lr", lr), ("dense_weight", dense_weight),
                                    ("expr_lm_weight", expr_lm_weight), ("deepen", deepen or None),
                                    ("pairs", pairs), ("own_pairs", own_pairs), ("distil_weight", distil_weight),
                                    ("hard_pairs", hard_pairs), ("select", select), ("temperature", temperature),
                                    ("prune_pairs", prune_pairs), ("prune_final", prune_final),
                                    ("prune_problems", prune_problems),
                                    ("prune_temperatures", list(prune_temperatures) if prune_temperatures else None))
                  if v is not None})
    old = json.loads(LOG.read_text()).get("prm", {}) if init is not None and LOG.is_file() else {}
    step0 = old["curve"][-1]["step"] if old.get("curve") else 0
    seed = cfg_t["seed"] + 7919 * step0  # a continuation samples other problems and pairs
    torch.manual_seed(seed)
    t0 = time.perf_counter() - old.get("train_seconds", 0.0)
    t_data0 = time.perf_counter()
    tok = build_tokenizer()
    per, half = 4, cfg_t["samples"] // 8
    search_t = cfg_t["temperature"]
    # S's samples at the search's temperature and at 1 (more varied slips)
    data = (prm_data(BUILTIN / "toy-policy-s", half, per, seed=seed, temperature=search_t)
            + prm_data(BUILTIN / "toy-policy-s", half, per, seed=seed + 1, temperature=1.0))
    held = prm_data(BUILTIN / "toy-policy-s", 200, per, seed=cfg_t["seed"] + 100)
    t_data = time.perf_counter() - t_data0
    n_lab = [l for _, _, ls in data for l in ls]
    print(f"[prm] {len(data)} solutions, {len(n_lab)} steps, {sum(n_lab) / len(n_lab):.2f} good; sampled in {t_data:.0f}s", flush=True)
    if init is None:
        model = deepened(BUILTIN / "toy-policy-l", cfg_t["extra_layers"])
    else:
        model = deepened(Path(init), deepen) if deepen else LlamaForCausalLM.from_pretrained(init)
    good, bad = tok.convert_tokens_to_ids("+"), tok.convert_tokens_to_ids("-")
    distil = cfg_t.get("distil_weight", 0.0)
    teacher = LlamaForCausalLM.from_pretrained(str(BUILTIN / "toy-policy-l")).eval() if distil else None

    def row_of(q, s, l):
        """A `prm_row` row, with L's view of it (`teacher_view`) when distilling."""
        row = prm_row(tok, q, s, l)
        return row + (teacher_view(tok, q, s, row),) if distil else row

    rows = [row_of(q, s, l) for q, s, l in data]
    held_rows = [prm_row(tok, q, s, l) for q, s, l in held]
    held_rng = random.Random(cfg_t["seed"] + 200)
    held_pairs = [[prm_row(tok, q, s, l) for q, s, l in contrast_pair(held_rng)] for _ in range(200)]
    own_pairs = [[row_of(q, s, l) for q, s, l in pair] for pair in own_slip_pairs(data)]
    # S's own first slips at the search's temperature, mended: the steps a search must judge
    held_own = own_slip_pairs(prm_data(BUILTIN / "toy-policy-s", 500, per, seed=cfg_t["seed"] + 300,
                                       temperature=search_t))
    held_own_pairs = [[prm_row(tok, q, s, l) for q, s, l in pair] for pair in held_own]
    # S's distinct next steps from right partial solutions of held-out problems, kept where some
    # are right and some wrong: the choices a search makes
    held_siblings = []
    for q, pre, cands in step_candidates(BUILTIN / "toy-policy-s", 2000, 16, seed=cfg_t["seed"] + 400,
                                         temperature=search_t):
        group = [prm_row(tok, q, pre + [c], prefix_labels(q, pre + [c])) for c in sorted(set(cands))]
        if len({r[2][-1] for r in group}) == 2:
            held_siblings.append(group)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg_t["lr"], weight_decay=0.01)
    rng = random.Random(seed)
    data_stats = {"data_seconds": round(t_data, 1), "train_solutions": len(data), "train_steps_labelled": len(n_lab),
                  "train_good_fraction": round(sum(n_lab) / len(n_lab), 3)}
    if init is None:
        entry = {"params": n_params(model), "init": f"toy-policy-l + {cfg_t['extra_layers']} layers", "train": cfg_t,
                 **data_stats, "curve": []}
    else:
        entry = dict(old, curve=list(old.get("curve", [])),
                     stages=old.get("stages", [old.get("train")]) + [dict(cfg_t, init=str(init), **data_stats)])
        entry["params"] = n_params(model)  # grows when a stage deepens the PRM
    log["prm"] = entry

    def forward(batch_rows):
        """Padded ids, attention mask and logits of a batch of `prm_row` rows."""
        ids, _, mask = _pad([(r[0], r[0]) for r in batch_rows], tok.pad_token_id)
        return ids, mask, model(input_ids=ids, attention_mask=mask).logits

    def tag_logits(batch_rows, logits):
        """The "+"/"-" logits at every step tag of the batch."""
        bi = torch.tensor([i for i, r in enumerate(batch_rows) for _ in r[1]])
        pi = torch.tensor([p for r in batch_rows for p in r[1]])
        return logits[bi, pi][:, [good, bad]]

    def scores_of(batch_rows, with_lm=False):
        ids, mask, logits = forward(batch_rows)
        pair = tag_logits(batch_rows, logits)
        y = torch.tensor([1 - l for r in batch_rows for l in r[2]])  # class 0 = "+"
        if not with_lm:
            return pair, y
        # Next-token loss on the fully right solutions: keeps the arithmetic L learnt as a policy,
        # which checking a step's result needs (without it the verdict head forgets it).
        right = [i for i, r in enumerate(batch_rows) if all(r[2])]
        lm = logits.new_zeros(())
        if right:
            targets = ids[right, 1:].masked_fill(mask[right, 1:] == 0, -100)
            lm = torch.nn.functional.cross_entropy(logits[right, :-1].flatten(0, 1).float(), targets.flatten())
        # the same "+"/"-" verdict at every token of each step's arithmetic (expression_labels)
        di = torch.tensor([i for i, r in enumerate(batch_rows) for _ in r[3]], dtype=torch.long)
        dp = torch.tensor([p for r in batch_rows for p, _ in r[3]], dtype=torch.long)
        dy = torch.tensor([1 - g for r in batch_rows for _, g in r[3]], dtype=torch.long)
        dense = (torch.nn.functional.cross_entropy(logits[di, dp][:, [good, bad]].float(), dy)
                 if len(dy) else logits.new_zeros(()))
        # Next-token loss on the right steps' arithmetic only ("a op b = c." tokens that are still
        # right): a verdict on a digit can only be as good as the PRM's own prediction of it, and
        # the whole-text loss above, mostly easy words, let that prediction decay from L's.
        ri, rp = expression_targets(batch_rows)
        expr = (torch.nn.functional.cross_entropy(logits[ri, rp - 1].float(), ids[ri, rp])
                if len(rp) else logits.new_zeros(()))
        return pair, y, lm, dense, expr, logits

    def distil_loss(batch_rows, logits):
        """KL(L || PRM) of the next-token distributions at every arithmetic token: L predicts the
        digits a verdict must check far better than the PRM's own LM (99.2% against 97.4% of
        result digits), including after a slip, where the right-steps loss has no target."""
        views = [r[4] for r in batch_rows]
        bi = torch.tensor([i for i, v in enumerate(views) for _ in v[1]], dtype=torch.long)
        if not len(bi):
            return logits.new_zeros(())
        ids, _, mask = _pad([(v[0], v[0]) for v in views], tok.pad_token_id)
        with torch.no_grad():
            target = teacher(input_ids=ids, attention_mask=mask).logits
        sp = torch.tensor([p for v in views for p in v[1]], dtype=torch.long)
        tp = torch.tensor([p for v in views for p in v[2]], dtype=torch.long)
        return torch.nn.functional.kl_div(logits[bi, sp].float().log_softmax(-1), target[bi, tp].float().log_softmax(-1),
                                          log_target=True, reduction="batchmean")

    def p_good(batch_rows):
        return scores_of(batch_rows)[0].softmax(-1)[:, 0].tolist()

    def last_scores(rows_):
        """P(good) at the last tag of each row (the verdict a search reads), in eval mode."""
        was = model.training
        model.eval()
        out = []
        with torch.no_grad():
            for i in range(0, len(rows_), 64):
                chunk = rows_[i: i + 64]
                ends = torch.tensor([r[1][-1] for r in chunk])
                _, _, logits = forward(chunk)
                out += logits[torch.arange(len(chunk)), ends][:, [good, bad]].float().softmax(-1)[:, 0].tolist()
        model.train(was)
        return out

    def sibling_top1():
        """Of held-out right partial solutions whose sampled next steps are partly right, partly
        wrong: how often the best-scored distinct candidate is a right one."""
        flat = last_scores([r for group in held_siblings for r in group])
        hits, at = 0, 0
        for group in held_siblings:
            scores = flat[at: at + len(group)]
            at += len(group)
            hits += group[max(range(len(group)), key=scores.__getitem__)][2][-1]
        return hits / max(1, len(held_siblings))

    hard_n = cfg_t.get("hard_pairs", 0)
    hard_pool: list = []

    def mine_hard(round_: int) -> None:
        """Add the current PRM's hard cases on fresh problems to the pool (`search_hard_pairs`)."""
        t_mine = time.perf_counter()
        cands = step_candidates(BUILTIN / "toy-policy-s", cfg_t.get("hard_problems", 6000), 16,
                                seed=seed + 104729 * (round_ + 1), temperature=search_t)
        found = search_hard_pairs(cands, lambda items: last_scores([prm_row(tok, q, st, prefix_labels(q, st))
                                                                     for q, st in items]))
        hard_pool.extend([row_of(q, s, l) for q, s, l in pair] for pair in found)
        print(f"[prm] mined {len(found)} hard pairs (pool {len(hard_pool)}) in {time.perf_counter() - t_mine:.0f}s",
              flush=True)

    prune_n = cfg_t.get("prune_pairs", 0)
    prune_pool: list = []

    def mine_prunings(round_: int) -> None:
        """Add the hard cases of beam search's own prunings with the current PRM (saved for the
        engine to load) on fresh problems to their pool (`pruning_hard_pairs`)."""
        t_mine = time.perf_counter()
        temps = cfg_t.get("prune_temperatures") or [search_t]
        temperature_ = temps[round_ % len(temps)]
        with tempfile.TemporaryDirectory() as current:
            save(model, tok, Path(current))
            decisions, accuracy = pruning_candidates(Path(current), cfg_t.get("prune_problems", 200), 64,
                                                     seed=seed + 15485863 * (round_ + 1), temperature=temperature_,
                                                     final_picks=cfg_t.get("prune_final", False))
        found = pruning_hard_pairs(decisions)
        prune_pool.extend([row_of(q, s, l) for q, s, l in pair] for pair in found)
        # the accuracy is on other problems each round: a trace, too noisy to pick checkpoints by
        (entry["stages"][-1] if "stages" in entry else entry).setdefault("mining_search_accuracy", []).append(
            {"round": round_, "temperature": temperature_, "accuracy": round(accuracy, 3)})
        print(f"[prm] mined {len(found)} pruning pairs at T={temperature_} (pool {len(prune_pool)}) "
              f"from {len(decisions)} decisions in {time.perf_counter() - t_mine:.0f}s; "
              f"the search's best-scored path was right on {accuracy:.3f} of its problems", flush=True)

    def pair_metrics(pairs):
        """How often a (right, slipped) pair's right last step scores above the slipped one (a
        pair's tags are aligned step by step), and how many of the right rows' arithmetic tokens
        the PRM predicts."""
        wins, hits, total = 0, 0, 0
        for i in range(0, len(pairs), 32):
            chunk = pairs[i: i + 32]
            flat_rows = [r for pair in chunk for r in pair]
            ids, _, logits = forward(flat_rows)
            flat = tag_logits(flat_rows, logits).softmax(-1)[:, 0].tolist()
            at = 0
            for right_row, slip_row in chunk:
                n = len(right_row[1])
                wins += flat[at + n - 1] > flat[at + 2 * n - 1]
                at += 2 * n
            ri, rp = expression_targets([right_row for right_row, _ in chunk])
            ri = 2 * ri  # the right rows sit at the even places of flat_rows
            hits += int((logits[ri, rp - 1].argmax(-1) == ids[ri, rp]).sum())
            total += len(rp)
        return wins / max(1, len(pairs)), hits / max(1, total)

    def held_metrics():
        """AUC on S's held-out samples; held-out slip pairs (synthetic, and S's own mended) ranked
        right; how often the PRM predicts the right solutions' arithmetic tokens."""
        model.eval()
        s, y = [], []
        with torch.no_grad():
            for i in range(0, len(held_rows), 64):
                s += p_good(held_rows[i: i + 64])
                y += [l for r in held_rows[i: i + 64] for l in r[2]]
            slip, expr_acc = pair_metrics(held_pairs)
            own, _ = pair_metrics(held_own_pairs)
        model.train()
        return auc(s, y), sum(y) / len(y), slip, own, expr_acc, sibling_top1()

    # The step-level AUC saturated near 0.996 (its changes became noise): a checkpoint is kept
    # for ranking S's own held-out slips below their mended steps (AUC breaks ties), or, in the
    # hard-case stages, for picking a right step among held-out siblings (own slips break ties);
    # a continuation first measures the checkpoint it starts from.
    def rank(own, a, siblings):
        return (siblings, own) if cfg_t.get("select") == "siblings" else (own, a)

    best = (-1.0, -1.0)
    if init is not None:
        a, _, slip, own, expr_acc, sib = held_metrics()
        best = rank(own, a, sib)
        entry["stages"][-1]["start"] = {"heldout_auc": round(a, 4), "heldout_slip_pairs": round(slip, 3),
                                        "heldout_own_slip_pairs": round(own, 3), "heldout_arithmetic_tokens": round(expr_acc, 4),
                                        "heldout_sibling_top1": round(sib, 4)}
        print(f"[prm] start {entry['stages'][-1]['start']}", flush=True)
    if hard_n:
        mine_hard(0)
    if prune_n:
        mine_prunings(0)
    losses = []
    for step in range(cfg_t["steps"]):
        for g in opt.param_groups:
            g["lr"] = _lr(step, cfg_t["steps"], cfg_t["lr"], warmup=50)
        own_n, hard_k, prune_k = cfg_t.get("own_pairs", 0), min(hard_n, len(hard_pool)), min(prune_n, len(prune_pool))
        batch = rng.sample(rows, cfg_t["batch"] - 2 * cfg_t["pairs"] - 2 * own_n - 2 * hard_k - 2 * prune_k)
        for _ in range(cfg_t["pairs"]):
            batch += [row_of(q, s, l) for q, s, l in contrast_pair(rng)]
        for pair in rng.sample(own_pairs, own_n) + rng.sample(hard_pool, hard_k) + rng.sample(prune_pool, prune_k):
            batch += pair
        pair, y, lm, dense, expr, logits = scores_of(batch, with_lm=True)
        loss = (torch.nn.functional.cross_entropy(pair.float(), y) + cfg_t["lm_weight"] * lm
                + cfg_t.get("dense_weight", 0.0) * dense + cfg_t.get("expr_lm_weight", 0.0) * expr)
        if distil:
            loss = loss + distil * distil_loss(batch, logits)
        losses.append(_optimizer_step(model, opt, loss))
        if (step + 1) % cfg_t["eval_every"] == 0 or step + 1 == cfg_t["steps"]:
            a, frac, slip, own, expr_acc, sib = held_metrics()
            point = {"step": step0 + step + 1, "loss": sum(losses[-50:]) / len(losses[-50:]), "heldout_auc": round(a, 4),
                     "heldout_slip_pairs": round(slip, 3), "heldout_own_slip_pairs": round(own, 3),
                     "heldout_arithmetic_tokens": round(expr_acc, 4), "heldout_sibling_top1": round(sib, 4),
                     "seconds": round(time.perf_counter() - t0, 1)}
            entry["curve"].append(point)
            print(f"[prm] {point}", flush=True)
            if checkpoints:
                save(model, tok, Path(checkpoints) / f"step-{step0 + step + 1}")
            entry["train_seconds"] = round(time.perf_counter() - t0, 1)
            if rank(own, a, sib) >= best:  # the shipped checkpoint: the best by `rank`
                best = rank(own, a, sib)
                entry.update(best_step=step0 + step + 1, heldout_auc=round(a, 4), heldout_slip_pairs=round(slip, 3),
                             heldout_own_slip_pairs=round(own, 3),
                             heldout_steps=len([l for r in held_rows for l in r[2]]),
                             heldout_own_slip_pair_count=len(held_own_pairs), heldout_sibling_top1=round(sib, 4),
                             heldout_sibling_groups=len(held_siblings),
                             heldout_good_fraction=round(frac, 3))
                save(model, tok, BUILTIN / "toy-prm")
            write_log(log)
            if hard_n and step + 1 < cfg_t["steps"]:
                mine_hard((step + 1) // cfg_t["eval_every"])
            if prune_n and step + 1 < cfg_t["steps"]:
                mine_prunings((step + 1) // cfg_t["eval_every"])
    entry["train_seconds"] = round(time.perf_counter() - t0, 1)
    write_log(log)
    return BUILTIN / "toy-prm"


def evaluate(log: dict, threads: int = 1, n_search: int = 50) -> dict:
    """Greedy accuracy of S and L on the whole eval set (our Engine), and S + PRM-guided search
    (beam search n=16, width 4; best-of-16) against S greedy on the first n_search problems."""
    from ttc_fast import BeamSearch, BestOfN, Engine, load_model, load_prm
    from ttc_fast.sampling import SamplingParams

    torch.set_num_threads(threads)
    evals = eval_problems()
    entry = {"eval_problems": len(evals)}
    for name in ("policy-s", "policy-l"):
        t = time.perf_counter()
        entry[f"{name}_greedy_acc"] = greedy_accuracy(BUILTIN / f"toy-{name}", evals)
        entry[f"{name}_greedy_seconds"] = round(time.perf_counter() - t, 1)
    sub = evals[:n_search]
    entry["search_problems"] = len(sub)
    entry["policy-s_greedy_acc_subset"] = greedy_accuracy(BUILTIN / "toy-policy-s", sub)
    entry["policy-l_greedy_acc_subset"] = greedy_accuracy(BUILTIN / "toy-policy-l", sub)
    engine = Engine(load_model(str(BUILTIN / "toy-policy-s"), device="cpu"))
    from ttc_fast.toy.evaluate import TEMPERATURE  # the toy job's sampling temperature

    sampling = SamplingParams(temperature=TEMPERATURE, max_tokens=64, seed=0)
    whole = SamplingParams(temperature=TEMPERATURE, max_tokens=160, seed=0)
    from ttc_fast.toy.task import check_step as checker

    for label, prm in (("prm", load_prm(str(BUILTIN / "toy-prm"), kind="math-shepherd", device="cpu")),
                       ("checker", load_prm(checker))):
        for strat in (BeamSearch(n=16, width=4, iterations=10), BestOfN(n=16)):
            t = time.perf_counter()
            # beam search: max_tokens bounds one step; best-of-N samples whole solutions
            res = engine.search(sub, strat, sampling if strat.name == "BeamSearch" else whole, prm=prm)
            key = f"s+{strat.name}16+{label}"
            entry[key] = {k: sum(bool(r.correct.get(16, {}).get(k)) for r in res) / len(res)
                          for k in ("naive", "weighted", "maj")}
            entry[key]["seconds"] = round(time.perf_counter() - t, 1)
            print(f"[eval] {key}: {entry[key]}", flush=True)
    print(f"[eval] {entry}", flush=True)
    log["eval"] = entry
    write_log(log)
    return entry


def write_log(log: dict) -> None:
    LOG.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(LOG.read_text()) if LOG.is_file() else {}
    old.update(log)
    LOG.write_text(json.dumps(old, indent=1) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["all", "policy-s", "policy-l", "policy-m", "prm", "eval"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=None, help="override the step budget (smoke tests)")
    ap.add_argument("--hidden", type=int, default=None, help="override a policy's width (size sweeps)")
    ap.add_argument("--inter", type=int, default=None, help="override a policy's MLP width (size sweeps)")
    ap.add_argument("--init", default=None, help="continue a policy or the PRM from this checkpoint directory")
    ap.add_argument("--lr", type=float, default=None, help="override the peak learning rate")
    ap.add_argument("--dense-weight", type=float, default=None, help="PRM: weight of the per-token arithmetic loss")
    ap.add_argument("--expr-lm-weight", type=float, default=None,
                    help="PRM: weight of the next-token loss on the right steps' arithmetic")
    ap.add_argument("--pairs", type=int, default=None, help="PRM: synthetic slip pairs per batch (contrast_pair)")
    ap.add_argument("--own-pairs", type=int, default=None,
                    help="PRM: S's own first slips, paired with the mended step, per batch (own_slip_pairs)")
    ap.add_argument("--distil-weight", type=float, default=None,
                    help="PRM: weight of the KL from policy L's next-token distribution at the arithmetic tokens")
    ap.add_argument("--hard-pairs", type=int, default=None,
                    help="PRM: the search's own hard cases (search_hard_pairs), mined at every evaluation, per batch")
    ap.add_argument("--select", choices=["own_slips", "siblings"], default=None,
                    help="PRM: keep the checkpoint best on held-out own slips or on picking a right sibling step")
    ap.add_argument("--temperature", type=float, default=None,
                    help="PRM: the search temperature to train for (S's samples, slips and next steps; default 0.4)")
    ap.add_argument("--prune-pairs", type=int, default=None,
                    help="PRM: hard cases of beam search's own prunings (pruning_hard_pairs), mined at every evaluation, per batch")
    ap.add_argument("--prune-temperatures", type=float, nargs="+", default=None,
                    help="PRM: the temperatures the pruning mining rounds take in turn (default: --temperature)")
    ap.add_argument("--prune-final", action="store_true", default=None,
                    help="PRM: with --prune-pairs, also mine beam search's final pick among its finished paths")
    ap.add_argument("--prune-problems", type=int, default=None,
                    help="PRM: with --prune-pairs, fresh problems each pruning mining round searches (default 200)")
    ap.add_argument("--checkpoints", default=None,
                    help="PRM: also save every evaluated checkpoint under this folder (step-N/)")
    ap.add_argument("--deepen", type=int, default=0,
                    help="PRM with --init: add this many identity-initialised decoder layers on top first")
    ap.add_argument("--tag", default=None, help="write toy-TAG instead of toy-NAME (size sweeps)")
    args = ap.parse_args(argv)
    log: dict = {}
    policies = ["policy-s", "policy-l"] if args.what == "all" else [args.what] if args.what.startswith("policy") else []
    for name in policies:
        size = {k: v for k, v in (("hidden", args.hidden), ("inter", args.inter)) if v is not None}
        out = train_policy(name, log, steps=args.steps, threads=args.threads, size=size, tag=args.tag,
                           init=args.init, lr=args.lr)
        stage = TRAIN[name].get("then")
        if stage and args.init is None and args.steps is None:
            train_policy(name, log, steps=stage["steps"], threads=args.threads, size=size, tag=args.tag, init=str(out),
                         lr=stage["lr"])
    if args.what in ("all", "prm"):
        out = train_prm(log, threads=args.threads, steps=args.steps, init=args.init, lr=args.lr,
                        dense_weight=args.dense_weight, expr_lm_weight=args.expr_lm_weight, deepen=args.deepen,
                        pairs=args.pairs, own_pairs=args.own_pairs, distil_weight=args.distil_weight,
                        hard_pairs=args.hard_pairs, select=args.select, temperature=args.temperature,
                        prune_pairs=args.prune_pairs, prune_temperatures=args.prune_temperatures,
                        prune_final=args.prune_final, prune_problems=args.prune_problems,
                        checkpoints=args.checkpoints)
        if args.init is None and args.steps is None:
            for stage in TRAIN["prm"].get("then", []):
                train_prm(log, threads=args.threads, init=str(out), checkpoints=args.checkpoints, **stage)
    if args.what in ("all", "eval"):
        evaluate(log, threads=args.threads)


if __name__ == "__main__":
    main()
