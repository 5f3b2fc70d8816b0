"""Image inputs as transformers loads them (EXIF, data: URIs, base64, bytes, PIL, arrays) and video files via PyAV."""

from __future__ import annotations

import base64
import http.server
import importlib.util
import io
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gaze_edge.errors import InputError
from gaze_edge.model import scenes
from gaze_edge.runtime import GazeRuntime, Prompt, SamplingConfig
from gaze_edge.runtime.images import load_image
from gaze_edge.runtime.media import MediaPolicy, load_image_input, load_video, sample_indices

needs_av = pytest.mark.skipif(importlib.util.find_spec("av") is None,
                              reason="PyAV (pip install 'gaze-edge[video]') reads video files")


def scene_images(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [scenes.render(scenes.sample_scene(rng, held_out=True), 48, rng)[0] for _ in range(n)]


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def rt(runtime_export) -> GazeRuntime:
    return GazeRuntime.load(runtime_export[1], threads=1)


# ---------------------------------------------------------------- image sources


def test_every_image_source_gives_the_same_pixels(tmp_path: Path):
    array = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    data = png_bytes(array)
    path = tmp_path / "a.png"
    path.write_bytes(data)
    b64 = base64.b64encode(data).decode()
    sources = [path, str(path), f"file://{path}", data, f"data:image/png;base64,{b64}", b64,
               Image.fromarray(array), array, np.dstack([array, np.full((20, 30), 255, np.uint8)])]
    for source in sources:
        image = load_image_input(source)
        assert image.mode == "RGB" and image.size == (30, 20)
        assert np.array_equal(np.asarray(image), array), type(source)
    grey = load_image_input(array[:, :, 0])
    assert np.array_equal(np.asarray(grey)[:, :, 1], array[:, :, 0])


def test_bad_image_sources_are_refused_with_a_reason(tmp_path: Path):
    small = MediaPolicy(max_pixels=100)
    cases = [
        ("data:image/png;base64,AAAA", {}, "is not an image"),
        ("data:text/plain;base64,aGVsbG8=", {}, "where an image was expected"),
        ("data:image/png;base64", {}, "malformed data: URI"),
        ("https://example.invalid/cat.png", {}, "remote URLs are not fetched"),
        (str(tmp_path / "missing.png"), {}, "does not exist"),
        ("no such thing", {}, "does not exist"),
        (np.zeros((8, 8, 3), np.float32), {}, "must be uint8"),
        (np.zeros((3, 8, 8, 2), np.uint8), {}, "H x W or H x W x 3"),
        (np.zeros((20, 20, 3), np.uint8), {"policy": small}, "more than 100 pixels"),
        (png_bytes(np.zeros((20, 20, 3), np.uint8)), {"policy": small}, "too large to decode safely"),
        (Image.new("RGB", (20, 20)), {"policy": small}, "more than 100 pixels"),
    ]
    for source, kwargs, message in cases:
        with pytest.raises(InputError, match=message):
            load_image_input(source, **kwargs)


def test_local_files_only_inside_allowed_folders(tmp_path: Path):
    inside, outside = tmp_path / "media", tmp_path / "other"
    inside.mkdir()
    outside.mkdir()
    data = png_bytes(np.zeros((4, 4, 3), np.uint8))
    (inside / "ok.png").write_bytes(data)
    (outside / "no.png").write_bytes(data)
    (inside / "link.png").symlink_to(outside / "no.png")  # a symlink out of the folder does not count as inside
    policy = MediaPolicy(local_files=(inside,))
    assert load_image_input(str(inside / "ok.png"), policy).size == (4, 4)
    # A missing file outside is refused the same way: the answer never tells which files exist.
    for refused in (outside / "no.png", inside / "link.png", inside / ".." / "other" / "no.png", outside / "nope.png"):
        with pytest.raises(InputError, match="outside the folders"):
            load_image_input(str(refused), policy)
    with pytest.raises(InputError, match="local image paths are not accepted"):
        load_image_input(f"file://{inside / 'ok.png'}", MediaPolicy(local_files=()))


def test_remote_images_only_behind_the_flag(tmp_path: Path):
    array = scene_images(1, seed=4)[0]
    (tmp_path / "s.png").write_bytes(png_bytes(array))
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.RequestHandlerClass.log_message = lambda *a: None  # type: ignore[assignment]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/s.png"
        with pytest.raises(InputError, match="remote URLs are not fetched"):
            load_image_input(url)
        assert np.array_equal(np.asarray(load_image_input(url, MediaPolicy(allow_remote=True))), array)
        with pytest.raises(InputError, match="larger than 100 bytes"):
            load_image_input(url, MediaPolicy(allow_remote=True, max_bytes=100))
    finally:
        server.shutdown()
        server.server_close()


def _exif_jpeg(upright: Image.Image, path: Path) -> Image.Image:
    """Store the image rotated 90 degrees counter-clockwise with EXIF orientation 6 ("rotate 90 CW to show")."""
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(path, format="JPEG", quality=100, subsampling=0, exif=exif.tobytes())
    return stored


def test_exif_rotated_jpeg_is_read_upright_and_captioned_like_the_upright_image(rt, tmp_path: Path):
    # A scene whose objects are off-centre, so that a rotated view has a different caption.
    scene = scenes.Scene((scenes.SceneObject("red", "circle", "large", 0, 0),
                          scenes.SceneObject("blue", "cross", "large", 0, 2)))  # top left, top right
    upright_array = scenes.render(scene, 48, np.random.default_rng(11))[0]
    upright = Image.fromarray(upright_array)
    path = tmp_path / "rotated.jpg"
    stored = _exif_jpeg(upright, path)
    loaded = load_image(path)
    assert loaded.size == upright.size
    error = np.abs(np.asarray(loaded, np.float32) - upright_array).mean()
    assert error < 3.0, error  # JPEG at quality 100: the upright pixels, up to compression noise
    assert np.abs(np.asarray(stored, np.float32) - upright_array).mean() > 10 * error  # not a symmetric image
    sampling = SamplingConfig(max_new_tokens=24)
    want = rt.caption(upright_array, sampling=sampling)
    assert rt.caption(path, sampling=sampling) == want
    assert rt.caption(load_image_input(Image.open(path)), sampling=sampling) == want  # a PIL image: EXIF applied too
    assert rt.caption(np.asarray(stored), sampling=sampling) != want  # what ignoring EXIF would caption


# ---------------------------------------------------------------- video


def write_video(path: Path, frames: list[np.ndarray], fps: int = 10, codec: str = "mpeg4") -> None:
    """A small video written with PyAV (high bitrate: frames decode close to what was written)."""
    import av

    h, w = frames[0].shape[:2]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.bit_rate = 8_000_000
        stream.codec_context.qmax = 2
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_sample_indices_are_transformers_even_spacing():
    assert sample_indices(30, 8).tolist() == [0, 3, 7, 11, 15, 18, 22, 26]
    assert sample_indices(4, 4).tolist() == [0, 1, 2, 3]
    assert sample_indices(10, 3).tolist() == [0, 3, 6]
    with pytest.raises(InputError, match="has 3 frames; ask for at most 3"):
        sample_indices(3, 4)


@needs_av
@pytest.mark.parametrize("suffix", ["mp4", "mkv"])  # mkv: the container does not store the frame count
def test_video_frames_are_sampled_evenly(tmp_path: Path, suffix: str):
    colours = [np.full((48, 64, 3), (8 * i, 255 - 8 * i, 128), np.uint8) for i in range(30)]
    path = tmp_path / f"clip.{suffix}"
    write_video(path, colours)
    video = load_video(path, 8)
    assert video.indices == [0, 3, 7, 11, 15, 18, 22, 26] and video.total_frames == 30
    assert video.fps == 10 and video.size == (64, 48)
    for i, frame in zip(video.indices, video.frames, strict=True):
        assert frame.size == (64, 48) and frame.mode == "RGB"
        assert np.abs(np.asarray(frame, np.float32).mean((0, 1)) - colours[i][0, 0]).max() < 4, i
    same = load_video(path.read_bytes(), 8)  # bytes, as a video_url data: URI gives them
    assert same.indices == video.indices
    uri = "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode()
    assert load_video(uri, 2).indices == [0, 15]


@needs_av
def test_bad_videos_are_refused(tmp_path: Path):
    notes = tmp_path / "notes.mp4"
    notes.write_text("not a video")
    with pytest.raises(InputError, match="not a video PyAV can read"):
        load_video(notes, 4)
    with pytest.raises(InputError, match="does not exist"):
        load_video(tmp_path / "missing.mp4", 4)
    clip = tmp_path / "short.mp4"
    write_video(clip, [np.zeros((16, 16, 3), np.uint8)] * 3)
    with pytest.raises(InputError, match="has 3 frames; ask for at most 3"):
        load_video(clip, 8)
    with pytest.raises(InputError, match="more than 100 pixels"):
        load_video(clip, 2, MediaPolicy(max_pixels=100))
    with pytest.raises(InputError, match="local video paths are not accepted"):
        load_video(clip, 2, MediaPolicy(local_files=()))


@needs_av
def test_video_frames_take_the_frames_path_and_caption_like_the_frames_themselves(rt, tmp_path: Path):
    frames = scene_images(8, seed=21)
    path = tmp_path / "clip.mp4"
    write_video(path, frames)
    video = load_video(path, 4)
    assert video.indices == [0, 2, 4, 6]
    sampling = SamplingConfig(max_new_tokens=24)
    from_file = rt.generate(Prompt(None, video.frames, frames=True), sampling)
    from_frames = rt.generate(Prompt(None, [frames[i] for i in video.indices], frames=True), sampling)
    assert from_file.tokens.tolist() == from_frames.tokens.tolist()
    assert from_file.texts[0]
    from gaze_edge.runtime.chat import ChatSession

    chat = ChatSession(rt, sampling)  # gaze chat --video: the same frames path
    assert chat.send("describe the frames .", images=video.frames, frames=True).result() == from_file.texts[0]
    assert chat.frames
