"""A choice's text as its tokens arrive: decoded incrementally, cut at stop strings, released only once final."""

from __future__ import annotations


class TextStream:
    """Feed tokens with `push`; `take_ready()` returns the text that can no longer change (no half character,
    nothing that may still turn into a stop string)."""

    def __init__(self, tokenizer, stops: tuple[str, ...] = ()):
        from tokenizers.decoders import DecodeStream

        self._tokenizer = tokenizer  # a `tokenizers.Tokenizer` owned by the engine thread
        self._decoder = DecodeStream(skip_special_tokens=True)
        self._stops = stops
        self._tokens: list[int] = []
        self._cut = False
        self.text = ""
        self._released = 0

    def push(self, token: int) -> bool:
        """Add a token; True when the text now contains a stop string (the text is cut just before it)."""
        self._tokens.append(token)
        piece = self._decoder.step(self._tokenizer, token)
        if not piece:
            return False
        self.text += piece
        cut = _first_stop(self.text, self._stops)
        if cut >= 0:
            self.text, self._cut = self.text[:cut], True
            return True
        return False

    def take_ready(self) -> str:
        ready = _final_length(self.text, self._stops)
        if ready <= self._released:
            return ""
        piece, self._released = self.text[self._released:ready], ready
        return piece

    def take_rest(self) -> str:
        """Everything not yet released (the choice has finished), with a trailing incomplete character decoded as
        U+FFFD the way a whole-text decode shows it."""
        if not self._cut:
            whole = self._tokenizer.decode(self._tokens, skip_special_tokens=True)
            if whole.startswith(self.text):
                self.text = whole
        piece, self._released = self.text[self._released:], len(self.text)
        return piece


def _first_stop(text: str, stops: tuple[str, ...]) -> int:
    found = [i for i in (text.find(stop) for stop in stops) if i >= 0]
    return min(found, default=-1)


def _final_length(text: str, stops: tuple[str, ...]) -> int:
    """How much of `text` is final: hold back anything that may be the beginning of a stop string."""
    held = max((k for stop in stops for k in range(1, min(len(stop), len(text) + 1)) if text.endswith(stop[:k])),
               default=0)
    return len(text) - held
