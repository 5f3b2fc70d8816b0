"""Backends run the exported graphs; the decode loop (runtime/generate.py) knows only this interface.

A backend owns the device buffers of the KV cache and descriptors (on a GPU they live
there) and binds the runtime's host slot metadata. `OrtBackend` runs decoder.onnx and
vision.onnx with ONNX Runtime (CPU here; the CUDA execution provider where
onnxruntime-gpu is installed). The TensorRT backend (runtime/trt_backend.py) plugs in
behind the same class; where TensorRT, a GPU or matching engines are missing it says so.

What ONNX Runtime does with the cache (measured, see docs/RUNTIME.md): with I/O binding
the runtime hands ORT the cache buffers themselves (OrtValues over the numpy memory: no
copy in or out of session.run), and `present.*` is bound to the very buffer bound to
`past_key_values.*` (past and present share one buffer, as the contract allows). Inside
the graph the GazeAttention body writes the new slots with ScatterND, whose ONNX Runtime
kernel skips its input copy when input and output are the same buffer: the KV write
touches the T new slots only. The layout tables (runtime/cache.py SlotState) are bound
once per generation and rewritten in place; the dense-slot list is rebound only when it grows.
"""

from __future__ import annotations

import abc
import json
import time

import numpy as np

from gaze_edge.errors import GazeError, InputError

from .cache import CacheSpec, SlotState
from .folder import ExportFolder

BACKENDS = ("onnxruntime", "tensorrt")


class BackendError(GazeError):
    """A backend is unknown, not installed here, or cannot load the export."""


class Backend(abc.ABC):
    """Runs vision and decoder graphs over a runtime-owned cache layout."""

    name: str = "backend"

    def __init__(self, folder: ExportFolder) -> None:
        self.folder = folder
        self.session_seconds = 0.0  # time spent inside the graph runtime's own run calls
        self.spec: CacheSpec | None = None

    @abc.abstractmethod
    def vision(self, pixel_values: np.ndarray) -> np.ndarray:
        """Preprocessed pixels [N, 3, S, S] -> visual embeddings [N, tokens_per_image, H] (host)."""

    @abc.abstractmethod
    def allocate(self, spec: CacheSpec, slots: SlotState) -> None:
        """Allocate (zeroed) cache and descriptor buffers once for a generation; bind the slot metadata."""

    @abc.abstractmethod
    def decode(self, embeds: np.ndarray, gaze: np.ndarray, write_offset: int,
               logits_positions: np.ndarray | None = None) -> np.ndarray:
        """One decoder call over T new tokens (slots and tables already written).

        Returns logits [B, n, V] (host) of the call's columns `logits_positions` (default: the last only).
        """

    @abc.abstractmethod
    def descriptor_sums(self, layer: int) -> np.ndarray:
        """Host view of layer `layer`'s descriptor sums [B, Hkv, R, D] (float32)."""

    def gaze_queries(self) -> list[np.ndarray] | None:
        """Per layer rotated queries [B, Hq, T, D] of the last call, when the export outputs them."""
        return None

    def cache_arrays(self) -> dict[str, np.ndarray]:
        """Host views of the cache buffers (for memory accounting and tests); empty if not host-visible."""
        return {}

    def memory(self) -> dict[str, int]:
        """Bytes by kind this backend holds: weights, kv_cache, descriptors, ... (best effort)."""
        return {}


def create_backend(name: str, folder: ExportFolder, threads: int | None = None,
                   provider: str | None = None, spinning: bool = True) -> Backend:
    """The backend called `name`, or BackendError saying which exist and what is missing."""
    check_threads(threads)
    if name == "onnxruntime":
        return OrtBackend(folder, threads=threads, provider=provider, spinning=spinning)
    if name == "tensorrt":
        from .trt_backend import TrtBackend  # imports TensorRT lazily; refuses with BackendError when missing

        return TrtBackend(folder)
    raise BackendError(f"unknown backend {name!r}; choose one of: {', '.join(BACKENDS)}")


def check_top_k_metadata(folder: ExportFolder, metadata: dict[str, str]) -> None:
    """The decoder's nodes and gaze_config.json must agree on top_k per layer (both rewritten by `gaze calibrate`)."""
    from gaze_edge.export.node import TOP_K_METADATA  # a constants module: imports nothing

    recorded = metadata.get(TOP_K_METADATA)
    if recorded is None:
        return  # exported before the key existed: nothing to compare
    try:
        graph_top_k = tuple(int(k) for k in json.loads(recorded))
    except (ValueError, TypeError) as exc:
        raise BackendError(f"{folder.decoder_path} has unreadable {TOP_K_METADATA} metadata {recorded!r}; "
                           "re-run `gaze export`") from exc
    if graph_top_k != folder.shape.top_k_per_layer:
        raise BackendError(f"{folder.decoder_path} selects top_k {list(graph_top_k)} per layer but gaze_config.json "
                           f"says {list(folder.shape.top_k_per_layer)}: the folder was changed half-way (an "
                           "interrupted `gaze calibrate`?); run `gaze calibrate` on it again or re-export")


MAX_THREADS = 1024  # as `--threads` (gaze_edge/cli_args.py)


def check_threads(threads: int | None) -> None:
    """None (ONNX Runtime's default) or an integer in 1 .. MAX_THREADS; else InputError.

    0 used to mean the default silently and a negative count went through to ONNX Runtime.
    """
    if threads is None:
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= MAX_THREADS:
        raise InputError(f"threads must be None (ONNX Runtime's default) or an integer in 1 .. {MAX_THREADS}, "
                         f"got {threads!r}")


class OrtBackend(Backend):
    """ONNX Runtime with I/O binding: the cache buffers are bound, never copied by the runtime."""

    name = "onnxruntime"

    def __init__(self, folder: ExportFolder, threads: int | None = None, provider: str | None = None,
                 share_buffers: bool = True, spinning: bool = True) -> None:
        check_threads(threads)
        super().__init__(folder)
        self.share_buffers = share_buffers
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BackendError("onnxruntime is not installed: pip install onnxruntime (or onnxruntime-gpu)") from exc
        self.ort = ort
        available = ort.get_available_providers()
        if provider is None:
            provider = "CUDAExecutionProvider" if "CUDAExecutionProvider" in available else "CPUExecutionProvider"
        if provider not in available:
            raise BackendError(f"ONNX Runtime here has no {provider} (available: {', '.join(available)})")
        self.provider = provider
        # The cache is host memory bound in place; on CUDA the graph would copy it per call, so
        # keep the CUDA provider for vision and a correctness path, not for timing claims.
        options = ort.SessionOptions()
        # ORT's graph optimizer warns, once per session, that it cannot rename a value read inside the
        # body's If branches; the result is unaffected (the parity tests), so only errors are printed.
        options.log_severity_level = 3
        if not spinning:  # when sessions alternate (benchmarks), a spinning pool steals the other's time
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        try:
            self.decoder = ort.InferenceSession(str(folder.decoder_path), options, providers=[provider])
            self.vision_session = ort.InferenceSession(str(folder.vision_path), options, providers=[provider])
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types, not exported stably
            raise BackendError(f"ONNX Runtime cannot load {folder.path}: {exc}; re-run `gaze export` "
                               "(a --trt-compat export has no GazeAttention function for ONNX Runtime)") from exc
        self._check_graph()
        self.io = self.decoder.io_binding()
        self._shrink = ort.RunOptions()
        self._shrink.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        self._queries: list[np.ndarray] | None = None

    def _check_graph(self) -> None:
        from gaze_edge.export.node import DECODER_CALL_INPUTS  # a constants module: imports nothing

        s = self.folder.shape
        inputs = {i.name: i for i in self.decoder.get_inputs()}
        expected = set(DECODER_CALL_INPUTS)
        expected |= {f"past_key_values.{i}.{k}" for i in range(s.num_layers) for k in ("key", "value", "desc")}
        if set(inputs) != expected:
            missing, extra = sorted(expected - set(inputs)), sorted(set(inputs) - expected)
            raise BackendError(f"{self.folder.decoder_path} does not match this runtime (missing inputs "
                               f"{missing[:4]}, unexpected {extra[:4]}): it was exported by another gaze-edge "
                               "version or changed since; re-run `gaze export`")
        key = inputs["past_key_values.0.key"].shape
        desc = inputs["past_key_values.0.desc"].shape
        if key[1] != s.kv_heads or key[3] != s.head_dim or desc[2] != s.num_regions:
            raise BackendError(f"{self.folder.decoder_path} has KV heads/head dim/regions {key[1]}/{key[3]}/"
                               f"{desc[2]}, gaze_config.json {s.kv_heads}/{s.head_dim}/{s.num_regions}; "
                               "re-run `gaze export`")
        check_top_k_metadata(self.folder, self.decoder.get_modelmeta().custom_metadata_map)
        self.output_names = [o.name for o in self.decoder.get_outputs()]
        self.query_names = [n for n in self.output_names if n.startswith("gaze_query.")]

    # ------------------------------------------------------------------ vision

    def vision(self, pixel_values: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        out = self.vision_session.run(None, {"pixel_values": pixel_values.astype(self.folder.shape.dtype)})[0]
        self.session_seconds += time.perf_counter() - start
        return np.asarray(out)

    # ------------------------------------------------------------------ cache

    def allocate(self, spec: CacheSpec, slots: SlotState) -> None:
        ort, s = self.ort, self.folder.shape
        self.spec = spec
        self.io.clear_binding_inputs()
        self.io.clear_binding_outputs()
        self.kv: dict[str, np.ndarray] = {}
        for i in range(s.num_layers):
            self.kv[f"{i}.key"] = np.zeros(spec.kv_shape, dtype=s.dtype)
            self.kv[f"{i}.value"] = np.zeros(spec.kv_shape, dtype=s.dtype)
            self.kv[f"{i}.desc"] = np.zeros(spec.desc_shape, dtype=np.float32)
        # OrtValues over numpy memory (CPU: shared, not copied); kept referenced as long as bound.
        self._values = {name: ort.OrtValue.ortvalue_from_numpy(buf) for name, buf in self.kv.items()}
        if self.share_buffers:
            self._spare: dict[str, np.ndarray] = {}
            self._spare_values = self._values
        else:
            # Ping-pong: present goes to a second set of buffers, swapped in after the call (no copy).
            self._spare = {name: np.zeros_like(buf) for name, buf in self.kv.items()}
            self._spare_values = {n: ort.OrtValue.ortvalue_from_numpy(b) for n, b in self._spare.items()}
        self._bind_cache()
        self.slots = slots
        self._tables: dict[str, tuple[np.ndarray, object]] = {}
        self._bind_tables()
        self.write_offset = np.zeros(1, dtype=np.int64)
        self._offset_value = ort.OrtValue.ortvalue_from_numpy(self.write_offset)
        self.io.bind_ortvalue_input("write_offset", self._offset_value)
        self._bound_length = -1
        self._bound_positions: tuple[int, ...] = ()

    def _bind_tables(self) -> None:
        """Bind the layout tables; only arrays that were replaced (the dense list when it grows) are rebound."""
        for name, array in self.slots.tables().items():
            bound = self._tables.get(name)
            if bound is None or bound[0] is not array:
                value = self.ort.OrtValue.ortvalue_from_numpy(array)
                self.io.bind_ortvalue_input(name, value)
                self._tables[name] = (array, value)

    def _bind_cache(self) -> None:
        for name in self.kv:
            self.io.bind_ortvalue_input(f"past_key_values.{name}", self._values[name])
            self.io.bind_ortvalue_output(f"present.{name}", self._spare_values[name])

    def _swap(self) -> None:
        self.kv, self._spare = self._spare, self.kv
        self._values, self._spare_values = self._spare_values, self._values
        self._bind_cache()

    def _bind_call(self, embeds: np.ndarray, gaze: np.ndarray, positions: np.ndarray) -> None:
        """(Re)bind the per-call tensors; a decode step (same T and positions as the last call) reuses every one."""
        ort, s = self.ort, self.folder.shape
        batch, length = embeds.shape[:2]
        key = tuple(int(p) for p in positions)
        if length != self._bound_length:
            self._embeds = np.zeros((batch, length, s.hidden_size), dtype=s.dtype)
            self._gaze = np.zeros((batch, length), dtype=bool)
            self._call_values = [ort.OrtValue.ortvalue_from_numpy(a) for a in (self._embeds, self._gaze)]
            self.io.bind_ortvalue_input("inputs_embeds", self._call_values[0])
            self.io.bind_ortvalue_input("gaze", self._call_values[1])
            self._query_bufs = [np.zeros((batch, s.num_heads, length, s.head_dim), dtype=s.dtype)
                                for _ in self.query_names]
            self._query_values = [ort.OrtValue.ortvalue_from_numpy(a) for a in self._query_bufs]
            for name, value in zip(self.query_names, self._query_values, strict=True):
                self.io.bind_ortvalue_output(name, value)
            self._bound_length = length
        if key != self._bound_positions:
            self._positions = np.asarray(key, dtype=np.int64)
            self._logits = np.zeros((batch, len(key), s.vocab_size), dtype=s.dtype)
            self._position_values = [ort.OrtValue.ortvalue_from_numpy(a) for a in (self._positions, self._logits)]
            self.io.bind_ortvalue_input("logits_positions", self._position_values[0])
            self.io.bind_ortvalue_output("logits", self._position_values[1])
            self._bound_positions = key
        self._embeds[...] = embeds
        self._gaze[...] = gaze
        self._bind_tables()

    def decode(self, embeds: np.ndarray, gaze: np.ndarray, write_offset: int,
               logits_positions: np.ndarray | None = None) -> np.ndarray:
        if self.spec is None:
            raise InputError("allocate() the cache before calling decode()")
        positions = np.array([embeds.shape[1] - 1]) if logits_positions is None else logits_positions
        if positions.size == 0 or positions.min() < 0 or positions.max() >= embeds.shape[1]:
            raise InputError(f"logits positions {positions.tolist()} are not columns of a call of {embeds.shape[1]}")
        self._bind_call(embeds, gaze, positions)
        self.write_offset[0] = write_offset
        start = time.perf_counter()
        # A prefill call's scores grow with the context; letting ORT's arena keep each call's peak made a
        # 23k-token prefill reach 24 GB. Prefill calls give the arena back afterwards; decode steps keep it.
        self.decoder.run_with_iobinding(self.io, self._shrink if embeds.shape[1] > 1 else None)
        self.session_seconds += time.perf_counter() - start
        if not self.share_buffers:
            self._swap()
        return self._logits

    def descriptor_sums(self, layer: int) -> np.ndarray:
        return self.kv[f"{layer}.desc"]

    def gaze_queries(self) -> list[np.ndarray] | None:
        return list(self._query_bufs) if self.query_names else None

    def cache_arrays(self) -> dict[str, np.ndarray]:
        return dict(self.kv) if self.spec is not None else {}

    def memory(self) -> dict[str, int]:
        weights = sum(p.stat().st_size for p in self.folder.path.glob("*.onnx*"))
        weights += self.folder.embedding_path.stat().st_size
        out: dict[str, int] = {"weights": int(weights)}
        if self.spec is not None:
            out["kv_cache"] = sum(a.nbytes for k, a in self.kv.items() if not k.endswith("desc"))
            out["descriptors"] = sum(a.nbytes for k, a in self.kv.items() if k.endswith("desc"))
        return out
