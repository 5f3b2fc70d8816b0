"""The procedural scene generator and its caption grammar."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from gaze_edge.model import scenes


def test_caption_round_trips_to_facts():
    rng = np.random.default_rng(0)
    for _ in range(200):
        scene = scenes.sample_scene(rng)
        assert scenes.parse_caption(scene.caption()) == scene.facts
        assert 1 <= len(scene.objects) <= scenes.MAX_OBJECTS


def test_parse_rejects_off_grammar_text():
    assert scenes.parse_caption("a red circle at top") is None
    assert scenes.parse_caption("a pink circle at top left") is None
    assert scenes.parse_caption("red circle at top left") is None
    assert scenes.parse_caption("a red circle at top left and") is None
    assert scenes.parse_caption("a red circle at center") is None  # no centre cell on a 4x4 grid
    assert scenes.parse_caption("a red circle at center left") is None  # a column needs its row


def test_grid_positions_are_distinct_and_in_the_vocabulary():
    assert (scenes.GRID, scenes.MAX_OBJECTS) == (4, 4)
    assert len(set(scenes.POSITIONS)) == 16
    assert scenes.position_name(1, 2) == "upper center right"
    fact = ("blue", "cross", "lower center left")
    assert scenes.parse_caption("a blue cross at lower center left") == frozenset({fact})
    words = {w for p in scenes.POSITIONS for w in p.split()}
    assert words <= set(scenes.CAPTION_WORDS)
    # the 3x3 grammar's words are all still words, so old captions stay representable
    assert {"top", "center", "bottom", "left", "right"} <= set(scenes.CAPTION_WORDS)
    rng = np.random.default_rng(5)
    counts = np.bincount([len(scenes.sample_scene(rng).objects) for _ in range(800)], minlength=5)
    assert counts[0] == 0 and (counts[1:] > 120).all()  # 1 .. 4 objects, each about a quarter of the time


def test_held_out_split_is_disjoint():
    rng = np.random.default_rng(1)
    train = {scenes.sample_scene(rng).facts for _ in range(2000)}
    held = {scenes.sample_scene(rng, held_out=True).facts for _ in range(300)}
    assert not train & held
    fraction = np.mean([scenes.Scene(scenes.sample_scene(rng).objects).is_held_out() for _ in range(10)])
    assert fraction == 0.0  # the training sampler never yields a held-out scene


def test_objects_are_drawn_inside_their_cell_in_their_colour():
    rng = np.random.default_rng(2)
    for _ in range(50):
        scene = scenes.sample_scene(rng)
        image, masks = scenes.render(scene, 64, rng)
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        for obj, mask in zip(scene.objects, masks, strict=True):
            rows, cols = np.nonzero(mask)
            assert rows.min() >= obj.row * 16 and rows.max() < (obj.row + 1) * 16
            assert cols.min() >= obj.col * 16 and cols.max() < (obj.col + 1) * 16
            assert (image[mask] == scenes.COLOURS[obj.colour]).all()


def test_shapes_differ():
    masks = {s: scenes._shape_mask(s, 14) for s in scenes.SHAPES}
    areas = {s: int(m.sum()) for s, m in masks.items()}
    assert len(set(areas.values())) == len(scenes.SHAPES)


def test_torch_free_modules_do_not_import_torch():
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
        "import gaze_edge.reference, gaze_edge.model.scenes, gaze_edge.model.processing\n"
        "p = gaze_edge.model.processing.default_processor(48, 36); print(len(p.encode(p.prompt())))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "44"
