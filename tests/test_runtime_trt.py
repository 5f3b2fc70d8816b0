"""The TensorRT backend (runtime/trt_backend.py) up to the point where TensorRT is needed.

No TensorRT and no GPU here. These tests pin: the refusal when TensorRT, a CUDA runtime or a GPU
is missing (before anything is allocated), the manifest check before anything is loaded, and the
plain decisions (binding plan, buffer sizes, profile choice, cache length, slot copies, prefill
splits, the CUDA-graph rule).

`test_glue_*` drive the backend with TEST DOUBLES: a fake `tensorrt` module and a fake cuda-python
runtime whose "device memory" is host memory. They check the glue logic only (which calls are made,
in which order, with which shapes and addresses, and that data flows through the copies); they say
NOTHING about TensorRT, the plugin or a GPU. The one test of the real thing is
`test_greedy_tokens_equal_onnxruntime_on_tensorrt` (marked tensorrt + gpu), which skips here.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import os
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gaze_edge.errors import GazeError
from gaze_edge.export import engine_manifest as em
from gaze_edge.export.node import DECODER_CALL_INPUTS
from gaze_edge.runtime import trt_backend as tb
from gaze_edge.runtime.backend import Backend, BackendError, create_backend
from gaze_edge.runtime.cache import CacheSpec, SlotState
from gaze_edge.runtime.folder import ModelShape

SHAPE = ModelShape(vocab_size=16, hidden_size=8, num_layers=2, num_heads=2, kv_heads=1, head_dim=4, max_seq_len=24,
                   num_regions=4, dtype=np.float32, image_size=4, tokens_per_image=4, grid=(2, 2),
                   region_size=(1, 2), regions_per_image=2, max_images=2, top_k_per_layer=(1, 1),
                   num_context_tokens=0)
TRT_VERSION, ARCH = "10.8.0", "sm_87"
MAX_BATCH, MAX_PREFILL, MAX_IMAGES = 2, 8, 2


# ====================================================================== test doubles


def _view(ptr: int, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """A numpy view of fake device memory (host memory at `ptr`)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    return np.frombuffer((ctypes.c_byte * nbytes).from_address(ptr), dtype=dtype).reshape(shape)


class FakeCudart(types.ModuleType):
    """A stand-in for `cuda.bindings.runtime`: calls return (err, *values); device memory is host memory.

    While a stream is capturing, enqueued work is recorded (not run); a graph launch runs the record.
    """

    def __init__(self, log: list[tuple[Any, ...]], devices: int = 1) -> None:
        super().__init__("cuda.bindings.runtime")
        self.log, self.devices = log, devices
        self.mem: dict[int, Any] = {}
        self.cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2)
        self.cudaStreamCaptureMode = types.SimpleNamespace(cudaStreamCaptureModeGlobal=0)
        self.capturing: list[Any] | None = None
        self.graphs: dict[int, list[Any]] = {}
        self._next = 100

    def _id(self) -> int:
        self._next += 1
        return self._next

    def cudaGetDeviceCount(self) -> tuple[int, int]:
        return (0 if self.devices else 100, self.devices)

    def cudaMalloc(self, nbytes: int) -> tuple[int, int]:
        buf = ctypes.create_string_buffer(nbytes)
        self.mem[ctypes.addressof(buf)] = buf
        self.log.append(("malloc", nbytes))
        return 0, ctypes.addressof(buf)

    def cudaFree(self, ptr: int) -> tuple[int]:
        del self.mem[ptr]
        self.log.append(("free",))
        return (0,)

    def cudaMemsetAsync(self, ptr: int, value: int, nbytes: int, stream: int) -> tuple[int]:
        ctypes.memset(ptr, value, nbytes)
        return (0,)

    def cudaMemcpyAsync(self, dst: int, src: int, nbytes: int, kind: int, stream: int) -> tuple[int]:
        assert self.capturing is None, "copies must stay outside the CUDA graph"
        ctypes.memmove(dst, src, nbytes)
        self.log.append(("memcpy", "h2d" if kind == 1 else "d2h", nbytes))
        return (0,)

    def cudaMemcpy2DAsync(self, dst: int, dpitch: int, src: int, spitch: int, width: int, height: int, kind: int,
                          stream: int) -> tuple[int]:
        for row in range(height):
            ctypes.memmove(dst + row * dpitch, src + row * spitch, width)
        self.log.append(("memcpy2d", width, height))
        return (0,)

    def cudaStreamCreateWithFlags(self, flags: int) -> tuple[int, int]:
        return 0, 7

    def cudaStreamSynchronize(self, stream: int) -> tuple[int]:
        return (0,)

    def cudaStreamDestroy(self, stream: int) -> tuple[int]:
        return (0,)

    def cudaStreamBeginCapture(self, stream: int, mode: int) -> tuple[int]:
        self.capturing = []
        self.log.append(("begin_capture",))
        return (0,)

    def cudaStreamEndCapture(self, stream: int) -> tuple[int, int]:
        graph = self._id()
        self.graphs[graph], self.capturing = self.capturing or [], None
        self.log.append(("end_capture",))
        return 0, graph

    def cudaGraphInstantiateWithFlags(self, graph: int, flags: int) -> tuple[int, int]:
        exec_ = self._id()
        self.graphs[exec_] = list(self.graphs[graph])
        return 0, exec_

    def cudaGraphDestroy(self, graph: int) -> tuple[int]:
        del self.graphs[graph]
        return (0,)

    def cudaGraphLaunch(self, exec_: int, stream: int) -> tuple[int]:
        self.log.append(("graph_launch",))
        for work in self.graphs[exec_]:
            work()
        return (0,)

    def cudaGraphExecDestroy(self, exec_: int) -> tuple[int]:
        self.log.append(("graph_destroy",))
        del self.graphs[exec_]
        return (0,)


class _IOMode:
    INPUT, OUTPUT = "input", "output"


I64, B1 = np.dtype(np.int64), np.dtype(np.bool_)


def _decoder_io(shape: ModelShape) -> dict[str, tuple[str, Any]]:
    """The v2 decoder engine's I/O as docs/ONNX_CONTRACT.md lists it (written out, not taken from the plan)."""
    dt = np.dtype(shape.dtype)
    io: dict[str, tuple[str, Any]] = {
        "inputs_embeds": (_IOMode.INPUT, dt), "logits_positions": (_IOMode.INPUT, I64),
        "write_offset": (_IOMode.INPUT, I64), "slot_pos": (_IOMode.INPUT, I64), "slot_valid": (_IOMode.INPUT, B1),
        "slot_region": (_IOMode.INPUT, I64), "slot_image": (_IOMode.INPUT, I64), "gaze": (_IOMode.INPUT, B1),
        "dense_slots": (_IOMode.INPUT, I64), "region_slots": (_IOMode.INPUT, I64),
        "region_count": (_IOMode.INPUT, I64), "region_last": (_IOMode.INPUT, I64),
        "logits": (_IOMode.OUTPUT, dt)}
    for i in range(shape.num_layers):
        for kind in ("key", "value", "desc"):
            d = np.dtype(np.float32) if kind == "desc" else dt
            io[f"past_key_values.{i}.{kind}"] = (_IOMode.INPUT, d)
            io[f"present.{i}.{kind}"] = (_IOMode.OUTPUT, d)
    if FAKE_OPTIONS["query_outputs"]:
        io.update({f"gaze_query.{i}": (_IOMode.OUTPUT, dt) for i in range(shape.num_layers)})
    return io


def _decoder_dims(shape: ModelShape) -> dict[str, tuple[int, ...]]:
    """The v2 decoder inputs' dims as decoder.onnx declares them (-1 dynamic; docs/ONNX_CONTRACT.md)."""
    r, m = shape.num_regions, shape.max_region_tokens
    dims = {"inputs_embeds": (-1, -1, shape.hidden_size), "logits_positions": (-1,), "write_offset": (1,),
            "gaze": (-1, -1), "dense_slots": (-1, -1), "region_slots": (-1, r, m), "region_count": (-1, r),
            "region_last": (-1, r), **{n: (-1, -1) for n in ("slot_pos", "slot_valid", "slot_region", "slot_image")}}
    for i in range(shape.num_layers):
        dims[f"past_key_values.{i}.key"] = dims[f"past_key_values.{i}.value"] = (-1, shape.kv_heads, -1,
                                                                                 shape.head_dim)
        dims[f"past_key_values.{i}.desc"] = (-1, shape.kv_heads, r, shape.head_dim)
    return dims


def _build_shapes(shape: ModelShape) -> Any:
    """What `gaze build --max-batch MAX_BATCH --max-prefill MAX_PREFILL` reads from gaze_config.json."""
    from gaze_edge.export import trt_build

    prefill = FAKE_OPTIONS["max_prefill"]
    return trt_build.BuildShapes(MAX_BATCH, prefill, shape.max_seq_len, shape.num_regions, MAX_IMAGES,
                                 shape.image_size, shape.hidden_size, shape.kv_heads, shape.head_dim, shape.num_layers)


# query_outputs: the fake decoder also outputs gaze_query.{i} (an export made with --gaze-map-outputs)
# max_prefill: the engines' --max-prefill (the prefill profile's largest T)
FAKE_OPTIONS: dict[str, Any] = {"query_outputs": False, "max_prefill": MAX_PREFILL}


class FakeEngine:
    def __init__(self, kind: str, shape: ModelShape, cudart: FakeCudart, log: list[tuple[Any, ...]],
                 io: dict[str, tuple[str, Any]] | None = None, dims: dict[str, tuple[int, ...]] | None = None) -> None:
        self.kind, self.shape, self.cudart, self.log = kind, shape, cudart, log
        s = shape
        self.fed: list[dict[str, np.ndarray]] = []  # the decoder inputs of every execution, read from "device"
        if kind == "decoder":
            self.io = io if io is not None else _decoder_io(s)
            self.dims = dims if dims is not None else _decoder_dims(s)
            self.num_optimization_profiles = 2
        else:
            self.io = {"pixel_values": (_IOMode.INPUT, np.dtype(s.dtype)), "image_embeds": (_IOMode.OUTPUT,
                                                                                            np.dtype(s.dtype))}
            self.num_optimization_profiles = 1
        self.names = list(self.io)
        self.num_io_tensors = len(self.names)
        self.device_memory_size = 4096

    def get_tensor_name(self, i: int) -> str:
        return self.names[i]

    def get_tensor_mode(self, name: str) -> str:
        return self.io[name][0]

    def get_tensor_dtype(self, name: str) -> Any:
        return self.io[name][1]

    def get_tensor_profile_shape(self, name: str, profile: int) -> list[tuple[int, ...]]:
        s = self.shape
        if name == "pixel_values":
            return [(1, 3, s.image_size, s.image_size), (MAX_IMAGES, 3, s.image_size, s.image_size),
                    (MAX_IMAGES * MAX_BATCH, 3, s.image_size, s.image_size)]
        # The profiles `gaze build` gives an engine (export/trt_build.py decoder_profile): 0 prefill, 1 decode.
        from gaze_edge.export import trt_build

        return list(trt_build.decoder_profile(name, self.dims[name], _build_shapes(s),
                                              "prefill" if profile == 0 else "decode"))

    def create_execution_context(self) -> FakeContext:
        return FakeContext(self)


class FakeContext:
    """Records calls; checks shapes against the active profile; runs a toy computation on execute."""

    def __init__(self, engine: FakeEngine) -> None:
        self.engine, self.log = engine, engine.log
        self.profile = 0
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}

    def set_optimization_profile_async(self, profile: int, stream: int) -> bool:
        self.log.append(("set_profile", self.engine.kind, profile))
        self.profile, self.shapes = profile, {}  # as in TensorRT: input shapes must be set again
        return True

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        self.log.append(("set_input_shape", self.engine.kind, name, tuple(shape)))
        if self.engine.io.get(name, ("",))[0] != _IOMode.INPUT:
            return False
        lo, _, hi = self.engine.get_tensor_profile_shape(name, self.profile)  # every input, as TensorRT checks
        if len(shape) != len(lo) or not all(a <= b <= c for a, b, c in zip(lo, shape, hi, strict=True)):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self.log.append(("set_tensor_address", self.engine.kind, name, ptr))
        self.addresses[name] = ptr
        return name in self.engine.io

    def execute_async_v3(self, stream: int) -> bool:
        io = self.engine.io
        if set(self.addresses) != set(io) or any(n not in self.shapes for n, (m, _) in io.items() if m == "input"):
            return False
        cudart = self.engine.cudart
        self.log.append(("execute", self.engine.kind, "captured" if cudart.capturing is not None else "run",
                         self.shapes.get("inputs_embeds", self.shapes.get("pixel_values"))))
        work = self._decoder if self.engine.kind == "decoder" else self._vision
        if cudart.capturing is not None:
            cudart.capturing.append(work)
        else:
            work()
        return True

    def _decoder(self) -> None:
        """Toy decoder: logits of column logits_positions[j] peak at token (its slot % V); new keys = embeddings
        (in place into past==present). Every input is recorded as the engine reads it (`fed`)."""
        s, io = self.engine.shape, self.engine.io
        self.engine.fed.append({n: _view(self.addresses[n], self.shapes[n], io[n][1]).copy()
                                for n, (mode, _) in io.items() if mode == _IOMode.INPUT and "past_key" not in n})
        b, t, h = self.shapes["inputs_embeds"]
        offset = int(_view(self.addresses["write_offset"], (1,), np.int64)[0])
        positions = _view(self.addresses["logits_positions"], self.shapes["logits_positions"], np.int64)
        embeds = _view(self.addresses["inputs_embeds"], (b, t, h), s.dtype)
        logits = _view(self.addresses["logits"], (b, positions.size, s.vocab_size), s.dtype)
        for i in range(s.num_layers):
            assert self.addresses[f"present.{i}.key"] == self.addresses[f"past_key_values.{i}.key"]
            key = _view(self.addresses[f"present.{i}.key"], self.shapes[f"past_key_values.{i}.key"], s.dtype)
            key[:, :, offset:offset + t, :] = embeds[:, None, :, : s.head_dim]
        for i in range(s.num_layers):
            if f"gaze_query.{i}" in self.addresses:
                query = _view(self.addresses[f"gaze_query.{i}"], (b, s.num_heads, t, s.head_dim), s.dtype)
                query[...] = i + offset + np.arange(t)[None, None, :, None]
        slots = offset + positions
        logits[...] = -np.abs(np.arange(s.vocab_size)[None, None, :] - (slots % s.vocab_size)[None, :, None])

    def _vision(self) -> None:
        s = self.engine.shape
        n = self.shapes["pixel_values"][0]
        pixels = _view(self.addresses["pixel_values"], self.shapes["pixel_values"], s.dtype)
        out = _view(self.addresses["image_embeds"], (n, s.tokens_per_image, s.hidden_size), s.dtype)
        out[...] = pixels[:, 0, 0, 0][:, None, None] + np.arange(s.tokens_per_image)[None, :, None]


def fake_tensorrt(cudart: FakeCudart, log: list[tuple[Any, ...]], shape: ModelShape = SHAPE,
                  version: str = TRT_VERSION, io: dict[str, tuple[str, Any]] | None = None,
                  dims: dict[str, tuple[int, ...]] | None = None) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version  # type: ignore[attr-defined]

    class Logger:
        WARNING = 2

        def __init__(self, severity: int) -> None:
            self.severity = severity

    class Registry:
        loaded: list[str] = []

        def load_library(self, path: str) -> object:
            log.append(("load_library", path))
            self.loaded.append(path)
            return object()

        def get_creator(self, name: str, version: str, namespace: str) -> object | None:
            ok = bool(self.loaded) and (name, version, namespace) == ("GazeAttention", tb.PLUGIN_VERSION, "gaze")
            return object() if ok else None

    registry = Registry()

    class Runtime:
        engines: list[FakeEngine] = []

        def __init__(self, logger: Logger) -> None:
            pass

        def deserialize_cuda_engine(self, data: bytes) -> FakeEngine:
            kind = data.decode().removeprefix("fake-")
            log.append(("deserialize", kind))
            self.engines.append(FakeEngine(kind, shape, cudart, log, io, dims))
            return self.engines[-1]

    trt.Logger = Logger  # type: ignore[attr-defined]
    trt.Runtime = Runtime  # type: ignore[attr-defined]
    trt.get_plugin_registry = lambda: registry  # type: ignore[attr-defined]
    trt.TensorIOMode = _IOMode  # type: ignore[attr-defined]
    trt.nptype = lambda d: d  # type: ignore[attr-defined]
    return trt


def install(monkeypatch: pytest.MonkeyPatch, trt: types.ModuleType | None, cudart: types.ModuleType | None) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    cuda, bindings = types.ModuleType("cuda"), types.ModuleType("cuda.bindings")
    monkeypatch.setitem(sys.modules, "cuda", cuda)
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", cudart)
    monkeypatch.setitem(sys.modules, "cuda.cudart", None)
    monkeypatch.setattr(tb.engine_manifest, "gpu_arch", lambda device=0: (ARCH, "Fake Orin"))


def make_folder(tmp_path: Path, shape: ModelShape = SHAPE, trt_version: str = TRT_VERSION,
                arch: str = ARCH) -> types.SimpleNamespace:
    """An export folder stand-in (the backend reads path, shape, has_gaze_queries) with an engines/ folder."""
    engines = tmp_path / "engines"
    engines.mkdir(parents=True, exist_ok=True)
    (engines / "decoder.engine").write_bytes(b"fake-decoder")
    (engines / "vision.engine").write_bytes(b"fake-vision")
    plugin = engines / "libgaze_trt_plugin.so"
    plugin.write_bytes(b"not a real plugin library")
    em.write_manifest(engines, tensorrt_version=trt_version, gpu_arch=arch, gpu_name="Orin", plugin_path=plugin,
                      engines={"decoder": {"file": "decoder.engine", "profiles": ["prefill", "decode"]},
                               "vision": {"file": "vision.engine", "profiles": ["vision"]}}, shapes={})
    # The plugin version this backend implements (v2): a v1 export is refused (test_refuses_a_v1_export).
    config = {"gaze": {"node": {"plugin_version": "2"}}}
    return types.SimpleNamespace(path=tmp_path, shape=shape, has_gaze_queries=False, config=config)


@pytest.fixture
def doubles(monkeypatch: pytest.MonkeyPatch) -> tuple[list[tuple[Any, ...]], FakeCudart]:
    log: list[tuple[Any, ...]] = []
    cudart = FakeCudart(log)
    install(monkeypatch, fake_tensorrt(cudart, log), cudart)
    return log, cudart


# ====================================================================== refusals


@pytest.mark.parametrize("version", ["1", "3", None])
def test_refuses_a_v1_export(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, version: str | None) -> None:
    """This backend binds the GazeAttention v2 inputs: a v1 export (or another version) is refused first, in one
    line saying to re-export."""
    log: list[tuple[Any, ...]] = []
    install(monkeypatch, None, FakeCudart(log))
    folder = make_folder(tmp_path)
    folder.config = {"gaze": {"node": {"plugin_version": version}}} if version else {"gaze": {}}
    with pytest.raises(BackendError, match=f"plugin version {version or '[?]'}.*re-export it with `gaze export`.*"
                                           "--backend onnxruntime") as info:
        tb.TrtBackend(folder)  # type: ignore[arg-type]
    assert "\n" not in str(info.value) and ("older gaze-edge" in str(info.value)) is (version == "1")
    assert log == []


def test_refuses_when_tensorrt_is_not_installed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    log: list[tuple[Any, ...]] = []
    install(monkeypatch, None, FakeCudart(log))
    with pytest.raises(tb.TensorRTUnavailableError, match="TensorRT backend is not available here: TensorRT is not "
                                                          "installed") as info:
        tb.TrtBackend(make_folder(tmp_path))  # type: ignore[arg-type]
    assert isinstance(info.value, BackendError) and isinstance(info.value, GazeError)
    assert "--backend onnxruntime" in str(info.value) and "gaze build" in str(info.value)
    assert log == []  # nothing touched the CUDA runtime, nothing allocated
    with pytest.raises(BackendError, match="TensorRT backend is not available"):  # the registered path says the same
        create_backend("tensorrt", make_folder(tmp_path))  # type: ignore[arg-type]


def test_refuses_a_placeholder_tensorrt_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    log: list[tuple[Any, ...]] = []
    placeholder = types.ModuleType("tensorrt")
    placeholder.__version__ = "10.0.0.post1"  # type: ignore[attr-defined]
    install(monkeypatch, placeholder, FakeCudart(log))
    with pytest.raises(tb.TensorRTUnavailableError, match="is a placeholder, not TensorRT: it has no Runtime"):
        tb.TrtBackend(make_folder(tmp_path))  # type: ignore[arg-type]
    assert log == []


def test_refuses_a_tensorrt_package_that_raises_on_import(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pkg = tmp_path / "site" / "tensorrt"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('install TensorRT from pypi.nvidia.com')\n")
    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    with pytest.raises(tb.TensorRTUnavailableError, match="cannot be imported.*placeholder"):
        tb.import_tensorrt_runtime()


@pytest.mark.parametrize("version", ["8.6.1", "10.2.0", "12.0.0"])
def test_refuses_unsupported_tensorrt_versions(monkeypatch: pytest.MonkeyPatch, version: str) -> None:
    log: list[tuple[Any, ...]] = []
    install(monkeypatch, fake_tensorrt(FakeCudart(log), log, version=version), None)
    with pytest.raises(tb.TensorRTUnavailableError, match=f"TensorRT {version} is not supported"):
        tb.import_tensorrt_runtime()


def test_refuses_without_a_gpu_before_allocating(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    log: list[tuple[Any, ...]] = []
    cudart = FakeCudart(log, devices=0)
    install(monkeypatch, fake_tensorrt(cudart, log), cudart)
    with pytest.raises(tb.TensorRTUnavailableError, match="not available here: no usable CUDA GPU"):
        tb.TrtBackend(make_folder(tmp_path))  # type: ignore[arg-type]
    assert not [e for e in log if e[0] in ("malloc", "load_library", "deserialize")]


def test_cudart_falls_back_to_ctypes_and_this_machine_refuses_or_has_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", None)
    monkeypatch.setitem(sys.modules, "cuda.cudart", None)
    try:
        cuda = tb.load_cudart()
    except tb.TensorRTUnavailableError as exc:  # no libcudart at all
        assert "no CUDA runtime" in str(exc)
        return
    assert isinstance(cuda, tb.CtypesCudaRuntime)
    try:
        assert tb.require_gpu(cuda) >= 1
    except tb.TensorRTUnavailableError as exc:
        assert "no usable CUDA GPU" in str(exc) or "no CUDA GPU" in str(exc)


@pytest.mark.parametrize("problem, message", [
    ("version", "built with TensorRT 10.3.0, this machine has TensorRT 10.8.0"),
    ("arch", "built for sm_110"),
    ("plugin", "is not the one the engines were built with"),
    ("missing", "has no engine_manifest.json"),
])
def test_manifest_mismatch_refuses_before_loading_anything(doubles: tuple[list[tuple[Any, ...]], FakeCudart],
                                                          tmp_path: Path, problem: str, message: str) -> None:
    log, _ = doubles
    folder = make_folder(tmp_path, trt_version="10.3.0" if problem == "version" else TRT_VERSION,
                         arch="sm_110" if problem == "arch" else ARCH)
    if problem == "plugin":
        (tmp_path / "engines" / "libgaze_trt_plugin.so").write_bytes(b"another build")
    if problem == "missing":
        (tmp_path / "engines" / em.MANIFEST).unlink()
    with pytest.raises(em.EngineManifestError, match=message) as info:
        tb.TrtBackend(folder)  # type: ignore[arg-type]
    assert isinstance(info.value, GazeError)
    assert not [e for e in log if e[0] in ("malloc", "load_library", "deserialize")]


@pytest.mark.parametrize("version", ["10.3.0", "10.13.0", "10.16.1", "11.1.0"])
def test_accepts_tensorrt_10_3_to_11(monkeypatch: pytest.MonkeyPatch, version: str) -> None:
    log: list[tuple[Any, ...]] = []
    trt = fake_tensorrt(FakeCudart(log), log, version=version)
    install(monkeypatch, trt, None)
    assert tb.import_tensorrt_runtime() is trt


def test_a_failed_plugin_dlopen_is_one_clear_line(doubles: tuple[list[tuple[Any, ...]], FakeCudart],
                                                  tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """IPluginRegistry.load_library returns None on a failed dlopen (it does not raise): refused by path."""
    log, _ = doubles
    registry = sys.modules["tensorrt"].get_plugin_registry()  # type: ignore[union-attr]
    monkeypatch.setattr(registry, "load_library", lambda path: log.append(("load_library", path)))  # -> None
    folder = make_folder(tmp_path)
    with pytest.raises(tb.TensorRTRuntimeError) as info:
        tb.TrtBackend(folder)  # type: ignore[arg-type]
    message = str(info.value)
    plugin = str((tmp_path / "engines" / "libgaze_trt_plugin.so").resolve())
    assert plugin in message and "dlopen failed" in message and "make plugins" in message and "\n" not in message
    assert not [e for e in log if e[0] in ("malloc", "deserialize")]


# ====================================================================== plain decisions


def test_binding_plan_binds_past_and_present_to_one_buffer_of_the_kv_formula() -> None:
    spec = CacheSpec.plan(SHAPE, batch=2, capacity=SHAPE.max_seq_len)
    buffers = tb.plan_decoder_buffers(SHAPE, 2, spec.capacity, MAX_PREFILL, query_outputs=True)
    for tokens in (1, 5):
        plan = tb.plan_decoder_bindings(SHAPE, 2, spec.capacity, tokens, query_outputs=True)
        by_tensor = {b.tensor: b for b in plan}
        assert len(by_tensor) == len(plan)
        for i in range(SHAPE.num_layers):
            for kind in ("key", "value", "desc"):
                past, present = by_tensor[f"past_key_values.{i}.{kind}"], by_tensor[f"present.{i}.{kind}"]
                assert past.buffer == present.buffer == f"kv.{i}.{kind}"
                assert past.shape == present.shape and past.is_input and not present.is_input
        for b in plan:  # every binding fits its buffer and has its dtype
            assert b.nbytes <= buffers[b.buffer].nbytes and b.dtype == buffers[b.buffer].dtype
        assert by_tensor["inputs_embeds"].shape == (2, tokens, SHAPE.hidden_size)
        assert by_tensor["gaze_query.1"].shape == (2, SHAPE.num_heads, tokens, SHAPE.head_dim)
        expected = set(_decoder_io(SHAPE)) | {f"gaze_query.{i}" for i in range(SHAPE.num_layers)}
        assert set(by_tensor) == expected
        assert by_tensor["logits"].shape == (2, 1, SHAPE.vocab_size)  # one logits column by default
        wide = {b.tensor: b.shape for b in tb.plan_decoder_bindings(SHAPE, 2, spec.capacity, tokens, True, dense=32,
                                                                    positions=tokens)}
        assert wide["logits_positions"] == (tokens,) and wide["logits"] == (2, tokens, SHAPE.vocab_size)
        assert wide["dense_slots"] == (2, 32) and wide["region_slots"] == (2, 4, SHAPE.max_region_tokens)
    with pytest.raises(GazeError, match="logits of 2 columns"):
        tb.plan_decoder_bindings(SHAPE, 2, spec.capacity, 1, True, positions=2)
    with pytest.raises(BackendError, match="dense_slots of 64 columns"):  # the widest: 24 slots -> 32 columns
        tb.plan_decoder_bindings(SHAPE, 2, spec.capacity, 1, True, dense=64)
    kv = sum(b.nbytes for n, b in buffers.items() if n.startswith("kv.") and not n.endswith("desc"))
    desc = sum(b.nbytes for n, b in buffers.items() if n.endswith(".desc"))
    per_slot = sum(b.nbytes for n, b in buffers.items() if n.startswith("slot_"))
    regions = sum(buffers[n].nbytes for n in ("region_slots", "region_count", "region_last"))
    assert kv == spec.kv_bytes == 2 * 2 * 2 * 1 * 24 * 4 * 4
    assert desc == spec.desc_bytes and per_slot == spec.batch * spec.capacity * (8 + 1 + 8 + 8)
    assert buffers["dense_slots"].shape == (2, 32)  # the widest dense_slots: S rounded up to DENSE_STEP
    assert regions == spec.batch * SHAPE.num_regions * (16 + 8 * SHAPE.max_region_tokens)
    # the layout tables as runtime/cache.py counts them, except that dense_slots is allocated at its widest
    assert per_slot + regions + buffers["dense_slots"].nbytes - spec.slot_bytes == 2 * (32 - 24) * 8
    assert tb.SLOT_METADATA_BYTES == 33
    assert len([n for n in buffers if n.startswith("kv.")]) == 3 * SHAPE.num_layers  # one buffer, not two


def test_engine_io_check_names_what_differs() -> None:
    plan = tb.plan_decoder_bindings(SHAPE, 1, 1, 1, query_outputs=False)
    actual = {n: (m == _IOMode.INPUT, d) for n, (m, d) in _decoder_io(SHAPE).items()}
    assert tb.check_engine_io(plan, actual) == []
    actual["slot_valid"] = (True, np.dtype(np.int32))
    del actual["present.1.desc"]
    actual["gaze_query.0"] = (False, np.dtype(np.float32))
    problems = tb.check_engine_io(plan, actual)
    assert any("slot_valid" in p and "int32" in p for p in problems)
    assert any("present.1.desc" in p for p in problems) and any("gaze_query.0" in p for p in problems)


def test_profile_choice_by_the_calls_token_count() -> None:
    prefill = tb.ProfileRange(0, (1, 2), (1, 8), (24, 24))
    decode = tb.ProfileRange(1, (1, 2), (1, 1), (24, 24))
    profiles = [prefill, decode]
    assert tb.choose_profile(profiles, 1, 1) == tb.DECODE_PROFILE
    assert tb.choose_profile(profiles, 2, 1) == tb.DECODE_PROFILE
    assert [tb.choose_profile(profiles, 2, t) for t in (2, 5, 8)] == [tb.PREFILL_PROFILE] * 3
    with pytest.raises(BackendError, match="no decoder engine profile serves a call of batch 1 x 9 tokens"):
        tb.choose_profile(profiles, 1, 9)
    with pytest.raises(BackendError, match="--max-batch"):
        tb.choose_profile(profiles, 3, 1)
    assert tb.choose_profile([prefill], 1, 1) == 0  # an engine with one profile serves decode too
    assert tb.max_call_tokens(profiles, 2) == 8
    with pytest.raises(BackendError, match="not 3"):
        tb.max_call_tokens(profiles, 3)
    assert tb.profile_range(1, [(1, 1, 8), (2, 1, 8), (2, 1, 8)], [(1, 1, 24, 4)] * 3) == decode
    narrow = tb.profile_range(1, [(1, 1, 8), (2, 1, 8), (2, 1, 8)], [(1, 1, 24, 4)] * 3, [(1, 1), (2, 16), (2, 16)])
    assert narrow.dense == (1, 16)
    with pytest.raises(BackendError, match="dense_slots may grow to 32 columns.*at most 16"):
        tb.cache_length([narrow], 10)


def test_cache_length_follows_the_engine_profiles() -> None:
    fixed = [tb.ProfileRange(p, (1, 1), (1, 8), (24, 24)) for p in (0, 1)]
    assert tb.cache_length(fixed, 10) == 24  # gaze build fixes S = max_seq_len
    dynamic = [tb.ProfileRange(p, (1, 1), (1, 8), (1, 64)) for p in (0, 1)]
    assert tb.cache_length(dynamic, 10) == 10
    with pytest.raises(BackendError, match="needs 30 cache slots.*accept 24..24"):
        tb.cache_length(fixed, 30)


def test_slot_copies_move_only_the_columns_of_the_call() -> None:
    copies = tb.plan_slot_copies(batch=2, host_capacity=10, device_capacity=24, offset=7, tokens=1)
    assert [(c.buffer, c.dst_offset, c.dst_pitch, c.src_offset, c.src_pitch, c.width, c.height) for c in copies] == [
        ("slot_pos", 56, 192, 56, 80, 8, 2), ("slot_valid", 7, 24, 7, 10, 1, 2),
        ("slot_region", 56, 192, 56, 80, 8, 2), ("slot_image", 56, 192, 56, 80, 8, 2)]
    with pytest.raises(GazeError, match="do not fit"):
        tb.plan_slot_copies(2, 10, 24, 9, 2)


def _apply(copies: list[Any], host: dict[str, np.ndarray], device: dict[str, np.ndarray]) -> None:
    """cudaMemcpy2D of each copy, on numpy bytes (what FakeCudart does on fake device memory)."""
    for c in copies:
        src, dst = np.ascontiguousarray(host[c.buffer]).view(np.uint8).reshape(-1), device[c.buffer]
        for row in range(c.height):
            dst[c.dst_offset + row * c.dst_pitch:][: c.width] = src[c.src_offset + row * c.src_pitch:][: c.width]


def test_table_copies_mirror_slotstate_through_images_and_dense_regrowth() -> None:
    """Pure plan (no fakes): after each call's copies the device tables, read at their binding shapes, are the
    SlotState tables ONNX Runtime binds; dense_slots is copied whole (and re-bound) only when it grew."""
    shape = dataclasses.replace(SHAPE, max_seq_len=48)
    batch, host_capacity, device_capacity = 2, 44, 48
    specs = tb.plan_decoder_buffers(shape, batch, device_capacity, MAX_PREFILL, query_outputs=False)
    device = {n: np.full(spec.nbytes, tb.FILL_BYTE.get(n, 0), np.uint8) for n, spec in specs.items()}
    slots = SlotState(batch, host_capacity, shape.num_regions, shape.max_region_tokens)
    mirror = tb.DeviceTables.empty(slots)
    # row 1 is left-padded by 2; images: regions 0,1 (image 0) in the first chunk, regions 2,3 (image 1) later
    valid = np.ones((batch, 9), bool)
    valid[1, :2] = False
    pos = np.clip(np.cumsum(valid, 1) - 1, 0, None)
    region = np.array([[-1, -1, -1, 0, 1, 0, 1, -1, -1], [-1, -1, -1, -1, -1, 0, 1, 0, 1]])
    image = np.where(region >= 0, 0, -1)
    image[0, 7] = 0  # a context token after image 0
    calls = [(pos, region, valid, image)]
    calls.append((pos[:, -1:] + np.arange(1, 5), np.array([[2, 3, 3, 2]] * 2), np.ones((batch, 4), bool),
                  np.ones((batch, 4), np.int64)))
    for step in range(30):
        calls.append((np.full((batch, 1), 13 + step), np.full((batch, 1), -1), np.ones((batch, 1), bool), None))
    widths: list[int] = []
    dense_copies: list[list[tuple[int, int]]] = []
    region_copies: list[list[tuple[str, int, int]]] = []
    for p, r, v, im in calls:
        slots.write(p, r, v, im)
        copies = tb.plan_table_copies(slots, device_capacity, mirror)
        _apply(copies, slots.tables(), device)
        dense_copies.append([(c.width, c.height) for c in copies if c.buffer == "dense_slots"])
        region_copies.append([(c.buffer, c.dst_offset, c.width) for c in copies if c.buffer.startswith("region")])
        widths.append(mirror.dense)
        bound = {b.tensor: b for b in tb.plan_decoder_bindings(shape, batch, device_capacity, 1, False,
                                                                dense=mirror.dense)}
        for name, want in slots.tables().items():
            b = bound[name]
            got = device[name][: b.nbytes].view(b.dtype).reshape(b.shape)
            if b.shape[1:] == want.shape[1:] or name == "dense_slots":
                np.testing.assert_array_equal(got, want, err_msg=name)
                assert got.shape == want.shape and got.dtype == want.dtype, name
            else:  # per-slot tables: the engine's S is larger; the slots beyond this generation are empty
                np.testing.assert_array_equal(got[:, :host_capacity], want, err_msg=name)
                fresh = SlotState(batch, device_capacity - host_capacity, 1, 1).tables()[name]
                np.testing.assert_array_equal(got[:, host_capacity:], fresh, err_msg=name)
    assert int(slots.dense_count[0]) == 5 + 30 > 32 and widths[-1] == 64 and widths[0] == 32
    grew = widths.index(64)
    assert dense_copies[0] == [(32 * 8, batch)] and dense_copies[grew] == [(64 * 8, batch)]  # whole, new width
    # other decode steps copy the new entries only: columns [min copied count, max count) = rows 2 apart
    assert all(c == [(3 * 8, batch)] for i, c in enumerate(dense_copies[2:], 2) if i != grew)
    m = shape.max_region_tokens
    assert region_copies[0] == [("region_slots", 0, 2 * m * 8), ("region_count", 0, 16), ("region_last", 0, 16)]
    assert region_copies[1] == [("region_slots", 2 * m * 8, 2 * m * 8), ("region_count", 16, 16),
                                ("region_last", 16, 16)]  # image 1: regions 2, 3 only
    assert not any(region_copies[2:])  # text tokens touch no region table
    assert tb.plan_table_copies(slots, device_capacity, mirror) == []  # nothing changed since the last sync


def test_sub_calls_scatter_logits_positions() -> None:
    parts = tb.plan_sub_calls(np.array([11, 2, 3, 6]), [5, 7, 9, 12])
    assert [(p.begin, p.end, p.positions.tolist(), p.index.tolist()) for p in parts] == [
        (0, 5, [2, 3], [1, 2]), (5, 7, [1], [3]), (7, 9, [1], []), (9, 12, [2], [0])]
    assert tb.check_logits_positions(None, 4).tolist() == [3]
    for bad in (np.array([4]), np.array([], np.int64), np.array([-1])):
        with pytest.raises(GazeError, match="not columns of a call of 4"):
            tb.check_logits_positions(bad, 4)


def test_prefill_split_never_cuts_an_image() -> None:
    # columns: 2 text, image 0 (regions 0,1: 4 tokens), 1 text, image 1 (regions 2,3), 1 text; second row padded
    row0 = [-1, -1, 0, 0, 1, 1, -1, 2, 3, 2, 3, -1]
    row1 = [-1, -1, -1, 0, 0, 1, 1, -1, 2, 2, 3, 3]
    region = np.array([row0, row1])
    ends = tb.split_prefill(region, regions_per_image=2, max_tokens=5)
    assert ends[-1] == 12 and all(b - a <= 5 for a, b in zip([0, *ends], ends, strict=False))
    image = np.where(region >= 0, region // 2, -1)
    for cut in ends[:-1]:
        assert not ((image[:, cut - 1] == image[:, cut]) & (image[:, cut] >= 0)).any(), cut
    assert tb.split_prefill(region, 2, 12) == [12]
    with pytest.raises(BackendError, match="--max-prefill"):
        tb.split_prefill(region, 2, 3)


def test_cuda_graph_rule_warm_up_capture_replay_recapture() -> None:
    g = tb.GraphPolicy(warmup=1)
    a, b = (1, 1, 1, 1), (1, 2, 1, 1)
    assert [g.action(a)] == [tb.CAPTURE]
    g.mark_captured(a)
    assert [g.action(a), g.action(a)] == [tb.REPLAY, tb.REPLAY]
    assert g.action(b) == tb.CAPTURE  # shapes changed (batch): re-capture
    g.mark_captured(b)
    assert g.action(b) == tb.REPLAY
    g.invalidate()  # new buffers or a profile switch
    assert g.action(b) == tb.CAPTURE
    g2 = tb.GraphPolicy(warmup=2)
    assert [g2.action(a), g2.action(a)] == [tb.EAGER, tb.CAPTURE]
    with pytest.raises(ValueError):
        tb.GraphPolicy(warmup=0)


# ====================================================================== glue logic against test doubles


def _prefill_slots(batch: int, capacity: int, length: int) -> SlotState:
    slots = SlotState(batch, capacity, SHAPE.num_regions, SHAPE.max_region_tokens)
    slots.write(np.tile(np.arange(length), (batch, 1)), np.full((batch, length), -1), np.ones((batch, length), bool))
    return slots


def _step(slots: SlotState, batch: int) -> int:
    pos = np.full((batch, 1), slots.written)
    return slots.write(pos, np.full((batch, 1), -1), np.ones((batch, 1), bool))


def test_glue_prefill_then_two_decode_steps_call_sequence(doubles: tuple[list[tuple[Any, ...]], FakeCudart],
                                                         tmp_path: Path) -> None:
    """Glue only (test doubles): profile switches, shapes, addresses, copies, graph captured once then replayed."""
    log, cudart = doubles
    backend = tb.TrtBackend(make_folder(tmp_path))  # type: ignore[arg-type]
    assert log[0] == ("load_library", str((tmp_path / "engines" / "libgaze_trt_plugin.so").resolve()))
    assert [e for e in log if e[0] == "deserialize"] == [("deserialize", "decoder"), ("deserialize", "vision")]
    assert not [e for e in log if e[0] == "malloc"]  # nothing allocated before allocate()
    batch, length, capacity = 2, 5, 10
    spec = CacheSpec.plan(SHAPE, batch, capacity)
    slots = SlotState(batch, capacity, SHAPE.num_regions, SHAPE.max_region_tokens)
    backend.allocate(spec, slots)
    mallocs = [e for e in log if e[0] == "malloc"]
    assert len(mallocs) == 13 + 3 * SHAPE.num_layers  # past and present share: 3 buffers per layer, not 6
    log.clear()

    rng = np.random.default_rng(0)
    embeds = rng.standard_normal((batch, length, SHAPE.hidden_size)).astype(np.float32)
    offset = slots.write(np.tile(np.arange(length), (batch, 1)), np.full((batch, length), -1),
                         np.ones((batch, length), bool))
    logits = backend.decode(embeds, np.zeros((batch, length), bool), offset, np.arange(length))
    np.testing.assert_array_equal(logits.argmax(-1), np.tile(np.arange(length), (batch, 1)))
    prefill_log = list(log)
    log.clear()
    step_logits = []
    for _ in range(2):
        offset = _step(slots, batch)
        step = rng.standard_normal((batch, 1, SHAPE.hidden_size)).astype(np.float32)
        step_logits.append(backend.decode(step, np.ones((batch, 1), bool), offset).copy())
        embeds = np.concatenate([embeds, step], 1)
    decode_log = list(log)

    # profiles: 0 for the prefill chunk, 1 for the decode steps (one switch)
    profiles = [e[2] for e in prefill_log + decode_log if e[0] == "set_profile"]
    assert profiles == [tb.PREFILL_PROFILE, tb.DECODE_PROFILE]
    shapes = {e[2]: e[3] for e in prefill_log if e[0] == "set_input_shape"}
    assert shapes["inputs_embeds"] == (batch, length, SHAPE.hidden_size) and shapes["gaze"] == (batch, length)
    assert shapes["past_key_values.0.key"] == (batch, SHAPE.kv_heads, SHAPE.max_seq_len, SHAPE.head_dim)
    assert ("set_input_shape", "decoder", "inputs_embeds", (batch, 1, SHAPE.hidden_size)) in decode_log
    # past and present bound to the same address, every layer, both profiles
    for part in (prefill_log, decode_log):
        addr = {e[2]: e[3] for e in part if e[0] == "set_tensor_address"}
        for i in range(SHAPE.num_layers):
            for kind in ("key", "value", "desc"):
                assert addr[f"past_key_values.{i}.{kind}"] == addr[f"present.{i}.{kind}"]
    # bindings are set once per (profile, shape): the second decode step sets none
    second = decode_log[decode_log.index(("end_capture",)):]
    assert not [e for e in second if e[0] in ("set_input_shape", "set_tensor_address", "set_profile")]
    # CUDA graph: step 1 runs eagerly then is captured once; step 2 replays it
    executes = [e[2] for e in decode_log if e[0] == "execute"]
    assert executes == ["run", "captured"]
    assert [e[0] for e in decode_log].count("begin_capture") == 1
    assert [e[0] for e in decode_log].count("graph_launch") == 1
    assert [e[0] for e in second].count("graph_launch") == 1 and "execute" not in [e[0] for e in second]
    # per step only the written slot columns go host -> device (2-D copies of 8, 1, 8, 8 bytes per row: slot_pos,
    # slot_valid, slot_region, slot_image) and the one new dense_slots entry (8 bytes per row); no region table
    assert [e for e in second if e[0] == "memcpy2d"] == [("memcpy2d", 8, batch), ("memcpy2d", 1, batch),
                                                         ("memcpy2d", 8, batch), ("memcpy2d", 8, batch),
                                                         ("memcpy2d", 8, batch)]
    # write_offset, logits_positions (one column), embeddings, gaze flags in; logits of one column out
    assert [e[1:] for e in second if e[0] == "memcpy"] == [
        ("h2d", 8), ("h2d", 8), ("h2d", batch * SHAPE.hidden_size * 4), ("h2d", batch), ("d2h", batch * 16 * 4)]
    # data flowed: logits back, write_offset in, KV written in place at the right slots (replay included)
    assert [s.argmax(-1)[:, 0].tolist() for s in step_logits] == [[length] * batch, [length + 1] * batch]
    assert backend._buffers is not None
    ptr = backend._buffers.ptr
    key = _view(ptr["kv.1.key"], (batch, SHAPE.kv_heads, SHAPE.max_seq_len, SHAPE.head_dim), np.float32)
    np.testing.assert_array_equal(key[:, 0, : length + 2], embeds[:, :, : SHAPE.head_dim])
    assert not key[:, :, length + 2:].any()
    valid = _view(ptr["slot_valid"], (batch, SHAPE.max_seq_len), np.bool_)
    np.testing.assert_array_equal(valid[:, :capacity], slots.valid)
    assert not valid[:, capacity:].any()  # the engine's S (24) is larger than this generation's (10)
    assert (_view(ptr["slot_region"], (batch, SHAPE.max_seq_len), np.int64)[:, capacity:] == -1).all()
    mem = backend.memory()
    assert mem["kv_cache"] == 2 * SHAPE.num_layers * batch * SHAPE.kv_heads * SHAPE.max_seq_len * SHAPE.head_dim * 4
    backend.close()
    assert not cudart.mem and not cudart.graphs


def test_glue_reuses_buffers_and_recaptures_for_a_new_generation_or_batch(
        doubles: tuple[list[tuple[Any, ...]], FakeCudart], tmp_path: Path) -> None:
    """Glue only (test doubles): same shapes -> same buffers, graph re-captured after the profile switch;
    another batch -> new buffers and a new graph."""
    log, _ = doubles
    backend = tb.TrtBackend(make_folder(tmp_path))  # type: ignore[arg-type]

    def generation(batch: int, steps: int) -> None:
        slots = SlotState(batch, 10, SHAPE.num_regions, SHAPE.max_region_tokens)
        backend.allocate(CacheSpec.plan(SHAPE, batch, 10), slots)
        offset = slots.write(np.zeros((batch, 3), np.int64), np.full((batch, 3), -1), np.ones((batch, 3), bool))
        backend.decode(np.ones((batch, 3, SHAPE.hidden_size), np.float32), np.zeros((batch, 3), bool), offset)
        for _ in range(steps):
            backend.decode(np.ones((batch, 1, SHAPE.hidden_size), np.float32), np.ones((batch, 1), bool),
                           _step(slots, batch))

    generation(1, 3)
    first = sum(e[0] == "malloc" for e in log)
    log.clear()
    generation(1, 3)
    assert sum(e[0] == "malloc" for e in log) == 0  # same cache shape: buffers reused (zeroed)
    assert [e[0] for e in log].count("begin_capture") == 1 and [e[0] for e in log].count("graph_launch") == 2
    log.clear()
    generation(2, 2)
    assert sum(e[0] == "malloc" for e in log) == first and sum(e[0] == "free" for e in log) == first
    assert [e[0] for e in log].count("begin_capture") == 1 and [e[0] for e in log].count("graph_destroy") >= 1


def test_glue_splits_a_prefill_longer_than_the_profile_without_cutting_images(
        doubles: tuple[list[tuple[Any, ...]], FakeCudart], tmp_path: Path) -> None:
    """Glue only (test doubles): a 12-token chunk becomes engine calls of <= 8 tokens, cut between images."""
    log, _ = doubles
    backend = tb.TrtBackend(make_folder(tmp_path))  # type: ignore[arg-type]
    slots = SlotState(1, 16, SHAPE.num_regions, SHAPE.max_region_tokens)
    backend.allocate(CacheSpec.plan(SHAPE, 1, 16), slots)
    region = np.array([[-1, -1, 0, 0, 1, 1, -1, 2, 3, 2, 3, -1]])
    offset = slots.write(np.arange(12)[None], region, np.ones((1, 12), bool))
    logits = backend.decode(np.ones((1, 12, SHAPE.hidden_size), np.float32), np.zeros((1, 12), bool), offset,
                            np.arange(12))
    assert logits.shape == (1, 12, SHAPE.vocab_size)
    np.testing.assert_array_equal(logits.argmax(-1)[0], np.arange(12))
    calls = [e[3][1] for e in log if e[0] == "execute"]
    assert calls == [7, 5]  # 8 would cut image 1 (columns 7..10)


def test_glue_vision_and_create_backend(doubles: tuple[list[tuple[Any, ...]], FakeCudart], tmp_path: Path) -> None:
    """Glue only (test doubles): vision in engine-sized batches; create_backend('tensorrt') builds a TrtBackend."""
    log, _ = doubles
    backend = create_backend("tensorrt", make_folder(tmp_path))  # type: ignore[arg-type]
    assert isinstance(backend, tb.TrtBackend) and backend.name == "tensorrt"
    pixels = np.zeros((5, 3, SHAPE.image_size, SHAPE.image_size), np.float32)
    pixels[:, 0, 0, 0] = np.arange(5)
    out = backend.vision(pixels)
    assert out.shape == (5, SHAPE.tokens_per_image, SHAPE.hidden_size)
    np.testing.assert_array_equal(out[:, :, 0], np.arange(5)[:, None] + np.arange(SHAPE.tokens_per_image)[None])
    assert [e[3][0] for e in log if e[0] == "execute"] == [4, 1]  # the vision profile's max N is 4


def test_glue_binds_and_reads_back_gaze_query_outputs(doubles: tuple[list[tuple[Any, ...]], FakeCudart],
                                                       tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Glue only (test doubles): with --gaze-map-outputs the queries are bound and copied back on request."""
    monkeypatch.setitem(FAKE_OPTIONS, "query_outputs", True)
    log, _ = doubles
    folder = make_folder(tmp_path)
    folder.has_gaze_queries = True
    backend = tb.TrtBackend(folder)  # type: ignore[arg-type]
    slots = SlotState(1, 10, SHAPE.num_regions, SHAPE.max_region_tokens)
    backend.allocate(CacheSpec.plan(SHAPE, 1, 10), slots)
    offset = slots.write(np.zeros((1, 3), np.int64), np.full((1, 3), -1), np.ones((1, 3), bool))
    backend.decode(np.ones((1, 3, SHAPE.hidden_size), np.float32), np.zeros((1, 3), bool), offset)
    for _ in range(2):
        backend.decode(np.ones((1, 1, SHAPE.hidden_size), np.float32), np.ones((1, 1), bool), _step(slots, 1))
    queries = backend.gaze_queries()
    assert queries is not None and [q.shape for q in queries] == [(1, SHAPE.num_heads, 1, SHAPE.head_dim)] * 2
    assert [float(q.flat[0]) for q in queries] == [4.0, 5.0]  # layer i + write_offset 4 of the replayed step
    assert backend.descriptor_sums(0).shape == (1, SHAPE.kv_heads, SHAPE.num_regions, SHAPE.head_dim)


# ====================================================================== a real v2 export, against ONNX Runtime


_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
              "tensor(bool)": np.bool_}


def _onnx_io(session: Any) -> tuple[dict[str, tuple[str, Any]], dict[str, tuple[int, ...]]]:
    """The decoder's I/O and input dims as decoder.onnx declares them (what TensorRT's parser would see)."""
    io = {i.name: (_IOMode.INPUT, np.dtype(_ORT_TYPES[i.type])) for i in session.get_inputs()}
    io.update({o.name: (_IOMode.OUTPUT, np.dtype(_ORT_TYPES[o.type])) for o in session.get_outputs()})
    dims = {i.name: tuple(d if isinstance(d, int) else -1 for d in i.shape) for i in session.get_inputs()}
    return io, dims


class _Tee(Backend):
    """Every call goes to the TensorRT backend (test doubles) and to ONNX Runtime, over the SAME SlotState; ONNX
    Runtime's results are returned, so the generation follows the real model."""

    name = "tee"

    def __init__(self, ort: Any, trt: Any) -> None:
        super().__init__(ort.folder)
        self.ort, self.trt = ort, trt
        self.ort_fed: list[dict[str, np.ndarray]] = []
        self.trt_logits: list[np.ndarray] = []
        bound: dict[str, Any] = {}
        bind, run = ort.io.bind_ortvalue_input, ort.decoder.run_with_iobinding

        def bind_input(name: str, value: Any) -> None:
            bound[name] = value
            bind(name, value)

        def run_with_iobinding(io: Any, options: Any = None) -> None:  # record what ONNX Runtime is fed
            self.ort_fed.append({n: np.array(v.numpy()) for n, v in bound.items() if "past_key" not in n})
            run(io, options)

        ort.io.bind_ortvalue_input = bind_input
        ort.decoder.run_with_iobinding = run_with_iobinding

    def vision(self, pixel_values: np.ndarray) -> np.ndarray:
        return self.ort.vision(pixel_values)

    def allocate(self, spec: CacheSpec, slots: SlotState) -> None:
        self.spec = spec
        self.trt.allocate(spec, slots)
        self.ort.allocate(spec, slots)

    def decode(self, embeds: np.ndarray, gaze: np.ndarray, write_offset: int,
               logits_positions: np.ndarray | None = None) -> np.ndarray:
        self.trt_logits.append(np.array(self.trt.decode(embeds, gaze, write_offset, logits_positions)))
        return self.ort.decode(embeds, gaze, write_offset, logits_positions)

    def descriptor_sums(self, layer: int) -> np.ndarray:
        return self.ort.descriptor_sums(layer)


def test_v2_export_feeds_the_engine_exactly_what_onnxruntime_is_fed(
        runtime_export: tuple[Path, Path], doubles: tuple[list[tuple[Any, ...]], FakeCudart], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Glue and plan on a real v2 export of the default checkpoint (test doubles for TensorRT/CUDA; NOT run on
    TensorRT): over prefill chunks, the prompt-logits path and 40 decode steps (dense_slots grows past 32),
    the decoder inputs the fake engine reads from "device" memory at execution (CUDA-graph replays included)
    are the arrays ONNX Runtime is fed: same names, dtypes, values and shapes, except that the engine's cache
    length S is max_seq_len (`gaze build` fixes it), so the per-slot tables are wider and the extra slots empty."""
    from gaze_edge.model import scenes
    from gaze_edge.runtime import GazeRuntime, Prompt, SamplingConfig
    from gaze_edge.runtime.backend import OrtBackend
    from gaze_edge.runtime.folder import ExportFolder

    log, cudart = doubles
    folder = ExportFolder.open(runtime_export[1])
    ort = OrtBackend(folder, threads=1)
    io, dims = _onnx_io(ort.decoder)
    monkeypatch.setitem(FAKE_OPTIONS, "max_prefill", 256)  # every prefill chunk fits one engine call here
    install(monkeypatch, fake_tensorrt(cudart, log, folder.shape, io=io, dims=dims), cudart)
    fake = make_folder(tmp_path)  # an engines/ folder with a manifest
    trt = tb.TrtBackend(folder, engine_dir=fake.path / "engines")
    engine = trt.decoder_engine
    tee = _Tee(ort, trt)
    rt = GazeRuntime(folder, tee)
    rng = np.random.default_rng(5)
    images = [scenes.render(scenes.sample_scene(rng, held_out=True), folder.shape.image_size, rng)[0]
              for _ in range(3)]
    prompts = [Prompt(None, [images[0]]), Prompt(None, [images[1], images[2]])]
    rt.prompt_logits(prompts, np.array([5, 6]), prefill_chunk=16)  # logits of every prompt column
    rt.generate(prompts, SamplingConfig(max_new_tokens=40, ignore_eos=True), prefill_chunk=16)

    assert len(engine.fed) == len(tee.ort_fed) == len(tee.trt_logits) > 45
    s, capacity = folder.shape.max_seq_len, None
    widths, replays = [], sum(e[0] == "graph_launch" for e in log)
    for call, (got, want) in enumerate(zip(engine.fed, tee.ort_fed, strict=True)):
        assert set(got) == set(want) == set(DECODER_CALL_INPUTS), call
        for name, a in want.items():
            b = got[name]
            assert b.dtype == a.dtype, (call, name)
            if name in ("slot_pos", "slot_valid", "slot_region", "slot_image"):
                capacity = a.shape[1]
                assert b.shape == (a.shape[0], s), (call, name)
                np.testing.assert_array_equal(b[:, :capacity], a, err_msg=f"call {call}: {name}")
                empty = SlotState(a.shape[0], s - capacity, 1, 1).tables()[name]
                np.testing.assert_array_equal(b[:, capacity:], empty, err_msg=f"call {call}: {name}")
            else:
                assert b.shape == a.shape, (call, name)
                np.testing.assert_array_equal(b, a, err_msg=f"call {call}: {name}")
        widths.append(want["dense_slots"].shape[1])
        positions = want["logits_positions"]
        assert tee.trt_logits[call].shape == (2, positions.size, folder.shape.vocab_size)
        # the toy engine's logits peak at (write_offset + position) % V: the columns asked for came back, in order
        toy = (int(want["write_offset"][0]) + positions) % folder.shape.vocab_size
        np.testing.assert_array_equal(tee.trt_logits[call].argmax(-1), np.broadcast_to(toy, (2, positions.size)))
    assert max(want["logits_positions"].size for want in tee.ort_fed) > 1  # the prompt-logits path: all columns
    assert 32 in widths and 64 in widths  # dense_slots grew during the decode steps, and was re-bound
    assert replays > 30  # most decode steps replayed the CUDA graph (and still read the right tables)
    trt.close()


# ====================================================================== the real thing (TensorRT + GPU)


def _real_tensorrt_or_skip() -> None:
    try:
        tb.import_tensorrt_runtime()
        tb.require_gpu(tb.load_cudart())
        em.gpu_arch()
    except GazeError as exc:
        pytest.skip(f"needs TensorRT and a CUDA GPU: {str(exc)[:160]}")


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_greedy_tokens_equal_onnxruntime_on_tensorrt(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """Build fp32 engines for the exported tiny model and compare greedy tokens with ONNX Runtime."""
    _real_tensorrt_or_skip()
    from gaze_edge.export import trt_build
    from gaze_edge.model import scenes
    from gaze_edge.runtime import GazeRuntime, Prompt, SamplingConfig

    plugin = Path(os.environ.get("GAZE_TRT_PLUGIN", trt_build.DEFAULT_PLUGIN))
    if not plugin.is_file():
        pytest.skip(f"no plugin library at {plugin} (build it: {trt_build.BUILD_HINT}, or set GAZE_TRT_PLUGIN)")
    export = request.getfixturevalue("runtime_export")[1]
    engines = tmp_path / "engines"
    parser = argparse.ArgumentParser(prog="gaze")
    trt_build.add_build_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["build", str(export), "--plugin", str(plugin), "--engine-dir", str(engines),
                              "--max-batch", "2", "--no-fp16"])
    assert args.func(args) == 0
    ort = GazeRuntime.load(export)
    folder = ort.folder
    trt = GazeRuntime(folder, tb.TrtBackend(folder, engine_dir=engines))
    rng = np.random.default_rng(5)
    images = [scenes.render(scenes.sample_scene(rng, held_out=True), 48, rng)[0] for _ in range(3)]
    prompts = [Prompt(None, [images[0]]), Prompt(None, [images[1], images[2]])]
    sampling = SamplingConfig(max_new_tokens=12)
    want = ort.generate(prompts, sampling).tokens
    got = trt.generate(prompts, sampling).tokens
    np.testing.assert_array_equal(got, want)
    for chunk in (1, 7):  # prefill chunks through both profiles, decode through the CUDA graph
        np.testing.assert_array_equal(trt.generate(prompts, sampling, prefill_chunk=chunk).tokens, want)
