"""The engine: batches every live sequence into one forward per step, samples, stops, frees.

A request's prompt is prefilled once (in chunks when long, mixed with other sequences' decode
tokens), then forked into its `n` samples, which share the prompt's blocks. Each step runs the
decode token of every running sample plus as many prefill tokens as the step budget allows. When
the pool runs dry, the most recently started sample is preempted (its blocks freed) and later
recomputed from its tokens; its counter-based random stream makes the result identical.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .block_manager import OutOfBlocks
from .loader import LoadedModel, load_model
from .model_runner import ModelRunner
from .sampling import SamplingParams, fresh_seed, sample_seed


class PoolTooSmall(OutOfBlocks, ValueError):
    """The KV pool cannot hold one sequence of a request even with every other one evicted
    (an `OutOfBlocks`, and a `ValueError` about the engine's size): raise kv_cache_bytes."""


@dataclass
class CompletionOutput:
    index: int
    token_ids: list[int]
    text: str | None
    finish_reason: str  # "eos" | "stop" (stop string or stop token) | "length"
    stop_reason: str | int | None = None  # the stop string or token id that ended it


@dataclass
class RequestOutput:
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]

    @property
    def text(self) -> str | None:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str:
        return self.outputs[0].finish_reason


@dataclass
class Branch:
    """A live sequence of the policy: its handle in the cache, its whole context, and the tokens at
    its end not yet fed to the model (at least one: continuing needs the last token's logits).
    Search strategies hold branches; `Engine.expand` consumes them and returns their children."""

    seq: int | None  # None: evicted from the cache under pool pressure; recomputed when expanded
    token_ids: list[int]
    pending: list[int]


@dataclass(eq=False)  # identity comparison: compared in hot loops
class _Request:
    index: int
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    samples: list["_Sample"] = field(default_factory=list)
    keep_sequences: bool = False  # expand(): finished samples stay in the cache as branches


@dataclass(eq=False)
class _Sample:
    """One continuation of a request. Before its prompt is prefilled, a request is represented by
    its sample 0 alone (`forks_pending` > 0), which is forked when the prompt's logits arrive."""

    request: _Request
    index: int
    seed: int
    generated: list[int] = field(default_factory=list)
    seq: int | None = None  # handle in the block manager; None while waiting
    pending: list[int] = field(default_factory=list)  # tokens to feed in the coming forwards
    forks_pending: int = 0
    finish_reason: str | None = None
    stop_reason: str | int | None = None

    def context(self) -> list[int]:
        return self.request.prompt_ids + self.generated


class Engine:
    def __init__(
        self,
        model: LoadedModel | str | Path,
        prm=None,
        kv_cache_bytes: int | None = None,
        block_size: int = 16,
        backend="auto",  # "auto" | "torch" | "triton", or an AttentionBackend
        enable_prefix_cache: bool = True,
        max_batch_tokens: int | None = None,
        num_blocks: int | None = None,
    ):
        if not isinstance(model, LoadedModel):
            model = load_model(model)
        self.model = model
        self.prm = prm
        self.tokenizer = model.tokenizer
        self.runner = ModelRunner(
            model, kv_cache_bytes=kv_cache_bytes, block_size=block_size, backend=backend,
            enable_prefix_cache=enable_prefix_cache, num_blocks=num_blocks,
        )
        self.max_batch_tokens = max_batch_tokens or (8192 if model.device.type == "cuda" else 1024)
        self._piece: dict[int, str] = {}  # token id -> its text decoded alone (stop pre-filter)
        self.stats = {"prefill_tokens": 0, "decode_tokens": 0, "cached_prompt_tokens": 0, "preemptions": 0, "steps": 0, "peak_used_blocks": 0, "evictions": 0}

    # --- public API ----------------------------------------------------------------------------
    def generate(self, prompts, sampling: SamplingParams | None = None) -> list[RequestOutput]:
        """Generate for each prompt (a string, or a list of token ids); one output per prompt,
        each with `sampling.n` completions."""
        sampling = sampling or SamplingParams()
        if isinstance(prompts, str) or (len(prompts) and isinstance(prompts[0], (int, np.integer))):
            prompts = [prompts]
        self._check_sampling(sampling)
        base_seed = fresh_seed() if sampling.seed is None else sampling.seed
        requests = [self._make_request(i, p, sampling, base_seed) for i, p in enumerate(prompts)]
        self._run([r.samples[0] for r in requests])
        return [self._output(r) for r in requests]

    def search(self, problems, strategy, sampling: SamplingParams | None = None, prm=None, **options):
        """Run a search strategy over problems (`ttc_fast.data.Problem`s, or question strings);
        returns one `SearchResult` per problem, in input order. `prm` defaults to the engine's."""
        from .data import Problem
        from .search import TreeSearch

        problems = [p if isinstance(p, Problem) else Problem(f"q{i}", str(p), "", "math", {}) for i, p in enumerate(problems)]
        search = TreeSearch(self, prm if prm is not None else self.prm, strategy, sampling, **options)
        by_id = {id(p): i for i, p in enumerate(problems)}
        results = [None] * len(problems)
        for result, problem in search.run_with_problems(problems):
            results[by_id[id(problem)]] = result
        return results

    def start(self, prompt) -> Branch:
        """A branch holding `prompt` (text or token ids), for `expand`. Blocks a cached prompt
        shares are attached now; the rest is computed by the first expansion."""
        text, ids = self._encode(0, prompt)
        self._check_prompt(None, ids)
        seq, cached = self.runner.new_sequence(ids)
        self.stats["cached_prompt_tokens"] += cached
        return Branch(seq, ids, ids[cached:])

    def fork(self, branch: Branch, n: int) -> list[Branch]:
        """n new branches sharing every block of `branch` (which stays valid)."""
        if branch.seq is None:  # evicted: the copies are recomputed (sharing via the prefix cache)
            return [Branch(None, list(branch.token_ids), list(branch.token_ids)) for _ in range(n)]
        return [Branch(seq, list(branch.token_ids), list(branch.pending)) for seq in self.runner.fork(branch.seq, n)]

    def release(self, branch: Branch) -> None:
        if branch.seq is not None:
            self.runner.free(branch.seq)
            branch.seq = None

    def expand(self, branches: list[Branch], counts: list[int], sampling, seeds: list[int] | None = None):
        """Continue each branch `counts[i]` times (fork + sample until a stop), all branches of
        all problems decoding together. Consumes the branches; returns, per branch, a list of
        (child branch, CompletionOutput) whose child stays in the cache for the next step.
        `sampling`: one SamplingParams, or one per branch. `seeds[i]` seeds branch i's children
        (default: derived from the sampling seed)."""
        if len(counts) != len(branches) or any(c < 1 for c in counts):
            raise ValueError("expand needs one count >= 1 per branch")
        per_branch = sampling if isinstance(sampling, (list, tuple)) else [sampling] * len(branches)
        if len(per_branch) != len(branches):
            raise ValueError("expand needs one SamplingParams per branch (or a single one)")
        for params in per_branch:
            self._check_sampling(params)
        base_seed = fresh_seed() if per_branch and per_branch[0].seed is None else (per_branch[0].seed if per_branch else 0)
        requests = []
        for i, (branch, count, params) in enumerate(zip(branches, counts, per_branch)):
            if branch.seq is not None and not branch.pending:
                raise ValueError(f"branch {i} has no pending token: its last token's logits are gone")
            seed = seeds[i] if seeds is not None else sample_seed(base_seed, i)
            request = _Request(i, None, branch.token_ids, params, seed, keep_sequences=True)
            request.samples = [_Sample(request, j, sample_seed(seed, j)) for j in range(count)]
            first = request.samples[0]
            # An evicted branch (seq None) is recomputed from its tokens like a preempted sample.
            first.seq, first.pending, first.forks_pending = branch.seq, list(branch.pending), count - 1
            requests.append(request)
        self._run([r.samples[0] for r in requests])
        results = []
        for request in requests:
            out = self._output(request)
            results.append([
                (Branch(s.seq, request.prompt_ids + s.generated, [s.generated[-1]] if s.seq is not None else []), o)
                for s, o in zip(request.samples, out.outputs)
            ])
        return results

    # --- requests ------------------------------------------------------------------------------
    def _encode(self, index: int, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"prompt {index} is text but {self.model.path} has no tokenizer; pass token ids")
            return prompt, list(self.tokenizer(prompt)["input_ids"])
        return None, [int(t) for t in prompt]

    def _make_request(self, index: int, prompt, params: SamplingParams, base_seed: int) -> _Request:
        text, ids = self._encode(index, prompt)
        self._check_prompt(index, ids)
        request = _Request(index, text, ids, params, sample_seed(base_seed, index))
        request.samples = [_Sample(request, i, sample_seed(request.seed, i)) for i in range(params.n)]
        request.samples[0].forks_pending = params.n - 1
        return request

    def _check_sampling(self, params: SamplingParams) -> None:
        if params.stop and self.tokenizer is None:
            raise ValueError(f"stop strings need a tokenizer, and {self.model.path} has none; use stop_token_ids")

    def _check_prompt(self, index: int | None, ids: list[int]) -> None:
        name = "the prompt" if index is None else f"prompt {index}"
        if not ids:
            raise ValueError(f"{name} is empty")
        vocab = self.model.config.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"{name} holds token ids outside the vocabulary [0, {vocab})")
        limit = self.model.config.max_context
        if len(ids) >= limit:
            raise ValueError(f"{name} has {len(ids)} tokens; the model attends over at most {limit} positions")
        need = self.runner.blocks_for(len(ids) + 1)
        if need > self.runner.num_blocks:
            raise PoolTooSmall(
                f"{name} has {len(ids)} tokens and needs {need} KV blocks, but the pool holds only "
                f"{self.runner.num_blocks}; raise kv_cache_bytes"
            )

    def _output(self, request: _Request) -> RequestOutput:
        outs = [
            CompletionOutput(s.index, s.generated, self._final_text(s), s.finish_reason, s.stop_reason)
            for s in request.samples
        ]
        return RequestOutput(request.prompt, request.prompt_ids, outs)

    # --- the loop ------------------------------------------------------------------------------
    def _run(self, samples: list[_Sample]) -> None:
        waiting: deque[_Sample] = deque(samples)
        running: list[_Sample] = []
        self._kept: list[_Sample] = []  # finished samples whose blocks stay (expand); evictable
        while waiting or running:
            batch = self._schedule(waiting, running)
            out = None
            while out is None:
                try:
                    out = self._forward(batch)
                except OutOfBlocks:
                    batch = self._preempt(batch, waiting, running)
            self.stats["peak_used_blocks"] = max(self.stats["peak_used_blocks"], self.runner.blocks.num_used_blocks)
            self._postprocess(batch, out, waiting, running)

    def _schedule(self, waiting: deque, running: list) -> list[tuple[_Sample, list[int]]]:
        """Decode tokens of all running samples, then prefill chunks within the token budget."""
        batch = [(s, s.pending) for s in running]
        budget = self.max_batch_tokens - len(batch)
        runner = self.runner
        bs = runner.block_size
        first_blocks = set()  # first full blocks of the prompts starting in this step
        while waiting and budget > 0:
            s = waiting[0]
            if s.seq is None:
                context = s.context()
                reserve = len(running) // 4 + 1  # headroom so running samples can keep decoding
                if runner.blocks.num_available_blocks < runner.blocks_for(len(context) + 1) + reserve and batch:
                    break
                head = tuple(context[:bs]) if len(context) > bs else None
                if head is not None and head in first_blocks:
                    # Same first block as a prompt computed in this step: start next step, when
                    # the prefix cache holds that prompt's blocks, instead of computing them twice.
                    break
                first_blocks.add(head)
                s.seq, cached = runner.new_sequence(context)
                s.pending = context[cached:]
                self.stats["cached_prompt_tokens"] += cached
            chunk = s.pending[:budget]
            batch.append((s, chunk))
            budget -= len(chunk)
            if len(chunk) == len(s.pending):
                waiting.popleft()
                running.append(s)
            else:
                break  # the rest of this prompt goes in the next step
        return batch

    def _forward(self, batch):
        # Logits are needed where a sample's context is complete: decodes and last prefill chunks.
        offsets = [[len(chunk) - 1] if len(chunk) == len(s.pending) else [] for s, chunk in batch]
        return self.runner.forward([s.seq for s, _ in batch], [chunk for _, chunk in batch], offsets)

    def _preempt(self, batch, waiting: deque, running: list):
        """Free blocks and retry without the victim: first a waiting sample that holds blocks (a
        partly prefilled prompt, a branch not yet expanded; latest first), else the most
        recently started running sample. Victims are recomputed from their tokens later."""
        victim = next((s for s in reversed(waiting) if s.seq is not None), None)
        if victim is None and self._kept:
            # A finished branch of expand(): evict it; it is recomputed when next expanded.
            victim = self._kept.pop()
            self.runner.free(victim.seq)
            victim.seq, victim.pending = None, []
            self.stats["evictions"] += 1
            return batch
        if victim is None and running:
            victim = running.pop()
            waiting.appendleft(victim)
        rest = [(s, chunk) for s, chunk in batch if s is not victim]
        if victim is None or not rest:
            raise PoolTooSmall(
                "the KV pool cannot hold a single sequence of this request "
                f"({self.runner.num_blocks} blocks of {self.runner.block_size} tokens); raise kv_cache_bytes"
            ) from None
        self.runner.free(victim.seq)
        victim.seq, victim.pending = None, []
        self.stats["preemptions"] += 1
        return rest

    def _postprocess(self, batch, out, waiting: deque, running: list) -> None:
        self.stats["steps"] += 1
        rows, targets = [], []
        for i, (s, chunk) in enumerate(batch):
            self.stats["decode_tokens" if s.generated and len(chunk) == 1 else "prefill_tokens"] += len(chunk)
            s.pending = s.pending[len(chunk):]
            if out.row_starts[i + 1] == out.row_starts[i]:
                continue  # a prefill chunk that does not finish its prompt
            for child in self._fork(s):
                rows.append(out.row_starts[i])
                targets.append(child)
                if child is not s:
                    running.append(child)
        if not targets:
            return
        tokens = self._sample(out.logits[rows], targets)
        finished = []
        for s, token in zip(targets, tokens):
            s.generated.append(token)
            s.pending = [token]
            if self._check_stop(s, token):
                finished.append(s)
                if s.request.keep_sequences:
                    self._kept.append(s)
                else:
                    self.runner.free(s.seq)
                    s.seq, s.pending = None, []
        if finished:
            done = set(map(id, finished))
            running[:] = [s for s in running if id(s) not in done]

    def _fork(self, s: _Sample) -> list[_Sample]:
        """After the prompt's logits arrive, sample 0 is forked into the request's other samples."""
        if s.forks_pending == 0:
            return [s]
        others = s.request.samples[1:]
        for child, seq in zip(others, self.runner.fork(s.seq, len(others))):
            child.seq = seq
        s.forks_pending = 0
        return [s] + others

    def _sample(self, logits: torch.Tensor, samples: list[_Sample]) -> list[int]:
        dev = logits.device
        params = [s.request.params for s in samples]
        temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=dev)
        top_k = torch.tensor([p.top_k for p in params], dtype=torch.int32, device=dev)
        top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=dev)
        seeds = torch.tensor([s.seed for s in samples], dtype=torch.int64, device=dev)
        positions = torch.tensor([len(s.request.prompt_ids) + len(s.generated) for s in samples], dtype=torch.int64, device=dev)
        tokens = self.runner.attention.sample(logits, temperature, top_k, top_p, seeds, positions)
        return tokens.tolist()

    # --- stopping ------------------------------------------------------------------------------
    def _check_stop(self, s: _Sample, token: int) -> bool:
        p = s.request.params
        if token in p.stop_token_ids:
            s.finish_reason, s.stop_reason = "stop", token
        elif not p.ignore_eos and token in self.model.eos_token_ids:
            s.finish_reason, s.stop_reason = "eos", token
        elif p.stop and self._hits_stop_string(s):
            s.finish_reason = "stop"
        elif len(s.generated) >= p.max_tokens or len(s.request.prompt_ids) + len(s.generated) >= self.model.config.max_context:
            s.finish_reason = "length"
        return s.finish_reason is not None

    def _may_end_a_stop(self, token: int, stops: tuple[str, ...]) -> bool:
        """Cheap pre-filter: can `token` be the one that completes a stop string? Its own text
        must hold the stop's last character, unless that text is unreliable alone (empty, a
        split multi-byte character) or the stop ends in a space (SentencePiece moves spaces
        onto the next token)."""
        piece = self._piece.get(token)
        if piece is None:
            piece = self._piece[token] = self.tokenizer.decode([token], skip_special_tokens=True)
        if not piece or "\ufffd" in piece:
            return True
        return any(stop[-1] in piece or stop[-1] == " " for stop in stops)

    def _hits_stop_string(self, s: _Sample) -> bool:
        # Decode a window of the latest tokens rather than token by token: single-token decodes
        # lose SentencePiece's leading spaces and split multi-byte characters. The window holds
        # enough tokens for the longest stop string even at one byte per token.
        stops = s.request.params.stop
        if not self._may_end_a_stop(s.generated[-1], stops):
            return False
        window = 4 * max(len(t) for t in stops) + 4
        text = self.tokenizer.decode(s.generated[-window:], skip_special_tokens=True)
        for stop in stops:
            if stop in text:
                s.stop_reason = stop
                return True
        return False

    def _final_text(self, s: _Sample) -> str | None:
        if self.tokenizer is None:
            return None
        text = self.tokenizer.decode(s.generated, skip_special_tokens=True)
        if isinstance(s.stop_reason, str):
            cut = text.find(s.stop_reason)
            if cut >= 0:
                text = text[: cut + (len(s.stop_reason) if s.request.params.include_stop_str_in_output else 0)]
        return text
