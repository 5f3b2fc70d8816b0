"""The TensorRT backend: engines from `gaze build`, behind the same `Backend` interface as ONNX Runtime.

STATUS: this module has been exercised only against test doubles (a fake `tensorrt` module and a
fake cuda-python runtime, tests/test_runtime_trt.py). It has never run on real TensorRT or a GPU;
`test_greedy_tokens_equal_onnxruntime_on_tensorrt` is the test that must pass on a machine that has
both before this path counts as verified.

What it does (docs/RUNTIME.md, "TensorRT backend"):

1. Refuse early. `import tensorrt` (missing, placeholder or an unsupported version), the CUDA
   runtime (cuda-python if importable, else ctypes on libcudart) and a GPU are checked first;
   then `engine_manifest.check_manifest` (TensorRT version, GPU arch, plugin sha256, engine files),
   all before anything is loaded or allocated.
2. Load the plugin library from the explicit path in the engines folder
   (`IPluginRegistry.load_library`, never a search path), then deserialize decoder.engine (profile 0
   prefill chunks, profile 1 decode steps) and vision.engine.
3. Allocate device buffers once per cache shape: one buffer per layer for key, value and descriptor
   sums, bound to BOTH `past_key_values.{i}.*` and `present.{i}.*` (the plugin writes the T new
   slots in place). The GazeAttention v2 layout tables (runtime/cache.py SlotState.tables(): slot_pos,
   slot_valid, slot_region, slot_image, dense_slots, region_slots, region_count, region_last),
   `write_offset`, `logits_positions`, embeddings and the gaze flags are copied host -> device per call
   (of the tables only what changed since the last call, trt_plan.plan_table_copies); when SlotState
   grows dense_slots the whole table is copied and re-bound at its new width. Logits of the
   `logits_positions` columns come back device -> host.
4. A decode step (T = 1) runs eagerly once (warm-up), is then captured in a CUDA graph and replayed;
   the graph is re-captured when its key (profile, batch, T, logits columns, dense_slots width, buffer
   set) changes.

Every decision that needs no TensorRT lives in plain functions in runtime/trt_plan.py (profile choice,
cache length, buffer and binding plans, table copies, prefill splits, the CUDA-graph rule; re-exported
here) and export/trt_policy.py (supported versions 10.3 .. 11.x, the failed-dlopen message), tested without it.
The class `TrtBackend` is the thin glue that applies them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib
import time
from collections.abc import Hashable
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import numpy as np

from gaze_edge.errors import InputError
from gaze_edge.export import engine_manifest
from gaze_edge.export.trt_build import (
    PLUGIN_NAME,
    PLUGIN_NAMESPACE,
    PLUGIN_VERSION,
    parse_version,
)
from gaze_edge.export.trt_policy import PLUGIN_HINT, check_loaded, version_problem

from .backend import Backend, BackendError
from .cache import CacheSpec, SlotState
from .folder import ExportFolder, ModelShape
from .trt_plan import (  # noqa: F401 (re-exported: the plain decisions live in runtime/trt_plan.py)
    CAPTURE,
    EAGER,
    FILL_BYTE,
    LAYOUT_TABLES,
    REPLAY,
    SLOT_METADATA_BYTES,
    Binding,
    BufferSpec,
    DeviceTables,
    GraphPolicy,
    ProfileRange,
    SlotCopy,
    SubCall,
    cache_length,
    check_engine_io,
    check_logits_positions,
    check_plugin_contract,
    choose_profile,
    kv_buffer,
    max_call_tokens,
    plan_decoder_bindings,
    plan_decoder_buffers,
    plan_slot_copies,
    plan_sub_calls,
    plan_table_copies,
    profile_range,
    split_prefill,
)

ENGINES_DIR = "engines"
DECODER_ENGINE, VISION_ENGINE = "decoder", "vision"
PREFILL_PROFILE, DECODE_PROFILE = 0, 1  # the order `gaze build` adds them in

_HINT = ("The TensorRT backend needs TensorRT 10.3 .. 11.x with its Python API (JetPack's python3-libnvinfer, or "
         "the TensorRT SDK / NVIDIA's wheel from pypi.nvidia.com), a CUDA GPU, and engines built on this machine "
         "with `gaze build EXPORT`. Without them use --backend onnxruntime.")


class TensorRTUnavailableError(BackendError):
    """TensorRT (or a CUDA runtime, or a GPU) is missing here: nothing was loaded or allocated."""


class TensorRTRuntimeError(BackendError):
    """A TensorRT or CUDA call failed while loading or running the engines."""


# ================================================================== TensorRT import (no TensorRT needed)


def import_tensorrt_runtime() -> ModuleType:
    """The real TensorRT Python API (runtime part), or TensorRTUnavailableError saying what to install."""
    prefix = "the TensorRT backend is not available here"
    try:
        trt = importlib.import_module("tensorrt")
    except ImportError as exc:
        raise TensorRTUnavailableError(f"{prefix}: TensorRT is not installed ({exc}). {_HINT}") from exc
    except Exception as exc:  # placeholder packages raise anything at import time
        raise TensorRTUnavailableError(f"{prefix}: the installed `tensorrt` package cannot be imported ({exc!r}); "
                                       f"it is likely a placeholder. {_HINT}") from exc
    missing = [a for a in ("Runtime", "Logger", "get_plugin_registry", "TensorIOMode", "nptype", "__version__")
               if not hasattr(trt, a)]
    if missing:
        raise TensorRTUnavailableError(f"{prefix}: the installed `tensorrt` package ({getattr(trt, '__file__', '?')}) "
                                       f"is a placeholder, not TensorRT: it has no {', '.join(missing)}. {_HINT}")
    try:
        version = parse_version(trt.__version__)
    except Exception as exc:
        raise TensorRTUnavailableError(f"{prefix}: {exc}. {_HINT}") from exc
    problem = version_problem(version, str(trt.__version__))
    if problem:
        raise TensorRTUnavailableError(f"{prefix}: {problem}. {_HINT}")
    return trt


# ================================================================== CUDA runtime access (thin)


class CudaRuntime(Protocol):
    """The CUDA runtime calls this backend makes; handles and pointers are plain ints."""

    source: str

    def device_count(self) -> int: ...
    def malloc(self, nbytes: int) -> int: ...
    def free(self, ptr: int) -> None: ...
    def memset_async(self, ptr: int, value: int, nbytes: int, stream: int) -> None: ...
    def memcpy_htod_async(self, dst: int, src: int, nbytes: int, stream: int) -> None: ...
    def memcpy_dtoh_async(self, dst: int, src: int, nbytes: int, stream: int) -> None: ...
    def memcpy2d_htod_async(self, dst: int, dpitch: int, src: int, spitch: int, width: int, height: int,
                            stream: int) -> None: ...
    def stream_create(self) -> int: ...
    def stream_synchronize(self, stream: int) -> None: ...
    def stream_destroy(self, stream: int) -> None: ...
    def begin_capture(self, stream: int) -> None: ...
    def end_capture(self, stream: int) -> int: ...
    def graph_instantiate(self, graph: int) -> int: ...
    def graph_destroy(self, graph: int) -> None: ...
    def graph_launch(self, graph_exec: int, stream: int) -> None: ...
    def graph_exec_destroy(self, graph_exec: int) -> None: ...


_H2D, _D2H = 1, 2  # cudaMemcpyKind
_STREAM_NON_BLOCKING = 1
_CAPTURE_GLOBAL = 0  # cudaStreamCaptureModeGlobal


class CudaPythonRuntime:
    """cuda-python (`cuda.bindings.runtime`, or the older `cuda.cudart`): every call returns (err, *values)."""

    def __init__(self, module: Any) -> None:
        self.rt = module
        self.source = f"cuda-python ({getattr(module, '__name__', '?')})"
        self._h2d = module.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._d2h = module.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._global = module.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal

    def _call(self, name: str, *args: Any) -> tuple[Any, ...]:
        result = getattr(self.rt, name)(*args)
        err, rest = (result[0], tuple(result[1:])) if isinstance(result, tuple) else (result, ())
        code = int(getattr(err, "value", err) or 0)
        if code != 0:
            raise TensorRTRuntimeError(f"CUDA {name} failed: {err!r} (code {code})")
        return rest

    def device_count(self) -> int:
        return int(self._call("cudaGetDeviceCount")[0])

    def malloc(self, nbytes: int) -> int:
        return int(self._call("cudaMalloc", nbytes)[0])

    def free(self, ptr: int) -> None:
        self._call("cudaFree", ptr)

    def memset_async(self, ptr: int, value: int, nbytes: int, stream: int) -> None:
        self._call("cudaMemsetAsync", ptr, value, nbytes, stream)

    def memcpy_htod_async(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        self._call("cudaMemcpyAsync", dst, src, nbytes, self._h2d, stream)

    def memcpy_dtoh_async(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        self._call("cudaMemcpyAsync", dst, src, nbytes, self._d2h, stream)

    def memcpy2d_htod_async(self, dst: int, dpitch: int, src: int, spitch: int, width: int, height: int,
                            stream: int) -> None:
        self._call("cudaMemcpy2DAsync", dst, dpitch, src, spitch, width, height, self._h2d, stream)

    def stream_create(self) -> int:
        return int(self._call("cudaStreamCreateWithFlags", _STREAM_NON_BLOCKING)[0])

    def stream_synchronize(self, stream: int) -> None:
        self._call("cudaStreamSynchronize", stream)

    def stream_destroy(self, stream: int) -> None:
        self._call("cudaStreamDestroy", stream)

    def begin_capture(self, stream: int) -> None:
        self._call("cudaStreamBeginCapture", stream, self._global)

    def end_capture(self, stream: int) -> int:
        return int(self._call("cudaStreamEndCapture", stream)[0])

    def graph_instantiate(self, graph: int) -> int:
        return int(self._call("cudaGraphInstantiateWithFlags", graph, 0)[0])

    def graph_destroy(self, graph: int) -> None:
        self._call("cudaGraphDestroy", graph)

    def graph_launch(self, graph_exec: int, stream: int) -> None:
        self._call("cudaGraphLaunch", graph_exec, stream)

    def graph_exec_destroy(self, graph_exec: int) -> None:
        self._call("cudaGraphExecDestroy", graph_exec)


class CtypesCudaRuntime:
    """libcudart through ctypes (CUDA >= 11.4 names; cudaGraphInstantiateWithFlags is stable across 11.4 .. 13)."""

    _SIGNATURES: dict[str, list[Any]] = {
        "cudaGetDeviceCount": [ctypes.POINTER(ctypes.c_int)],
        "cudaMalloc": [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t],
        "cudaFree": [ctypes.c_void_p],
        "cudaMemsetAsync": [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t, ctypes.c_void_p],
        "cudaMemcpyAsync": [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p],
        "cudaMemcpy2DAsync": [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t,
                              ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p],
        "cudaStreamCreateWithFlags": [ctypes.POINTER(ctypes.c_void_p), ctypes.c_uint],
        "cudaStreamSynchronize": [ctypes.c_void_p],
        "cudaStreamDestroy": [ctypes.c_void_p],
        "cudaStreamBeginCapture": [ctypes.c_void_p, ctypes.c_int],
        "cudaStreamEndCapture": [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)],
        "cudaGraphInstantiateWithFlags": [ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p, ctypes.c_ulonglong],
        "cudaGraphDestroy": [ctypes.c_void_p],
        "cudaGraphLaunch": [ctypes.c_void_p, ctypes.c_void_p],
        "cudaGraphExecDestroy": [ctypes.c_void_p],
    }

    def __init__(self, lib: ctypes.CDLL, path: str) -> None:
        self.lib = lib
        self.source = f"ctypes ({path})"
        for name, argtypes in self._SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = argtypes, ctypes.c_int
        lib.cudaGetErrorString.argtypes, lib.cudaGetErrorString.restype = [ctypes.c_int], ctypes.c_char_p

    def _check(self, name: str, *args: Any) -> None:
        code = getattr(self.lib, name)(*args)
        if code != 0:
            text = self.lib.cudaGetErrorString(code) or b"?"
            raise TensorRTRuntimeError(f"CUDA {name} failed: {text.decode(errors='replace')} (code {code})")

    def _out(self, name: str, *args: Any) -> int:
        handle = ctypes.c_void_p()
        self._check(name, ctypes.byref(handle), *args)
        return int(handle.value or 0)

    def device_count(self) -> int:
        count = ctypes.c_int()
        self._check("cudaGetDeviceCount", ctypes.byref(count))
        return count.value

    def malloc(self, nbytes: int) -> int:
        return self._out("cudaMalloc", nbytes)

    def free(self, ptr: int) -> None:
        self._check("cudaFree", ptr)

    def memset_async(self, ptr: int, value: int, nbytes: int, stream: int) -> None:
        self._check("cudaMemsetAsync", ptr, value, nbytes, stream)

    def memcpy_htod_async(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        self._check("cudaMemcpyAsync", dst, src, nbytes, _H2D, stream)

    def memcpy_dtoh_async(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        self._check("cudaMemcpyAsync", dst, src, nbytes, _D2H, stream)

    def memcpy2d_htod_async(self, dst: int, dpitch: int, src: int, spitch: int, width: int, height: int,
                            stream: int) -> None:
        self._check("cudaMemcpy2DAsync", dst, dpitch, src, spitch, width, height, _H2D, stream)

    def stream_create(self) -> int:
        return self._out("cudaStreamCreateWithFlags", _STREAM_NON_BLOCKING)

    def stream_synchronize(self, stream: int) -> None:
        self._check("cudaStreamSynchronize", stream)

    def stream_destroy(self, stream: int) -> None:
        self._check("cudaStreamDestroy", stream)

    def begin_capture(self, stream: int) -> None:
        self._check("cudaStreamBeginCapture", stream, _CAPTURE_GLOBAL)

    def end_capture(self, stream: int) -> int:
        graph = ctypes.c_void_p()
        self._check("cudaStreamEndCapture", stream, ctypes.byref(graph))
        return int(graph.value or 0)

    def graph_instantiate(self, graph: int) -> int:
        return self._out("cudaGraphInstantiateWithFlags", graph, 0)

    def graph_destroy(self, graph: int) -> None:
        self._check("cudaGraphDestroy", graph)

    def graph_launch(self, graph_exec: int, stream: int) -> None:
        self._check("cudaGraphLaunch", graph_exec, stream)

    def graph_exec_destroy(self, graph_exec: int) -> None:
        self._check("cudaGraphExecDestroy", graph_exec)


CUDART_NAMES = ("libcudart.so", "libcudart.so.13", "libcudart.so.12", "/usr/local/cuda/lib64/libcudart.so")


def load_cudart() -> CudaRuntime:
    """cuda-python's runtime if importable, else libcudart through ctypes; TensorRTUnavailableError if neither."""
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return CudaPythonRuntime(importlib.import_module(name))
        except ImportError:
            continue
        except Exception as exc:  # a broken install: say so rather than fall through silently
            raise TensorRTUnavailableError(f"the TensorRT backend is not available here: {name} cannot be used "
                                           f"({exc!r}). {_HINT}") from exc
    found = ctypes.util.find_library("cudart")
    errors = []
    for path in ([found] if found else []) + list(CUDART_NAMES):
        try:
            return CtypesCudaRuntime(ctypes.CDLL(path), path)
        except (OSError, AttributeError) as exc:
            errors.append(f"{path}: {exc}")
    raise TensorRTUnavailableError("the TensorRT backend is not available here: no CUDA runtime (neither cuda-python "
                                   f"nor libcudart could be loaded: {'; '.join(errors[-2:])}). {_HINT}")


def require_gpu(cuda: CudaRuntime) -> int:
    """The number of CUDA devices, or TensorRTUnavailableError when there is none (or no driver)."""
    try:
        count = cuda.device_count()
    except TensorRTRuntimeError as exc:
        raise TensorRTUnavailableError(f"the TensorRT backend is not available here: no usable CUDA GPU ({exc}). "
                                       f"{_HINT}") from exc
    if count < 1:
        raise TensorRTUnavailableError(f"the TensorRT backend is not available here: no CUDA GPU. {_HINT}")
    return count


# ================================================================== the glue


class _DeviceBuffers:
    """Device buffers by name (allocated once, freed together)."""

    def __init__(self, cuda: CudaRuntime, specs: dict[str, BufferSpec]) -> None:
        self.cuda, self.specs = cuda, specs
        self.ptr: dict[str, int] = {}
        try:
            for name, spec in specs.items():
                self.ptr[name] = cuda.malloc(max(spec.nbytes, 1))
        except BaseException:
            self.free()
            raise

    def free(self) -> None:
        for ptr in self.ptr.values():
            self.cuda.free(ptr)
        self.ptr = {}


def _ptr(a: np.ndarray) -> int:
    return int(a.ctypes.data)


class TrtBackend(Backend):
    """decoder.engine (prefill + decode profiles) and vision.engine with the GazeAttention plugin.

    Exercised only against test doubles here (see the module docstring).
    """

    name = "tensorrt"

    def __init__(self, folder: ExportFolder, engine_dir: str | Path | None = None, cuda_graphs: bool = True,
                 warmup_steps: int = 1) -> None:
        super().__init__(folder)
        self.engine_dir = Path(engine_dir) if engine_dir is not None else folder.path / ENGINES_DIR
        # 1. Refuse before loading or allocating anything.
        check_plugin_contract(folder.config, folder.path)
        trt = import_tensorrt_runtime()
        self.trt = trt
        self.cuda = load_cudart()
        require_gpu(self.cuda)
        arch, _ = engine_manifest.gpu_arch()
        manifest = engine_manifest.read_manifest(self.engine_dir)
        plugin = self.engine_dir / Path(str(manifest["plugin"].get("file", ""))).name  # inside the engines folder
        self.manifest = engine_manifest.check_manifest(self.engine_dir, trt.__version__, arch, plugin)
        # 2. Plugin from its explicit path, then the engines.
        self.logger = trt.Logger(trt.Logger.WARNING)
        self._load_plugin(plugin)
        self._runtime = trt.Runtime(self.logger)
        self.decoder_engine = self._deserialize(DECODER_ENGINE)
        self.vision_engine = self._deserialize(VISION_ENGINE)
        s = folder.shape
        self.query_outputs = folder.has_gaze_queries
        self.profiles = self._decoder_profiles()
        self._check_io()
        self.context = self.decoder_engine.create_execution_context()
        self.vision_context = self.vision_engine.create_execution_context()
        if self.context is None or self.vision_context is None:
            raise TensorRTRuntimeError("TensorRT could not create an execution context (out of GPU memory?)")
        self.stream = self.cuda.stream_create()
        self.cuda_graphs = cuda_graphs
        self.graph = GraphPolicy(warmup_steps)
        self._graph_exec: int | None = None
        self._buffers: _DeviceBuffers | None = None
        self._vision_buffers: _DeviceBuffers | None = None
        self._generation = 0
        self._profile: int | None = None
        self._bound: tuple[int, ...] | None = None
        self._mirror: DeviceTables | None = None
        self._host_logits: dict[tuple[int, int], np.ndarray] = {}
        self._last_tokens = 0
        self.slots: SlotState | None = None
        self.cache_len = 0
        self.max_tokens = 0
        self.dtype = np.dtype(s.dtype)

    # ------------------------------------------------------------------ loading

    def _load_plugin(self, plugin: Path) -> None:
        registry = self.trt.get_plugin_registry()
        path = str(plugin.resolve())
        try:
            handle = registry.load_library(path)
        except Exception as exc:
            raise TensorRTRuntimeError(f"TensorRT cannot load the plugin library {path} ({exc}): {PLUGIN_HINT}") \
                from exc
        problem = check_loaded(handle, path)  # load_library returns None on a failed dlopen, it does not raise
        if problem:
            raise TensorRTRuntimeError(problem)
        get = registry.get_creator if hasattr(registry, "get_creator") else registry.get_plugin_creator
        if get(PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE) is None:
            raise TensorRTRuntimeError(f"{plugin} loaded but registers no {PLUGIN_NAMESPACE}::{PLUGIN_NAME} version "
                                       f"{PLUGIN_VERSION}; rebuild the engines with `gaze build --force`")

    def _deserialize(self, name: str) -> Any:
        entry = self.manifest["engines"].get(name)
        if not isinstance(entry, dict) or "file" not in entry:
            raise TensorRTRuntimeError(f"{self.engine_dir}/{engine_manifest.MANIFEST} lists no {name} engine; "
                                       "rebuild with `gaze build --force`")
        path = self.engine_dir / Path(str(entry["file"])).name
        engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise TensorRTRuntimeError(f"TensorRT could not deserialize {path} (see the TensorRT log); rebuild with "
                                       "`gaze build --force` on this machine")
        return engine

    def _decoder_profiles(self) -> list[ProfileRange]:
        e = self.decoder_engine
        count = int(e.num_optimization_profiles)
        if count < 1:
            raise TensorRTRuntimeError("decoder.engine has no optimization profile; rebuild with `gaze build`")
        return [profile_range(p, e.get_tensor_profile_shape("inputs_embeds", p),
                              e.get_tensor_profile_shape("past_key_values.0.key", p),
                              e.get_tensor_profile_shape("dense_slots", p)) for p in range(count)]

    def _engine_io(self, engine: Any) -> dict[str, tuple[bool, np.dtype[Any]]]:
        out = {}
        for i in range(int(engine.num_io_tensors)):
            name = engine.get_tensor_name(i)
            is_input = engine.get_tensor_mode(name) == self.trt.TensorIOMode.INPUT
            out[name] = (is_input, np.dtype(self.trt.nptype(engine.get_tensor_dtype(name))))
        return out

    def _check_io(self) -> None:
        s = self.folder.shape
        plan = plan_decoder_bindings(s, 1, 1, 1, self.query_outputs)
        problems = check_engine_io(plan, self._engine_io(self.decoder_engine))
        vision = [Binding("pixel_values", "pixels", (1,), self.dtype_of(s), True),
                  Binding("image_embeds", "embeds", (1,), self.dtype_of(s), False)]
        problems += [f"vision: {p}" for p in check_engine_io(vision, self._engine_io(self.vision_engine))]
        if problems:
            raise TensorRTRuntimeError(f"the engines in {self.engine_dir} do not match {self.folder.path}/"
                                       f"gaze_config.json ({'; '.join(problems[:4])}); rebuild with `gaze build "
                                       "--force`")

    @staticmethod
    def dtype_of(shape: ModelShape) -> np.dtype[Any]:
        return np.dtype(shape.dtype)

    # ------------------------------------------------------------------ vision

    def vision(self, pixel_values: np.ndarray) -> np.ndarray:
        s = self.folder.shape
        lo, _, hi = self.vision_engine.get_tensor_profile_shape("pixel_values", 0)
        max_n = int(hi[0])
        if self._vision_buffers is None:
            self._vision_buffers = _DeviceBuffers(self.cuda, {
                "pixel_values": BufferSpec("pixel_values", (max_n, 3, s.image_size, s.image_size), self.dtype),
                "image_embeds": BufferSpec("image_embeds", (max_n, s.tokens_per_image, s.hidden_size), self.dtype)})
        pixels = np.ascontiguousarray(pixel_values, dtype=self.dtype)
        out = np.empty((pixels.shape[0], s.tokens_per_image, s.hidden_size), dtype=self.dtype)
        ptr, ctx = self._vision_buffers.ptr, self.vision_context
        start = time.perf_counter()
        for first in range(0, pixels.shape[0], max_n):
            part = pixels[first:first + max_n]
            n = part.shape[0]
            self.cuda.memcpy_htod_async(ptr["pixel_values"], _ptr(part), part.nbytes, self.stream)
            self._expect(ctx.set_input_shape("pixel_values", tuple(part.shape)), "set_input_shape(pixel_values)")
            self._expect(ctx.set_tensor_address("pixel_values", ptr["pixel_values"]), "set_tensor_address")
            self._expect(ctx.set_tensor_address("image_embeds", ptr["image_embeds"]), "set_tensor_address")
            self._expect(ctx.execute_async_v3(self.stream), "vision execute_async_v3")
            view = out[first:first + n]
            self.cuda.memcpy_dtoh_async(_ptr(view), ptr["image_embeds"], view.nbytes, self.stream)
            self.cuda.stream_synchronize(self.stream)
        self.session_seconds += time.perf_counter() - start
        return out

    # ------------------------------------------------------------------ cache

    def allocate(self, spec: CacheSpec, slots: SlotState) -> None:
        s = self.folder.shape
        max_tokens = max_call_tokens(self.profiles, spec.batch)  # refuses a batch the engine cannot serve
        cache_len = cache_length(self.profiles, slots.capacity)
        specs = plan_decoder_buffers(s, spec.batch, cache_len, min(max_tokens, cache_len), self.query_outputs)
        if self._buffers is None or self._buffers.specs != specs:
            self._release_graph()
            if self._buffers is not None:
                self._buffers.free()
                self._buffers = None
            self._buffers = _DeviceBuffers(self.cuda, specs)
            self._generation += 1
            self._bound = None
        ptr = self._buffers.ptr
        for name, buf in specs.items():  # zero everything; -1 (0xff bytes) where a fresh SlotState has -1
            self.cuda.memset_async(ptr[name], FILL_BYTE.get(name, 0), buf.nbytes, self.stream)
        self.spec, self.slots, self.cache_len, self.max_tokens = spec, slots, cache_len, min(max_tokens, cache_len)
        self._mirror = DeviceTables.empty(slots)
        self._sync_tables()
        self.cuda.stream_synchronize(self.stream)

    def _sync_tables(self) -> None:
        """Copy what changed in the layout tables since the last call (trt_plan.plan_table_copies)."""
        assert self.slots is not None and self._buffers is not None and self._mirror is not None
        host = self.slots.tables()
        self._host_tables = host  # the source arrays stay referenced until the stream is synchronized
        for c in plan_table_copies(self.slots, self.cache_len, self._mirror):
            self.cuda.memcpy2d_htod_async(self._buffers.ptr[c.buffer] + c.dst_offset, c.dst_pitch,
                                          _ptr(host[c.buffer]) + c.src_offset, c.src_pitch, c.width, c.height,
                                          self.stream)

    # ------------------------------------------------------------------ decoder calls

    def decode(self, embeds: np.ndarray, gaze: np.ndarray, write_offset: int,
               logits_positions: np.ndarray | None = None) -> np.ndarray:
        if self.spec is None or self.slots is None or self._buffers is None:
            raise InputError("allocate() the cache before calling decode()")
        batch, tokens = embeds.shape[:2]
        if batch != self.spec.batch:
            raise InputError(f"a call of batch {batch} on a cache allocated for batch {self.spec.batch}")
        positions = check_logits_positions(logits_positions, tokens)
        # The tables as the whole call sees them (as ONNX Runtime's single call does), also for split parts:
        # a later part's tokens have larger positions and later images, so an earlier part never uses them.
        self._sync_tables()
        if tokens <= self.max_tokens:
            return self._run(embeds, gaze, write_offset, positions)
        region = self.slots.region[:, write_offset:write_offset + tokens]
        ends = split_prefill(region, self.folder.shape.regions_per_image, self.max_tokens)
        out = np.empty((batch, positions.size, self.folder.shape.vocab_size), dtype=self.dtype)
        for part in plan_sub_calls(positions, ends):
            cut = slice(part.begin, part.end)
            logits = self._run(embeds[:, cut], gaze[:, cut], write_offset + part.begin, part.positions)
            out[:, part.index] = logits[:, : part.index.size]
        return out

    def _run(self, embeds: np.ndarray, gaze: np.ndarray, write_offset: int, positions: np.ndarray) -> np.ndarray:
        assert self._buffers is not None
        s, cuda, ctx, ptr, stream = self.folder.shape, self.cuda, self.context, self._buffers.ptr, self.stream
        batch, tokens = embeds.shape[:2]
        profile = choose_profile(self.profiles, batch, tokens)
        start = time.perf_counter()
        assert self._mirror is not None
        dense, n = self._mirror.dense, int(positions.size)
        # Inputs of this call (outside any graph; the tables were synced by decode): write_offset, logits
        # columns, embeddings, gaze flags.
        self._offset = np.array([write_offset], dtype=np.int64)
        self._positions = np.ascontiguousarray(positions, dtype=np.int64)
        self._embeds = np.ascontiguousarray(embeds, dtype=self.dtype)
        self._gaze = np.ascontiguousarray(gaze, dtype=np.bool_)
        cuda.memcpy_htod_async(ptr["write_offset"], _ptr(self._offset), 8, stream)
        cuda.memcpy_htod_async(ptr["logits_positions"], _ptr(self._positions), self._positions.nbytes, stream)
        cuda.memcpy_htod_async(ptr["inputs_embeds"], _ptr(self._embeds), self._embeds.nbytes, stream)
        cuda.memcpy_htod_async(ptr["gaze"], _ptr(self._gaze), self._gaze.nbytes, stream)
        if profile != self._profile:
            self._expect(ctx.set_optimization_profile_async(profile, stream),
                         f"set_optimization_profile_async({profile})")
            self._profile, self._bound = profile, None
            self._release_graph()  # conservative: a graph captured before a profile switch is not replayed after it
        key = (profile, batch, tokens, n, dense, self._generation)
        if self._bound != key:  # a new shape, or dense_slots grew: re-bind (and re-capture the graph)
            for b in plan_decoder_bindings(s, batch, self.cache_len, tokens, self.query_outputs, dense, n):
                if b.is_input:
                    self._expect(ctx.set_input_shape(b.tensor, b.shape), f"set_input_shape({b.tensor}, {b.shape})")
                self._expect(ctx.set_tensor_address(b.tensor, ptr[b.buffer]), f"set_tensor_address({b.tensor})")
            self._bound = key
        action = self.graph.action(key) if self.cuda_graphs and tokens == 1 else EAGER
        if action == REPLAY:
            assert self._graph_exec is not None
            cuda.graph_launch(self._graph_exec, stream)
        else:
            self._expect(ctx.execute_async_v3(stream), "execute_async_v3")
        logits = self._host_logits.get((batch, n))
        if logits is None:
            logits = self._host_logits[(batch, n)] = np.empty((batch, n, s.vocab_size), dtype=self.dtype)
        cuda.memcpy_dtoh_async(_ptr(logits), ptr["logits"], logits.nbytes, stream)
        cuda.stream_synchronize(stream)
        if action == CAPTURE:
            self._capture(key)
        self.session_seconds += time.perf_counter() - start
        self._last_tokens = tokens
        return logits

    def _capture(self, key: Hashable) -> None:
        """Record this (already warmed-up) decode step in a CUDA graph; it is launched from the next step on."""
        self._release_graph()
        cuda, stream = self.cuda, self.stream
        cuda.begin_capture(stream)
        try:
            ok = self.context.execute_async_v3(stream)
        finally:
            graph = cuda.end_capture(stream)  # always end the capture, also when the enqueue failed
        try:
            self._expect(ok, "execute_async_v3 under CUDA graph capture")
            self._graph_exec = cuda.graph_instantiate(graph)
        finally:
            cuda.graph_destroy(graph)
        self.graph.mark_captured(key)

    def _release_graph(self) -> None:
        if self._graph_exec is not None:
            self.cuda.graph_exec_destroy(self._graph_exec)
            self._graph_exec = None
        self.graph.invalidate()

    @staticmethod
    def _expect(ok: Any, what: str) -> None:
        if ok is False or ok is None:
            raise TensorRTRuntimeError(f"TensorRT {what} failed (see the TensorRT log above)")

    # ------------------------------------------------------------------ host views

    def descriptor_sums(self, layer: int) -> np.ndarray:
        assert self._buffers is not None
        name = kv_buffer(layer, "desc")
        out = np.empty(self._buffers.specs[name].shape, dtype=np.float32)
        self.cuda.memcpy_dtoh_async(_ptr(out), self._buffers.ptr[name], out.nbytes, self.stream)
        self.cuda.stream_synchronize(self.stream)
        return out

    def gaze_queries(self) -> list[np.ndarray] | None:
        if not self.query_outputs or self._buffers is None or not self._last_tokens:
            return None
        s, out = self.folder.shape, []
        for i in range(s.num_layers):
            q = np.empty((self.spec.batch if self.spec else 1, s.num_heads, self._last_tokens, s.head_dim),
                         dtype=self.dtype)
            self.cuda.memcpy_dtoh_async(_ptr(q), self._buffers.ptr[f"gaze_query.{i}"], q.nbytes, self.stream)
            out.append(q)
        self.cuda.stream_synchronize(self.stream)
        return out

    def memory(self) -> dict[str, int]:
        out = {"weights": sum((self.engine_dir / Path(str(e["file"])).name).stat().st_size
                              for e in self.manifest["engines"].values())}
        activations = getattr(self.decoder_engine, "device_memory_size", None)
        if isinstance(activations, int):
            out["activations"] = activations
        if self._buffers is not None:
            specs = self._buffers.specs.values()
            out["kv_cache"] = sum(b.nbytes for b in specs if b.name.startswith("kv.") and not b.name.endswith("desc"))
            out["descriptors"] = sum(b.nbytes for b in specs if b.name.endswith(".desc"))
            out["slot_metadata"] = sum(b.nbytes for b in specs if b.name in LAYOUT_TABLES)
            out["io_buffers"] = sum(b.nbytes for b in specs) - out["kv_cache"] - out["descriptors"] \
                - out["slot_metadata"]
        return out

    def close(self) -> None:
        """Free the CUDA graph, device buffers and stream (the engines go with the object)."""
        self._release_graph()
        for bufs in (self._buffers, self._vision_buffers):
            if bufs is not None:
                bufs.free()
        self._buffers = self._vision_buffers = None
        if self.stream:
            self.cuda.stream_destroy(self.stream)
            self.stream = 0
