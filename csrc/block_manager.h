// Paged KV-cache block manager: reference-counted blocks, copy-on-write forks and a
// content-verified prefix cache with LRU eviction.
//
// This file and block_manager.cpp hold the logic only (plain C++17, no Python); bindings.cpp is
// the pybind11 glue. ttc_fast/block_manager_ref.py is a plain-Python twin with the identical
// deterministic policy (same block ids for the same operation sequence), used as the test oracle.
#pragma once

#include <cstdint>
#include <deque>
#include <map>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace ttc {

// Not enough free + evictable blocks for a request; the manager is left unchanged.
// Exposed to Python as ttc_fast._C.OutOfBlocks (a RuntimeError).
struct OutOfBlocksError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// A sequence id that is not live. Exposed to Python as KeyError.
struct UnknownSequenceError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// Chained 64-bit block hash, shared bit-for-bit with the Python twin: the hash of a full block
// is derived from its parent block's hash (kHashSeed for the first block) and its tokens.
constexpr uint64_t kHashSeed = 0x9E3779B97F4A7C15ULL;
uint64_t hash_block(uint64_t parent_hash, const int32_t* tokens, int64_t n);

using Copy = std::pair<int32_t, int32_t>;  // (src block, dst block): the caller copies KV src->dst

class BlockManager {
public:
    BlockManager(int64_t num_blocks, int64_t block_size, bool enable_prefix_cache = true);

    int64_t new_sequence();
    // Attach cached full blocks matching a prefix of `tokens` to an empty sequence; returns the
    // number of tokens covered (a multiple of block_size, always < tokens.size()).
    int64_t match_prefix(int64_t seq, const int32_t* tokens, int64_t n);
    // Reserve slots for n tokens: slots_out[i] receives the flat slot of tokens[i]; copy-on-write
    // block copies are appended to `copies`. Atomic: throws OutOfBlocksError having changed nothing.
    void append(int64_t seq, const int32_t* tokens, int64_t n, int32_t* slots_out,
                std::vector<Copy>& copies);
    // append() for every sequence in order, atomic as a whole. Sequence i's tokens are
    // flat[offsets[i] .. offsets[i+1]); slots_out has offsets.back() entries.
    void append_batch(const std::vector<int64_t>& seqs, const std::vector<int32_t>& flat,
                      const std::vector<int64_t>& offsets, int32_t* slots_out,
                      std::vector<Copy>& copies);
    // Overlapped decoding reserves a token's slot before the token is known: such a token is
    // kUnknownToken until set_tokens() writes it, and a block holding one enters the prefix cache
    // only once complete and known. truncate() takes back unknown tokens at a sequence's end.
    static constexpr int32_t kUnknownToken = -1;
    void set_tokens(const int64_t* seqs, const int64_t* positions, const int32_t* tokens, int64_t n);
    void truncate(int64_t seq, int64_t n);
    std::vector<int64_t> fork(int64_t parent, int64_t n);
    void free(int64_t seq);

    const std::vector<int32_t>& block_table(int64_t seq) const;
    int64_t seq_len(int64_t seq) const;
    int64_t blocks_needed(int64_t seq, int64_t n) const;
    int32_t refcount(int64_t block) const;
    // Width needed for block_tables(seqs): the largest block count among seqs.
    int64_t max_blocks(const std::vector<int64_t>& seqs) const;
    // Row-major [seqs.size(), width] table (padding 0) and context lengths. width >= max_blocks.
    void fill_block_tables(const std::vector<int64_t>& seqs, int64_t width, int32_t* tables,
                           int32_t* lens) const;

    void reset_prefix_cache();
    void check_invariants() const;  // throws std::runtime_error describing the first mismatch

    int64_t num_blocks() const { return num_blocks_; }
    int64_t block_size() const { return block_size_; }
    bool enable_prefix_cache() const { return enable_prefix_cache_; }
    int64_t num_sequences() const { return static_cast<int64_t>(seqs_.size()); }
    int64_t num_free_blocks() const { return static_cast<int64_t>(free_.size()); }
    int64_t num_cached_blocks() const { return static_cast<int64_t>(lru_.size()); }
    int64_t num_available_blocks() const { return num_free_blocks() + num_cached_blocks(); }
    int64_t num_used_blocks() const { return used_; }
    int64_t num_shared_blocks() const { return shared_; }

private:
    struct Block {
        int32_t ref = 0;
        std::vector<int32_t> tokens;  // tokens written so far (size = filled slots)
        uint64_t hash = 0;            // valid once full (and the prefix cache is on)
        int32_t parent = -1;          // previous block of the sequence that filled it
        bool registered = false;      // owns its key in cached_
        uint64_t tick = 0;            // last touch; LRU key while evictable
    };
    struct Sequence {
        std::vector<int32_t> blocks;
        int64_t len = 0;
        // Scratch for append_batch's dry run, valid while stamp == batch_epoch_.
        uint64_t stamp = 0;
        int64_t vlen = 0;
    };

    Sequence& get(int64_t seq);
    const Sequence& get(int64_t seq) const;
    int64_t new_blocks_for(int64_t len, int64_t n) const;  // excluding copy-on-write
    [[noreturn]] void throw_out_of_blocks(int64_t need) const;
    int32_t allocate();  // caller has checked availability
    void inc_ref(int32_t b, int32_t by = 1);
    void dec_ref(int32_t b);  // releases the block when it reaches 0
    void on_block_full(const Sequence& s, size_t index);  // s.blocks[index] is full
    void append_unchecked(Sequence& s, const int32_t* tokens, int64_t n, int32_t* slots_out,
                          std::vector<Copy>& copies);

    int64_t num_blocks_;
    int64_t block_size_;
    bool enable_prefix_cache_;

    std::vector<Block> blocks_;
    std::deque<int32_t> free_;                   // FIFO: allocate from the front, free to the back
    std::map<uint64_t, int32_t> lru_;            // tick -> evictable cached block (refcount 0)
    std::unordered_map<uint64_t, int32_t> cached_;  // block hash -> registered block
    std::unordered_map<int64_t, Sequence> seqs_;
    int64_t next_seq_ = 0;
    uint64_t tick_ = 0;
    uint64_t batch_epoch_ = 0;
    int64_t used_ = 0;    // blocks with refcount > 0
    int64_t shared_ = 0;  // blocks with refcount > 1
    std::vector<int32_t> scratch_dec_;  // append_batch dry run: pending refcount drops per block
    std::vector<int32_t> scratch_touched_;
};

}  // namespace ttc
