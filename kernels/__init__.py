"""Triton kernels of ttc_fast, each with a pure-torch `<op>_ref` of the same signature (the CPU path).

Kernels run on CUDA tensors, or on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, set
before this package is imported). See each module's docstring for layouts.
"""
from .beam_topk import logsoftmax_topk, logsoftmax_topk_ref, segmented_topk, segmented_topk_ref
from .block_copy import copy_blocks, copy_blocks_ref
from .cascade_decode import (
    cascade_decode_attention,
    cascade_decode_attention_ref,
    merge_attention_states,
    merge_attention_states_ref,
    plan_shared_prefix_groups,
)
from .kv_store import store_kv, store_kv_ref
from .paged_decode import auto_num_splits, paged_decode_attention, paged_decode_attention_ref
from .paged_extend import paged_extend_attention, paged_extend_attention_ref
from .sampling import sample, sample_allowed_mask_ref, sample_ref, sampling_uniform
from .tree_attention import DecodePlanCache, PrefixTree, SharedKVMemo, plan_prefix_tree, tree_attention_torch

__all__ = [
    "auto_num_splits",
    "cascade_decode_attention",
    "cascade_decode_attention_ref",
    "copy_blocks",
    "copy_blocks_ref",
    "logsoftmax_topk",
    "logsoftmax_topk_ref",
    "merge_attention_states",
    "merge_attention_states_ref",
    "paged_decode_attention",
    "paged_decode_attention_ref",
    "paged_extend_attention",
    "paged_extend_attention_ref",
    "plan_prefix_tree",
    "plan_shared_prefix_groups",
    "PrefixTree",
    "DecodePlanCache",
    "sample",
    "sample_allowed_mask_ref",
    "sample_ref",
    "sampling_uniform",
    "segmented_topk",
    "segmented_topk_ref",
    "SharedKVMemo",
    "store_kv",
    "store_kv_ref",
    "tree_attention_torch",
]
