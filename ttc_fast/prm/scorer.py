"""The PRM scorer: step scores for search from a PRM's own prefix-shared paged KV cache.


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

The ids of each step come from the PRM's format (`ttc_fast.prm.formats`), encoded many steps
to a batch call of the tokenizer by `step_encoder.StepEncoder`; a search hands it the steps the
policy finishes (`prefetch`) while the rest still decode, so a call finds most already encoded.

Outcome mode (kind="outcome" or "outcome:<kind>"): the partial solution is judged as a whole:
the text is the question plus its steps joined as one solution, with the format's scoring tag
once, at the end, and one score read there. Step k contributes a body, kept in the sequence, and
a tag that only probes its score (`outcome_ids(step, k) -> (body, tag, score offset)` of the format).

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

Pool full: a search never fails for want of PRM blocks. When a call's new tokens do not fit,
`score_steps` evicts the KV of other handles, least recently scored first (an evicted handle
stays valid: its next call re-encodes its text, helped by the prefix cache; `stats["evictions"]`,
`stats["recomputed_tokens"]`); if the call's own rows still do not fit, it scores them in chunks,
evicting rows already scored. Only a single row longer than the whole pool raises
`PRMOutOfBlocks` (a subclass of `OutOfBlocks`), with nothing appended: build the PRM with a
larger `kv_cache_bytes`.
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from ..block_manager import OutOfBlocks
from ..flops import context_sum
from .base import PRM, PRMHandle
from .formats import Format
from .step_encoder import StepEncoder


class PRMOutOfBlocks(OutOfBlocks, ValueError):
    """The PRM's KV pool cannot hold one row of a call even when empty; nothing was appended
    (an `OutOfBlocks`, and a `ValueError` about the PRM's size): raise kv_cache_bytes."""


class ModelPRM(PRM):
    """A PRM run by ttc_fast's own decoder in its own paged KV cache."""

    def __init__(self, loaded, fmt: Format, head: dict | None, outcome: bool = False, kv_cache_bytes=None,
                 block_size: int = 16, backend="auto", num_blocks: int | None = None, max_batch_tokens: int = 8192):
        from ..model_runner import ModelRunner

        self.model, self.fmt, self.head, self.outcome = loaded, fmt, head, outcome
        self.kind = ("outcome:" if outcome else "") + fmt.kind
        self.tokenizer = loaded.tokenizer
        self.encoder = StepEncoder(fmt, outcome)
        self.max_batch_tokens = max_batch_tokens
        self.runner = ModelRunner(loaded, kv_cache_bytes=kv_cache_bytes, block_size=block_size, backend=backend,
                                  enable_prefix_cache=True, num_blocks=num_blocks)
        self.stats = {"prefix_tokens": 0, "prefix_tokens_cached": 0, "step_tokens": 0, "probe_tokens": 0,
                      "full_tokens": 0, "forwards": 0, "evictions": 0, "recomputed_tokens": 0, "context_sum": 0}
        # Handles holding KV, least recently scored first: the eviction order when the pool is short.
        self._resident: OrderedDict[int, PRMHandle] = OrderedDict()

    @property
    def tokens_processed(self) -> int:
        s = self.stats
        return s["prefix_tokens"] + s["step_tokens"] + s["probe_tokens"] + s["full_tokens"] + s["recomputed_tokens"]

    @property
    def context_processed(self) -> int:
        """The sum over `tokens_processed` of each token's context length (`flops.context_sum`)."""
        return self.stats["context_sum"]

    # --- scoring rows ------------------------------------------------------------------------------
    def _forward(self, seqs, tokens, offsets) -> torch.Tensor:
        """Append and run; the scores at `offsets` (rows may list none: no outputs at all when
        none does)."""
        want = any(offsets)
        want_hidden = want and self.fmt.needs == "hidden"
        out = self.runner.forward(seqs, tokens, offsets if want else None, want_logits=want and not want_hidden,
                                  want_hidden=want_hidden)
        self.stats["forwards"] += 1
        return self.fmt.read_scores(out.hidden if want_hidden else out.logits, self.head) if want else torch.empty(0)

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
        self.stats["context_sum"] += sum(context_sum(self.runner.seq_len(s) - len(f), len(f)) for s, f in zip(seqs, feeds))
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

    def free_many(self, handles):
        """`free` of each, in one call to the block manager."""
        held = list({id(h): h for h in handles if h.alive and h.seq is not None}.values())
        self.runner.free_many([h.seq for h in held])
        for h in held:
            self._resident.pop(id(h), None)
            h.seq = None
        for h in handles:
            h.alive = False

    def _evict(self, handle) -> None:
        self._resident.pop(id(handle), None)
        self.runner.free(handle.seq)
        handle.seq = None
        self.stats["evictions"] += 1

    def prefetch(self, items):
        self.encoder.prefetch(items)

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
        segs = self.encoder.rows(steps, [h.num_steps for h in handles])
        blocks = self.runner.blocks
        limit = self.model.config.max_context
        fits = []
        for i, (h, (kept, tag, _)) in enumerate(zip(handles, segs)):
            context = self.runner.seq_len(h.seq) if h.seq is not None else len(self.fmt.kept_ids(h.question, h.steps, self.outcome)[0])
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
        self.last_row_context = [0] * len(handles)
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
                tag = len(segs[i][1]) if off >= len(feed) else 0
                end = self.runner.seq_len(handles[i].seq)  # the tag ran on a fork of this length
                self.last_row_tokens[i] = len(feed) + tag
                self.last_row_context[i] = context_sum(end - len(feed), len(feed)) + context_sum(end, tag)
                self.stats["context_sum"] += self.last_row_context[i]
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
            later = [handles[i] for i in pending[take:] if handles[i].seq is not None]
            rows, fresh = [], []
            for i in pending[:take]:
                h = handles[i]
                kept, _, off = segs[i]
                if h.seq is not None:
                    rows.append((i, kept, off))
                    continue
                # Evicted: re-encode its whole text (cached full blocks of it are reused).
                ids, positions, _ = self.fmt.kept_ids(h.question, h.steps + [steps[i]], self.outcome)
                h.seq, cached = self.runner.new_sequence(ids[: positions[-1]])
                fresh.append(h)
                rows.append((i, ids[cached:], positions[-1] - cached))
            need = sum(blocks.blocks_needed(handles[i].seq, len(feed))
                       + self._probe_blocks(self.runner.seq_len(handles[i].seq) + len(feed), len(segs[i][1]))
                       for i, feed, _ in rows)
            if need > blocks.num_available_blocks:  # evict: least recently scored first, `later` last
                keep = {id(handles[i]) for i in pending[:take]}
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
        ids, positions, tag = self.fmt.kept_ids(question, steps, self.outcome)
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
        self.stats["context_sum"] += context_sum(0, len(ids))
        return vals.tolist()
