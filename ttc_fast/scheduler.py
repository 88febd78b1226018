"""One engine run's schedule: which samples go into each forward, who makes room when the pool
is full, and what each forward's logits become (sampled tokens, forks, stops).

    sched = Scheduler(runner, max_batch_tokens, stats, stopper, first_samples)
    while sched.waiting or sched.running:
        batch = sched.schedule()          # decode tokens of running samples, then prefill chunks
        out = forward(batch)              # on OutOfBlocks: batch = sched.preempt(batch), retry
        sched.postprocess(batch, out)     # sample, fork new requests' samples, stop, free

A request waits as its sample 0; when its prompt's logits arrive, sample 0 is forked into the
request's other samples, which share the prompt's blocks.
"""
from __future__ import annotations

from collections import deque

import torch

from .block_manager import OutOfBlocks
from .sequence import Sample
from .stopping import StopChecker


class PoolTooSmall(OutOfBlocks, ValueError):
    """The KV pool cannot hold one sequence of a request even with every other one evicted
    (an `OutOfBlocks`, and a `ValueError` about the engine's size): raise kv_cache_bytes."""


class Scheduler:
    def __init__(self, runner, max_batch_tokens: int, stats: dict, stopper: StopChecker, samples: list[Sample]):
        self.runner, self.max_batch_tokens, self.stats, self.stopper = runner, max_batch_tokens, stats, stopper
        self.waiting: deque[Sample] = deque(samples)
        self.running: list[Sample] = []
        self.kept: list[Sample] = []  # finished samples whose blocks stay (expand); evictable

    def schedule(self) -> list[tuple[Sample, list[int]]]:
        """Decode tokens of all running samples, then prefill chunks within the token budget."""
        waiting, running, runner = self.waiting, self.running, self.runner
        batch = [(s, s.pending) for s in running]
        budget = self.max_batch_tokens - len(batch)
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

    def preempt(self, batch):
        """Free blocks and retry without the victim: first a waiting sample that holds blocks (a
        partly prefilled prompt, a branch not yet expanded; latest first), else the most
        recently started running sample. Victims are recomputed from their tokens later."""
        victim = next((s for s in reversed(self.waiting) if s.seq is not None), None)
        if victim is None and self.kept:
            # A finished branch of expand(): evict it; it is recomputed when next expanded.
            victim = self.kept.pop()
            self.runner.free(victim.seq)
            victim.seq, victim.pending = None, []
            self.stats["evictions"] += 1
            return batch
        if victim is None and self.running:
            victim = self.running.pop()
            self.waiting.appendleft(victim)
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

    def postprocess(self, batch, out) -> None:
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
                    self.running.append(child)
        if not targets:
            return
        tokens = self._sample(out.logits[rows], targets)
        finished = []
        for s, token in zip(targets, tokens):
            s.generated.append(token)
            s.pending = [token]
            if self.stopper.check(s, token):
                finished.append(s)
                if s.request.keep_sequences:
                    self.kept.append(s)
                else:
                    self.runner.free(s.seq)
                    s.seq, s.pending = None, []
        if finished:
            done = set(map(id, finished))
            self.running[:] = [s for s in self.running if id(s) not in done]

    def _fork(self, s: Sample) -> list[Sample]:
        """After the prompt's logits arrive, sample 0 is forked into the request's other samples."""
        if s.forks_pending == 0:
            return [s]
        others = s.request.samples[1:]
        for child, seq in zip(others, self.runner.fork(s.seq, len(others))):
            child.seq = seq
        s.forks_pending = 0
        return [s] + others

    def _sample(self, logits: torch.Tensor, samples: list[Sample]) -> list[int]:
        dev = logits.device
        params = [s.request.params for s in samples]
        temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=dev)
        top_k = torch.tensor([p.top_k for p in params], dtype=torch.int32, device=dev)
        top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=dev)
        seeds = torch.tensor([s.seed for s in samples], dtype=torch.int64, device=dev)
        positions = torch.tensor([len(s.request.prompt_ids) + len(s.generated) for s in samples], dtype=torch.int64, device=dev)
        tokens = self.runner.attention.sample(logits, temperature, top_k, top_p, seeds, positions)
        return tokens.tolist()
