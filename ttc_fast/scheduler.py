"""One engine run's schedule: which samples go into each forward, who makes room when the pool
is full, and what each forward's logits become (sampled tokens, forks, stops).

    sched = Scheduler(runner, max_batch_tokens, stats, stopper, first_samples)
    while sched.waiting or len(sched.running):
        batch = sched.schedule()          # decode tokens of running samples, then prefill chunks
        out = forward(batch)              # on OutOfBlocks: batch = sched.preempt(batch), retry
        sched.postprocess(batch, out)     # sample, fork new requests' samples, stop, free

A request waits as its sample 0; when its prompt's logits arrive, sample 0 is forked into the
request's other samples, which share the prompt's blocks.

The running samples are a persistent batch: their sequence ids, last tokens, lengths and
sampling settings live in arrays (`RunningBatch`) updated in place, so a decode step builds its
forward and its sampling inputs without Python per sample; stop checks run only for the samples
whose new token may end them (`StopChecker.may_stop`) or whose length reached its limit.
"""
from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from .block_manager import OutOfBlocks
from .model_runner import PackedTokens
from .sequence import Sample
from .stopping import StopChecker


class PoolTooSmall(OutOfBlocks, ValueError):
    """The KV pool cannot hold one sequence of a request even with every other one evicted
    (an `OutOfBlocks`, and a `ValueError` about the engine's size): raise kv_cache_bytes."""


class RunningBatch:
    """The running samples, in order, and their per-sample state as arrays (row i = samples[i]).
    Every running sample holds a sequence and exactly one pending token: its last sampled one."""

    FIELDS = {"seq": np.int64, "token": np.int64, "length": np.int64, "limit": np.int64, "seed": np.int64,
              "temperature": np.float32, "top_k": np.int32, "top_p": np.float32, "group": np.int64}

    def __init__(self):
        self.samples: list[Sample] = []
        for name, dtype in self.FIELDS.items():
            setattr(self, name, np.zeros(0, dtype=dtype))

    def __len__(self) -> int:
        return len(self.samples)

    def add(self, samples: list[Sample], tokens: list[int], groups: list[int], max_context: int) -> None:
        """Append samples that have just sampled `tokens` (already in their `generated`)."""
        if not samples:
            return
        rows = {name: [] for name in self.FIELDS}
        for s, token, group in zip(samples, tokens, groups):
            p = s.request.params
            length = len(s.request.prompt_ids) + len(s.generated)
            for name, value in (("seq", s.seq), ("token", token), ("length", length),
                                ("limit", min(len(s.request.prompt_ids) + p.max_tokens, max_context)),
                                ("seed", s.seed), ("temperature", p.temperature), ("top_k", p.top_k),
                                ("top_p", p.top_p), ("group", group)):
                rows[name].append(value)
        self.samples += samples
        for name, dtype in self.FIELDS.items():
            setattr(self, name, np.concatenate([getattr(self, name), np.asarray(rows[name], dtype=dtype)]))

    def keep(self, mask: np.ndarray) -> None:
        self.samples = [s for s, k in zip(self.samples, mask.tolist()) if k]
        for name in self.FIELDS:
            setattr(self, name, getattr(self, name)[mask])

    def pop(self) -> Sample:
        """Remove and return the last sample (the most recently started)."""
        mask = np.ones(len(self), dtype=bool)
        mask[-1] = False
        last = self.samples[-1]
        self.keep(mask)
        return last


@dataclass
class Batch:
    """One forward: the first `num_decode` running samples' decode tokens, then prefill chunks
    (a sample and the tokens of its prompt or branch fed in this step)."""

    num_decode: int
    prefill: list[tuple[Sample, list[int]]] = field(default_factory=list)

    def forward_inputs(self, running: RunningBatch):
        """(sequence ids, packed tokens, output offset per sequence (-1: none)) for ModelRunner.forward."""
        n = self.num_decode
        seqs = np.concatenate([running.seq[:n], np.asarray([s.seq for s, _ in self.prefill], dtype=np.int64)])
        chunks = [chunk for _, chunk in self.prefill]
        tokens = PackedTokens(np.concatenate([running.token[:n], np.fromiter(itertools.chain.from_iterable(chunks), dtype=np.int64)]),
                              np.concatenate([np.ones(n, dtype=np.int64), np.asarray([len(c) for c in chunks], dtype=np.int64)]))
        # Logits are needed where a sample's context is complete: decodes and last prefill chunks.
        offsets = np.concatenate([np.zeros(n, dtype=np.int64), np.asarray(
            [len(chunk) - 1 if len(chunk) == len(s.pending) else -1 for s, chunk in self.prefill], dtype=np.int64)])
        return seqs, tokens, offsets


class Scheduler:
    def __init__(self, runner, max_batch_tokens: int, stats: dict, stopper: StopChecker, samples: list[Sample],
                 on_finish=None):
        """on_finish(samples): called with the samples just finished, before the next step runs,
        while the others decode on."""
        self.runner, self.max_batch_tokens, self.stats, self.stopper = runner, max_batch_tokens, stats, stopper
        self.on_finish, self.finished_now = on_finish, []
        self.waiting: deque[Sample] = deque(samples)
        self.running = RunningBatch()
        self.kept: list[Sample] = []  # finished samples whose blocks stay (expand); evictable
        self._groups: dict = {}  # sampling settings -> row of self._may_stop
        self._may_stop = np.zeros((0, runner.config.vocab_size), dtype=bool)

    def schedule(self) -> Batch:
        """Decode tokens of all running samples, then prefill chunks within the token budget."""
        waiting, runner = self.waiting, self.runner
        batch = Batch(len(self.running))
        budget = self.max_batch_tokens - batch.num_decode
        bs = runner.block_size
        first_blocks = set()  # first full blocks of the prompts starting in this step
        while waiting and budget > 0:
            s = waiting[0]
            if s.seq is None:
                context = s.context()
                reserve = len(self.running) // 4 + 1  # headroom so running samples can keep decoding
                if runner.blocks.num_available_blocks < runner.blocks_for(len(context) + 1) + reserve and \
                        (batch.num_decode or batch.prefill):
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
            batch.prefill.append((s, chunk))
            budget -= len(chunk)
            if len(chunk) == len(s.pending):
                waiting.popleft()
            else:
                break  # the rest of this prompt goes in the next step
        return batch

    def preempt(self, batch: Batch) -> Batch:
        """Free blocks and retry without the victim: first a waiting sample that holds blocks (a
        partly prefilled prompt, a branch not yet expanded; latest first), else the most
        recently started sample of the batch. Victims are recomputed from their tokens later."""
        victim = next((s for s in reversed(self.waiting) if s.seq is not None), None)
        if victim is None and self.kept:
            # A finished branch of expand(): evict it; it is recomputed when next expanded.
            victim = self.kept.pop()
            self._evict(victim)
            self.stats["evictions"] += 1
            return batch
        if victim is None:
            # A sample whose whole context is in this step has started, after every running one.
            victim = next((s for s, chunk in reversed(batch.prefill) if len(chunk) == len(s.pending)), None)
            if victim is not None:
                self.waiting.appendleft(victim)
        if victim is None and batch.num_decode:
            victim = self.running.pop()
            self.waiting.appendleft(victim)
        rest = Batch(min(batch.num_decode, len(self.running)), [(s, c) for s, c in batch.prefill if s is not victim])
        if victim is None or not (rest.num_decode or rest.prefill):
            raise PoolTooSmall(
                "the KV pool cannot hold a single sequence of this request "
                f"({self.runner.num_blocks} blocks of {self.runner.block_size} tokens); raise kv_cache_bytes"
            ) from None
        self._evict(victim)
        self.stats["preemptions"] += 1
        return rest

    def _evict(self, s: Sample) -> None:
        self.runner.free(s.seq)
        s.seq, s.pending = None, []

    def postprocess(self, batch: Batch, out) -> None:
        self.stats["steps"] += 1
        running, n = self.running, batch.num_decode
        self.stats["decode_tokens"] += n
        # Prefill rows whose prompt (or branch) is complete: sample them, forking new requests.
        started: list[Sample] = []
        rows = [np.arange(n)]
        for i, (s, chunk) in enumerate(batch.prefill):
            self.stats["decode_tokens" if s.generated and len(chunk) == 1 else "prefill_tokens"] += len(chunk)
            s.pending = s.pending[len(chunk):]
            row = out.row_starts[n + i]
            if out.row_starts[n + i + 1] == row:
                continue  # a prefill chunk that does not finish its prompt
            children = self._fork(s)
            started += children
            rows.append(np.full(len(children), row))
        rows = np.concatenate(rows)
        if not len(rows):
            return
        new_groups = [self._group(s.request.params) for s in started]
        logits = out.logits if len(rows) == len(out.logits) and not started else out.logits[torch.from_numpy(rows)]
        tokens = self._sample(logits, n, started, new_groups)

        if n:
            self.settle_decoded(tokens[:n])
        # Newly started samples: their first token.
        still, still_tokens, still_groups = [], [], []
        for s, t, g in zip(started, tokens[n:].tolist(), new_groups):
            s.generated.append(t)
            if self.stopper.check(s, t):
                self._finish(s)
            else:
                still.append(s)
                still_tokens.append(t)
                still_groups.append(g)
        running.add(still, still_tokens, still_groups, self.runner.config.max_context)
        self._report_finished()

    def settle_decoded(self, decoded: np.ndarray, continued: set | None = None) -> None:
        """The first len(decoded) running samples drew `decoded`: append, then check only the
        rows that may have stopped. `continued`: ids of samples whose next step is already in
        flight (overlapped decoding), which holds an unknown token for them to take back."""
        running, n = self.running, len(decoded)
        for s, t in zip(running.samples, decoded.tolist()):
            s.generated.append(t)
        running.token[:n] = decoded
        running.length[:n] += 1
        maybe = np.flatnonzero(self._may_stop[running.group[:n], decoded] | (running.length[:n] >= running.limit[:n]))
        done = np.zeros(len(running), dtype=bool)
        for i in maybe.tolist():
            s = running.samples[i]
            if self.stopper.check(s, s.generated[-1]):
                done[i] = True
                if continued is not None and id(s) in continued and s.request.keep_sequences:
                    self.runner.blocks.truncate(s.seq, 1)
                self._finish(s)
        if done.any():
            running.keep(~done)
        self._report_finished()

    def _report_finished(self) -> None:
        if self.finished_now:
            finished, self.finished_now = self.finished_now, []
            self.on_finish(finished)

    def _finish(self, s: Sample) -> None:
        s.pending = [s.generated[-1]]
        if self.on_finish is not None:
            self.finished_now.append(s)
        if s.request.keep_sequences:
            self.kept.append(s)
        else:
            self._evict(s)

    def _fork(self, s: Sample) -> list[Sample]:
        """After the prompt's logits arrive, sample 0 is forked into the request's other samples."""
        if s.forks_pending == 0:
            return [s]
        others = s.request.samples[1:]
        for child, seq in zip(others, self.runner.fork(s.seq, len(others))):
            child.seq = seq
        s.forks_pending = 0
        return [s] + others

    def _group(self, params) -> int:
        """The row of `params`' stop table in `self._may_stop`."""
        g = self._groups.get(params)
        if g is None:
            g = self._groups[params] = len(self._groups)
            self._may_stop = np.concatenate([self._may_stop, self.stopper.may_stop(params)[None]])
        return g

    def _sample(self, logits: torch.Tensor, n: int, started: list[Sample], groups: list[int]) -> np.ndarray:
        """Tokens for the first n running samples, then for `started`."""
        running = self.running
        params = [s.request.params for s in started]

        def column(name, values, dtype):
            return torch.from_numpy(np.concatenate([getattr(running, name)[:n], np.asarray(values, dtype=dtype)]))

        dev = logits.device
        args = (
            column("temperature", [p.temperature for p in params], np.float32),
            column("top_k", [p.top_k for p in params], np.int32),
            column("top_p", [p.top_p for p in params], np.float32),
            column("seed", [s.seed for s in started], np.int64),
            column("length", [len(s.request.prompt_ids) + len(s.generated) for s in started], np.int64),
        )
        tokens = self.runner.attention.sample(logits, *(a.to(dev) for a in args))
        return tokens.cpu().numpy()
