"""`gaze serve EXPORT`: an OpenAI-compatible HTTP server over one GazeRuntime (FastAPI + uvicorn).

Endpoints: `POST /v1/chat/completions` (non-streamed, or `stream: true` as server-sent
events), `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus text format).

**One engine, requests queued.** The export is loaded once; one worker thread owns it and runs
one request at a time, in arrival order (no batching across requests). At most `max_queue`
requests wait behind the running one; more are answered 503 (`server_busy`, Retry-After).
The engine keeps one ChatSession whose cache (max_seq_len slots, allocated once per
conversation) is reused when a request continues the conversation of the previous one
(same messages, same images, then more): only the new tokens are prefilled.

Request limits, all answered 4xx with an OpenAI-style error body
`{"error": {"message", "type", "param", "code"}}`: body size (`--max-body-bytes`, 413), images
per request (`--max-request-images`), `max_tokens` (at most `--max-new-tokens`), prompt +
max_tokens within the export's max_seq_len (`context_length_exceeded`), image pixels (the
decompression-bomb limit). Images: `image_url` parts as data: URIs; local paths (or file://)
only under `--allow-local-files DIR`; http(s) only with `--allow-remote-images`. Video:
`video_url` parts (the vLLM extension), `--frames N` sampled evenly. Optional API key
(`--api-key` or $GAZE_API_KEY): `Authorization: Bearer KEY` on /v1/*; /health and /metrics are open.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from gaze_edge.errors import GazeError, InputError

from .media import MediaPolicy, load_image_input, load_video

DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024  # as gaze serve's default


@dataclass
class ServerConfig:
    model_name: str
    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_request_images: int | None = None  # None: the export's max_images
    max_new_tokens: int = 256  # a request's max_tokens default and upper bound
    max_queue: int = 32  # requests waiting behind the running one
    frames: int | None = None  # frames per video part; None: the export's max_images
    media: MediaPolicy = field(default_factory=lambda: MediaPolicy(local_files=()))


class ApiError(Exception):
    """An HTTP error answered with an OpenAI-style body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# --------------------------------------------------------------------------- request parsing


@dataclass
class ChatRequest:
    """A validated /v1/chat/completions request, ready for the engine."""

    messages: list[dict[str, Any]]  # chat-template form
    images: list[Any]  # decoded RGB images, in the order of the image parts
    frames: bool  # every image is a video frame
    sampling: Any  # SamplingConfig
    stream: bool
    include_usage: bool
    stop: list[str]
    prompt_tokens: int


def _number(body: dict[str, Any], name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ApiError(400, f"'{name}' must be a number in [{low:g}, {high:g}], got {value!r}", param=name)
    return float(value)


def _integer(body: dict[str, Any], name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ApiError(400, f"'{name}' must be an integer in [{low}, {high}], got {value!r}", param=name)
    return int(value)


UNSUPPORTED = ("tools", "functions", "tool_choice", "function_call", "response_format", "logit_bias", "audio",
               "prediction", "web_search_options")


class RequestParser:
    """OpenAI chat request -> ChatRequest; every problem an ApiError (4xx) before the engine sees it."""

    def __init__(self, rt: Any, config: ServerConfig) -> None:
        self.rt, self.config = rt, config
        self.max_images = min(config.max_request_images or rt.shape.max_images, rt.shape.max_images)
        self.frames = config.frames or rt.shape.max_images

    def parse(self, body: Any) -> ChatRequest:
        from .sampling import SamplingConfig

        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise ApiError(400, "'model' is required (GET /v1/models lists it)", param="model")
        if model != self.config.model_name:
            raise ApiError(404, f"the model '{model}' does not exist; this server serves '{self.config.model_name}'",
                           param="model", code="model_not_found")
        for name in UNSUPPORTED:
            if body.get(name) not in (None, [], {}):
                raise ApiError(400, f"'{name}' is not supported by this server", param=name)
        if _integer(body, "n", 1, 1) not in (None, 1):
            raise ApiError(400, "'n' must be 1", param="n")
        for name in ("presence_penalty", "frequency_penalty"):
            if (_number(body, name, -2, 2) or 0.0) != 0.0:
                raise ApiError(400, f"'{name}' is not supported (use 'repetition_penalty')", param=name)
        if body.get("logprobs"):
            raise ApiError(400, "'logprobs' is not supported", param="logprobs")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, "'stream' must be a boolean", param="stream")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise ApiError(400, "'stream_options' must be an object", param="stream_options")
        stop = body.get("stop")
        stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
            raise ApiError(400, "'stop' must be a string or a list of at most 4 non-empty strings", param="stop")

        messages, images, frames = self._messages(body.get("messages"))
        try:
            ids = self.rt.processor.encode(self.rt.processor.apply_chat_template(messages))
        except InputError as exc:
            raise ApiError(400, str(exc), param="messages") from exc
        room = self.rt.shape.max_seq_len - len(ids)
        asked = _integer(body, "max_completion_tokens", 1, 1 << 30)
        asked = asked if asked is not None else _integer(body, "max_tokens", 1, 1 << 30)
        if asked is not None and asked > self.config.max_new_tokens:
            raise ApiError(400, f"max_tokens {asked} is more than this server allows per reply "
                           f"({self.config.max_new_tokens}, gaze serve --max-new-tokens)", param="max_tokens")
        max_tokens = asked if asked is not None else min(self.config.max_new_tokens, room)
        if max_tokens < 1 or len(ids) + max_tokens > self.rt.shape.max_seq_len:
            raise ApiError(400, f"this model's context is {self.rt.shape.max_seq_len} tokens; the messages take "
                           f"{len(ids)} and max_tokens {max_tokens} more: shorten the conversation, send fewer "
                           "images, or lower max_tokens", param="messages", code="context_length_exceeded")

        temperature = _number(body, "temperature", 0, 2)
        top_p = _number(body, "top_p", 0, 1)
        if top_p is not None and top_p <= 0:
            raise ApiError(400, "'top_p' must be in (0, 1]", param="top_p")
        top_k = _integer(body, "top_k", 0, 1 << 30)  # extensions (vLLM, llama.cpp)
        penalty = _number(body, "repetition_penalty", 1e-6, 1e6)
        seed = _integer(body, "seed", -(1 << 63), (1 << 64) - 1)
        base = self.rt.default_sampling
        sample = base.do_sample if temperature is None else temperature > 0
        sampling = SamplingConfig(
            max_new_tokens=max_tokens, do_sample=sample,
            temperature=base.temperature if temperature is None or temperature == 0 else temperature,
            top_k=base.top_k if top_k is None else top_k, top_p=base.top_p if top_p is None else top_p,
            repetition_penalty=base.repetition_penalty if penalty is None else penalty,
            seed=None if seed is None else seed % (1 << 64))
        try:
            sampling.check()
        except InputError as exc:
            raise ApiError(400, str(exc)) from exc
        return ChatRequest(messages, images, frames, sampling, stream, bool(options.get("include_usage")), stops,
                           len(ids))

    def _messages(self, raw: Any) -> tuple[list[dict[str, Any]], list[Any], bool]:
        if not isinstance(raw, list) or not raw:
            raise ApiError(400, "'messages' must be a non-empty list", param="messages")
        messages: list[dict[str, Any]] = []
        images: list[Any] = []
        all_frames = True
        for i, m in enumerate(raw):
            if not isinstance(m, dict):
                raise ApiError(400, f"messages[{i}] must be an object", param=f"messages[{i}]")
            role, content = m.get("role"), m.get("content")
            if role == "developer":
                role = "system"
            if role not in ("system", "user", "assistant"):
                raise ApiError(400, f"messages[{i}].role must be system, user or assistant, got {role!r}",
                               param=f"messages[{i}].role")
            if role != "user":
                messages.append({"role": role, "content": self._text_only(content, i)})
                continue
            if isinstance(content, str):
                messages.append({"role": "user", "content": [{"type": "text", "text": content}]})
                continue
            if not isinstance(content, list) or not content:
                raise ApiError(400, f"messages[{i}].content must be a string or a non-empty list of parts",
                               param=f"messages[{i}].content")
            parts: list[dict[str, Any]] = []
            for j, part in enumerate(content):
                where = f"messages[{i}].content[{j}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    parts.append({"type": "text", "text": part["text"]})
                elif kind in ("image_url", "video_url"):
                    url = part.get(kind)
                    url = url.get("url") if isinstance(url, dict) else url
                    if not isinstance(url, str) or not url:
                        raise ApiError(400, f"{where}.{kind}.url must be a string", param=where)
                    loaded = self._load(kind, url, where)
                    all_frames = all_frames and kind == "video_url"
                    images += loaded
                    parts += [{"type": "image"} for _ in loaded]
                else:
                    raise ApiError(400, f"{where} must be a text, image_url or video_url part", param=where)
                if len(images) > self.max_images:
                    raise ApiError(400, f"the request holds more than {self.max_images} images or frames, the most "
                                   "this server takes per request", param=where, code="too_many_images")
            messages.append({"role": "user", "content": parts})
        if not any(m["role"] == "user" for m in messages):
            raise ApiError(400, "the messages need at least one user message", param="messages")
        return messages, images, bool(images) and all_frames

    @staticmethod
    def _text_only(content: Any, i: int) -> str:
        if isinstance(content, str):
            return content
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            return "".join(str(p.get("text", "")) for p in content)
        raise ApiError(400, f"messages[{i}].content must be text (images go in user messages)",
                       param=f"messages[{i}].content")

    def _load(self, kind: str, url: str, where: str) -> list[Any]:
        try:
            if kind == "image_url":
                return [load_image_input(url, self.config.media)]
            return load_video(url, self.frames, self.config.media).frames
        except InputError as exc:
            raise ApiError(400, f"{where}: {exc}", param=where, code="invalid_image") from exc


# --------------------------------------------------------------------------- the engine


class Busy(Exception):
    pass


class Engine:
    """One runtime, one worker thread, one ChatSession: jobs run one at a time in arrival order."""

    def __init__(self, rt: Any, config: ServerConfig, metrics: Metrics) -> None:
        from .chat import ChatSession

        self.rt, self.config, self.metrics = rt, config, metrics
        self.session = ChatSession(rt)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gaze-engine")
        self._lock = threading.Lock()
        self.pending = 0  # waiting + running

    def submit(self, job: Callable[[], None]) -> None:
        with self._lock:
            if self.pending > self.config.max_queue:
                raise Busy()
            self.pending += 1
            self.metrics.queue.set(self.pending)

        def run() -> None:
            try:
                job()
            finally:
                with self._lock:
                    self.pending -= 1
                    self.metrics.queue.set(self.pending)

        self.executor.submit(run)

    def generate(self, request: ChatRequest, emit: Callable[[str, Any], None], cancelled: threading.Event) -> None:
        """Runs on the worker thread: emit ("piece", text)..., then ("done", info) or ("error", exc)."""
        started = time.perf_counter()
        try:
            turn = self.session.complete(request.messages, request.images, request.sampling, frames=request.frames)
            stops = request.stop
            hold = max((len(s) for s in stops), default=1) - 1
            sent, finish = 0, None
            first = True
            for _piece in turn:
                if first:
                    self.metrics.engine_ttft.observe(time.perf_counter() - started)
                    first = False
                text = turn.text
                cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
                if cut >= 0:  # a stop string: the reply ends before it
                    if cut > sent:
                        emit("piece", text[sent:cut])
                    sent, finish = cut, "stop"
                    turn.close()
                    break
                safe = len(text) - hold  # text that cannot be the start of a stop string
                if safe > sent:
                    emit("piece", text[sent:safe])
                    sent = safe
                if cancelled.is_set():
                    turn.close()
                    finish = "cancelled"
                    break
            if finish is None and len(turn.text) > sent:
                emit("piece", turn.text[sent:])
            stats = turn.stats
            self.metrics.observe_turn(stats)
            emit("done", {"finish_reason": finish or ("length" if stats.finish_reason == "length" else "stop"),
                          "prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.generated_tokens,
                          "reused_tokens": stats.reused_tokens})
        except InputError as exc:
            emit("error", ApiError(400, str(exc)))
        except GazeError as exc:
            emit("error", ApiError(500, str(exc), "server_error"))
        except Exception as exc:  # never leave a client waiting
            emit("error", ApiError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error"))


class Metrics:
    """Prometheus metrics of one server (its own registry, so several apps can live in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("gaze_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.latency = Histogram("gaze_request_seconds", "chat completion wall time, queue included", registry=r)
        self.ttft = Histogram("gaze_time_to_first_token_seconds", "request arrival to first token, queue included",
                              registry=r)
        self.engine_ttft = Histogram("gaze_engine_time_to_first_token_seconds",
                                     "engine start of a request to its first token (prefill)", registry=r)
        self.queue = Gauge("gaze_queue_requests", "requests waiting or running", registry=r)
        self.prompt_tokens = Counter("gaze_prompt_tokens", "prompt tokens of completed requests", registry=r)
        self.prefilled = Counter("gaze_prefilled_tokens", "tokens run through prefill", registry=r)
        self.reused = Counter("gaze_reused_tokens", "prompt tokens taken from the KV cache", registry=r)
        self.generated = Counter("gaze_generated_tokens", "tokens generated", registry=r)
        self.decode_tps = Histogram("gaze_decode_tokens_per_second", "decode tokens/s per request", registry=r,
                                    buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000))
        self.kv_bytes = Gauge("gaze_kv_cache_bytes", "KV cache bytes allocated", registry=r)

    def observe_turn(self, stats: Any) -> None:
        self.prompt_tokens.inc(stats.prompt_tokens)
        self.prefilled.inc(stats.prefilled_tokens)
        self.reused.inc(stats.reused_tokens)
        self.generated.inc(stats.generated_tokens)
        self.kv_bytes.set(stats.kv_bytes_allocated + stats.descriptor_bytes)
        tps = stats.timings.get("decode_tokens_per_s")
        if tps:
            self.decode_tps.observe(tps)


# --------------------------------------------------------------------------- the app


def create_app(rt: Any, config: ServerConfig) -> FastAPI:
    """The FastAPI application serving `rt` (loaded once by the caller)."""
    metrics = Metrics()
    engine = Engine(rt, config, metrics)
    parser = RequestParser(rt, config)
    created = int(time.time())
    app = FastAPI(title="gaze-edge", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.metrics = engine, metrics

    def error_response(err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(ApiError(exc.status_code, str(exc.detail), code=code))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(ApiError(400, str(exc)))

    @app.middleware("http")
    async def _auth_and_count(request: Request, call_next: Callable[[Request], Any]) -> Any:
        path = request.url.path
        if config.api_key and path.startswith("/v1/"):
            header = request.headers.get("authorization", "")
            given = header[7:] if header.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), config.api_key.encode()):
                metrics.requests.labels(path, "401").inc()
                return error_response(ApiError(401, "invalid or missing API key (Authorization: Bearer KEY)",
                                               code="invalid_api_key"))
        response = await call_next(request)
        metrics.requests.labels(path if path in KNOWN_PATHS else "other", str(response.status_code)).inc()
        return response

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": config.model_name, "queue": engine.pending}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": created,
                                            "owned_by": "gaze-edge"}]}

    async def read_body(request: Request) -> Any:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > config.max_body_bytes:
            raise ApiError(413, f"the request body is {length} bytes; this server takes at most "
                           f"{config.max_body_bytes} (gaze serve --max-body-bytes)", code="request_too_large")
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > config.max_body_bytes:
                raise ApiError(413, f"the request body is larger than {config.max_body_bytes} bytes (gaze serve "
                               "--max-body-bytes)", code="request_too_large")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except ValueError as exc:
            raise ApiError(400, f"the request body is not valid JSON: {exc}") from exc

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        arrived = time.perf_counter()
        body = await read_body(request)
        chat = await run_in_threadpool(parser.parse, body)  # decodes images: off the event loop
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        cancelled = threading.Event()

        def emit(kind: str, value: Any) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (kind, value))

        try:
            engine.submit(lambda: engine.generate(chat, emit, cancelled))
        except Busy:
            raise ApiError(503, f"the server is busy ({config.max_queue} requests waiting); retry shortly",
                           "server_error", code="server_busy", headers={"Retry-After": "1"}) from None
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        now = int(time.time())
        first = await events.get()
        if first[0] == "error":
            raise first[1]
        metrics.ttft.observe(time.perf_counter() - arrived)

        if not chat.stream:
            pieces, event = [], first
            while event[0] == "piece":
                pieces.append(event[1])
                event = await events.get()
            if event[0] == "error":
                raise event[1]
            info = event[1]
            metrics.latency.observe(time.perf_counter() - arrived)
            return {"id": rid, "object": "chat.completion", "created": now, "model": config.model_name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(pieces)},
                                 "finish_reason": info["finish_reason"], "logprobs": None}],
                    "usage": _usage(info)}

        def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
            data = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": config.model_name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
            return f"data: {json.dumps(data)}\n\n"

        async def sse() -> AsyncIterator[str]:
            event = first
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    if event[0] == "piece":
                        yield chunk({"content": event[1]})
                    elif event[0] == "done":
                        info = event[1]
                        yield chunk({}, info["finish_reason"])
                        if chat.include_usage:
                            usage = {"id": rid, "object": "chat.completion.chunk", "created": now,
                                     "model": config.model_name, "choices": [], "usage": _usage(info)}
                            yield f"data: {json.dumps(usage)}\n\n"
                        yield "data: [DONE]\n\n"
                        metrics.latency.observe(time.perf_counter() - arrived)
                        return
                    else:  # an error after the stream started: one error event, then the end
                        yield f"data: {json.dumps(event[1].body())}\n\n"
                        return
                    event = await events.get()
            finally:
                cancelled.set()  # the client went away (or we are done): stop generating

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


KNOWN_PATHS = ("/health", "/metrics", "/v1/models", "/v1/chat/completions")


def _usage(info: dict[str, Any]) -> dict[str, Any]:
    return {"prompt_tokens": info["prompt_tokens"], "completion_tokens": info["completion_tokens"],
            "total_tokens": info["prompt_tokens"] + info["completion_tokens"],
            "prompt_tokens_details": {"cached_tokens": info["reused_tokens"]}}


def iter_sse(lines: Iterator[bytes]) -> Iterator[dict[str, Any]]:
    """Parse a server-sent event stream of JSON `data:` lines (for tests and simple clients)."""
    for raw in lines:
        line = raw.decode().strip()
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[6:])
