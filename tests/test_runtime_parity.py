"""The runtime against PyTorch generate on held-out scenes, chunking invariance, memory, gaze maps, CLI."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gaze_edge.model import scenes
from gaze_edge.runtime import GazeRuntime, Prompt, SamplingConfig
from gaze_edge.runtime.cli import add_caption_parser, add_profile_parser


@pytest.fixture(scope="module")
def rt(runtime_export) -> GazeRuntime:
    return GazeRuntime.load(runtime_export[1], threads=1)


def held_out_images(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [scenes.render(scenes.sample_scene(rng, held_out=True), 48, rng)[0] for _ in range(n)]


def torch_tokens(model, processor, prompts: list[Prompt], new: int, chunk: int | None = None) -> list[list[int]]:
    texts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}] * len(p.images)
                                             + [{"type": "text", "text": p.resolved_text()}]}]) for p in prompts]
    ids, mask = processor.batch_encode(texts)
    pixels = processor.preprocess([i for p in prompts for i in p.images])
    out = model.generate(torch.from_numpy(ids), pixel_values=torch.from_numpy(pixels),
                         attention_mask=torch.from_numpy(mask), max_new_tokens=new, prefill_chunk=chunk)
    return out.sequences.tolist(), out.selections


@pytest.mark.parametrize("case", ["single", "several", "frames", "batch"])
def test_greedy_equals_pytorch_token_for_token(rt, torch_model, case):
    model, processor = torch_model
    imgs = held_out_images(4, seed={"single": 1, "several": 2, "frames": 3, "batch": 4}[case])
    prompts = {"single": [Prompt(None, imgs[:1])], "several": [Prompt(None, imgs[:3])],
               "frames": [Prompt(None, imgs[:4], frames=True)],
               "batch": [Prompt(None, imgs[:1]), Prompt(None, imgs[1:3]), Prompt(None, imgs[3:4])]}[case]
    got = rt.generate(prompts, SamplingConfig(max_new_tokens=20))
    want, _ = torch_tokens(model, processor, prompts, 20)
    assert got.tokens.tolist() == want


def test_chunking_and_storage_order_do_not_change_tokens(rt, runtime_export):
    imgs = held_out_images(3, seed=5)
    prompts = [Prompt(None, imgs[:2]), Prompt(None, imgs[2:])]
    reference = rt.generate(prompts, SamplingConfig(max_new_tokens=12)).tokens
    prompt_order = GazeRuntime.load(runtime_export[1], threads=1, region_major=False)
    for chunk in (1, 7, 40):
        assert (rt.generate(prompts, SamplingConfig(max_new_tokens=12), prefill_chunk=chunk).tokens
                == reference).all(), chunk
        assert (prompt_order.generate(prompts, SamplingConfig(max_new_tokens=12), prefill_chunk=chunk).tokens
                == reference).all(), chunk


def test_seeded_sampling_reproducible_end_to_end(rt):
    imgs = held_out_images(1, seed=6)
    sampling = SamplingConfig(max_new_tokens=12, do_sample=True, temperature=1.5, top_p=0.95, seed=7,
                              ignore_eos=True)
    a = rt.generate(Prompt(None, imgs), sampling).tokens
    b = rt.generate(Prompt(None, imgs), sampling).tokens
    c = rt.generate(Prompt(None, imgs), SamplingConfig(**{**sampling.__dict__, "seed": 8})).tokens
    assert (a == b).all() and not (a == c).all()


def test_kv_memory_equals_the_formula_and_stays_flat_over_500_tokens(rt):
    s = rt.shape
    imgs = held_out_images(1, seed=7)
    sampling = SamplingConfig(max_new_tokens=500, ignore_eos=True)
    stream = rt.stream(Prompt(None, imgs), sampling)
    next(stream)
    spec = rt.backend.spec
    arrays = rt.backend.cache_arrays()
    expected = 2 * s.num_layers * 1 * s.kv_heads * spec.capacity * s.head_dim * 4  # fp32 K and V
    assert sum(a.nbytes for k, a in arrays.items() if not k.endswith("desc")) == expected == spec.kv_bytes
    assert sum(a.nbytes for k, a in arrays.items() if k.endswith("desc")) == \
        s.num_layers * s.kv_heads * s.num_regions * s.head_dim * 4
    for _ in range(10):
        next(stream)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    count = 11 + sum(1 for _ in stream)
    growth, peak = tracemalloc.get_traced_memory()[0] - before, tracemalloc.get_traced_memory()[1] - before
    tracemalloc.stop()
    assert count == 500
    assert growth < 64 * 1024 and peak < expected / 8, (growth, peak)  # nothing cache-sized allocated per step
    after = rt.backend.cache_arrays()
    assert all(after[k].ctypes.data in {a.ctypes.data for a in arrays.values()} for k in after)


def test_gaze_map_regions_are_those_pytorch_selected(rt, torch_model, tmp_path: Path):
    model, processor = torch_model
    imgs = held_out_images(1, seed=8)
    got = rt.generate(Prompt(None, imgs), SamplingConfig(max_new_tokens=8), with_selection=True)
    want, selections = torch_tokens(model, processor, [Prompt(None, imgs)], 8)
    assert got.tokens.tolist() == want
    for step in got.steps[1:]:  # token i is predicted by the gaze query fed at decode call i-1
        ref = [sel[:, :, -1].numpy() for sel in selections[step.index - 1]]
        for layer, (a, b) in enumerate(zip(step.selection, ref, strict=True)):
            present = b.shape[-1]  # PyTorch numbers only the regions of images present; the export has R slots
            assert (a[..., :present] == b).all() and not a[..., present:].any(), (step.index, layer)
    # The PNG: tinted cells are exactly the selected regions of the word's panel.
    path = tmp_path / "map.png"
    image_file = tmp_path / "scene.png"
    Image.fromarray(imgs[0]).save(image_file)
    assert caption_cli(rt.folder.path, image_file, "--max-new-tokens", "6", "--json", "--gaze-map", path) == 0
    from gaze_edge.runtime.gazemap import LABEL, PANEL, RESAMPLE, cell_origin, region_boxes, region_weights
    png = np.asarray(Image.open(path).convert("RGB")).astype(int)
    base = np.asarray(Image.fromarray(imgs[0]).resize((PANEL, PANEL), RESAMPLE)).astype(int)
    for index, step in enumerate(got.steps[:5]):
        left, top = cell_origin(index, 1)
        panel = png[top + LABEL : top + LABEL + PANEL, left : left + PANEL]
        weights = None if step.selection is None else region_weights(step.selection)
        for r, (x0, y0, x1, y1) in enumerate(region_boxes(rt.shape, PANEL)):
            changed = np.abs(panel[y0:y1, x0:x1] - base[y0:y1, x0:x1]).max() > 3
            assert changed == (weights is not None and weights[r] > 0), (index, r)


def caption_cli(*argv: object) -> int:
    parser = argparse.ArgumentParser(prog="gaze")
    sub = parser.add_subparsers(dest="command", required=True)
    add_caption_parser(sub)
    add_profile_parser(sub)
    args = parser.parse_args(["caption", *map(str, argv)])
    return int(args.func(args))


def gaze(*argv: object) -> subprocess.CompletedProcess[str]:
    """Run the runtime CLI in a fresh process (as gaze_edge.cli would, its error handling included)."""
    code = ("import sys, argparse\nfrom gaze_edge.errors import GazeError\n"
            "from gaze_edge.runtime.cli import add_caption_parser, add_profile_parser\n"
            "p = argparse.ArgumentParser(prog='gaze'); s = p.add_subparsers(dest='command', required=True)\n"
            "add_caption_parser(s); add_profile_parser(s); a = p.parse_args(sys.argv[1:])\n"
            "try:\n    sys.exit(a.func(a))\nexcept GazeError as e:\n"
            "    print(f'gaze: error: {e}', file=sys.stderr); sys.exit(2)\n")
    return subprocess.run([sys.executable, "-c", code, *map(str, argv)], capture_output=True, text=True,
                          timeout=120)


def test_cli_streams_and_bad_inputs_exit_non_zero(runtime_export, tmp_path: Path):
    export = runtime_export[1]
    image = tmp_path / "scene.png"
    Image.fromarray(held_out_images(1, seed=9)[0]).save(image)
    ok = gaze("caption", export, image, "--json", "--max-new-tokens", "5")
    assert ok.returncode == 0, ok.stderr
    assert len(json.loads(ok.stdout)["tokens"]) <= 5
    notes = tmp_path / "notes.jpg"
    notes.write_text("not an image")
    bomb = tmp_path / "bomb.png"
    Image.new("1", (12000, 12000)).save(bomb)  # 144 MP: beyond the runtime's 64 MP limit
    cases = [
        (("caption", export, notes), "not an image"),
        (("caption", export, bomb), "too large to decode safely"),
        (("caption", export, image, "--prompt", ""), "prompt text is empty"),
        (("caption", export, image, "--prompt", "describe " * 800), "cache slots; this export holds"),
        (("caption", tmp_path / "missing", image), "does not exist"),
        (("caption", export, image, "--backend", "cuda-magic"), "unknown backend 'cuda-magic'"),
        (("caption", export, image, "--backend", "tensorrt"), "TensorRT backend is not available here"),
    ]
    for argv, message in cases:
        result = gaze(*argv)
        assert result.returncode == 2 and message in result.stderr, (argv, result.stderr)
        assert "Traceback" not in result.stderr


def test_profile_reports_latency_bytes_memory_and_projection(runtime_export, tmp_path: Path):
    result = gaze("profile", runtime_export[1], "--frames", "3", "--new-tokens", "8", "--json",
                  tmp_path / "p.json", "--plot", tmp_path / "p.png")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "p.json").read_text())
    assert "time to first token" in result.stdout and "projection AGX Orin 64GB" in result.stdout
    assert report["new_tokens"] == 8 and report["frames"] == 3
    assert report["kv_bytes_per_step"]["gaze"] < report["kv_bytes_per_step"]["dense"]
    assert report["memory_bytes"]["kv_cache"] == report["memory_bytes"]["kv_formula"]
    assert Image.open(tmp_path / "p.png").size[0] > 100


def test_in_place_cache_equals_ping_pong_buffers(runtime_export):
    """past and present bound to one buffer (the default) gives bit-identical results to two swapped buffers."""
    from gaze_edge.runtime import ExportFolder, OrtBackend

    folder = ExportFolder.open(runtime_export[1])
    shared = GazeRuntime(folder, OrtBackend(folder, threads=1, share_buffers=True))
    swapped = GazeRuntime(folder, OrtBackend(folder, threads=1, share_buffers=False))
    imgs = held_out_images(3, seed=10)
    prompts = [Prompt(None, imgs[:2]), Prompt(None, imgs[2:])]
    a = shared.prompt_logits(prompts, np.array([9, 10]), prefill_chunk=7)
    b = swapped.prompt_logits(prompts, np.array([9, 10]), prefill_chunk=7)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    sampling = SamplingConfig(max_new_tokens=16, ignore_eos=True)
    assert (shared.generate(prompts, sampling).tokens == swapped.generate(prompts, sampling).tokens).all()
    for name, buf in shared.backend.cache_arrays().items():
        assert np.array_equal(buf, swapped.backend.cache_arrays()[name]), name


@pytest.mark.parametrize("chunk", [None, 9])
def test_prompt_and_step_logits_match_pytorch_with_images_and_frames(rt, torch_model, chunk):
    """Logits (not only argmax) within the fp32 tolerance: a strong check even for a random-weight model."""
    model, processor = torch_model
    imgs = held_out_images(4, seed=12)
    prompts = [Prompt(None, imgs[:3]), Prompt(None, imgs[3:], frames=True), Prompt(None, imgs[:4], frames=True)]
    texts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}] * len(p.images)
                                             + [{"type": "text", "text": p.resolved_text()}]}]) for p in prompts]
    ids, mask = processor.batch_encode(texts)
    pixels = processor.preprocess([i for p in prompts for i in p.images])
    step = np.array([20, 21, 22])
    got, got_step = rt.prompt_logits(prompts, step, prefill_chunk=chunk)
    with torch.no_grad():
        cache = model.new_cache(3)
        ref = model(torch.from_numpy(ids), pixel_values=torch.from_numpy(pixels),
                    attention_mask=torch.from_numpy(mask), past_key_values=cache).logits.numpy()
        ref_step = model(torch.from_numpy(step[:, None]), gaze_mask=torch.ones(3, 1, dtype=torch.bool),
                         past_key_values=cache).logits.numpy()
    valid = mask.astype(bool)
    assert np.linalg.norm(got[valid] - ref[valid]) / np.linalg.norm(ref[valid]) < 1e-4
    assert np.linalg.norm(got_step - ref_step) / np.linalg.norm(ref_step) < 1e-4
