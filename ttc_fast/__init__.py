"""ttc_fast: fast test-time-compute search with a prefix-shared paged KV cache.

    import ttc_fast as tf
    model = tf.load_model("path/to/hf-checkpoint")
    engine = tf.Engine(model)
    outs = engine.generate(["1 + 1 ="], tf.SamplingParams(temperature=0.0, max_tokens=8))
"""
from .block_manager import BlockManager, OutOfBlocks
from .config import ModelConfig
from .engine import Branch, CompletionOutput, Engine, RequestOutput
from .loader import LoadedModel, load_model
from .model_runner import ModelRunner
from .prm import load_prm
from .sampling import SamplingParams
from .search import Completion, SearchResult
from .strategies import (DVTS, AdaptiveMajority, AdaptiveWeighted, BeamSearch, BestOfN, EarlyReject, MajorityVote,
                         ParticleFiltering, Rebase, Routed, WeightedBestOfN)

__version__ = "0.1.0"

__all__ = [
    "AdaptiveMajority",
    "AdaptiveWeighted",
    "BeamSearch",
    "BestOfN",
    "Branch",
    "Completion",
    "DVTS",
    "EarlyReject",
    "MajorityVote",
    "ParticleFiltering",
    "Rebase",
    "Routed",
    "SearchResult",
    "WeightedBestOfN",
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
    "load_prm",
]
