"""Generated tokens -> text, incrementally: what a streaming client is sent, with stop
strings applied.

- Decoding is incremental over a small window (the way vLLM and TGI do it), so each token
  costs O(1) and a multi-byte character split over tokens is only emitted once complete.
  Starting the window on the last prompt tokens keeps a leading space that sentencepiece
  tokenizers would drop when decoding the completion on its own.
- Stop strings (OpenAI ``stop``): the text ends before the first one; text that could
  still become a stop string is held back, so a client never sees part of one.
- EOS ids end the text and are not shown.
"""
from __future__ import annotations

from typing import Iterable, List, Optional, Sequence

CONTEXT_TOKENS = 5  # prompt tokens decoded along with the first new ones


class TextStream:
    def __init__(self, tokenizer, prompt: Sequence[int] = (), eos_ids: Iterable[int] = (),
                 stop: Sequence[str] = ()):
        self.tok = getattr(tokenizer, "hf", tokenizer)
        self.eos = set(int(e) for e in eos_ids)
        self.stop = [s for s in stop if s]
        self.ids: List[int] = list(prompt[-CONTEXT_TOKENS:])
        self._prefix = 0                 # window start (token index)
        self._read = len(self.ids)       # tokens up to here are already in self.text
        self.text = ""                   # decoded text so far (before stop handling)
        self.sent = 0                    # characters of self.text already handed out
        self.finish_reason: Optional[str] = None  # "stop" (EOS / stop string) or None
        self.num_tokens = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def _decode(self, ids) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        """Add one generated token; returns the text that may be shown now ("" if none)."""
        if self.finished:
            return ""
        self.num_tokens += 1
        if token in self.eos:
            out = self._flush()
            self.finish_reason = self.finish_reason or "stop"
            return out + self._release(len(self.text))
        self.ids.append(int(token))
        return self._advance(final=False)

    def _advance(self, final: bool) -> str:
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            start = len(self.text)
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(self.ids)
            return self._check_stop(start)
        return ""

    def _flush(self) -> str:
        """The end: bytes of an unfinished character are final too (shown as U+FFFD, as a
        plain decode of all tokens shows them)."""
        return self._advance(final=True)

    def _check_stop(self, start: int) -> str:
        if not self.stop:
            return self._release(len(self.text))
        longest = max(len(s) for s in self.stop)
        lo = max(0, start - longest + 1)  # a stop string may begin in earlier text
        hits = [i for i in (self.text.find(s, lo) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.finish_reason = "stop"
            return self._release(len(self.text))
        return self._release(len(self.text) - self._held())

    def _held(self) -> int:
        """Length of the longest tail of the text that begins some stop string."""
        for n in range(min(len(self.text), max(len(s) for s in self.stop) - 1), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0

    def _release(self, upto: int) -> str:
        upto = max(upto, self.sent)
        out = self.text[self.sent:upto]
        self.sent = upto
        return out

    def close(self) -> str:
        """Generation ended (length / context): the held-back text is final after all."""
        if self.finished:
            return ""
        out = self._flush()
        return out + ("" if self.finished else self._release(len(self.text)))
