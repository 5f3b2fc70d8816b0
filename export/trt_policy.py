"""TensorRT version and builder-flag policy for `gaze build` and the TensorRT backend (no TensorRT needed).

Plain functions over plain values (a version tuple, "does the API have X"), so that every rule is tested
without TensorRT (tests/test_trt_build.py, tests/test_runtime_trt.py). export/trt_build.py and
runtime/trt_backend.py only apply them. Where TensorRT 10.x and 11.x differ, the callers branch on feature
presence (hasattr), never on the version string; the version range below is only the refusal rule.
"""

from __future__ import annotations

from typing import Any

#: Oldest TensorRT accepted: 10.3 (JetPack 6.2), the first with PreviewFeature.ALIASED_PLUGIN_IO_10_03.
MIN_VERSION = (10, 3)
#: Newest major accepted: 11 (current PyPI release). TensorRT 12 is REFUSED, not warned about: a new major
#: removes API (11 removed BuilderFlag.FP16 and the weak-typing flags), and a copy path or a missing
#: in-place cache must never be silent, so an untested major is refused until it is checked here.
MAX_MAJOR = 11

PLUGIN_HINT = ("build the plugin on this machine with `make plugins` (or cmake -S plugins_trt -B build/plugins_trt "
               "&& cmake --build build/plugins_trt), and check that it was built against this machine's CUDA and "
               "TensorRT versions")


def version_problem(version: tuple[int, ...], text: str | None = None) -> str | None:
    """Why TensorRT `version` is not supported (None when it is: 10.3 .. 11.x).

    10.2 and older: no aliased plugin I/O (the plugin's in-place KV cache). 12 and newer: refused (see MAX_MAJOR).
    """
    shown = text if text is not None else ".".join(str(v) for v in version)
    if tuple(version[:2]) < MIN_VERSION:
        return (f"TensorRT {shown} is not supported: gaze-edge needs TensorRT 10.3 .. 11.x (10.3 is the first with "
                "aliased plugin I/O, which the in-place KV cache needs)")
    if version[0] > MAX_MAJOR:
        return (f"TensorRT {shown} is not supported: gaze-edge is checked against TensorRT 10.3 .. 11.x; a new "
                "major release removes API, so it is refused until gaze-edge supports it")
    return None


def network_flags(trt: Any) -> int:
    """create_network() flags: STRONGLY_TYPED where the API has it (10.x, and 11.x if still exposed).

    Strongly typed: each tensor keeps the export's dtype (fp32 export -> fp32, fp16 -> fp16), so TensorRT never
    picks fp16 for the plugin and reformats the cache; BuilderFlag.FP16 is then neither needed nor allowed (and
    it is gone in TensorRT 11, where strong typing is always on and the flag may no longer exist).
    """
    flag = getattr(getattr(trt, "NetworkDefinitionCreationFlag", None), "STRONGLY_TYPED", None)
    if flag is not None:
        return 1 << int(flag)
    if hasattr(getattr(trt, "BuilderFlag", None), "FP16"):
        # Weak typing available but no strongly typed networks: precision could silently change.
        raise ValueError("this TensorRT has no NetworkDefinitionCreationFlag.STRONGLY_TYPED: gaze-edge builds "
                         "strongly typed networks only (TensorRT 10.3 .. 11.x)")
    return 0  # no weak-typing flags at all (TensorRT 11+): networks are always strongly typed


def aliased_io_feature(trt: Any) -> Any:
    """PreviewFeature.ALIASED_PLUGIN_IO_10_03, which the builder config must enable so that present.* alias
    past_key_values.* (the plugin's in-place KV cache); ValueError with one line when this TensorRT lacks it."""
    feature = getattr(getattr(trt, "PreviewFeature", None), "ALIASED_PLUGIN_IO_10_03", None)
    if feature is None:
        raise ValueError(f"TensorRT {getattr(trt, '__version__', '?')} has no PreviewFeature.ALIASED_PLUGIN_IO_10_03 "
                         "(TensorRT >= 10.3): the plugin's in-place KV cache would become a copy; use TensorRT "
                         "10.3 .. 11.x")
    return feature


def check_loaded(handle: Any, path: str) -> str | None:
    """IPluginRegistry.load_library returns None (it does not raise) when dlopen fails: the one-line message."""
    if handle is None:
        return f"TensorRT could not load the plugin library {path} (dlopen failed): {PLUGIN_HINT}"
    return None

