"""`gaze bench op --backend cuda` and bench/bench_kernels.py: one clear line, no traceback, without a GPU.

Where a CUDA GPU is usable (CuPy or cuda-python sees one) the refusal tests skip: the benchmark runs
there instead (bench/device_check.sh). The CPU smoke run checks that the v2 benchmark path drives
gaze_forward_v2 on the CPU harness and that its output is the reference's (so a broken benchmark
setup, e.g. wrong tables, fails here rather than on the first GPU run)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from gaze_edge.reference import gaze_attention_reference
from tests.test_plugin_build import REPO, load_plugin_module

gb = load_plugin_module("gaze_backends")


def _gpu_usable() -> bool:
    try:
        gb.gpu_runtime()
    except gb.GpuUnavailable:
        return False
    return True


no_gpu = pytest.mark.skipif(_gpu_usable(), reason="a CUDA GPU is usable here: the benchmark runs instead")


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


@no_gpu
def test_gaze_bench_op_cuda_refuses_in_one_line(tmp_path):
    report = tmp_path / "op.json"
    proc = subprocess.run([sys.executable, "-m", "gaze_edge.cli", "bench", "op", "--backend", "cuda",
                           "--json", str(report)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    line = _one_line(proc.stderr)
    assert line.startswith("gaze: error: `gaze bench op --backend cuda` needs an NVIDIA GPU with CUDA"), line
    assert "--backend onnxruntime" in line
    assert proc.stdout == "" and not report.exists()


@no_gpu
def test_bench_kernels_refuses_in_one_line():
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "bench_kernels.py")], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert _one_line(proc.stderr).startswith("bench_kernels: needs an NVIDIA GPU with CUDA")


def test_bench_op_cuda_flags_take_the_issue_grid():
    from gaze_edge.cli import build_parser
    from runtime.bench import _op_defaults

    args = build_parser().parse_args(["bench", "op", "--backend", "cuda"])
    _op_defaults(args)
    assert (args.visual_tokens, args.batch, args.head_dim, args.dtype, args.keep) == (
        [729, 4096, 16384], [1, 8], [64, 128], "fp16", 0.1)
    args = build_parser().parse_args(["bench", "op"])
    _op_defaults(args)  # onnxruntime keeps its own defaults
    assert (args.visual_tokens, args.batch, args.head_dim, args.dtype) == ([4096, 16384], [1, 4], [64], "fp32")


def test_op_case_runs_v2_on_the_cpu_harness():
    """The benchmark's case (runtime tables, one gaze decode step) on the CPU harness: the output is the
    float64 reference's (text + the k best regions); timings are not looked at."""
    kb = _bench_kernels()
    try:
        lib = kb.gk.build_cpu(REPO / "build" / "kernels-cpu")
    except kb.gk.ToolMissing as e:
        pytest.skip(f"CPU harness not buildable: {e}")
    backend = kb.gb.cpu_backend(lib)
    text, visual, M, G, D = 8, 32, 4, 2, 64
    r = kb.op_case(backend, batch=2, visual=visual, head_dim=D, kv_heads=2, group=G, region_tokens=M, text=text,
                   keep=0.25, dtype="float32", iters=1, dense=False, return_arrays=True)
    a = r.pop("arrays")
    S = text + visual + 1
    assert (r["regions"], r["top_k"], r["cache_tokens"]) == (8, 2, S)
    assert r["dense_ms"] is None and r["ideal_byte_ratio"] > 1
    json.dumps(r)  # the row is JSON, as gaze bench op writes it
    B = 2
    ref = gaze_attention_reference(a["q"].astype(np.float64), a["k"].astype(np.float64), a["v"].astype(np.float64),
                                   q_pos=np.full((B, 1), S - 1), k_pos=np.tile(np.arange(S), (B, 1)),
                                   k_region=a["slot_region"], k_valid=np.ones((B, S), bool),
                                   gaze=np.ones((B, 1), bool), top_k=2, num_regions=8, scale=1.0 / math.sqrt(D))
    assert ref.selected.sum(-1).max() == 2  # the premise: a gaze query that picks two of eight regions
    err = np.linalg.norm(a["out"] - ref.out) / np.linalg.norm(ref.out)
    assert err < 1e-4, err


def _bench_kernels():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_kernels_under_test", REPO / "bench" / "bench_kernels.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
