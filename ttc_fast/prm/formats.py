"""The token layouts of the published PRMs, each format one class: its segments, its head's
checkpoint tensors and how a score is read out. `make_format(kind, tokenizer)` builds one.

Tokenization is defined per segment, and the uncached path (`full_ids`) uses exactly the same
segments, so the cached and uncached paths see the same token ids:

    ids(question, steps) = prefix_ids(question) + step_ids(steps[0], 0) + step_ids(steps[1], 1) + ...

Each segment is tokenized on its own by the PRM's tokenizer (a SentencePiece tokenizer's dummy
prefix "▁" is not re-added at each segment: segments after the first are tokenized as a
continuation); `rows(steps, indices)` gives many steps' segments from one batch call of the
tokenizer, the ids of encoding each alone. Segments start where the whole text's tokenization
splits anyway (after a special token, or at a space or newline the pre-tokenizer splits at), so
the ids are the ones the reference code gets from tokenizing the whole text; the tests check
this against re-implementations of each reference on the test tokenizers and on SmolLM2's real
one. Step texts are used as written (the reference code does not strip them either). Formats
(text of each segment; `|` marks the scored token):

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

Outcome-mode layouts (the whole partial solution judged once; see `ttc_fast.prm.scorer`):

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
"""
from __future__ import annotations

from typing import ClassVar

import torch

KINDS = ("rlhflow", "math-shepherd", "qwen-prm", "skywork")
QWEN_PRM_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
# Math-Shepherd's published input layouts -> their step separator: the model card's
# (peiyi9979/math-shepherd-mistral-7b-prm: question, " ", each step + " ки", joined by "\n") and
# search-and-learn's (MathShepherd.score in src/sal/models/reward_models.py, at the commit named in
# sal_preset.json: system prompt + "\n" + question + "\n", " ", steps joined by " ки\n\n", a final " ки").
MATH_SHEPHERD_LAYOUTS = {"model-card": "\n", "sal": "\n\n"}
_SENTINEL_Q, _SENTINEL_S, _SENTINEL_L = "QSENTINEL7Q", "SSENTINEL7S", "LSENTINEL7L"
OUTCOME_JOIN = "\n\n"  # joins the steps of an outcome-mode solution (rlhflow, qwen-prm)


class _Segmenter:
    """Tokenizes segments; with a SentencePiece-style tokenizer (dummy prefix "▁"), continuation
    segments are tokenized after an anchor "\\n" whose tokens are then dropped, so no spurious "▁"
    appears at each segment start."""

    def __init__(self, tok):
        self.tok = tok
        # A fast tokenizer's Rust object encodes as transformers' encode does (which calls it), at
        # a fraction of the per-call cost, and its batch call encodes many texts in parallel:
        # every step of every beam is encoded here.
        rust = getattr(tok, "_tokenizer", None)
        self._encode = (lambda text, special: rust.encode(text, add_special_tokens=special).ids) if \
            hasattr(rust, "encode") else (lambda text, special: tok.encode(text, add_special_tokens=special))
        batch = getattr(rust, "encode_batch_fast", None) or getattr(rust, "encode_batch", None)
        self._encode_batch = (lambda texts, special: [e.ids for e in batch(texts, add_special_tokens=special)]) if \
            batch is not None else (lambda texts, special: [self._encode(t, special) for t in texts])
        first = tok.convert_ids_to_tokens(self._encode("a", False))
        self.anchor = None
        if first and str(first[0]).startswith("\u2581"):
            self.anchor = self._encode("\n", False)

    def encode(self, text: str, first: bool = False, special: bool = False) -> list[int]:
        return self.encode_many([text], first, special)[0]

    def encode_many(self, texts: list[str], first: bool = False, special: bool = False) -> list[list[int]]:
        """`encode` of each text, in (at most two) batch calls of the tokenizer."""
        out: list[list[int]] = [[] for _ in texts]
        anchored = [] if first or self.anchor is None else [i for i, text in enumerate(texts) if text]
        plain = sorted(set(i for i, text in enumerate(texts) if text or special) - set(anchored))
        if plain:
            for i, ids in zip(plain, self._encode_batch([texts[i] for i in plain], special)):
                out[i] = list(ids)
        if anchored:
            n = len(self.anchor)
            for i, ids in zip(anchored, self._encode_batch(["\n" + texts[i] for i in anchored], False)):
                out[i] = ids[n:] if ids[:n] == self.anchor else list(self._encode(texts[i], False))
        return out

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


class Format:
    """prefix_ids(question), step_ids(step, k) -> (ids, score offset within ids) and, for outcome
    mode, outcome_ids(step, k) -> (body, tag, score offset within body + tag): the body stays in
    the sequence, the tag (the format's scoring tag, once, after the last body) only probes. A
    format defines `rows`, which gives either for many steps at once. read_scores(rows, head)
    turns the model's outputs at the scored positions into scores."""

    kind = ""
    needs = "logits"  # or "hidden"
    # The checkpoint's head tensors -> their shapes ("h": the hidden size); kept in float32.
    head_keys: ClassVar[dict] = {}
    # The keyword options of the constructor (make_format checks them).
    options: ClassVar[tuple[str, ...]] = ()

    def read_scores(self, rows: torch.Tensor, head: dict | None) -> torch.Tensor:
        """Scores from logits (or final hidden states) at the scored positions: [R, vocab] -> [R]."""
        raise NotImplementedError

    def prefix_ids(self, question: str) -> list[int]:
        raise NotImplementedError

    def rows(self, steps: list[str], indices: list[int], outcome: bool = False) -> list:
        """What each step `indices[i]` adds (`row_ids`), from one batch call of the tokenizer; a
        ValueError in place of a row the format rejects."""
        raise NotImplementedError

    def row_ids(self, step: str, index: int, outcome: bool = False) -> tuple[list[int], list[int], int]:
        """What step `index` adds: (ids kept in the handle's sequence, tag ids run only on a
        throwaway fork to probe the score (outcome mode), score offset within kept + tag)."""
        row, = accepted(self.rows([step], [index], outcome))
        return row

    def step_ids(self, step: str, index: int) -> tuple[list[int], int]:
        ids, _, off = self.row_ids(step, index)
        return ids, off

    def outcome_ids(self, step: str, index: int) -> tuple[list[int], list[int], int]:
        return self.row_ids(step, index, True)

    def kept_ids(self, question: str, steps: list[str], outcome: bool = False) -> tuple[list[int], list[int], list[int]]:
        """The ids a handle's sequence holds after `steps` (prefix + every step's kept ids), the
        steps' score positions (in ids + that step's tag) and the last step's tag ids."""
        ids, positions, tag = self.prefix_ids(question), [], []
        for kept, tag, off in accepted(self.rows(steps, list(range(len(steps))), outcome)):
            positions.append(len(ids) + off)
            ids = ids + kept
        return ids, positions, tag

    def full_ids(self, question: str, steps: list[str]) -> tuple[list[int], list[int]]:
        """Step mode: the ids of (question, steps) and each step's score position."""
        ids, positions, _ = self.kept_ids(question, steps)
        return ids, positions


def accepted(rows: list) -> list:
    """`Format.rows`' output, or the first error in it raised."""
    for row in rows:
        if isinstance(row, Exception):
            raise row
    return rows


def _render(tok, messages, source) -> str:
    if not getattr(tok, "chat_template", None):
        raise ValueError(f"{source}: the tokenizer has no chat template; this PRM kind needs the checkpoint's template")
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)


class _LabelFormat(Format):
    """Score = softmax(logits[[id("+"), id("-")]])[0]: the probability of the good label."""

    good = bad = 0

    def read_scores(self, rows, head):
        return rows[:, [self.good, self.bad]].float().softmax(-1)[:, 0]


class _RLHFlowFormat(_LabelFormat):
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

    def rows(self, steps, indices, outcome=False):
        if outcome:
            # One user turn: question + " " + step0 + "\n\n" + step1 ...; the tag closes it.
            tag = self.seg.encode(self.after_step)
            bodies = self.seg.encode_many([(" " if k == 0 else OUTCOME_JOIN) + step for step, k in zip(steps, indices)])
            return [(body, list(tag), len(body) + len(tag) - 1) for body in bodies]
        if self.trims:  # the first turn's content is question + " " + step: only its end is trimmed
            steps = [step.rstrip() if k == 0 else step.strip() for step, k in zip(steps, indices)]
        label = self.seg.encode("+" + self.after_label)
        bodies = self.seg.encode_many([(" " if k == 0 else self.before_step) + step + self.after_step
                                       for step, k in zip(steps, indices)])
        return [(body + label, [], len(body) - 1) for body in bodies]


class _MathShepherdFormat(_LabelFormat):
    kind = "math-shepherd"
    options = ("layout", "step_separator", "system_prompt")

    def __init__(self, tok, seg: _Segmenter, source, layout: str | None = None, step_separator: str | None = None,
                 system_prompt: str | None = None):
        layout = layout or "model-card"
        if layout not in MATH_SHEPHERD_LAYOUTS:
            raise ValueError(f"unknown math-shepherd layout {layout!r}: one of {', '.join(MATH_SHEPHERD_LAYOUTS)}")
        if system_prompt is not None and layout != "sal":
            raise ValueError("the math-shepherd model-card layout has no system prompt; pass layout='sal' for one")
        if layout == "sal" and system_prompt is None:
            from ..presets import sal_preset

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

    def rows(self, steps, indices, outcome=False):
        texts = [(" " if k == 0 else self.sep) + step for step, k in zip(steps, indices)]
        if outcome:
            return [(body, list(self.tag_ids), len(body) + len(self.tag_ids) - 1) for body in self.seg.encode_many(texts)]
        # One segment: the tag after a step that ends in whitespace tokenizes with it.
        out = []
        for step, k, ids in zip(steps, indices, self.seg.encode_many([text + " ки" for text in texts])):
            out.append((ids, [], len(ids) - 1) if ids and ids[-1] == self.tag else
                       ValueError(f"step {k} + ' ки' does not end with the step tag token: {step!r}"))
        return out


class _QwenPRMFormat(Format):
    kind = "qwen-prm"
    needs = "hidden"
    head_keys = {"score.0.weight": ("h", "h"), "score.0.bias": ("h",), "score.2.weight": (2, "h"), "score.2.bias": (2,)}
    options = ("system_prompt",)

    def read_scores(self, rows, head):
        """softmax(score(h))[1], score = Linear(h, h) -> ReLU -> Linear(h, 2)."""
        x = torch.relu(rows.float() @ head["score.0.weight"].T + head["score.0.bias"])
        return (x @ head["score.2.weight"].T + head["score.2.bias"]).softmax(-1)[:, 1]

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

    def rows(self, steps, indices, outcome=False):
        if outcome:
            bodies = self.seg.encode_many([self.head_tail + step if k == 0 else OUTCOME_JOIN + step
                                           for step, k in zip(steps, indices)])
            return [(body, [self.tag], len(body)) for body in bodies]
        bodies = self.seg.encode_many([(self.head_tail if k == 0 else "") + step for step, k in zip(steps, indices)])
        return [(body + [self.tag], [], len(body)) for body in bodies]


class _SkyworkFormat(Format):
    kind = "skywork"
    needs = "hidden"
    head_keys = {"v_head.summary.weight": (1, "h"), "v_head.summary.bias": (1,)}

    def read_scores(self, rows, head):
        """sigmoid(v_head.summary(h))."""
        v = rows.float() @ head["v_head.summary.weight"].T + head["v_head.summary.bias"]
        return torch.sigmoid(v[:, 0])

    def __init__(self, tok, seg: _Segmenter, source):
        self.tok, self.seg = tok, seg
        self.bos = tok.bos_token or ""
        self.newline = seg.single_id("\n", 'step token "\\n"', source)

    def prefix_ids(self, question):
        return self.seg.encode(self.bos + question + "\n", first=True, special=True)

    def rows(self, steps, indices, outcome=False):
        # As the reference's prepare_input over the solution joined by "\n\n": every piece of the
        # text split at "\n", empty ones too, is tokenized on its own (as tokenizer.encode does,
        # special tokens included) and followed by a "\n"; so a step after the first starts with
        # the "\n" of the empty piece between two steps. Outcome mode has no tags: the score is
        # read at the body's last "\n", as in step mode.
        lines = [step.split("\n") for step in steps]
        encoded = iter(self.seg.encode_many([line for pieces in lines for line in pieces if line], first=True, special=True))
        out = []
        for pieces, k in zip(lines, indices):
            ids = [] if k == 0 else [self.newline]
            for line in pieces:
                ids += (next(encoded) if line else []) + [self.newline]
            out.append((ids, [], len(ids) - 1))
        return out


FORMATS: dict[str, type[Format]] = {cls.kind: cls for cls in (_RLHFlowFormat, _MathShepherdFormat, _QwenPRMFormat, _SkyworkFormat)}


def make_format(kind: str, tokenizer, source="the PRM", **options) -> Format:
    """The token layout of a PRM kind over `tokenizer` (see the module docstring). Options:
    math-shepherd's layout ("model-card", default, or "sal") and step_separator (default: the
    layout's); system_prompt: qwen-prm's system message (None: Qwen's, "": none) or the text
    before the question in math-shepherd's sal layout."""
    if kind not in FORMATS:
        raise ValueError(f"unknown PRM kind {kind!r}: one of {', '.join(KINDS)}")
    cls = FORMATS[kind]
    for name, value in options.items():
        if value is not None and name not in cls.options:
            having = [k for k, c in FORMATS.items() if name in c.options]
            raise ValueError(f"{name}= applies to {', '.join(having)} PRMs, not {kind!r}")
    return cls(tokenizer, _Segmenter(tokenizer), source, **{k: v for k, v in options.items() if v is not None})
