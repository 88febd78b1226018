"""Loading a PRM: a checkpoint (directory, `builtin:NAME` or .gguf) of one of the published
formats with its head, a callable verifier, or a named verifier from `VERIFIERS`."""
from __future__ import annotations

import json
from pathlib import Path

from .formats import FORMATS, KINDS, make_format
from .base import PRM
from .callable import CallablePRM
from .scorer import ModelPRM

ALL_KINDS = KINDS + ("outcome", "outcome:<kind>", "<callable>")
_ARCH_KIND = {"Qwen2ForProcessRewardModel": "qwen-prm", "Qwen2ForPrmModel": "skywork"}


def _toy_checker():
    from ..toy import check_step

    return check_step


# Named verifiers load_prm resolves: name -> a function returning the callable.
VERIFIERS = {"builtin:toy-checker": _toy_checker}  # the toy task's hard-coded step checker


def _parse_kind(kind, path_or_callable) -> tuple[str | None, bool]:
    if kind is None:
        return None, False
    if not isinstance(kind, str):
        raise ValueError(f"kind must be a string, got {type(kind).__name__}")
    outcome = False
    if kind == "outcome":
        return None, True
    if kind.startswith("outcome:"):
        kind, outcome = kind[len("outcome:"):], True
    if kind not in KINDS and not (kind == "callable" and callable(path_or_callable)):
        raise ValueError(f"unknown PRM kind {kind!r}: one of {', '.join(KINDS)}, 'outcome', 'outcome:<kind>', or a callable verifier")
    return kind, outcome


def _load_base(path, device, dtype):
    """Our decoder for a PRM checkpoint (PRM architectures accepted, lm_head optional) and the
    checkpoint tensors that are not ours (the heads)."""
    from ..config import ModelConfig
    from ..loader import LoadedModel, build_module, config_source, eos_ids, read_checkpoint, resolve_device

    device = resolve_device(device)
    path, raw, state, tokenizer, dtype = read_checkpoint(path, device, dtype)
    config = ModelConfig.from_dict(raw, config_source(path), allow_prm=True)
    extra = {k: v for k, v in state.items() if not k.startswith("model.") and k != "lm_head.weight"}
    module = build_module(config, state, device, dtype, path, require_lm_head=False)
    return LoadedModel(module, config, tokenizer, path, device, dtype, eos_ids(path, config, tokenizer)), raw, extra


def load_prm(path_or_callable, kind: str | None = None, device=None, dtype=None, kv_cache_bytes: int | None = None,
             block_size: int = 16, backend="auto", num_blocks: int | None = None, max_batch_tokens: int = 8192,
             step_separator: str | None = None, system_prompt: str | None = None, layout: str | None = None) -> PRM:
    """A PRM from a local checkpoint (a directory, `builtin:NAME` such as `builtin:toy-prm`, or a
    .gguf file), a callable verifier, or a name in `VERIFIERS` (`builtin:toy-checker`).

    kind: "rlhflow" | "math-shepherd" | "qwen-prm" | "skywork" | "outcome" | "outcome:<kind>";
    None infers it from a callable or from the architecture (Qwen2ForProcessRewardModel ->
    qwen-prm, Qwen2ForPrmModel -> skywork). layout (math-shepherd): "model-card" (default) or
    "sal" (search-and-learn's: its system prompt before the question, steps joined by "\\n\\n").
    step_separator: math-shepherd's separator between a step tag and the next step (default: the
    layout's), or the joiner of a callable's outcome text ("\\n\\n"). system_prompt: qwen-prm's
    system message (None: Qwen's, "": none), or the text before the question in math-shepherd's
    sal layout (None: search-and-learn's MATH prompt); no other format has one."""
    if isinstance(path_or_callable, str) and path_or_callable in VERIFIERS:
        path_or_callable = VERIFIERS[path_or_callable]()
    base, outcome = _parse_kind(kind, path_or_callable)
    if callable(path_or_callable):
        if base not in (None, "callable"):
            raise ValueError(f"kind {kind!r} needs a checkpoint path, not a callable")
        return CallablePRM(path_or_callable, outcome=outcome, step_separator=step_separator or "\n\n")
    from ..loader import is_gguf, resolve_path

    path = Path(path_or_callable).expanduser() if is_gguf(path_or_callable) else resolve_path(path_or_callable)
    if base is None and path.is_file():
        raise ValueError(f"{path}: a .gguf file names no PRM architecture; pass kind= one of {', '.join(KINDS)}")
    if base is None:
        archs = json.loads((path / "config.json").read_text()).get("architectures") or []
        found = [_ARCH_KIND[a] for a in archs if a in _ARCH_KIND]
        if not found:
            raise ValueError(f"{path}: cannot infer the PRM kind from architectures {archs}; pass kind= one of {', '.join(KINDS)}"
                             + (" (or 'outcome:<kind>')" if outcome else ""))
        base = found[0]
    if base == "callable":
        raise ValueError("kind 'callable' needs a callable verifier")
    loaded, raw, extra = _load_base(path, device, dtype)
    tok = loaded.tokenizer
    if tok is None:
        raise ValueError(f"{path}: no tokenizer files; a PRM needs its own tokenizer")
    head = None
    head_keys = FORMATS[base].head_keys
    if head_keys:
        hsize = loaded.config.hidden_size
        missing = [k for k in head_keys if k not in extra]
        if missing:
            raise ValueError(f"{path}: checkpoint has no {base} head: missing {', '.join(missing)} "
                             f"(is this a {base} checkpoint? its architectures are {raw.get('architectures')})")
        head = {}
        for k, shape in head_keys.items():
            want = tuple(hsize if d == "h" else d for d in shape)
            if tuple(extra[k].shape) != want:
                raise ValueError(f"{path}: head weight {k} has shape {tuple(extra[k].shape)}, expected {want}")
            head[k] = extra[k].float()
    elif loaded.module.lm_head is None:
        raise ValueError(f"{path}: checkpoint has no lm_head; kind {base!r} reads the label tokens' logits")
    fmt = make_format(base, tok, path, layout=layout, step_separator=step_separator, system_prompt=system_prompt)
    return ModelPRM(loaded, fmt, head, outcome=outcome, kv_cache_bytes=kv_cache_bytes, block_size=block_size,
                    backend=backend, num_blocks=num_blocks, max_batch_tokens=max_batch_tokens)
