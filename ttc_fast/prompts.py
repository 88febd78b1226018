"""The policy's prompt for a question, tokenized exactly once.

A chat template is rendered to text and that text tokenized WITHOUT the tokenizer's special tokens,
so a template that writes BOS itself (Llama 3, Mistral) is not given a second one. A tokenizer
that adds BOS to what it encodes gets exactly one: kept if the template wrote it, prepended if not
(search-and-learn's Llama 3 template omits BOS because vLLM adds it). Without a chat template the
prompt is the question and a blank line, tokenized with the tokenizer's special tokens (one BOS
where the tokenizer adds one).

    ids = PromptFormat(system_prompt=None).encode(question, tokenizer, source="path/to/policy")

system_prompt: None is `DEFAULT_SYSTEM_PROMPT`, "" is no system message. A template that rejects
a system role (older Mistral templates raise) gets the system text folded into the user turn.
chat_template: None is the tokenizer's own, "" is none (the plain prompt), else Jinja source.
chat_template_kwargs go to `apply_chat_template` (e.g. {"enable_thinking": False} for Qwen3).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

DEFAULT_SYSTEM_PROMPT = (
    "Solve the math problem step by step. Separate the steps with a blank line and give the final "
    "answer as $\\boxed{answer}$."
)


def system_text(system_prompt: str | None) -> str:
    """The system message `system_prompt` means: None is the default, "" is none."""
    return DEFAULT_SYSTEM_PROMPT if system_prompt is None else system_prompt


def adds_bos(tokenizer) -> bool:
    """Whether `tokenizer` puts BOS in front of what it encodes with special tokens."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos is not None and tokenizer.encode("a", add_special_tokens=True)[:1] == [bos]


@dataclass(frozen=True)
class PromptFormat:
    system_prompt: str | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict | None = None  # None: {}

    def __post_init__(self):
        if self.chat_template_kwargs is None:
            object.__setattr__(self, "chat_template_kwargs", {})
        if not isinstance(self.chat_template_kwargs, dict):
            raise ValueError(f"chat_template_kwargs must be a dict (JSON object), got {type(self.chat_template_kwargs).__name__}")

    def template(self, tokenizer) -> str | None:
        """The Jinja template in use, or None for the plain prompt."""
        if self.chat_template is not None:
            return self.chat_template or None
        return getattr(tokenizer, "chat_template", None) or None

    def settings(self) -> dict:
        """What a results line records of the prompt (checked on resume)."""
        if self.chat_template is None:
            template = "checkpoint"
        elif self.chat_template == "":
            template = "none"
        else:
            template = "sha256:" + hashlib.sha256(self.chat_template.encode()).hexdigest()[:16]
        return {"system_prompt": system_text(self.system_prompt), "chat_template": template,
                "chat_template_kwargs": dict(self.chat_template_kwargs)}

    def messages(self, question: str, fold_system: bool = False) -> list[dict]:
        system = system_text(self.system_prompt)
        if not system:
            return [{"role": "user", "content": question}]
        if fold_system:
            return [{"role": "user", "content": f"{system}\n\n{question}"}]
        return [{"role": "system", "content": system}, {"role": "user", "content": question}]

    def render(self, question: str, tokenizer, source="the policy") -> str | None:
        """The chat template's text for `question`, or None when there is no template."""
        template = self.template(tokenizer)
        if template is None:
            return None
        from jinja2 import TemplateError

        def run(messages):
            return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                 add_generation_prompt=True, **self.chat_template_kwargs)

        try:
            try:
                return run(self.messages(question))
            except TemplateError:
                if not system_text(self.system_prompt):
                    raise
                # Templates without a system role raise on one: the system text leads the user turn.
                return run(self.messages(question, fold_system=True))
        except Exception as e:  # a template's own errors are any type: name the checkpoint, not a traceback
            raise ValueError(f"{source}: its chat template failed on a prompt ({type(e).__name__}: {e}); fix the "
                             f"template, or pass --chat-template FILE, or --chat-template none for a plain prompt") from None

    def encode(self, question: str, tokenizer, source="the policy") -> list[int]:
        """The prompt's token ids: the rendered template tokenized once, with one BOS where the
        tokenizer uses one; without a template, question + a blank line."""
        text = self.render(question, tokenizer, source)
        if text is None:
            return list(tokenizer(question + "\n\n")["input_ids"])
        ids = list(tokenizer.encode(text, add_special_tokens=False))
        if adds_bos(tokenizer) and ids[:1] != [tokenizer.bos_token_id]:
            ids = [tokenizer.bos_token_id] + ids
        return ids


def encode_prompt(question: str, tokenizer, system_prompt: str | None = None, chat_template: str | None = None,
                  chat_template_kwargs: dict | None = None, source="the policy") -> list[int]:
    """`PromptFormat(...).encode(question, tokenizer)`: the search's prompt ids for `question`."""
    return PromptFormat(system_prompt, chat_template, chat_template_kwargs).encode(question, tokenizer, source)
