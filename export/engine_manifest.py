"""The manifest beside TensorRT engines: what they were built with, checked before they are loaded.

TensorRT engines are not portable: they run only with the TensorRT version and GPU
architecture that built them, and with the exact plugin library whose kernels they call.
`gaze build` writes `engine_manifest.json` (write_manifest); the runtime calls
check_manifest(folder, trt_version, gpu_arch, plugin_path) before deserializing anything and
gets an EngineManifestError naming the mismatch and what to do. Torch-free, numpy-free.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import time
from pathlib import Path
from typing import Any

from gaze_edge.atomic import replace_file
from gaze_edge.errors import GazeError
from gaze_edge.jsonfile import read_json_object

MANIFEST = "engine_manifest.json"
FORMAT = "gaze-edge-engines"
FORMAT_VERSION = 1


class EngineManifestError(GazeError):
    """Engines are missing, or were built for another TensorRT, GPU or plugin library."""


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def gpu_arch(device: int = 0) -> tuple[str, str]:
    """('sm_87', 'Orin') of a CUDA device through the driver API (ctypes; no torch, no CUDA toolkit).

    Raises EngineManifestError when there is no driver or no such device.
    """
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        raise EngineManifestError(f"no NVIDIA driver (libcuda.so.1 cannot be loaded: {exc})") from exc
    dev, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    name = ctypes.create_string_buffer(256)
    steps = (
        ("cuInit", lambda: cuda.cuInit(0)),
        ("cuDeviceGet", lambda: cuda.cuDeviceGet(ctypes.byref(dev), device)),
        ("cuDeviceGetAttribute(major)", lambda: cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, dev)),
        ("cuDeviceGetAttribute(minor)", lambda: cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev)),
        ("cuDeviceGetName", lambda: cuda.cuDeviceGetName(name, len(name), dev)),
    )
    for what, call in steps:
        status = call()
        if status != 0:
            raise EngineManifestError(f"cannot query CUDA device {device}: {what} returned CUDA error {status}")
    return f"sm_{major.value}{minor.value}", name.value.decode(errors="replace")


def write_manifest(
    folder: str | Path,
    *,
    tensorrt_version: str,
    gpu_arch: str,
    gpu_name: str,
    plugin_path: str | Path,
    engines: dict[str, dict[str, Any]],
    shapes: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write engine_manifest.json atomically. `engines`: name -> {"file": ..., "profiles": ...}."""
    folder = Path(folder)
    plugin_path = Path(plugin_path)
    for name, entry in engines.items():
        file = folder / entry["file"]
        if not file.is_file():
            raise EngineManifestError(f"engine {name!r}: {file} does not exist")
        entry.setdefault("sha256", sha256_file(file))
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "tensorrt_version": tensorrt_version,
        "gpu_arch": gpu_arch,
        "gpu_name": gpu_name,
        "plugin": {"file": plugin_path.name, "sha256": sha256_file(plugin_path)},
        "engines": engines,
        "shapes": shapes,
        **(extra or {}),
    }
    replace_file(folder / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode())  # temp, fsync, rename
    return folder / MANIFEST


def read_manifest(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise EngineManifestError(f"{folder} has no {MANIFEST}: build engines with `gaze build EXPORT_FOLDER`")
    manifest = read_json_object(path, EngineManifestError, "rebuild with `gaze build`")
    if manifest.get("format") != FORMAT:
        raise EngineManifestError(f"{path} is not a {FORMAT} manifest; rebuild with `gaze build`")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise EngineManifestError(f"{path} has format_version {manifest.get('format_version')!r}, this gaze-edge "
                                  f"reads {FORMAT_VERSION}; rebuild with `gaze build`")
    for key in ("tensorrt_version", "gpu_arch", "plugin", "engines", "shapes"):
        if key not in manifest:
            raise EngineManifestError(f"{path} has no {key!r}; rebuild with `gaze build`")
    return manifest


def check_manifest(
    folder: str | Path, trt_version: str, gpu_arch: str, plugin_path: str | Path, check_engine_hashes: bool = False
) -> dict[str, Any]:
    """The manifest of `folder` if its engines can run here; EngineManifestError naming every mismatch."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    problems = []
    if manifest["tensorrt_version"] != trt_version:
        problems.append(f"built with TensorRT {manifest['tensorrt_version']}, this machine has TensorRT "
                        f"{trt_version} (engines are not portable across TensorRT versions)")
    if manifest["gpu_arch"] != gpu_arch:
        problems.append(f"built for {manifest['gpu_arch']} ({manifest.get('gpu_name', '?')}), this GPU is "
                        f"{gpu_arch} (engines are not portable across GPU architectures)")
    plugin_path = Path(plugin_path)
    if not plugin_path.is_file():
        problems.append(f"plugin library {plugin_path} does not exist")
    else:
        digest = sha256_file(plugin_path)
        if digest != manifest["plugin"].get("sha256"):
            problems.append(f"plugin library {plugin_path} (sha256 {digest[:12]}...) is not the one the engines "
                            f"were built with ({manifest['plugin'].get('file')}, sha256 "
                            f"{str(manifest['plugin'].get('sha256'))[:12]}...)")
    for name, entry in manifest["engines"].items():
        file = folder / str(entry.get("file", ""))
        if not file.is_file():
            problems.append(f"engine {name!r} file {file} is missing")
        elif check_engine_hashes and entry.get("sha256") and sha256_file(file) != entry["sha256"]:
            problems.append(f"engine {name!r} file {file} was modified after the build (sha256 differs)")
    if problems:
        raise EngineManifestError(f"engines in {folder} cannot be used here: " + "; ".join(problems)
                                  + f". Rebuild them on this machine with `gaze build` (folder {folder}).")
    return manifest
