"""KV pool sizing and layout."""
import pytest
import torch

from ttc_fast.config import ModelConfig
from ttc_fast.kv_pool import KVPool, bytes_per_block, plan_num_blocks

CONFIG = ModelConfig(model_type="llama", vocab_size=10, hidden_size=32, intermediate_size=64, num_layers=3,
                     num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=64)


def test_blocks_follow_the_byte_budget():
    per_block = bytes_per_block(CONFIG, 16, torch.float16)
    assert per_block == 2 * 3 * 16 * 2 * 8 * 2
    assert plan_num_blocks(CONFIG, 16, torch.float16, torch.device("cpu"), kv_cache_bytes=10 * per_block + 5) == 10
    with pytest.raises(ValueError, match="holds no block"):
        plan_num_blocks(CONFIG, 16, torch.float16, torch.device("cpu"), kv_cache_bytes=per_block - 1)


def test_layer_views_share_one_tensor():
    pool = KVPool(CONFIG, num_blocks=5, block_size=4, dtype=torch.bfloat16, device=torch.device("cpu"))
    assert pool.kv.shape == (3, 2, 5, 4, 2, 8) and pool.kv.dtype == torch.bfloat16
    k, v = pool.layer(1)
    assert k.shape == (5, 4, 2, 8) and k.is_contiguous() and v.is_contiguous()
    k.fill_(1.0)
    assert pool.kv[1, 0].eq(1.0).all() and pool.nbytes == 3 * 2 * 5 * 4 * 2 * 8 * 2
