"""When a sample stops (a stop token, EOS, a stop string, max_tokens, the model's context) and its
final text.

`check` decides for one sample. A decode step asks it only for the samples whose new token may
end them (`may_stop`: a table over the vocabulary per sampling settings) or whose length has
reached its limit, so a step costs no Python per sample.
"""
from __future__ import annotations

import numpy as np

from .sampling import SamplingParams
from .sequence import Sample


class StopChecker:
    def __init__(self, model):
        """`model`: the engine's LoadedModel (its tokenizer, EOS ids and context, read when used)."""
        self.model, self.tokenizer = model, model.tokenizer
        self._piece: dict[int, str] = {}  # token id -> its text decoded alone (stop pre-filter)
        self._tables: dict[tuple, np.ndarray] = {}
        # transformers' decode() converts its input element by element (to_py_obj) before calling
        # _decode(); our ids are already a list of ints, and every sample's text is decoded here.
        self._decode = getattr(self.tokenizer, "_decode", None) or getattr(self.tokenizer, "decode", None)

    def may_stop(self, params: SamplingParams) -> np.ndarray:
        """bool [vocab]: the tokens whose sampling can end a sample with these settings (a stop
        token, EOS, or a token that may complete a stop string); `check` decides the rest."""
        key = (params.stop_token_ids, params.ignore_eos, params.stop)
        table = self._tables.get(key)
        if table is None:
            vocab = self.model.config.vocab_size
            table = np.zeros(vocab, dtype=bool)
            ids = list(params.stop_token_ids) + ([] if params.ignore_eos else list(self.model.eos_token_ids))
            ids = [t for t in ids if 0 <= t < vocab]
            table[ids] = True
            if params.stop:
                table |= self._may_end_table(params.stop, vocab)
            self._tables[key] = table
        return table

    def _may_end_table(self, stops: tuple[str, ...], vocab: int) -> np.ndarray:
        """`_may_end_a_stop` for every token id at once (one batched decode of the vocabulary)."""
        known = min(vocab, len(self.tokenizer))
        missing = [t for t in range(known) if t not in self._piece]
        if missing:
            pieces = self.tokenizer.batch_decode([[t] for t in missing], skip_special_tokens=True)
            self._piece.update(zip(missing, pieces))
        table = np.ones(vocab, dtype=bool)  # ids the tokenizer does not know: always checked
        table[:known] = [self._may_end_a_stop(t, stops) for t in range(known)]
        return table

    def check(self, s: Sample, token: int) -> bool:
        """Whether `token`, just appended to `s.generated`, ends the sample; sets its finish and stop reasons."""
        p = s.request.params
        if token in p.stop_token_ids:
            s.finish_reason, s.stop_reason = "stop", token
        elif not p.ignore_eos and token in self.model.eos_token_ids:
            s.finish_reason, s.stop_reason = "eos", token
        elif p.stop and self._hits_stop_string(s):
            s.finish_reason = "stop"
        elif len(s.generated) >= p.max_tokens or len(s.request.prompt_ids) + len(s.generated) >= self.model.config.max_context:
            s.finish_reason = "length"
        return s.finish_reason is not None

    def _may_end_a_stop(self, token: int, stops: tuple[str, ...]) -> bool:
        """Cheap pre-filter: can `token` be the one that completes a stop string? Its own text
        must hold the stop's last character, unless that text is unreliable alone (empty, a
        split multi-byte character) or the stop ends in a space (SentencePiece moves spaces
        onto the next token)."""
        piece = self._piece.get(token)
        if piece is None:
            piece = self._piece[token] = self.tokenizer.decode([token], skip_special_tokens=True)
        if not piece or "\ufffd" in piece:
            return True
        return any(stop[-1] in piece or stop[-1] == " " for stop in stops)

    def _hits_stop_string(self, s: Sample) -> bool:
        # Decode a window of the latest tokens rather than token by token: single-token decodes
        # lose SentencePiece's leading spaces and split multi-byte characters. The window holds
        # enough tokens for the longest stop string even at one byte per token.
        stops = s.request.params.stop
        if not self._may_end_a_stop(s.generated[-1], stops):
            return False
        window = 4 * max(len(t) for t in stops) + 4
        text = self._decode(s.generated[-window:], skip_special_tokens=True)
        for stop in stops:
            if stop in text:
                s.stop_reason = stop
                return True
        return False

    def final_text(self, s: Sample) -> str | None:
        """The sample's text, cut at its stop string (kept when the request asks for it)."""
        if self.tokenizer is None:
            return None
        text = self._decode(s.generated, skip_special_tokens=True)
        if isinstance(s.stop_reason, str):
            cut = text.find(s.stop_reason)
            if cut >= 0:
                text = text[: cut + (len(s.stop_reason) if s.request.params.include_stop_str_in_output else 0)]
        return text
