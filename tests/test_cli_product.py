"""The runtime as a product (#14): `gaze caption --video`, `gaze profile` on the bench machinery, power
telemetry, and one flag vocabulary (docs/CLI.md) with defaults in --help, --version, -v/-q and no
BrokenPipeError when the reader of stdout goes away."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gaze_edge import console
from gaze_edge.cli import build_parser
from gaze_edge.cli import main as gaze_main
from gaze_edge.model import scenes
from gaze_edge.runtime import GazeRuntime, Prompt, SamplingConfig, telemetry
from gaze_edge.runtime.media import load_video, sample_indices
from gaze_edge.runtime.profile import format_table, gpu_memory
from tests.test_media import needs_av, write_video

REPO = Path(__file__).resolve().parent.parent


def scene_frames(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [scenes.render(scenes.sample_scene(rng, held_out=True), 48, rng)[0] for _ in range(n)]


@pytest.fixture(scope="module")
def rt(runtime_export) -> GazeRuntime:
    return GazeRuntime.load(runtime_export[1], threads=1)


# ------------------------------------------------------------------------ gaze caption --video


@needs_av
def test_caption_video_samples_frames_evenly_and_captions_them_as_frames(rt, runtime_export, tmp_path, capsys):
    shots = scene_frames(4, seed=21)
    clip = tmp_path / "clip.mp4"
    write_video(clip, [s for s in shots for _ in range(6)])  # 24 frames, 4 shots of 6
    report = tmp_path / "caption.json"
    argv = ["caption", str(runtime_export[1]), "--video", str(clip), "--frames", "4", "--threads", "1"]
    assert gaze_main([*argv, "--json", str(report)]) == 0
    out = capsys.readouterr()
    got = json.loads(report.read_text())
    assert got["video"]["indices"] == sample_indices(24, 4).tolist() == [0, 6, 12, 18]
    assert got["video"]["total_frames"] == 24 and "4 of 24 frames" in out.err
    assert out.out.strip() == got["caption"]  # the text streamed, the JSON to the file
    # The same frames given as an API video prompt: token for token.
    frames = load_video(clip, 4).frames
    want = rt.generate(Prompt(None, frames, frames=True), SamplingConfig(max_new_tokens=32))
    row = want.tokens[0].tolist()
    eos = rt.folder.tokens.eos
    assert got["tokens"] == (row[: row.index(eos)] if eos in row else row)
    assert got["caption"] == want.texts[0]
    # ... and as pre-extracted frame files with --as-frames (PNG: the same pixels).
    files = []
    for i, frame in enumerate(frames):
        files.append(tmp_path / f"f{i}.png")
        frame.save(files[-1])
    assert gaze_main(["caption", str(runtime_export[1]), *map(str, files), "--as-frames", "--threads", "1",
                      "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == got["tokens"]


@pytest.mark.parametrize(("extra", "message"), [
    ([], "nothing to caption: give IMAGE files or --video FILE"),
    (["{I}", "--video", "{V}"], "give IMAGE files or --video FILE, not both"),
    (["{I}", "--frames", "2"], "--frames N samples frames from --video FILE"),
    (["--video", "{V}", "--as-frames"], "--as-frames is for IMAGE files"),
    (["{I}", "--frames"], "--frames: expected one argument"),  # a count, never a switch
])
def test_caption_refuses_ambiguous_inputs_as_usage_errors(runtime_export, tmp_path, capsys, extra, message):
    image = tmp_path / "a.png"
    Image.fromarray(scene_frames(1, 3)[0]).save(image)
    argv = [a.replace("{I}", str(image)).replace("{V}", str(tmp_path / "clip.mp4")) for a in extra]
    assert gaze_main(["caption", str(runtime_export[1]), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gaze caption: error: ") and message in err and err.endswith("see gaze caption --help")


# ------------------------------------------------------------------------------------ gaze profile


@pytest.fixture(scope="module")
def profiled(runtime_export, tmp_path_factory) -> tuple[dict, str, str, Path]:
    tmp = tmp_path_factory.mktemp("profile")
    out = subprocess.run(
        [sys.executable, "-m", "gaze_edge.cli", "profile", str(runtime_export[1]), "--frames", "2", "--batch", "2",
         "--max-new-tokens", "5", "--warmup", "1", "--repeats", "3", "--threads", "1",
         "--json", str(tmp / "p.json"), "--plot", str(tmp / "p.png")],
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr
    return json.loads((tmp / "p.json").read_text()), out.stdout, out.stderr, tmp / "p.png"


def test_profile_warms_up_repeats_and_reports_medians_and_p90_per_stage(profiled):
    report, _, err, _ = profiled
    assert report["warmup"] == 1 and report["repeats"] == 3 and report["batch"] == 2 and report["frames"] == 2
    assert set(report["measured"]) == {"gaze", "dense"} and report["dense"] == "same export, gaze off"
    for mode in ("gaze", "dense"):
        m = report["measured"][mode]
        for stage in ("vision_ms", "prefill_ms", "ttft_ms", "request_ms"):
            assert m[stage]["n"] == 3 and 0 < m[stage]["median_ms"] <= m[stage]["p90_ms"], (mode, stage)
        decode = m["decode_ms_per_token"]
        assert decode["n"] == 3 * 4  # every decode step of every timed run (5 tokens: 4 decode steps)
        per_seq = m["decode_tokens_per_s_per_sequence"]
        assert per_seq == pytest.approx(1e3 / decode["median_ms"])
        assert m["decode_tokens_per_s_total"] == pytest.approx(2 * per_seq)  # batch 2, labelled apart
    assert "1 warm-up" in err and "3 timed generation(s) per mode" in err  # progress on stderr


def _cells(table: str, label: str) -> list[str]:
    line = next(line for line in table.splitlines() if line.startswith(label + "  "))
    return re.split(r"\s{2,}", line.strip())[1:]


def test_profile_table_and_json_agree(profiled):
    report, table, _, _ = profiled
    assert format_table(report) == table.rstrip("\n")  # the table is the JSON, formatted
    m = report["measured"]
    assert _cells(table, "decode tok/s in total (batch 2)") == [f"{m[k]['decode_tokens_per_s_total']:.1f}"
                                                                 for k in ("gaze", "dense")]
    assert _cells(table, "decode tok/s per sequence") == [f"{m[k]['decode_tokens_per_s_per_sequence']:.1f}"
                                                           for k in ("gaze", "dense")]
    for label, key in (("time to first token", "ttft_ms"), ("decode / token", "decode_ms_per_token")):
        assert _cells(table, label) == [f"{m[k][key]['median_ms']:.2f} ({m[k][key]['p90_ms']:.2f}) ms"
                                        for k in ("gaze", "dense")]
    kv = report["kv_bytes_per_step"]
    assert _cells(table, "KV bytes read / step") == [f"{kv['gaze']:,}", f"{kv['dense']:,}"]
    board = report["roofline_projection"]["boards"]["AGX Orin 64GB"]
    assert _cells(table, "projection AGX Orin 64GB") == [f"{board[k]['tokens_per_s_total']:.0f} tok/s"
                                                          for k in ("gaze", "dense")]


def test_profile_projection_is_apart_and_includes_launch_overhead(profiled, runtime_export):
    report, table, _, plot = profiled
    proj = report["roofline_projection"]
    assert proj["note"].startswith("PROJECTION, not measured")
    overhead = proj["launch_overhead_us_per_token"]
    assert overhead == 30 + (10 * 4 + 4) * 2.0  # host part + kernels x 2 us, gaze-tiny's 4 layers
    for board in proj["boards"].values():
        for mode in ("gaze", "dense"):
            r = board[mode]
            assert r["step_ms"] == pytest.approx(r["memory_ms"] + overhead / 1e3)
            assert r["tokens_per_s_total"] == pytest.approx(2 / (r["step_ms"] / 1e3))
            assert r["tokens_per_s_total"] < r["bandwidth_bound_tokens_per_s_total"]
    assert "PROJECTION, not measured" in table and f"{overhead:.0f} us per token" in table
    assert Image.open(plot).size[0] > 1000  # three panels (looked at: docs/RUNTIME.md)


def test_profile_says_what_telemetry_is_absent(profiled):
    report, table, _, _ = profiled
    if "absent" in report["power"]:
        for looked in ("NVML", "INA3221", "tegrastats"):
            assert looked in report["power"]["absent"]
        assert _cells(table, "power")[0].startswith("absent: looked for")
    if "absent" in report["gpu"]:
        assert _cells(table, "gpu (NVML)")[0] == "absent: " + report["gpu"]["absent"]


def test_profile_old_flag_spelling_still_works_and_is_noted(runtime_export, capsys):
    assert gaze_main(["profile", str(runtime_export[1]), "--new-tokens", "2", "--no-dense", "--warmup", "0",
                      "--repeats", "1", "--threads", "1", "--json", "-"]) == 0
    out = capsys.readouterr()
    report = json.loads(out.out)  # stdout is the JSON alone
    assert report["new_tokens"] == 2 and list(report["measured"]) == ["gaze"]
    assert "--new-tokens is now --max-new-tokens" in out.err
    assert gaze_main(["profile", str(runtime_export[1]), "-q", "--max-new-tokens", "2", "--no-dense", "--warmup",
                      "0", "--repeats", "1", "--threads", "1"]) == 0
    out = capsys.readouterr()
    assert out.err == "" and "time to first token" in out.out  # -q: results only


# ------------------------------------------------------------------------------------ telemetry


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def test_ina3221_rails_from_hwmon_and_the_old_iio_driver(tmp_path):
    hw = tmp_path / "class/hwmon/hwmon3"
    _write(hw / "name", "ina3221")
    for n, label, mv, ma in ((1, "VDD_IN", 5000, 1200), (2, "VDD_CPU_GPU_CV", 5000, 300)):
        _write(hw / f"in{n}_label", label)
        _write(hw / f"in{n}_input", str(mv))
        _write(hw / f"curr{n}_input", str(ma))
    _write(hw / "in7_label", "sum of shunt voltages")  # no current: not a rail
    _write(hw / "in7_input", "40")
    _write(tmp_path / "class/hwmon/hwmon0/name", "acpitz")
    iio = tmp_path / "bus/i2c/drivers/ina3221x/1-0040/iio:device0"
    _write(iio / "in_power0_input", "1234")
    _write(iio / "rail_name_0", "VDD_SYS_GPU")
    rails = {r.name: r.read() for r in telemetry.find_rails(tmp_path)}
    assert rails == {"VDD_IN": 6000.0, "VDD_CPU_GPU_CV": 1500.0, "VDD_SYS_GPU": 1234.0}
    with telemetry.PowerSampler(interval_s=0.01, sys_root=tmp_path, tegrastats=None, nvml=False) as sampler:
        pass
    summary = sampler.summary()
    assert summary["rails"]["VDD_IN"]["mean_mw"] == 6000.0 and summary["rails"]["VDD_IN"]["samples"] >= 1
    assert "INA3221" in summary["sources"][0]


def test_tegrastats_lines_are_parsed_and_sampled(tmp_path, monkeypatch):
    orin = ("12-02-2026 10:00:00 RAM 2166/7764MB (lfb 1x4MB) SWAP 0/3882MB (cached 0MB) CPU [2%@1190,off] "
            "EMC_FREQ 0% GR3D_FREQ 0% cpu@45.5C VDD_IN 5123mW/5100mW VDD_CPU_GPU_CV 900mW/880mW VDD_SOC 1400mW/1390mW")
    nano = "RAM 1500/3956MB IRAM 0/252kB(lfb 252kB) POM_5V_IN 3245/3245 POM_5V_GPU 120/130 POM_5V_CPU 500/510"
    assert telemetry.parse_tegrastats(orin) == {"VDD_IN": 5123.0, "VDD_CPU_GPU_CV": 900.0, "VDD_SOC": 1400.0}
    assert telemetry.parse_tegrastats(nano) == {"POM_5V_IN": 3245.0, "POM_5V_GPU": 120.0, "POM_5V_CPU": 500.0}
    fake = tmp_path / "tegrastats"
    fake.write_text(f"#!/bin/sh\nwhile true; do echo '{orin}'; sleep 0.05; done\n")
    fake.chmod(0o755)
    with telemetry.PowerSampler(interval_s=0.05, sys_root=tmp_path / "none", tegrastats=str(fake),
                                nvml=False) as sampler:
        pass
    summary = sampler.summary()
    assert summary["rails"]["VDD_IN"]["mean_mw"] == 5123.0 and summary["sources"] == [f"tegrastats ({fake})"]


def test_absent_telemetry_is_reported_with_what_was_looked_for(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no tegrastats
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    sampler = telemetry.PowerSampler(sys_root=tmp_path)
    assert not sampler.present
    absent = sampler.summary()["absent"]
    assert "NVML" in absent and "INA3221" in absent and "tegrastats" in absent
    assert "pynvml is not installed" in telemetry.nvml_info()["absent"]


def _fake_nvml(init: object) -> types.ModuleType:
    nv = types.ModuleType("pynvml")
    nv.nvmlInit = init  # type: ignore[attr-defined]
    nv.nvmlDeviceGetHandleByIndex = lambda i: "gpu0"  # type: ignore[attr-defined]
    nv.nvmlDeviceGetName = lambda h: b"NVIDIA Orin"  # type: ignore[attr-defined]
    nv.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=1 << 20, total=8 << 30)  # type: ignore
    nv.nvmlDeviceGetPowerUsage = lambda h: 7500  # type: ignore[attr-defined]
    return nv


def test_nvml_when_present_and_an_interrupt_is_never_swallowed(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml(lambda: None))
    assert telemetry.nvml_info() == {"device": "NVIDIA Orin", "memory_used": 1 << 20, "memory_total": 8 << 30,
                                     "power_w": 7.5}
    assert gpu_memory() == {"used": 1 << 20, "total": 8 << 30}

    def no_driver() -> None:
        raise RuntimeError("NVML Shared Library Not Found")

    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml(no_driver))
    assert gpu_memory() is None and "NVML not usable" in telemetry.nvml_info()["absent"]

    def interrupted() -> None:  # what pybind11-style modules do with a Ctrl-C during initialisation
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise ImportError("initialization failed") from None

    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml(interrupted))
    with pytest.raises(KeyboardInterrupt):
        gpu_memory()
    with pytest.raises(KeyboardInterrupt):
        telemetry.nvml_info()


# ------------------------------------------------------------------------------- flag vocabulary


def _commands() -> dict[str, argparse.ArgumentParser]:
    """Every (sub)command parser by its prog without 'gaze ' ('caption', 'bench op', ...)."""
    return {p.prog.removeprefix("gaze").strip(): p for p in console.walk_parsers(build_parser())}


def _options(p: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {o: a for a in p._actions for o in a.option_strings if a.help is not argparse.SUPPRESS}


def test_every_flag_of_every_command_is_in_the_docs_table():
    doc = (REPO / "docs/CLI.md").read_text()
    table = doc.split("## One flag vocabulary")[1].split("\n## ")[0]
    documented = set(re.findall(r"`(--?[a-z][a-z0-9-]*)", table))
    missing = {f"gaze {cmd} {opt}" for cmd, p in _commands().items() for opt in _options(p)
               if opt not in documented and opt not in ("-h", "--help")}
    assert not missing, sorted(missing)


@pytest.mark.parametrize("command", ["caption", "profile", "chat", "bench op", "bench decode", "evaluate",
                                     "quantize"])
def test_json_is_file_or_stdout_everywhere(command):
    action = _options(_commands()[command])["--json"]
    assert action.nargs == "?" and str(action.const) == "-" and action.metavar == "FILE|-"


def test_frames_is_a_count_and_max_new_tokens_one_name():
    commands = _commands()
    for name in ("caption", "profile", "chat", "serve", "bench decode"):
        args = commands[name].parse_args(["EXPORT", "--frames", "3"] + (["x.png"] if name == "caption" else []))
        assert args.frames == 3, name
    for name in ("caption", "profile", "chat", "serve", "calibrate"):
        assert "--max-new-tokens" in _options(commands[name]), name
    assert not any("--new-tokens" in _options(p) for p in commands.values())  # the old spelling: hidden
    assert not any("--batch-size" in _options(p) for p in commands.values())  # calibrate's old spelling: hidden


# (command, the old spelling, the new one, the args dest, the value given, the parsed value)
RENAMED = [("calibrate", "--images", "--calib", "calib", "dir", Path("dir")),
           ("calibrate", "--max-images", "--calib-count", "calib_count", "3", 3),
           ("calibrate", "--batch-size", "--batch", "batch", "4", 4),
           ("quantize", "--images", "--calib", "calib", "dir", Path("dir")),
           ("convert", "--top-k", "--gaze-top-k", "gaze_top_k", "2,3", [2, 3])]


@pytest.mark.parametrize(("command", "old", "new", "dest", "given", "value"), RENAMED)
def test_renamed_flags_still_work_hidden_with_a_note(command, old, new, dest, given, value, capsys):
    """--images is a count (profile, bench decode), --max-images export's, --top-k sampling: the old names stay."""
    p = _commands()[command]
    base = {"calibrate": ["EXPORT"], "quantize": ["EXPORT", "-o", "OUT"],
            "convert": ["SRC", "-o", "OUT", "--region-size", "3x3"]}[command]
    required = {"convert": ["--gaze-top-k", "1"]}.get(command, []) if new != "--gaze-top-k" else []
    assert new in _options(p) and old not in _options(p) and old not in p.format_help()
    assert getattr(p.parse_args([*base, *required, new, given]), dest) == value
    assert getattr(p.parse_args([*base, *required, old, given]), dest) == value
    console.set_verbosity(1)  # prints the note the parse left
    assert f"{old} is now {new}" in capsys.readouterr().err


def test_a_required_renamed_flag_is_still_required(tmp_path, capsys):
    assert gaze_main(["calibrate", str(tmp_path)]) == 2
    assert "--calib DIR is required" in capsys.readouterr().err
    assert gaze_main(["convert", str(tmp_path), "-o", str(tmp_path / "c"), "--region-size", "3x3"]) == 2
    assert "--gaze-top-k K (or K0,K1,... one per decoder layer) is required" in capsys.readouterr().err


def test_help_shows_defaults_and_every_command_has_verbosity_flags():
    for name, p in _commands().items():
        text = p.format_help()
        if name:
            assert "-v, --verbose" in text and "-q, --quiet" in text, name
    assert "(default: 32)" in _commands()["caption"].format_help()
    assert "(default: 10)" in _commands()["profile"].format_help()
    assert "(default: None)" not in "".join(p.format_help() for p in _commands().values())


def test_version(capsys):
    assert gaze_main(["--version"]) == 0
    assert re.fullmatch(r"gaze \d+\.\d+\.\d+\S*\n", capsys.readouterr().out)


def test_no_broken_pipe_error_when_the_reader_leaves(runtime_export, tmp_path):
    image = tmp_path / "a.png"
    Image.fromarray(scene_frames(1, 4)[0]).save(image)
    for argv, status in ((["caption", str(runtime_export[1]), str(image), "--json", "-"], 141),
                         (["caption", str(runtime_export[1]), str(image)], 141), (["--help"], 0)):
        read, write = os.pipe()
        os.close(read)  # the reader left before anything was written (`| head` that already quit)
        try:
            result = subprocess.run([sys.executable, "-m", "gaze_edge.cli", *argv], stdout=write,
                                    stderr=subprocess.PIPE, text=True, timeout=120, cwd=REPO)
        finally:
            os.close(write)
        assert result.returncode == status, (argv, result.returncode, result.stderr)  # 141: 128 + SIGPIPE
        assert "Traceback" not in result.stderr and "BrokenPipeError" not in result.stderr, result.stderr
        assert "Exception ignored" not in result.stderr, result.stderr
    head = subprocess.run(f"{sys.executable} -m gaze_edge.cli caption {runtime_export[1]} {image} --json - | head -n 2",
                          shell=True, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert head.stdout.startswith("{") and "Traceback" not in head.stderr, head.stderr


def test_bench_json_to_stdout_moves_the_table_to_stderr(runtime_export, capsys):
    assert gaze_main(["bench", "decode", str(runtime_export[1]), "--warmup", "0", "--repeats", "2", "--json"]) == 0
    out = capsys.readouterr()
    report = json.loads(out.out)  # nothing but the JSON on stdout
    assert report["bench"] == "decode" and report["results"]["gaze"]["n"] == 2
    assert "dense / gaze:" in out.err
    assert gaze_main(["bench", "op", "--visual-tokens", "64", "--batch", "1", "--region-tokens", "4", "--warmup", "0",
                      "--repeats", "2"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith(" visual") and out.err == ""
