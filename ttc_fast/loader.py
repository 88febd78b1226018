"""Loading a local checkpoint into our own model implementation.

A Hugging Face checkpoint directory: config.json (and generation_config.json for EOS ids), the
weights as safetensors or as PyTorch `.bin` files (one file or a sharded index; `.bin` files are
read with `torch.load(weights_only=True, mmap=True)`), and the tokenizer through AutoTokenizer
when its files are present (`tokenizer.json`, or a SentencePiece `tokenizer.model` alone). Or a
`.gguf` file, dequantized on load by transformers' GGUF reader (the optional extra
`ttc_fast[gguf]`). Nothing is ever downloaded: `path` must be local, or `builtin:NAME` for a model
shipped with the package.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ModelConfig, rope_inv_freq
from .model import STACKED, CausalLM, stack_checkpoint

BUILTIN_DIR = Path(__file__).parent / "builtin"
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


@dataclass
class LoadedModel:
    """A model ready to run: its module, config, tokenizer (or None), device and dtype."""

    module: CausalLM
    config: ModelConfig
    tokenizer: object | None
    path: Path
    device: torch.device
    dtype: torch.dtype
    eos_token_ids: tuple[int, ...]


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"unknown device {device!r}: use 'cpu' or 'cuda[:N]'") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} was requested but CUDA is not available here; use device='cpu'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r} does not exist: {torch.cuda.device_count()} CUDA device(s) visible")
    elif device.type != "cpu":
        raise ValueError(f"device type {device.type!r} is not supported: use 'cpu' or 'cuda'")
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device, config_dtype: str | None) -> torch.dtype:
    if dtype is None:
        # CPUs run fp32 (bf16 matmuls are slow there); GPUs take the checkpoint's own dtype.
        if device.type == "cpu":
            return torch.float32
        return _DTYPES.get(config_dtype or "bfloat16", torch.bfloat16)
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}: use one of {', '.join(sorted(_DTYPES))}")
        dtype = _DTYPES[dtype]
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype {dtype} is not supported: use float32, float16 or bfloat16")
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"bfloat16 is not supported on {torch.cuda.get_device_name(device)}; use dtype='float16'")
    return dtype


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message names the extra that brings it."""


def is_gguf(path: str | Path) -> bool:
    return str(path).endswith(".gguf") and Path(path).expanduser().is_file()


def resolve_path(path: str | Path) -> Path:
    text = str(path)
    if text.startswith("builtin:"):
        name = text[len("builtin:"):]
        found = BUILTIN_DIR / name
        if not (found / "config.json").is_file():
            available = sorted(p.name for p in BUILTIN_DIR.iterdir() if (p / "config.json").is_file()) if BUILTIN_DIR.is_dir() else []
            raise FileNotFoundError(f"no built-in model {name!r}; available: {', '.join(available) or 'none'}")
        return found
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"model directory {str(p)!r} does not exist (ttc_fast loads local checkpoints only; nothing is downloaded)")
    if not p.is_dir():
        raise FileNotFoundError(f"{str(p)!r} is a file; pass the checkpoint directory that holds config.json "
                                "(or a .gguf file)")
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{str(p)!r} has no config.json: is it a Hugging Face checkpoint directory?")
    return p


def read_state_dict(path: Path, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint (single file or sharded index), cast to dtype on device."""
    from safetensors import safe_open

    files, index = _weight_files(path, "model.safetensors", "*.safetensors")
    if not files:  # Skywork-o1-Open-PRM and math-shepherd-mistral-7b-prm ship PyTorch .bin files only
        files, index = _weight_files(path, "pytorch_model.bin", "*.bin")
    if not files:
        raise FileNotFoundError(f"{path} holds no weights: no .safetensors and no pytorch_model.bin files")
    tensors = {}

    def put(key, t):
        tensors[key] = t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)

    for name in files:
        file = path / name
        if not file.is_file():
            raise FileNotFoundError(f"shard {name} listed in {index} is missing from {path}")
        if name.endswith(".safetensors"):
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for key in f.keys():
                    put(key, f.get_tensor(key))
            continue
        try:
            state = torch.load(str(file), map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # pickles that are not plain tensors, or not zip-format files
            lines = str(e).splitlines() or [type(e).__name__]
            reason = next((line.strip() for line in lines if "error:" in line), lines[0])
            raise ValueError(f"{file}: not a plain state dict of tensors (torch.load with weights_only=True: {reason}); "
                             "convert the checkpoint to safetensors") from None
        for key, t in state.items():
            put(key, t)
    return tensors


def _weight_files(path: Path, single: str, pattern: str) -> tuple[list[str], str | None]:
    """The weight files of one format: the shards its index lists, the single file, or every file
    matching `pattern`; and the index's name when there is one."""
    index = path / f"{single}.index.json"
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values())), index.name
    if (path / single).is_file():
        return [single], None
    return sorted(p.name for p in path.glob(pattern) if p.name != "training_args.bin"), None


def build_module(
    config: ModelConfig, state: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype, source: Path,
    require_lm_head: bool = True,
) -> CausalLM:
    """Our module from checkpoint tensors. With require_lm_head=False (PRMs with a score or value
    head, e.g. Qwen2.5-Math-PRM, which ship no lm_head) a missing untied lm_head is allowed and the
    module's `lm_head` is None: such a module serves hidden states only (want_logits=False)."""
    with torch.device("meta"):
        module = CausalLM(config)
    expected = set(module.state_dict().keys())
    if config.tie_word_embeddings:
        expected.discard("lm_head.weight")
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    headless = not require_lm_head and "lm_head.weight" in expected and "lm_head.weight" not in state
    if headless:
        expected.discard("lm_head.weight")
    missing = sorted(name for key in expected for name in _checkpoint_names(key) if name not in state)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(f"{source}: checkpoint is missing weights {shown}; is config.json from the same model?")
    state = stack_checkpoint(state, config.num_layers)
    # Heads a PRM adds (value heads, score heads) are read by the PRM loader, not here.
    ours = {k: v for k, v in state.items() if k in expected}
    for key, tensor in ours.items():
        want = _shape_of(module, key)
        if tuple(tensor.shape) != want:
            raise ValueError(f"{source}: weight {key} has shape {tuple(tensor.shape)}, config.json implies {want}")
    module.load_state_dict(ours, strict=False, assign=True)
    if headless:
        module.lm_head = None
    # Buffers are not in the checkpoint: rebuild the rotary frequencies on the real device.
    module.inv_freq = rope_inv_freq(config.rope, config.head_dim).to(device)
    module.tie_weights()
    return module.eval()


def _checkpoint_names(key: str) -> list[str]:
    """The checkpoint parameters one of our parameters is made of (several for stacked ones)."""
    for stacked, parts in STACKED.items():
        if f".{stacked}." in key:
            prefix, kind = key.split(f"{stacked}.")
            return [f"{prefix}{p}.{kind}" for p in parts]
    return [key]


def _shape_of(module: torch.nn.Module, key: str) -> tuple[int, ...]:
    obj = module
    for part in key.split("."):
        obj = getattr(obj, part) if not part.isdigit() else obj[int(part)]
    return tuple(obj.shape)


def load_tokenizer(path: Path):
    has_files = any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json"))
    if not has_files:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def eos_ids(path: Path, config: ModelConfig, tokenizer) -> tuple[int, ...]:
    ids = list(config.eos_token_ids)
    gen = path / "generation_config.json"
    if path.is_dir() and gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids += eos if isinstance(eos, list) else ([eos] if eos is not None else [])
    if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
        ids.append(tokenizer.eos_token_id)
    return tuple(dict.fromkeys(int(i) for i in ids))


def read_checkpoint(path: str | Path, device: torch.device, dtype: str | torch.dtype | None):
    """(path, raw config dict, tensors cast to the resolved dtype on `device`, tokenizer, dtype)
    of a checkpoint directory, `builtin:NAME` or a `.gguf` file."""
    if is_gguf(path):
        from .gguf import read_gguf

        path = Path(path).expanduser()
        raw, state, tokenizer = read_gguf(path)
        dtype = resolve_dtype(dtype, device, None)
        return path, raw, {k: v.to(device=device, dtype=dtype) for k, v in state.items()}, tokenizer, dtype
    path = resolve_path(path)
    raw = json.loads((path / "config.json").read_text())
    dtype = resolve_dtype(dtype, device, raw.get("dtype") or raw.get("torch_dtype"))
    return path, raw, read_state_dict(path, device, dtype), load_tokenizer(path), dtype


def config_source(path: Path) -> str:
    """Where a checkpoint's config comes from, for error messages."""
    return str(path) if path.is_file() else str(path / "config.json")


def load_model(path: str | Path, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None) -> LoadedModel:
    """Load a local HF checkpoint directory, `builtin:NAME` or a `.gguf` file into ttc_fast's own model."""
    device = resolve_device(device)
    path, raw, state, tokenizer, dtype = read_checkpoint(path, device, dtype)
    config = ModelConfig.from_dict(raw, config_source(path))
    module = build_module(config, state, device, dtype, path)
    return LoadedModel(module, config, tokenizer, path, device, dtype, eos_ids(path, config, tokenizer))
