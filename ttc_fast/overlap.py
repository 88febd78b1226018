"""Overlapped decoding: the host prepares and launches step t+1 while the device runs step t.

In a run of pure decode steps (nothing waiting to prefill), step t+1's rows are step t's rows
that may continue: every sample still running except those that step t's token brings to their
length limit. Their input tokens are step t's draws, still on the device: the block manager
reserves their slots as unknown tokens (-1), step t+1 is launched, and only then does the host
wait for step t's tokens, append them, check stops, and write the now-known tokens into the
block manager (`set_tokens`, which also lets their blocks enter the prefix cache). A sample that
stopped at step t costs one wasted row in step t+1: its unknown token is taken back
(`truncate`) when its sequence stays (expand), or goes with its freed sequence.

On CUDA the device runs step t+1 while the host settles step t (the idea of SGLang's overlap
scheduler and vLLM V1's async scheduling); on the CPU the same code runs eagerly. The tokens
drawn do not change: a sample's stream depends only on its seed and positions.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .block_manager import OutOfBlocks
from .model_runner import PackedTokens


@dataclass
class DecodeStep:
    """One launched decode step: its rows (samples and their settings, `position` = where each
    row's draw goes) and its draws, on the device until `host_tokens` says otherwise."""

    samples: list
    arrays: dict  # name -> np.ndarray per row: seq, seed, temperature, top_k, top_p, position, limit
    tokens: torch.Tensor
    host_tokens: torch.Tensor | None = None  # pinned copy in flight (CUDA)
    ready: object = None  # CUDA event recorded after the copy
    parent_rows: np.ndarray | None = None  # each row's row in the step before, whose draw it was fed


class OverlappedDecoder:
    def __init__(self, scheduler):
        self.sched = scheduler
        self.runner = scheduler.runner

    def run(self) -> bool:
        """Decode the running samples, one step ahead of the host, until they stop or the pool
        cannot hold a step in advance. False when not even the first step could start."""
        running = self.sched.running
        arrays = {name: getattr(running, name).copy() for name in ("seq", "seed", "temperature", "top_k", "top_p", "limit")}
        arrays["position"] = running.length.copy()
        try:
            step = self._launch(list(running.samples), arrays, running.token.copy(), None)
        except OutOfBlocks:
            return False
        while step is not None:
            nxt = self._next(step)
            self._settle(step, nxt)
            step = nxt
        return True

    def _next(self, step: DecodeStep) -> DecodeStep | None:
        """Step t+1 from step t's rows that may continue, launched before step t is settled."""
        a = step.arrays
        rows = np.flatnonzero(np.fromiter((s.finish_reason is None for s in step.samples), dtype=bool,
                                          count=len(step.samples)) & (a["position"] + 1 < a["limit"]))
        if not len(rows):
            return None
        arrays = {name: v[rows] for name, v in a.items()}
        arrays["position"] = arrays["position"] + 1
        try:
            nxt = self._launch([step.samples[i] for i in rows.tolist()], arrays, None,
                               step.tokens[torch.as_tensor(rows, device=step.tokens.device)])
        except OutOfBlocks:
            return None  # settle step t alone; the engine's own loop makes room
        nxt.parent_rows = rows
        return nxt

    def _launch(self, samples: list, arrays: dict, host_inputs, device_inputs) -> DecodeStep:
        n = len(samples)
        flat = host_inputs if host_inputs is not None else np.full(n, -1, dtype=np.int64)
        out = self.runner.forward(arrays["seq"], PackedTokens(flat, np.ones(n, dtype=np.int64), device_inputs),
                                  np.zeros(n, dtype=np.int64))
        dev = out.logits.device
        args = [torch.from_numpy(arrays[name]).to(dev, non_blocking=True)
                for name in ("temperature", "top_k", "top_p", "seed", "position")]
        tokens = self.runner.attention.sample(out.logits, *args)
        step = DecodeStep(samples, arrays, tokens)
        if dev.type == "cuda":
            step.host_tokens = torch.empty(n, dtype=torch.int64, pin_memory=True)
            step.host_tokens.copy_(tokens, non_blocking=True)
            step.ready = torch.cuda.Event()
            step.ready.record()
        return step

    def _settle(self, step: DecodeStep, nxt: DecodeStep | None) -> None:
        """Wait for step t's tokens and settle them; then write the tokens step t+1 was fed."""
        sched = self.sched
        if step.ready is not None:
            step.ready.synchronize()
            tokens = step.host_tokens.numpy()
        else:
            tokens = step.tokens.cpu().numpy()
        alive = np.fromiter((s.finish_reason is None for s in step.samples), dtype=bool, count=len(step.samples))
        sched.stats["steps"] += 1
        sched.stats["decode_tokens"] += int(alive.sum())
        sched.stats["overlap_wasted_rows"] = sched.stats.get("overlap_wasted_rows", 0) + int((~alive).sum())
        continued = {id(s) for s in nxt.samples} if nxt is not None else set()
        sched.settle_decoded(tokens[alive], continued)
        if nxt is not None:
            # Step t+1's rows were fed step t's draws, known now for the samples still running;
            # a draw for position p is fed at position p.
            live = np.fromiter((s.finish_reason is None for s in nxt.samples), dtype=bool, count=len(nxt.samples))
            if live.any():
                self.runner.blocks.set_tokens(nxt.arrays["seq"][live], nxt.arrays["position"][live] - 1,
                                              tokens[nxt.parent_rows[live]])
