"""Paged KV-cache block manager (C++ extension `ttc_fast._C`).

`BlockManager(num_blocks, block_size, enable_prefix_cache=True)` owns a pool of `num_blocks`
KV blocks of `block_size` token slots; the flat slot of position p in block b is
`b * block_size + p % block_size`. Sequences are int64 ids handed out by the manager.

* `new_sequence()` -> id of a new empty sequence.
* `match_prefix(seq, tokens)` -> tokens covered by cached full blocks (content and chain verified),
  attached to the empty `seq`; never covers the last token (its logits are still needed).
* `append(seq, tokens)` -> `(slots int32[n], copies)`: slots the caller writes the KV of `tokens`
  into. `copies` lists `(src, dst)` block copies the caller must apply first: appending to a
  shared partial last block copies it (copy-on-write). Full blocks enter the prefix cache.
* `append_batch(seqs, tokens)` -> `(slot_mapping int32[sum n], copies)`: append for each, in
  order, as one all-or-nothing step (one call per decode step).
* `fork(parent, n)` -> n new sequences sharing all of parent's blocks (no copies).
* `free(seq)`: release blocks last to first; unused registered blocks stay cached (LRU, tail
  evicted first), others return to the FIFO free list. `free_many(seqs)`: free() of each in
  order, in one call; an unknown or repeated id raises before anything is freed.
* `block_tables(seqs, width=0)` -> `(int32[B, W] tables padded with 0, int32[B] lengths)`.
* Counters: `num_free_blocks`, `num_cached_blocks`, `num_available_blocks`, `num_used_blocks`,
  `num_shared_blocks`, `num_sequences`, `stats()`; `blocks_needed(seq, n)`, `refcount(block)`,
  `block_table(seq)`, `seq_len(seq)`, `reset_prefix_cache()`, `check_invariants()`.

Running out of blocks raises `OutOfBlocks` (a RuntimeError) and leaves the manager unchanged;
unknown sequence ids raise KeyError. `tests/block_manager_ref.py`'s `PyBlockManager` is a pure-Python
twin with the identical policy (the test oracle and benchmark baseline).
"""
try:
    from ._C import BlockManager, OutOfBlocks
except ImportError as exc:  # pragma: no cover - depends on the build
    raise ImportError(
        "ttc_fast._C (the C++ block manager) is not built: run "
        "pip install --no-build-isolation -e . from the repository root "
        f"(original error: {exc})"
    ) from exc

__all__ = ["BlockManager", "OutOfBlocks"]
