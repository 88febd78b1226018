"""`--preset sal`: search-and-learn's configuration, read from `sal_preset.json`.

The JSON file holds the settings of search-and-learn's default configuration and its MATH recipes
at a pinned commit (named in its `source`), its MATH system prompt and its chat template for
Llama 3 policies, copied verbatim. Explicit command-line flags override every value.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

SAL_FILE = Path(__file__).with_name("sal_preset.json")
PRESETS = ("sal",)
# The tokens that mark a Llama 3 tokenizer, whose policies search-and-learn prompts with its own template.
LLAMA3_TOKENS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


@functools.cache
def sal_preset() -> dict:
    """The parsed `sal_preset.json`: source, system_prompt, llama3_chat_template, settings, notes."""
    return json.loads(SAL_FILE.read_text(encoding="utf-8"))


def is_llama3_tokenizer(tokenizer) -> bool:
    vocab = tokenizer.get_vocab()
    return all(t in vocab for t in LLAMA3_TOKENS)


def sal_chat_template(tokenizer) -> str | None:
    """search-and-learn's Llama 3 template for a Llama 3 tokenizer; None (the checkpoint's own
    template) for any other, as its recipes for Qwen2.5 and AceMath set custom_chat_template: null."""
    return sal_preset()["llama3_chat_template"] if is_llama3_tokenizer(tokenizer) else None
