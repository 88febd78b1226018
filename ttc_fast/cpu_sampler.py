"""The engine's sampler on the CPU: `kernels.sample_ref`'s draws at a fraction of its cost.

The reference draws the Gumbel noise of every token within reach of its row's best logit, two
logarithms per token: with a flat distribution (a random model, a high temperature) that is the
whole vocabulary, through a dozen torch ops. Here one C++ pass per row (`csrc/gumbel_sample.h`)
hashes every token, bounds its noise from a table and draws the exact noise only for the few
tokens that can still win. Same hash, same rule, same tie-break: the drawn tokens are the
reference's, except where two candidates' perturbed scores agree to within float rounding (the
logarithms are libm's, not torch's), the same contract as the Triton kernel's.
Top-k / top-p filtering, when a row asks for it, is the reference's own mask.
"""
from __future__ import annotations

import numpy as np
import torch

from . import kernels as K
from ._C import gumbel_sample


def sample_cpu(logits, temperature, top_k, top_p, seeds, positions, out=None):
    """`kernels.sample_ref`'s interface and draws, for CPU tensors."""
    K.sampling._check_sample_args(logits, temperature, top_k, top_p, seeds, positions)
    B, V = logits.shape
    x = logits.float()
    # Per-row settings in numpy: a few elements each, where torch's per-op cost would dominate.
    temp = temperature.numpy()
    greedy = temp <= 0
    t = np.where(greedy, np.float32(1), temp)
    if (((top_k.numpy() > 0) & (top_k.numpy() < V)) | (top_p.numpy() < 1.0)).any():
        # The reference's masked, scaled logits, with an exact scale of 1.
        allowed = K.sample_allowed_mask_ref(logits, temperature, top_k, top_p)
        x = (x * (1.0 / torch.from_numpy(t)[:, None])).masked_fill(~allowed, float("-inf"))
        inv_t = np.ones(B, dtype=np.float32)
    else:
        inv_t = np.float32(1) / t  # fp32, as the reference's 1.0 / t
    tok = torch.from_numpy(gumbel_sample(x.contiguous().numpy(), inv_t, seeds.numpy(), positions.numpy(),
                                         greedy.astype(np.uint8)))
    if out is None:
        return tok
    out.copy_(tok)
    return out
