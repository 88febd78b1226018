"""The engine's sequences: a request and its samples while they run, a branch a search holds,
and the outputs handed back."""
from __future__ import annotations

from dataclasses import dataclass, field

from .sampling import SamplingParams


@dataclass
class CompletionOutput:
    index: int
    token_ids: list[int]
    text: str | None
    finish_reason: str  # "eos" | "stop" (stop string or stop token) | "length"
    stop_reason: str | int | None = None  # the stop string or token id that ended it


@dataclass
class RequestOutput:
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]

    @property
    def text(self) -> str | None:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str:
        return self.outputs[0].finish_reason


@dataclass
class Branch:
    """A live sequence of the policy: its handle in the cache, its whole context, and the tokens at
    its end not yet fed to the model (at least one: continuing needs the last token's logits).
    Search strategies hold branches; `Engine.expand` consumes them and returns their children."""

    seq: int | None  # None: evicted from the cache under pool pressure; recomputed when expanded
    token_ids: list[int]
    pending: list[int]


@dataclass(eq=False)  # identity comparison: compared in hot loops
class Request:
    index: int
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    samples: list["Sample"] = field(default_factory=list)
    keep_sequences: bool = False  # expand(): finished samples stay in the cache as branches


@dataclass(eq=False)
class Sample:
    """One continuation of a request. Before its prompt is prefilled, a request is represented by
    its sample 0 alone (`forks_pending` > 0), which is forked when the prompt's logits arrive."""

    request: Request
    index: int
    seed: int
    generated: list[int] = field(default_factory=list)
    seq: int | None = None  # handle in the block manager; None while waiting
    pending: list[int] = field(default_factory=list)  # tokens to feed in the coming forwards
    forks_pending: int = 0
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    text: str | None = None  # the final text, once finished and decoded

    def context(self) -> list[int]:
        return self.request.prompt_ids + self.generated
