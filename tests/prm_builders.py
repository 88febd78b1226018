"""Tiny random process-reward-model checkpoints in each real format, for tests and demos.

Each builder trains the small byte-level BPE tokenizer of `ttc_fast.testing`, adds the special
tokens and chat template the real PRM's tokenizer has, builds the model with transformers' own
classes and saves it with `save_pretrained`:

* `build_rlhflow_prm`       - LlamaForCausalLM + Llama-3.1-style chat template (RLHFlow PRMs).
* `build_math_shepherd_prm` - MistralForCausalLM + the step tag "ки" (math-shepherd-mistral-7b-prm).
* `build_qwen_prm`          - Qwen2ForProcessRewardModel (Qwen2Model + `score` = Linear(h,h), ReLU,
                              Linear(h,2)), Qwen chat template and `<extra_0>` (Qwen2.5-Math-PRM).
* `build_skywork_prm`       - Qwen2ForPrmModel (Qwen2Model + lm_head + `v_head.summary` =
                              Linear(h,1)) (Skywork-o1-Open-PRM-Qwen-2.5).

The two head models are small `PreTrainedModel` subclasses written here that mirror the real
remote-code classes (which transformers does not ship): same module names, so `save_pretrained`
writes the real key names (`score.0.weight`, `score.2.bias`, `v_head.summary.weight`...) and the
real `architectures` entry. `PRM_MODEL_CLASSES[kind].from_pretrained(path)` loads them back as an
independent reference.
"""
from __future__ import annotations

from pathlib import Path

from ttc_fast.testing import build_tokenizer, tiny_config

# Llama 3.1's template, reduced to what matters here: BOS, the always-present system block with the
# knowledge/today dates, then one header + trimmed content + <|eot_id|> per message.
LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] | trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\nToday Date: 26 Jul 2024\\n\\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]

# Qwen2.5's ChatML template (the PRM always passes its own system message).
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<extra_0>"]

_CLASSES: dict = {}


def prm_model_classes() -> dict:
    """{"qwen-prm": Qwen2ForProcessRewardModel, "skywork": Qwen2ForPrmModel}: reference classes."""
    if _CLASSES:
        return _CLASSES
    import torch
    from torch import nn
    from transformers import Qwen2Config, Qwen2Model, Qwen2PreTrainedModel

    class Qwen2ForProcessRewardModel(Qwen2PreTrainedModel):
        """Qwen2.5-Math-PRM: token logits [B, T, 2] = score(final hidden states)."""

        config_class = Qwen2Config

        def __init__(self, config):
            super().__init__(config)
            self.model = Qwen2Model(config)
            h = config.hidden_size
            self.score = nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 2))
            self.post_init()

        def forward(self, input_ids):
            hidden = self.model(input_ids=input_ids).last_hidden_state
            return self.score(hidden)

    class ValueHead(nn.Module):
        def __init__(self, hidden: int):
            super().__init__()
            self.summary = nn.Linear(hidden, 1)

        def forward(self, x):
            return self.summary(x)

    class Qwen2ForPrmModel(Qwen2PreTrainedModel):
        """Skywork-o1-Open-PRM: values [B, T] = v_head(final hidden states); reward = sigmoid."""

        config_class = Qwen2Config

        def __init__(self, config):
            super().__init__(config)
            self.model = Qwen2Model(config)
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
            self.v_head = ValueHead(config.hidden_size)
            self.post_init()

        def forward(self, input_ids):
            hidden = self.model(input_ids=input_ids).last_hidden_state
            return self.v_head(hidden).squeeze(-1)

    _CLASSES.update({"qwen-prm": Qwen2ForProcessRewardModel, "skywork": Qwen2ForPrmModel})
    del torch
    return _CLASSES


def _tokenizer(path: Path, special: list[str], plain: list[str] = (), bos: str | None = None, template: str | None = None):
    from tokenizers import AddedToken

    tok = build_tokenizer(path)
    if special:
        tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in special], special_tokens=True)
    if plain:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in plain])
    if bos is not None:
        tok.bos_token = bos
    if template is not None:
        tok.chat_template = template
    tok.save_pretrained(str(path))
    return tok


def _randomise(model, seed: int) -> None:
    """Qwen2's q/k/v biases and the head biases start at zero: make them random."""
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def build_rlhflow_prm(path: str | Path, seed: int = 0, **config_overrides) -> Path:
    import torch
    import transformers as hf

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer(path, LLAMA3_SPECIAL, bos="<|begin_of_text|>", template=LLAMA3_CHAT_TEMPLATE)
    torch.manual_seed(seed)
    hf.LlamaForCausalLM(tiny_config("llama", len(tok), **config_overrides)).save_pretrained(str(path))
    return path


def build_math_shepherd_prm(path: str | Path, seed: int = 0, **config_overrides) -> Path:
    import torch
    import transformers as hf

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer(path, [], plain=["ки"])
    torch.manual_seed(seed)
    hf.MistralForCausalLM(tiny_config("mistral", len(tok), **config_overrides)).save_pretrained(str(path))
    return path


def _build_head_model(path: str | Path, kind: str, seed: int, config_overrides) -> Path:
    import torch

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if kind == "qwen-prm":
        tok = _tokenizer(path, QWEN_SPECIAL, template=QWEN_CHAT_TEMPLATE)
    else:
        tok = _tokenizer(path, QWEN_SPECIAL[:3])
    cfg = tiny_config("qwen2", len(tok), **config_overrides)
    torch.manual_seed(seed)
    model = prm_model_classes()[kind](cfg)
    _randomise(model, seed)
    model.save_pretrained(str(path))
    return path


def build_qwen_prm(path: str | Path, seed: int = 0, **config_overrides) -> Path:
    return _build_head_model(path, "qwen-prm", seed, config_overrides)


def build_skywork_prm(path: str | Path, seed: int = 0, **config_overrides) -> Path:
    return _build_head_model(path, "skywork", seed, config_overrides)


PRM_BUILDERS = {
    "rlhflow": build_rlhflow_prm,
    "math-shepherd": build_math_shepherd_prm,
    "qwen-prm": build_qwen_prm,
    "skywork": build_skywork_prm,
}
