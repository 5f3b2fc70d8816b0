"""Issue #13: prompt words the vocabulary cannot represent are reported, not replaced by <unk>."""

from __future__ import annotations

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from gaze_edge.errors import CheckpointError, InputError
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


# ------------------------------------------------------------------ preprocessor_config.json keys


def _hf_processor_folder(tmp_path, cls_name: str = "SiglipImageProcessor", **kwargs):
    import transformers

    folder = tmp_path / cls_name
    getattr(transformers, cls_name)(**kwargs).save_pretrained(folder)
    return folder


def _images(seed: int) -> list:
    from PIL import Image

    rng = np.random.default_rng(seed)
    shapes = [(37, 53, 3), (32, 32, 3), (90, 21, 3)]
    images = [Image.fromarray(rng.integers(0, 256, s, dtype=np.uint8)) for s in shapes]
    images.append(Image.fromarray(rng.integers(0, 256, (40, 40, 4), dtype=np.uint8), "RGBA"))
    images.append(Image.fromarray(rng.integers(0, 256, (29, 31), dtype=np.uint8), "L"))
    return images


@pytest.mark.parametrize("resample", [2, 3, 1])
@pytest.mark.parametrize("variant", ["default", "no-rescale", "no-normalize", "custom-stats"])
def test_preprocess_matches_transformers_image_processor(tmp_path, resample: int, variant: str) -> None:
    """Issue #13: the HF keys (size, resample as PIL's integer, rescale, normalise, mean/std, convert_rgb)
    give transformers' own pixels (<= 1e-5), for random images of several sizes and modes."""
    import json

    from transformers import SiglipImageProcessor

    kwargs = {"size": {"height": 32, "width": 32}, "resample": resample, "do_convert_rgb": True}
    kwargs.update({"default": {}, "no-rescale": {"do_rescale": False}, "no-normalize": {"do_normalize": False},
                   "custom-stats": {"image_mean": [0.48, 0.45, 0.41], "image_std": [0.27, 0.26, 0.28],
                                    "rescale_factor": 1 / 127.5}}[variant])
    folder = _hf_processor_folder(tmp_path, **kwargs)
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    image = ImageConfig.from_preprocessor(pre, "test", image_size=32)
    ours = GazeProcessor(default_processor(32, 16).tokenizer, image, CHAT_TEMPLATE, 16, ["<ctx_0>"])
    images = _images(resample)
    theirs = SiglipImageProcessor.from_pretrained(folder)(images, return_tensors="np")["pixel_values"]
    got = ours.preprocess(images)
    assert got.shape == theirs.shape == (5, 3, 32, 32)
    np.testing.assert_allclose(got, theirs, rtol=0, atol=1e-5 * max(1.0, float(np.abs(theirs).max())))


def test_saved_preprocessor_config_is_read_by_transformers(tmp_path) -> None:
    """What save_pretrained writes is a SigLIP image processor config too: transformers gives the same pixels."""
    from transformers import SiglipImageProcessor

    p = default_processor(48, 36)
    p.save_pretrained(tmp_path)
    images = _images(7)
    theirs = SiglipImageProcessor.from_pretrained(tmp_path)(images, return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(p.preprocess(images), theirs, rtol=0, atol=1e-5)
    assert GazeProcessor.from_pretrained(tmp_path).image == p.image


def test_shipped_preprocessing_unchanged() -> None:
    """The built-in processor's pixels: bicubic resize, x / 255, (x - 0.5) / 0.5, exactly as before."""
    from PIL import Image

    p = default_processor(48, 36)
    for img in _images(3):
        rgb = img.convert("RGB").resize((48, 48), Image.Resampling.BICUBIC)
        scaled = np.asarray(rgb, np.float32).transpose(2, 0, 1) * np.float32(1 / 255)
        want = (scaled - np.float32(0.5)) / np.float32(0.5)
        np.testing.assert_array_equal(p.preprocess([img])[0], want)


def test_old_style_preprocessor_config_still_read() -> None:
    """Checkpoints written before the HF keys: image_size and a resample name."""
    cfg = ImageConfig.from_preprocessor({"image_size": 48, "resample": "bicubic", "rescale_factor": 1 / 255,
                                         "image_mean": [0.5] * 3, "image_std": [0.5] * 3}, "old")
    assert cfg == ImageConfig(image_size=48)


@pytest.mark.parametrize(("keys", "message"), [
    ({"size": {"shortest_edge": 32}}, "resizes by an edge"),
    ({"size": {"height": 32, "width": 48}}, "not square"),
    ({"size": {"height": 64, "width": 64}}, "not the vision tower's 32 px"),
    ({"size": 32, "do_center_crop": True, "crop_size": {"height": 32, "width": 32}}, "do_center_crop"),
    ({"size": 32, "do_pad": True}, "do_pad"),
    ({"size": 32, "image_grid_pinpoints": [[32, 64]]}, "anyres"),
    ({"size": 32, "resample": 9}, "not a PIL filter"),
    ({"size": 32, "image_std": [0.5, 0.0, 0.5]}, "must be positive"),
    ({"size": 32, "image_mean": [0.5, 0.5]}, "3 numbers"),
    ({"size": 32, "do_resize": "yes"}, "true or false"),
    ({}, "no usable image size"),
])
def test_unsupported_preprocessor_keys_refused(keys: dict, message: str) -> None:
    with pytest.raises(CheckpointError, match=message):
        ImageConfig.from_preprocessor(keys, "preprocessor_config.json", image_size=32 if "size" in keys else None)


def test_clip_style_processor_refused(tmp_path) -> None:
    """A CLIP-style processor (shortest edge + center crop) is refused with its key named."""
    import json

    folder = _hf_processor_folder(tmp_path, "CLIPImageProcessor")
    with pytest.raises(CheckpointError, match="resizes by an edge"):
        ImageConfig.from_preprocessor(json.loads((folder / "preprocessor_config.json").read_text()), "clip")


def test_do_resize_and_convert_rgb_false_refuse_other_images() -> None:
    from PIL import Image

    base = default_processor(32, 16)
    strict = GazeProcessor(base.tokenizer, ImageConfig(image_size=32, do_resize=False, do_convert_rgb=False),
                           CHAT_TEMPLATE, 16, ["<ctx_0>"])
    ok = Image.fromarray(np.zeros((32, 32, 3), np.uint8))
    assert strict.preprocess([ok]).shape == (1, 3, 32, 32)
    with pytest.raises(InputError, match="do_resize false: give 32x32"):
        strict.preprocess([Image.fromarray(np.zeros((20, 32, 3), np.uint8))])
    with pytest.raises(InputError, match="is L, not RGB"):
        strict.preprocess([Image.fromarray(np.zeros((32, 32), np.uint8))])
