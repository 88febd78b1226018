"""What a results line records of the models that made it, so that a resumed run or a merge of
shards can refuse lines written with other models. A checkpoint is named by its path (for the
reader) and the SHA-256 of its model configuration (what is compared: the same checkpoint may
sit at another path on another node); a verifier given as ``python:MODULE:NAME`` by that spec.
Each model also records its cost constants (`ttc_fast.flops.ModelCost`), so that a line's FLOPs
can be recomputed from the line alone; they follow from the configuration, so they are not compared.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json


def config_sha256(config) -> str:
    """SHA-256 of a ModelConfig (shapes, vocabulary, RoPE, context, family), as sorted JSON."""
    text = json.dumps(dataclasses.asdict(config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def run_models(policy, prm=None, prm_spec=None) -> dict:
    """{"policy": {"path", "config_sha256", "cost"}, "prm": None | {"spec", "kind", "config_sha256",
    "cost"}}: `policy` a LoadedModel, `prm` the verifier object, `prm_spec` what named it (a path,
    a python: spec). "cost" is `ModelCost.as_dict()` (null for a verifier without a model)."""
    from .flops import model_cost

    out = {"policy": {"path": str(policy.path), "config_sha256": config_sha256(policy.config),
                      "cost": model_cost(policy).as_dict()}, "prm": None}
    if prm is not None:
        model = getattr(prm, "model", None)
        out["prm"] = {"spec": None if prm_spec is None else str(prm_spec), "kind": getattr(prm, "kind", None),
                      "config_sha256": config_sha256(model.config) if model is not None else None,
                      "cost": model_cost(model, getattr(prm, "head", None)).as_dict() if model is not None else None}
    return out


def models_differ(a: dict | None, b: dict | None) -> str | None:
    """How two lines' models differ (None: the same, or a line that does not say): the policy's
    and a model PRM's configuration, a PRM's kind, a callable verifier's spec."""
    if a is None or b is None:
        return None
    if a["policy"]["config_sha256"] != b["policy"]["config_sha256"]:
        return f"the policy ({a['policy']['path']} against {b['policy']['path']}: other configurations)"
    pa, pb = a.get("prm"), b.get("prm")
    if (pa is None) != (pb is None):
        return "the verifier (one has none)"
    if pa is None:
        return None
    if pa["kind"] != pb["kind"]:
        return f"the verifier's kind ({pa['kind']} against {pb['kind']})"
    if pa["config_sha256"] is not None or pb["config_sha256"] is not None:
        if pa["config_sha256"] != pb["config_sha256"]:
            return f"the PRM ({pa['spec']} against {pb['spec']}: other configurations)"
    elif pa["spec"] != pb["spec"]:
        return f"the verifier ({pa['spec']} against {pb['spec']})"
    return None
