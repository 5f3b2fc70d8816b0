"""`gaze chat` and `gaze serve`: their parsers (`add_chat_serve_parsers`, one call in gaze_edge/cli.py) and `chat`.

Nothing heavy at import time: FastAPI/uvicorn are imported by `gaze serve` only, PyAV only
when a video is read. Flags keep the meaning they have everywhere (docs/CLI.md):
`--max-new-tokens N` the most tokens one reply generates, `--frames N` frames sampled
evenly from each `--video FILE`, `--json FILE|-` the machine-readable result to FILE or
('-') to stdout instead of the text.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, TextIO

from gaze_edge import cli_args as ca
from gaze_edge import console
from gaze_edge.errors import InputError

CHAT_HELP = """commands (a line that starts with '/'):
  /image FILE...       attach images (path, file:// or data: URI) to the next message
  /video FILE [N]      attach N frames sampled evenly from a video (default: --frames)
  /reset               forget the conversation (the KV cache starts empty)
  /stats               the last turn's numbers (tokens prefilled and reused, KV bytes)
  /help                this text
  /quit                end (also Ctrl-D)
any other line is a message; the reply streams as it is generated."""


def _common(p: argparse.ArgumentParser) -> None:
    from .cli import common_flags

    common_flags(p)


def _sampling(args: argparse.Namespace) -> Any:
    from .cli import sampling_from_args

    return sampling_from_args(args)


def add_chat_serve_parsers(subparsers: Any) -> None:
    """Add `gaze chat` and `gaze serve` to the `gaze` subcommands."""
    add_chat_parser(subparsers)
    add_serve_parser(subparsers)


def add_chat_parser(subparsers: Any) -> argparse.ArgumentParser:
    from .cli import frames_flag, sampling_flags

    p = subparsers.add_parser("chat", help="multi-turn chat with an exported model (KV cache kept across turns)",
                              description="Chat on stdin/stdout; images attach per turn. " + CHAT_HELP,
                              formatter_class=console.RawHelpFormatter)
    _common(p)
    p.add_argument("--image", type=Path, action="append", default=[],
                   help="image for the first message (repeatable)")
    p.add_argument("--video", type=Path, default=None, metavar="FILE",
                   help="video whose --frames frames go with the first message")
    frames_flag(p, "frames sampled evenly from each video (--video, /video)")
    p.add_argument("--capacity", type=ca.positive_int, default=None,
                   help="cache slots of the conversation (default: the export's max_seq_len)")
    sampling_flags(p, 64, "most tokens one reply generates")
    console.add_json_flag(p, "the transcript with per-turn numbers, at the end,", ca.output_file(".json", stdout=True))
    p.set_defaults(func=run_chat)
    return p


class _Out:
    """stdout that stops quietly when the reader went away (`gaze chat | head`)."""

    def __init__(self, stream: TextIO, enabled: bool = True) -> None:
        self.stream, self.enabled = stream, enabled

    def write(self, text: str) -> None:
        if not self.enabled:
            return
        try:
            self.stream.write(text)
            self.stream.flush()
        except BrokenPipeError:
            self.enabled = False
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.stream.fileno())  # no second BrokenPipeError when Python flushes at exit


def run_chat(args: argparse.Namespace, stdin: TextIO | None = None) -> int:
    from .chat import ChatSession
    from .generate import GazeRuntime
    from .media import load_images, load_video

    stdin = stdin or sys.stdin
    sampling = _sampling(args)
    sampling.check()
    if args.frames is not None and args.video is None:
        raise InputError("--frames N samples frames from --video FILE; give --video too")
    first = load_images(args.image)  # every file checked before the model loads
    rt = GazeRuntime.load(args.export, backend=args.backend, threads=args.threads)
    frames_default = args.frames or rt.shape.max_images
    first_frames = False
    if args.video is not None:
        if first:
            raise InputError("give either --image or --video for the first message, not both")
        first, first_frames = load_video(args.video, frames_default).frames, True
    session = ChatSession(rt, sampling, capacity=args.capacity)
    to_json = args.json is not None
    out = _Out(sys.stdout, enabled=not console.json_to_stdout(args.json))
    tty = stdin.isatty()
    pending, pending_frames = list(first), first_frames
    transcript: list[dict[str, Any]] = []
    if tty:
        print(f"chat with {rt.folder.path} ({session.capacity} cache slots); /help for commands", file=sys.stderr)
    while True:
        if tty:
            print("> ", end="", file=sys.stderr, flush=True)
        line = stdin.readline()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        try:
            if line.startswith("/"):
                command, _, rest = line.partition(" ")
                if command in ("/quit", "/exit"):
                    break
                if command == "/help":
                    print(CHAT_HELP, file=sys.stderr)
                elif command == "/reset":
                    session.reset()
                    pending, pending_frames = [], False
                    print("[conversation reset]", file=sys.stderr)
                elif command == "/stats":
                    print(session.last.summary() if session.last else "[no turn yet]", file=sys.stderr)
                elif command == "/image":
                    if not rest.strip():
                        raise InputError("/image needs a file")
                    pending += load_images(rest.split())
                    pending_frames = False
                    print(f"[{len(pending)} image(s) attached to the next message]", file=sys.stderr)
                elif command == "/video":
                    parts = rest.split()
                    if not parts or len(parts) > 2:
                        raise InputError("/video needs a file and optionally a frame count: /video clip.mp4 8")
                    if len(parts) == 2 and not parts[1].isdigit():
                        raise InputError(f"/video: the frame count must be a number, got {parts[1]!r}")
                    count = int(parts[1]) if len(parts) == 2 else frames_default
                    pending = load_video(parts[0], count).frames
                    pending_frames = True
                    print(f"[{len(pending)} frames attached to the next message]", file=sys.stderr)
                else:
                    raise InputError(f"unknown command {command}; /help lists them")
                continue
            turn = session.send(line, images=pending, frames=pending_frames)
            attached = len(pending)
            pending, pending_frames = [], False
            for piece in turn:
                out.write(piece)
            out.write("\n")
            console.progress(f"[turn {len(session.turns)}] {turn.stats.summary()}")
            transcript.append({"user": line, "images": attached, "reply": turn.text, "stats": turn.stats.as_dict()})
        except InputError as exc:  # a refused message or command: say so, keep the conversation
            print(f"gaze: error: {exc}", file=sys.stderr, flush=True)
    if to_json:
        report = {"export": str(rt.folder.path), "capacity": session.capacity, "turns": transcript,
                  "messages": session.messages}
        if console.json_to_stdout(args.json):
            _Out(sys.stdout).write(json.dumps(report, indent=2) + "\n")
        else:
            console.write_json(report, args.json)
    return 0


# --------------------------------------------------------------------------- gaze serve

API_KEY_ENV = "GAZE_API_KEY"
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
SERVE_HELP = """OpenAI-compatible HTTP server: POST /v1/chat/completions (stream: true as server-sent events),
GET /v1/models, /health, /metrics (Prometheus). One engine, loaded once; requests run one at a time in
arrival order (queued, not batched); at most --max-queue wait, more get 503. Images: image_url parts as
data: URIs; local paths only under --allow-local-files DIR; http(s) only with --allow-remote-images;
video_url parts sampled to --frames frames. docs/RUNTIME.md has curl and openai-client examples."""


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    from .cli import frames_flag

    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/chat/completions, /metrics)",
                              description=SERVE_HELP, formatter_class=console.RawHelpFormatter)
    _common(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=ca.int_in(0, 65535), default=8000, help="TCP port (default 8000)")
    p.add_argument("--model-name", default=None, help="the model id clients send (default: the export folder's name)")
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on /v1/* (default: ${API_KEY_ENV} if set, else none)")
    p.add_argument("--max-new-tokens", type=ca.int_in(1, 1 << 20), default=256,
                   help="most tokens one reply generates: a request's max_tokens default and limit (default 256)")
    p.add_argument("--max-body-bytes", type=ca.positive_int, default=DEFAULT_MAX_BODY_BYTES,
                   help=f"largest request body; larger ones get 413 (default {DEFAULT_MAX_BODY_BYTES})")
    p.add_argument("--max-request-images", type=ca.positive_int, default=None,
                   help="most images or video frames in one request (default: the export's max images)")
    p.add_argument("--max-queue", type=ca.non_negative_int, default=32,
                   help="requests that may wait behind the running one; more get 503 (default 32)")
    frames_flag(p, "frames sampled evenly from each video_url part")
    p.add_argument("--allow-local-files", type=Path, action="append", default=[], metavar="DIR",
                   help="accept image/video paths (or file:// URLs) inside DIR (repeatable; default: none)")
    p.add_argument("--allow-remote-images", action="store_true", help="fetch http(s) image and video URLs")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default warning)")
    p.set_defaults(func=run_serve)
    return p


def _import_server() -> Any:
    try:
        from . import server
    except ImportError as exc:
        raise InputError(f"gaze serve needs FastAPI, uvicorn and prometheus_client ({exc}): "
                         "pip install 'gaze-edge[serve]'") from exc
    return server


def config_from_args(args: argparse.Namespace, export: Path) -> Any:
    """The ServerConfig the flags describe."""
    from .media import MediaPolicy

    server = _import_server()
    for folder in args.allow_local_files:
        if not folder.is_dir():
            raise InputError(f"--allow-local-files {folder}: not a folder")
    return server.ServerConfig(
        model_name=args.model_name or export.name or export.resolve().name,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        max_body_bytes=args.max_body_bytes, max_request_images=args.max_request_images,
        max_new_tokens=args.max_new_tokens, max_queue=args.max_queue, frames=args.frames,
        media=MediaPolicy(local_files=tuple(args.allow_local_files), allow_remote=args.allow_remote_images))


def run_serve(args: argparse.Namespace) -> int:
    server = _import_server()
    import uvicorn

    from .generate import GazeRuntime

    config = config_from_args(args, args.export)
    rt = GazeRuntime.load(args.export, backend=args.backend, threads=args.threads)  # loaded once, before listening
    app = server.create_app(rt, config)
    key = "on" if config.api_key else "off"
    console.progress(f"gaze serve: {config.model_name} on http://{args.host}:{args.port}/v1 (one engine, requests "
                     f"queued: at most {config.max_queue} waiting; API key {key})")
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
