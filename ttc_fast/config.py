"""Model configuration: the fields of a Hugging Face `config.json` that the runner needs, validated.

Supported families share one decoder (RMSNorm, rotary attention with GQA, SwiGLU MLP) and differ
only in flags: Llama 2/3/3.1/3.2 (llama3 rope scaling, tied embeddings), Mistral, Qwen2/2.5 (bias
on q/k/v), Qwen3 (RMSNorm on q and k per head).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

# architecture name in config.json -> model_type it implies
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
SUPPORTED_MODEL_TYPES = tuple(sorted(set(SUPPORTED_ARCHITECTURES.values())))
# Process reward models whose decoder is one of the families above plus a head of their own;
# accepted only when loading a PRM (`ttc_fast.prm.load_prm`), which also reads the head.
PRM_ARCHITECTURES = {
    "Qwen2ForProcessRewardModel": "qwen2",  # Qwen2.5-Math-PRM: score = Linear -> ReLU -> Linear(h, 2)
    "Qwen2ForPrmModel": "qwen2",  # Skywork-o1-Open-PRM: v_head.summary = Linear(h, 1)
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = field(default_factory=RopeConfig)
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    sliding_window: int | None = None

    @property
    def max_context(self) -> int:
        """Longest sequence the model attends over without a sliding window."""
        if self.sliding_window is not None:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings

    @staticmethod
    def from_dict(raw: dict, source: str = "config.json", allow_prm: bool = False) -> "ModelConfig":
        model_type = _model_type(raw, source, allow_prm)
        hidden = int(raw["hidden_size"])
        num_heads = int(raw["num_attention_heads"])
        head_dim = raw.get("head_dim") or hidden // num_heads
        act = raw.get("hidden_act", raw.get("hidden_activation", "silu"))
        if act not in ("silu", "swish"):
            raise ValueError(f"{source}: hidden_act {act!r} is not supported; ttc_fast runs SwiGLU (silu) models")
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        # Qwen2 always has q/k/v biases (never o); Mistral none; Llama and Qwen3 bias all four
        # projections when attention_bias is set.
        attention_bias = bool(raw.get("attention_bias")) and model_type in ("llama", "qwen3")
        qkv_bias = attention_bias or model_type == "qwen2"
        window = None
        if model_type == "mistral" or raw.get("use_sliding_window"):
            window = raw.get("sliding_window")
        return ModelConfig(
            model_type=model_type,
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope=_rope_config(raw, source),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=attention_bias,
            mlp_bias=bool(raw.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
            sliding_window=int(window) if window else None,
        )

    @staticmethod
    def from_file(path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e
        return ModelConfig.from_dict(raw, str(path))


def _model_type(raw: dict, source: str, allow_prm: bool = False) -> str:
    archs = raw.get("architectures") or []
    for arch in archs:
        if arch in SUPPORTED_ARCHITECTURES:
            return SUPPORTED_ARCHITECTURES[arch]
        if arch in PRM_ARCHITECTURES:
            if allow_prm:
                return PRM_ARCHITECTURES[arch]
            raise ValueError(f"{source}: {arch} is a process reward model; load it with ttc_fast.prm.load_prm")
    model_type = raw.get("model_type")
    if not archs and model_type in SUPPORTED_MODEL_TYPES:
        return model_type
    found = ", ".join(archs) if archs else f"model_type={model_type!r}"
    raise ValueError(
        f"{source}: unsupported architecture {found}. ttc_fast runs "
        f"{', '.join(SUPPORTED_ARCHITECTURES)} (model types {', '.join(SUPPORTED_MODEL_TYPES)})."
    )


def _rope_config(raw: dict, source: str) -> RopeConfig:
    # transformers 5 writes `rope_parameters` (theta inside); older checkpoints write
    # `rope_theta` plus an optional `rope_scaling` dict.
    params = dict(raw.get("rope_parameters") or {})
    scaling = raw.get("rope_scaling") or {}
    params = {**scaling, **params}
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"{source}: rope type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    return RopeConfig(
        theta=theta,
        rope_type=rope_type,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
    )


def rope_inv_freq(rope: RopeConfig, head_dim: int):
    """Inverse frequencies [head_dim // 2] (fp32), with llama3 / linear scaling applied."""
    import torch

    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        # Llama 3.1: long wavelengths are divided by `factor`, short ones kept, a smooth ramp between.
        low_wavelen = rope.original_max_position_embeddings / rope.low_freq_factor
        high_wavelen = rope.original_max_position_embeddings / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (rope.original_max_position_embeddings / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    return inv_freq
