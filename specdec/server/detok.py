"""Incremental detokenization with exact stop strings.

Text is decoded from a short window of tokens (the last released token boundary onwards), the way vLLM and TGI
stream: ``decode(ids[prefix:])`` minus ``decode(ids[prefix:read])``. A decode that ends in U+FFFD (an incomplete
multi-byte character: byte-level BPE splits emoji and CJK characters over several tokens) is held back until the
character completes, so a streamed chunk never holds half a character. Stop strings are matched on the decoded
characters, so a cut never splits one either.

Stop strings (OpenAI semantics): the output ends right before the first occurrence of any stop string; the stop
string itself is not returned. Text that could still become the start of a stop string is held back until it
either completes one (then it is dropped) or cannot (then it is released).
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Feed tokens one at a time with :meth:`add`; each call returns the text that may be released now.

    Args:
        tokenizer: the model's tokenizer (special tokens are skipped, as ``specdec generate`` prints them).
        stop: stop strings (non-empty).

    Attributes:
        stopped: a stop string was found; later tokens are ignored.
        tokens_used: tokens fed up to and including the one that completed the stop string (all of them if none).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: Sequence[str] = ()) -> None:
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # tokens whose text has been decoded into ``_pending`` or released
        self._pending = ""  # decoded text held back (a possible stop-string start)
        self.stopped = False
        self.tokens_used = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        """Append one token; return newly releasable text ('' while a character or a stop match is incomplete)."""
        if self.stopped:
            return ""
        self.ids.append(int(token))
        self.tokens_used += 1
        before = self._decode(self.ids[self._prefix : self._read])
        full = self._decode(self.ids[self._prefix :])
        if len(full) <= len(before) or full.endswith(REPLACEMENT):
            return ""  # nothing new yet, or a multi-byte character still incomplete
        self._pending += full[len(before) :]
        self._prefix, self._read = self._read, len(self.ids)
        return self._release()

    def finish(self) -> str:
        """The generation ended: release everything held back (an incomplete character stays as U+FFFD, exactly
        as a one-shot decode shows it); a stop string is still cut."""
        if self.stopped:
            return ""
        before = self._decode(self.ids[self._prefix : self._read])
        full = self._decode(self.ids[self._prefix :])
        self._pending += full[len(before) :]
        self._read = len(self.ids)
        out = self._release()
        if not self.stopped:
            out, self._pending = out + self._pending, ""
        return out

    def _release(self) -> str:
        """Cut at the first stop string in the pending text, else release all but a possible stop-string start.

        Invariant: no occurrence of a stop string starts in released text, so searching the pending text is
        enough (a held-back suffix is exactly the longest suffix that is a proper prefix of some stop string)."""
        text = self._pending
        if not self.stop:
            self._pending = ""
            return text
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            self._pending = ""
            return text[: min(hits)]
        hold = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:n]):
                    hold = n
                    break
        self._pending = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold]
