"""Writing outputs so that a failure or Ctrl-C never leaves a half-written one (export, quantize, calibrate)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from .errors import GazeError


def check_new_folder(out: Path, force: bool, error: type[GazeError]) -> None:
    """`out` can be created (or, with `force`, replaced) as a folder; else `error` says why and what to do."""
    if out.exists() and not force:
        raise error(f"{out} already exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise error(f"{out} exists and is not a folder; remove it first")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise error(f"cannot write {out}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise error(f"cannot write {out}: folder {parent} is not writable")


def move_folder_into_place(tmp: Path, out: Path, error: type[GazeError], what: str) -> None:
    """os.replace a finished folder `tmp` (beside `out`) into `out`; an old `out` is set aside, then removed.

    If the final rename fails, the old folder is put back and `error` names `what` could not be moved.
    """
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError as exc:
        if old is not None:
            os.replace(old, out)
        raise error(f"cannot move {what} into {out}: {exc}") from exc
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def replace_file(path: Path, data: bytes) -> None:
    """Replace one file atomically: a temp file in the same folder, fsync, rename; the temp file never stays."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
