"""plugins_trt builds with CMake on a CPU-only machine, and its host-side C ABI follows the contract.

The kernels library (libgaze_kernels.so) is built once per session into build/plugins_trt-tests
(override with GAZE_PLUGIN_BUILD_DIR) for sm_87 and sm_90 only, to keep the build short on
2 cores; the default CMake build adds Thor (sm_110 on CUDA 13). Nothing here needs a GPU or
TensorRT: attribute parsing, shape/dtype rules, workspace sizing, split planning and the
dispatch table are plain C++ behind the C ABI.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import shutil
import struct
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parent.parent
TEST_ARCHS = (87, 90)


def load_plugin_module(name: str) -> ModuleType:
    """plugins_trt/python/NAME.py, loaded by path (it is a tool of the repo, not part of the package)."""
    path = REPO / "plugins_trt" / "python" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return module


gk = load_plugin_module("gaze_kernels")


@functools.lru_cache(maxsize=1)
def kernel_library() -> Path:
    """Build (incrementally) and return libgaze_kernels.so; skips when there is no CUDA compiler.

    CMake builds it; without CMake (some GPU machines) the binding compiles it with nvcc alone.
    """
    if shutil.which("nvcc") is None and not Path("/usr/local/cuda/bin/nvcc").exists():
        pytest.skip("nvcc (CUDA toolkit) is not installed")
    build_dir = Path(os.environ.get("GAZE_PLUGIN_BUILD_DIR", REPO / "build" / "plugins_trt-tests"))
    return gk.build(build_dir, architectures=";".join(str(a) for a in TEST_ARCHS))


@pytest.fixture(scope="session")
def lib() -> gk.GazeKernels:
    return gk.GazeKernels(kernel_library())


def fatbin_cubin_archs(path: Path) -> set[int]:
    """SM versions of the cubins embedded in a shared library's fatbinaries (no cuobjdump needed).

    Fatbin container: magic 0xBA55ED50, u16 version, u16 header size, u64 payload size; then
    entries with u16 kind (2 = cubin, 1 = PTX), u16, u32 entry header size, u64 payload size,
    ..., u32 SM version at byte 28.
    """
    data = path.read_bytes()
    archs: set[int] = set()
    magic = struct.pack("<I", 0xBA55ED50)
    at = data.find(magic)
    while at >= 0:
        _, header, size = struct.unpack_from("<HHQ", data, at + 4)
        off, end = at + header, at + header + size
        while off + 32 <= end:
            kind, _, entry_header, payload = struct.unpack_from("<HHIQ", data, off)
            if entry_header < 32:
                break
            if kind == 2:
                archs.add(struct.unpack_from("<I", data, off + 28)[0])
            off += entry_header + payload
        at = data.find(magic, max(end, at + 4))
    return archs


# ---- build ------------------------------------------------------------------------------------


def test_library_holds_sm87_and_sm90_code(lib: gk.GazeKernels) -> None:
    archs = fatbin_cubin_archs(lib.path)
    assert set(TEST_ARCHS) <= archs, f"cubins in {lib.path.name}: {sorted(archs)}"


def test_plugin_is_skipped_without_tensorrt(lib: gk.GazeKernels) -> None:
    if not (lib.path.parent / "CMakeCache.txt").exists():
        pytest.skip("built without CMake")
    cache = (lib.path.parent / "CMakeCache.txt").read_text()
    has_trt = "TensorRT_INCLUDE_DIR:PATH=" in cache and "TensorRT_INCLUDE_DIR-NOTFOUND" not in cache
    plugin = lib.path.parent / "libgaze_trt_plugin.so"
    assert plugin.exists() == has_trt


def test_loads_without_a_gpu(lib: gk.GazeKernels) -> None:
    assert lib.abi_version() == 2
    count = lib.cuda_device_count()  # 0 without a driver or device, never a crash
    assert count >= 0


# ---- attributes -------------------------------------------------------------------------------

GOOD = [gk.Field.int32("top_k", 4), gk.Field.int32("max_region_tokens", 9), gk.Field.float32("scale", 0.125)]


def test_attribute_names_are_the_contract_attributes(lib: gk.GazeKernels) -> None:
    assert lib.attribute_names() == ["top_k", "max_region_tokens", "scale", "routing", "context_attention",
                                     "plugin_namespace", "plugin_version"]


def test_parse_good_attributes(lib: gk.GazeKernels) -> None:
    a = lib.parse_attributes(GOOD)
    assert (a.top_k, a.max_region_tokens, a.scale) == (4, 9, 0.125)
    # The parser may pass the plugin strings, with or without a terminating NUL; unknown names are ignored.
    extra = [gk.Field.string("plugin_namespace", "gaze"), gk.Field("plugin_version", b"2\0", gk.FIELD_CHAR),
             gk.Field.int32("something_else", 3)]
    a = lib.parse_attributes(list(reversed(GOOD)) + extra)
    assert (a.top_k, a.max_region_tokens) == (4, 9)


@pytest.mark.parametrize("drop", ["top_k", "max_region_tokens", "scale"])
def test_missing_attribute_is_named(lib: gk.GazeKernels, drop: str) -> None:
    with pytest.raises(gk.GazeKernelError, match=f"missing required attribute.*{drop}") as info:
        lib.parse_attributes([f for f in GOOD if f.name != drop])
    assert info.value.status == gk.ERR_INVALID


@pytest.mark.parametrize(("field", "message"), [
    (gk.Field.float32("top_k", 4.0), "'top_k' must be one INT"),
    (gk.Field("top_k", 4, gk.FIELD_I64), "'top_k' must be one INT .*INT64"),
    (gk.Field.int32("scale", 1), "'scale' must be one FLOAT"),
    (gk.Field.string("max_region_tokens", "4"), "'max_region_tokens' must be one INT"),
    (gk.Field.int32("plugin_namespace", 1), "'plugin_namespace' must be a STRING"),
])
def test_wrong_attribute_type(lib: gk.GazeKernels, field: gk.Field, message: str) -> None:
    fields = [f for f in GOOD if f.name != field.name] + [field]
    with pytest.raises(gk.GazeKernelError, match=message):
        lib.parse_attributes(fields)


@pytest.mark.parametrize(("field", "message", "status"), [
    (gk.Field.int32("top_k", 0), "'top_k' must be >= 1", gk.ERR_INVALID),
    (gk.Field.int32("max_region_tokens", 0), "'max_region_tokens' must be >= 1", gk.ERR_INVALID),
    (gk.Field.int32("max_region_tokens", 257), "exceeds the supported maximum 256", gk.ERR_UNSUPPORTED),
    (gk.Field.float32("scale", 0.0), "'scale' must be a finite float > 0", gk.ERR_INVALID),
    (gk.Field.float32("scale", math.nan), "'scale' must be a finite float > 0", gk.ERR_INVALID),
    (gk.Field.string("plugin_namespace", "other"), "plugin_namespace' is 'other'", gk.ERR_INVALID),
    (gk.Field.string("plugin_version", "1"), "plugin_version' is '1'", gk.ERR_INVALID),  # node v1: re-export
])
def test_bad_attribute_value(lib: gk.GazeKernels, field: gk.Field, message: str, status: int) -> None:
    fields = [f for f in GOOD if f.name != field.name] + [field]
    with pytest.raises(gk.GazeKernelError, match=message) as info:
        lib.parse_attributes(fields)
    assert info.value.status == status


def test_v2_attributes_parse_and_default_to_v1_behaviour(lib: gk.GazeKernels) -> None:
    a = lib.parse_attributes(GOOD)  # node v1: absent -> kv_head, causal
    assert (a.routing, a.context_attention) == (0, 0)
    a = lib.parse_attributes(GOOD + [gk.Field.int32("routing", 1), gk.Field.int32("context_attention", 1)])
    assert (a.routing, a.context_attention) == (1, 1)


@pytest.mark.parametrize(("field", "message"), [
    (gk.Field.int32("routing", 2), "'routing' must be 0 \\(kv_head\\) or 1 \\(query_head\\), got 2"),
    (gk.Field.int32("context_attention", -1), "'context_attention' must be 0 \\(causal\\) or 1 \\(own_image\\)"),
    (gk.Field.string("routing", "kv_head"), "'routing' must be one INT"),
])
def test_bad_v2_attribute(lib: gk.GazeKernels, field: gk.Field, message: str) -> None:
    with pytest.raises(gk.GazeKernelError, match=message) as info:
        lib.parse_attributes(GOOD + [field])
    assert info.value.status == gk.ERR_INVALID


def test_v2_attributes_reach_the_abi_checks(lib: gk.GazeKernels) -> None:
    """A bad routing given straight through the C struct is refused by every entry point that validates."""
    with pytest.raises(gk.GazeKernelError, match="'routing' must be"):
        lib.infer_outputs(node_inputs(), gk.Attrs(4, 9, 0.125, 5, 0))


# ---- shapes and dtypes ------------------------------------------------------------------------


def node_inputs(B: int = 2, Hq: int = 8, Hkv: int = 2, T: int = 3, S: int = 50, R: int = 12, D: int = 64,
                dtype: int = gk.F16) -> list[tuple[int, tuple[int, ...]]]:
    return [
        (dtype, (B, Hq, T, D)), (dtype, (B, Hkv, T, D)), (dtype, (B, Hkv, T, D)),
        (dtype, (B, Hkv, S, D)), (dtype, (B, Hkv, S, D)), (gk.F32, (B, Hkv, R, D)),
        (gk.I64, (B, S)), (gk.I64, (B, S)), (gk.BOOL, (B, S)), (gk.BOOL, (B, T)), (gk.I64, (1,)),
    ]


def attrs(top_k: int = 4, mrt: int = 9) -> gk.Attrs:
    return gk.Attrs(top_k, mrt, 0.125)


def test_outputs_follow_inputs(lib: gk.GazeKernels) -> None:
    out = lib.infer_outputs(node_inputs(), attrs())
    assert out == [(gk.F16, (2, 8, 3, 64)), (gk.F16, (2, 2, 50, 64)), (gk.F16, (2, 2, 50, 64)),
                   (gk.F32, (2, 2, 12, 64))]
    dynamic = node_inputs(B=-1, T=-1, S=-1)  # build time: dynamic dims pass through unchanged
    assert lib.infer_outputs(dynamic, attrs())[0][1] == (-1, 8, -1, 64)


def _with(inputs: list, index: int, dtype: int | None = None, dims: tuple | None = None) -> list:
    inputs = list(inputs)
    d, s = inputs[index]
    inputs[index] = (d if dtype is None else dtype, s if dims is None else dims)
    return inputs


@pytest.mark.parametrize(("inputs", "message", "status"), [
    (node_inputs()[:10], "takes 11 inputs, got 10", gk.ERR_INVALID),
    (_with(node_inputs(), 0, dims=(2, 8, 3)), "'query' must have rank 4", gk.ERR_INVALID),
    (_with(node_inputs(), 1, dtype=gk.F32), "'key' has dtype float32, expected float16", gk.ERR_INVALID),
    (_with(node_inputs(), 5, dtype=gk.F16), "'past_desc' has dtype float16, expected float32", gk.ERR_INVALID),
    (_with(node_inputs(), 6, dtype=gk.I32), "'slot_pos' has dtype int32, expected int64", gk.ERR_INVALID),
    (_with(node_inputs(), 8, dtype=gk.I64), "'slot_valid' has dtype int64, expected bool", gk.ERR_INVALID),
    (_with(node_inputs(), 10, dims=(2,)), "write_offset size is 1 in the contract but 2", gk.ERR_INVALID),
    (_with(node_inputs(), 3, dims=(2, 2, 49, 64)), "dimension S is 49 in past_key.*but 50", gk.ERR_INVALID),
    (_with(node_inputs(), 9, dims=(3, 3)), "dimension B is 2 in query.*but 3 in gaze", gk.ERR_INVALID),
    (node_inputs(Hq=6, Hkv=4), "query heads 6 are not a multiple of KV heads 4", gk.ERR_INVALID),
    (node_inputs(Hq=18, Hkv=2), "GQA group 9 .* exceeds the supported 8", gk.ERR_UNSUPPORTED),
    (node_inputs(D=96), "no GazeAttention kernel for float16 with head dim 96", gk.ERR_UNSUPPORTED),
    (node_inputs(dtype=gk.I32), "query dtype int32 is not supported", gk.ERR_UNSUPPORTED),
    (node_inputs(R=4097), "region capacity R = 4097 exceeds the supported 4096", gk.ERR_UNSUPPORTED),
])
def test_bad_inputs_are_rejected(lib: gk.GazeKernels, inputs: list, message: str, status: int) -> None:
    with pytest.raises(gk.GazeKernelError, match=message) as info:
        lib.infer_outputs(inputs, attrs())
    assert info.value.status == status


def test_io_dtype_table(lib: gk.GazeKernels) -> None:
    for q in (gk.F32, gk.F16, gk.BF16):
        assert lib.supports_io_dtype(0, q, q)
        for pos in (1, 2, 3, 4, 11, 12, 13):
            assert lib.supports_io_dtype(pos, q, q)
            assert not lib.supports_io_dtype(pos, gk.F16 if q != gk.F16 else gk.F32, q)
        for pos in (5, 14):
            assert lib.supports_io_dtype(pos, gk.F32, q)
            assert lib.supports_io_dtype(pos, q, q) == (q == gk.F32)
        for pos in (6, 7, 10):
            assert lib.supports_io_dtype(pos, gk.I64, q) and not lib.supports_io_dtype(pos, gk.I32, q)
        for pos in (8, 9):
            assert lib.supports_io_dtype(pos, gk.BOOL, q) and not lib.supports_io_dtype(pos, gk.I64, q)
    assert not lib.supports_io_dtype(0, gk.I32, gk.I32)
    assert not lib.supports_io_dtype(15, gk.F32, gk.F32)


# ---- dispatch, plan, workspace -----------------------------------------------------------------


def test_dispatch_table_names_every_supported_case(lib: gk.GazeKernels) -> None:
    table = lib.dispatch_table()
    assert {(d, h) for d, h, _ in table} == {(d, h) for d in (gk.F16, gk.BF16, gk.F32) for h in (64, 128)}
    assert all(name.startswith("gaze<") for _, _, name in table)
    for d, h, _ in table:
        assert lib.dispatch_supported(d, h)
    for d, h in [(gk.F16, 96), (gk.F16, 256), (gk.F32, 32), (gk.I32, 64), (gk.I64, 128)]:
        assert not lib.dispatch_supported(d, h)


def problem(**kw: int) -> gk.Problem:
    base = dict(batch=2, new_tokens=1, cache_len=4096, num_regions=256, q_heads=16, kv_heads=2, head_dim=128,
                dtype=gk.F16, top_k=26, max_region_tokens=16)
    base.update(kw)
    return gk.Problem(**base)


def expected_workspace(p: gk.Problem) -> int:
    """The layout of gaze_host.cpp workspace_layout, recomputed: 256-byte aligned arrays."""
    def a(n: int) -> int:
        return -(-n // 256) * 256
    B, S, R, mrt = p.batch, p.cache_len, p.num_regions, p.max_region_tokens
    chunk = min(p.new_tokens, 64)
    partial = min(p.new_tokens, 8)
    kmax = min(p.top_k, R)
    rows = B * partial * p.q_heads * 16
    return sum(a(n) for n in (4, B * R * 4, B * R * 8, B * R * mrt * 4, B * S * 4, B * S * 4, B * 4, B * 4,
                               B * p.q_heads * chunk * kmax * 4, B * p.q_heads * chunk * 4,
                               rows * p.head_dim * 4, rows * 2 * 4))


@pytest.mark.parametrize("kw", [{}, {"new_tokens": 8}, {"new_tokens": 9}, {"new_tokens": 2048, "batch": 1},
                                {"num_regions": 4096, "top_k": 410, "max_region_tokens": 1},
                                {"batch": 8, "cache_len": 16384, "head_dim": 64, "top_k": 1000}])
def test_workspace_size_formula(lib: gk.GazeKernels, kw: dict) -> None:
    p = problem(**kw)
    assert lib.workspace_size(p) == expected_workspace(p)


def test_workspace_is_monotone_so_the_profile_max_covers_every_shape(lib: gk.GazeKernels) -> None:
    biggest = lib.workspace_size(problem(batch=8, new_tokens=4096, cache_len=8192))
    for b in (1, 3, 8):
        for t in (1, 2, 8, 9, 64, 65, 4096):
            for s in (t, 4096, 8192):
                assert lib.workspace_size(problem(batch=b, new_tokens=t, cache_len=s)) <= biggest


def test_workspace_rejects_unsupported_problems(lib: gk.GazeKernels) -> None:
    with pytest.raises(gk.GazeKernelError, match="head dim 80"):
        lib.workspace_size(problem(head_dim=80))
    with pytest.raises(gk.GazeKernelError, match="batch must be >= 1"):
        lib.workspace_size(problem(batch=0))
    with pytest.raises(gk.GazeKernelError, match="GQA group 16 exceeds 8"):
        lib.workspace_size(problem(q_heads=32, kv_heads=2))


def test_problem_from_inputs(lib: gk.GazeKernels) -> None:
    p = lib.problem_from_inputs(node_inputs(B=3, Hq=14, Hkv=2, T=5, S=77, R=20, D=128, dtype=gk.BF16), attrs(6, 4))
    assert (p.batch, p.q_heads, p.kv_heads, p.new_tokens, p.cache_len, p.num_regions, p.head_dim) == \
        (3, 14, 2, 5, 77, 20, 128)
    assert (p.dtype, p.top_k, p.max_region_tokens) == (gk.BF16, 6, 4)


def test_split_plan(lib: gk.GazeKernels) -> None:
    assert lib.plan_splits(problem(new_tokens=9), 132) == 1  # prefill path: no splits
    assert lib.plan_splits(problem(batch=1, kv_heads=2, cache_len=16384), 132) == 16  # capped at kMaxSplits
    assert lib.plan_splits(problem(batch=1, cache_len=200), 132) == 1  # fewer than 2 x 128 keys
    assert lib.plan_splits(problem(batch=8, kv_heads=8, q_heads=64, cache_len=16384), 16) == 1  # enough blocks
    assert lib.plan_splits(problem(batch=1, kv_heads=2, cache_len=4096), 4) == 4  # 2 x 4 SMs / 2 blocks


def test_status_and_device_error_text(lib: gk.GazeKernels) -> None:
    assert [lib.status_name(s) for s in range(6)] == [
        "ok", "invalid argument", "unsupported", "CUDA error", "device-side contract violation", "internal error"]
    assert lib.describe_device_errors(0) == "no error"
    text = lib.describe_device_errors(7)
    assert "write_offset" in text and "slot_region >= R" in text and "max_region_tokens" in text


def test_forward_without_gpu_fails_cleanly(lib: gk.GazeKernels) -> None:
    if lib.cuda_device_count() > 0:
        pytest.skip("a CUDA GPU is present: forward is exercised by test_plugin_kernels_gpu.py")
    with pytest.raises(gk.GazeKernelError, match="cudaGetDevice|CUDA") as info:
        lib.forward(problem(), gk.Attrs(4, 16, 0.1), gk.Tensors(), 0, 0)
    assert info.value.status == gk.ERR_CUDA


# ---- node v2 shape rules (16 inputs) -------------------------------------------------------------


def node_inputs_v2(B: int = 2, Hq: int = 8, Hkv: int = 2, T: int = 3, S: int = 50, R: int = 12, D: int = 64,
                   N: int = 32, M: int = 9, dtype: int = gk.F16) -> list[tuple[int, tuple[int, ...]]]:
    return [
        (dtype, (B, Hq, T, D)), (dtype, (B, Hkv, T, D)), (dtype, (B, Hkv, T, D)),
        (dtype, (B, Hkv, S, D)), (dtype, (B, Hkv, S, D)), (gk.F32, (B, Hkv, R, D)), (gk.I64, (1,)),
        (gk.I64, (B, S)), (gk.BOOL, (B, S)), (gk.I64, (B, S)), (gk.I64, (B, S)), (gk.BOOL, (B, T)),
        (gk.I64, (B, N)), (gk.I64, (B, R, M)), (gk.I64, (B, R)), (gk.I64, (B, R)),
    ]


def test_v2_outputs_follow_inputs(lib: gk.GazeKernels) -> None:
    a = gk.Attrs(4, 9, 0.125, 1, 1)
    assert lib.infer_outputs_v2(node_inputs_v2(), a) == [
        (gk.F16, (2, 8, 3, 64)), (gk.F16, (2, 2, 50, 64)), (gk.F16, (2, 2, 50, 64)), (gk.F32, (2, 2, 12, 64))]
    assert lib.infer_outputs_v2(node_inputs_v2(B=-1, T=-1, S=-1, N=-1), a)[0][1] == (-1, 8, -1, 64)


@pytest.mark.parametrize(("inputs", "message"), [
    (node_inputs_v2()[:15], "v2 takes 16 inputs, got 15"),
    (_with(node_inputs_v2(), 13, dims=(2, 12)), "'region_slots' must have rank 3"),
    (_with(node_inputs_v2(), 13, dims=(2, 12, 8)), "dimension M is 9 in attribute max_region_tokens but 8"),
    (_with(node_inputs_v2(), 14, dims=(2, 11)), "dimension R is 12 in past_desc.*but 11"),
    (_with(node_inputs_v2(), 12, dims=(2, 0)), "dense_slots must have N >= 1"),
    (_with(node_inputs_v2(), 12, dtype=gk.I32), "'dense_slots' has dtype int32, expected int64"),
    (_with(node_inputs_v2(), 10, dims=(2, 49)), "dimension S is 50 in past_key.*but 49"),
    (_with(node_inputs_v2(), 8, dtype=gk.I64), "'slot_valid' has dtype int64, expected bool"),
    (_with(node_inputs_v2(), 6, dims=(2,)), "write_offset size is 1 in the contract but 2"),
    (_with(node_inputs_v2(), 15, dims=(3, 12)), "dimension B is 2 .* but 3"),
])
def test_v2_shape_rules(lib: gk.GazeKernels, inputs: list, message: str) -> None:
    with pytest.raises(gk.GazeKernelError, match=message) as info:
        lib.infer_outputs_v2(inputs, gk.Attrs(4, 9, 0.125))
    assert info.value.status == gk.ERR_INVALID


# ---- node v2 plugin I/O table (plain C++, no TensorRT, no CUDA) ------------------------------------

V2_HOST_CHECK = r"""
#include <cstdio>
#include "common/gaze_host.h"
using namespace gaze;
int main() {
  int bad = 0;
  auto expect = [&](bool got, bool want, int line) { if (got != want) { std::printf("line %d\n", line); ++bad; } };
  if (std::string(kPluginVersion) != "2") ++bad;
  for (DType q : {DType::kF32, DType::kF16, DType::kBF16}) {
    const DType other = q == DType::kF16 ? DType::kF32 : DType::kF16;
    expect(supports_io_dtype_v2(v2::kQuery, q, q), true, __LINE__);
    for (int pos : {1, 2, 3, 4, 16, 17, 18}) {
      expect(supports_io_dtype_v2(pos, q, q), true, __LINE__);
      expect(supports_io_dtype_v2(pos, other, q), false, __LINE__);
    }
    for (int pos : {5, 19}) expect(supports_io_dtype_v2(pos, DType::kF32, q), true, __LINE__);
    for (int pos : {6, 7, 9, 10, 12, 13, 14, 15}) {
      expect(supports_io_dtype_v2(pos, DType::kI64, q), true, __LINE__);
      expect(supports_io_dtype_v2(pos, DType::kI32, q), false, __LINE__);
    }
    for (int pos : {8, 11}) {
      expect(supports_io_dtype_v2(pos, DType::kBool, q), true, __LINE__);
      expect(supports_io_dtype_v2(pos, DType::kI64, q), false, __LINE__);
    }
  }
  expect(supports_io_dtype_v2(0, DType::kI32, DType::kI32), false, __LINE__);
  expect(supports_io_dtype_v2(20, DType::kF32, DType::kF32), false, __LINE__);
  return bad;
}
"""


def test_v2_plugin_io_dtype_table(tmp_path: Path) -> None:
    """supports_io_dtype_v2 (the TensorRT plugin's supportsFormatCombination) follows the v2 input order."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    import subprocess
    src = tmp_path / "v2_check.cpp"
    src.write_text(V2_HOST_CHECK)
    exe = tmp_path / "v2_check"
    subprocess.run([cxx, "-std=c++17", "-O0", f"-I{REPO / 'plugins_trt'}", str(src),
                    str(REPO / "plugins_trt" / "common" / "gaze_host.cpp"), "-o", str(exe)], check=True)
    result = subprocess.run([str(exe)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_trt_plugin_compiles_against_tensorrt_headers() -> None:
    """Syntax check of the plugin against real TensorRT headers: GAZE_TRT_INCLUDE=/path/to/include (>= 10.3)."""
    inc = os.environ.get("GAZE_TRT_INCLUDE")
    cxx = shutil.which("g++")
    cuda = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"
    if not inc or cxx is None or not (cuda / "cuda_runtime.h").exists():
        pytest.skip("set GAZE_TRT_INCLUDE to a TensorRT include dir (and have g++ and CUDA headers)")
    import subprocess
    result = subprocess.run([cxx, "-std=c++17", "-fsyntax-only", f"-I{inc}", f"-I{cuda}", f"-I{REPO / 'plugins_trt'}",
                             str(REPO / "plugins_trt" / "gaze_attention" / "gaze_attention_plugin.cpp")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
