"""`gaze serve`: the official openai client against a server started here on loopback."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gaze_edge.model import scenes
from gaze_edge.runtime import GazeRuntime, Prompt, SamplingConfig

openai = pytest.importorskip("openai", reason="the openai client (requirements.lock, dev) drives these tests")
uvicorn = pytest.importorskip("uvicorn", reason="gaze serve needs the serve extra: pip install 'gaze-edge[serve]'")

from gaze_edge.runtime.server import Busy, Engine, Metrics, ServerConfig, create_app  # noqa: E402

KEY = "test-key-123"
MODEL = "gaze-tiny-test"


def scene_images(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [scenes.render(scenes.sample_scene(rng, held_out=True), 48, rng)[0] for _ in range(n)]


def data_uri(array: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


class Server:
    """uvicorn in a thread on a socket bound here to 127.0.0.1:0 (a free port)."""

    def __init__(self, app) -> None:  # type: ignore[no-untyped-def]
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


@pytest.fixture(scope="module")
def served(runtime_export):  # type: ignore[no-untyped-def]
    rt = GazeRuntime.load(runtime_export[1], threads=1)
    config = ServerConfig(model_name=MODEL, api_key=KEY, max_body_bytes=2_000_000, max_new_tokens=64, max_queue=16,
                          media=ServerConfig(model_name=MODEL).media)
    app = create_app(rt, config)
    server = Server(app)
    yield server, app
    server.stop()


@pytest.fixture(scope="module")
def reference(runtime_export) -> GazeRuntime:
    return GazeRuntime.load(runtime_export[1], threads=1)


@pytest.fixture()
def client(served):  # type: ignore[no-untyped-def]
    return openai.OpenAI(base_url=served[0].url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def user(text: str, *images: np.ndarray) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": data_uri(a)}} for a in images]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def test_health_models_and_auth(served, client):
    server, _ = served
    with urllib.request.urlopen(server.url + "/health") as r:  # open: no key needed
        assert json.loads(r.read())["status"] == "ok"
    assert [m.id for m in client.models.list().data] == [MODEL]
    anonymous = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        anonymous.models.list()
    assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        anonymous.chat.completions.create(model=MODEL, messages=[user("describe the image .")])


def test_non_streamed_and_streamed_requests_with_images_answer_like_the_runtime(client, reference):
    imgs = scene_images(2, seed=41)
    sampling = SamplingConfig(max_new_tokens=48)
    want_one = reference.caption(imgs[0], sampling=sampling)
    out = client.chat.completions.create(model=MODEL, messages=[user("describe the image .", imgs[0])], max_tokens=48)
    assert out.choices[0].message.content == want_one and out.choices[0].finish_reason == "stop"
    assert out.model == MODEL and out.object == "chat.completion"
    assert out.usage.completion_tokens == len(reference.processor.encode(want_one)) + 1  # + <eos>
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens

    want_two = reference.generate(Prompt("describe the images .", imgs), sampling).texts[0]
    stream = client.chat.completions.create(model=MODEL, messages=[user("describe the images .", *imgs)],
                                            max_tokens=48, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want_two and len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 3


def test_a_video_url_part_is_sampled_into_frames(client, reference, tmp_path: Path):
    from gaze_edge.runtime.media import load_video
    from tests.test_media import write_video

    path = tmp_path / "clip.mp4"
    write_video(path, scene_images(8, seed=46))
    uri = "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode()
    video = load_video(path, reference.shape.max_images)  # the server's default --frames
    want = reference.generate(Prompt("describe the frames .", video.frames, frames=True),
                              SamplingConfig(max_new_tokens=20)).texts[0]
    out = client.chat.completions.create(model=MODEL, max_tokens=20, messages=[{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": uri}}, {"type": "text", "text": "describe the frames ."}]}])
    assert out.choices[0].message.content == want


def test_a_follow_up_request_reuses_the_cache_and_answers_like_a_fresh_run(client, reference):
    img = scene_images(1, seed=42)[0]
    first = client.chat.completions.create(model=MODEL, messages=[user("describe the image .", img)], max_tokens=20)
    history = [user("describe the image .", img),
               {"role": "assistant", "content": first.choices[0].message.content},
               {"role": "user", "content": "what is in this image ?"}]
    second = client.chat.completions.create(model=MODEL, messages=history, max_tokens=20)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached < second.usage.prompt_tokens  # the first exchange came from the KV cache
    template = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the image ."}]},
                {"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": [{"type": "text", "text": "what is in this image ?"}]}]
    fresh = reference.generate(Prompt(messages=template, images=[img]), SamplingConfig(max_new_tokens=20))
    assert second.choices[0].message.content == fresh.texts[0]


def test_stop_strings_and_sampling_options(client):
    img = scene_images(1, seed=43)[0]
    full = client.chat.completions.create(model=MODEL, messages=[user("describe the image .", img)], max_tokens=24)
    words = full.choices[0].message.content.split()
    cut = client.chat.completions.create(model=MODEL, messages=[user("describe the image .", img)], max_tokens=24,
                                         stop=[f" {words[2]}"])
    assert cut.choices[0].message.content == " ".join(words[:2]) and cut.choices[0].finish_reason == "stop"
    short = client.chat.completions.create(model=MODEL, messages=[user("describe the image .", img)], max_tokens=2)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 2
    a, b = (client.chat.completions.create(model=MODEL, messages=[user("describe the image .", img)], max_tokens=12,
                                           temperature=1.5, seed=7).choices[0].message.content for _ in range(2))
    assert a == b  # a seed reproduces a sampled reply


def test_bad_requests_get_4xx_with_an_openai_error_body(served, client):
    server, _ = served
    img = scene_images(1, seed=44)[0]
    cases = [
        (dict(model="gpt-4", messages=[user("hi")]), openai.NotFoundError, "model_not_found"),
        (dict(model=MODEL, messages=[user("describe the images .", *[img] * 5)]), openai.BadRequestError,
         "too_many_images"),
        (dict(model=MODEL, messages=[user("describe " * 760, img)], max_tokens=8), openai.BadRequestError,
         "context_length_exceeded"),
        (dict(model=MODEL, messages=[user("hi")], max_tokens=65), openai.BadRequestError, None),
        (dict(model=MODEL, messages=[user("what is <image> ?")]), openai.BadRequestError, None),
        (dict(model=MODEL, messages=[]), openai.BadRequestError, None),
        (dict(model=MODEL, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]),
         openai.BadRequestError, "invalid_image"),
        (dict(model=MODEL, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "/etc/hostname"}}]}]), openai.BadRequestError, "invalid_image"),
        (dict(model=MODEL, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.invalid/a.png"}}]}]),
         openai.BadRequestError, "invalid_image"),
        (dict(model=MODEL, messages=[user("hi")], n=2), openai.BadRequestError, None),
        (dict(model=MODEL, messages=[user("hi")], tools=[{"type": "function", "function": {"name": "f"}}]),
         openai.BadRequestError, None),
    ]
    for request, error, code in cases:
        with pytest.raises(error) as err:
            client.chat.completions.create(**request)
        body = err.value.body
        assert isinstance(body, dict) and body.get("message") and body.get("type"), (request, body)
        assert 400 <= err.value.status_code < 500
        if code is not None:
            assert body.get("code") == code, (code, body)
    # An oversize body: 413 with the same error shape as soon as the headers announce it, before any of
    # it is read (only the headers are sent here, so the answer cannot race the upload).
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as conn:
        conn.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                      "Content-Type: application/json\r\nContent-Length: 2100000\r\n\r\n").encode())
        reply = b""
        while b"}}" not in reply:
            data = conn.recv(65536)
            if not data:
                break
            reply += data
    head, _, payload = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), head
    assert json.loads(payload)["error"]["code"] == "request_too_large"
    # Without a Content-Length (chunked upload) the limit is counted while reading.
    from starlette.testclient import TestClient

    def chunks():  # type: ignore[no-untyped-def]
        for _ in range(40):
            yield b"x" * 65536

    answer = TestClient(served[1]).post("/v1/chat/completions", content=chunks(),
                                        headers={"Authorization": f"Bearer {KEY}"})
    assert answer.status_code == 413 and answer.json()["error"]["code"] == "request_too_large"
    for path in ("/v1/nothing", "/v1/chat/completions"):  # unknown route, wrong method: still JSON errors
        request = urllib.request.Request(server.url + path, headers={"Authorization": f"Bearer {KEY}"})
        with pytest.raises(urllib.error.HTTPError) as http_err:
            urllib.request.urlopen(request)
        assert http_err.value.code in (404, 405) and "error" in json.loads(http_err.value.read())


def test_eight_concurrent_clients_are_queued_and_all_complete_with_bounded_memory(served, client, reference):
    server, app = served
    imgs = scene_images(8, seed=45)
    sampling = SamplingConfig(max_new_tokens=16)
    want = [reference.caption(a, sampling=sampling) for a in imgs]

    def ask(i: int) -> str:
        own = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        messages = [user("describe the image .", imgs[i])]
        if i % 2:
            stream = own.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, stream=True)
            return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        return own.chat.completions.create(model=MODEL, messages=messages, max_tokens=16).choices[0].message.content

    with ThreadPoolExecutor(8) as pool:  # warm-up round, then measure memory over three more rounds
        assert list(pool.map(ask, range(8))) == want
        before = rss_bytes()
        for _ in range(3):
            assert list(pool.map(ask, range(8))) == want
        grown = rss_bytes() - before
    assert grown < 64 * 2**20, grown  # one engine, one cache: 24 more requests do not grow the process
    capacity = app.state.engine.session.rt.backend.spec.capacity
    assert capacity == reference.shape.max_seq_len  # the one cache, allocated at max_seq_len
    with urllib.request.urlopen(server.url + "/metrics") as r:
        metrics = r.read().decode()
    completed = [line for line in metrics.splitlines()
                 if line.startswith('gaze_requests_total{endpoint="/v1/chat/completions",status="200"}')]
    assert completed and float(completed[0].split()[-1]) >= 32
    assert "gaze_time_to_first_token_seconds_count" in metrics and "gaze_kv_cache_bytes" in metrics


def test_a_full_queue_is_refused_with_503():
    engine = Engine.__new__(Engine)
    engine.config = ServerConfig(model_name=MODEL, max_queue=1)
    engine.metrics = Metrics()
    engine.executor = ThreadPoolExecutor(1)
    engine._lock = threading.Lock()
    engine.pending = 0
    gate = threading.Event()
    engine.submit(gate.wait)  # running
    engine.submit(lambda: None)  # waiting (1 = max_queue)
    with pytest.raises(Busy):
        engine.submit(lambda: None)
    gate.set()
    engine.executor.shutdown(wait=True)
    assert engine.pending == 0


def test_gaze_serve_parser_reads_the_key_from_the_environment(monkeypatch, tmp_path: Path):
    import argparse

    from gaze_edge.runtime.commands import add_chat_serve_parsers, config_from_args

    parser = argparse.ArgumentParser(prog="gaze")
    add_chat_serve_parsers(parser.add_subparsers(dest="command", required=True))
    monkeypatch.setenv("GAZE_API_KEY", "from-env")
    args = parser.parse_args(["serve", str(tmp_path), "--allow-local-files", str(tmp_path), "--max-queue", "3"])
    config = config_from_args(args, tmp_path)
    assert config.api_key == "from-env" and config.max_queue == 3 and config.model_name == tmp_path.name
    assert config.media.local_files == (tmp_path,) and not config.media.allow_remote
