"""The engine: batches every live sequence into one forward per step, samples, stops, frees.

A request's prompt is prefilled once (in chunks when long, mixed with other sequences' decode
tokens), then forked into its `n` samples, which share the prompt's blocks. Each step runs the
decode token of every running sample plus as many prefill tokens as the step budget allows. When
the pool runs dry, the most recently started sample is preempted (its blocks freed) and later
recomputed from its tokens; its counter-based random stream makes the result identical.
The schedule of one run is `scheduler.py`, when a sample stops `stopping.py`, the sequence
types `sequence.py`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .block_manager import OutOfBlocks
from .loader import LoadedModel, load_model
from .model_runner import ModelRunner
from .overlap import OverlappedDecoder
from .sampling import SamplingParams, fresh_seed, sample_seed
from .scheduler import PoolTooSmall, Scheduler
from .sequence import Branch, CompletionOutput, Request, RequestOutput, Sample  # noqa: F401  (public names)
from .stopping import StopChecker


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
        overlap: bool = False,
        cuda_graphs: bool = False,
        cuda_graph_max_batch: int = 256,
    ):
        if not isinstance(model, LoadedModel):
            model = load_model(model)
        self.model = model
        self.prm = prm
        self.tokenizer = model.tokenizer
        self.runner = ModelRunner(
            model, kv_cache_bytes=kv_cache_bytes, block_size=block_size, backend=backend,
            enable_prefix_cache=enable_prefix_cache, num_blocks=num_blocks, cuda_graphs=cuda_graphs,
            cuda_graph_max_batch=cuda_graph_max_batch,
        )
        self.max_batch_tokens = max_batch_tokens or (8192 if model.device.type == "cuda" else 1024)
        self.stopper = StopChecker(model)
        # Off by default until a GPU run has checked them (see overlap.py, cuda_graphs.py).
        self.overlap = overlap
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

    def release_many(self, branches: list[Branch]) -> None:
        """`release` of each, in one call to the block manager."""
        held = [b for b in branches if b.seq is not None]
        self.runner.free_many([b.seq for b in held])
        for b in held:
            b.seq = None

    def expand(self, branches: list[Branch], counts: list[int], sampling, seeds: list[int] | None = None,
               on_finish=None):
        """Continue each branch `counts[i]` times (fork + sample until a stop), all branches of
        all problems decoding together. Consumes the branches; returns, per branch, a list of
        (child branch, CompletionOutput) whose child stays in the cache for the next step.
        `sampling`: one SamplingParams, or one per branch. `seeds[i]` seeds branch i's children
        (default: derived from the sampling seed). `on_finish([(branch index, child index,
        text), ...])` is told of the children each step finished, while the others decode on
        (a search starts its verifier's work on them there: on a GPU, behind the device's steps)."""
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
            request = Request(i, None, branch.token_ids, params, seed, keep_sequences=True)
            request.samples = [Sample(request, j, sample_seed(seed, j)) for j in range(count)]
            first = request.samples[0]
            # An evicted branch (seq None) is recomputed from its tokens like a preempted sample.
            first.seq, first.pending, first.forks_pending = branch.seq, list(branch.pending), count - 1
            requests.append(request)
        report = None
        if on_finish is not None:
            def report(samples):
                on_finish([(s.request.index, s.index, self._final_text(s)) for s in samples])
        self._run([r.samples[0] for r in requests], report)
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

    def _make_request(self, index: int, prompt, params: SamplingParams, base_seed: int) -> Request:
        text, ids = self._encode(index, prompt)
        self._check_prompt(index, ids)
        request = Request(index, text, ids, params, sample_seed(base_seed, index))
        request.samples = [Sample(request, i, sample_seed(request.seed, i)) for i in range(params.n)]
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

    def _output(self, request: Request) -> RequestOutput:
        outs = [
            CompletionOutput(s.index, s.generated, self._final_text(s), s.finish_reason, s.stop_reason)
            for s in request.samples
        ]
        return RequestOutput(request.prompt, request.prompt_ids, outs)

    def _final_text(self, s: Sample) -> str | None:
        """A finished sample's text, decoded once (an `on_finish` report may have asked first)."""
        if s.text is None:
            s.text = self.stopper.final_text(s)
        return s.text

    # --- the loop ------------------------------------------------------------------------------
    def _run(self, samples: list[Sample], on_finish=None) -> None:
        sched = Scheduler(self.runner, self.max_batch_tokens, self.stats, self.stopper, samples, on_finish)
        while sched.waiting or len(sched.running):
            if self.overlap and not sched.waiting and len(sched.running) and OverlappedDecoder(sched).run():
                continue
            batch = sched.schedule()
            out = None
            while out is None:
                try:
                    out = self._forward(sched, batch)
                except OutOfBlocks:
                    batch = sched.preempt(batch)
            self.stats["peak_used_blocks"] = max(self.stats["peak_used_blocks"], self.runner.blocks.num_used_blocks)
            sched.postprocess(batch, out)

    def _forward(self, sched: Scheduler, batch):
        return self.runner.forward(*batch.forward_inputs(sched.running))
