"""Process reward models (PRMs): step scores for search, with a prefix-shared paged KV cache.

    prm = load_prm("path/to/Qwen2.5-Math-PRM-7B", kind="qwen-prm")
    h = prm.start(question)                 # question + format prefix, encoded once
    beams = prm.fork(h, 4); prm.free(h)
    scores = prm.score_steps(beams, steps)  # one new step per handle, ONE batched forward
    ...
    prm.free(b) for b in beams

A PRM owns its own `ModelRunner` (KV pool + block manager), separate from the policy's. A handle
is one partial solution: its sequence holds the token ids of the prefix segment and of every step
segment scored so far. `score_steps` appends to each handle only the new step's segment, for all
handles (of all problems) in one ragged forward (split into chunks of at most `max_batch_tokens`
tokens), and reads the score at that step's boundary position.

Tokenization is defined per segment, and `score_full` uses exactly the same segments, so the
cached and uncached paths see the same token ids:

    ids(question, steps) = prefix_ids(question) + step_ids(steps[0], 0) + step_ids(steps[1], 1) + ...

Each segment is tokenized on its own by the PRM's tokenizer (a SentencePiece tokenizer's dummy
prefix "▁" is not re-added at each segment: segments after the first are tokenized as a
continuation). Segments start where the whole text's tokenization splits anyway (after a special
token, or at a space or newline the pre-tokenizer splits at), so the ids are the ones the reference
code gets from tokenizing the whole text; the tests check this against re-implementations of each
reference on the test tokenizers and on SmolLM2's real one. Step texts are used as written (the
reference code does not strip them either). Formats (text of each segment; `|` marks the scored
token):

* "rlhflow" (RLHFlow/Llama3.1-8B-PRM-*): the checkpoint's chat template rendered over the
  conversation [user: question + " " + step0, assistant: "+", user: step1, assistant: "+", ...].
  prefix = template text up to and including the question; step k = (k == 0: " " | else: the
  user header) + step + end-of-turn + assistant header (its last token, "\n\n" for Llama 3, is
  scored) followed by the label segment "+" + end-of-turn (tokenized separately). A template that
  trims message content (Llama 3.1's) trims the steps the same way. Score =
  softmax(logits[[id("+"), id("-")]])[0] at the token before the "+" label, i.e. where the label
  would be generated ("logits[:, -3]" in the reference code); earlier steps are followed by "+".
* "math-shepherd" (peiyi9979/math-shepherd-mistral-7b-prm), two layouts (`layout=`):
  "model-card": text = question + " " + step0 + " ки" + "\n" + step1 + " ки" + ...; prefix =
  question (with the tokenizer's BOS); step k = (k == 0: " " | else "\n") + step + " ки", scored at
  its last token (the tag).
  "sal" (search-and-learn's reward_models.py): text = system prompt + "\n" + question + "\n" + " "
  + step0 + " ки" + "\n\n" + step1 + " ки" + ...; prefix = system prompt + "\n" + question + "\n"
  (with BOS); step k as above with "\n\n". `step_separator` overrides the layout's separator.
  Score = softmax(logits[[id("+"), id("-")]])[0] at the tag position.
* "qwen-prm" (Qwen/Qwen2.5-Math-PRM-7B/72B): chat template over [system: QWEN_PRM_SYSTEM, user:
  question, assistant: step0 + "<extra_0>" + step1 + "<extra_0>" + ...]. prefix = template text
  up to the assistant header's last special token; step 0 = the header's rest ("assistant\n") +
  step + "<extra_0>", step k = step + "<extra_0>" (scored). Score =
  softmax(score(h))[1] with score = Linear(h,h) -> ReLU -> Linear(h,2) on the final-norm hidden
  state h. The closing "<|im_end|>\n" follows the last tag and cannot change any score.
* "skywork" (Skywork/Skywork-o1-Open-PRM-Qwen-2.5-*), as the reference's prepare_input over the
  steps joined by "\n\n": prefix = bos_token + question + "\n" (tokenized with the tokenizer's
  special tokens); the solution split at "\n", empty pieces kept, each piece tokenized on its own
  and followed by the id of "\n": step k = (k > 0: the "\n" of the empty piece between two steps)
  + each line of the step, then "\n"; scored at the step's final "\n". (The reference also reads
  a reward at that empty piece's "\n", a position inside no step.) Score = sigmoid(v_head.summary(h)).

Outcome mode (kind="outcome" or "outcome:<kind>"): the partial solution is judged as a whole:
the text is the question plus its steps joined as one solution, with the format's scoring tag
once, at the end, and one score read there. Step k contributes a body, kept in the sequence, and
a tag that only probes its score (`_Format.outcome_ids(step, k) -> (body, tag, score offset)`;
each segment tokenized on its own, as above):

    ids(question, steps) = prefix_ids(question) + body(steps[0], 0) + ... + body(steps[n-1], n-1) + tag(n-1)

* "math-shepherd": question + " " + step0 + sep + step1 + ... + " ки" (sep: the layout's);
  body k = (k == 0: " " | else sep) + step, tag = " ки" (scored at "ки").
* "rlhflow": ONE user turn question + " " + step0 + "\n\n" + step1 ..., then end-of-turn +
  assistant header (the tag; scored at its last token, where the label would be generated); no
  "+" label turns. body k = (k == 0: " " | else "\n\n") + step.
* "qwen-prm": assistant content step0 + "\n\n" + step1 + ... + "<extra_0>" (the tag, scored);
  body k = (k == 0: "" | else "\n\n") + step.
* "skywork": no tags: body k = step k's segment of step mode, scored at its last "\n" (the same
  tokens and score as step mode).

A handle's cached sequence holds prefix + bodies only. `score_steps` appends every handle's new
body in one ragged forward (chunked, under pool pressure evicted and re-encoded exactly as in step
mode, a re-encoded handle getting prefix + bodies), then forks each handle's sequence (no KV copied
but a shared partial last block, copied on write), runs the tags on the forks in one more ragged
forward reading the score at the tag, and frees the forks. The cost over step mode: one more forward
per call and chunk (none for skywork, whose score is read in the first) and the tag tokens per row
(`stats["probe_tokens"]`, counted in `tokens_processed`); the pool room a call needs includes the
probes (a copied block + the tag's blocks per row). `full_ids` / `score_full` give prefix + all
bodies + the last step's tag and one score ([score]); the cached and uncached paths see the same
ids. `default_aggregation` is "last". For a callable it is called as fn(question, [joined]) with
the steps joined by `step_separator` ("\n\n"). kind="outcome" alone means a callable, or a
checkpoint whose architecture names its kind (Qwen2ForProcessRewardModel, Qwen2ForPrmModel).

A callable verifier: fn(question, steps) -> float (the latest step's score) or list[float] (one
per step; the last is taken in score_steps). No tokens, no KV cache.

Pool full: a search never fails for want of PRM blocks. When a call's new tokens do not fit,
`score_steps` evicts the KV of other handles, least recently scored first (an evicted handle
stays valid: its next call re-encodes its text, helped by the prefix cache; `stats["evictions"]`,
`stats["recomputed_tokens"]`); if the call's own rows still do not fit, it scores them in chunks,
evicting rows already scored. Only a single row longer than the whole pool raises
`PRMOutOfBlocks` (a subclass of `OutOfBlocks`), with nothing appended: build the PRM with a
larger `kv_cache_bytes`.
"""
from __future__ import annotations

import json
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .block_manager import OutOfBlocks

KINDS = ("rlhflow", "math-shepherd", "qwen-prm", "skywork")
ALL_KINDS = KINDS + ("outcome", "outcome:<kind>", "<callable>")
AGGREGATIONS = ("last", "min", "prod", "mean")
QWEN_PRM_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
# Math-Shepherd's published input layouts -> their step separator: the model card's
# (peiyi9979/math-shepherd-mistral-7b-prm: question, " ", each step + " ки", joined by "\n") and
# search-and-learn's (MathShepherd.score in src/sal/models/reward_models.py, at the commit named in
# sal_preset.json: system prompt + "\n" + question + "\n", " ", steps joined by " ки\n\n", a final " ки").
MATH_SHEPHERD_LAYOUTS = {"model-card": "\n", "sal": "\n\n"}
_ARCH_KIND = {"Qwen2ForProcessRewardModel": "qwen-prm", "Qwen2ForPrmModel": "skywork"}
_SENTINEL_Q, _SENTINEL_S, _SENTINEL_L = "QSENTINEL7Q", "SSENTINEL7S", "LSENTINEL7L"
OUTCOME_JOIN = "\n\n"  # joins the steps of an outcome-mode solution (rlhflow, qwen-prm)


class PRMOutOfBlocks(OutOfBlocks, ValueError):
    """The PRM's KV pool cannot hold one row of a call even when empty; nothing was appended
    (an `OutOfBlocks`, and a `ValueError` about the PRM's size): raise kv_cache_bytes."""


def aggregate(step_scores: list[float], how: str = "last") -> float:
    """One number for a partial solution from its step scores: the last, the minimum, the
    product or the mean."""
    if how not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {how!r}: one of {', '.join(AGGREGATIONS)}")
    if not step_scores:
        raise ValueError("aggregate: no step scores")
    if how == "last":
        return float(step_scores[-1])
    if how == "min":
        return float(min(step_scores))
    if how == "prod":
        return float(math.prod(step_scores))
    return float(sum(step_scores) / len(step_scores))


@dataclass(eq=False)
class PRMHandle:
    """One partial solution being scored: its question, the steps scored so far and (model PRMs)
    its sequence in the PRM's own KV cache."""

    question: str
    steps: list[str] = field(default_factory=list)
    seq: int | None = None  # None for a model PRM's handle whose KV was evicted (re-encoded on use)
    alive: bool = True

    @property
    def num_steps(self) -> int:
        return len(self.steps)


# --- tokenization ----------------------------------------------------------------------------------
class _Segmenter:
    """Tokenizes segments; with a SentencePiece-style tokenizer (dummy prefix "▁"), continuation
    segments are tokenized after an anchor "\\n" whose tokens are then dropped, so no spurious "▁"
    appears at each segment start."""

    def __init__(self, tok):
        self.tok = tok
        first = tok.convert_ids_to_tokens(tok.encode("a", add_special_tokens=False))
        self.anchor = None
        if first and str(first[0]).startswith("\u2581"):
            self.anchor = tok.encode("\n", add_special_tokens=False)

    def encode(self, text: str, first: bool = False, special: bool = False) -> list[int]:
        if first or self.anchor is None or not text:
            return list(self.tok.encode(text, add_special_tokens=special)) if text or special else []
        ids = list(self.tok.encode("\n" + text, add_special_tokens=False))
        n = len(self.anchor)
        if ids[:n] == self.anchor:
            return ids[n:]
        return list(self.tok.encode(text, add_special_tokens=False))

    def single_id(self, text: str, what: str, source) -> int:
        ids = self.tok.encode(text, add_special_tokens=False)
        if not ids:
            raise ValueError(f"{source}: the tokenizer has no token for {text!r} ({what})")
        tid = ids[-1]
        unk = getattr(self.tok, "unk_token_id", None)
        decoded = self.tok.decode([tid])
        if (unk is not None and tid == unk) or decoded.lstrip(" \u2581") != text.lstrip(" "):
            raise ValueError(f"{source}: {text!r} ({what}) is not a token of this tokenizer (it encodes as "
                             f"{self.tok.convert_ids_to_tokens(ids)}); is this checkpoint of the kind asked for?")
        return tid


class _Format:
    """prefix_ids(question), step_ids(step, k) -> (ids, score offset within ids) and, for outcome
    mode, outcome_ids(step, k) -> (body, tag, score offset within body + tag): the body stays in
    the sequence, the tag (the format's scoring tag, once, after the last body) only probes."""

    kind = ""
    needs = "logits"  # or "hidden"

    def prefix_ids(self, question: str) -> list[int]:
        raise NotImplementedError

    def step_ids(self, step: str, index: int) -> tuple[list[int], int]:
        raise NotImplementedError

    def outcome_ids(self, step: str, index: int) -> tuple[list[int], list[int], int]:
        raise NotImplementedError

    def full_ids(self, question: str, steps: list[str]) -> tuple[list[int], list[int]]:
        """Step mode: the ids of (question, steps) and each step's score position."""
        ids, positions = self.prefix_ids(question), []
        for k, step in enumerate(steps):
            seg, off = self.step_ids(step, k)
            positions.append(len(ids) + off)
            ids = ids + seg
        return ids, positions


def _render(tok, messages, source) -> str:
    if not getattr(tok, "chat_template", None):
        raise ValueError(f"{source}: the tokenizer has no chat template; this PRM kind needs the checkpoint's template")
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)


class _RLHFlowFormat(_Format):
    kind = "rlhflow"

    def __init__(self, tok, seg: _Segmenter, source):
        self.tok, self.seg, self.source = tok, seg, source
        self.good = seg.single_id("+", 'good label "+"', source)
        self.bad = seg.single_id("-", 'bad label "-"', source)
        one = [{"role": "user", "content": f"{_SENTINEL_Q} {_SENTINEL_S}"}, {"role": "assistant", "content": _SENTINEL_L}]
        two = one + [{"role": "user", "content": _SENTINEL_S}, {"role": "assistant", "content": _SENTINEL_L}]
        t1, t2 = _render(tok, one, source), _render(tok, two, source)
        if not t2.startswith(t1):
            raise ValueError(f"{source}: the chat template does not render conversations append-only; cannot cache per step")
        # t1 = head + Q + " " + S + after_step + L + after_label
        tail = t1[t1.index(_SENTINEL_Q) + len(_SENTINEL_Q):]
        if not tail.startswith(" " + _SENTINEL_S):
            raise ValueError(f"{source}: the chat template changes the user content; unsupported for rlhflow")
        tail = tail[len(_SENTINEL_S) + 1:]
        self.after_step, self.after_label = tail.split(_SENTINEL_L)
        more = t2[len(t1):]
        self.before_step = more[: more.index(_SENTINEL_S)]
        more = more[more.index(_SENTINEL_S) + len(_SENTINEL_S):]
        if more != self.after_step + _SENTINEL_L + self.after_label:
            raise ValueError(f"{source}: the chat template renders later turns differently; unsupported for rlhflow")
        # Llama 3.1's template trims every message's content; the reference renders the raw steps
        # through it, so a step loses its surrounding whitespace exactly when the template does that.
        padded = _render(tok, [{"role": "user", "content": f"{_SENTINEL_Q} {_SENTINEL_S} \n"},
                               {"role": "assistant", "content": _SENTINEL_L}], source)
        self.trims = f"{_SENTINEL_S} \n" not in padded

    def prefix_ids(self, question):
        conv = [{"role": "user", "content": f"{question} {_SENTINEL_S}"}, {"role": "assistant", "content": _SENTINEL_L}]
        text = _render(self.tok, conv, self.source)
        return self.seg.encode(text[: text.index(" " + _SENTINEL_S)], first=True)

    def step_ids(self, step, index):
        if self.trims:  # the first turn's content is question + " " + step: only its end is trimmed
            step = step.rstrip() if index == 0 else step.strip()
        head = " " if index == 0 else self.before_step
        body = self.seg.encode(head + step + self.after_step)
        label = self.seg.encode("+" + self.after_label)
        return body + label, len(body) - 1

    def outcome_ids(self, step, index):
        # One user turn: question + " " + step0 + "\n\n" + step1 ...; the tag closes it.
        body = self.seg.encode((" " if index == 0 else OUTCOME_JOIN) + step)
        tag = self.seg.encode(self.after_step)
        return body, tag, len(body) + len(tag) - 1


class _MathShepherdFormat(_Format):
    kind = "math-shepherd"

    def __init__(self, tok, seg: _Segmenter, source, layout: str = "model-card", step_separator: str | None = None,
                 system_prompt: str | None = None):
        if layout not in MATH_SHEPHERD_LAYOUTS:
            raise ValueError(f"unknown math-shepherd layout {layout!r}: one of {', '.join(MATH_SHEPHERD_LAYOUTS)}")
        if system_prompt is not None and layout != "sal":
            raise ValueError("the math-shepherd model-card layout has no system prompt; pass layout='sal' for one")
        if layout == "sal" and system_prompt is None:
            from .presets import sal_preset

            system_prompt = sal_preset()["system_prompt"]
        self.seg, self.layout, self.system = seg, layout, system_prompt
        self.sep = MATH_SHEPHERD_LAYOUTS[layout] if step_separator is None else step_separator
        self.good = seg.single_id("+", 'good label "+"', source)
        self.bad = seg.single_id("-", 'bad label "-"', source)
        self.tag = seg.single_id("ки", 'step tag "ки"', source)
        self.tag_ids = seg.encode(" ки")
        if not self.tag_ids or self.tag_ids[-1] != self.tag:
            raise ValueError(f"{source}: ' ки' does not end with the step tag token 'ки' in this tokenizer")

    def prefix_ids(self, question):
        text = question if self.layout == "model-card" else f"{self.system}\n{question}\n"
        return self.seg.encode(text, first=True, special=True)

    def step_ids(self, step, index):
        # One segment: the tag after a step that ends in whitespace tokenizes with it.
        ids = self.seg.encode((" " if index == 0 else self.sep) + step + " ки")
        if ids[-1] != self.tag:
            raise ValueError(f"step {index} + ' ки' does not end with the step tag token: {step!r}")
        return ids, len(ids) - 1

    def outcome_ids(self, step, index):
        body = self.seg.encode((" " if index == 0 else self.sep) + step)
        return body, list(self.tag_ids), len(body) + len(self.tag_ids) - 1


class _QwenPRMFormat(_Format):
    kind = "qwen-prm"
    needs = "hidden"

    def __init__(self, tok, seg: _Segmenter, source, system_prompt: str | None = None):
        self.tok, self.seg, self.source = tok, seg, source
        self.system = QWEN_PRM_SYSTEM if system_prompt is None else system_prompt
        ids = tok.encode("<extra_0>", add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"{source}: the tokenizer has no single token '<extra_0>' (Qwen2.5-Math-PRM's step separator)")
        self.tag = ids[0]
        # The assistant header's text after its last special token ("assistant\n") goes with the
        # first step, so that a step starting with whitespace tokenizes as in the whole text.
        text = _render(tok, self._messages(_SENTINEL_Q), source)
        head = text[text.index(_SENTINEL_Q) + len(_SENTINEL_Q): text.index(_SENTINEL_L)]
        cut = max((head.rindex(t) + len(t) for t in tok.get_added_vocab() if t and t in head), default=0)
        self.head_tail = head[cut:]

    def _messages(self, question):
        """[system (none for system_prompt ""), user: question, assistant: a sentinel]."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + [{"role": "user", "content": question}, {"role": "assistant", "content": _SENTINEL_L}]

    def prefix_ids(self, question):
        text = _render(self.tok, self._messages(question), self.source)
        return self.seg.encode(text[: text.index(_SENTINEL_L) - len(self.head_tail)], first=True)

    def step_ids(self, step, index):
        ids = self.seg.encode((self.head_tail if index == 0 else "") + step) + [self.tag]
        return ids, len(ids) - 1

    def outcome_ids(self, step, index):
        body = self.seg.encode(self.head_tail + step if index == 0 else OUTCOME_JOIN + step)
        return body, [self.tag], len(body)


class _SkyworkFormat(_Format):
    kind = "skywork"
    needs = "hidden"

    def __init__(self, tok, seg: _Segmenter, source):
        self.tok, self.seg = tok, seg
        self.bos = tok.bos_token or ""
        self.newline = seg.single_id("\n", 'step token "\\n"', source)

    def prefix_ids(self, question):
        return self.seg.encode(self.bos + question + "\n", first=True, special=True)

    def step_ids(self, step, index):
        # As the reference's prepare_input over the solution joined by "\n\n": every piece of the
        # text split at "\n", empty ones too, is tokenized on its own and followed by a "\n"; so a
        # step after the first starts with the "\n" of the empty piece between two steps.
        ids = [] if index == 0 else [self.newline]
        for line in step.split("\n"):
            ids += (list(self.tok.encode(line)) if line else []) + [self.newline]
        return ids, len(ids) - 1

    def outcome_ids(self, step, index):  # no tags: the score is read at the body's last "\n"
        ids, off = self.step_ids(step, index)
        return ids, [], off


def make_format(kind: str, tokenizer, source="the PRM", layout: str | None = None, step_separator: str | None = None,
                system_prompt: str | None = None) -> _Format:
    """The token layout of a PRM kind over `tokenizer` (what `load_prm` builds; see the module
    docstring). layout: math-shepherd's "model-card" (default) or "sal"; step_separator:
    math-shepherd's (default: the layout's); system_prompt: qwen-prm's system message or the text
    before the question in math-shepherd's sal layout."""
    if kind not in KINDS:
        raise ValueError(f"unknown PRM kind {kind!r}: one of {', '.join(KINDS)}")
    if layout is not None and kind != "math-shepherd":
        raise ValueError(f"layout= applies to math-shepherd PRMs only (its model-card and sal layouts), not {kind!r}")
    if step_separator is not None and kind != "math-shepherd":
        raise ValueError(f"step_separator= applies to math-shepherd PRMs and callables, not {kind!r}")
    if system_prompt is not None and kind not in ("math-shepherd", "qwen-prm"):
        raise ValueError(f"system_prompt= applies to qwen-prm and to math-shepherd's sal layout, not {kind!r}")
    seg = _Segmenter(tokenizer)
    if kind == "math-shepherd":
        return _MathShepherdFormat(tokenizer, seg, source, layout or "model-card", step_separator, system_prompt)
    if kind == "qwen-prm":
        return _QwenPRMFormat(tokenizer, seg, source, system_prompt)
    if kind == "rlhflow":
        return _RLHFlowFormat(tokenizer, seg, source)
    return _SkyworkFormat(tokenizer, seg, source)


# --- the scorer --------------------------------------------------------------------------------
class PRM:
    """Common interface; see the module docstring. `tokens_processed` counts every token this PRM
    ran through its model (prefix + steps + outcome probes + re-encodes + score_full); `stats`
    splits it."""

    kind: str
    outcome: bool = False
    # Tokens the model ran for each handle of the latest `score_steps` call (a search charges
    # them to the handle's problem)
    last_row_tokens: list[int]

    @property
    def default_aggregation(self) -> str:
        return "last" if self.outcome else "min"

    def start(self, question: str) -> PRMHandle:
        return self.start_many([question])[0]

    def start_many(self, questions: list[str]) -> list[PRMHandle]:
        raise NotImplementedError

    def fork(self, handle: PRMHandle, n: int) -> list[PRMHandle]:
        raise NotImplementedError

    def free(self, handle: PRMHandle) -> None:
        raise NotImplementedError

    def score_steps(self, handles: list[PRMHandle], steps: list[str]) -> list[float | None]:
        """Each handle's score after its new step; None (the handle unchanged) where a model PRM's
        context cannot hold the step."""
        raise NotImplementedError

    def score_full(self, question: str, steps: list[str]) -> list[float]:
        raise NotImplementedError

    def score(self, question: str, steps: list[str], how: str | None = None) -> float:
        """One number for a (partial) solution scored without the cache."""
        return aggregate(self.score_full(question, steps), how or self.default_aggregation)

    @staticmethod
    def _check(handles, steps):
        if len(handles) != len(steps):
            raise ValueError(f"score_steps: {len(handles)} handles but {len(steps)} steps")
        for h in handles:
            if not h.alive:
                raise ValueError("score_steps: a handle was already freed")
        if len({id(h) for h in handles}) != len(handles):
            raise ValueError("score_steps: the same handle appears twice in one call")


class CallablePRM(PRM):
    """A hard-coded verifier fn(question, steps) -> float | list[float]."""

    def __init__(self, fn: Callable, outcome: bool = False, step_separator: str = "\n\n"):
        self.fn, self.outcome, self.sep = fn, outcome, step_separator
        self.kind = "outcome:callable" if outcome else "callable"
        self.tokens_processed = 0
        self.stats = {"tokens_processed": 0, "calls": 0}

    def _call(self, question, steps) -> float:
        self.stats["calls"] += 1
        if self.outcome:
            steps = [self.sep.join(steps)]
        out = self.fn(question, list(steps))
        if isinstance(out, (list, tuple)):
            if not out:
                raise ValueError("the verifier returned an empty list")
            out = out[-1]
        return float(out)

    def start_many(self, questions):
        return [PRMHandle(q) for q in questions]

    def fork(self, handle, n):
        return [PRMHandle(handle.question, list(handle.steps)) for _ in range(n)]

    def free(self, handle):
        handle.alive = False

    def score_steps(self, handles, steps):
        self._check(handles, steps)
        self.last_row_tokens = [0] * len(handles)
        out = []
        for h, s in zip(handles, steps):
            h.steps.append(s)
            out.append(self._call(h.question, h.steps))
        return out

    def score_full(self, question, steps):
        if self.outcome:
            return [self._call(question, steps)]
        return [self._call(question, steps[: k + 1]) for k in range(len(steps))]


class ModelPRM(PRM):
    """A PRM run by ttc_fast's own decoder in its own paged KV cache."""

    def __init__(self, loaded, fmt: _Format, head: dict | None, outcome: bool = False, kv_cache_bytes=None,
                 block_size: int = 16, backend="auto", num_blocks: int | None = None, max_batch_tokens: int = 8192):
        from .model_runner import ModelRunner

        self.model, self.fmt, self.head, self.outcome = loaded, fmt, head, outcome
        self.kind = ("outcome:" if outcome else "") + fmt.kind
        self.tokenizer = loaded.tokenizer
        self.max_batch_tokens = max_batch_tokens
        self.runner = ModelRunner(loaded, kv_cache_bytes=kv_cache_bytes, block_size=block_size, backend=backend,
                                  enable_prefix_cache=True, num_blocks=num_blocks)
        self.stats = {"prefix_tokens": 0, "prefix_tokens_cached": 0, "step_tokens": 0, "probe_tokens": 0,
                      "full_tokens": 0, "forwards": 0, "evictions": 0, "recomputed_tokens": 0}
        # Handles holding KV, least recently scored first: the eviction order when the pool is short.
        self._resident: OrderedDict[int, PRMHandle] = OrderedDict()

    @property
    def tokens_processed(self) -> int:
        s = self.stats
        return s["prefix_tokens"] + s["step_tokens"] + s["probe_tokens"] + s["full_tokens"] + s["recomputed_tokens"]

    # --- scoring rows ------------------------------------------------------------------------------
    def _forward(self, seqs, tokens, offsets) -> torch.Tensor:
        """Append and run; the scores at `offsets` (rows may list none: no outputs at all when
        none does)."""
        want = any(offsets)
        want_hidden = want and self.fmt.needs == "hidden"
        out = self.runner.forward(seqs, tokens, offsets if want else None, want_logits=want and not want_hidden,
                                  want_hidden=want_hidden)
        self.stats["forwards"] += 1
        return self._scores(out.hidden if want_hidden else out.logits) if want else torch.empty(0)

    def _run(self, items) -> list[list[float]]:
        """Items (seq, new tokens, offsets): appended and run in ragged forwards of at most
        `max_batch_tokens` tokens (a longer item alone); an item with no tokens is skipped. Returns
        each item's scores at its offsets."""
        out: list[list[float]] = [[] for _ in items]
        todo = [k for k, (_, toks, _) in enumerate(items) if toks]
        start = 0
        while start < len(todo):
            end, total = start, 0
            while end < len(todo) and (end == start or total + len(items[todo[end]][1]) <= self.max_batch_tokens):
                total += len(items[todo[end]][1])
                end += 1
            chunk = todo[start:end]
            vals = self._forward([items[k][0] for k in chunk], [items[k][1] for k in chunk],
                                 [items[k][2] for k in chunk]).tolist()
            for k in chunk:
                n = len(items[k][2])
                out[k], vals = vals[:n], vals[n:]
            start = end
        return out

    def _scores(self, rows: torch.Tensor) -> torch.Tensor:
        kind = self.fmt.kind
        if kind in ("rlhflow", "math-shepherd"):
            pair = rows[:, [self.fmt.good, self.fmt.bad]].float()
            return pair.softmax(-1)[:, 0]
        h = rows.float()
        if kind == "qwen-prm":
            x = torch.relu(h @ self.head["score.0.weight"].T + self.head["score.0.bias"])
            return (x @ self.head["score.2.weight"].T + self.head["score.2.bias"]).softmax(-1)[:, 1]
        v = h @ self.head["v_head.summary.weight"].T + self.head["v_head.summary.bias"]
        return torch.sigmoid(v[:, 0])

    # --- handles -----------------------------------------------------------------------------------
    def start_many(self, questions):
        """Encode each question's prefix segment (prefix-cache hits are reused) in one forward."""
        handles, seqs, feeds = [], [], []
        limit = self.model.config.max_context
        try:
            for q in questions:
                ids = self.fmt.prefix_ids(q)
                if len(ids) >= limit:
                    raise ValueError(f"the question is {len(ids)} tokens in the PRM's format, and the PRM "
                                     f"({self.model.path}) attends over at most {limit}")
                seq, cached = self.runner.new_sequence(ids)
                handles.append(PRMHandle(q, seq=seq))
                self._resident[id(handles[-1])] = handles[-1]
                seqs.append(seq)
                feeds.append(ids[cached:])
                self.stats["prefix_tokens_cached"] += cached
            if seqs:
                self._check_room(seqs, feeds)
                self.runner.forward(seqs, feeds, None, want_logits=False, want_hidden=False)
        except BaseException:
            for h in handles:
                self._resident.pop(id(h), None)
            for seq in seqs:
                self.runner.free(seq)
            raise
        self.stats["prefix_tokens"] += sum(len(f) for f in feeds)
        self.stats["forwards"] += bool(seqs)
        return handles

    def fork(self, handle, n):
        if not handle.alive:
            raise ValueError("fork: the handle was already freed")
        if handle.seq is None:  # evicted: the children are re-encoded when first scored
            return [PRMHandle(handle.question, list(handle.steps)) for _ in range(n)]
        children = [PRMHandle(handle.question, list(handle.steps), seq=s) for s in self.runner.fork(handle.seq, n)]
        for child in children:
            self._resident[id(child)] = child
        return children

    def free(self, handle):
        if handle.alive:
            if handle.seq is not None:
                self._resident.pop(id(handle), None)
                self.runner.free(handle.seq)
                handle.seq = None
            handle.alive = False

    def _evict(self, handle) -> None:
        self._resident.pop(id(handle), None)
        self.runner.free(handle.seq)
        handle.seq = None
        self.stats["evictions"] += 1

    def _check_room(self, seqs, feeds):
        blocks = self.runner.blocks
        need = sum(blocks.blocks_needed(s, len(f)) for s, f in zip(seqs, feeds))
        have = blocks.num_available_blocks
        if need > have:
            raise PRMOutOfBlocks(
                f"the PRM's KV pool needs {need} blocks for {sum(map(len, feeds))} new tokens but has {have} "
                f"available; nothing was appended: raise kv_cache_bytes (or num_blocks)"
            )

    # --- scoring ----------------------------------------------------------------------------------
    def _row_ids(self, step: str, index: int) -> tuple[list[int], list[int], int]:
        """What step `index` adds: (ids kept in the handle's sequence, tag ids run only on a
        throwaway fork to probe the score (outcome mode), score offset within kept + tag)."""
        if self.outcome:
            return self.fmt.outcome_ids(step, index)
        ids, off = self.fmt.step_ids(step, index)
        return ids, [], off

    def _kept_ids(self, question: str, steps: list[str]) -> tuple[list[int], list[int], list[int]]:
        """The ids a handle's sequence holds after `steps` (prefix + every step's kept ids), the
        steps' score positions (in ids + that step's tag) and the last step's tag ids."""
        ids, positions, tag = self.fmt.prefix_ids(question), [], []
        for k, s in enumerate(steps):
            kept, tag, off = self._row_ids(s, k)
            positions.append(len(ids) + off)
            ids = ids + kept
        return ids, positions, tag

    def _probe_blocks(self, seq_len: int, tag_len: int) -> int:
        """Blocks a fork of a `seq_len`-token sequence takes to run `tag_len` tag tokens: a copy of
        a partial last block plus the new blocks."""
        if not tag_len:
            return 0
        copy = int(seq_len % self.runner.block_size != 0)
        return copy + self.runner.blocks_for(seq_len + tag_len) - self.runner.blocks_for(seq_len)

    def score_steps(self, handles, steps):
        """Append each handle's new step segment (only those tokens) and return its score; all
        handles go through one ragged forward (chunked by max_batch_tokens) when the pool holds
        them, else in as few chunks as it holds (see the module docstring). Outcome mode appends
        the new bodies the same way, then runs the tags on forks of the handles (one more forward
        per chunk). If a forward fails, the rows it ran with are evicted (re-encoded from their
        recorded steps when next used), so no handle keeps half a step. A row whose step would take
        its text past the PRM's context (max_position_embeddings) is not appended and scores None."""
        self._check(handles, steps)
        segs = [self._row_ids(s, h.num_steps) for h, s in zip(handles, steps)]
        blocks = self.runner.blocks
        limit = self.model.config.max_context
        fits = []
        for i, (h, (kept, tag, _)) in enumerate(zip(handles, segs)):
            context = self.runner.seq_len(h.seq) if h.seq is not None else len(self._kept_ids(h.question, h.steps)[0])
            n = context + len(kept)
            if n + len(tag) > limit:
                continue
            fits.append(i)
            if self.runner.blocks_for(n) + self._probe_blocks(n, len(tag)) > blocks.num_blocks:
                raise PRMOutOfBlocks(
                    f"the PRM's KV pool ({blocks.num_blocks} blocks of {blocks.block_size} tokens) cannot hold one "
                    f"partial solution of {n + len(tag)} tokens even when empty; nothing was appended: "
                    f"raise kv_cache_bytes (or num_blocks)"
                )
        scores: list[float | None] = [None] * len(handles)
        self.last_row_tokens = [0] * len(handles)
        # Rows holding KV first: under pressure they need only their new tokens.
        pending = sorted(fits, key=lambda i: handles[i].seq is None)
        while pending:
            rows = self._make_room(handles, steps, segs, pending)
            # Outcome mode: the score is at the tag, run on a fork of the handle (its KV copied on
            # write for a shared partial last block only) and dropped with it.
            probes = [(i, off - len(feed)) for i, feed, off in rows if off >= len(feed)]
            forks = []
            try:
                vals = self._run([(handles[i].seq, feed, [off] if off < len(feed) else []) for i, feed, off in rows])
                try:
                    for i, _ in probes:
                        forks.append(self.runner.fork(handles[i].seq, 1)[0])
                    tag_vals = self._run([(f, segs[i][1], [off]) for f, (i, off) in zip(forks, probes)])
                finally:
                    for f in forks:
                        self.runner.free(f)
            except BaseException:
                # Nothing of this round is kept: its rows' sequences may hold part of the new step,
                # so they are evicted, to be re-encoded from their recorded steps when next used.
                for i, _, _ in rows:
                    if handles[i].seq is not None:
                        self._evict(handles[i])
                raise
            self.stats["probe_tokens"] += sum(len(segs[i][1]) for i, _ in probes)
            for (i, _, _), v in zip(rows, vals):
                if v:  # scored at the body (rows probed at their tag have none here)
                    scores[i] = v[0]
            for (i, _), v in zip(probes, tag_vals):
                scores[i] = v[0]
            for i, feed, off in rows:  # new step tokens, or a re-encoded evicted text; and the tag
                self.last_row_tokens[i] = len(feed) + (len(segs[i][1]) if off >= len(feed) else 0)
                handles[i].steps.append(steps[i])
                self._resident.move_to_end(id(handles[i]))
            pending = pending[len(rows):]
        return scores

    def _make_room(self, handles, steps, segs, pending):
        """Rows (index, new tokens, score offset within the new tokens + the step's tag) for the
        longest head of `pending` that fits the pool, tag probes included, after evicting other
        handles (the rest of `pending` last); evicted handles in it get sequences again."""
        blocks = self.runner.blocks
        take = len(pending)
        while True:
            keep = {id(handles[i]) for i in pending[:take]}
            later = [handles[i] for i in pending[take:] if handles[i].seq is not None]
            rows, fresh = [], []
            for i in pending[:take]:
                h = handles[i]
                kept, _, off = segs[i]
                if h.seq is not None:
                    rows.append((i, kept, off))
                    continue
                # Evicted: re-encode its whole text (cached full blocks of it are reused).
                ids, positions, _ = self._kept_ids(h.question, h.steps + [steps[i]])
                h.seq, cached = self.runner.new_sequence(ids[: positions[-1]])
                fresh.append(h)
                rows.append((i, ids[cached:], positions[-1] - cached))
            need = sum(blocks.blocks_needed(handles[i].seq, len(feed))
                       + self._probe_blocks(self.runner.seq_len(handles[i].seq) + len(feed), len(segs[i][1]))
                       for i, feed, _ in rows)
            pending_ids = {id(h) for h in later}
            victims = iter([h for h in self._resident.values() if id(h) not in keep and id(h) not in pending_ids] + later)
            while need > blocks.num_available_blocks:
                victim = next(victims, None)
                if victim is None:
                    break
                self._evict(victim)
            if need <= blocks.num_available_blocks:
                fresh_ids = {id(h) for h in fresh}
                for h in fresh:
                    self._resident[id(h)] = h
                for i, feed, _ in rows:
                    self.stats["recomputed_tokens" if id(handles[i]) in fresh_ids else "step_tokens"] += len(feed)
                return rows
            for h in fresh:  # undo: nothing of this attempt stays
                self.runner.free(h.seq)
                h.seq = None
            if take == 1:  # unreachable after score_steps' length check, unless blocks leak
                raise PRMOutOfBlocks(f"the PRM's KV pool cannot hold {len(rows[0][1])} new tokens with every other handle evicted")
            take = (take + 1) // 2

    def full_ids(self, question: str, steps: list[str]) -> tuple[list[int], list[int]]:
        """The whole token sequence of (question, steps) and the positions of the step scores
        (outcome mode: prefix + every step's body + the last step's tag, and the one position)."""
        ids, positions, tag = self._kept_ids(question, steps)
        if self.outcome:
            return ids + tag, positions[-1:]
        return ids, positions

    def score_full(self, question, steps):
        """Scores of every step (outcome mode: [score at the last step]) from one uncached
        forward over the whole text."""
        if not steps:
            raise ValueError("score_full: no steps")
        ids, positions = self.full_ids(question, steps)
        seq, _ = self.runner.new_sequence()
        try:
            self._check_room([seq], [ids])
            vals = self._forward([seq], [ids], [positions])
        finally:
            self.runner.free(seq)
        self.stats["full_tokens"] += len(ids)
        return vals.tolist()


# --- loading -----------------------------------------------------------------------------------
def _parse_kind(kind, path_or_callable) -> tuple[str | None, bool]:
    if kind is None:
        return None, False
    if not isinstance(kind, str):
        raise ValueError(f"kind must be a string, got {type(kind).__name__}")
    outcome = False
    if kind == "outcome":
        return None, True
    if kind.startswith("outcome:"):
        kind, outcome = kind[len("outcome:"):], True
    if kind not in KINDS and not (kind == "callable" and callable(path_or_callable)):
        raise ValueError(f"unknown PRM kind {kind!r}: one of {', '.join(KINDS)}, 'outcome', 'outcome:<kind>', or a callable verifier")
    return kind, outcome


def _load_base(path, device, dtype):
    """Our decoder for a PRM checkpoint (PRM architectures accepted, lm_head optional) and the
    checkpoint tensors that are not ours (the heads)."""
    from .config import ModelConfig
    from .loader import LoadedModel, build_module, config_source, eos_ids, read_checkpoint, resolve_device

    device = resolve_device(device)
    path, raw, state, tokenizer, dtype = read_checkpoint(path, device, dtype)
    config = ModelConfig.from_dict(raw, config_source(path), allow_prm=True)
    extra = {k: v for k, v in state.items() if not k.startswith("model.") and k != "lm_head.weight"}
    module = build_module(config, state, device, dtype, path, require_lm_head=False)
    return LoadedModel(module, config, tokenizer, path, device, dtype, eos_ids(path, config, tokenizer)), raw, extra


_HEAD_KEYS = {
    "qwen-prm": {"score.0.weight": ("h", "h"), "score.0.bias": ("h",), "score.2.weight": (2, "h"), "score.2.bias": (2,)},
    "skywork": {"v_head.summary.weight": (1, "h"), "v_head.summary.bias": (1,)},
}


def load_prm(path_or_callable, kind: str | None = None, device=None, dtype=None, kv_cache_bytes: int | None = None,
             block_size: int = 16, backend="auto", num_blocks: int | None = None, max_batch_tokens: int = 8192,
             step_separator: str | None = None, system_prompt: str | None = None, layout: str | None = None) -> PRM:
    """A PRM from a local checkpoint directory, `builtin:NAME` (`builtin:toy-prm`), a callable
    verifier, or `builtin:toy-checker` (the toy task's hard-coded step checker).

    kind: "rlhflow" | "math-shepherd" | "qwen-prm" | "skywork" | "outcome" | "outcome:<kind>";
    None infers it from a callable or from the architecture (Qwen2ForProcessRewardModel ->
    qwen-prm, Qwen2ForPrmModel -> skywork). layout (math-shepherd): "model-card" (default) or
    "sal" (search-and-learn's: its system prompt before the question, steps joined by "\\n\\n").
    step_separator: math-shepherd's separator between a step tag and the next step (default: the
    layout's), or the joiner of a callable's outcome text ("\\n\\n"). system_prompt: qwen-prm's
    system message (None: Qwen's, "": none), or the text before the question in math-shepherd's
    sal layout (None: search-and-learn's MATH prompt); no other format has one."""
    if path_or_callable == "builtin:toy-checker":  # the toy task's hard-coded step verifier
        from .toy import check_step as path_or_callable
    base, outcome = _parse_kind(kind, path_or_callable)
    if callable(path_or_callable):
        if base not in (None, "callable"):
            raise ValueError(f"kind {kind!r} needs a checkpoint path, not a callable")
        return CallablePRM(path_or_callable, outcome=outcome, step_separator=step_separator or "\n\n")
    from .loader import is_gguf, resolve_path

    path = Path(path_or_callable).expanduser() if is_gguf(path_or_callable) else resolve_path(path_or_callable)
    if base is None and path.is_file():
        raise ValueError(f"{path}: a .gguf file names no PRM architecture; pass kind= one of {', '.join(KINDS)}")
    if base is None:
        archs = json.loads((path / "config.json").read_text()).get("architectures") or []
        found = [_ARCH_KIND[a] for a in archs if a in _ARCH_KIND]
        if not found:
            raise ValueError(f"{path}: cannot infer the PRM kind from architectures {archs}; pass kind= one of {', '.join(KINDS)}"
                             + (" (or 'outcome:<kind>')" if outcome else ""))
        base = found[0]
    if base == "callable":
        raise ValueError("kind 'callable' needs a callable verifier")
    loaded, raw, extra = _load_base(path, device, dtype)
    tok = loaded.tokenizer
    if tok is None:
        raise ValueError(f"{path}: no tokenizer files; a PRM needs its own tokenizer")
    head = None
    if base in _HEAD_KEYS:
        hsize = loaded.config.hidden_size
        missing = [k for k in _HEAD_KEYS[base] if k not in extra]
        if missing:
            raise ValueError(f"{path}: checkpoint has no {base} head: missing {', '.join(missing)} "
                             f"(is this a {base} checkpoint? its architectures are {raw.get('architectures')})")
        head = {}
        for k, shape in _HEAD_KEYS[base].items():
            want = tuple(hsize if d == "h" else d for d in shape)
            if tuple(extra[k].shape) != want:
                raise ValueError(f"{path}: head weight {k} has shape {tuple(extra[k].shape)}, expected {want}")
            head[k] = extra[k].float()
    elif loaded.module.lm_head is None:
        raise ValueError(f"{path}: checkpoint has no lm_head; kind {base!r} reads the label tokens' logits")
    fmt = make_format(base, tok, path, layout=layout, step_separator=step_separator, system_prompt=system_prompt)
    return ModelPRM(loaded, fmt, head, outcome=outcome, kv_cache_bytes=kv_cache_bytes, block_size=block_size,
                    backend=backend, num_blocks=num_blocks, max_batch_tokens=max_batch_tokens)
