"""ttc_fast: fast test-time-compute search with a prefix-shared paged KV cache.

    import ttc_fast as tf
    model = tf.load_model("path/to/hf-checkpoint")
    engine = tf.Engine(model)
    outs = engine.generate(["1 + 1 ="], tf.SamplingParams(temperature=0.0, max_tokens=8))
"""
from .block_manager import BlockManager, OutOfBlocks
from .config import ModelConfig
from .engine import CompletionOutput, Engine, RequestOutput
from .loader import LoadedModel, load_model
from .model_runner import ModelRunner
from .sampling import SamplingParams

__version__ = "0.1.0"

__all__ = [
    "BlockManager",
    "CompletionOutput",
    "Engine",
    "LoadedModel",
    "ModelConfig",
    "ModelRunner",
    "OutOfBlocks",
    "RequestOutput",
    "SamplingParams",
    "load_model",
]
