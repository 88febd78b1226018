#include "gumbel_sample.h"

#include <array>
#include <cmath>
#include <limits>
#include <vector>

namespace ttc {
namespace {

// The hash of kernels/sampling.py ("lowbias32"), uint32 arithmetic.
inline uint32_t mix32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x21F0AAADu;
    x ^= x >> 15;
    x *= 0x735A2D97u;
    return x ^ (x >> 15);
}

constexpr uint32_t kRowSalt = 0x2545F491u, kTokenSalt = 0x5BD1E995u;

inline uint32_t row_key(int64_t seed, int64_t position) {
    const auto s = static_cast<uint64_t>(seed), p = static_cast<uint64_t>(position);
    uint32_t h = mix32(static_cast<uint32_t>(s) ^ kRowSalt);
    h = mix32(h ^ static_cast<uint32_t>(s >> 32));
    h = mix32(h ^ static_cast<uint32_t>(p));
    return mix32(h ^ static_cast<uint32_t>(p >> 32));
}

// u = (k + 0.5) * 2^-23 for k = hash >> 9 in [0, 2^23); a bucket is 2^kBucketShift values of k.
constexpr int kBucketShift = 11;
constexpr int kBuckets = 1 << (23 - kBucketShift);
// Slack on both bounds, far above fp32 rounding in the exact evaluation.
constexpr double kSlack = 1e-3;

inline float uniform(uint32_t hash) { return (static_cast<float>(hash >> 9) + 0.5f) * 1.1920928955078125e-07f; }

struct GumbelBounds {
    std::array<float, kBuckets> lo, hi;
    GumbelBounds() {
        auto g = [](double k) { return -std::log(-std::log((k + 0.5) * std::ldexp(1.0, -23))); };
        for (int b = 0; b < kBuckets; ++b) {
            // g increases with u: a bucket's least and greatest u give its bounds.
            lo[b] = static_cast<float>(g(double(b) * (1 << kBucketShift)) - kSlack);
            hi[b] = static_cast<float>(g(double(b + 1) * (1 << kBucketShift) - 1) + kSlack);
        }
    }
};

const GumbelBounds& bounds() {
    static const GumbelBounds table;
    return table;
}

int64_t argmax(const float* row, int64_t vocab) {
    int64_t best = 0;
    for (int64_t i = 1; i < vocab; ++i)
        if (row[i] > row[best]) best = i;
    return best;
}

}  // namespace

// On x86-64 compiled twice (AVX2 and the baseline, picked at load time): AVX2 runs the hash
// eight tokens wide with native 32-bit multiplies.
#if defined(__x86_64__) && defined(__GNUC__)
#define TTC_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define TTC_CLONES
#endif

TTC_CLONES
void gumbel_sample(const float* x, int64_t rows, int64_t vocab, const float* inv_t,
                   const int64_t* seeds, const int64_t* positions, const uint8_t* greedy,
                   int64_t* out) {
    const GumbelBounds& gb = bounds();
    std::vector<uint16_t> bucket(static_cast<size_t>(vocab));
    std::vector<float> scaled(static_cast<size_t>(vocab));
    const float neg_inf = -std::numeric_limits<float>::infinity();
    for (int64_t r = 0; r < rows; ++r) {
        const float* row = x + r * vocab;
        if (greedy[r]) {
            out[r] = argmax(row, vocab);
            continue;
        }
        const float it = inv_t[r];
        const uint32_t h = row_key(seeds[r], positions[r]);
        for (int64_t i = 0; i < vocab; ++i) {  // branch-free: vectorized
            const uint32_t v = mix32(mix32(h ^ static_cast<uint32_t>(i)) ^ kTokenSalt);
            bucket[i] = static_cast<uint16_t>(v >> (9 + kBucketShift));
            scaled[i] = row[i] * it;
        }
        float best_lo = neg_inf;
        for (int64_t i = 0; i < vocab; ++i) {
            const float lo = scaled[i] + gb.lo[bucket[i]];
            best_lo = lo > best_lo ? lo : best_lo;
        }
        int64_t best = 0;
        float best_score = neg_inf;
        if (best_lo > neg_inf) {
            for (int64_t i = 0; i < vocab; ++i) {
                if (scaled[i] == neg_inf || scaled[i] + gb.hi[bucket[i]] < best_lo) continue;
                const uint32_t v = mix32(mix32(h ^ static_cast<uint32_t>(i)) ^ kTokenSalt);
                const float g = -std::log(-std::log(uniform(v)));
                const float score = scaled[i] + g;
                if (score > best_score) {  // strict: ties keep the lowest token id
                    best_score = score;
                    best = i;
                }
            }
        }
        out[r] = best;
    }
}

}  // namespace ttc
