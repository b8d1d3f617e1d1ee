"""Incremental detokenisation with stop strings.

`push(token)` returns the text that is now final: the decoded text of all tokens so far, less a
tail that could still change — an incomplete UTF-8 sequence (decoded as U+FFFD) or the beginning
of a stop string. The pieces returned by `push` and `finish`, joined, are the completion's text,
so a streamed response and a non-streamed one carry exactly the same characters.
"""
from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1  # chars that could begin a stop string
        self.ids: list[int] = []
        self.emitted = 0  # characters of the decoded text handed out
        self.stopped = False  # a stop string was found; nothing more comes

    def _text(self) -> str:
        if self.tokenizer is None:  # token ids only (benchmarks): no text
            return ""
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        """Add one generated token; return the newly final text ('' if none). Sets `stopped` on a stop string."""
        if self.stopped:
            return ""
        self.ids.append(token)
        text = self._text()
        if self.stop:
            lo = max(self.emitted - self.hold, 0)
            hits = [i for i in (text.find(s, lo) for s in self.stop) if i >= 0]
            if hits:
                self.stopped = True
                return self._take(text, min(hits))
        end = len(text) - self.hold
        while end > self.emitted and text[end - 1] == "\ufffd":  # an incomplete multi-byte character
            end -= 1
        return self._take(text, end)

    def finish(self) -> str:
        """The rest of the text once generation ends (not after a stop string)."""
        return "" if self.stopped else self._take(self._text(), None)

    def _take(self, text: str, end: int | None) -> str:
        end = len(text) if end is None else end
        if end <= self.emitted:
            return ""
        piece = text[self.emitted:end]
        self.emitted = end
        return piece
