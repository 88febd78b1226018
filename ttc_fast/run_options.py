"""The settings of `ttc-fast run`: each is the explicit flag, else the preset's value (`--preset
sal`, `ttc_fast.presets`), else the default; and what they mean for the prompt and the PRM."""
from __future__ import annotations

# `ttc-fast run` settings the built-in defaults fill when neither a flag nor a preset sets them.
RUN_DEFAULTS = {"n": 4, "temperature": 0.8, "top_p": 1.0, "max_tokens": 2048, "seed": 0, "aggregation": "last"}
# --chat-template values that name a template rather than a file.
CHAT_TEMPLATE_NAMES = ("checkpoint", "none", "sal-llama3", "sal-auto")
def _read_at_file(value: str | None, flag: str) -> str | None:
    """`@FILE` -> the file's text; anything else as given."""
    if value is None or not value.startswith("@"):
        return value
    from pathlib import Path

    path = Path(value[1:]).expanduser()
    if not path.is_file():
        from .results import RunError

        raise RunError(f"{flag} {value}: no such file {str(path)!r}")
    return path.read_text(encoding="utf-8")


def _unescape(text: str | None) -> str | None:
    r"""Backslash escapes typed on a command line (\n, \t, \\) -> the characters."""
    if text is None:
        return None
    import re

    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], text)


def resolve_run_settings(args) -> dict:
    """Every `ttc-fast run` setting: the explicit flag, else the preset's value, else the default.
    `chat_template` "sal-auto" (the sal preset's) is resolved once the policy's tokenizer is loaded."""
    import dataclasses
    import json

    from .results import RunError
    from .run import STRATEGY_OPTIONS, strategy_class

    cls = strategy_class(args.strategy)
    fields = {f.name for f in dataclasses.fields(cls)}
    preset: dict = {}
    if args.preset == "sal":
        from .presets import sal_preset

        sal = sal_preset()
        preset = {k: v for k, v in sal["settings"].items() if k != "step_delimiter"}
        if "lookahead" not in fields:
            preset.pop("lookahead")
        if cls.__name__ == "BeamSearch":  # its beam-search recipe sets filter_duplicates: true
            preset["filter_duplicates"] = True
        preset.update(system_prompt=sal["system_prompt"], chat_template="sal-auto", prm_layout="sal")
    settings = dict(RUN_DEFAULTS)
    settings.update(preset)
    for name in ("n", "width", "iterations", "aggregation", *STRATEGY_OPTIONS, "routing", "temperature", "top_p",
                 "max_tokens", "seed", "system_prompt", "chat_template", "prm_layout"):
        value = getattr(args, name)
        if value is not None:
            settings[name] = value
    settings["system_prompt"] = _read_at_file(settings.get("system_prompt"), "--system-prompt")
    template = settings.get("chat_template")
    if template not in (None, *CHAT_TEMPLATE_NAMES):
        template = _read_at_file(template if template.startswith("@") else "@" + template, "--chat-template")
    settings["chat_template"] = template
    kwargs = {}
    if args.chat_template_kwargs is not None:
        try:
            kwargs = json.loads(args.chat_template_kwargs)
        except json.JSONDecodeError as e:
            raise RunError(f"--chat-template-kwargs is not valid JSON ({e}): pass an object, e.g. "
                           "'{\"enable_thinking\": false}'") from None
        if not isinstance(kwargs, dict):
            raise RunError(f"--chat-template-kwargs must be a JSON object, got {args.chat_template_kwargs!r}")
    settings["chat_template_kwargs"] = kwargs
    settings["prm_step_separator"] = _unescape(args.prm_step_separator)
    return settings


def prm_options(args, settings: dict) -> dict:
    """`load_prm` options from the run's settings. A preset's math-shepherd layout reaches only a
    math-shepherd PRM (for another kind it is no error); --prm-layout is passed as given."""
    from .prompts import system_text

    options = {}
    layout = settings.get("prm_layout")
    kind = (args.prm_kind or "").removeprefix("outcome:")
    if args.prm_layout is not None or (layout is not None and kind == "math-shepherd"):
        options["layout"] = layout
        if layout == "sal":  # search-and-learn puts the run's system prompt before the question
            options["system_prompt"] = system_text(settings["system_prompt"])
    if settings["prm_step_separator"] is not None:
        options["step_separator"] = settings["prm_step_separator"]
    return options


def chat_template_for(value, tokenizer):
    """A resolved --chat-template for `PromptFormat`: None (the checkpoint's), "" (none) or Jinja."""
    from .presets import sal_chat_template, sal_preset

    if value in (None, "checkpoint"):
        return None
    if value == "none":
        return ""
    if value == "sal-llama3":
        return sal_preset()["llama3_chat_template"]
    if value == "sal-auto":
        return sal_chat_template(tokenizer) if tokenizer is not None else None
    return value
