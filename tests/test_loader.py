"""load_model: configs of every family, sharded checkpoints, and clear errors for bad input."""
import json
import shutil

import pytest
import torch

import ttc_fast as tf
from ttc_fast.config import ModelConfig
from ttc_fast.testing import build_tiny_model


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("llama"), "llama")


def test_config_reads_old_and_new_rope_formats():
    base = dict(architectures=["LlamaForCausalLM"], vocab_size=10, hidden_size=8, intermediate_size=16,
                num_hidden_layers=1, num_attention_heads=2)
    old = ModelConfig.from_dict({**base, "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 32.0}})
    new = ModelConfig.from_dict({**base, "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0}})
    assert old.rope == new.rope and old.rope.theta == 500000.0 and old.rope.factor == 32.0
    assert old.num_kv_heads == 2 and old.head_dim == 4
    qwen2 = ModelConfig.from_dict({**base, "architectures": ["Qwen2ForCausalLM"], "attention_bias": None})
    assert qwen2.qkv_bias and not qwen2.o_bias
    with pytest.raises(ValueError, match="rope type 'yarn' is not supported"):
        ModelConfig.from_dict({**base, "rope_scaling": {"type": "yarn", "factor": 4.0}})


def test_sharded_checkpoint_loads_the_same_weights(llama_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    sharded = tmp_path / "sharded"
    shutil.copytree(llama_dir, sharded)
    state = load_file(str(sharded / "model.safetensors"))
    (sharded / "model.safetensors").unlink()
    keys = sorted(state)
    halves = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2], "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, part in halves.items():
        save_file({k: state[k] for k in part}, str(sharded / name))
    weight_map = {k: name for name, part in halves.items() for k in part}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    a, b = tf.load_model(llama_dir, device="cpu"), tf.load_model(sharded, device="cpu")
    for (ka, va), (kb, vb) in zip(a.module.state_dict().items(), b.module.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tf.load_model(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        tf.load_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="no built-in model"):
        tf.load_model("builtin:does-not-exist")


def test_unsupported_architecture_lists_the_supported_ones(llama_dir, tmp_path):
    bad = tmp_path / "gpt2"
    shutil.copytree(llama_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported architecture GPT2LMHeadModel.*LlamaForCausalLM.*Qwen3ForCausalLM"):
        tf.load_model(bad)


def test_missing_weights_and_wrong_shapes(llama_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(llama_dir, broken)
    state = load_file(str(broken / "model.safetensors"))
    state.pop("model.layers.1.mlp.up_proj.weight")
    save_file(state, str(broken / "model.safetensors"))
    with pytest.raises(ValueError, match="missing weights model.layers.1.mlp.up_proj.weight"):
        tf.load_model(broken)
    shutil.copy(llama_dir / "model.safetensors", broken / "model.safetensors")
    cfg = json.loads((broken / "config.json").read_text())
    cfg["intermediate_size"] = 7
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"mlp\.\w+_proj\.weight has shape"):
        tf.load_model(broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights: no .safetensors"):
        tf.load_model(broken)


def test_unavailable_device_and_dtype(llama_dir):
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            tf.load_model(llama_dir, device="cuda")
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        tf.load_model(llama_dir, device="cpu", dtype="float8")
    with pytest.raises(ValueError, match="not supported"):
        tf.load_model(llama_dir, device="cpu", dtype=torch.int8)
    with pytest.raises(ValueError, match="unknown device"):
        tf.load_model(llama_dir, device="tpu:0")


def test_text_prompts_need_a_tokenizer(tmp_path):
    path = build_tiny_model(tmp_path / "notok", "llama", with_tokenizer=False)
    model = tf.load_model(path, device="cpu")
    assert model.tokenizer is None
    with pytest.raises(ValueError, match="no tokenizer"):
        tf.Engine(model, num_blocks=16, block_size=4).generate(["hello"])


def _save_bin_shards(state: dict, folder, parts: int) -> None:
    """`state` as PyTorch .bin files: pytorch_model.bin, or `parts` shards and their index."""
    keys = sorted(state)
    if parts == 1:
        torch.save(state, folder / "pytorch_model.bin")
        return
    names = [f"pytorch_model-{i + 1:05d}-of-{parts:05d}.bin" for i in range(parts)]
    weight_map = {}
    for i, name in enumerate(names):
        part = keys[i::parts]
        torch.save({k: state[k] for k in part}, folder / name)
        weight_map.update({k: name for k in part})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("parts", [1, 3])
def test_pytorch_bin_checkpoints_load_the_same_weights(llama_dir, tmp_path, parts):
    """Skywork-o1-Open-PRM and math-shepherd-mistral-7b-prm ship .bin files only: one file or a
    sharded index, read with torch.load(weights_only=True, mmap=True)."""
    from safetensors.torch import load_file

    binned = tmp_path / "bin"
    shutil.copytree(llama_dir, binned)
    state = load_file(str(binned / "model.safetensors"))
    (binned / "model.safetensors").unlink()
    _save_bin_shards(state, binned, parts)
    a, b = tf.load_model(llama_dir, device="cpu"), tf.load_model(binned, device="cpu")
    for (ka, va), (kb, vb) in zip(a.module.state_dict().items(), b.module.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_bin_that_is_not_a_plain_state_dict_is_refused(llama_dir, tmp_path):
    bad = tmp_path / "pickle"
    shutil.copytree(llama_dir, bad)
    (bad / "model.safetensors").unlink()
    torch.save({"weights": ModelConfig}, bad / "pytorch_model.bin")  # a class: not loadable with weights_only
    with pytest.raises(ValueError, match="weights_only=True.*convert the checkpoint to safetensors"):
        tf.load_model(bad, device="cpu")
    (bad / "pytorch_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match="no .safetensors and no pytorch_model.bin"):
        tf.load_model(bad, device="cpu")


def test_tokenizer_shipped_as_sentencepiece_model_only(tmp_path):
    """math-shepherd-mistral-7b-prm's tokenizer is a SentencePiece tokenizer.model (no
    tokenizer.json): it loads (sentencepiece and protobuf are dependencies) and encodes text."""
    import sentencepiece as spm

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(["Natalia sold 48 clips in April and half as many in May.",
                                 "Step 1: add 3 and 4 to get 7.", "The answer is 42."] * 50))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=96,
                                   model_type="bpe", bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2)
    path = build_tiny_model(tmp_path / "model", "mistral", with_tokenizer=False, vocab_size=96)
    shutil.copy(tmp_path / "sp.model", path / "tokenizer.model")
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>",
                                                            "eos_token": "</s>", "unk_token": "<unk>",
                                                            "add_bos_token": True, "add_eos_token": False}))
    assert not (path / "tokenizer.json").exists()
    model = tf.load_model(path, device="cpu")
    text = "Natalia sold 48 clips in April."
    ids = model.tokenizer(text)["input_ids"]
    assert ids[0] == 1 and model.tokenizer.decode(ids, skip_special_tokens=True) == text
    out = tf.Engine(model, kv_cache_bytes=4 << 20).generate([text], tf.SamplingParams(max_tokens=4, ignore_eos=True))[0]
    assert len(out.token_ids) == 4 and out.text is not None
