"""Which prompt tokens are gaze queries: the tokens of earlier assistant replies.

A generated token is fed back as a gaze query (it attends to the top-k regions of each image,
not to every visual token), and training treats caption tokens the same way
(model/train.py: every token after `<assistant>` is a gaze query). So when a conversation is
prefilled, each assistant reply in its history (the tokens after an `<assistant>` token, up to
and including the `<eos>` that closes the reply) is fed with gaze = true, exactly as if it had
just been generated; everything else (template, user text, images, the final `<assistant>`)
is dense. A single-message prompt has no reply in it: all dense, as before. This is what
makes a chat turn that reuses the cache (runtime/chat.py) produce the very tokens of a fresh
run over the same conversation.
"""

from __future__ import annotations

import numpy as np


def assistant_gaze_mask(ids: np.ndarray, mask: np.ndarray, assistant_id: int | None, eos_id: int) -> np.ndarray:
    """bool [B, T] (prompt order): True on the tokens of assistant replies in left-padded prompts `ids` [B, T].

    Without an assistant marker token (a converted checkpoint may have none) no reply can be found: all False.
    """
    valid = mask.astype(bool)
    out = np.zeros(ids.shape, dtype=bool)
    if assistant_id is None:
        return out
    for b in range(ids.shape[0]):
        inside = False
        for t in range(ids.shape[1]):
            if not valid[b, t]:
                continue
            token = int(ids[b, t])
            if token == assistant_id:
                inside = True  # the <assistant> token itself is dense (it is the prompt's last token when generating)
                continue
            if inside:
                out[b, t] = True
                if token == eos_id:
                    inside = False
    return out
