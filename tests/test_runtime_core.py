"""Runtime pieces without a model: sampling on hand-checked distributions, layout, cache sizing, bad inputs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gaze_edge.errors import InputError
from gaze_edge.runtime.cache import CacheSpec, lay_out_prompt
from gaze_edge.runtime.folder import ExportFolder, ExportFolderError
from gaze_edge.runtime.images import load_image
from gaze_edge.runtime.sampling import Sampler, SamplingConfig, filter_logits, softmax

# ---------------------------------------------------------------- sampling


def test_top_k_keeps_the_k_largest_and_ties_at_the_kth():
    logits = np.log(np.array([[0.1, 0.4, 0.2, 0.3]]))
    kept = np.isfinite(filter_logits(logits, 1.0, 2, 1.0))
    assert kept.tolist() == [[False, True, False, True]]
    probs = softmax(filter_logits(logits, 1.0, 2, 1.0))
    np.testing.assert_allclose(probs, [[0, 4 / 7, 0, 3 / 7]], atol=1e-12)
    tied = np.array([[1.0, 2.0, 2.0, 0.0]])
    assert np.isfinite(filter_logits(tied, 1.0, 1, 1.0)).tolist() == [[False, True, True, False]]


def test_top_p_keeps_the_token_that_crosses_p():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    # cumulative 0.5, 0.8, 0.95, 1.0: p=0.6 keeps {0.5, 0.3}; p=0.5 keeps {0.5}; p=0.81 keeps three
    for p, want in ((0.6, [1, 1, 0, 0]), (0.5, [1, 0, 0, 0]), (0.81, [1, 1, 1, 0]), (1.0, [1, 1, 1, 1])):
        assert np.isfinite(filter_logits(logits, 1.0, 0, p)).astype(int).tolist() == [want], p
    np.testing.assert_allclose(softmax(filter_logits(logits, 1.0, 0, 0.6)), [[0.625, 0.375, 0, 0]], atol=1e-12)


def test_temperature_scales_before_filtering():
    logits = np.array([[2.0, 0.0]])
    np.testing.assert_allclose(softmax(filter_logits(logits, 2.0, 0, 1.0)), softmax(np.array([[1.0, 0.0]])))


def test_seeded_sampling_is_reproducible_and_follows_the_distribution():
    logits = np.log(np.tile([[0.5, 0.3, 0.15, 0.05]], (4000, 1))).astype(np.float32)
    config = SamplingConfig(do_sample=True, seed=123, top_k=3)
    a = Sampler(config, 4000, 4, ())(logits.copy())
    b = Sampler(config, 4000, 4, ())(logits.copy())
    c = Sampler(SamplingConfig(do_sample=True, seed=124, top_k=3), 4000, 4, ())(logits.copy())
    assert (a == b).all() and not (a == c).all()
    freq = np.bincount(a, minlength=4) / 4000
    np.testing.assert_allclose(freq, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0], atol=0.03)


def test_greedy_suppression_and_repetition_penalty():
    logits = np.array([[3.0, 2.0, 1.0, -1.0]], dtype=np.float32)
    assert Sampler(SamplingConfig(), 1, 4, suppress_ids=[0])(logits.copy()).tolist() == [1]
    sampler = Sampler(SamplingConfig(repetition_penalty=4.0), 1, 4, ())
    sampler.observe(np.array([[0]]))
    assert sampler(logits.copy()).tolist() == [1]  # 3/4 < 2


@pytest.mark.parametrize("field, value", [("top_p", 0.0), ("top_k", -1), ("temperature", -1.0),
                                          ("max_new_tokens", 0), ("repetition_penalty", 0.0)])
def test_bad_sampling_options_are_refused(field, value):
    with pytest.raises(InputError, match=field):
        SamplingConfig(**{field: value}).check()


# ---------------------------------------------------------------- layout and cache


def _shape(runtime_export):
    return ExportFolder.open(runtime_export[1]).shape


def test_region_major_layout_keeps_positions_and_never_splits_an_image(runtime_export):
    folder = ExportFolder.open(runtime_export[1])
    shape, image = folder.shape, folder.tokens.image
    ids, mask = folder.processor.batch_encode([folder.processor.prompt(num_images=2),
                                               folder.processor.prompt(num_images=1)])
    plain = lay_out_prompt(ids, mask, shape, image, region_major=False)
    major = lay_out_prompt(ids, mask, shape, image, region_major=True)
    for b in range(2):  # same tokens, each with its own position and region, only the order differs
        a, m = ([(lay.pos[b][v], lay.region[b][v], lay.ids[b][v]) for lay in (plain, major)
                 for v in [lay.valid[b]]])
        a, m = sorted(zip(*a, strict=True)), sorted(zip(*m, strict=True))
        assert a == m
        regions = major.region[b][major.region[b] >= 0]
        assert (np.diff(regions) >= 0).all()  # each region contiguous, regions in order
    assert not (np.diff(plain.region[0][plain.region[0] >= 0]) >= 0).all()
    ends = major.split_points(5)
    for end in ends[:-1]:
        assert not ((major.image_block[:, end - 1] == major.image_block[:, end]) & (major.image_block[:, end] >= 0)
                    ).any()
    assert ends[-1] == ids.shape[1]


def test_cache_capacity_is_checked_before_allocation(runtime_export):
    shape = _shape(runtime_export)
    spec = CacheSpec.plan(shape, 2, 100)
    assert spec.kv_bytes == 2 * shape.num_layers * 2 * shape.kv_heads * 100 * shape.head_dim * 4
    with pytest.raises(InputError, match="cache slots; this export holds 768"):
        CacheSpec.plan(shape, 1, 769)


# ---------------------------------------------------------------- bad inputs


def test_images_non_image_truncated_and_bomb(tmp_path: Path):
    text = tmp_path / "notes.png"
    text.write_text("hello")
    with pytest.raises(InputError, match="not an image"):
        load_image(text)
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good)
    assert load_image(good).size == (64, 64)
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[:300])
    with pytest.raises(InputError, match="truncated or corrupt"):
        load_image(cut)
    bomb = tmp_path / "bomb.png"
    Image.new("1", (6000, 6000)).save(bomb)  # 36 MP, a few KB on disk
    with pytest.raises(InputError, match="too large to decode safely"):
        load_image(bomb, max_pixels=20_000_000)  # between the limit and 2x: Pillow only warns
    with pytest.raises(InputError, match="too large to decode safely"):
        load_image(bomb, max_pixels=1_000_000)  # beyond 2x: Pillow raises
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(good).mode == "RGB"
    assert Image.MAX_IMAGE_PIXELS != 1_000_000  # the global guard is restored


def test_missing_and_mismatched_export_folders(runtime_export, tmp_path: Path):
    with pytest.raises(ExportFolderError, match="does not exist"):
        ExportFolder.open(tmp_path / "nope")
    with pytest.raises(ExportFolderError, match="no gaze_config.json"):
        ExportFolder.open(runtime_export[0])  # a checkpoint, not an export
    broken = tmp_path / "broken"
    shutil.copytree(runtime_export[1], broken)
    (broken / "vision.onnx").unlink()
    with pytest.raises(ExportFolderError, match="has no vision.onnx"):
        ExportFolder.open(broken)
    mismatched = tmp_path / "mismatched"
    shutil.copytree(runtime_export[1], mismatched)
    config = json.loads((mismatched / "gaze_config.json").read_text())
    config["model"]["hidden_size"] = 64
    (mismatched / "gaze_config.json").write_text(json.dumps(config))
    with pytest.raises(ExportFolderError, match="inconsistent.*embed_tokens.npy"):
        ExportFolder.open(mismatched)


def test_runtime_imports_neither_torch_nor_transformers(runtime_export):
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
        "import gaze_edge.runtime.cli, gaze_edge.runtime.profile\n"
        "from gaze_edge.runtime import GazeRuntime, Prompt, SamplingConfig\n"
        "import numpy as np\n"
        f"rt = GazeRuntime.load({str(runtime_export[1])!r}, threads=1)\n"
        "img = np.zeros((48, 48, 3), np.uint8)\n"
        "g = rt.generate(Prompt(None, [img]), SamplingConfig(max_new_tokens=3))\n"
        "assert 'torch' not in [m.split('.')[0] for m in sys.modules if sys.modules[m] is not None]\n"
        "print('ok', g.tokens.shape)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")
