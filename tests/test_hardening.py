"""Bad input: one line and the documented exit code, never a traceback; nothing half-written; nothing read from outside.

One section per class of issue 15 (rules: docs/CLI.md): arguments checked while parsing, sampling
values, text that is not UTF-8, config sizes against this machine, the export folder as a sandbox,
image folders (pixel budget, streaming), SIGTERM / SIGHUP / SIGINT at work, interrupted imports and
missing extras, exit codes, folder modes, install metadata.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from gaze_edge import atomic
from gaze_edge import cli as gaze_cli
from gaze_edge.calibrate.data import load_image_set, read_prompts
from gaze_edge.cli import main as gaze_main
from gaze_edge.errors import InputError, RunError
from gaze_edge.export.cli import ExportFailedError
from gaze_edge.model.processing import default_processor
from gaze_edge.runtime.backend import BackendError
from gaze_edge.runtime.folder import ExportFolder, ExportFolderError
from gaze_edge.runtime.sampling import Sampler, SamplingConfig

ROOT = Path(__file__).resolve().parents[1]


def one_line_error(err: str) -> str:
    """stderr of a refused command: exactly one non-empty line, no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name or ".old-" in p.name
                  or p.name.endswith(".tmp"))


def write_scenes(folder: Path, count: int, seed: int = 3) -> Path:
    assert gaze_main(["scenes", "-o", str(folder), "--count", str(count), "--seed", str(seed)]) == 0
    return folder


@pytest.fixture(scope="module")
def scenes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_scenes(tmp_path_factory.mktemp("hardening") / "scenes", 4)


@pytest.fixture()
def export_copy(runtime_export, tmp_path: Path) -> Path:
    copy = tmp_path / "export"
    shutil.copytree(runtime_export[1], copy)
    return copy


def edit_config(folder: Path, edit) -> None:  # type: ignore[no-untyped-def]
    config = json.loads((folder / "gaze_config.json").read_text())
    edit(config)
    (folder / "gaze_config.json").write_text(json.dumps(config))


# ------------------------------------------------------------------------- arguments, checked while parsing

CAP = ["caption", "{E}", "{I}"]
CAL = ["calibrate", "{E}", "--images", "{D}"]
QUA = ["quantize", "{E}", "-o", "{T}/q"]
EXP = ["export", "{C}", "-o", "{T}/out"]
BAD_ARGUMENTS = [
    ([*CAP, "--temperature", "nan"], "--temperature: must be a finite number >= 0, got 'nan'"),
    ([*CAP, "--temperature", "inf"], "--temperature: must be a finite number >= 0, got 'inf'"),
    ([*CAP, "--temperature", "-0.5"], "--temperature: must be >= 0"),
    ([*CAP, "--top-p", "nan"], "--top-p: must be a finite number in (0, 1]"),
    ([*CAP, "--top-p", "0"], "--top-p: must be in (0, 1], got 0"),
    ([*CAP, "--top-p", "1.5"], "--top-p: must be in (0, 1]"),
    ([*CAP, "--repetition-penalty", "0"], "--repetition-penalty: must be > 0"),
    ([*CAP, "--repetition-penalty=-inf"], "--repetition-penalty: must be a finite number"),
    ([*CAP, "--seed", "-1"], "--seed: must be an integer in 0 .. 18446744073709551615"),
    ([*CAP, "--seed", str(2**64)], "--seed: must be an integer in 0 .."),
    ([*CAP, "--seed", "1.5"], "--seed: expected an integer, got '1.5'"),
    ([*CAP, "--threads", "0"], "--threads: must be an integer in 1 .. 1024, got 0"),
    ([*CAP, "--threads", "-4"], "--threads: must be an integer in 1 .. 1024, got -4"),
    ([*CAP, "--threads", "two"], "--threads: expected an integer, got 'two'"),
    ([*CAP, "--max-new-tokens", "0"], "--max-new-tokens: must be an integer in 1 .."),
    ([*CAP, "--top-k", "-1"], "--top-k: must be an integer >= 0"),
    ([*CAP, "--stop-token-id", "-2"], "--stop-token-id: must be an integer >= 0"),
    ([*CAP, "--gaze-map", "{T}/missing/map.png"], "folder {T}/missing does not exist; create it first"),
    ([*CAP, "--gaze-map", "{T}"], "{T} is a folder; give a file name"),
    ([*CAP, "--gaze-map", "{T}/map.jpg"], "{T}/map.jpg must end with .png"),
    ([*CAP, "--prompt", "caf\udce9"], "--prompt: is not valid UTF-8 text"),
    (["caption", "{E}"], "the following arguments are required: images"),
    (["profile", "{E}", "--batch", "0"], "--batch: must be an integer in 1 .. 4096"),
    (["profile", "{E}", "--new-tokens", "0"], "--new-tokens: must be an integer in 1 .."),
    (["profile", "{E}", "--images", "0"], "--images: must be an integer in 1 .. 1024"),
    (["profile", "{E}", "--frames", "-1"], "--frames: must be an integer in 1 .. 1024"),
    (["profile", "{E}", "--json", "{T}"], "{T} is a folder; give a file name"),
    (["profile", "{E}", "--plot", "{T}/none/x.png"], "folder {T}/none does not exist"),
    ([*EXP, "--max-images", "0"], "--max-images: must be an integer in 1 .. 1024"),
    ([*EXP, "--max-seq-len", "1"], "--max-seq-len: must be an integer >= 2"),
    ([*EXP, "--opset", "17"], "--opset: must be an integer in 18 .. 23, got 17"),
    ([*EXP, "--opset", "99"], "--opset: must be an integer in 18 .. 23, got 99"),
    ([*EXP, "--validate-scenes", "0"], "--validate-scenes: must be an integer in 1 .."),
    ([*QUA, "--calib-count", "0"], "--calib-count: must be an integer in 1 .."),
    ([*QUA, "--held-out-count", "-1"], "--held-out-count: must be an integer in 1 .."),
    ([*QUA, "--threads", "0"], "--threads: must be an integer in 1 .. 1024"),
    ([*QUA, "--max-total-pixels", "0"], "--max-total-pixels: must be an integer in 1 .."),
    ([*QUA, "--json", "{T}"], "{T} is a folder; give a file name"),
    ([*CAL, "--coverage", "nan"], "--coverage: must be a finite number in (0, 1]"),
    ([*CAL, "--coverage", "0"], "--coverage: must be in (0, 1], got 0"),
    ([*CAL, "--coverage", "1.5"], "--coverage: must be in (0, 1], got 1.5"),
    ([*CAL, "--min-agreement", "inf"], "--min-agreement: must be a finite number"),
    ([*CAL, "--max-images", "0"], "--max-images: must be an integer >= 1"),
    ([*CAL, "--batch-size", "0"], "--batch-size: must be an integer in 1 .. 4096"),
    ([*CAL, "--max-new-tokens", "0"], "--max-new-tokens: must be an integer in 1 .."),
    ([*CAL, "--report", "{T}/file.txt"], "{T}/file.txt exists and is not a folder"),
    ([*CAL, "--report", "{T}/file.txt/sub"], "cannot create {T}/file.txt/sub: {T}/file.txt is a file"),
    (["scenes", "-o", "{T}/s", "--count", "0"], "--count: must be an integer in 1 .. 1000000"),
    (["scenes", "-o", "{T}/s", "--size", "3"], "--size: must be an integer in 9 .. 4096"),
    (["scenes", "-o", "{T}/s", "--seed", "-1"], "--seed: must be an integer in 0 .."),
    (["scenes", "-o", "{T}/file.txt"], "{T}/file.txt exists and is not a folder"),
    (["demo", "--scenes", "0"], "--scenes: must be an integer in 1 .. 10000"),
    (["demo", "--seed", "-5"], "--seed: must be an integer in 0 .."),
    (["evaluate", "--scenes", "0"], "--scenes: must be an integer in 1 .."),
    (["evaluate", "--json", "{T}/missing/x.json"], "folder {T}/missing does not exist"),
    (["evaluate", "--figure", "{T}/fig.txt"], "{T}/fig.txt must end with .png"),
    (["build", "{E}", "--max-batch", "0"], "--max-batch: must be an integer in 1 .. 4096"),
    (["build", "{E}", "--max-prefill", "-1"], "--max-prefill: must be an integer in 1 .."),
    (["build", "{E}", "--workspace-mib", "0"], "--workspace-mib: must be an integer in 1 .."),
]


@pytest.mark.parametrize("argv, message", BAD_ARGUMENTS, ids=[" ".join(a[:1] + a[-2:]) for a, _ in BAD_ARGUMENTS])
def test_a_bad_argument_is_one_line_exit_2_and_nothing_is_written(argv, message, tmp_path: Path, capsys):
    (tmp_path / "file.txt").write_text("a file, not a folder")
    before = listing(tmp_path)
    names = {"T": str(tmp_path), "E": str(tmp_path / "export"), "I": str(tmp_path / "a.png"),
             "C": str(tmp_path / "ckpt"), "D": str(tmp_path / "images")}
    assert gaze_main([a.format(**names) for a in argv]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert line.startswith(f"gaze {argv[0]}: error: ") and line.endswith(f"see gaze {argv[0]} --help"), line
    assert message.format(**names) in line, line
    assert listing(tmp_path) == before


def test_the_python_api_checks_the_same_ranges(tmp_path: Path):
    import argparse

    from gaze_edge.calibrate import quantize as qz
    from gaze_edge.export.cli import run_export

    with pytest.raises(InputError, match="--calib-count must be at least 1, got 0"):
        qz.check_options(qz.QuantizeOptions(held_out=tmp_path, calib_count=0))
    args = argparse.Namespace(opset=17, max_images=1, max_seq_len=None, validate_scenes=1, output=tmp_path / "o",
                              force=False, checkpoint=tmp_path)
    with pytest.raises(InputError, match="--opset 17 is not supported"):
        run_export(args)
    assert listing(tmp_path) == []


def test_help_exits_0(capsys):
    assert gaze_main(["caption", "--help"]) == 0
    assert "--temperature" in capsys.readouterr().out


# ------------------------------------------------------------------------- sampling values (Python API too)


@pytest.mark.parametrize("field, value", [
    ("temperature", float("nan")), ("temperature", float("inf")), ("top_p", float("nan")), ("top_p", 1.0001),
    ("repetition_penalty", float("nan")), ("repetition_penalty", float("inf")), ("seed", -1), ("seed", 2**64),
    ("max_new_tokens", 2.5), ("top_k", True),
])
def test_non_finite_or_out_of_range_sampling_values_are_refused(field, value):
    config = SamplingConfig(do_sample=True, **{field: value})
    with pytest.raises(InputError, match=field):
        config.check()
    with pytest.raises(InputError, match=field):  # the sampler refuses it before drawing a token
        Sampler(config, 1, 8, suppress_ids=[0])


def test_nan_temperature_no_longer_yields_a_suppressed_token():
    # Before: logits / nan -> nan probabilities -> token 0 (pad, never to be generated) every step.
    with pytest.raises(InputError, match="temperature must be a finite number"):
        Sampler(SamplingConfig(do_sample=True, temperature=float("nan")), 1, 4, suppress_ids=[0])
    with pytest.raises(InputError, match="stop token id must be in 0 .. 3"):
        Sampler(SamplingConfig(stop_token_ids=(4,)), 1, 4, suppress_ids=[])
    sampler = Sampler(SamplingConfig(do_sample=True, seed=1), 1, 4, suppress_ids=[0])
    with pytest.raises(RunError, match="non-finite logits"):
        sampler(np.array([[np.nan, 1.0, 2.0, np.nan]], dtype=np.float32))


def test_a_non_finite_search_default_in_the_export_is_refused(export_copy: Path):
    edit_config(export_copy, lambda c: c["search"].update(temperature=float("nan")))
    with pytest.raises(ExportFolderError, match="search.temperature must be a finite number"):
        ExportFolder.open(export_copy)


# ------------------------------------------------------------------------- text that is not UTF-8

BAD_UTF8 = b"describe the image \xff\xfe .\n"


def test_a_prompts_or_truth_file_that_is_not_utf8_is_named(tmp_path: Path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(BAD_UTF8)
    with pytest.raises(InputError, match=r"prompts file .*prompts.txt is not valid UTF-8 text \(byte 19\)"):
        read_prompts(prompts)
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (8, 8)).save(images / "a.png")
    (images / "truth.txt").write_bytes(b"a.png\t" + BAD_UTF8)
    with pytest.raises(InputError, match=r"truth file .*truth.txt is not valid UTF-8"):
        load_image_set(images)


@pytest.mark.parametrize("name", ["gaze_config.json", "tokenizer.json", "tokenizer_config.json"])
def test_export_files_that_are_not_utf8_are_refused_by_the_cli(export_copy: Path, name: str, tmp_path: Path, capsys):
    (export_copy / name).write_bytes(b"{\"a\": \"\xff\"}")
    image = tmp_path / "a.png"
    Image.new("RGB", (48, 48)).save(image)
    assert gaze_main(["caption", str(export_copy), str(image)]) == 2
    assert name in one_line_error(capsys.readouterr().err)


def test_a_checkpoint_config_that_is_not_utf8_is_refused_by_export(runtime_export, tmp_path: Path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(runtime_export[0], ckpt)
    (ckpt / "config.json").write_bytes(b"{\"model_type\": \"\xff\"}")
    assert gaze_main(["export", str(ckpt), "-o", str(tmp_path / "out")]) == 2
    assert "config.json is not valid JSON" in one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_a_prompts_file_that_is_not_utf8_is_refused_by_calibrate(export_copy: Path, runtime_export, scenes_dir,
                                                                 tmp_path: Path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(BAD_UTF8)
    before = listing(export_copy)
    assert gaze_main(["calibrate", str(export_copy), "--images", str(scenes_dir), "--prompts", str(prompts),
                      "--checkpoint", str(runtime_export[0])]) == 2
    assert "is not valid UTF-8 text" in one_line_error(capsys.readouterr().err)
    assert listing(export_copy) == before


# ------------------------------------------------------------------------- sizes against this machine


def test_a_checkpoint_too_large_for_this_machine_is_refused_before_loading(runtime_export, tmp_path: Path, capsys):
    ckpt = tmp_path / "huge"
    shutil.copytree(runtime_export[0], ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config.update(hidden_size=65536, intermediate_size=262144, num_hidden_layers=96, vocab_size=1_000_000)
    (ckpt / "config.json").write_text(json.dumps(config))
    start = time.perf_counter()
    assert gaze_main(["export", str(ckpt), "-o", str(tmp_path / "out")]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "describes a model of at least" in line and "this machine has" in line, line
    assert time.perf_counter() - start < 30  # refused from config.json: no 26 TB allocation was attempted
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("edit, message", [
    (lambda c: (c["gaze"].update(max_images=2**27),
                c["model"]["decoder"]["descriptors"].update(num_regions=9 * 2**27)), "this machine has"),
    (lambda c: c["model"].update(hidden_size=1e30), "model.hidden_size must be an integer, got 1e+30"),
    (lambda c: c["model"].update(num_key_value_heads=-2), "model.num_key_value_heads must be in 1 .."),
    (lambda c: c["model"]["decoder"]["kv_cache"].update(max_seq_len=2**40), "max_seq_len must be in 2 .."),
    (lambda c: c["special_tokens"].update(eos_token_id=10**9), "special_tokens.eos_token_id must be in 0 .."),
])
def test_sizes_in_gaze_config_are_checked_before_allocation(export_copy: Path, edit, message: str):
    edit_config(export_copy, edit)
    with pytest.raises(ExportFolderError, match=re.escape(message)):
        ExportFolder.open(export_copy)


def test_a_profile_batch_beyond_this_machine_is_refused(export_copy: Path, capsys):
    edit_config(export_copy, lambda c: (c["model"]["decoder"]["kv_cache"].update(max_seq_len=2**31 - 1),
                                        c["search"].update(max_length=2**31 - 1)))
    assert gaze_main(["profile", str(export_copy), "--batch", "4096", "--new-tokens", str(1 << 20)]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "4096 sequence(s)" in line and "this machine has" in line, line


# ------------------------------------------------------------------------- an export too short for one prompt


def test_an_export_that_cannot_hold_one_prompt_is_refused_at_export_time(runtime_export, tmp_path: Path, capsys):
    out = tmp_path / "out"
    assert gaze_main(["export", str(runtime_export[0]), "-o", str(out), "--max-seq-len", "20"]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert re.search(r"--max-seq-len 20 cannot hold one prompt: the default prompt with one image is \d+ tokens", line)
    assert not out.exists() and leftovers(tmp_path) == []


def test_the_runtime_refuses_an_export_shorter_than_one_prompt(export_copy: Path):
    edit_config(export_copy, lambda c: c["model"]["decoder"]["kv_cache"].update(max_seq_len=20))
    with pytest.raises(ExportFolderError, match="less than one prompt"):
        ExportFolder.open(export_copy)


# ------------------------------------------------------------------------- the export folder is a sandbox


def _link_out(folder: Path, name: str, outside: Path) -> None:
    target = outside / name
    shutil.move(str(folder / name), target)
    (folder / name).symlink_to(target)


SANDBOX = [
    ("tokenizer.json", lambda f, o: _link_out(f, "tokenizer.json", o), "is a symbolic link to"),
    ("decoder.onnx", lambda f, o: _link_out(f, "decoder.onnx", o), "is a symbolic link to"),
    ("gaze_config.json", lambda f, o: _link_out(f, "gaze_config.json", o), "is a symbolic link to"),
    ("engines dir", lambda f, o: (f / "engines").symlink_to(o, target_is_directory=True), "is a symbolic link to"),
    ("absolute name", lambda f, o: edit_config(f, lambda c: c["model"]["embedding"].update(
        filename=str(f / "embed_tokens.npy"))), "an absolute path or one with '..'"),
    ("dot-dot name", lambda f, o: edit_config(f, lambda c: c["model"]["decoder"].update(
        filename="../export/decoder.onnx")), "an absolute path or one with '..'"),
    ("inner dot-dot", lambda f, o: edit_config(f, lambda c: c["model"]["vision"].update(
        filename="sub/../vision.onnx")), "an absolute path or one with '..'"),
]


@pytest.mark.parametrize("case, damage, message", SANDBOX, ids=[c for c, _, _ in SANDBOX])
def test_files_outside_the_export_folder_are_refused(export_copy: Path, tmp_path: Path, case, damage, message):
    outside = tmp_path / "outside"
    outside.mkdir()
    damage(export_copy, outside)
    with pytest.raises(ExportFolderError, match=re.escape(message)) as info:
        ExportFolder.open(export_copy)
    assert "inside" in str(info.value)


def test_links_that_stay_inside_are_fine_and_the_cli_names_one_that_leaves(export_copy: Path, tmp_path: Path,
                                                                          capsys):
    (export_copy / "vision.onnx").rename(export_copy / "vision_real.onnx")
    (export_copy / "vision.onnx").symlink_to("vision_real.onnx")  # relative, inside: allowed
    assert ExportFolder.open(export_copy).vision_path.resolve() == (export_copy / "vision_real.onnx").resolve()
    secret = tmp_path / "secret.npy"
    shutil.move(str(export_copy / "embed_tokens.npy"), secret)
    (export_copy / "embed_tokens.npy").symlink_to(secret)
    image = tmp_path / "a.png"
    Image.new("RGB", (48, 48)).save(image)
    assert gaze_main(["caption", str(export_copy), str(image)]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "embed_tokens.npy is a symbolic link to" in line and "outside the export folder" in line, line


# ------------------------------------------------------------------------- image folders: budget and streaming


#: Peak RSS of the process itself (VmHWM: per address space, so a child does not inherit pytest's, as
#: getrusage's ru_maxrss does across fork + exec).
PEAK_RSS = ("def peak_rss():\n    with open('/proc/self/status') as f:\n"
            "        return next(int(x.split()[1]) * 1024 for x in f if x.startswith('VmHWM:'))\n")


def huge_compressed_folder(folder: Path, count: int, side: int) -> Path:
    """`count` copies of one side x side bilevel PNG: a few KB each on disk, side**2 pixels each decoded."""
    folder.mkdir()
    image = Image.new("1", (side, side))
    ImageDraw.Draw(image).rectangle((side // 8, side // 8, side // 2, side // 2), fill=1)
    image.save(folder / "img_000.png")
    for i in range(1, count):
        shutil.copy(folder / "img_000.png", folder / f"img_{i:03d}.png")
    return folder


def test_a_folder_over_the_pixel_budget_is_refused_before_decoding(runtime_export, tmp_path: Path):
    """32 x 64 MP compressed to 30 KB each: decoding them all took 6 GB; now a header pass refuses the folder."""
    folder = huge_compressed_folder(tmp_path / "bombs", 32, 8000)
    assert sum(p.stat().st_size for p in folder.iterdir()) < 2_000_000
    code = (f"import sys\n{PEAK_RSS}\nfrom gaze_edge.cli import main\nrc = main(sys.argv[1:])\n"
            "print('peak_rss', peak_rss(), file=sys.stderr)\nsys.exit(rc)\n")
    out = tmp_path / "q"
    result = subprocess.run([sys.executable, "-c", code, "quantize", str(runtime_export[1]), "-o", str(out),
                             "--held-out", str(folder), "--held-out-count", "32"],
                            capture_output=True, text=True, timeout=120)
    err = result.stderr.splitlines()
    assert result.returncode == 2, result.stderr
    line = one_line_error("\n".join(x for x in err if not x.startswith(("peak_rss", "["))))
    assert "its 32 images hold 2,048,000,000 pixels in all, more than the budget of 2,000,000,000 " \
        "(--max-total-pixels)" in line, line
    peak = int(next(x for x in err if x.startswith("peak_rss")).split()[1])
    assert peak < 400 * 2**20, peak  # one decoded image alone would be 192 MB, all of them 6 GB
    assert not out.exists() and leftovers(tmp_path) == []


def test_images_are_streamed_and_kept_at_the_model_size(tmp_path: Path):
    """8 x 16 MP: kept at full size they add > 380 MB; streamed (decode, resize, drop) the peak grows < 200 MB."""
    folder = huge_compressed_folder(tmp_path / "big", 8, 4000)
    code = (f"import sys\n{PEAK_RSS}\nfrom gaze_edge.calibrate.data import load_image_set\n"
            "from gaze_edge.model.processing import default_processor\n"
            "p = default_processor(48, 36)\nbefore = peak_rss()\n"
            "s = load_image_set(sys.argv[1], processor=p, max_total_pixels=10**12)\n"
            "print(len(s), *s.images[0].size, peak_rss() - before)\n")
    result = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    count, width, height, growth = map(int, result.stdout.split())
    assert (count, width, height) == (8, 48, 48)
    assert growth < 200 * 2**20, growth / 2**20


def test_a_kept_image_preprocesses_exactly_like_the_original(tmp_path: Path):
    folder = tmp_path / "one"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (70, 101, 3), dtype=np.uint8)).save(folder / "a.png")
    processor = default_processor(48, 36)
    kept = load_image_set(folder, processor=processor).images
    full = load_image_set(folder).images
    assert kept[0].size == (48, 48) and full[0].size == (101, 70)
    assert np.array_equal(processor.preprocess(kept), processor.preprocess(full))


def test_the_budget_flag_of_quantize_and_calibrate(runtime_export, export_copy: Path, scenes_dir: Path,
                                                   tmp_path: Path, capsys):
    out = tmp_path / "q"
    assert gaze_main(["quantize", str(runtime_export[1]), "-o", str(out), "--held-out", str(scenes_dir),
                      "--max-total-pixels", "5000"]) == 2
    line = one_line_error("\n".join(x for x in capsys.readouterr().err.splitlines() if not x.startswith("[")))
    assert "its 4 images hold 9,216 pixels in all, more than the budget of 5,000 (--max-total-pixels)" in line, line
    assert not out.exists() and leftovers(tmp_path) == []
    before = listing(export_copy)
    assert gaze_main(["calibrate", str(export_copy), "--images", str(scenes_dir), "--checkpoint",
                      str(runtime_export[0]), "--max-total-pixels", "5000"]) == 2
    assert "--max-total-pixels" in one_line_error(capsys.readouterr().err)
    assert listing(export_copy) == before


# ------------------------------------------------------------------------- signals: SIGTERM / SIGHUP like Ctrl-C


def _default_signals() -> None:  # the child starts with default dispositions even under nohup or in a background job
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)


def signal_at(argv: list[str], marker: str, signum: int, stream: str = "stdout",
              timeout: float = 300) -> tuple[int, str]:
    """Run `gaze ARGV`, send `signum` once a line of `stream` holds `marker`; (exit status, stderr)."""
    proc = subprocess.Popen([sys.executable, "-m", "gaze_edge.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_default_signals)
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        watched = proc.stdout if stream == "stdout" else proc.stderr
        assert watched is not None
        seen = []
        for line in watched:
            seen.append(line)
            if marker in line:
                proc.send_signal(signum)
                break
        out, err = proc.communicate()
    finally:
        timer.cancel()
    assert any(marker in line for line in seen), f"{marker!r} never printed: {''.join(seen)[-2000:]}"
    return proc.returncode, ("".join(seen) + err) if stream == "stderr" else err


SNIPPET = """
import sys, time
from pathlib import Path
from gaze_edge.atomic import partial_folder, signal_number, signals_interrupt
from gaze_edge.errors import GazeError
out = Path(sys.argv[1])
with signals_interrupt():
    try:
        with partial_folder(out, GazeError) as tmp:
            for i in range(1000):
                (tmp / f"part{i}").write_bytes(b"x" * 4096)
                if i == 10:
                    print("writing", flush=True)
                time.sleep(0.01)
    except KeyboardInterrupt as exc:
        sys.exit(128 + signal_number(exc))
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=lambda s: s.name)
def test_a_signal_mid_write_leaves_no_partial_folder(signum, tmp_path: Path):
    out = tmp_path / "OUT"
    out.mkdir()
    (out / "keep.txt").write_text("the previous output")
    proc = subprocess.Popen([sys.executable, "-c", SNIPPET, str(out)], stdout=subprocess.PIPE, text=True,
                            preexec_fn=_default_signals)
    assert proc.stdout is not None and proc.stdout.readline() == "writing\n"
    assert any(".OUT.partial-" in p.name for p in tmp_path.iterdir())  # mid-write: the partial folder exists
    proc.send_signal(signum)
    assert proc.wait(timeout=60) == 128 + signum
    assert leftovers(tmp_path) == [] and listing(out) == ["keep.txt"]


def test_sigterm_during_export_keeps_the_old_output(runtime_export, tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("the previous export")
    rc, err = signal_at(["export", str(runtime_export[0]), "-o", str(out), "--force", "--max-images", "1",
                         "--validate-scenes", "1"], "[2/6]", signal.SIGTERM)
    assert rc == 143, err
    assert err.splitlines()[-1] == "gaze: interrupted (SIGTERM)", err
    assert "Traceback" not in err
    assert leftovers(tmp_path) == [] and listing(out) == ["keep.txt"]


def test_sighup_during_quantize_leaves_nothing(runtime_export, scenes_dir: Path, tmp_path: Path):
    out = tmp_path / "q"
    rc, err = signal_at(["quantize", str(runtime_export[1]), "-o", str(out), "--held-out", str(scenes_dir)],
                        "[2/5]", signal.SIGHUP, stream="stderr")
    assert rc == 129, err
    assert "gaze: interrupted (SIGHUP)" in err and "Traceback" not in err
    assert not out.exists() and leftovers(tmp_path) == []


def test_sigterm_during_calibrate_leaves_the_export_as_it_was(export_copy: Path, runtime_export, scenes_dir: Path):
    before = {p: (export_copy / p).read_bytes() for p in listing(export_copy) if (export_copy / p).is_file()}
    rc, err = signal_at(["calibrate", str(export_copy), "--images", str(scenes_dir), "--checkpoint",
                         str(runtime_export[0]), "--batch-size", "2", "--max-new-tokens", "8"], "[2/5]",
                        signal.SIGTERM, stream="stderr")
    assert rc == 143, err
    assert "gaze: interrupted (SIGTERM)" in err and "Traceback" not in err
    after = {p: (export_copy / p).read_bytes() for p in listing(export_copy) if (export_copy / p).is_file()}
    assert after == before


def _intact_or_complete(out: Path, old: list[str]) -> None:
    """Nothing lost: the old output exactly, or a complete new export the runtime opens."""
    if listing(out) != old:
        ExportFolder.open(out)


@pytest.mark.slow
@pytest.mark.parametrize("stage", range(1, 7))
def test_sigterm_at_every_stage_of_export(runtime_export, tmp_path: Path, stage: int):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("the previous export")
    rc, err = signal_at(["export", str(runtime_export[0]), "-o", str(out), "--force", "--max-images", "1",
                         "--validate-scenes", "1"], f"[{stage}/6]", signal.SIGTERM)
    assert rc in (0, 143) and "Traceback" not in err, err
    assert leftovers(tmp_path) == []
    _intact_or_complete(out, ["keep.txt"])
    if stage < 6:  # mid-work: interrupted, the old output untouched
        assert rc == 143 and listing(out) == ["keep.txt"], err


@pytest.mark.slow
@pytest.mark.parametrize("stage", range(1, 6))
def test_sigterm_at_every_stage_of_quantize(runtime_export, scenes_dir: Path, tmp_path: Path, stage: int):
    out = tmp_path / "q"
    out.mkdir()
    (out / "keep.txt").write_text("the previous output")
    rc, err = signal_at(["quantize", str(runtime_export[1]), "-o", str(out), "--force", "--held-out",
                         str(scenes_dir)], f"[{stage}/5]", signal.SIGTERM, stream="stderr")
    assert rc in (0, 143) and "Traceback" not in err, err
    assert leftovers(tmp_path) == []
    _intact_or_complete(out, ["keep.txt"])
    if stage < 5:
        assert rc == 143 and listing(out) == ["keep.txt"], err


@pytest.mark.slow
@pytest.mark.parametrize("stage", range(1, 6))
def test_sigterm_at_every_stage_of_calibrate(export_copy: Path, runtime_export, scenes_dir: Path, stage: int):
    from gaze_edge.runtime import GazeRuntime

    before = {p: (export_copy / p).read_bytes() for p in listing(export_copy) if (export_copy / p).is_file()}
    rc, err = signal_at(["calibrate", str(export_copy), "--images", str(scenes_dir), "--checkpoint",
                         str(runtime_export[0]), "--batch-size", "2", "--max-new-tokens", "8", "--held-out",
                         str(scenes_dir)], f"[{stage}/5]", signal.SIGTERM, stream="stderr")  # [4/5]: held-out
    assert rc in (0, 143) and "Traceback" not in err, err
    assert not [p for p in listing(export_copy) if p.endswith(".tmp")]
    after = {p: (export_copy / p).read_bytes() for p in listing(export_copy) if (export_copy / p).is_file()}
    if stage < 5:
        assert rc == 143 and after == before, err
    else:  # rewritten: both files new (the runtime loads it), or, between the two renames, a named refusal
        try:
            GazeRuntime.load(export_copy, threads=1)
        except BackendError as exc:
            assert "gaze_config.json" in str(exc)


def test_ignored_signals_stay_ignored_and_handlers_come_back():
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as under nohup
    term = signal.getsignal(signal.SIGTERM)
    try:
        with atomic.signals_interrupt():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is not term
        assert signal.getsignal(signal.SIGTERM) is term
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_a_signal_during_the_swap_is_raised_after_it(tmp_path: Path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    new = tmp_path / ".out.partial-x"
    new.mkdir()
    (new / "new.txt").write_text("new")
    real_replace = os.replace

    def replace_then_signal(a, b):  # type: ignore[no-untyped-def]
        real_replace(a, b)
        os.kill(os.getpid(), signal.SIGTERM)  # lands between setting the old folder aside and the new rename
        time.sleep(0.01)

    monkeypatch.setattr(atomic.os, "replace", replace_then_signal)
    with atomic.signals_interrupt(), pytest.raises(atomic.Interrupted):
        atomic.move_folder_into_place(new, out, RunError, "the test folder")
    assert listing(out) == ["new.txt"] and leftovers(tmp_path) == []


# ------------------------------------------------------------------------- interrupted imports, missing extras


@pytest.mark.parametrize("argv, blocked", [
    (["export", "{T}/ckpt", "-o", "{T}/out"], "torch"),
    (["calibrate", "{T}/export", "--images", "{T}"], "torch"),
    (["quantize", "{T}/export", "-o", "{T}/q", "--held-out", "{T}"], "onnx"),
    (["demo"], "torch"),
])
def test_a_missing_extra_is_named(argv, blocked, tmp_path: Path):
    code = (f"import sys; sys.modules[{blocked!r}] = None\n"
            "from gaze_edge.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    real = [a.format(T=tmp_path) for a in argv]
    result = subprocess.run([sys.executable, "-c", code, *real], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    line = one_line_error(result.stderr)
    assert f"`gaze {argv[0]}` needs {blocked}, which is not installed here: pip install 'gaze-edge[torch]'" in line
    assert listing(tmp_path) == []


@pytest.mark.parametrize("package, body, rc, message", [
    ("onnx", "raise ImportError('initialization failed') from KeyboardInterrupt()", 130, "gaze: interrupted (SIGINT)"),
    ("onnx", "raise KeyboardInterrupt", 130, "gaze: interrupted (SIGINT)"),
    ("onnx", "raise ImportError('libonnx.so: cannot open shared object file')", 2,
     "needs onnx, which is installed but cannot be imported (libonnx.so"),
])
def test_an_interrupt_during_an_import_is_not_a_missing_package(package, body, rc, message, tmp_path: Path):
    fake = tmp_path / "site" / package
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(body + "\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    result = subprocess.run([sys.executable, "-m", "gaze_edge.cli", "quantize", str(tmp_path / "src"), "-o",
                             str(tmp_path / "q"), "--held-out", str(tmp_path)], capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == rc, result.stderr
    line = one_line_error(result.stderr)
    assert message in line and "not installed" not in line, line
    assert not (tmp_path / "q").exists()


# ------------------------------------------------------------------------- exit codes


def _interrupted_import() -> BackendError:
    try:
        try:
            raise ImportError("initialization failed") from KeyboardInterrupt()
        except ImportError as exc:  # what runtime/backend.py's guarded import turns it into
            raise BackendError("onnxruntime is not installed: pip install onnxruntime") from exc
    except BackendError as exc:
        return exc


@pytest.mark.parametrize("error, rc, message", [
    (InputError("the input is bad; fix it"), 2, "gaze: error: the input is bad; fix it"),
    (RunError("validation failed"), 1, "gaze: error: validation failed"),
    (ExportFailedError("decoder.onnx fails onnx.checker"), 1, "gaze: error: decoder.onnx fails onnx.checker"),
    (InputError("two\nlines"), 2, "gaze: error: two lines"),
    (OSError(28, "No space left on device"), 1, "gaze: error: [Errno 28] No space left on device"),
    (MemoryError(), 1, "gaze: error: out of memory"),
    (KeyboardInterrupt(), 130, "gaze: interrupted (SIGINT)"),
    (atomic.Interrupted(signal.SIGTERM), 143, "gaze: interrupted (SIGTERM)"),
    (atomic.Interrupted(signal.SIGHUP), 129, "gaze: interrupted (SIGHUP)"),
    (_interrupted_import(), 130, "gaze: interrupted (SIGINT)"),
], ids=["usage", "run", "export-check", "newline", "disk-full", "memory", "ctrl-c", "sigterm", "sighup",
        "import-interrupted"])
def test_exit_codes(error: BaseException, rc: int, message: str, tmp_path: Path, monkeypatch, capsys):
    def command(args):  # type: ignore[no-untyped-def]
        raise error

    monkeypatch.setattr(gaze_cli, "_scenes", command)
    assert gaze_main(["scenes", "-o", str(tmp_path / "s")]) == rc
    assert one_line_error(capsys.readouterr().err).startswith(message)


# ------------------------------------------------------------------------- folder modes


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_output_folders_get_the_mode_of_a_new_folder(umask: int, tmp_path: Path):
    previous = os.umask(umask)
    try:
        tmp = Path(tempfile.mkdtemp(dir=tmp_path))  # 0700, as tempfile makes it
        atomic.move_folder_into_place(tmp, tmp_path / "out", RunError, "the test folder")
        assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~umask
        atomic.replace_file(tmp_path / "out" / "new.json", b"{}")
        assert (tmp_path / "out" / "new.json").stat().st_mode & 0o777 == 0o666 & ~umask
    finally:
        os.umask(previous)
    kept = tmp_path / "out" / "kept.json"
    kept.write_text("{}")
    kept.chmod(0o640)
    atomic.replace_file(kept, b"{ }")
    assert kept.stat().st_mode & 0o777 == 0o640 and kept.read_bytes() == b"{ }"


def test_the_session_export_is_readable_by_others(runtime_export):
    assert runtime_export[1].stat().st_mode & 0o777 == 0o777 & ~atomic.current_umask()


# ------------------------------------------------------------------------- install metadata


def test_install_metadata():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"  # SPDX string: no deprecation warning per install
    assert any(r.startswith("setuptools>=77") for r in project["build-system"]["requires"])
    assert any(d.startswith("tqdm") for d in project["project"]["dependencies"])  # imported by calibrate, quantize
    targets = re.findall(r"^test[\w-]*:.*\n\t(.*)$", (ROOT / "Makefile").read_text(), flags=re.M)
    assert len(targets) == 2 and all("pytest" in t and " -rs" in t for t in targets)
