"""gaze calibrate: coverage against a brute-force numpy count, the choice, the rewrite, the CLI, bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gaze_edge import atomic
from gaze_edge.calibrate import budget as bg
from gaze_edge.calibrate.data import load_image_set
from gaze_edge.cli import main as gaze_main
from gaze_edge.model.gaze_op import KeyLayout, gaze_attention, region_coverage
from gaze_edge.reference import gaze_attention_reference
from gaze_edge.runtime import GazeRuntime, Prompt, SamplingConfig
from gaze_edge.runtime.backend import BackendError
from gaze_edge.runtime.folder import ExportFolder
from tests.gaze_cases import make_case

# --------------------------------------------------------------------- coverage


def numpy_coverage(case) -> tuple[np.ndarray, np.ndarray]:
    """visual[b, h, t, j] by counting: dense softmax per head, mass per region, regions ranked by the reference."""
    batch, q_heads, q_len, dim = case.q.shape
    kv_heads = case.k.shape[1]
    group = q_heads // kv_heads
    r_all = case.num_regions
    selections = [gaze_attention_reference(case.q, case.k, case.v, **{**case.reference_kwargs(), "top_k": j}).selected
                  for j in range(1, r_all + 1)]
    visual = np.full((batch, kv_heads, q_len, r_all), np.nan)
    rows = np.zeros((batch, kv_heads, q_len), dtype=bool)
    for b in range(batch):
        for t in range(q_len):
            if not case.gaze[b, t]:
                continue
            p = case.q_pos[b, t]
            causal = case.k_valid[b] & (case.k_pos[b] <= p)
            for h in range(kv_heads):
                mass = np.zeros(r_all)
                for g in range(h * group, (h + 1) * group):
                    logits = case.k[b, h, causal] @ case.q[b, g, t] / np.sqrt(dim)
                    w = np.exp(logits - logits.max())
                    w /= w.sum()
                    regions = case.k_region[b, causal]
                    for r in range(r_all):
                        mass[r] += w[regions == r].sum() / group
                eligible = np.array([(case.k_region[b] == r).any() and case.k_pos[b][case.k_region[b] == r].max() < p
                                     for r in range(r_all)])
                if not eligible.any():
                    continue
                rows[b, h, t] = True
                total = mass[eligible].sum()
                for j in range(r_all):
                    visual[b, h, t, j] = mass[selections[j][b, h, t]].sum() / total
    return visual, rows


@pytest.mark.parametrize("shape", [dict(group=1, kv_heads=2), dict(group=3, kv_heads=1), dict(group=2, kv_heads=2)])
def test_region_coverage_matches_counting(shape):
    case = make_case(batch=2, images=(2, 1), grid=(5, 5), region=(2, 2), dim=8, generated=3, **shape)
    keys = KeyLayout(torch.from_numpy(case.k_pos), torch.from_numpy(case.k_region), torch.from_numpy(case.k_valid),
                     case.num_regions)
    got = region_coverage(torch.from_numpy(case.q), torch.from_numpy(case.k), torch.from_numpy(case.q_pos),
                          torch.from_numpy(case.gaze), keys)
    want, rows = numpy_coverage(case)
    assert np.array_equal(got.rows.numpy(), rows), f"seed {case.seed}"
    np.testing.assert_allclose(got.visual.numpy()[rows], want[rows], rtol=1e-9, atol=1e-12,
                               err_msg=f"seed {case.seed}")
    # Monotone in k; k = R keeps all the visual mass; `kept` counts dense tokens on top.
    v = got.visual.numpy()[rows]
    assert (np.diff(v, axis=-1) >= -1e-12).all() and np.allclose(v[:, -1], 1.0)
    assert (got.kept.numpy()[rows] >= v - 1e-12).all()


def test_coverage_at_k_is_the_mass_the_op_lets_the_query_read():
    """Tie the curve to gaze_attention itself: the regions the op selects at top_k = k hold curve[k-1] of the mass."""
    case = make_case(batch=1, images=(2,), kv_heads=2, group=2, dim=8, generated=2, query_len=2)
    keys = KeyLayout(torch.from_numpy(case.k_pos), torch.from_numpy(case.k_region), torch.from_numpy(case.k_valid),
                     case.num_regions)
    args = (torch.from_numpy(case.q), torch.from_numpy(case.k))
    cov = region_coverage(*args, torch.from_numpy(case.q_pos), torch.from_numpy(case.gaze), keys)
    want, rows = numpy_coverage(case)
    for k in (1, 4, 11):
        sel = gaze_attention(*args, torch.from_numpy(case.v), torch.from_numpy(case.q_pos),
                             torch.from_numpy(case.gaze), keys, k).selected
        assert sel is not None
        assert (sel.sum(-1).numpy()[rows] == k).all()
        np.testing.assert_allclose(cov.visual.numpy()[rows][:, k - 1], want[rows][:, k - 1], rtol=1e-9)


def test_choose_top_k():
    curve = np.array([[0.5, 0.94, 0.96, 1.0], [0.97, 0.98, 0.99, 1.0], [0.2, 0.3, 0.4, 1.0]])
    assert bg.choose_top_k(curve, 0.95).tolist() == [3, 1, 4]
    assert bg.choose_top_k(curve, 1.0).tolist() == [4, 4, 4]
    assert bg.choose_top_k(curve, 0.1).tolist() == [1, 1, 1]
    assert bg.choose_top_k(curve[None], 0.95).tolist() == [[3, 1, 4]]  # per KV head keeps its shape


def test_agreement_descent_lowers_only_layers_that_keep_the_captions():
    """Layer 1 needs k >= 3 for all captions, layer 0 loses one caption of 4 below k = 2; others are free."""
    dense = np.arange(8).reshape(4, 2)

    class FakeCaptioner:
        calls = 0

        def captions(self, top_k):
            self.calls += 1
            out = dense.copy()
            if top_k[1] < 3:
                out[:] = -1
            if top_k[0] < 2:
                out[0] = -1
            return out

    fake = FakeCaptioner()
    chosen, trials = bg.descend_by_agreement(fake, [4, 5, 3], dense, 1.0)  # type: ignore[arg-type]
    assert chosen == [2, 3, 1]
    assert all(t["agreement"] == 1.0 for t in trials if t["accepted"])
    assert len(trials) == fake.calls
    chosen, _ = bg.descend_by_agreement(fake, [4, 5, 3], dense, 0.75)  # type: ignore[arg-type]
    assert chosen == [1, 3, 1]  # one caption in four may change


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.01, float("nan")])
def test_coverage_outside_0_1_is_refused(bad):
    with pytest.raises(bg.InputError, match=r"\(0, 1\]"):
        bg.check_coverage(bad)


# ---------------------------------------------------------------------- rewrite


@pytest.fixture()
def export_copy(runtime_export, tmp_path: Path) -> Path:
    out = tmp_path / "export"
    shutil.copytree(runtime_export[1], out)
    return out


def test_per_layer_top_k_written_runs_in_onnx_runtime_like_pytorch(export_copy: Path, torch_model):
    """After the rewrite the ONNX graph selects per layer exactly as PyTorch does with the same list."""
    model, processor = torch_model
    top_k = [1, 3, 2, 5][: model.config.num_hidden_layers]
    folder = ExportFolder.open(export_copy)
    bg.write_top_k(folder, top_k, {"test": True})
    assert ExportFolder.open(export_copy).shape.top_k_per_layer == tuple(top_k)
    rng = np.random.default_rng(5)
    from gaze_edge.model import scenes

    images = [scenes.render(scenes.sample_scene(rng, held_out=True), 48, rng)[0] for _ in range(3)]
    rt = GazeRuntime.load(export_copy, threads=1)
    got = rt.generate([Prompt(None, [im]) for im in images], SamplingConfig(max_new_tokens=12)).tokens
    ids, mask = processor.batch_encode([processor.prompt()] * 3)
    saved = model.config.gaze_top_k
    try:
        model.config.gaze_top_k = top_k
        want = model.generate(torch.from_numpy(ids), pixel_values=torch.from_numpy(processor.preprocess(images)),
                              attention_mask=torch.from_numpy(mask), max_new_tokens=12).sequences.numpy()
    finally:
        model.config.gaze_top_k = saved
    width = min(got.shape[1], want.shape[1])
    assert np.array_equal(got[:, :width], want[:, :width])
    import onnx

    proto = onnx.load(str(export_copy / "decoder.onnx"), load_external_data=False)
    nodes = [n for n in proto.graph.node if n.op_type == "GazeAttention"]
    attrs = [next(a.i for a in n.attribute if a.name == "top_k") for n in nodes]
    assert attrs == top_k


def test_copies_that_disagree_are_refused_by_the_runtime_and_repaired(export_copy: Path, monkeypatch):
    """write_top_k replaces both files as one step (signals: tests/test_hardening.py); should the copies still
    disagree (the second rename failing, a machine crash), the runtime refuses the folder by name and a
    second write repairs it."""
    before = {p.name: p.read_bytes() for p in export_copy.iterdir() if p.is_file()}
    real, calls = atomic.os.replace, []

    def second_fails(a, b):
        calls.append(Path(b).name)
        if len(calls) == 2:
            raise OSError(13, "Permission denied")
        real(a, b)

    monkeypatch.setattr(atomic.os, "replace", second_fails)
    folder = ExportFolder.open(export_copy)
    with pytest.raises(OSError):
        bg.write_top_k(folder, [3] * folder.shape.num_layers, {})
    monkeypatch.undo()
    assert calls == ["decoder.onnx", "gaze_config.json"]
    assert (export_copy / "gaze_config.json").read_bytes() == before["gaze_config.json"]
    assert not [p for p in export_copy.iterdir() if p.name.endswith(".tmp")]  # no temp file left behind
    with pytest.raises(BackendError, match="interrupted `gaze calibrate`"):
        GazeRuntime.load(export_copy, threads=1)
    folder = ExportFolder.open(export_copy)
    bg.write_top_k(folder, [3] * folder.shape.num_layers, {})
    GazeRuntime.load(export_copy, threads=1)  # consistent again


def test_failed_write_changes_nothing(export_copy: Path, monkeypatch):
    """Both temp files are written before either is renamed: a full disk at either changes nothing."""
    before = {p.name: p.read_bytes() for p in export_copy.iterdir() if p.is_file()}
    for fail_at in (1, 2):
        calls = []

        def full_disk(fd, real=atomic.os.fsync, fail_at=fail_at, calls=calls):
            calls.append(fd)
            if len(calls) == fail_at:
                raise OSError(28, "No space left on device")
            real(fd)

        monkeypatch.setattr(atomic.os, "fsync", full_disk)
        folder = ExportFolder.open(export_copy)
        with pytest.raises(OSError):
            bg.write_top_k(folder, [1] * folder.shape.num_layers, {})
        monkeypatch.undo()
        after = {p.name: p.read_bytes() for p in export_copy.iterdir() if p.is_file()}
        assert after == before and len(calls) == fail_at


def test_replace_leaves_no_temp_file_on_error(tmp_path: Path, monkeypatch):
    target = tmp_path / "f.json"
    target.write_text("old")
    monkeypatch.setattr(atomic.os, "replace", lambda a, b: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError):
        atomic.replace_file(target, b"new")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]


# -------------------------------------------------------------------------- CLI


def write_scenes(folder: Path, count: int, seed: int) -> Path:
    assert gaze_main(["scenes", "-o", str(folder), "--count", str(count), "--seed", str(seed)]) == 0
    return folder


@pytest.mark.slow
def test_calibrate_cli_end_to_end(export_copy: Path, runtime_export, tmp_path: Path, capsys):
    calib = write_scenes(tmp_path / "calib", 12, 11)
    held = write_scenes(tmp_path / "held", 8, 12)
    report_dir = tmp_path / "report"
    before = (export_copy / "decoder.onnx").read_bytes()
    assert gaze_main(["calibrate", str(export_copy), "--calib", str(calib), "--coverage", "0.9", "--held-out",
                      str(held), "--report", str(report_dir), "--checkpoint", str(runtime_export[0]),
                      "--max-new-tokens", "24", "--dry-run"]) == 0
    assert (export_copy / "decoder.onnx").read_bytes() == before  # dry run writes nothing into the export
    assert gaze_main(["calibrate", str(export_copy), "--calib", str(calib), "--coverage", "0.9", "--held-out",
                      str(held), "--report", str(report_dir), "--checkpoint", str(runtime_export[0]),
                      "--max-new-tokens", "24"]) == 0
    out = capsys.readouterr().out
    assert "calibrated" in out and "held-out accuracy (ONNX Runtime)" in out
    report = json.loads((report_dir / "calibration.json").read_text())
    assert (report_dir / "calibration.png").stat().st_size > 10_000
    chosen = report["chosen_top_k"]
    for layer, k in enumerate(chosen):  # the smallest k reaching the target
        curve = report["coverage_per_layer"][layer]
        assert curve[k - 1] >= 0.9 - 1e-6 and (k == 1 or curve[k - 2] < 0.9)
    config = json.loads((export_copy / "gaze_config.json").read_text())
    assert config["gaze"]["top_k_per_layer"] == chosen
    assert config["gaze"]["calibration"]["coverage_target"] == 0.9
    assert report["held_out"]["after"]["top_k"] == chosen
    names = [r["name"] for r in report["budgets"]]
    assert names[:report["regions"]] == [f"k={k}" for k in range(1, report["regions"] + 1)]
    rows = {r["name"]: r for r in report["budgets"]}
    dense = rows[f"k={report['regions']}"]
    assert dense["agreement"] == 1.0  # the reference agrees with itself
    bytes_ = [rows[f"k={k}"]["kv_bytes_per_token"] for k in range(1, report["regions"] + 1)]
    assert all(a < b for a, b in zip(bytes_, bytes_[1:], strict=False))
    GazeRuntime.load(export_copy, threads=1)


def test_bad_calibration_inputs_exit_2_with_a_message(export_copy: Path, runtime_export, tmp_path: Path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    good = write_scenes(tmp_path / "good", 2, 3)
    ckpt = ["--checkpoint", str(runtime_export[0])]
    cases = [
        (["--calib", str(empty)], "has no images"),
        (["--calib", str(tmp_path / "missing")], "does not exist"),
        (["--calib", str(corrupt)], "a.png"),
        (["--calib", str(good), "--coverage", "0"], "(0, 1]"),
        (["--calib", str(good), "--coverage", "1.5"], "(0, 1]"),
    ]
    before = (export_copy / "gaze_config.json").read_bytes()
    for extra, message in cases:
        assert gaze_main(["calibrate", str(export_copy), *extra, *ckpt]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert gaze_main(["calibrate", str(tmp_path), "--calib", str(good)]) == 2
    assert "gaze_config.json" in capsys.readouterr().err
    assert (export_copy / "gaze_config.json").read_bytes() == before


def test_unreadable_folder_is_named(tmp_path: Path):
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "a.png").write_bytes(b"x")
    locked.chmod(0)
    try:
        if shutil.os.access(locked, shutil.os.R_OK):  # running as root: permissions do not apply
            pytest.skip("running as root: an unreadable folder cannot be made")
        with pytest.raises(bg.InputError, match="cannot list"):
            load_image_set(locked)
    finally:
        locked.chmod(0o755)


def test_wrong_checkpoint_is_caught(export_copy: Path, tmp_path: Path, capsys):
    other = Path(__file__).resolve().parents[1] / "checkpoints" / "gaze-tiny-dense"
    if not (other / "model.safetensors").is_file():
        pytest.skip("the dense twin checkpoint is not in this checkout")
    good = write_scenes(tmp_path / "good", 2, 3)
    assert gaze_main(["calibrate", str(export_copy), "--calib", str(good), "--checkpoint", str(other)]) == 2
    assert "is not the one" in capsys.readouterr().err


def test_calibrate_help_needs_no_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "from gaze_edge.cli import build_parser\n"
            "build_parser().parse_args(['calibrate', 'x', '--calib', 'y'])")
    subprocess.run([sys.executable, "-c", code], check=True)
