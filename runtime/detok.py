"""Streaming detokenization: the text each new token adds, in O(1) work per token.

`tokenizers.decoders.DecodeStream` keeps a short window of recent ids per sequence and
returns only the new text (None while a multi-byte character or a merge is incomplete),
so a step never re-decodes the sequence so far (the old way was O(n^2) over a generation).
Concatenating the pieces gives `tokenizer.decode(ids, skip_special_tokens=True)`: a sequence's last
push (``final``) also emits what the stream still holds back, e.g. the U+FFFD of a byte-level BPE
character cut off by max_new_tokens (once per sequence, one full decode).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tokenizers.decoders import DecodeStream


class StreamDetokenizer:
    """One DecodeStream per sequence of a batch; `push` returns each sequence's new text."""

    def __init__(self, tokenizer: Any, batch: int, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.streams = [DecodeStream(skip_special_tokens=skip_special_tokens) for _ in range(batch)]
        self.ids: list[list[int]] = [[] for _ in range(batch)]
        self.emitted = [0] * batch  # characters returned so far
        self.flushed = [False] * batch

    def push(self, tokens: np.ndarray, done: np.ndarray, final: np.ndarray | None = None) -> list[str]:
        """Next tokens [B]; a sequence already done (done[b]) adds nothing; final[b]: its last token."""
        pieces = []
        for b, token in enumerate(tokens.tolist()):
            if done[b] or self.flushed[b]:
                pieces.append("")
                continue
            self.ids[b].append(int(token))
            piece = self.streams[b].step(self.tokenizer, int(token)) or ""
            if final is not None and final[b]:
                full = self.tokenizer.decode(self.ids[b], skip_special_tokens=self.skip_special_tokens)
                piece = full[self.emitted[b]:]
                self.flushed[b] = True
            self.emitted[b] += len(piece)
            pieces.append(piece)
        return pieces
