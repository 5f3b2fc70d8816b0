"""Where libgaze_kernels runs: the CPU harness build, or a CUDA GPU through CuPy or cuda-python.

Tests and benchmarks hand the C ABI raw pointers; a backend owns that memory. Arrays are
prepared on the host (numpy, with ml_dtypes for bfloat16), uploaded, and read back:

    backend = cpu_backend(lib_path)          # libgaze_kernels_cpu.so: "device" memory is host memory
    backend = gpu_backend(lib_path)          # libgaze_kernels.so on a GPU; raises GpuUnavailable with the reason
    buf = backend.upload(np.zeros((4, 8), np.float16)); backend.lib.forward(..., buf.ptr, ...)
    out = backend.download(buf)

No torch: the README's install is CPU torch, and the GPU tests must not need a CUDA build of it.
Nothing outside tests/ and bench/ imports this.
"""

from __future__ import annotations

import ctypes
import mmap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


def _binding() -> Any:
    """The sibling ctypes binding, shared with whoever loaded it first (tests/test_plugin_build.py does)."""
    import sys

    if "gaze_kernels" not in sys.modules:
        import importlib.util

        spec = importlib.util.spec_from_file_location("gaze_kernels", Path(__file__).with_name("gaze_kernels.py"))
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        sys.modules["gaze_kernels"] = module
        spec.loader.exec_module(module)
    return sys.modules["gaze_kernels"]


GazeKernels = _binding().GazeKernels

ALIGN = 256  # the kernels need 16-byte pointers; 256 matches what cudaMalloc returns


def np_dtype(name: str) -> np.dtype:
    """numpy dtype of a kernel dtype name; bfloat16 comes from ml_dtypes (installed with onnx)."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


@dataclass
class Buffer:
    ptr: int
    shape: tuple[int, ...]
    dtype: np.dtype
    keep: Any = field(default=None, repr=False)  # what owns the memory (CPU: a numpy array)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


class Backend:
    name = "?"
    stream = 0

    def __init__(self, lib: GazeKernels) -> None:
        self.lib = lib

    @property
    def num_sms(self) -> int:
        raise NotImplementedError

    def upload(self, x: np.ndarray) -> Buffer:
        raise NotImplementedError

    def download(self, buf: Buffer) -> np.ndarray:
        raise NotImplementedError

    def empty(self, shape: tuple[int, ...], dtype: np.dtype | str) -> Buffer:
        return self.upload(np.zeros(shape, dtype))

    def synchronize(self) -> None:
        pass

    def copy(self, dst: Buffer, src: Buffer) -> None:
        """Device-to-device copy of src into dst (same size)."""
        raise NotImplementedError

    def time_ms(self, fn: Callable[[], None]) -> float:
        """Milliseconds one call of fn takes on the device (GPU: CUDA events on stream 0)."""
        raise NotImplementedError


class CpuBackend(Backend):
    """The CPU harness build: buffers are aligned numpy arrays, pointers their addresses."""

    name = "cpu"

    def __init__(self, lib: GazeKernels) -> None:
        super().__init__(lib)
        h = lib.lib
        try:
            self._set_seed = h.gaze_harness_set_seed
        except AttributeError as e:
            raise RuntimeError(f"{lib.path} is not the CPU harness build (no gaze_harness_set_seed)") from e
        self._set_seed.argtypes, self._set_seed.restype = [ctypes.c_uint64], None
        h.gaze_harness_sm_count.restype = ctypes.c_int32
        h.gaze_harness_counters.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_int32]
        h.gaze_harness_counters.restype = None
        self.seed = 0

    def set_seed(self, seed: int) -> None:
        """Scheduling seed of the harness (0: natural order); restarts its random streams."""
        self._set_seed(seed)
        self.seed = seed

    def counters(self) -> dict[str, int]:
        out = (ctypes.c_uint64 * 7)()
        self.lib.lib.gaze_harness_counters(out, 7)
        names = ("launches", "blocks", "threads", "barriers", "exchanges", "switches", "failures")
        return dict(zip(names, (int(v) for v in out), strict=True))

    @property
    def num_sms(self) -> int:
        return int(self.lib.lib.gaze_harness_sm_count())

    def upload(self, x: np.ndarray) -> Buffer:
        x = np.ascontiguousarray(x)
        arr = _guarded(x.nbytes).view(x.dtype).reshape(x.shape)
        arr[...] = x
        return Buffer(arr.ctypes.data, tuple(x.shape), x.dtype, keep=arr)

    def download(self, buf: Buffer) -> np.ndarray:
        return np.array(buf.keep, copy=True)

    def copy(self, dst: Buffer, src: Buffer) -> None:
        assert dst.nbytes == src.nbytes
        ctypes.memmove(dst.ptr, src.ptr, src.nbytes)

    def time_ms(self, fn: Callable[[], None]) -> float:
        import time

        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


_PAGE = mmap.PAGESIZE
_GUARD = 64 << 20  # inaccessible address space on each side of a CPU buffer (reserved, never committed)
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_PROT_RW, _MAP_FLAGS = mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x4000  # NORESERVE


class _Mapping:
    """An anonymous mapping, unmapped when the last array using it goes."""

    def __init__(self, size: int) -> None:
        addr = _libc.mmap(None, size, 0, _MAP_FLAGS, -1, 0)  # PROT_NONE
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap of a guarded CPU buffer failed")
        self.addr, self.size = int(addr), size

    def __del__(self) -> None:
        _libc.munmap(self.addr, self.size)


def _guarded(nbytes: int) -> np.ndarray:
    """nbytes of fresh zeroed memory (uint8) between two 64 MiB inaccessible reservations, its end
    ALIGN-aligned against the upper one. A kernel that reads or writes past a buffer (or through a
    garbage index) then faults, and the harness reports an illegal address, as a GPU would,
    instead of corrupting the Python heap and crashing later."""
    body = -(-max(nbytes, 1) // ALIGN) * ALIGN
    span = -(-body // _PAGE) * _PAGE
    m = _Mapping(2 * _GUARD + span)
    if _libc.mprotect(m.addr + _GUARD, span, _PROT_RW):
        raise OSError(ctypes.get_errno(), "mprotect of a guarded CPU buffer failed")
    raw = (ctypes.c_uint8 * nbytes).from_address(m.addr + _GUARD + span - body)
    raw._mapping = m  # type: ignore[attr-defined]  # the numpy array keeps raw, raw keeps the mapping
    return np.frombuffer(raw, np.uint8)


class GpuUnavailable(RuntimeError):
    """No usable CUDA GPU; the message says why (for a test skip)."""


class _Runtime:
    """The few CUDA runtime calls a GPU backend needs, from CuPy or cuda-python."""

    name = "?"
    malloc: Callable[[int], int]
    free: Callable[[int], None]
    htod: Callable[[int, int, int], None]
    dtoh: Callable[[int, int, int], None]
    dtod: Callable[[int, int, int], None]
    sync: Callable[[], None]
    device_count: Callable[[], int]
    sm_count: Callable[[], int]
    device_name: Callable[[], str]
    elapsed_ms: Callable[[Callable[[], None]], float]  # time one call with CUDA events on stream 0


def _cupy_runtime() -> _Runtime:
    import cupy

    rt = cupy.cuda.runtime
    r = _Runtime()
    r.name = f"cupy {cupy.__version__}"
    r.malloc = rt.malloc
    r.free = rt.free
    r.htod = lambda dst, src, n: rt.memcpy(dst, src, n, rt.memcpyHostToDevice)
    r.dtoh = lambda dst, src, n: rt.memcpy(dst, src, n, rt.memcpyDeviceToHost)
    r.dtod = lambda dst, src, n: rt.memcpy(dst, src, n, rt.memcpyDeviceToDevice)
    r.sync = rt.deviceSynchronize
    r.device_count = rt.getDeviceCount
    r.sm_count = lambda: int(rt.deviceGetAttribute(16, rt.getDevice()))  # 16: cudaDevAttrMultiProcessorCount
    r.device_name = lambda: _text(rt.getDeviceProperties(rt.getDevice())["name"])

    def elapsed(fn: Callable[[], None]) -> float:
        a, b = rt.eventCreate(), rt.eventCreate()
        try:
            rt.eventRecord(a, 0)
            fn()
            rt.eventRecord(b, 0)
            rt.eventSynchronize(b)
            return float(rt.eventElapsedTime(a, b))
        finally:
            rt.eventDestroy(a)
            rt.eventDestroy(b)

    r.elapsed_ms = elapsed
    return r


def _cuda_python_runtime() -> _Runtime:
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        from cuda import cudart  # older cuda-python

    def call(result: tuple) -> Any:  # cuda-python returns (error, values...)
        err, *values = result
        if int(err) != 0:
            name = cudart.cudaGetErrorName(err)[1]
            raise GpuUnavailable(f"cuda-python: {_text(name)}")
        return values[0] if len(values) == 1 else values

    kinds = cudart.cudaMemcpyKind
    h2d, d2h, d2d = kinds.cudaMemcpyHostToDevice, kinds.cudaMemcpyDeviceToHost, kinds.cudaMemcpyDeviceToDevice
    r = _Runtime()
    r.name = "cuda-python"
    r.malloc = lambda n: int(call(cudart.cudaMalloc(n)))
    r.free = lambda p: call(cudart.cudaFree(p))
    r.htod = lambda dst, src, n: call(cudart.cudaMemcpy(dst, src, n, h2d))
    r.dtoh = lambda dst, src, n: call(cudart.cudaMemcpy(dst, src, n, d2h))
    r.dtod = lambda dst, src, n: call(cudart.cudaMemcpy(dst, src, n, d2d))
    r.sync = lambda: call(cudart.cudaDeviceSynchronize())
    r.device_count = lambda: int(call(cudart.cudaGetDeviceCount()))
    r.sm_count = lambda: int(call(cudart.cudaDeviceGetAttribute(
        cudart.cudaDeviceAttr.cudaDevAttrMultiProcessorCount, int(call(cudart.cudaGetDevice())))))
    r.device_name = lambda: _text(call(cudart.cudaGetDeviceProperties(int(call(cudart.cudaGetDevice())))).name)

    def elapsed(fn: Callable[[], None]) -> float:
        a, b = call(cudart.cudaEventCreate()), call(cudart.cudaEventCreate())
        try:
            call(cudart.cudaEventRecord(a, 0))
            fn()
            call(cudart.cudaEventRecord(b, 0))
            call(cudart.cudaEventSynchronize(b))
            return float(call(cudart.cudaEventElapsedTime(a, b)))
        finally:
            cudart.cudaEventDestroy(a)
            cudart.cudaEventDestroy(b)

    r.elapsed_ms = elapsed
    return r


def _text(x: Any) -> str:
    if isinstance(x, bytes):
        return x.split(b"\0", 1)[0].decode(errors="replace")
    return str(x)


def gpu_runtime() -> _Runtime:
    """CuPy if importable, else cuda-python; GpuUnavailable (with the reasons) when neither serves a GPU."""
    reasons = []
    for make in (_cupy_runtime, _cuda_python_runtime):
        try:
            r = make()
            n = r.device_count()
        except ImportError as e:
            reasons.append(f"{make.__name__.strip('_')}: not installed ({e.name or e})")
            continue
        except Exception as e:  # a missing driver raises here: skip, do not crash
            reasons.append(f"{make.__name__.strip('_')}: {type(e).__name__}: {e}")
            continue
        if n > 0:
            return r
        reasons.append(f"{r.name}: no CUDA device")
    raise GpuUnavailable("no CUDA GPU usable without torch (" + "; ".join(reasons) + ")")


class GpuBackend(Backend):
    name = "gpu"

    def __init__(self, lib: GazeKernels, runtime: _Runtime) -> None:
        super().__init__(lib)
        self.rt = runtime
        self._live: list[int] = []

    @property
    def num_sms(self) -> int:
        return self.rt.sm_count()

    def upload(self, x: np.ndarray) -> Buffer:
        x = np.ascontiguousarray(x)
        ptr = self.rt.malloc(max(1, x.nbytes))
        self._live.append(ptr)
        if x.nbytes:
            self.rt.htod(ptr, x.ctypes.data, x.nbytes)
        return Buffer(ptr, tuple(x.shape), x.dtype)

    def download(self, buf: Buffer) -> np.ndarray:
        out = np.empty(buf.shape, buf.dtype)
        self.rt.sync()
        if out.nbytes:
            self.rt.dtoh(out.ctypes.data, buf.ptr, out.nbytes)
        return out

    def synchronize(self) -> None:
        self.rt.sync()

    def copy(self, dst: Buffer, src: Buffer) -> None:
        assert dst.nbytes == src.nbytes
        self.rt.dtod(dst.ptr, src.ptr, src.nbytes)

    def time_ms(self, fn: Callable[[], None]) -> float:
        return self.rt.elapsed_ms(fn)

    def empty(self, shape: tuple[int, ...], dtype: np.dtype | str) -> Buffer:
        """Uninitialised device memory (no host staging: benchmark buffers are large)."""
        dt = np.dtype(dtype)
        n = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        ptr = self.rt.malloc(max(1, n))
        self._live.append(ptr)
        return Buffer(ptr, tuple(shape), dt)

    def free_all(self) -> None:
        """Frees every buffer this backend uploaded (call between cases on a long run)."""
        self.rt.sync()
        while self._live:
            self.rt.free(self._live.pop())


def cpu_backend(lib_path: str | Path) -> CpuBackend:
    return CpuBackend(GazeKernels(lib_path))


def gpu_backend(lib_path: str | Path) -> GpuBackend:
    runtime = gpu_runtime()
    lib = GazeKernels(lib_path)
    if lib.cuda_device_count() < 1:
        raise GpuUnavailable(f"no CUDA GPU visible to {Path(lib_path).name}: {lib.last_error()}")
    return GpuBackend(lib, runtime)
