"""When a sample stops (a stop token, EOS, a stop string, max_tokens, the model's context) and its
final text."""
from __future__ import annotations

from .sequence import Sample


class StopChecker:
    def __init__(self, model):
        """`model`: the engine's LoadedModel (its tokenizer, EOS ids and context, read when used)."""
        self.model, self.tokenizer = model, model.tokenizer
        self._piece: dict[int, str] = {}  # token id -> its text decoded alone (stop pre-filter)

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
        text = self.tokenizer.decode(s.generated[-window:], skip_special_tokens=True)
        for stop in stops:
            if stop in text:
                s.stop_reason = stop
                return True
        return False

    def final_text(self, s: Sample) -> str | None:
        """The sample's text, cut at its stop string (kept when the request asks for it)."""
        if self.tokenizer is None:
            return None
        text = self.tokenizer.decode(s.generated, skip_special_tokens=True)
        if isinstance(s.stop_reason, str):
            cut = text.find(s.stop_reason)
            if cut >= 0:
                text = text[: cut + (len(s.stop_reason) if s.request.params.include_stop_str_in_output else 0)]
        return text
