"""The shipped tiny checkpoints: they load, caption held-out scenes well, and look where they speak."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gaze_edge import DEFAULT_CHECKPOINT
from gaze_edge.model.checkpoint import load_checkpoint
from gaze_edge.model.evaluate import evaluate, random_hit_rate

DENSE_TWIN = DEFAULT_CHECKPOINT.parent / "gaze-tiny-dense"


@pytest.fixture(scope="module")
def results():
    gaze_model, processor = load_checkpoint(DEFAULT_CHECKPOINT)
    dense_model, _ = load_checkpoint(DENSE_TWIN)
    return {
        "config": gaze_model.config,
        "gaze": evaluate(gaze_model, processor, num_scenes=500),
        "dense": evaluate(dense_model, processor, num_scenes=500),
    }


def test_gaze_keeps_at_most_a_quarter_of_regions(results):
    config = results["config"]
    assert config.gaze_top_k * 4 <= config.regions_per_image
    assert (config.gaze_top_k, config.regions_per_image) == (2, 16)  # 12.5%


def test_held_out_accuracy_matches_dense_twin(results):
    gaze, dense = results["gaze"].accuracy, results["dense"].accuracy
    assert gaze >= 0.90, f"gaze model: {gaze:.1%} of held-out captions exactly right"
    assert gaze >= dense - 0.02, f"gaze {gaze:.1%} vs dense {dense:.1%}"


def test_model_looks_where_it_speaks(results):
    gaze = results["gaze"]
    assert gaze.named_words > 500
    assert gaze.gaze_coverage is not None and gaze.random_coverage is not None
    assert gaze.gaze_coverage > gaze.random_coverage + 0.2
    assert results["dense"].gaze_coverage is None  # dense selection is everything: nothing to measure


def test_random_hit_rate():
    assert random_hit_rate(9, 2, 1) == pytest.approx(2 / 9)
    assert random_hit_rate(9, 9, 1) == 1.0
    assert random_hit_rate(9, 2, 2) == pytest.approx(1 - (7 * 6) / (9 * 8))
    assert random_hit_rate(16, 2, 1) == pytest.approx(2 / 16)


def test_accuracy_is_reported_per_object_count(results):
    gaze = results["gaze"]
    assert set(gaze.accuracy_by_objects) == {"1", "2", "3", "4"}
    assert (gaze.top_k, gaze.regions) == (2, 16)


def test_demo_cli_runs_on_the_default_model():
    proc = subprocess.run(
        [sys.executable, "-m", "gaze_edge.cli", "demo", "--scenes", "3"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert "/3 captions name exactly the right objects" in proc.stdout
    assert proc.stdout.count("truth:") == 3
