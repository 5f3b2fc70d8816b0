"""Argument checks shared by every `gaze` command (docs/CLI.md): validated while parsing, before any work.

Each `type=` callable here turns the command-line text into a value or raises
argparse.ArgumentTypeError with what is wrong and what is accepted; `GazeArgumentParser`
prints that as one line and exits 2. Nothing here imports more than the standard library.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NoReturn

from .errors import GazeError, MissingExtraError, interrupt_in_chain
from .memory import check_weights_fit
from .memory import gib as gib  # re-exported: the memory helpers live in gaze_edge/memory.py (stdlib only)
from .memory import total_memory_bytes as total_memory_bytes
from .memory import weight_bytes_lower_bound as weight_bytes_lower_bound

#: Largest seed accepted (numpy's SeedSequence and torch.manual_seed both take 0 .. 2**64 - 1).
MAX_SEED = 2**64 - 1
#: Largest count or size any option takes: ONNX dims and numpy shapes stay int32-safe.
MAX_COUNT = 2**31 - 1
#: Pixels decoded from one image folder, summed over its files (`--max-total-pixels` of calibrate, quantize).
DEFAULT_MAX_TOTAL_PIXELS = 2_000_000_000


class GazeArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (`gaze caption: error: ...; see gaze caption --help`), exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def _named(func: Callable[[str], Any], name: str) -> Callable[[str], Any]:
    func.__name__ = name  # argparse names the type in "invalid <name> value" messages
    return func


def int_in(low: int, high: int = MAX_COUNT) -> Callable[[str], int]:
    """An integer in [low, high]."""

    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not low <= value <= high:
            bound = f">= {low}" if high == MAX_COUNT else f"in {low} .. {high}"
            raise argparse.ArgumentTypeError(f"must be an integer {bound}, got {value}")
        return value

    return _named(parse, "integer")


def number_in(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Callable[[str], float]:
    """A finite number in the interval [low, high] (open at either end on request); nan and inf refused."""
    if math.isinf(high):
        interval = f"{'>' if low_open else '>='} {low:g}"
    else:
        interval = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number {interval}, got {text!r}")
        if value < low or value > high or (low_open and value == low) or (high_open and value == high):
            raise argparse.ArgumentTypeError(f"must be {interval}, got {value:g}")
        return value

    return _named(parse, "number")


positive_int = int_in(1)
non_negative_int = int_in(0)
seed = int_in(0, MAX_SEED)
threads = int_in(1, 1024)


def text(value: str) -> str:
    """Text typed on the command line: valid UTF-8 (argv bytes that are not arrive as surrogates), no NUL."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError("is not valid UTF-8 text; re-type it in a UTF-8 terminal") from None
    if "\0" in value:
        raise argparse.ArgumentTypeError("contains a NUL character")
    return value


def _folder_of(path: Path) -> Path:
    return path.parent if str(path.parent) else Path(".")


def output_file(*suffixes: str, stdout: bool = False) -> Callable[[str], Path]:
    """A file to write: its folder exists and is writable, it is not a folder; optionally one of `suffixes`.

    With `stdout`, '-' is accepted and means standard output (returned as Path('-')).
    """

    def parse(value: str) -> Path:
        path = Path(value)
        if stdout and value == "-":
            return path
        if not value:
            raise argparse.ArgumentTypeError("needs a file name")
        if path.is_dir():
            example = path / ("out" + (suffixes[0] if suffixes else ".json"))
            raise argparse.ArgumentTypeError(f"{value} is a folder; give a file name (e.g. {example})")
        if suffixes and path.suffix.lower() not in suffixes:
            raise argparse.ArgumentTypeError(f"{value} must end with {' or '.join(suffixes)}")
        folder = _folder_of(path)
        if not folder.is_dir():
            raise argparse.ArgumentTypeError(f"cannot write {value}: folder {folder} does not exist; create it first")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise argparse.ArgumentTypeError(f"cannot write {value}: folder {folder} is not writable")
        return path

    return _named(parse, "file")


def output_folder(value: str) -> Path:
    """A folder to write into (created with its parents): not an existing file, nor under one; writable."""
    path = Path(value)
    if not value:
        raise argparse.ArgumentTypeError("needs a folder name")
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{value} exists and is not a folder")
    existing = path
    while not existing.exists():
        existing = _folder_of(existing)
        if existing == existing.parent:
            break
    if existing.exists() and not existing.is_dir():
        raise argparse.ArgumentTypeError(f"cannot create {value}: {existing} is a file")
    if existing.is_dir() and not os.access(existing, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write {value}: folder {existing} is not writable")
    return path


output_folder.__name__ = "folder"


def read_text(path: Path, what: str, fix: str, error: type[GazeError]) -> str:
    """The UTF-8 text of `path`; `error` naming the file, the problem and `fix` otherwise."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{what} {path} is not valid UTF-8 text (byte {exc.start}); {fix}") from exc
    except OSError as exc:
        raise error(f"cannot read {what} {path} ({exc.strerror or exc}); {fix}") from exc


def check_checkpoint_fits(checkpoint: Path, error: type[GazeError]) -> None:
    """Refuse a checkpoint whose config.json sizes need more memory than this machine has, before loading it."""
    import json

    try:
        config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # missing or unreadable: the checkpoint loader says so with its own message
    if isinstance(config, dict):
        check_weights_fit(config, checkpoint / "config.json", error)


#: The extra that installs each optional top-level package.
EXTRAS = {"torch": "torch", "transformers": "torch", "onnx": "torch", "onnxscript": "torch", "optimum": "torch",
          "onnxruntime": "runtime", "matplotlib": "runtime", "fastapi": "serve", "uvicorn": "serve",
          "starlette": "serve", "prometheus_client": "serve", "av": "video"}


def require(command: str, modules: Iterable[str]) -> None:
    """Import `modules` now; a missing one -> MissingExtraError naming the extra to install.

    Only a ModuleNotFoundError for that very package counts as missing: a package that is installed
    but fails to import is reported as broken, and an interrupt during the import (also when a
    package turned it into an ImportError) propagates as the KeyboardInterrupt it is.
    """
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            interrupt = interrupt_in_chain(exc)
            if interrupt is not None:
                raise interrupt from None
            extra = EXTRAS.get(name.split(".")[0], "torch")
            install = f"pip install 'gaze-edge[{extra}]'"
            if isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] == name.split(".")[0]:
                raise MissingExtraError(f"`gaze {command}` needs {name}, which is not installed here: "
                                        f"{install}") from exc
            raise MissingExtraError(f"`gaze {command}` needs {name}, which is installed but cannot be imported "
                                    f"({exc}); reinstall it: {install}") from exc


def print_error(message: str) -> None:
    """One line on stderr: newlines in a message are folded."""
    print("gaze: error: " + " ".join(str(message).split()), file=sys.stderr, flush=True)
