// Block manager logic; see block_manager.h for the contract. Every policy decision here
// (free-list order, eviction order, hash) is mirrored exactly by ttc_fast/block_manager_ref.py.
#include "block_manager.h"

#include <algorithm>
#include <limits>

namespace ttc {

namespace {

// splitmix64 finalizer: cheap, well mixed, and easy to reproduce in Python with 64-bit masking.
inline uint64_t mix64(uint64_t x) {
    x ^= x >> 30;
    x *= 0xBF58476D1CE4E5B9ULL;
    x ^= x >> 27;
    x *= 0x94D049BB133111EBULL;
    x ^= x >> 31;
    return x;
}

std::string out_of_blocks_message(int64_t need, int64_t free_blocks, int64_t cached) {
    return "need " + std::to_string(need) + " blocks, only " +
           std::to_string(free_blocks + cached) + " available (free " +
           std::to_string(free_blocks) + " + cached " + std::to_string(cached) + ")";
}

}  // namespace

uint64_t hash_block(uint64_t parent_hash, const int32_t* tokens, int64_t n) {
    uint64_t h = mix64(parent_hash + kHashSeed);
    for (int64_t i = 0; i < n; ++i) h = mix64(h ^ static_cast<uint32_t>(tokens[i]));
    return h;
}

BlockManager::BlockManager(int64_t num_blocks, int64_t block_size, bool enable_prefix_cache)
    : num_blocks_(num_blocks), block_size_(block_size), enable_prefix_cache_(enable_prefix_cache) {
    if (num_blocks < 1)
        throw std::invalid_argument("num_blocks must be >= 1, got " + std::to_string(num_blocks));
    if (block_size < 1)
        throw std::invalid_argument("block_size must be >= 1, got " + std::to_string(block_size));
    // Slots are int32 (they index the KV tensors directly).
    if (num_blocks * block_size > std::numeric_limits<int32_t>::max())
        throw std::invalid_argument("num_blocks * block_size must fit in int32, got " +
                                    std::to_string(num_blocks * block_size));
    blocks_.resize(static_cast<size_t>(num_blocks));
    for (int64_t b = 0; b < num_blocks; ++b) free_.push_back(static_cast<int32_t>(b));
    scratch_dec_.assign(static_cast<size_t>(num_blocks), 0);
}

// ---------------------------------------------------------------------------------------------
// Helpers

BlockManager::Sequence& BlockManager::get(int64_t seq) {
    auto it = seqs_.find(seq);
    if (it == seqs_.end()) throw UnknownSequenceError("unknown sequence " + std::to_string(seq));
    return it->second;
}

const BlockManager::Sequence& BlockManager::get(int64_t seq) const {
    auto it = seqs_.find(seq);
    if (it == seqs_.end()) throw UnknownSequenceError("unknown sequence " + std::to_string(seq));
    return it->second;
}

int64_t BlockManager::new_blocks_for(int64_t len, int64_t n) const {
    if (n <= 0) return 0;
    const int64_t off = len % block_size_;
    const int64_t room = off == 0 ? 0 : block_size_ - off;  // free slots in the partial last block
    if (n <= room) return 0;
    return (n - room + block_size_ - 1) / block_size_;
}

void BlockManager::throw_out_of_blocks(int64_t need) const {
    throw OutOfBlocksError(out_of_blocks_message(need, num_free_blocks(), num_cached_blocks()));
}

int32_t BlockManager::allocate() {
    int32_t b;
    if (!free_.empty()) {
        b = free_.front();
        free_.pop_front();
    } else {
        // Evict the least recently touched cached block; its content is forgotten.
        auto it = lru_.begin();
        b = it->second;
        lru_.erase(it);
        Block& blk = blocks_[b];
        cached_.erase(blk.hash);
        blk.registered = false;
        blk.tokens.clear();
        blk.parent = -1;
    }
    blocks_[b].tokens.reserve(static_cast<size_t>(block_size_));
    inc_ref(b);
    return b;
}

void BlockManager::inc_ref(int32_t b, int32_t by) {
    Block& blk = blocks_[b];
    if (by <= 0) return;
    if (blk.ref == 0) ++used_;
    if (blk.ref <= 1 && blk.ref + by > 1) ++shared_;
    blk.ref += by;
}

void BlockManager::dec_ref(int32_t b) {
    Block& blk = blocks_[b];
    if (blk.ref == 2) --shared_;
    if (--blk.ref > 0) return;
    --used_;
    if (blk.registered) {
        // Keep the content for future prefix hits; the newest tick is evicted last.
        blk.tick = ++tick_;
        lru_.emplace(blk.tick, b);
    } else {
        blk.tokens.clear();
        blk.parent = -1;
        free_.push_back(b);
    }
}

void BlockManager::on_block_full(const Sequence& s, size_t index) {
    if (!enable_prefix_cache_) return;  // hashes only serve the prefix cache
    const int32_t b = s.blocks[index];
    Block& blk = blocks_[b];
    // A block still holding a token not yet known is hashed when set_tokens completes it.
    if (std::find(blk.tokens.begin(), blk.tokens.end(), kUnknownToken) != blk.tokens.end()) return;
    blk.parent = index >= 1 ? s.blocks[index - 1] : -1;
    const uint64_t ph = blk.parent >= 0 ? blocks_[blk.parent].hash : kHashSeed;
    blk.hash = hash_block(ph, blk.tokens.data(), static_cast<int64_t>(blk.tokens.size()));
    // First writer wins: an identical block filled later stays private and is freed normally.
    if (cached_.emplace(blk.hash, b).second) blk.registered = true;
}

// ---------------------------------------------------------------------------------------------
// Operations

int64_t BlockManager::new_sequence() {
    const int64_t id = next_seq_++;
    seqs_.emplace(id, Sequence{});
    return id;
}

int64_t BlockManager::match_prefix(int64_t seq, const int32_t* tokens, int64_t n) {
    Sequence& s = get(seq);
    if (s.len != 0 || !s.blocks.empty())
        throw std::invalid_argument("match_prefix needs an empty sequence; sequence " +
                                    std::to_string(seq) + " has " + std::to_string(s.len) +
                                    " tokens");
    if (!enable_prefix_cache_ || n <= 1) return 0;
    // Leave at least one token to compute: the caller needs logits for the last prompt token.
    const int64_t max_match = (n - 1) / block_size_;
    int32_t parent = -1;
    uint64_t ph = kHashSeed;
    for (int64_t i = 0; i < max_match; ++i) {
        const int32_t* chunk = tokens + i * block_size_;
        const uint64_t key = hash_block(ph, chunk, block_size_);
        auto it = cached_.find(key);
        if (it == cached_.end()) break;
        const int32_t b = it->second;
        Block& blk = blocks_[b];
        // Verify content and chain so a hash collision can never alias another prefix.
        if (blk.parent != parent || !std::equal(chunk, chunk + block_size_, blk.tokens.begin()))
            break;
        if (blk.ref == 0) lru_.erase(blk.tick);
        inc_ref(b);
        blk.tick = ++tick_;
        s.blocks.push_back(b);
        parent = b;
        ph = blk.hash;
    }
    s.len = static_cast<int64_t>(s.blocks.size()) * block_size_;
    return s.len;
}

int64_t BlockManager::blocks_needed(int64_t seq, int64_t n) const {
    const Sequence& s = get(seq);
    if (n <= 0) return 0;
    const bool cow = s.len % block_size_ != 0 && blocks_[s.blocks.back()].ref > 1;
    return (cow ? 1 : 0) + new_blocks_for(s.len, n);
}

void BlockManager::append_unchecked(Sequence& s, const int32_t* tokens, int64_t n,
                                    int32_t* slots_out, std::vector<Copy>& copies) {
    if (n <= 0) return;
    if (s.len % block_size_ != 0) {
        const int32_t old = s.blocks.back();
        if (blocks_[old].ref > 1) {
            // Copy-on-write: the shared partial block would diverge, so this sequence gets a copy.
            const int32_t nb = allocate();
            blocks_[nb].tokens = blocks_[old].tokens;
            dec_ref(old);  // stays > 0: it was shared
            s.blocks.back() = nb;
            copies.emplace_back(old, nb);
        }
    }
    const int32_t bs = static_cast<int32_t>(block_size_);
    for (int64_t i = 0; i < n; ++i) {
        int32_t off = static_cast<int32_t>(s.len % bs);
        if (off == 0) s.blocks.push_back(allocate());
        const int32_t b = s.blocks.back();
        blocks_[b].tokens.push_back(tokens[i]);
        slots_out[i] = b * bs + off;
        ++s.len;
        if (off + 1 == bs) on_block_full(s, s.blocks.size() - 1);
    }
}

void BlockManager::set_tokens(const int64_t* seqs, const int64_t* positions, const int32_t* tokens,
                              int64_t n) {
    // Validate every entry first: all or nothing.
    for (int64_t i = 0; i < n; ++i) {
        const Sequence& s = get(seqs[i]);
        if (positions[i] < 0 || positions[i] >= s.len)
            throw std::invalid_argument("set_tokens: position " + std::to_string(positions[i]) +
                                        " is outside sequence " + std::to_string(seqs[i]) + " (" +
                                        std::to_string(s.len) + " tokens)");
        const Block& blk = blocks_[s.blocks[positions[i] / block_size_]];
        if (blk.tokens[positions[i] % block_size_] != kUnknownToken || blk.ref != 1)
            throw std::invalid_argument("set_tokens: position " + std::to_string(positions[i]) +
                                        " of sequence " + std::to_string(seqs[i]) +
                                        " is not an unknown token of a block it owns alone");
        if (tokens[i] < 0) throw std::invalid_argument("set_tokens: token ids must be >= 0");
    }
    for (int64_t i = 0; i < n; ++i) {
        const Sequence& s = get(seqs[i]);
        const size_t index = static_cast<size_t>(positions[i] / block_size_);
        Block& blk = blocks_[s.blocks[index]];
        blk.tokens[positions[i] % block_size_] = tokens[i];
        if (static_cast<int64_t>(blk.tokens.size()) == block_size_) on_block_full(s, index);
    }
}

void BlockManager::truncate(int64_t seq, int64_t n) {
    Sequence& s = get(seq);
    if (n < 0 || n > s.len)
        throw std::invalid_argument("truncate: cannot remove " + std::to_string(n) + " of the " +
                                    std::to_string(s.len) + " tokens of sequence " + std::to_string(seq));
    // Only unknown tokens: a known one may have completed a block in the prefix cache.
    for (int64_t i = 0; i < n; ++i) {
        const int64_t pos = s.len - 1 - i;
        const Block& blk = blocks_[s.blocks[pos / block_size_]];
        if (blk.tokens[pos % block_size_] != kUnknownToken || blk.ref != 1)
            throw std::invalid_argument("truncate: position " + std::to_string(pos) + " of sequence " +
                                        std::to_string(seq) + " is not an unknown token of a block it owns alone");
    }
    for (int64_t i = 0; i < n; ++i) {
        const int32_t b = s.blocks.back();
        blocks_[b].tokens.pop_back();
        --s.len;
        if (blocks_[b].tokens.empty()) {
            s.blocks.pop_back();
            dec_ref(b);
        }
    }
}

void BlockManager::append(int64_t seq, const int32_t* tokens, int64_t n, int32_t* slots_out,
                          std::vector<Copy>& copies) {
    Sequence& s = get(seq);
    const int64_t need = blocks_needed(seq, n);
    if (need > num_available_blocks()) throw_out_of_blocks(need);
    append_unchecked(s, tokens, n, slots_out, copies);
}

void BlockManager::append_batch(const std::vector<int64_t>& seqs,
                                const std::vector<int32_t>& flat,
                                const std::vector<int64_t>& offsets, int32_t* slots_out,
                                std::vector<Copy>& copies) {
    if (offsets.size() != seqs.size() + 1 || offsets.back() != static_cast<int64_t>(flat.size()))
        throw std::invalid_argument("append_batch: offsets do not match seqs/tokens");
    std::vector<Sequence*> ptrs(seqs.size());
    for (size_t i = 0; i < seqs.size(); ++i) ptrs[i] = &get(seqs[i]);  // all ids valid first

    // Dry run to count blocks, so the batch is all-or-nothing. A shared partial block with
    // refcount r appended to by k batch members costs k copies if k < r, else k - 1 (the last
    // appender finds refcount 1 and keeps the block); scratch_dec_ tracks those pending drops.
    // A sequence's later occurrences in the batch always own their last block.
    const uint64_t epoch = ++batch_epoch_;
    int64_t need = 0;
    for (size_t i = 0; i < seqs.size(); ++i) {
        const int64_t n = offsets[i + 1] - offsets[i];
        if (n <= 0) continue;
        Sequence& s = *ptrs[i];
        const bool first = s.stamp != epoch;
        if (first) {
            s.stamp = epoch;
            s.vlen = s.len;
            if (s.len % block_size_ != 0) {
                const int32_t b = s.blocks.back();
                if (blocks_[b].ref - scratch_dec_[b] > 1) {
                    ++need;
                    if (scratch_dec_[b]++ == 0) scratch_touched_.push_back(b);
                }
            }
        }
        need += new_blocks_for(s.vlen, n);
        s.vlen += n;
    }
    for (int32_t b : scratch_touched_) scratch_dec_[b] = 0;
    scratch_touched_.clear();
    if (need > num_available_blocks()) throw_out_of_blocks(need);

    for (size_t i = 0; i < seqs.size(); ++i) {
        const int64_t n = offsets[i + 1] - offsets[i];
        append_unchecked(*ptrs[i], flat.data() + offsets[i], n, slots_out + offsets[i], copies);
    }
}

std::vector<int64_t> BlockManager::fork(int64_t parent, int64_t n) {
    if (n < 0) throw std::invalid_argument("fork: n must be >= 0, got " + std::to_string(n));
    const Sequence src = get(parent);  // copy: emplacing below may rehash
    std::vector<int64_t> ids;
    ids.reserve(static_cast<size_t>(n));
    if (n == 0) return ids;
    for (int32_t b : src.blocks) inc_ref(b, static_cast<int32_t>(n));
    for (int64_t i = 0; i < n; ++i) {
        const int64_t id = next_seq_++;
        Sequence s;
        s.blocks = src.blocks;
        s.len = src.len;
        seqs_.emplace(id, std::move(s));
        ids.push_back(id);
    }
    return ids;
}

void BlockManager::free(int64_t seq) {
    auto it = seqs_.find(seq);
    if (it == seqs_.end()) throw UnknownSequenceError("unknown sequence " + std::to_string(seq));
    std::vector<int32_t> blocks = std::move(it->second.blocks);
    seqs_.erase(it);
    // Last to first: the tail gets the older tick, so it is evicted before the shared head.
    for (auto b = blocks.rbegin(); b != blocks.rend(); ++b) dec_ref(*b);
}

// ---------------------------------------------------------------------------------------------
// Queries

const std::vector<int32_t>& BlockManager::block_table(int64_t seq) const {
    return get(seq).blocks;
}

int64_t BlockManager::seq_len(int64_t seq) const { return get(seq).len; }

int32_t BlockManager::refcount(int64_t block) const {
    if (block < 0 || block >= num_blocks_)
        throw std::out_of_range("block " + std::to_string(block) + " out of range [0, " +
                                std::to_string(num_blocks_) + ")");
    return blocks_[static_cast<size_t>(block)].ref;
}

int64_t BlockManager::max_blocks(const std::vector<int64_t>& seqs) const {
    int64_t w = 0;
    for (int64_t id : seqs) w = std::max<int64_t>(w, get(id).blocks.size());
    return w;
}

void BlockManager::fill_block_tables(const std::vector<int64_t>& seqs, int64_t width,
                                     int32_t* tables, int32_t* lens) const {
    for (size_t i = 0; i < seqs.size(); ++i) {
        const Sequence& s = get(seqs[i]);
        int32_t* row = tables + static_cast<int64_t>(i) * width;
        const size_t nb = s.blocks.size();
        std::copy(s.blocks.begin(), s.blocks.end(), row);
        std::fill(row + nb, row + width, 0);
        lens[i] = static_cast<int32_t>(s.len);
    }
}

// ---------------------------------------------------------------------------------------------
// Maintenance

void BlockManager::reset_prefix_cache() {
    // Oldest first, so the free list order is deterministic. In-use blocks stay registered.
    for (const auto& [tick, b] : lru_) {
        Block& blk = blocks_[b];
        cached_.erase(blk.hash);
        blk.registered = false;
        blk.tokens.clear();
        blk.parent = -1;
        free_.push_back(b);
    }
    lru_.clear();
}

void BlockManager::check_invariants() const {
    auto fail = [](const std::string& msg) { throw std::runtime_error("invariant: " + msg); };
    std::vector<int32_t> counted(blocks_.size(), 0);
    for (const auto& [id, s] : seqs_) {
        const int64_t nb = static_cast<int64_t>(s.blocks.size());
        if (nb != (s.len + block_size_ - 1) / block_size_)
            fail("sequence " + std::to_string(id) + " has " + std::to_string(nb) +
                 " blocks for " + std::to_string(s.len) + " tokens");
        for (int64_t i = 0; i < nb; ++i) {
            const int32_t b = s.blocks[i];
            if (b < 0 || b >= num_blocks_) fail("sequence holds bad block " + std::to_string(b));
            ++counted[b];
            const int64_t filled =
                i + 1 < nb ? block_size_ : s.len - (nb - 1) * block_size_;
            if (static_cast<int64_t>(blocks_[b].tokens.size()) != filled)
                fail("block " + std::to_string(b) + " holds " +
                     std::to_string(blocks_[b].tokens.size()) + " tokens, sequence " +
                     std::to_string(id) + " expects " + std::to_string(filled));
        }
    }
    int64_t used = 0, shared = 0;
    for (size_t b = 0; b < blocks_.size(); ++b) {
        if (counted[b] != blocks_[b].ref)
            fail("block " + std::to_string(b) + " refcount " + std::to_string(blocks_[b].ref) +
                 " but held by " + std::to_string(counted[b]) + " sequences");
        used += blocks_[b].ref > 0;
        shared += blocks_[b].ref > 1;
    }
    if (used != used_ || shared != shared_) fail("used/shared counters out of sync");
    std::vector<char> seen(blocks_.size(), 0);
    for (int32_t b : free_) {
        if (seen[b]++) fail("block " + std::to_string(b) + " listed twice as free/cached");
        if (blocks_[b].ref != 0 || blocks_[b].registered)
            fail("free block " + std::to_string(b) + " is in use or registered");
    }
    for (const auto& [tick, b] : lru_) {
        if (seen[b]++) fail("block " + std::to_string(b) + " listed twice as free/cached");
        if (blocks_[b].ref != 0 || !blocks_[b].registered || blocks_[b].tick != tick)
            fail("cached block " + std::to_string(b) + " is in use, unregistered or mis-ticked");
    }
    if (used + num_free_blocks() + num_cached_blocks() != num_blocks_)
        fail("free + cached + used != num_blocks");
    int64_t registered = 0;
    for (const Block& blk : blocks_) registered += blk.registered;
    if (registered != static_cast<int64_t>(cached_.size())) fail("registered flags != cache size");
    for (const auto& [h, b] : cached_) {
        const Block& blk = blocks_[b];
        if (!blk.registered || blk.hash != h ||
            static_cast<int64_t>(blk.tokens.size()) != block_size_)
            fail("cache entry for block " + std::to_string(b) + " is stale");
    }
}

}  // namespace ttc
