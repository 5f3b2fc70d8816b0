"""Streaming detokenization: the text each new token adds, in O(1) work per token.

`tokenizers.decoders.DecodeStream` keeps a short window of recent ids per sequence and
returns only the new text (None while a multi-byte character or a merge is incomplete),
so a step never re-decodes the sequence so far (the old way was O(n^2) over a generation).
Concatenating the pieces gives `tokenizer.decode(ids, skip_special_tokens=True)`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tokenizers.decoders import DecodeStream


class StreamDetokenizer:
    """One DecodeStream per sequence of a batch; `push` returns each sequence's new text."""

    def __init__(self, tokenizer: Any, batch: int, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.streams = [DecodeStream(skip_special_tokens=skip_special_tokens) for _ in range(batch)]

    def push(self, tokens: np.ndarray, done: np.ndarray) -> list[str]:
        """Next tokens [B]; a sequence already done (done[b]) adds nothing."""
        pieces = []
        for b, token in enumerate(tokens.tolist()):
            if done[b]:
                pieces.append("")
                continue
            piece = self.streams[b].step(self.tokenizer, int(token))
            pieces.append(piece or "")
        return pieces
