"""A `.gguf` file as a checkpoint: dequantized on load by transformers' GGUF reader.

The reader needs the `gguf` and `accelerate` packages, the optional extra `ttc_fast[gguf]`.
Weights come out in float32 (a quantized block's values are not exactly representable in 16
bits); the loader then casts them to the dtype asked for. The tokenizer and its chat template come
from the file's metadata; a GGUF file carries no generation_config, so EOS ids come from the
config and the tokenizer.
"""
from __future__ import annotations

from pathlib import Path

import torch

EXTRA = "gguf"


def read_gguf(path: Path) -> tuple[dict, dict[str, torch.Tensor], object]:
    """(HF config dict, float32 state dict, tokenizer) of a `.gguf` file."""
    from .loader import MissingExtra

    try:
        import accelerate  # noqa: F401
        import gguf  # noqa: F401
    except ImportError as e:
        raise MissingExtra(f"{path}: loading a .gguf file needs the optional extra {EXTRA!r} (the gguf and accelerate "
                           f"packages): pip install 'ttc_fast[{EXTRA}]' ({e})") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except (ValueError, KeyError, RuntimeError) as e:
        raise ValueError(f"{path}: transformers cannot read this GGUF file ({type(e).__name__}: {e})") from None
    config = model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config.pop(key, None)
    config["architectures"] = [type(model).__name__]
    config["dtype"] = "float32"
    return config, dict(model.state_dict()), tokenizer
