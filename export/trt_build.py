"""`gaze build OUT`: TensorRT engines for an export folder, with the GazeAttention plugin.

Runs on the target (JetPack) or a machine with the same GPU architecture and TensorRT
version. Writes into OUT/engines/ (or --engine-dir): decoder.engine (one engine, two
optimization profiles: 0 = prefill chunks, 1 = decode steps), vision.engine, a timing
cache, a copy of the plugin library, and engine_manifest.json (TensorRT version, GPU arch,
plugin sha256, shapes) that the runtime checks before loading (export/engine_manifest.py). The profiles cover
every GazeAttention v2 decoder input (docs/ONNX_CONTRACT.md); a v1 export is refused (re-export it). Tested
without TensorRT only (tests/test_trt_build.py): not run on TensorRT.

TensorRT's ONNX parser and the plugin: the library is loaded from an explicit path
(IPluginRegistry.load_library, never a search path). TensorRT <= 10.6 runs a model-local
function instead of a registered plugin, so the gaze FunctionProto is stripped for those
versions (needs the `onnx` package, or export with --trt-compat); from 10.7 the plugin wins,
and from 10.15 because the node carries plugin_namespace, with the parser flag
ENABLE_PLUGIN_OVERRIDE also set where the TensorRT Python API has it.

TensorRT 10.3 .. 11.x (export/trt_policy.py holds the rules): networks are strongly typed (an fp32 export
stays fp32, an fp16 one fp16; no BuilderFlag.FP16, which TensorRT 11 removed), the builder config enables
PreviewFeature.ALIASED_PLUGIN_IO_10_03 (else the plugin's in-place KV cache would silently become a copy),
and a failed dlopen of the plugin (load_library returns None) is reported by path.

Every option is checked while parsing (gaze_edge/cli_args.py, docs/CLI.md), gaze_config.json
is read like every other JSON file (gaze_edge/jsonfile.py), and each engine, the timing cache
and the manifest are replaced atomically (gaze_edge/atomic.py: temp file, fsync, rename), so
an interrupt (Ctrl-C, SIGTERM, SIGHUP) never leaves a half-written engine or a temp file.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from gaze_edge import cli_args as ca
from gaze_edge import console
from gaze_edge.atomic import replace_file
from gaze_edge.errors import GazeError
from gaze_edge.jsonfile import read_json_object

from . import engine_manifest, trt_policy

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PLUGIN = REPO_ROOT / "build" / "plugins_trt" / "libgaze_trt_plugin.so"
PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE = "GazeAttention", "2", "gaze"  # what libgaze_trt_plugin.so registers
#: The GazeAttention node version the build profiles and the TensorRT backend's bindings follow: v2, the inputs of
#: docs/ONNX_CONTRACT.md (slot_image, dense_slots, region tables, logits_positions). An export of another version is
#: refused before anything is built (a v1 export: re-export it).
GLUE_NODE_VERSION = "2"
SUPPORTED = (trt_policy.MIN_VERSION, (trt_policy.MAX_MAJOR, 99))  # TensorRT 10.3 .. 11.x (trt_policy)
BUILD_HINT = "cmake -S plugins_trt -B build/plugins_trt && cmake --build build/plugins_trt -j2"


class TensorRTMissingError(GazeError):
    """TensorRT (the builder and its Python API) is not installed, or only a placeholder is."""


class EngineBuildError(GazeError):
    """The engines cannot be built: bad export folder, plugin library or TensorRT failure."""


def add_build_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `build` subcommand to a `gaze` argparse subparsers object."""
    p = subparsers.add_parser("build", help="build TensorRT engines (GazeAttention plugin) for an export folder")
    p.add_argument("export", type=Path, help="export folder written by `gaze export`")
    p.add_argument("--plugin", type=Path, default=DEFAULT_PLUGIN,
                   help=f"plugin library libgaze_trt_plugin.so (default: {DEFAULT_PLUGIN}; build: {BUILD_HINT})")
    p.add_argument("--engine-dir", type=ca.output_folder, default=None,
                   help="where engines go (default: EXPORT/engines; created with its parents)")
    p.add_argument("--max-batch", type=ca.int_in(1, 4096), default=1,
                   help="largest batch the engines serve (1 .. 4096)")
    p.add_argument("--max-prefill", type=ca.int_in(1, 1 << 20), default=512,
                   help="largest prefill chunk (tokens per call, 1 .. 2^20)")
    p.add_argument("--workspace-mib", type=ca.int_in(1, 1 << 24), default=1024,
                   help="builder workspace memory pool limit (MiB, 1 .. 2^24)")
    p.add_argument("--no-fp16", action="store_true",
                   help="kept for old scripts, no effect: engines are strongly typed, the export dtype decides")
    p.add_argument("--force", action="store_true", help="replace existing engines")
    p.set_defaults(func=run_build)
    return p


# ---- TensorRT import and version rules (testable without TensorRT) ------------------------------


def parse_version(text: str) -> tuple[int, int, int]:
    m = re.match(r"^(\d+)\.(\d+)(?:\.(\d+))?", str(text))
    if not m:
        raise TensorRTMissingError(f"cannot read the TensorRT version {text!r}")
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def import_tensorrt() -> ModuleType:
    """The real TensorRT Python API, or TensorRTMissingError saying what to install."""
    hint = ("`gaze build` needs the TensorRT builder and its Python API: on a Jetson, JetPack's "
            "python3-libnvinfer (TensorRT 10.3+); on x86, the TensorRT 10.3 .. 11.x SDK or NVIDIA's tensorrt wheel "
            "from pypi.nvidia.com. Engines must be built on a machine with TensorRT and the target's GPU "
            "architecture; without TensorRT, run the export folder with the ONNX Runtime backend.")
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise TensorRTMissingError(f"TensorRT is not installed ({exc}). {hint}") from exc
    except Exception as exc:  # placeholder packages may raise anything at import time
        raise TensorRTMissingError(f"the installed `tensorrt` package cannot be imported ({exc!r}); "
                                   f"it is likely a placeholder. {hint}") from exc
    missing = [a for a in ("Builder", "OnnxParser", "Logger", "get_plugin_registry", "__version__")
               if not hasattr(trt, a)]
    if missing:
        where = getattr(trt, "__file__", "?")
        raise TensorRTMissingError(f"the installed `tensorrt` package ({where}) is a placeholder, not TensorRT: "
                                   f"it has no {', '.join(missing)}. {hint}")
    problem = trt_policy.version_problem(parse_version(trt.__version__), str(trt.__version__))
    if problem:
        raise TensorRTMissingError(f"{problem}. {hint}")
    return trt


@dataclass(frozen=True)
class ParserPlan:
    strip_function: bool  # remove the gaze FunctionProto (TensorRT <= 10.6 would run it instead of the plugin)
    plugin_override_flag: bool  # set OnnxParserFlag.ENABLE_PLUGIN_OVERRIDE (when the API has it)


def parser_plan(version: tuple[int, int, int], has_override_flag: bool) -> ParserPlan:
    return ParserPlan(strip_function=version[:2] <= (10, 6), plugin_override_flag=has_override_flag)


# ---- shapes and profiles -----------------------------------------------------------------------


@dataclass(frozen=True)
class BuildShapes:
    max_batch: int
    max_prefill: int
    max_seq_len: int
    num_regions: int
    max_images: int
    image_size: int
    hidden_size: int
    kv_heads: int
    head_dim: int
    num_layers: int

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


MAX_SIZE = 2**31 - 1  # every size: int32-safe (TensorRT dims), as the runtime requires (runtime/folder.py)


def _integer(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    return value


def shapes_from_config(config: dict[str, Any], max_batch: int, max_prefill: int) -> BuildShapes:
    """The shapes the engines serve, from gaze_config.json; EngineBuildError naming a bad field."""
    try:
        model, gaze = config["model"], config["gaze"]
        decoder = model["decoder"]
        shapes = BuildShapes(
            max_batch=max_batch, max_prefill=max_prefill,
            max_seq_len=_integer(decoder["kv_cache"]["max_seq_len"], "max_seq_len"),
            num_regions=_integer(decoder["descriptors"]["num_regions"], "num_regions"),
            max_images=_integer(gaze["max_images"], "max_images"),
            image_size=_integer(model["vision"]["image_size"], "image_size"),
            hidden_size=_integer(model["hidden_size"], "hidden_size"),
            kv_heads=_integer(model["num_key_value_heads"], "num_key_value_heads"),
            head_dim=_integer(model["head_dim"], "head_dim"),
            num_layers=_integer(model["num_hidden_layers"], "num_hidden_layers"),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise EngineBuildError(f"gaze_config.json is missing or has a bad field ({exc!r}); re-run `gaze export`") \
            from exc
    if max_batch < 1 or max_prefill < 1:
        raise EngineBuildError("--max-batch and --max-prefill must be >= 1")
    for name, value in shapes.as_dict().items():  # int() took 1e30 or True: sizes must be int32-safe integers
        if not 1 <= value <= MAX_SIZE:
            raise EngineBuildError(f"gaze_config.json: {name} must be in 1 .. {MAX_SIZE}, got {value}; re-run "
                                   "`gaze export`")
    if max_prefill > shapes.max_seq_len:
        raise EngineBuildError(f"--max-prefill {max_prefill} exceeds the KV cache capacity {shapes.max_seq_len}")
    return shapes


Range = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]  # (min, opt, max)

#: A dim whose size the parsed network fixes (read from decoder.onnx, e.g. M of region_slots [B, R, M]).
FIXED = None


def dense_width(max_seq_len: int) -> int:
    """The widest dense_slots [B, N] a generation can bind: max_seq_len rounded up to SlotState.DENSE_STEP."""
    from gaze_edge.runtime.cache import SlotState

    return SlotState.dense_width(max_seq_len)


def _decoder_roles(name: str, s: BuildShapes, phase: str) -> list[tuple[int, int, int] | None] | None:
    """(min, opt, max) per dim of decoder input `name` (FIXED: the network's own size), None if unknown."""
    b = (1, s.max_batch, s.max_batch)
    t = (1, s.max_prefill, s.max_prefill) if phase == "prefill" else (1, 1, 1)
    n = (1, 1, s.max_prefill) if phase == "prefill" else (1, 1, 1)  # logits_positions: the last column, up to all T
    seq = (s.max_seq_len,) * 3
    dense = (1, dense_width(s.max_seq_len), dense_width(s.max_seq_len))
    regions, heads, dim = (s.num_regions,) * 3, (s.kv_heads,) * 3, (s.head_dim,) * 3
    if name == "inputs_embeds":
        return [b, t, (s.hidden_size,) * 3]
    if name == "gaze":
        return [b, t]
    if name == "logits_positions":
        return [n]
    if name in ("slot_pos", "slot_region", "slot_valid", "slot_image"):
        return [b, seq]
    if name == "dense_slots":
        return [b, dense]
    if name == "region_slots":
        return [b, regions, FIXED]  # M (max_region_tokens) is fixed by the export
    if name in ("region_count", "region_last"):
        return [b, regions]
    if name == "write_offset":
        return [(1, 1, 1)]
    if name.startswith("past_key_values.") and name.endswith(".desc"):
        return [b, heads, regions, dim]
    if name.startswith("past_key_values.") and name.endswith((".key", ".value")):
        return [b, heads, seq, dim]
    return None


def decoder_profile(name: str, dims: tuple[int, ...], s: BuildShapes, phase: str) -> Range:
    """(min, opt, max) of decoder input `name` with dims (-1 dynamic) for phase 'prefill' or 'decode'.

    The GazeAttention v2 inputs (docs/ONNX_CONTRACT.md): B 1..max_batch; T 1..max_prefill (prefill) or 1
    (decode); S the static cache capacity max_seq_len; N (dense_slots) 1..max_seq_len rounded up to
    SlotState.DENSE_STEP; n (logits_positions) 1..T; R (num_regions) and M (region_slots) fixed.
    EngineBuildError for an unknown input, another rank, or a fixed dim gaze_config.json contradicts.
    """
    roles = _decoder_roles(name, s, phase)
    if roles is None:
        raise EngineBuildError(f"decoder.onnx has an input {name!r} this builder does not know; re-run `gaze export`")
    if len(roles) != len(dims):
        raise EngineBuildError(f"decoder.onnx input {name!r} has {len(dims)} dims {list(dims)}, expected "
                               f"{len(roles)}; re-run `gaze export`")
    ranges = []
    for i, (d, role) in enumerate(zip(dims, roles, strict=True)):
        if role is None:  # FIXED
            if d < 0:
                raise EngineBuildError(f"decoder.onnx input {name!r} has a dynamic dim {i}, which the export fixes; "
                                       "re-run `gaze export`")
            ranges.append((d, d, d))
        elif d >= 0:
            if role[0] == role[2] and role[0] != d:
                raise EngineBuildError(f"decoder.onnx input {name!r} has dim {i} = {d}, gaze_config.json says "
                                       f"{role[0]}: the folder was changed after export; re-run `gaze export`")
            ranges.append((d, d, d))
        else:
            ranges.append(role)
    return tuple(r[0] for r in ranges), tuple(r[1] for r in ranges), tuple(r[2] for r in ranges)


def decoder_profiles(inputs: Sequence[tuple[str, tuple[int, ...]]], s: BuildShapes) -> list[dict[str, Range]]:
    """The decoder's two optimization profiles (0 prefill, 1 decode) over the parsed network's inputs (name, dims).

    Every v2 decoder input (node.DECODER_CALL_INPUTS and past_key_values.{i}.{key,value,desc} per layer) must be
    there and nothing else: EngineBuildError naming what is missing or unknown.
    """
    from .node import DECODER_CALL_INPUTS  # a constants module: imports nothing

    names = [name for name, _ in inputs]
    expected = set(DECODER_CALL_INPUTS) | {f"past_key_values.{i}.{k}" for i in range(s.num_layers)
                                          for k in ("key", "value", "desc")}
    missing = sorted(expected - set(names))
    if missing:
        raise EngineBuildError(f"decoder.onnx has no input(s) {missing[:4]} of the GazeAttention v{GLUE_NODE_VERSION} "
                               "decoder: it was exported by another gaze-edge version; re-run `gaze export`")
    return [{name: decoder_profile(name, tuple(dims), s, phase) for name, dims in inputs}
            for phase in ("prefill", "decode")]


def vision_profile(dims: tuple[int, ...], s: BuildShapes) -> Range:
    """(min, opt, max) of pixel_values [N, 3, size, size]: N images of the whole batch, 1..max_images x max_batch."""
    fixed = (0, 3, s.image_size, s.image_size)
    ranges = [(1, s.max_images, s.max_images * s.max_batch) if i == 0 and d < 0 else
              (d, d, d) if d >= 0 else (fixed[i],) * 3 for i, d in enumerate(dims)]
    return tuple(r[0] for r in ranges), tuple(r[1] for r in ranges), tuple(r[2] for r in ranges)


# ---- ONNX preparation --------------------------------------------------------------------------


def strip_gaze_function(src: Path, dst: Path) -> bool:
    """Write `src` without the gaze.GazeAttention FunctionProto to `dst` (same folder: external data
    paths stay valid). Returns False (nothing written) when there is no such function."""
    try:
        import onnx
    except ImportError as exc:
        raise EngineBuildError(
            "TensorRT <= 10.6 would run the GazeAttention function body instead of the plugin, and stripping it "
            "needs the `onnx` package: pip install onnx, or re-export with `gaze export --trt-compat`") from exc
    model = onnx.load(str(src), load_external_data=False)
    keep = [f for f in model.functions if not (f.domain == PLUGIN_NAMESPACE and f.name == PLUGIN_NAME)]
    if len(keep) == len(model.functions):
        return False
    del model.functions[:]
    model.functions.extend(keep)
    onnx.save(model, str(dst))
    return True


# ---- the build ---------------------------------------------------------------------------------


def _load_plugin(trt: ModuleType, plugin: Path) -> None:
    if not plugin.is_file():
        raise EngineBuildError(f"plugin library {plugin} does not exist; build it with: {BUILD_HINT} "
                               f"(on the machine with TensorRT), or pass --plugin PATH")
    registry = trt.get_plugin_registry()
    path = str(plugin.resolve())
    try:
        handle = registry.load_library(path)
    except Exception as exc:
        raise EngineBuildError(f"TensorRT cannot load the plugin library {path} ({exc}): {trt_policy.PLUGIN_HINT}") \
            from exc
    problem = trt_policy.check_loaded(handle, path)  # load_library returns None on a failed dlopen, no exception
    if problem:
        raise EngineBuildError(problem)
    creator = registry.get_creator(PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE) \
        if hasattr(registry, "get_creator") else registry.get_plugin_creator(PLUGIN_NAME, PLUGIN_VERSION,
                                                                              PLUGIN_NAMESPACE)
    if creator is None:
        raise EngineBuildError(f"{plugin} loaded but registers no {PLUGIN_NAMESPACE}::{PLUGIN_NAME} version "
                               f"{PLUGIN_VERSION}: is it libgaze_trt_plugin.so from this gaze-edge?")


def _parse(trt: ModuleType, logger: Any, builder: Any, onnx_path: Path) -> tuple[Any, Any]:
    try:
        flags = trt_policy.network_flags(trt)  # strongly typed: the export's dtypes, no FP16 flag
    except ValueError as exc:
        raise EngineBuildError(str(exc)) from exc
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    override = getattr(getattr(trt, "OnnxParserFlag", None), "ENABLE_PLUGIN_OVERRIDE", None)
    if override is not None:
        parser.set_flag(override)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"TensorRT's ONNX parser rejected {onnx_path.name}: {errors}")
    return network, parser


def preview_features(trt: ModuleType) -> list[Any]:
    """The preview features the decoder build enables: ALIASED_PLUGIN_IO_10_03 (present.* alias
    past_key_values.*, the plugin's in-place KV cache); EngineBuildError in one line when TensorRT lacks it."""
    try:
        return [trt_policy.aliased_io_feature(trt)]
    except ValueError as exc:
        raise EngineBuildError(str(exc)) from exc


def _build_engine(trt: ModuleType, builder: Any, network: Any, profiles: list[dict[str, Range]],
                  cache: Any, args: argparse.Namespace, out: Path, features: Sequence[Any] = ()) -> None:
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, args.workspace_mib << 20)
    # No BuilderFlag.FP16: networks are strongly typed (trt_policy.network_flags; the flag is gone in TensorRT 11).
    # Aliased plugin I/O (present.* in place of past_key_values.*) only holds with its preview feature on.
    for feature in features:
        config.set_preview_feature(feature, True)
    config.set_timing_cache(cache, False)
    for ranges in profiles:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in ranges.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"TensorRT failed to build {out.name} (see the TensorRT log above)")
    replace_file(out, bytes(serialized))  # temp file, fsync, rename: no .tmp or half engine left on SIGTERM


def export_plugin_version(config: dict[str, Any]) -> str:
    """The GazeAttention plugin version a gaze_config.json's nodes ask for ("" when it does not say)."""
    gaze = config.get("gaze")
    node = gaze.get("node") if isinstance(gaze, dict) else None
    return str(node.get("plugin_version", "")) if isinstance(node, dict) else ""


def contract_problem(config: dict[str, Any], where: Path) -> str | None:
    """One line when the export's GazeAttention nodes are not the version this glue implements (GLUE_NODE_VERSION)."""
    wanted = export_plugin_version(config)
    if wanted == GLUE_NODE_VERSION:
        return None
    if wanted and wanted.isdigit() and int(wanted) < int(GLUE_NODE_VERSION):
        return (f"{where} uses GazeAttention plugin version {wanted}, from an older gaze-edge; TensorRT engines "
                f"and the TensorRT backend need version {GLUE_NODE_VERSION}: re-export it with `gaze export` "
                "(this release)")
    return (f"{where} uses GazeAttention plugin version {wanted or '?'}; TensorRT engines and the TensorRT backend "
            f"implement version {GLUE_NODE_VERSION} only: re-export it with `gaze export` (this release)")


def check_plugin_contract(config: dict[str, Any], export: Path) -> None:
    """The export's GazeAttention nodes must be the version the glue and plugin library implement (v2)."""
    problem = contract_problem(config, export)
    if problem:
        raise EngineBuildError(problem)


def graph_file(export: Path, config: dict[str, Any], part: str) -> Path:
    """The `part` graph gaze_config.json names, inside the export folder (the runtime's sandbox rule)."""
    from gaze_edge.runtime.folder import check_links, resolve_inside

    try:
        name = config["model"][part]["filename"]
    except (KeyError, TypeError) as exc:
        raise EngineBuildError(f"{export / 'gaze_config.json'} has no model.{part}.filename; re-run `gaze export`") \
            from exc
    check_links(export)  # ExportFolderError names a link that leaves the folder
    path = resolve_inside(export, name, f"the {part} graph")  # and an absolute or '..' name
    if not path.is_file():
        raise EngineBuildError(f"{export} has no {name} ({part} graph): the export is incomplete; re-run `gaze export`")
    return path


def run_build(args: argparse.Namespace) -> int:
    export = Path(args.export)
    config_file = export / "gaze_config.json"
    config = None
    if config_file.is_file():  # an export we can tell is unbuildable is refused before TensorRT is looked for
        config = read_json_object(config_file, EngineBuildError, "re-run `gaze export`")
        check_plugin_contract(config, export)
    trt = import_tensorrt()  # nothing else can be done without it
    if config is None:
        raise EngineBuildError(f"{export} is not an export folder (no gaze_config.json); run `gaze export` first")
    shapes = shapes_from_config(config, args.max_batch, args.max_prefill)
    decoder_onnx, vision_onnx = graph_file(export, config, "decoder"), graph_file(export, config, "vision")
    engine_dir = Path(args.engine_dir) if args.engine_dir else export / "engines"
    manifest = engine_dir / engine_manifest.MANIFEST
    if manifest.exists() and not args.force:
        raise EngineBuildError(f"{engine_dir} already holds engines; pass --force to rebuild")
    engine_dir.mkdir(parents=True, exist_ok=True)
    arch, gpu_name = engine_manifest.gpu_arch()
    version = parse_version(trt.__version__)
    plan = parser_plan(version, hasattr(getattr(trt, "OnnxParserFlag", None), "ENABLE_PLUGIN_OVERRIDE"))
    # Refuse a TensorRT without strongly typed networks or aliased plugin I/O before anything is touched.
    try:
        trt_policy.network_flags(trt)
    except ValueError as exc:
        raise EngineBuildError(str(exc)) from exc
    decoder_features = preview_features(trt)
    console.progress(f"TensorRT {trt.__version__}, {gpu_name} ({arch}); plugin {args.plugin}")

    logger = trt.Logger(trt.Logger.WARNING)
    _load_plugin(trt, Path(args.plugin))
    builder = trt.Builder(logger)
    cache_file = engine_dir / "timing.cache"
    cache = builder.create_builder_config().create_timing_cache(cache_file.read_bytes() if cache_file.exists()
                                                                else b"")
    # A rebuild (--force) drops the old manifest first: engines left half-rebuilt by an interrupt or a
    # failure have no manifest, and the runtime refuses them by name instead of mixing old and new.
    manifest.unlink(missing_ok=True)
    stripped = None
    try:
        if plan.strip_function:
            fd, name = tempfile.mkstemp(dir=export, prefix=".decoder-trt-", suffix=".onnx")
            stripped = Path(name)
            os.close(fd)
            if strip_gaze_function(decoder_onnx, stripped):
                decoder_onnx = stripped
        network, _parser = _parse(trt, logger, builder, decoder_onnx)
        inputs = [network.get_input(i) for i in range(network.num_inputs)]
        profiles = decoder_profiles([(t.name, tuple(t.shape)) for t in inputs], shapes)
        console.progress("[1/2] building decoder.engine (profiles: prefill, decode)")
        _build_engine(trt, builder, network, profiles, cache, args, engine_dir / "decoder.engine", decoder_features)
    finally:
        if stripped is not None:
            stripped.unlink(missing_ok=True)
    network, _parser = _parse(trt, logger, builder, vision_onnx)
    vin = network.get_input(0)
    console.progress("[2/2] building vision.engine")
    _build_engine(trt, builder, network, [{vin.name: vision_profile(tuple(vin.shape), shapes)}], cache, args,
                  engine_dir / "vision.engine")
    replace_file(cache_file, bytes(cache.serialize()))
    plugin_copy = engine_dir / Path(args.plugin).name
    replace_file(plugin_copy, Path(args.plugin).read_bytes())  # atomic, and fine when --plugin is that copy
    shutil.copymode(args.plugin, plugin_copy)
    engine_manifest.write_manifest(
        engine_dir, tensorrt_version=trt.__version__, gpu_arch=arch, gpu_name=gpu_name, plugin_path=plugin_copy,
        engines={"decoder": {"file": "decoder.engine", "profiles": ["prefill", "decode"]},
                 "vision": {"file": "vision.engine", "profiles": ["vision"]}},
        shapes=shapes.as_dict(),
        extra={"strongly_typed": True, "function_stripped": plan.strip_function,
               "plugin_override_flag": plan.plugin_override_flag},
    )
    print(f"engines written to {engine_dir}", flush=True)
    return 0
