"""`gaze build` and the engine manifest up to the point where TensorRT is needed.

No TensorRT here: these pin the refusal when it is missing (or a placeholder), the parser
rules per TensorRT version, the optimization profiles, stripping the FunctionProto, and
every mismatch check_manifest must catch. Building engines is NOT exercised (needs TensorRT).
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

import pytest

from gaze_edge.errors import GazeError
from gaze_edge.export import engine_manifest as em
from gaze_edge.export import trt_build as tb
from gaze_edge.export import trt_policy as tp

# ---- TensorRT missing / placeholder / wrong version ------------------------------------------------


def test_refuses_when_tensorrt_is_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    with pytest.raises(tb.TensorRTMissingError, match="TensorRT is not installed.*python3-libnvinfer") as info:
        tb.import_tensorrt()
    assert isinstance(info.value, GazeError)
    assert "ONNX Runtime backend" in str(info.value)


def test_refuses_a_placeholder_package(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("tensorrt")
    fake.__version__ = "0.0.1"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    with pytest.raises(tb.TensorRTMissingError, match="is a placeholder, not TensorRT: it has no Builder"):
        tb.import_tensorrt()


def test_refuses_a_package_that_fails_to_import(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pkg = tmp_path / "tensorrt"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise RuntimeError('install TensorRT from pypi.nvidia.com')\n")
    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(tb.TensorRTMissingError, match="cannot be imported.*placeholder"):
        tb.import_tensorrt()


@pytest.mark.parametrize("version", ["8.6.1", "10.0.1", "10.2.0", "12.0.0"])
def test_refuses_unsupported_tensorrt_versions(monkeypatch: pytest.MonkeyPatch, version: str) -> None:
    fake = types.ModuleType("tensorrt")
    for attr in ("Builder", "OnnxParser", "Logger", "get_plugin_registry"):
        setattr(fake, attr, object())
    fake.__version__ = version  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    with pytest.raises(tb.TensorRTMissingError, match=f"TensorRT {version} is not supported"):
        tb.import_tensorrt()


def test_this_machine_refuses_or_has_real_tensorrt() -> None:
    try:
        trt = tb.import_tensorrt()
    except tb.TensorRTMissingError as exc:
        assert "gaze build" in str(exc)
    else:
        assert hasattr(trt, "Builder")


def _build_args(export: Path) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gaze")
    tb.add_build_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["build", str(export)])


@pytest.mark.parametrize(("version", "message"), [
    ("1", "plugin version 1, from an older gaze-edge; TensorRT engines .* need version 2: re-export it with "
          "`gaze export`"),
    ("3", "plugin version 3; .* implement version 2 only: re-export it"),
    ("", "plugin version [?]; .* implement version 2 only"),
])
def test_a_v1_export_is_refused_in_one_line_before_tensorrt_is_looked_for(tmp_path: Path, version: str,
                                                                          message: str) -> None:
    """The profiles and bindings follow GazeAttention v2: a v1 export (or an unknown version) is refused first."""
    node = {"plugin_version": version} if version else {}
    (tmp_path / "gaze_config.json").write_text(json.dumps({"gaze": {"node": node}}))
    args = _build_args(tmp_path)
    with pytest.raises(tb.EngineBuildError, match=message) as info:
        args.func(args)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "engines").exists()


def test_a_v2_export_gets_past_the_contract_check(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    (tmp_path / "gaze_config.json").write_text('{"gaze": {"node": {"plugin_version": "2"}}}')
    args = _build_args(tmp_path)
    with pytest.raises(tb.TensorRTMissingError):  # the next thing `gaze build` needs: TensorRT itself
        args.func(args)
    assert tb.GLUE_NODE_VERSION == tb.PLUGIN_VERSION == "2"


def test_build_command_prints_the_refusal(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    parser = argparse.ArgumentParser(prog="gaze")
    tb.add_build_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["build", str(tmp_path)])
    assert args.plugin == tb.DEFAULT_PLUGIN and args.max_batch == 1
    with pytest.raises(tb.TensorRTMissingError):
        args.func(args)
    assert not (tmp_path / "engines").exists()  # nothing written
    try:
        from gaze_edge.cli import main
    except ImportError:
        return
    try:
        code = main(["build", str(tmp_path)])
    except SystemExit:
        pytest.skip("`gaze build` is not wired into gaze_edge/cli.py yet")
    assert code == 2


# ---- version rules ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "parsed"),
                         [("10.3.0.30", (10, 3, 0)), ("10.16.1", (10, 16, 1)), ("10.7", (10, 7, 0))])
def test_parse_version(text: str, parsed: tuple) -> None:
    assert tb.parse_version(text) == parsed


@pytest.mark.parametrize(("version", "strip"), [((10, 3, 0), True), ((10, 6, 0), True), ((10, 7, 0), False),
                                                 ((10, 13, 0), False), ((10, 16, 1), False)])
def test_function_is_stripped_up_to_10_6(version: tuple, strip: bool) -> None:
    assert tb.parser_plan(version, has_override_flag=False).strip_function is strip
    assert tb.parser_plan(version, has_override_flag=True).plugin_override_flag


def test_strip_gaze_function(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    import onnx

    from gaze_edge.export import gaze_function as gf

    src, dst = tmp_path / "m.onnx", tmp_path / "m-trt.onnx"
    onnx.save(gf.single_node_model(top_k=2, max_region_tokens=4, scale=0.25), str(src))
    assert tb.strip_gaze_function(src, dst)
    stripped = onnx.load(str(dst))
    assert not stripped.functions
    node = stripped.graph.node[0]
    assert (node.domain, node.op_type) == ("gaze", "GazeAttention")
    assert {a.name for a in node.attribute} == {"top_k", "max_region_tokens", "routing", "context_attention", "scale",
                                                "plugin_namespace", "plugin_version"}
    assert not tb.strip_gaze_function(dst, tmp_path / "again.onnx")
    assert not (tmp_path / "again.onnx").exists()


# ---- profiles --------------------------------------------------------------------------------------


def config(max_seq_len: int = 1024) -> dict:
    return {
        "model": {"hidden_size": 128, "num_key_value_heads": 2, "head_dim": 64, "num_hidden_layers": 3,
                  "vision": {"image_size": 64},
                  "decoder": {"kv_cache": {"max_seq_len": max_seq_len}, "descriptors": {"num_regions": 64}}},
        "gaze": {"max_images": 4},
    }


def test_decoder_profiles() -> None:
    s = tb.shapes_from_config(config(), max_batch=4, max_prefill=256)
    assert tb.decoder_profile("inputs_embeds", (-1, -1, 128), s, "prefill") == ((1, 1, 128), (4, 256, 128),
                                                                                (4, 256, 128))
    assert tb.decoder_profile("inputs_embeds", (-1, -1, 128), s, "decode") == ((1, 1, 128), (4, 1, 128), (4, 1, 128))
    assert tb.decoder_profile("gaze", (-1, -1), s, "decode") == ((1, 1), (4, 1), (4, 1))
    assert tb.decoder_profile("slot_valid", (-1, -1), s, "decode") == ((1, 1024), (4, 1024), (4, 1024))
    assert tb.decoder_profile("write_offset", (1,), s, "prefill") == ((1,), (1,), (1,))
    assert tb.decoder_profile("past_key_values.2.key", (-1, 2, -1, 64), s, "decode") == \
        ((1, 2, 1024, 64), (4, 2, 1024, 64), (4, 2, 1024, 64))
    assert tb.decoder_profile("past_key_values.0.desc", (-1, 2, 64, 64), s, "prefill") == \
        ((1, 2, 64, 64), (4, 2, 64, 64), (4, 2, 64, 64))
    with pytest.raises(tb.EngineBuildError, match="input 'attention_mask'"):
        tb.decoder_profile("attention_mask", (-1, -1), s, "decode")


def test_decoder_profiles_of_the_v2_inputs() -> None:
    s = tb.shapes_from_config(config(1000), max_batch=4, max_prefill=256)
    assert tb.dense_width(1000) == 1024 and tb.dense_width(5) == 32  # SlotState.DENSE_STEP columns at a time
    assert tb.decoder_profile("slot_image", (-1, -1), s, "prefill") == ((1, 1000), (4, 1000), (4, 1000))
    assert tb.decoder_profile("dense_slots", (-1, -1), s, "decode") == ((1, 1), (4, 1024), (4, 1024))
    assert tb.decoder_profile("logits_positions", (-1,), s, "prefill") == ((1,), (1,), (256,))
    assert tb.decoder_profile("logits_positions", (-1,), s, "decode") == ((1,), (1,), (1,))
    assert tb.decoder_profile("region_slots", (-1, 64, 9), s, "decode") == ((1, 64, 9), (4, 64, 9), (4, 64, 9))
    for name in ("region_count", "region_last"):
        assert tb.decoder_profile(name, (-1, 64), s, "prefill") == ((1, 64), (4, 64), (4, 64))
    with pytest.raises(tb.EngineBuildError, match="'region_slots' has a dynamic dim 2, which the export fixes"):
        tb.decoder_profile("region_slots", (-1, 64, -1), s, "decode")
    with pytest.raises(tb.EngineBuildError, match="'region_count' has dim 1 = 32, gaze_config.json says 64"):
        tb.decoder_profile("region_count", (-1, 32), s, "decode")
    with pytest.raises(tb.EngineBuildError, match="'dense_slots' has 3 dims"):
        tb.decoder_profile("dense_slots", (-1, -1, 1), s, "decode")


def test_profiles_cover_every_decoder_input_of_a_v2_export(runtime_export: tuple[Path, Path]) -> None:
    """The inputs of a real v2 export's decoder.onnx (as TensorRT's parser sees them: -1 dynamic) all get a
    prefill and a decode profile; the runtime's shapes of a generation lie inside (tests/test_runtime_trt.py
    drives the backend through them)."""
    onnx = pytest.importorskip("onnx")
    from gaze_edge.runtime.folder import ExportFolder

    export = runtime_export[1]
    conf = json.loads((export / "gaze_config.json").read_text())
    graph = onnx.load(str(export / conf["model"]["decoder"]["filename"]), load_external_data=False).graph
    inputs = [(i.name, tuple(d.dim_value if d.HasField("dim_value") else -1 for d in i.type.tensor_type.shape.dim))
              for i in graph.input]
    tb.check_plugin_contract(conf, export)  # a v2 export
    s = tb.shapes_from_config(conf, max_batch=2, max_prefill=64)
    prefill, decode = tb.decoder_profiles(inputs, s)
    assert set(prefill) == set(decode) == {name for name, _ in inputs}
    for ranges in (prefill, decode):
        for name, dims in inputs:
            lo, opt, hi = ranges[name]
            assert len(lo) == len(dims) and all(a <= b <= c for a, b, c in zip(lo, opt, hi, strict=True)), name
            assert all(d < 0 or a == c == d for d, a, c in zip(dims, lo, hi, strict=True)), name  # fixed stay
    shape = ExportFolder.open(export).shape
    assert prefill["region_slots"][2] == (2, shape.num_regions, shape.max_region_tokens)
    assert prefill["dense_slots"][2] == (2, tb.dense_width(shape.max_seq_len))
    assert prefill["logits_positions"][2] == (64,) and decode["logits_positions"][2] == (1,)
    assert decode["inputs_embeds"][2] == (2, 1, shape.hidden_size)
    with pytest.raises(tb.EngineBuildError, match=r"has no input\(s\) \['dense_slots'\].*re-run `gaze export`"):
        tb.decoder_profiles([i for i in inputs if i[0] != "dense_slots"], s)
    with pytest.raises(tb.EngineBuildError, match="input 'attention_mask'"):
        tb.decoder_profiles([*inputs, ("attention_mask", (-1, -1))], s)


def test_vision_profile() -> None:
    s = tb.shapes_from_config(config(), max_batch=2, max_prefill=16)
    assert tb.vision_profile((-1, 3, 64, 64), s) == ((1, 3, 64, 64), (4, 3, 64, 64), (8, 3, 64, 64))


def test_bad_build_options() -> None:
    with pytest.raises(tb.EngineBuildError, match="exceeds the KV cache capacity 1024"):
        tb.shapes_from_config(config(), max_batch=1, max_prefill=2048)
    with pytest.raises(tb.EngineBuildError, match="must be >= 1"):
        tb.shapes_from_config(config(), max_batch=0, max_prefill=16)
    broken = config()
    del broken["model"]["decoder"]["kv_cache"]
    with pytest.raises(tb.EngineBuildError, match="kv_cache"):
        tb.shapes_from_config(broken, max_batch=1, max_prefill=16)


# ---- manifest --------------------------------------------------------------------------------------


@pytest.fixture()
def built(tmp_path: Path) -> tuple[Path, Path]:
    folder = tmp_path / "engines"
    folder.mkdir()
    (folder / "decoder.engine").write_bytes(b"decoder")
    (folder / "vision.engine").write_bytes(b"vision")
    plugin = folder / "libgaze_trt_plugin.so"
    plugin.write_bytes(b"plugin v1")
    em.write_manifest(folder, tensorrt_version="10.3.0.30", gpu_arch="sm_87", gpu_name="Orin", plugin_path=plugin,
                      engines={"decoder": {"file": "decoder.engine"}, "vision": {"file": "vision.engine"}},
                      shapes={"max_batch": 1})
    return folder, plugin


def test_manifest_round_trip(built: tuple[Path, Path]) -> None:
    folder, plugin = built
    m = em.check_manifest(folder, "10.3.0.30", "sm_87", plugin, check_engine_hashes=True)
    assert m["plugin"]["sha256"] == em.sha256_file(plugin)
    assert m["engines"]["decoder"]["sha256"] == em.sha256_file(folder / "decoder.engine")
    assert m["shapes"] == {"max_batch": 1}


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"trt_version": "10.16.1"}, "built with TensorRT 10.3.0.30, this machine has TensorRT 10.16.1"),
    ({"gpu_arch": "sm_110"}, "built for sm_87 \\(Orin\\), this GPU is sm_110"),
])
def test_manifest_mismatch(built: tuple[Path, Path], kwargs: dict, message: str) -> None:
    folder, plugin = built
    args = {"trt_version": "10.3.0.30", "gpu_arch": "sm_87", **kwargs}
    with pytest.raises(em.EngineManifestError, match=message) as info:
        em.check_manifest(folder, args["trt_version"], args["gpu_arch"], plugin)
    assert "Rebuild them on this machine with `gaze build`" in str(info.value)


def test_manifest_catches_another_plugin(built: tuple[Path, Path]) -> None:
    folder, plugin = built
    other = plugin.parent / "other.so"
    other.write_bytes(b"plugin v2")
    with pytest.raises(em.EngineManifestError, match="is not the one the engines were built with"):
        em.check_manifest(folder, "10.3.0.30", "sm_87", other)
    with pytest.raises(em.EngineManifestError, match="does not exist"):
        em.check_manifest(folder, "10.3.0.30", "sm_87", plugin.parent / "missing.so")


def test_manifest_catches_missing_and_modified_engines(built: tuple[Path, Path]) -> None:
    folder, plugin = built
    (folder / "vision.engine").write_bytes(b"changed")
    with pytest.raises(em.EngineManifestError, match="'vision' file .* was modified"):
        em.check_manifest(folder, "10.3.0.30", "sm_87", plugin, check_engine_hashes=True)
    (folder / "decoder.engine").unlink()
    with pytest.raises(em.EngineManifestError, match="engine 'decoder' file .* is missing"):
        em.check_manifest(folder, "10.3.0.30", "sm_87", plugin)


def test_manifest_lists_every_problem(built: tuple[Path, Path]) -> None:
    folder, plugin = built
    with pytest.raises(em.EngineManifestError) as info:
        em.check_manifest(folder, "10.13.0", "sm_110", plugin)
    assert "TensorRT 10.13.0" in str(info.value) and "sm_110" in str(info.value)


def test_manifest_file_problems(tmp_path: Path, built: tuple[Path, Path]) -> None:
    with pytest.raises(em.EngineManifestError, match="has no engine_manifest.json.*gaze build"):
        em.check_manifest(tmp_path, "10.3.0.30", "sm_87", tmp_path / "x.so")
    folder, plugin = built
    (folder / em.MANIFEST).write_text("{not json")
    with pytest.raises(em.EngineManifestError, match="not valid JSON"):
        em.read_manifest(folder)
    (folder / em.MANIFEST).write_text(json.dumps({"format": em.FORMAT, "format_version": 99}))
    with pytest.raises(em.EngineManifestError, match="format_version 99"):
        em.read_manifest(folder)
    (folder / em.MANIFEST).write_text(json.dumps({"format": "other"}))
    with pytest.raises(em.EngineManifestError, match="is not a gaze-edge-engines manifest"):
        em.read_manifest(folder)


def test_write_manifest_needs_the_engine_files(tmp_path: Path) -> None:
    plugin = tmp_path / "p.so"
    plugin.write_bytes(b"p")
    with pytest.raises(em.EngineManifestError, match="does not exist"):
        em.write_manifest(tmp_path, tensorrt_version="10.3", gpu_arch="sm_87", gpu_name="Orin", plugin_path=plugin,
                          engines={"decoder": {"file": "decoder.engine"}}, shapes={})
    assert not (tmp_path / em.MANIFEST).exists()


def test_gpu_arch_without_a_driver_is_a_clear_error() -> None:
    try:
        arch, name = em.gpu_arch()
    except em.EngineManifestError as exc:
        assert "driver" in str(exc) or "CUDA" in str(exc)
    else:
        assert arch.startswith("sm_") and name


# ---- TensorRT 10.3 .. 11.x policy (export/trt_policy.py) and the builder glue, with fakes ----------------------


@pytest.mark.parametrize(("version", "ok"), [((10, 2, 0), False), ((10, 3, 0), True), ((10, 13, 0), True),
                                             ((10, 16, 1), True), ((11, 1, 0), True), ((12, 0, 0), False)])
def test_version_policy(version: tuple, ok: bool) -> None:
    problem = tp.version_problem(version)
    assert (problem is None) is ok
    if not ok:
        assert "not supported" in problem and "10.3 .. 11.x" in problem and "\n" not in problem


@pytest.mark.parametrize("version", ["10.3.0.30", "10.16.1", "11.1.0"])
def test_accepts_tensorrt_10_3_to_11(monkeypatch: pytest.MonkeyPatch, version: str) -> None:
    fake = types.ModuleType("tensorrt")
    for attr in ("Builder", "OnnxParser", "Logger", "get_plugin_registry"):
        setattr(fake, attr, object())
    fake.__version__ = version  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    assert tb.import_tensorrt() is fake


class _Registry:
    def __init__(self, handle: object | None) -> None:
        self.handle, self.loaded = handle, []

    def load_library(self, path: str) -> object | None:
        self.loaded.append(path)
        return self.handle

    def get_creator(self, name: str, version: str, namespace: str) -> object | None:
        return object() if self.handle is not None else None


def test_load_plugin_reports_a_failed_dlopen(tmp_path: Path) -> None:
    """load_library returns None (no exception) when dlopen fails: one line naming the path and what to do."""
    plugin = tmp_path / "libgaze_trt_plugin.so"
    plugin.write_bytes(b"not a library")
    registry = _Registry(None)
    trt = types.SimpleNamespace(get_plugin_registry=lambda: registry)
    with pytest.raises(tb.EngineBuildError) as info:
        tb._load_plugin(trt, plugin)  # type: ignore[arg-type]
    message = str(info.value)
    assert str(plugin.resolve()) in message and "dlopen failed" in message and "make plugins" in message
    assert "CUDA" in message and "\n" not in message
    assert registry.loaded == [str(plugin.resolve())]
    tb._load_plugin(types.SimpleNamespace(get_plugin_registry=lambda: _Registry(object())), plugin)  # type: ignore


def _fake_builder_trt(strongly_typed: bool = True, fp16_flag: bool = True, aliased: bool = True,
                      version: str = "10.3.0") -> tuple[types.SimpleNamespace, list]:
    log: list = []
    flags = types.SimpleNamespace(STRONGLY_TYPED=1) if strongly_typed else types.SimpleNamespace()
    builder_flags = types.SimpleNamespace(FP16="FP16") if fp16_flag else types.SimpleNamespace()
    preview = types.SimpleNamespace(ALIASED_PLUGIN_IO_10_03="ALIASED") if aliased else types.SimpleNamespace()

    class Config:
        def set_memory_pool_limit(self, pool: object, size: int) -> None:
            log.append(("pool", size))

        def set_flag(self, flag: object) -> None:
            log.append(("set_flag", flag))

        def set_preview_feature(self, feature: object, on: bool) -> None:
            log.append(("preview", feature, on))

        def set_timing_cache(self, cache: object, ignore: bool) -> None:
            pass

        def add_optimization_profile(self, profile: object) -> None:
            log.append(("profile",))

    class Profile:
        def set_shape(self, *args: object) -> None:
            pass

    class Builder:
        def create_network(self, f: int) -> object:
            log.append(("create_network", f))
            return object()

        def create_builder_config(self) -> Config:
            return Config()

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network: object, config: object) -> bytes:
            return b"engine"

    class Parser:
        num_errors = 0

        def __init__(self, network: object, logger: object) -> None:
            pass

        def parse_from_file(self, path: str) -> bool:
            return True

    trt = types.SimpleNamespace(__version__=version, NetworkDefinitionCreationFlag=flags, BuilderFlag=builder_flags,
                                PreviewFeature=preview, MemoryPoolType=types.SimpleNamespace(WORKSPACE=0),
                                OnnxParser=Parser, Builder=Builder)
    return trt, log


def test_builds_a_strongly_typed_network_with_aliased_plugin_io_and_no_fp16(tmp_path: Path) -> None:
    trt, log = _fake_builder_trt()
    builder = trt.Builder()
    network, _ = tb._parse(trt, None, builder, tmp_path / "decoder.onnx")  # type: ignore[arg-type]
    args = argparse.Namespace(workspace_mib=1, no_fp16=False)
    tb._build_engine(trt, builder, network, [{"x": ((1,), (1,), (1,))}], None, args,  # type: ignore[arg-type]
                     tmp_path / "decoder.engine", tb.preview_features(trt))  # type: ignore[arg-type]
    assert ("create_network", 1 << 1) in log  # 1 << STRONGLY_TYPED
    assert ("preview", "ALIASED", True) in log
    assert not [e for e in log if e[0] == "set_flag"]  # no BuilderFlag.FP16 (fp32 export stays fp32)
    assert (tmp_path / "decoder.engine").read_bytes() == b"engine"


def test_tensorrt_11_without_weak_typing_flags_builds_strongly_typed(tmp_path: Path) -> None:
    trt, log = _fake_builder_trt(strongly_typed=False, fp16_flag=False, version="11.1.0")
    assert tp.network_flags(trt) == 0  # strong typing is always on where BuilderFlag.FP16 is gone
    tb._parse(trt, None, trt.Builder(), tmp_path / "d.onnx")  # type: ignore[arg-type]
    assert ("create_network", 0) in log


def test_refuses_weak_typing_only_and_missing_aliased_plugin_io(tmp_path: Path) -> None:
    trt, _ = _fake_builder_trt(strongly_typed=False, fp16_flag=True)
    with pytest.raises(tb.EngineBuildError, match="STRONGLY_TYPED"):
        tb._parse(trt, None, trt.Builder(), tmp_path / "d.onnx")  # type: ignore[arg-type]
    trt, log = _fake_builder_trt(aliased=False, version="10.2.0")
    with pytest.raises(tb.EngineBuildError, match="ALIASED_PLUGIN_IO_10_03.*copy") as info:
        tb.preview_features(trt)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)
