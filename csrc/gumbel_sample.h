// Gumbel-max sampling on the CPU (the engine's torch path), with the hash of kernels/sampling.py.
//
// The token drawn for a row is argmax_i (x_i * inv_t + g(u_i)), u_i a hash of (seed, position,
// token id) and g(u) = -log(-log u). Evaluating g for every token costs two logarithms per
// token; instead g is bounded per bucket of u from a small table, and g is evaluated only for
// the tokens whose upper bound reaches the best lower bound of their row (a few per row).
#pragma once

#include <cstdint>

namespace ttc {

// x: [rows, vocab] fp32, row-major (-inf: not allowed); inv_t, seeds, positions: [rows];
// greedy: [rows] (1 = argmax of x, no noise). Writes one token id per row to out; a row whose
// entries are all -inf (or NaN) gets token 0. Ties go to the lowest token id.
void gumbel_sample(const float* x, int64_t rows, int64_t vocab, const float* inv_t,
                   const int64_t* seeds, const int64_t* positions, const uint8_t* greedy,
                   int64_t* out);

}  // namespace ttc
