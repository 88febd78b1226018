"""The toy task's tokenizer: word-level, digits one token each, saved in Hugging Face format.

Pre-tokenization splits text into "\\n\\n", "\\n", "ки", words (with their leading space, as in
GPT-2: " apples"), single digits (" 7", "2") and single punctuation marks (" +", "="). The
vocabulary is every such piece of the task's templates (and of the math-shepherd PRM format),
plus every digit, letter-free symbol and the special tokens <pad>, <s> (BOS, added in front of
every encoded text), </s> (EOS, ends a solution) and <unk>. The decoder concatenates pieces, so
decode(encode(text)) == text for every text the task produces. No chat template: a prompt is the
question + "\\n\\n", exactly the training text's prefix.
"""
from __future__ import annotations

import random
import re
from pathlib import Path

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
PATTERN = r"\n\n|\n|ки| ?[A-Za-z]+| ?[0-9]| ?[+\-*/=.,:;?!$\\{}()]| "
_PIECE = re.compile(PATTERN)


def pieces(text: str) -> list[str]:
    return _PIECE.findall(text)


def _vocab() -> list[str]:
    from .task import make_dataset

    seen = set()
    for p in make_dataset(3000, seed=12345):
        for text in (p.question, p.meta["solution"]):
            seen.update(pieces(text))
    for ch in "0123456789+-*/=.,:;?!$\\{}()":
        seen.update({ch, " " + ch})
    for w in ("The", "answer", "is", "boxed", "He", "She", "he", "she", "so", "more"):
        seen.update({w, " " + w})
    seen.update({"\n\n", "\n", "ки", " "})
    return SPECIAL + sorted(seen)


def build_tokenizer(path: str | Path | None = None):
    """The tokenizer (a transformers PreTrainedTokenizerFast); saved under `path` when given."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(_vocab())}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(PATTERN), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>", clean_up_tokenization_spaces=False, model_max_length=512)
    if path is not None:
        Path(path).mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(str(path))
    return tok


def _selfcheck(tok) -> None:
    from .task import make_dataset

    for p in make_dataset(50, seed=random.randint(0, 10**6)):
        text = p.question + "\n\n" + p.meta["solution"]
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids, text
        assert tok.decode(ids, skip_special_tokens=True) == text
