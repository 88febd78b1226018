"""The real pretrained SmolLM2-135M-Instruct (fetched from PyPI and converted once, see
`ttc_fast.testing_smollm2`): greedy parity with transformers, the search prompt's ids, stop
strings and step splitting on its real BPE tokens, EOS ids from generation_config, the model as
an RLHFlow-format PRM against transformers, and `ttc-fast run` end to end, killed and resumed."""
from __future__ import annotations

import dataclasses
import json
import sys

import pytest
import torch
from tokenizers.processors import TemplateProcessing
from transformers import AutoModelForCausalLM, AutoTokenizer

import ttc_fast as tf
from ttc_fast.cli import main
from ttc_fast.prompts import DEFAULT_SYSTEM_PROMPT, PromptFormat, encode_prompt
from ttc_fast.results import differences, read_results
from ttc_fast.search import split_steps

from shared_data import GSM8K
from test_prm_formats import ref_rlhflow
from test_run_cli import kill_after_first_line

pytestmark = pytest.mark.slow  # every test here loads a 135M-parameter model

QUESTIONS = ["What is 12 * 7? Answer briefly.", "Name three prime numbers.", "Write one sentence about the sea."]
GREEDY = tf.SamplingParams(temperature=0.0, max_tokens=48)


@pytest.fixture(scope="module")
def smol(smollm2_path):
    return tf.load_model(smollm2_path, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def engine(smol):
    return tf.Engine(smol, kv_cache_bytes=64 << 20)


@pytest.fixture(scope="module")
def reference(smollm2_path):
    return AutoModelForCausalLM.from_pretrained(str(smollm2_path), dtype=torch.float32).eval()


def _hf_greedy(reference, ids, max_new_tokens=48) -> list[int]:
    x = torch.tensor([ids])
    with torch.no_grad():
        out = reference.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(ids):].tolist()


def test_checkpoint_as_converted(smol):
    cfg = smol.config
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.tie_word_embeddings) == (30, 9, 3, True)
    assert smol.eos_token_ids == (2,)  # <|im_end|>, from config.json and generation_config.json


def test_greedy_matches_transformers(engine, smol, reference):
    """fp32, the chat prompt of the search path: identical tokens for 48 tokens or up to EOS."""
    prompts = [encode_prompt(q, smol.tokenizer) for q in QUESTIONS]
    outs = engine.generate(prompts, GREEDY)
    for ids, out in zip(prompts, outs):
        expected = _hf_greedy(reference, ids)
        assert out.token_ids == expected
        assert out.finish_reason == ("eos" if expected[-1] == 2 else "length")


def _searched_prompt(engine, question, **options) -> list[int]:
    """The token ids the search path starts a problem from."""
    seen = []
    start = engine.start

    def spy(prompt):
        seen.append(list(prompt))
        return start(prompt)

    engine.start = spy
    try:
        engine.search([question], tf.BestOfN(n=1), tf.SamplingParams(temperature=0.0, max_tokens=1, seed=0),
                      prm=tf.load_prm(lambda q, steps: 0.0), **options)
    finally:
        del engine.start
    return seen[0]


def _template_ids(tok, messages) -> list[int]:
    return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)


def test_search_prompt_is_the_templates_ids(engine, smol):
    """SmolLM2's template writes its own <|im_start|> (its BOS) and its tokenizer adds none: the
    search prompt is exactly the template's ids. system_prompt None is the default, "" none."""
    tok, q = smol.tokenizer, QUESTIONS[0]
    with_default = _template_ids(tok, [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, {"role": "user", "content": q}])
    assert _searched_prompt(engine, q) == with_default
    assert _searched_prompt(engine, q, system_prompt=None) == with_default
    # no system message: SmolLM2's template then writes its own default system turn
    assert _searched_prompt(engine, q, system_prompt="") == _template_ids(tok, [{"role": "user", "content": q}])
    assert _searched_prompt(engine, q, chat_template="") == tok(q + "\n\n")["input_ids"]  # no template: plain


def _variant(smollm2_path, template_writes_bos: bool):
    """SmolLM2's tokenizer made to add a BOS (<|endoftext|>, id 0) to what it encodes, as Llama 3's
    and Mistral's do; its template made to write that BOS too, or not (search-and-learn's Llama 3
    template leaves it to the tokenizer)."""
    tok = AutoTokenizer.from_pretrained(str(smollm2_path))
    tok.bos_token = "<|endoftext|>"
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<|endoftext|> $A", pair="<|endoftext|> $A $B",
                                                              special_tokens=[("<|endoftext|>", 0)])
    if template_writes_bos:
        tok.chat_template = "{{ bos_token }}" + tok.chat_template
    assert tok.encode("hi")[:1] == [0]
    return tok


@pytest.mark.parametrize("template_writes_bos", [True, False])
def test_search_prompt_has_exactly_one_bos(engine, smol, smollm2_path, template_writes_bos):
    tok = _variant(smollm2_path, template_writes_bos)
    variant = tf.Engine(dataclasses.replace(smol, tokenizer=tok), kv_cache_bytes=16 << 20)
    q = QUESTIONS[1]
    messages = [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, {"role": "user", "content": q}]
    template = _template_ids(tok, messages)
    ids = _searched_prompt(variant, q)
    assert ids == (template if template_writes_bos else [0] + template)
    assert ids[0] == 0 and ids.count(0) == 1
    if template_writes_bos:  # rendering to text and tokenizing it with special tokens doubles it
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert tok(text)["input_ids"][:2] == [0, 0]


def test_template_without_a_system_role_folds_it_into_the_user_turn(smol):
    """Older Mistral templates raise on a system message: its text leads the first user turn."""
    tok = smol.tokenizer
    strict = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('Conversation roles must "
              "alternate user/assistant/user/assistant/...') }}{% endif %}{{ '<|im_start|>' + m['role'] + '\\n' + "
              "m['content'] + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    ids = PromptFormat(system_prompt="Be brief.", chat_template=strict).encode("Hi?", tok)
    assert tok.decode(ids) == "<|im_start|>user\nBe brief.\n\nHi?<|im_end|>\n<|im_start|>assistant\n"
    broken = "{{ messages[0]['content'] | no_such_filter }}"
    with pytest.raises(ValueError, match="smollm2.*chat template failed"):
        PromptFormat(chat_template=broken).encode("Hi?", tok, source=smol.path)


def test_chat_template_kwargs_reach_the_template(smol):
    tok = smol.tokenizer
    template = "{{ '<|im_start|>user\\n' + messages[-1]['content'] + (' /no_think' if not enable_thinking else '') }}"
    on = PromptFormat(system_prompt="", chat_template=template, chat_template_kwargs={"enable_thinking": True})
    off = PromptFormat(system_prompt="", chat_template=template, chat_template_kwargs={"enable_thinking": False})
    assert tok.decode(on.encode("Hi", tok)) == "<|im_start|>user\nHi"
    assert tok.decode(off.encode("Hi", tok)) == "<|im_start|>user\nHi /no_think"


def test_stop_strings_and_steps_on_real_tokens(engine, smol):
    """A blank line ("\\n\\n", two tokens here) ends a step; a stop string that ends inside a token
    stops at that token and cuts the text there."""
    tok = smol.tokenizer
    prompt = encode_prompt(QUESTIONS[0], tok)
    free = engine.generate([prompt], GREEDY)[0]
    text, ids = free.text, free.token_ids
    assert "\n\n" in text
    step = engine.generate([prompt], dataclasses.replace(GREEDY, stop=("\n\n",)))[0].outputs[0]
    assert step.finish_reason == "stop" and step.stop_reason == "\n\n"
    assert step.text == text.split("\n\n")[0] == split_steps(text, "\n\n")[0]
    ends = [k for k in range(1, len(ids) + 1) if "\n\n" in tok.decode(ids[:k])]
    assert step.token_ids == ids[: ends[0]]  # the step's tokens end with the blank line's last token
    # a stop string ending in the middle of a multi-character token
    k = next(i for i in range(2, len(ids)) if len(tok.decode(ids[i:i + 1]).strip()) >= 3)
    before = tok.decode(ids[:k])
    stop = before[-4:] + tok.decode(ids[k:k + 1]).strip()[:2]
    cut = engine.generate([prompt], dataclasses.replace(GREEDY, stop=(stop,)))[0].outputs[0]
    assert cut.text == text[: text.index(stop)]
    assert cut.token_ids == ids[: k + 1]


def test_eos_ids_from_generation_config(smollm2_path, tmp_path):
    """generation_config.json's eos_token_id (a list here, as Llama 3's) ends generation."""
    for f in smollm2_path.iterdir():
        if f.is_file():
            (tmp_path / f.name).symlink_to(f)
    (tmp_path / "generation_config.json").unlink()
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 198]}))
    model = tf.load_model(tmp_path, device="cpu", dtype="float32")
    assert model.eos_token_ids == (2, 198)
    out = tf.Engine(model, kv_cache_bytes=16 << 20).generate([encode_prompt(QUESTIONS[0], model.tokenizer)], GREEDY)[0].outputs[0]
    assert out.finish_reason == "eos" and out.stop_reason == 198 and 198 not in out.token_ids[:-1]


def test_bin_and_gguf_checkpoints_give_the_same_greedy_tokens(engine, smol, smollm2_path, tmp_path):
    """The checkpoint saved as pytorch_model.bin, and the published .gguf file given as the model
    path (dequantized on load), generate what the safetensors directory does."""
    from safetensors.torch import load_file

    from ttc_fast.testing_smollm2 import GGUF_NAME

    prompt = encode_prompt(QUESTIONS[0], smol.tokenizer)
    expected = engine.generate([prompt], GREEDY)[0].token_ids
    binned = tmp_path / "bin"
    binned.mkdir()
    for f in smollm2_path.iterdir():
        if f.is_file() and f.name not in ("model.safetensors", GGUF_NAME):
            (binned / f.name).symlink_to(f)
    torch.save(load_file(str(smollm2_path / "model.safetensors")), binned / "pytorch_model.bin")
    for path in (binned, smollm2_path / GGUF_NAME):
        model = tf.load_model(path, device="cpu", dtype="float32")
        assert model.eos_token_ids[0] == 2
        assert tf.Engine(model, kv_cache_bytes=16 << 20).generate([prompt], GREEDY)[0].token_ids == expected


def test_gguf_without_its_extra_is_a_clear_error(smollm2_path, monkeypatch, capsys):
    from ttc_fast.loader import MissingExtra
    from ttc_fast.testing_smollm2 import GGUF_NAME

    monkeypatch.setitem(sys.modules, "gguf", None)  # as if not installed
    with pytest.raises(MissingExtra, match=r"pip install 'ttc_fast\[gguf\]'"):
        tf.load_model(smollm2_path / GGUF_NAME, device="cpu")
    assert main(["generate", "--model", str(smollm2_path / GGUF_NAME), "--prompt", "Hi"]) == 2
    assert "optional extra 'gguf'" in capsys.readouterr().err


def test_real_model_prm_matches_transformers(smollm2_path, reference):
    """SmolLM2 read as an RLHFlow-format PRM over its ChatML template: the cached incremental scores
    of forked beams equal transformers' on the reference code's ids and positions."""
    prm = tf.load_prm(smollm2_path, kind="rlhflow", device="cpu", dtype="float32", kv_cache_bytes=32 << 20)
    tok = prm.tokenizer
    question = "Natalia sold 48 clips in April and half as many in May. How many did she sell?"
    paths = [["In May she sold 48 / 2 = 24 clips.", "In all, 48 + 24 = 72.", "The answer is 72."],
             ["In May she sold 96 clips.", "\nIn all, 48 + 96 = 144.", "The answer is 144.  "]]
    root = prm.start(question)
    beams = prm.fork(root, len(paths))
    prm.free(root)
    got = [[] for _ in paths]
    for k in range(3):
        for i, score in enumerate(prm.score_steps(beams, [p[k] for p in paths])):
            got[i].append(score)
    plus, minus = tok.encode("+", add_special_tokens=False)[-1], tok.encode("-", add_special_tokens=False)[-1]
    for path, scores in zip(paths, got):
        ids, positions = ref_rlhflow(tok, question, path)
        with torch.no_grad():
            logits = reference(torch.tensor([ids])).logits[0, positions][:, [plus, minus]]
        torch.testing.assert_close(torch.tensor(scores), logits.softmax(-1)[:, 0], atol=1e-4, rtol=0)
    for b in beams:
        prm.free(b)


# --- `ttc-fast run` end to end --------------------------------------------------------------------
N_PROBLEMS = 4


@pytest.fixture(scope="module")
def gsm8k_four(tmp_path_factory, shared_data):
    path = tmp_path_factory.mktemp("smol_run") / "gsm8k4.jsonl"
    path.write_text("".join(GSM8K.read_text(encoding="utf-8").splitlines(keepends=True)[:N_PROBLEMS]), encoding="utf-8")
    return path


def _run_args(policy, data, out, strategy, *extra):
    return ["run", "--policy", str(policy), "--prm", "python:test_run_cli:HashVerifier", "--strategy", strategy,
            "--n", "4", "--width", "2", "--iterations", "3", "--max-tokens", "64", "--data", str(data), "--out", str(out),
            "--device", "cpu", "--kv-cache-bytes", str(64 << 20), "--no-progress", *extra]


@pytest.mark.parametrize("strategy", ["best-of-n", "beam"])
def test_run_end_to_end_killed_and_resumed(smollm2_path, gsm8k_four, tmp_path, strategy):
    """`ttc-fast run` on 4 GSM8K problems with a python: verifier: uninterrupted in one process,
    then as a real process killed (SIGKILL) after its first line and resumed; the same results."""
    full = tmp_path / "full.jsonl"
    assert main(_run_args(smollm2_path, gsm8k_four, full, strategy)) == 0
    records = read_results(full)
    assert len(records) == N_PROBLEMS and all(len(r["completions"]) == 4 for r in records)
    assert all(r["prompt"]["chat_template"] == "checkpoint" for r in records)

    out = tmp_path / "killed.jsonl"
    kill_after_first_line(_run_args(smollm2_path, gsm8k_four, out, strategy, "--max-in-flight", "1"), out, seconds=300)
    assert 1 <= len(read_results(out)) < N_PROBLEMS
    assert main(_run_args(smollm2_path, gsm8k_four, out, strategy, "--resume", "--max-in-flight", "1")) == 0
    assert differences(records, read_results(out)) == []
    assert len(out.read_text().splitlines()) == N_PROBLEMS
