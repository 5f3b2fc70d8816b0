"""Issue #13: prompt words the vocabulary cannot represent are reported, not replaced by <unk>."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from gaze_edge.errors import InputError
from gaze_edge.model.processing import CHAT_TEMPLATE, GazeProcessor, ImageConfig, default_processor


def test_unknown_word_reported() -> None:
    p = default_processor(48, 36)
    with pytest.raises(InputError, match="cannot represent 'zebra'"):
        p.encode(p.prompt("describe the zebra ."))


def test_known_words_encode() -> None:
    p = default_processor(48, 36)
    ids = p.encode(p.prompt())
    assert p.tokenizer.token_to_id("<unk>") not in ids


def test_byte_level_bpe_never_reports() -> None:
    vocab = {chr(c): i for i, c in enumerate(range(33, 127))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<pad>", "<eos>", "<image>", "<ctx_0>"])
    p = GazeProcessor(tok, ImageConfig(image_size=48), CHAT_TEMPLATE.replace("<bos>", "").replace("<assistant>", ""),
                      4, ["<ctx_0>"], bos_token=None, unk_token=None)
    p.encode("<image> zebra ünïcode")


def test_unknown_word_reported_in_batch_encode() -> None:
    """The runtime (runtime/generate.py GazeRuntime.encode) tokenizes through batch_encode."""
    p = default_processor(48, 36)
    with pytest.raises(InputError, match="'zebra', 'giraffe'"):
        p.batch_encode([p.prompt(), p.prompt("zebra giraffe zebra")])
