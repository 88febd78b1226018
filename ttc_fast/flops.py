"""What a search costs, by one stated formula, so that any run's FLOPs can be recomputed from its
results lines alone.

For a model with N non-embedding parameters, L layers, H query heads of size d, processing T
tokens whose context lengths sum to C (a token at position p, counted from 0, attends p + 1
positions: C = sum over the tokens of p + 1):

    FLOPs = 2 * N * T + 4 * L * H * d * C

2N per token is a forward's matmuls (a multiply and an add per weight); 4LHd per attended
position is QK^T and the attention-weighted sum of V, 2Hd each per layer.

N, "non-embedding parameters", is every parameter but the input embedding table, as
transformers counts a model (the sum of its parameters minus `embed_tokens`): attention q/k/v/o
(GQA: k and v have the KV heads' width; head_dim as the config gives it), the SwiGLU MLP's gate,
up and down, every norm (Qwen3's per-head q/k norms too), the biases the family has, and the
output head. An untied lm head IS counted (a matmul over the hidden state); a tied one shares the
embedding's weights and is not (it is the embedding). A PRM with a score or value head counts
that head instead of an lm head (it reads hidden states: an lm head its checkpoint may hold, as
Skywork's does, never runs). The engine computes the head only at the rows it reads
(each decode token, a prompt's last token, a PRM's scored positions), so the formula slightly
overstates prefill: that is the convention, stated once.

What counts as a processed token is the search's (ttc_fast.search): the policy's prompt once per
problem and every generated token once (forks share their parent's KV: a fork costs nothing;
a prefix-cache hit from another problem is not subtracted, and recomputes after preemption or
eviction are not added: both depend on what ran beside the problem, so the policy's count is a
property of the problem and the strategy alone); the PRM's tokens are those its model ran for
the problem (`StepScorer` charges each row), cache hits and re-encodes as they fell.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

COST_FIELDS = ("non_embedding_params", "layers", "q_heads", "head_dim")


@dataclass(frozen=True)
class ModelCost:
    """The constants of the FLOPs formula for one model (see the module docstring)."""

    non_embedding_params: int
    layers: int
    q_heads: int
    head_dim: int

    def __post_init__(self):
        for name in COST_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"ModelCost: {name} must be an int >= 0, got {value!r}")

    @staticmethod
    def from_config(config, head_params: int | None = None) -> "ModelCost":
        """The cost of a model from its configuration: ttc_fast's `ModelConfig`, a transformers
        config object or a config.json dict. `head_params`: the parameters of the output head in
        place of the lm head (a PRM's score head); None: the lm head, counted when untied."""
        from .memory_plan import layer_parameter_count

        config = _model_config(config)
        h, d = config.hidden_size, config.head_dim
        layer = layer_parameter_count(config)
        if head_params is None:
            head_params = 0 if config.tie_word_embeddings else h * config.vocab_size
        params = config.num_layers * layer + h + head_params  # + the final norm
        return ModelCost(params, config.num_layers, config.num_heads, d)

    @staticmethod
    def from_dict(raw: dict) -> "ModelCost":
        """A cost as a results line records it (`as_dict`)."""
        missing = [k for k in COST_FIELDS if k not in raw]
        if missing:
            raise ValueError(f"a model cost needs {', '.join(COST_FIELDS)}; missing {', '.join(missing)}")
        return ModelCost(*(int(raw[k]) for k in COST_FIELDS))

    def as_dict(self) -> dict:
        return asdict(self)

    def flops(self, tokens: int, context_sum: int) -> int:
        """FLOPs of `tokens` processed tokens whose context lengths sum to `context_sum`."""
        return 2 * self.non_embedding_params * tokens + 4 * self.layers * self.q_heads * self.head_dim * context_sum


def context_sum(start: int, count: int) -> int:
    """Sum of the context lengths of `count` tokens processed at positions start, start + 1, ...:
    (start + 1) + ... + (start + count)."""
    return count * start + count * (count + 1) // 2


def model_cost(loaded, head: dict | None = None) -> ModelCost:
    """The cost of a loaded model (`LoadedModel`); `head`: a PRM's head tensors, which replace
    its lm head."""
    head_params = None if head is None else sum(int(t.numel()) for t in head.values())
    return ModelCost.from_config(loaded.config, head_params)


def record_flops(compute: dict, models: dict | None) -> dict:
    """{"policy_flops", "prm_flops", "flops"} of a results line's `compute` ingredients and its
    `models` (each model's "cost"); None where a cost the tokens need is not recorded. A PRM that
    processed no tokens (a callable verifier) costs 0."""
    models = models or {}

    def part(model: dict | None, tokens: int, ctx: int) -> int | None:
        if not tokens:
            return 0
        cost = (model or {}).get("cost")
        return None if cost is None else ModelCost.from_dict(cost).flops(tokens, ctx)

    policy = part(models.get("policy"), compute["policy_tokens_processed"], compute["policy_context_sum"])
    prm = part(models.get("prm"), compute["prm_tokens_processed"], compute["prm_context_sum"])
    total = None if policy is None or prm is None else policy + prm
    return {"policy_flops": policy, "prm_flops": prm, "flops": total}


def _model_config(config):
    from .config import ModelConfig

    if isinstance(config, ModelConfig):
        return config
    raw = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return ModelConfig.from_dict(raw, "the model's configuration", allow_prm=True)
