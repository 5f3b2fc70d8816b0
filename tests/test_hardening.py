"""Bad input: one line and the documented exit code, never a traceback; nothing half-written; nothing read from outside.

One section per class of issue 15 (rules: docs/CLI.md): arguments checked while parsing, sampling
values, text that is not UTF-8, config sizes against this machine, the export folder as a sandbox,
image folders (pixel budget, streaming), SIGTERM / SIGHUP / SIGINT at work, interrupted imports and
missing extras, exit codes, folder modes, install metadata.
"""

from __future__ import annotations

import contextlib
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
CAL = ["calibrate", "{E}", "--calib", "{D}"]
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
    (["caption", "{E}"], "nothing to caption: give IMAGE files or --video FILE"),
    (["profile", "{E}", "--batch", "0"], "--batch: must be an integer in 1 .. 4096"),
    (["profile", "{E}", "--max-new-tokens", "0"], "--max-new-tokens: must be an integer in 1 .."),
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
    ([*CAL, "--calib-count", "0"], "--calib-count: must be an integer >= 1"),
    ([*CAL, "--batch", "0"], "--batch: must be an integer in 1 .. 4096"),
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
    (["build", "{E}", "--engine-dir", "{T}/file.txt"], "--engine-dir: {T}/file.txt exists and is not a folder"),
    (["convert", "{C}", "-o", "{T}/g", "--region-size", "0x3", "--gaze-top-k", "2"], "--region-size: expected RHxRW"),
    (["convert", "{C}", "-o", "{T}/g", "--region-size", "3x3", "--gaze-top-k", "0"],
     "--gaze-top-k: top_k values must be >= 1"),
    (["convert", "{C}", "-o", "{T}/g", "--region-size", "3x3", "--gaze-top-k", "2", "--context-tokens", "-1"],
     "--context-tokens: must be an integer in 0 .. 256, got -1"),
    (["convert", "{C}", "-o", "{T}/g", "--region-size", "3x3", "--gaze-top-k", "2", "--image-size", "0"],
     "--image-size: must be an integer in 1 .. 8192, got 0"),
    (["serve", "{E}", "--port", "70000"], "--port: must be an integer in 0 .. 65535, got 70000"),
    (["serve", "{E}", "--max-queue", "-1"], "--max-queue: must be an integer >= 0, got -1"),
    (["serve", "{E}", "--max-new-tokens", "0"], "--max-new-tokens: must be an integer in 1 .."),
    (["chat", "{E}", "--capacity", "0"], "--capacity: must be an integer >= 1, got 0"),
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


@pytest.mark.parametrize("threads", [0, -1, -4, 1025, True, 2.0])
def test_the_python_api_refuses_bad_thread_counts(export_copy: Path, threads):
    """0 used to mean the default silently and negatives reached ONNX Runtime; None is the default."""
    from gaze_edge.calibrate import quantize as qz
    from gaze_edge.runtime.backend import OrtBackend, create_backend
    from gaze_edge.runtime.generate import GazeRuntime

    folder = ExportFolder.open(export_copy)
    message = re.escape(f"threads must be None (ONNX Runtime's default) or an integer in 1 .. 1024, got {threads!r}")
    with pytest.raises(InputError, match=message):
        OrtBackend(folder, threads=threads)
    with pytest.raises(InputError, match=message):
        GazeRuntime.load(export_copy, threads=threads)
    with pytest.raises(InputError, match=message):  # the TensorRT backend too, before TensorRT is looked for
        create_backend("tensorrt", folder, threads=threads)
    with pytest.raises(InputError, match=message):  # before any image is read
        qz.check_options(qz.QuantizeOptions(held_out=export_copy, threads=threads))
    assert OrtBackend(folder, threads=None).decoder is not None  # the default
    assert OrtBackend(folder, threads=1).decoder.get_session_options().intra_op_num_threads == 1


@pytest.mark.parametrize("argv, message", [
    (["--max-batch", "0"], "--max-batch: must be an integer in 1 .. 4096, got 0"),
    (["--max-batch", "4097"], "--max-batch: must be an integer in 1 .. 4096, got 4097"),
    (["--max-prefill", "2.5"], "--max-prefill: expected an integer, got '2.5'"),
    (["--workspace-mib", "-1"], "--workspace-mib: must be an integer in 1 .."),
    (["--engine-dir", "{T}/file.txt"], "--engine-dir: {T}/file.txt exists and is not a folder"),
])
def test_the_build_parser_checks_its_own_arguments(argv, message, tmp_path: Path, capsys):
    """The types live in add_build_parser itself (no retyping in gaze_edge/cli.py): any parser that adds it checks."""
    from gaze_edge import cli_args as ca
    from gaze_edge.export.trt_build import add_build_parser

    (tmp_path / "file.txt").write_text("a file")
    parser = ca.GazeArgumentParser(prog="gaze")
    add_build_parser(parser.add_subparsers(dest="command", required=True))
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["build", str(tmp_path), *(a.format(T=tmp_path) for a in argv)])
    assert info.value.code == 2
    assert message.format(T=tmp_path) in one_line_error(capsys.readouterr().err)
    assert not hasattr(gaze_cli.ca, "retype")


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


def test_json_files_are_read_as_utf8_whatever_the_locale(tmp_path: Path):
    """JSON is UTF-8 (RFC 8259): under LC_ALL=C, no UTF-8 mode, a non-ASCII config still reads; bad bytes are named."""
    good = tmp_path / "good.json"
    good.write_bytes('{"caption": "caf\u00e9 \u2192 ok"}'.encode())
    bad = tmp_path / "bad.json"
    bad.write_bytes(b'{"caption": "caf\xe9"}')
    code = ("import sys\nfrom pathlib import Path\nfrom gaze_edge.errors import InputError\n"
            "from gaze_edge.jsonfile import read_json_object\n"
            "print(read_json_object(Path(sys.argv[1]), InputError, 'fix it')['caption'].encode('unicode_escape'))\n"
            "try:\n    read_json_object(Path(sys.argv[2]), InputError, 'fix it')\n"
            "except InputError as exc:\n    print(exc)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "LANG", "PYTHONUTF8"))}
    result = subprocess.run([sys.executable, "-X", "utf8=0", "-c", code, str(good), str(bad)], capture_output=True,
                            text=True, env={**env, "LC_ALL": "C"}, timeout=120)
    assert result.returncode == 0, result.stderr
    first, second = result.stdout.splitlines()
    assert first == r"b'caf\\xe9 \\u2192 ok'", first
    assert second == f"{bad} is not valid JSON: not UTF-8 text (byte 16); fix it", second


def test_an_unreadable_json_file_is_named(tmp_path: Path):
    from gaze_edge.jsonfile import read_json_object

    folder = tmp_path / "config.json"
    folder.mkdir()  # a folder where the file should be: OSError, one message
    with pytest.raises(InputError, match=r"cannot read .*config.json \(Is a directory\); fix it"):
        read_json_object(folder, InputError, "fix it")


def test_a_prompts_file_that_is_not_utf8_is_refused_by_calibrate(export_copy: Path, runtime_export, scenes_dir,
                                                                 tmp_path: Path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(BAD_UTF8)
    before = listing(export_copy)
    assert gaze_main(["calibrate", str(export_copy), "--calib", str(scenes_dir), "--prompts", str(prompts),
                      "--checkpoint", str(runtime_export[0])]) == 2
    assert "is not valid UTF-8 text" in one_line_error(capsys.readouterr().err)
    assert listing(export_copy) == before


@pytest.mark.parametrize("prompt", ["stop <eos> now", "describe <image> .", "<assistant> a red circle"])
def test_special_token_strings_typed_in_a_prompt_are_refused(export_copy: Path, tmp_path: Path, prompt: str,
                                                             capsys):
    image = tmp_path / "a.png"
    Image.new("RGB", (48, 48)).save(image)
    gaze_map = tmp_path / "map.png"
    assert gaze_main(["caption", str(export_copy), str(image), "--prompt", prompt, "--gaze-map", str(gaze_map)]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "contains the special token" in line and "cannot be typed in a prompt" in line, line
    assert not gaze_map.exists()


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
    (lambda c: (c["gaze"].update(max_images=2**26),
                c["model"]["decoder"]["descriptors"].update(num_regions=c["gaze"]["regions_per_image"] * 2**26)),
     "this machine has"),
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
    assert gaze_main(["profile", str(export_copy), "--batch", "4096", "--max-new-tokens", str(1 << 20)]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "4096 sequence(s)" in line and "this machine has" in line, line


def test_profile_project_layers_needs_the_per_layer_weight_bytes(export_copy: Path, capsys):
    """An export made before gaze_config.json recorded model.decoder.weights: refused before any run."""
    edit_config(export_copy, lambda c: c["model"]["decoder"].pop("weights"))
    assert gaze_main(["profile", str(export_copy), "--project-layers", "36"]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "does not record its per-layer weight bytes" in line and "re-run `gaze export`" in line, line


def test_the_cache_plan_refuses_what_this_machine_cannot_hold(export_copy: Path):
    """CacheSpec.plan itself (so every Python caller, not only `gaze caption`) refuses before a byte is allocated."""
    import dataclasses

    from gaze_edge.runtime.cache import CacheSpec

    shape = dataclasses.replace(ExportFolder.open(export_copy).shape, max_seq_len=2**31 - 1)
    with pytest.raises(InputError, match=r"4096 sequence\(s\) of 2147483647 cache slots need .* GiB of KV cache, "
                                         r"descriptors and layout tables; this machine has .* GiB"):
        CacheSpec.plan(shape, 4096, 2**31 - 1)
    spec = CacheSpec.plan(shape, 2, 100)
    assert spec.total_bytes == spec.kv_bytes + spec.desc_bytes + spec.slot_bytes


def test_the_python_api_refuses_a_cache_beyond_this_machine_before_allocating(export_copy: Path, monkeypatch,
                                                                             tmp_path: Path):
    from gaze_edge.runtime import cache
    from gaze_edge.runtime.generate import GazeRuntime

    rt = GazeRuntime.load(export_copy, threads=1)
    image = tmp_path / "a.png"
    Image.new("RGB", (48, 48)).save(image)

    def allocate(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("the cache was allocated")

    monkeypatch.setattr(rt.backend, "allocate", allocate)
    monkeypatch.setattr(cache, "total_memory_bytes", lambda: 64 * 2**10)  # a machine of 64 KiB
    with pytest.raises(InputError, match=r"1 sequence\(s\) of \d+ cache slots need .*; this machine has 0.0 GiB"):
        rt.caption(str(image))


def _huge_checkpoint(runtime_export, folder: Path) -> Path:
    shutil.copytree(runtime_export[0], folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_size=65536, intermediate_size=262144, num_hidden_layers=96, vocab_size=1_000_000)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_load_checkpoint_refuses_a_model_beyond_this_machine_before_allocating(runtime_export, tmp_path: Path,
                                                                              monkeypatch):
    from gaze_edge.model import checkpoint

    ckpt = _huge_checkpoint(runtime_export, tmp_path / "huge")

    def build(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("the model was built")

    monkeypatch.setattr(checkpoint, "GazeForConditionalGeneration", build)
    for load in (checkpoint.load_config, checkpoint.load_checkpoint):
        with pytest.raises(checkpoint.CheckpointError, match=r"config.json describes a model of at least \d+\.\d GiB "
                                                             r"of fp32 weights; this machine has"):
            load(ckpt)


def test_the_model_loader_does_not_import_the_cli():
    """model/checkpoint.py takes the memory rule from gaze_edge/memory.py (standard library only), not cli_args."""
    code = ("import sys\nimport gaze_edge.model.checkpoint\n"
            "print(sorted(m for m in ('gaze_edge.cli', 'gaze_edge.cli_args') if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout


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


BUILD_SANDBOX = [
    SANDBOX[1],  # decoder.onnx a link out of the folder
    ("absolute decoder", lambda f, o: edit_config(f, lambda c: c["model"]["decoder"].update(
        filename=str(f / "decoder.onnx"))), "an absolute path or one with '..'"),
    SANDBOX[5],  # ../export/decoder.onnx
    SANDBOX[6],  # sub/../vision.onnx
]


@pytest.mark.parametrize("case, damage, message", BUILD_SANDBOX, ids=[c for c, _, _ in BUILD_SANDBOX])
def test_gaze_build_opens_graphs_only_inside_the_export_folder(export_copy: Path, tmp_path: Path, case, damage,
                                                                message):
    from gaze_edge.export import trt_build as tb

    outside = tmp_path / "outside"
    outside.mkdir()
    damage(export_copy, outside)
    config = json.loads((export_copy / "gaze_config.json").read_text())
    with pytest.raises(ExportFolderError, match=re.escape(message)):
        for part in ("decoder", "vision"):
            tb.graph_file(export_copy, config, part)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["model"].update(hidden_size=1e30), "hidden_size must be an integer, got 1e+30"),
    (lambda c: c["model"].update(num_key_value_heads=True), "num_key_value_heads must be an integer, got True"),
    (lambda c: c["gaze"].update(max_images=2**40), "max_images must be in 1 .. 2147483647, got 1099511627776"),
    (lambda c: c["model"].update(head_dim=0), "head_dim must be in 1 .. 2147483647, got 0"),
])
def test_gaze_build_checks_the_sizes_it_reads(export_copy: Path, edit, message: str):
    from gaze_edge.export import trt_build as tb

    edit_config(export_copy, edit)
    config = json.loads((export_copy / "gaze_config.json").read_text())
    with pytest.raises(tb.EngineBuildError, match=re.escape(message)):
        tb.shapes_from_config(config, max_batch=1, max_prefill=16)


def test_gaze_build_reads_gaze_config_like_every_json_file(export_copy: Path, monkeypatch, capsys):
    """Not UTF-8, not JSON, not an object: one line, exit 2, before TensorRT is looked for; nothing written."""
    from gaze_edge.export import trt_build as tb

    def no_tensorrt():  # type: ignore[no-untyped-def]
        raise AssertionError("TensorRT was looked for")

    monkeypatch.setattr(tb, "import_tensorrt", no_tensorrt)
    before = listing(export_copy)
    for data, message in [(b'{"gaze": "\xff"}', "is not valid JSON: not UTF-8 text (byte 10)"),
                          (b"{not json", "is not valid JSON (Expecting property name"),
                          (b"[1, 2]", "must hold a JSON object"), (b'{"gaze": [1]}', "plugin version ?")]:
        (export_copy / "gaze_config.json").write_bytes(data)
        assert gaze_main(["build", str(export_copy)]) == 2
        line = one_line_error(capsys.readouterr().err)
        assert "gaze_config.json" in line or "plugin version" in line, line
        assert message in line, line
    assert listing(export_copy) == before


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


def test_calibrate_refuses_a_folder_over_the_budget_with_a_flat_peak(runtime_export, export_copy: Path,
                                                                      tmp_path: Path):
    """calibrate --calib: 32 x 64 MP bombs refused from their headers; the peak is that of a one-image refusal."""
    bombs = huge_compressed_folder(tmp_path / "bombs", 32, 8000)
    small = huge_compressed_folder(tmp_path / "small", 1, 16)
    code = (f"import sys\n{PEAK_RSS}\nfrom gaze_edge.cli import main\n"
            "export, ckpt, small, bombs = sys.argv[1:]\n"
            "base = ['calibrate', export, '--checkpoint', ckpt]\n"
            "rc0 = main(base + ['--calib', small, '--max-total-pixels', '1'])\n"  # same path, same imports
            "p0 = peak_rss()\nrc1 = main(base + ['--calib', bombs])\n"
            "print('rss', rc0, rc1, p0, peak_rss(), file=sys.stderr)\n")
    before = listing(export_copy)
    result = subprocess.run([sys.executable, "-c", code, str(export_copy), str(runtime_export[0]), str(small),
                             str(bombs)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    errors = [x for x in result.stderr.splitlines() if x.startswith("gaze: error:")]
    assert len(errors) == 2 and "Traceback" not in result.stderr, result.stderr
    assert "its 32 images hold 2,048,000,000 pixels in all, more than the budget of 2,000,000,000 " \
        "(--max-total-pixels)" in errors[1], errors[1]
    rc0, rc1, p0, p1 = map(int, next(x for x in result.stderr.splitlines() if x.startswith("rss")).split()[1:])
    assert (rc0, rc1) == (2, 2)
    assert p1 - p0 < 64 * 2**20, (p0, p1)  # one decoded bomb would be 192 MB, all of them 6 GB
    assert listing(export_copy) == before


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
    assert "its 4 images hold 16,384 pixels in all, more than the budget of 5,000 (--max-total-pixels)" in line, line
    assert not out.exists() and leftovers(tmp_path) == []
    before = listing(export_copy)
    assert gaze_main(["calibrate", str(export_copy), "--calib", str(scenes_dir), "--checkpoint",
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
                         "--validate-scenes", "1"], "[2/6]", signal.SIGTERM, stream="stderr")  # progress: stderr
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
    rc, err = signal_at(["calibrate", str(export_copy), "--calib", str(scenes_dir), "--checkpoint",
                         str(runtime_export[0]), "--batch", "2", "--max-new-tokens", "8"], "[2/5]",
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
                         "--validate-scenes", "1"], f"[{stage}/6]", signal.SIGTERM, stream="stderr")
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
    rc, err = signal_at(["calibrate", str(export_copy), "--calib", str(scenes_dir), "--checkpoint",
                         str(runtime_export[0]), "--batch", "2", "--max-new-tokens", "8", "--held-out",
                         str(scenes_dir)], f"[{stage}/5]", signal.SIGTERM, stream="stderr")  # [4/5]: held-out
    assert rc in (0, 143) and "Traceback" not in err, err
    assert not [p for p in listing(export_copy) if p.endswith(".tmp")]
    after = {p: (export_copy / p).read_bytes() for p in listing(export_copy) if (export_copy / p).is_file()}
    if stage < 5:
        assert rc == 143 and after == before, err
    else:  # at the write: both files old or both new (one held section), so the runtime loads it either way
        GazeRuntime.load(export_copy, threads=1)


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


def _files(folder: Path) -> dict[str, bytes]:
    return {p: (folder / p).read_bytes() for p in listing(folder) if (folder / p).is_file()}


def _temps(folder: Path) -> list[str]:
    return [p for p in listing(folder) if p.endswith(".tmp")]


def test_a_signal_during_the_calibrate_rewrite_lands_after_both_files(export_copy: Path, monkeypatch):
    """write_top_k renames decoder.onnx and gaze_config.json in one held section: never one new, one old."""
    from gaze_edge.calibrate import budget
    from gaze_edge.runtime.generate import GazeRuntime

    folder = ExportFolder.open(export_copy)
    new = [1] * folder.shape.num_layers
    real_replace, renamed = os.replace, []

    def replace_then_signal(a, b):  # type: ignore[no-untyped-def]
        real_replace(a, b)
        renamed.append(Path(b).name)
        if len(renamed) == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # lands between the two renames
            time.sleep(0.01)

    monkeypatch.setattr(atomic.os, "replace", replace_then_signal)
    with atomic.signals_interrupt(), pytest.raises(atomic.Interrupted):
        budget.write_top_k(folder, new, {"test": True})
    monkeypatch.undo()
    assert renamed == ["decoder.onnx", "gaze_config.json"] and _temps(export_copy) == []
    assert ExportFolder.open(export_copy).shape.top_k_per_layer == tuple(new)
    GazeRuntime.load(export_copy, threads=1)  # both new: the copies agree


@pytest.mark.parametrize("failure", ["sigterm", "disk-full"])
def test_an_interrupt_or_full_disk_while_writing_changes_neither_calibrate_file(export_copy: Path, monkeypatch,
                                                                                failure: str):
    """Both temp files are written before either is renamed: a failure while writing the second changes nothing."""
    from gaze_edge.calibrate import budget

    before = _files(export_copy)
    folder = ExportFolder.open(export_copy)
    real_fsync, calls = os.fsync, []

    def fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 2:  # the second file: gaze_config.json
            if failure == "disk-full":
                raise OSError(28, "No space left on device")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)
        real_fsync(fd)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    with atomic.signals_interrupt(), pytest.raises(atomic.Interrupted if failure == "sigterm" else OSError):
        budget.write_top_k(folder, [1] * folder.shape.num_layers, {"test": True})
    assert len(calls) == 2 and _files(export_copy) == before and _temps(export_copy) == []


def test_quantize_cleans_up_with_the_shared_partial_folder(runtime_export, scenes_dir: Path, tmp_path: Path,
                                                           monkeypatch):
    """quantize_export builds in atomic.partial_folder (no cleanup of its own): SIGTERM mid-write leaves nothing."""
    from gaze_edge.calibrate import quantize as qz

    used = []

    @contextlib.contextmanager
    def partial_folder(out, error):  # type: ignore[no-untyped-def]
        with atomic.partial_folder(out, error) as tmp:
            used.append((out, error))
            yield tmp

    def quantize_into(tmp, *args, **kwargs):  # type: ignore[no-untyped-def]
        (tmp / "decoder.onnx").write_bytes(b"half written")
        raise atomic.Interrupted(signal.SIGTERM)

    monkeypatch.setattr(qz, "partial_folder", partial_folder)
    monkeypatch.setattr(qz, "_quantize_into", quantize_into)
    out = tmp_path / "q"
    with pytest.raises(atomic.Interrupted):
        qz.quantize_export(runtime_export[1], out, qz.QuantizeOptions(held_out=scenes_dir))
    assert used == [(out, qz.QuantizeError)]
    assert not out.exists() and leftovers(tmp_path) == []
    out.mkdir()
    (out / "keep.txt").write_text("the previous output")
    with pytest.raises(atomic.Interrupted):
        qz.quantize_export(runtime_export[1], out, qz.QuantizeOptions(held_out=scenes_dir, force=True))
    assert listing(out) == ["keep.txt"] and leftovers(tmp_path) == []


def test_sigterm_mid_convert_leaves_nothing_and_keeps_an_old_output(tmp_path: Path, monkeypatch):
    """`gaze convert` writes through the shared partial_folder: a signal while writing leaves nothing beside DST."""
    from gaze_edge.model import convert as cv

    def write_converted(converted, tmp, src):  # type: ignore[no-untyped-def]
        (tmp / "model.safetensors").write_bytes(b"half written")
        raise atomic.Interrupted(signal.SIGTERM)

    monkeypatch.setattr(cv, "convert", lambda src, options: object())  # the conversion itself: test_convert.py
    monkeypatch.setattr(cv, "write_converted", write_converted)
    out = tmp_path / "gaze-ckpt"
    with pytest.raises(atomic.Interrupted):
        cv.convert_checkpoint(tmp_path / "src", out, cv.ConvertOptions(region_size=(3, 3), top_k=2))
    assert not out.exists() and leftovers(tmp_path) == []
    out.mkdir()
    (out / "keep.txt").write_text("the previous checkpoint")
    with pytest.raises(atomic.Interrupted):
        cv.convert_checkpoint(tmp_path / "src", out, cv.ConvertOptions(region_size=(3, 3), top_k=2), force=True)
    assert listing(out) == ["keep.txt"] and leftovers(tmp_path) == []


class _Anything:
    """Stands in for TensorRT builder objects: every method accepts anything and returns another stand-in."""

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return lambda *args, **kwargs: _Anything()


class _Builder(_Anything):
    def build_serialized_network(self, network, config):  # type: ignore[no-untyped-def]
        return b"engine v2" * 1000


@pytest.mark.parametrize("signum", [None, signal.SIGTERM, signal.SIGHUP], ids=["done", "SIGTERM", "SIGHUP"])
def test_an_engine_is_replaced_atomically(tmp_path: Path, monkeypatch, signum):
    """`gaze build` writes each engine with atomic.replace_file: no .tmp and no half engine left by a signal."""
    import argparse
    import types

    from gaze_edge.export import trt_build as tb

    engine = tmp_path / "decoder.engine"
    engine.write_bytes(b"engine v1")
    trt = types.SimpleNamespace(MemoryPoolType=types.SimpleNamespace(WORKSPACE=0),
                                BuilderFlag=types.SimpleNamespace(FP16=1))
    args = argparse.Namespace(workspace_mib=16, no_fp16=False)
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        real_fsync(fd)
        if signum is not None:
            os.kill(os.getpid(), signum)  # while the new engine is written, before its rename
            time.sleep(0.01)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    with atomic.signals_interrupt():
        if signum is None:
            tb._build_engine(trt, _Builder(), None, [{"x": ((1,), (1,), (1,))}], None, args, engine)
        else:
            with pytest.raises(atomic.Interrupted):
                tb._build_engine(trt, _Builder(), None, [{"x": ((1,), (1,), (1,))}], None, args, engine)
    assert engine.read_bytes() == (b"engine v2" * 1000 if signum is None else b"engine v1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["decoder.engine"]  # no decoder.tmp, no temp file


# ------------------------------------------------------------------------- interrupted imports, missing extras


@pytest.mark.parametrize("argv, blocked", [
    (["export", "{T}/ckpt", "-o", "{T}/out"], "torch"),
    (["calibrate", "{T}/export", "--calib", "{T}"], "torch"),
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


def test_docs_stand_alone_in_the_repository():
    """Every relative link of README.md and docs/*.md resolves inside this repository (a clone has no ../shared/)
    and no user doc carries notes addressed to the project's own workers."""
    link = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
    broken, notes = [], []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = doc.read_text(encoding="utf-8")
        for target in link.findall(text):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
                continue
            path = (doc.parent / target).resolve()
            if not path.exists() or not path.is_relative_to(ROOT):
                broken.append(f"{doc.name}: {target}")
        notes += [f"{doc.name}: {m}" for m in re.findall(r"(?i)\bthe lead\b[^.]*", text)]
    assert broken == [] and notes == [], (broken, notes)
