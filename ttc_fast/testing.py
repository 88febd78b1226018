"""Tiny random checkpoints in Hugging Face format, for tests, benchmarks and the demo.

Nothing can be downloaded here, so these build small models of each supported family with
transformers' own classes, save them with `save_pretrained` next to a small byte-level BPE
tokenizer, and the code under test loads them through the real loaders.
"""
from __future__ import annotations

from pathlib import Path

FAMILIES = ("llama", "llama2", "mistral", "qwen2", "qwen3")

_CORPUS = [
    "Step 1: add 3 and 4 to get 7.",
    "Step 2: multiply 7 by 6 to get 42.",
    "The answer is \\boxed{42}.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "How many clips did Natalia sell altogether in April and May?",
    "Let x be the number of apples; then 2x + 5 = 17, so x = 6.",
    "Therefore, the final answer is 6. I hope it is correct.",
]


def build_tokenizer(path: str | Path, vocab_size: int = 320):
    """A byte-level BPE tokenizer trained on a few sentences, saved in HF format at `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>")
    fast.save_pretrained(str(path))
    return fast


def tiny_config(family: str, vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2, **overrides):
    """A transformers config object of the given family with tiny shapes."""
    import transformers as hf

    common = dict(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
        # Larger than the usual 0.02 so that random models have peaked logits and greedy
        # decoding is not decided by rounding noise.
        initializer_range=0.2, bos_token_id=0, eos_token_id=None, pad_token_id=None,
    )
    if family == "llama":  # Llama 3.x: llama3 rope scaling, tied embeddings
        cfg = hf.LlamaConfig(
            **common, tie_word_embeddings=True, rope_theta=500000.0,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        )
    elif family == "llama2":
        cfg = hf.LlamaConfig(**common, tie_word_embeddings=False)
    elif family == "mistral":
        cfg = hf.MistralConfig(**common, sliding_window=None)
    elif family == "qwen2":
        cfg = hf.Qwen2Config(**common, tie_word_embeddings=False)
    elif family == "qwen3":
        cfg = hf.Qwen3Config(**common, head_dim=32, tie_word_embeddings=True)
    else:
        raise ValueError(f"unknown family {family!r}: one of {', '.join(FAMILIES)}")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def build_tiny_model(path: str | Path, family: str = "llama", seed: int = 0, with_tokenizer: bool = True, vocab_size: int = 320, **config_overrides) -> Path:
    """Save a random tiny model of `family` (and its tokenizer, whose size then sets the
    vocabulary) under `path`; `config_overrides` go to `tiny_config`. Returns the path."""
    import torch
    import transformers as hf

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = vocab_size
    if with_tokenizer:
        vocab = len(build_tokenizer(path, vocab))
    cfg = tiny_config(family, vocab, **config_overrides)
    torch.manual_seed(seed)
    cls = {"llama": hf.LlamaForCausalLM, "llama2": hf.LlamaForCausalLM, "mistral": hf.MistralForCausalLM,
           "qwen2": hf.Qwen2ForCausalLM, "qwen3": hf.Qwen3ForCausalLM}[family]
    model = cls(cfg)
    if family == "qwen2":
        # Qwen2's q/k/v biases start at zero; randomise them so the test exercises them.
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.2)
    model.save_pretrained(str(path))
    return path
