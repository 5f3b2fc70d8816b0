"""Every image input the runtime takes, and video files sampled into frames.

Images come as transformers' `load_image` takes them, each decoded fully, EXIF orientation
applied (`PIL.ImageOps.exif_transpose`) and converted to RGB, with the same decompression-bomb
guard as image files (`images.MAX_IMAGE_PIXELS`):

| source | rule |
|---|---|
| `PIL.Image.Image` | EXIF orientation applied, RGB; pixel count checked |
| `numpy.ndarray` | uint8, H x W (grey), H x W x 1, 3 or 4 (alpha dropped); anything else refused |
| `bytes` | an encoded image file (PNG, JPEG, ...) |
| `str` / `Path`: a local file | where the policy allows it (API, CLI: yes; `gaze serve`: `--allow-local-files DIR`) |
| `str`: `data:image/...;base64,...` | a data: URI (base64 payload) |
| `str`: `file:///abs/path` | a local file, as above |
| `str`: `http(s)://...` | only with `MediaPolicy(allow_remote=True)` (`gaze serve --allow-remote-images`) |
| `str`: other | bare base64 of an image file (as transformers tries), else "does not exist" |

Video (`load_video`) is read with PyAV (`pip install 'gaze-edge[video]'`): `frames` frames
sampled evenly with transformers' rule (`np.arange(0, total, total / frames)`, so the first
frame is always taken), each an RGB image that then goes through the same path as any image
(a video prompt is a prompt whose images are frames: `Prompt(text, frames, frames=True)`).
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from gaze_edge.errors import InputError

from .images import MAX_IMAGE_PIXELS, decode_image, load_image

ImageInput = Image.Image | np.ndarray | str | Path | bytes

_BASE64 = re.compile(r"^[A-Za-z0-9+/=\s]+$")
MAX_MEDIA_BYTES = 64 * 1024 * 1024  # the largest encoded image or video read from a URL or data: URI


@dataclass(frozen=True)
class MediaPolicy:
    """What sources are allowed and how large they may be."""

    max_pixels: int = MAX_IMAGE_PIXELS
    #: True: any local path; a tuple of folders: only files inside them (symlinks resolved); (): none.
    local_files: bool | tuple[Path, ...] = True
    allow_remote: bool = False  # http(s) URLs
    max_bytes: int = MAX_MEDIA_BYTES
    timeout_s: float = 10.0


DEFAULT_POLICY = MediaPolicy()


def _short(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[:n] + "..."


def _local_path(path: Path, policy: MediaPolicy, what: str) -> Path:
    if policy.local_files is True:
        return path
    if not policy.local_files:
        raise InputError(f"local {what} paths are not accepted here ({_short(str(path))}); send the data as a "
                         "data: URI (gaze serve: --allow-local-files DIR accepts files under DIR)")
    resolved = path.resolve()
    for folder in policy.local_files:
        if resolved.is_relative_to(Path(folder).resolve()):
            return resolved
    raise InputError(f"{what} {_short(str(path))} is outside the folders this server reads local files from")


def _decode_data_uri(uri: str, policy: MediaPolicy, kind: str) -> bytes:
    header, sep, payload = uri.partition(",")
    if not sep:
        raise InputError(f"malformed data: URI (no ',' before the payload): {_short(uri)}")
    media_type = header[5:].split(";")[0].strip().lower()
    if media_type and not media_type.startswith(f"{kind}/") and media_type != "application/octet-stream":
        raise InputError(f"a data: URI of type {media_type!r} where an {kind} was expected")
    if len(payload) > policy.max_bytes * 4 // 3 + 4:
        raise InputError(f"the data: URI {kind} is larger than {policy.max_bytes} bytes")
    if ";base64" in header.lower():
        try:
            return base64.b64decode(payload, validate=False)
        except (binascii.Error, ValueError) as exc:
            raise InputError(f"the data: URI's base64 payload is invalid ({exc})") from exc
    return urllib.parse.unquote_to_bytes(payload)


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> Any:
        if urllib.parse.urlparse(newurl).scheme not in ("http", "https"):
            raise InputError(f"a remote media URL redirected to {_short(newurl)}: only http(s) is followed")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch_url(url: str, policy: MediaPolicy) -> bytes:
    """GET an http(s) URL (only where the policy allows it), at most policy.max_bytes."""
    if not policy.allow_remote:
        raise InputError(f"remote URLs are not fetched here ({_short(url)}); send the image as a data: URI "
                         "(gaze serve: --allow-remote-images turns http(s) fetching on)")
    opener = urllib.request.build_opener(_HttpOnlyRedirects())
    try:
        with opener.open(urllib.request.Request(url, headers={"User-Agent": "gaze-edge"}),
                         timeout=policy.timeout_s) as response:
            data = response.read(policy.max_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise InputError(f"cannot fetch {_short(url)}: {exc}") from exc
    if len(data) > policy.max_bytes:
        raise InputError(f"{_short(url)} is larger than {policy.max_bytes} bytes")
    return data


def _from_array(array: np.ndarray, max_pixels: int) -> Image.Image:
    if array.dtype != np.uint8:
        raise InputError(f"an image array must be uint8 (0..255), got {array.dtype}: convert it with "
                         "(x * 255).round().astype(np.uint8) if it holds floats in [0, 1]")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise InputError(f"an image array must be H x W or H x W x 3 (or 4), got shape {tuple(array.shape)}")
    if array.shape[0] * array.shape[1] > max_pixels:
        raise InputError(f"an image array of {array.shape[0]} x {array.shape[1]} is more than {max_pixels} pixels")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise InputError(f"an image array is empty (shape {tuple(array.shape)})")
    return Image.fromarray(np.ascontiguousarray(array)).convert("RGB")


def _exists(text: str) -> bool:
    try:
        return len(text) < 4096 and Path(text).exists()
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte
        return False


def load_image_input(source: ImageInput, policy: MediaPolicy = DEFAULT_POLICY) -> Image.Image:
    """Any accepted image source -> a checked, upright RGB PIL image; InputError saying what is wrong otherwise."""
    if isinstance(source, Image.Image):
        if source.width * source.height > policy.max_pixels:
            raise InputError(f"an image of {source.width} x {source.height} is more than {policy.max_pixels} pixels")
        return ImageOps.exif_transpose(source).convert("RGB")
    if isinstance(source, np.ndarray):
        return _from_array(source, policy.max_pixels)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if len(data) > policy.max_bytes:
            raise InputError(f"an encoded image of {len(data)} bytes is larger than {policy.max_bytes}")
        return decode_image(data, "the image bytes", policy.max_pixels)
    if isinstance(source, Path):
        return load_image(_local_path(source, policy, "image"), policy.max_pixels)
    if not isinstance(source, str):
        raise InputError(f"an image must be a path, data: URI, base64 string, bytes, PIL image or uint8 array; "
                         f"got {type(source).__name__}")
    text = source.strip()
    lower = text[:16].lower()
    if lower.startswith("data:"):
        return decode_image(_decode_data_uri(text, policy, "image"), "the data: URI image", policy.max_pixels)
    if lower.startswith(("http://", "https://")):
        return decode_image(fetch_url(text, policy), f"the image at {_short(text)}", policy.max_pixels)
    if lower.startswith("file://"):
        path = Path(urllib.parse.unquote(urllib.parse.urlparse(text).path))
        return load_image(_local_path(path, policy, "image"), policy.max_pixels)
    looks_base64 = len(text) >= 64 and bool(_BASE64.match(text[:4096]))
    if policy.local_files is True:
        if _exists(text):
            return load_image(Path(text), policy.max_pixels)
    elif not looks_base64:  # restricted: the folder rule first, so that nothing says whether a file exists
        return load_image(_local_path(Path(text), policy, "image"), policy.max_pixels)
    if looks_base64:
        try:
            data = base64.b64decode(text, validate=False)
        except (binascii.Error, ValueError):
            data = b""
        if data:
            if len(data) > policy.max_bytes:
                raise InputError(f"a base64 image of {len(data)} bytes is larger than {policy.max_bytes}")
            return decode_image(data, "the base64 image", policy.max_pixels)
    raise InputError(f"image {_short(text)} does not exist (not a file, a data: URI or base64 of an image file)")


def load_images(sources: Sequence[ImageInput], policy: MediaPolicy = DEFAULT_POLICY) -> list[Image.Image]:
    return [load_image_input(s, policy) for s in sources]


# --------------------------------------------------------------------------- video


@dataclass
class Video:
    """Frames sampled from one video file, in order, and where they came from."""

    frames: list[Image.Image]
    indices: list[int]  # frame numbers taken (0-based, decode order)
    total_frames: int
    fps: float | None
    size: tuple[int, int] = field(default=(0, 0))  # (width, height) of the stream


def sample_indices(total: int, frames: int) -> np.ndarray:
    """`frames` frame numbers spread evenly over `total` (transformers' default_sample_indices_fn)."""
    if frames < 1:
        raise InputError(f"--frames must be at least 1, got {frames}")
    if total < frames:
        raise InputError(f"the video has {total} frames; ask for at most {total} (--frames)")
    return np.arange(0, total, total / frames, dtype=float).astype(int)[:frames]


def _import_av() -> Any:
    try:
        import av
    except ImportError as exc:
        raise InputError("reading video files needs PyAV: pip install 'gaze-edge[video]' (or pip install av)") from exc
    return av


def _open_container(av: Any, source: str | Path | bytes, policy: MediaPolicy) -> tuple[Any, str]:
    if isinstance(source, (bytes, bytearray)):
        if len(source) > policy.max_bytes:
            raise InputError(f"a video of {len(source)} bytes is larger than {policy.max_bytes}")
        target: Any = io.BytesIO(bytes(source))
        label = "the video bytes"
    else:
        text = str(source)
        if text[:16].lower().startswith("data:"):
            target, label = io.BytesIO(_decode_data_uri(text, policy, "video")), "the data: URI video"
        elif text[:16].lower().startswith(("http://", "https://")):
            target, label = io.BytesIO(fetch_url(text, policy)), f"the video at {_short(text)}"
        else:
            if text[:16].lower().startswith("file://"):
                text = urllib.parse.unquote(urllib.parse.urlparse(text).path)
            path = _local_path(Path(text), policy, "video")
            if not path.is_file():
                raise InputError(f"video {path} does not exist or is not a file")
            target, label = str(path), f"video {path}"
    try:
        return av.open(target, mode="r"), label
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise InputError(f"{label} is not a video PyAV can read ({exc})") from exc


def load_video(source: str | Path | bytes, frames: int, policy: MediaPolicy = DEFAULT_POLICY) -> Video:
    """`frames` RGB frames sampled evenly from a video file (path, file:// or data: URI, bytes)."""
    if frames < 1:
        raise InputError(f"--frames must be at least 1, got {frames}")
    av = _import_av()
    container, label = _open_container(av, source, policy)
    try:
        if not container.streams.video:
            raise InputError(f"{label} has no video stream")
        stream = container.streams.video[0]
        width, height = int(stream.codec_context.width), int(stream.codec_context.height)
        if width * height > policy.max_pixels:
            raise InputError(f"{label} has {width} x {height} frames, more than {policy.max_pixels} pixels each")
        fps = float(stream.average_rate) if stream.average_rate else None
        total = int(stream.frames or 0)
        if total <= 0:  # the container does not say (some mkv/webm): count by decoding once
            total = sum(1 for _ in container.decode(stream))
            container.seek(0)
            stream = container.streams.video[0]
        wanted = sample_indices(total, frames)
        want = set(wanted.tolist())
        picked: dict[int, Image.Image] = {}
        last = int(wanted.max())
        for number, frame in enumerate(container.decode(stream)):
            if number in want:
                picked[number] = frame.to_image().convert("RGB")
            if number >= last:
                break
    except av.error.FFmpegError as exc:
        raise InputError(f"{label} is truncated or corrupt ({exc})") from exc
    finally:
        container.close()
    missing = [i for i in wanted.tolist() if i not in picked]
    if missing:
        raise InputError(f"{label} said it has {total} frames but frame {missing[0]} could not be decoded "
                         "(truncated?); re-encode it or ask for fewer --frames")
    return Video([picked[i] for i in wanted.tolist()], [int(i) for i in wanted], total, fps, (width, height))
