"""Writing outputs so that a failure, Ctrl-C, SIGTERM or SIGHUP never leaves a half-written one.

Export, quantize and calibrate build their output beside it (a `.OUT.partial-*` folder, or a
temp file) and move it into place with os.replace only when complete; every error and every
interrupt removes the partial output. `signals_interrupt()` makes SIGTERM and SIGHUP raise
`Interrupted` (a KeyboardInterrupt) in the main thread, so they run the very cleanup Ctrl-C
runs; `gaze_edge.cli.main` installs it for every command. While a partial output is removed,
or a finished one swapped into place, a further signal is held until the step is done.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType, TracebackType

from .errors import GazeError

#: The signals that end a command; each raises into the same cleanup as Ctrl-C.
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived: raised like Ctrl-C's KeyboardInterrupt, so every cleanup handles all three."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def signal_number(exc: KeyboardInterrupt) -> int:
    """The signal behind an interrupt: SIGINT for a plain KeyboardInterrupt."""
    return exc.signum if isinstance(exc, Interrupted) else int(signal.SIGINT)


class _Hold:
    """Depth of the sections during which signals are held, and the signal that arrived meanwhile.

    `raised`: the last signal the handler raised. Python drops an exception raised inside a
    finalizer or weakref callback (it only prints "Exception ignored in ..."), so a signal can be
    swallowed; the commit points (`move_folder_into_place`, `replace_files`) raise it again instead
    of committing an output the user asked to stop.
    """

    depth = 0
    pending: int | None = None
    raised: int | None = None


def _interrupt(signum: int) -> KeyboardInterrupt:
    return KeyboardInterrupt() if signum == signal.SIGINT else Interrupted(signum)


def _handler(signum: int, frame: FrameType | None) -> None:
    if _Hold.depth:
        _Hold.pending = _Hold.pending or signum
        return
    _Hold.raised = signum
    raise _interrupt(signum)


def _raise_if_swallowed() -> None:
    """Before committing an output: a signal raised earlier that never ended the command was swallowed."""
    if _Hold.raised is not None:
        raise _interrupt(_Hold.raised)


def _quiet_unraisable(info: sys.UnraisableHookArgs) -> None:
    """Do not print a traceback for our own interrupt dropped in a finalizer (it is re-raised at commit)."""
    if isinstance(info.exc_value, KeyboardInterrupt):
        return
    sys.__unraisablehook__(info)


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """While inside, SIGTERM and SIGHUP raise `Interrupted` as SIGINT raises KeyboardInterrupt.

    Only in the main thread (Python delivers signals there); a signal set to be ignored (SIGHUP
    under nohup, SIGINT in a background job) stays ignored; the previous handlers come back on exit.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    hook, sys.unraisablehook = sys.unraisablehook, _quiet_unraisable
    _Hold.raised = None
    for signum in SIGNALS:
        current = signal.getsignal(signum)
        if current is signal.SIG_IGN or (signum == signal.SIGINT and current is not signal.default_int_handler):
            continue
        previous[signum] = current
        signal.signal(signum, _handler)
    try:
        yield
    finally:
        for signum, current in previous.items():
            signal.signal(signum, current)
        sys.unraisablehook = hook
        _Hold.raised = None


class held_signals(contextlib.AbstractContextManager["held_signals"]):
    """A section no signal (of `signals_interrupt`) cuts in two: one that arrives is raised at its end.

    With `deliver=False` (cleanup while an error already propagates) the held signal is dropped:
    the command is ending anyway.
    """

    def __init__(self, deliver: bool = True) -> None:
        self.deliver = deliver

    def __enter__(self) -> held_signals:
        _Hold.depth += 1
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        _Hold.depth -= 1
        if _Hold.depth:
            return
        pending, _Hold.pending = _Hold.pending, None
        if pending is not None and self.deliver and exc_type is None:
            raise _interrupt(pending)


def current_umask() -> int:
    """The process umask (read from /proc where possible: setting it to read it is not thread-safe)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_new_folder(out: Path, force: bool, error: type[GazeError]) -> None:
    """`out` can be created (or, with `force`, replaced) as a folder; else `error` says why and what to do."""
    if out.exists() and not force:
        raise error(f"{out} already exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise error(f"{out} exists and is not a folder; remove it first")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise error(f"cannot write {out}: folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise error(f"cannot write {out}: folder {parent} is not writable")


def remove_partial(path: Path) -> None:
    """Remove a partial output folder or file; a signal arriving meanwhile does not stop the removal."""
    with held_signals(deliver=False):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()


@contextlib.contextmanager
def partial_folder(out: Path, error: type[GazeError]) -> Iterator[Path]:
    """A new folder `.OUT.partial-*` beside `out`, removed if the block raises anything, interrupts included."""
    parent = out.parent if str(out.parent) else Path(".")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=parent))
    except OSError as exc:
        raise error(f"cannot write beside {out}: {exc}") from exc
    try:
        yield tmp
    except BaseException:
        remove_partial(tmp)
        raise


def move_folder_into_place(tmp: Path, out: Path, error: type[GazeError], what: str) -> None:
    """os.replace a finished folder `tmp` (beside `out`) into `out`; an old `out` is set aside, then removed.

    The folder gets the mode a new folder gets (0777 less the umask; tempfile makes it 0700). If the
    final rename fails, the old folder is put back and `error` names `what` could not be moved. No
    signal lands between the two renames: one that arrives is raised once the new folder is in place.
    """
    os.chmod(tmp, 0o777 & ~current_umask())
    _raise_if_swallowed()
    with held_signals():
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
    """Replace one file atomically: a temp file in the same folder, fsync, rename; the temp file never stays.

    The new file keeps the old one's permission bits (a new file: 0666 less the umask).
    """
    replace_files([(path, data)])


def replace_files(files: Sequence[tuple[Path, bytes]]) -> None:
    """Replace several files as one step: every temp file written and fsynced first, then all renamed.

    A write that fails (disk full) changes none of them; the renames (same folder each: no new
    space needed) are one `held_signals` section, so an interrupt lands before the first or after
    the last. No temp file stays. Each file keeps its permission bits (a new file: 0666 less the umask).
    """
    temps: list[Path] = []
    try:
        for path, data in files:
            try:
                mode = path.stat().st_mode & 0o777
            except OSError:
                mode = 0o666 & ~current_umask()
            with held_signals():  # the temp file is known to the cleanup before an interrupt can land
                fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
                temps.append(Path(name))
                out = os.fdopen(fd, "wb")
            with out as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(name, mode)
        _raise_if_swallowed()
        with held_signals():
            for temp, (path, _) in zip(temps, files, strict=True):
                os.replace(temp, path)
    except BaseException:
        for temp in temps:
            remove_partial(temp)  # already renamed ones are gone: nothing to remove
        raise
