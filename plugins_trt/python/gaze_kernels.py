"""ctypes binding of libgaze_kernels.so (plugins_trt/capi/gaze_capi.h), for tests and benchmarks.

The host-side functions (attribute parsing, shape rules, workspace size, dispatch table)
need no GPU. `forward` takes raw device pointers (ints); gaze_backends.py owns that memory.
`build` makes the GPU library (nvcc), `build_cpu` the CPU harness build of the same kernels
(libgaze_kernels_cpu.so: same C ABI, "device" pointers are host pointers; needs g++ and the
CUDA headers only). Standard library only, so it imports anywhere; nothing outside tests/ and
bench/ imports it.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

PLUGIN_DIR = Path(__file__).resolve().parent.parent

F32, F16, I32, BOOL, BF16, I64 = 0, 1, 3, 4, 7, 8
FIELD_F32, FIELD_I32, FIELD_CHAR, FIELD_I64 = 1, 5, 6, 10
OK, ERR_INVALID, ERR_UNSUPPORTED, ERR_CUDA, ERR_DEVICE, ERR_INTERNAL = range(6)
DTYPE_CODES = {"float32": F32, "float16": F16, "bfloat16": BF16, "int32": I32, "int64": I64, "bool": BOOL}


class GazeKernelError(RuntimeError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _Field(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("data", ctypes.c_void_p), ("type", ctypes.c_int32),
                ("length", ctypes.c_int32)]


class Attrs(ctypes.Structure):
    _fields_ = [("top_k", ctypes.c_int32), ("max_region_tokens", ctypes.c_int32), ("scale", ctypes.c_float),
                ("routing", ctypes.c_int32), ("context_attention", ctypes.c_int32)]  # node v2: 0/1 each


class TensorDesc(ctypes.Structure):
    _fields_ = [("dtype", ctypes.c_int32), ("nb_dims", ctypes.c_int32), ("dims", ctypes.c_int64 * 8)]

    @classmethod
    def of(cls, dtype: int, dims: tuple[int, ...]) -> TensorDesc:
        d = cls()
        d.dtype, d.nb_dims = dtype, len(dims)
        for i, v in enumerate(dims):
            d.dims[i] = v
        return d

    def shape(self) -> tuple[int, ...]:
        return tuple(int(self.dims[i]) for i in range(self.nb_dims))


class Problem(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int64) for n in ("batch", "new_tokens", "cache_len", "num_regions", "q_heads",
                                               "kv_heads", "head_dim")] + \
               [(n, ctypes.c_int32) for n in ("dtype", "top_k", "max_region_tokens")]


class Tensors(ctypes.Structure):
    _fields_ = [(n, ctypes.c_void_p) for n in (
        "query", "key", "value", "past_key", "past_value", "past_desc", "slot_pos", "slot_region", "slot_valid",
        "gaze", "write_offset", "output", "present_key", "present_value", "present_desc")]


class TensorsV2(ctypes.Structure):
    """Node v2 (gaze_tensors_v2_t): the v1 pointers plus the runtime's layout tables."""

    _fields_ = [("base", Tensors)] + [(n, ctypes.c_void_p) for n in (
        "slot_image", "dense_slots", "region_slots", "region_count", "region_last")] + \
        [("dense_len", ctypes.c_int64)]


ROUTING = {"kv_head": 0, "query_head": 1}
CONTEXT_ATTENTION = {"causal": 0, "own_image": 1}


@dataclass
class Field:
    """One attribute as TensorRT's parser delivers it: INT -> int32, FLOAT -> float32, STRING -> char."""

    name: str
    value: int | float | str | bytes
    type: int

    @classmethod
    def int32(cls, name: str, value: int) -> Field:
        return cls(name, value, FIELD_I32)

    @classmethod
    def float32(cls, name: str, value: float) -> Field:
        return cls(name, value, FIELD_F32)

    @classmethod
    def string(cls, name: str, value: str) -> Field:
        return cls(name, value, FIELD_CHAR)


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.exists() else None


def build(build_dir: Path, architectures: str = "87;90", jobs: int = 2, timeout: float = 900) -> Path:
    """Build libgaze_kernels.so into build_dir (CMake; plain nvcc when CMake is missing) and return its path."""
    build_dir.mkdir(parents=True, exist_ok=True)
    nvcc = _nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc (the CUDA toolkit) is not installed")
    if shutil.which("cmake"):
        configure = ["cmake", "-S", str(PLUGIN_DIR), "-B", str(build_dir),
                     f"-DCMAKE_CUDA_ARCHITECTURES={architectures}", f"-DCMAKE_CUDA_COMPILER={nvcc}"]
        commands = [configure, ["cmake", "--build", str(build_dir), f"-j{jobs}"]]
    else:
        sources = [PLUGIN_DIR / "common" / "gaze_host.cpp", *sorted((PLUGIN_DIR / "kernels").glob("*.cu")),
                   PLUGIN_DIR / "capi" / "gaze_capi.cpp"]
        # SASS for each arch plus its PTX, as CMake's CUDA_ARCHITECTURES does: newer GPUs JIT the PTX.
        gencode = [f"-gencode=arch=compute_{a},code=[sm_{a},compute_{a}]" for a in architectures.split(";")]
        commands = [[nvcc, "-shared", "-std=c++17", "-O3", "-lineinfo", "--use_fast_math", "-Xcompiler", "-fPIC",
                     *gencode, "-I", str(PLUGIN_DIR), *map(str, sources), "-o",
                     str(build_dir / "libgaze_kernels.so")]]
    for cmd in commands:
        proc = subprocess.run(["nice", "-n", "15", *cmd], capture_output=True, text=True, timeout=timeout)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return build_dir / "libgaze_kernels.so"


CPU_LIBRARY = "libgaze_kernels_cpu.so"
CPU_SELFTEST_LIBRARY = "libgaze_harness_selftest.so"


class ToolMissing(RuntimeError):
    """A compiler or header set a build needs is not installed (tests skip on this, never on a failed build)."""


def cuda_include_dir() -> Path | None:
    """Folder with the CUDA toolkit headers (cuda_fp16.h): $CUDA_HOME, $CUDA_PATH, beside nvcc, /usr/local/cuda."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = _nvcc()
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    candidates.append("/usr/local/cuda")
    for root in candidates:
        if root and (Path(root) / "include" / "cuda_fp16.h").is_file():
            return Path(root) / "include"
    return None


def _cpu_sources() -> tuple[list[Path], list[Path]]:
    kernels = [PLUGIN_DIR / "kernels" / f"gaze_{n}.cu" for n in ("index", "select", "attention", "forward")]
    host = [PLUGIN_DIR / "common" / "gaze_host.cpp", PLUGIN_DIR / "capi" / "gaze_capi.cpp"]
    return kernels, host


def build_cpu(build_dir: Path, jobs: int = 2, timeout: float = 900) -> Path:
    """Build the CPU harness libraries into build_dir (CMake; plain g++ without it); return libgaze_kernels_cpu.so.

    Incremental either way. Raises ToolMissing without g++ or the CUDA headers."""
    cxx = os.environ.get("CXX") or shutil.which("g++")
    if not cxx or not shutil.which(cxx):
        raise ToolMissing("g++ is not installed (the CPU harness compiles the kernels as C++)")
    include = cuda_include_dir()
    if include is None:
        raise ToolMissing("the CUDA toolkit headers (cuda_fp16.h) are not installed: set CUDA_HOME")
    build_dir.mkdir(parents=True, exist_ok=True)
    harness = PLUGIN_DIR / "cpu_harness"
    if shutil.which("cmake"):
        _run(["cmake", "-S", str(harness), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
              f"-DCMAKE_CXX_COMPILER={shutil.which(cxx)}", f"-DGAZE_CUDA_INCLUDE_DIR={include}"], timeout)
        _run(["cmake", "--build", str(build_dir), f"-j{jobs}"], timeout)
        return build_dir / CPU_LIBRARY
    # Without CMake: the same flags as plugins_trt/cpu_harness/CMakeLists.txt.
    kernels, host = _cpu_sources()
    flags = ["-std=c++17", "-O2", "-fPIC", "-Wall", "-Wextra", "-Wno-unknown-pragmas", "-include",
             str(harness / "cuda_cpu.h"), "-I", str(PLUGIN_DIR), "-I", str(harness), "-I", str(include)]
    link = [f"-Wl,--version-script={harness / 'exports.map'}", f"-Wl,-T,{harness / 'shared.ld'}", "-Wl,-z,defs",
            "-pthread"]
    headers = [*PLUGIN_DIR.glob("*/*.h"), *PLUGIN_DIR.glob("*/*.cuh"), harness / "exports.map", harness / "shared.ld"]
    newest_header = max(p.stat().st_mtime for p in headers)
    obj_dir = build_dir / "obj"
    obj_dir.mkdir(exist_ok=True)
    libs = {CPU_LIBRARY: [*kernels, *host, harness / "harness.cpp"],
            CPU_SELFTEST_LIBRARY: [harness / "selftest.cu", harness / "harness.cpp"]}
    compiles, objects = [], {}
    for lib, sources in libs.items():
        objects[lib] = []
        for src in sources:
            obj = obj_dir / (src.name + ".o")  # shared.ld matches *.cu.o
            objects[lib].append(obj)
            if obj.exists() and obj.stat().st_mtime >= max(src.stat().st_mtime, newest_header):
                continue
            if obj not in {o for _, o in compiles}:
                lang = ["-x", "c++"] if src.suffix == ".cu" else []
                compiles.append(([cxx, *flags, *lang, "-c", str(src), "-o", str(obj)], obj))
    for i in range(0, len(compiles), max(1, jobs)):
        procs = [(subprocess.Popen(["nice", "-n", "15", *cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True), cmd) for cmd, _ in compiles[i:i + max(1, jobs)]]
        for proc, cmd in procs:
            out, _ = proc.communicate(timeout=timeout)
            if proc.returncode:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{out[-4000:]}")
    for lib, objs in objects.items():
        target = build_dir / lib
        if not target.exists() or target.stat().st_mtime < max(o.stat().st_mtime for o in objs):
            _run([cxx, "-shared", "-o", str(target), *map(str, objs), *link], timeout)
    return build_dir / CPU_LIBRARY


def _run(cmd: list[str], timeout: float) -> None:
    proc = subprocess.run(["nice", "-n", "15", *cmd], capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")


class GazeKernels:
    """The loaded library. Loading touches no CUDA (works without a GPU)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        lib = self.lib = ctypes.CDLL(str(self.path))
        p, i32, i64 = ctypes.POINTER, ctypes.c_int32, ctypes.c_int64
        sigs = {
            "gaze_abi_version": (ctypes.c_int, []),
            "gaze_last_error": (ctypes.c_char_p, []),
            "gaze_status_name": (ctypes.c_char_p, [i32]),
            "gaze_attribute_count": (i32, []),
            "gaze_attribute_name": (ctypes.c_char_p, [i32]),
            "gaze_parse_attributes": (i32, [p(_Field), i32, p(Attrs)]),
            "gaze_infer_outputs": (i32, [p(TensorDesc), i32, p(Attrs), p(TensorDesc), i32]),
            "gaze_infer_outputs_v2": (i32, [p(TensorDesc), i32, p(Attrs), p(TensorDesc), i32]),
            "gaze_supports_io_dtype": (i32, [i32, i32, i32]),
            "gaze_problem_from_inputs": (i32, [p(TensorDesc), i32, p(Attrs), p(Problem)]),
            "gaze_workspace_size": (i32, [p(Problem), p(ctypes.c_uint64)]),
            "gaze_workspace_size_v2": (i32, [p(Problem), p(ctypes.c_uint64)]),
            "gaze_plan_splits": (i32, [p(Problem), i32, p(i32)]),
            "gaze_plan_select_parts": (i32, [p(Problem), i64, p(i32)]),
            "gaze_dispatch_count": (i32, []),
            "gaze_dispatch_entry": (i32, [i32, p(i32), p(i32), p(ctypes.c_char_p)]),
            "gaze_dispatch_supported": (i32, [i32, i64]),
            "gaze_describe_device_errors": (ctypes.c_char_p, [i32]),
            "gaze_cuda_device_count": (i32, [p(i32)]),
            "gaze_forward": (i32, [p(Problem), p(Attrs), p(Tensors), ctypes.c_void_p, ctypes.c_uint64,
                                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]),
            "gaze_forward_v2": (i32, [p(Problem), p(Attrs), p(TensorsV2), ctypes.c_void_p, ctypes.c_uint64,
                                      ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, i32]),
            "gaze_forward_stages": (i32, [p(Problem), p(Attrs), p(Tensors), ctypes.c_void_p, ctypes.c_uint64,
                                          ctypes.c_void_p, i32]),
            "gaze_device_errors": (i32, [p(Problem), ctypes.c_void_p, ctypes.c_void_p, p(i32)]),
        }
        for name, (res, args) in sigs.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args

    def _check(self, status: int) -> None:
        if status != OK:
            raise GazeKernelError(status, self.last_error())

    def last_error(self) -> str:
        return (self.lib.gaze_last_error() or b"").decode()

    def status_name(self, status: int) -> str:
        return self.lib.gaze_status_name(status).decode()

    def abi_version(self) -> int:
        return int(self.lib.gaze_abi_version())

    def attribute_names(self) -> list[str]:
        return [self.lib.gaze_attribute_name(i).decode() for i in range(self.lib.gaze_attribute_count())]

    def parse_attributes(self, fields: list[Field]) -> Attrs:
        keep: list[object] = []
        arr = (_Field * max(1, len(fields)))()
        for i, f in enumerate(fields):
            if f.type == FIELD_CHAR:
                raw = f.value if isinstance(f.value, bytes) else str(f.value).encode()
                buf: ctypes.Array = ctypes.create_string_buffer(raw, len(raw))
                length = len(raw)
            elif f.type == FIELD_I32:
                buf, length = (ctypes.c_int32 * 1)(int(f.value)), 1  # type: ignore[arg-type]
            elif f.type == FIELD_I64:
                buf, length = (ctypes.c_int64 * 1)(int(f.value)), 1  # type: ignore[arg-type]
            else:
                buf, length = (ctypes.c_float * 1)(float(f.value)), 1  # type: ignore[arg-type]
            keep.append(buf)
            arr[i] = _Field(f.name.encode(), ctypes.cast(buf, ctypes.c_void_p), f.type, length)
        out = Attrs()
        self._check(self.lib.gaze_parse_attributes(arr, len(fields), ctypes.byref(out)))
        return out

    def infer_outputs(self, inputs: list[tuple[int, tuple[int, ...]]], attrs: Attrs) -> list[tuple[int, tuple]]:
        arr = (TensorDesc * max(1, len(inputs)))(*[TensorDesc.of(d, s) for d, s in inputs])
        out = (TensorDesc * 4)()
        self._check(self.lib.gaze_infer_outputs(arr, len(inputs), ctypes.byref(attrs), out, 4))
        return [(o.dtype, o.shape()) for o in out]

    def infer_outputs_v2(self, inputs: list[tuple[int, tuple[int, ...]]], attrs: Attrs) -> list[tuple[int, tuple]]:
        """Node v2 shape rules (16 inputs in the v2 order)."""
        arr = (TensorDesc * max(1, len(inputs)))(*[TensorDesc.of(d, s) for d, s in inputs])
        out = (TensorDesc * 4)()
        self._check(self.lib.gaze_infer_outputs_v2(arr, len(inputs), ctypes.byref(attrs), out, 4))
        return [(o.dtype, o.shape()) for o in out]

    def supports_io_dtype(self, pos: int, dtype: int, query_dtype: int) -> bool:
        return bool(self.lib.gaze_supports_io_dtype(pos, dtype, query_dtype))

    def problem_from_inputs(self, inputs: list[tuple[int, tuple[int, ...]]], attrs: Attrs) -> Problem:
        arr = (TensorDesc * max(1, len(inputs)))(*[TensorDesc.of(d, s) for d, s in inputs])
        out = Problem()
        self._check(self.lib.gaze_problem_from_inputs(arr, len(inputs), ctypes.byref(attrs), ctypes.byref(out)))
        return out

    def workspace_size(self, problem: Problem) -> int:
        out = ctypes.c_uint64()
        self._check(self.lib.gaze_workspace_size(ctypes.byref(problem), ctypes.byref(out)))
        return int(out.value)

    def workspace_size_v2(self, problem: Problem) -> int:
        """Node v2's workspace (gaze_forward_v2): no slot index, plus the selection's region-part candidates."""
        out = ctypes.c_uint64()
        self._check(self.lib.gaze_workspace_size_v2(ctypes.byref(problem), ctypes.byref(out)))
        return int(out.value)

    def plan_select_parts(self, problem: Problem, rows: int) -> int:
        """Region parts per selection row (node v2) for a launch of `rows` = B x Hsel x queries rows."""
        out = ctypes.c_int32()
        self._check(self.lib.gaze_plan_select_parts(ctypes.byref(problem), rows, ctypes.byref(out)))
        return int(out.value)

    def plan_splits(self, problem: Problem, num_sms: int) -> int:
        out = ctypes.c_int32()
        self._check(self.lib.gaze_plan_splits(ctypes.byref(problem), num_sms, ctypes.byref(out)))
        return int(out.value)

    def dispatch_table(self) -> list[tuple[int, int, str]]:
        rows = []
        for i in range(self.lib.gaze_dispatch_count()):
            dt, hd, name = ctypes.c_int32(), ctypes.c_int32(), ctypes.c_char_p()
            self._check(self.lib.gaze_dispatch_entry(i, ctypes.byref(dt), ctypes.byref(hd), ctypes.byref(name)))
            rows.append((dt.value, hd.value, (name.value or b"").decode()))
        return rows

    def dispatch_supported(self, dtype: int, head_dim: int) -> bool:
        return bool(self.lib.gaze_dispatch_supported(dtype, head_dim))

    def describe_device_errors(self, flags: int) -> str:
        return self.lib.gaze_describe_device_errors(flags).decode()

    def cuda_device_count(self) -> int:
        out = ctypes.c_int32()
        self._check(self.lib.gaze_cuda_device_count(ctypes.byref(out)))
        return int(out.value)

    def forward(self, problem: Problem, attrs: Attrs, tensors: Tensors, workspace: int, workspace_bytes: int,
                stream: int = 0, selected: int = 0, num_selected: int = 0) -> None:
        self._check(self.lib.gaze_forward(ctypes.byref(problem), ctypes.byref(attrs), ctypes.byref(tensors),
                                          workspace, workspace_bytes, stream or None, selected or None,
                                          num_selected or None))

    def forward_v2(self, problem: Problem, attrs: Attrs, tensors: TensorsV2, workspace: int, workspace_bytes: int,
                   stream: int = 0, selected: int = 0, num_selected: int = 0, stage_mask: int = 7) -> None:
        self._check(self.lib.gaze_forward_v2(ctypes.byref(problem), ctypes.byref(attrs), ctypes.byref(tensors),
                                             workspace, workspace_bytes, stream or None, selected or None,
                                             num_selected or None, stage_mask))

    def forward_stages(self, problem: Problem, attrs: Attrs, tensors: Tensors, workspace: int,
                       workspace_bytes: int, stream: int, stage_mask: int) -> None:
        self._check(self.lib.gaze_forward_stages(ctypes.byref(problem), ctypes.byref(attrs), ctypes.byref(tensors),
                                                 workspace, workspace_bytes, stream or None, stage_mask))

    def device_errors(self, problem: Problem, workspace: int, stream: int = 0) -> int:
        out = ctypes.c_int32()
        self._check(self.lib.gaze_device_errors(ctypes.byref(problem), workspace, stream or None, ctypes.byref(out)))
        return int(out.value)
