"""Exceptions the CLI turns into one clear message and an exit code (docs/CLI.md).

A `GazeError` is a refusal: the command cannot run as given (an argument, an input file, an
export folder, a missing package) and nothing was done; `gaze` exits 2. A `RunError` is a
failure after the work started (a validation that did not pass, a model that produced
garbage); `gaze` exits 1.
"""

from __future__ import annotations


class GazeError(Exception):
    """Base of every error gaze-edge reports to a user: the message says what and what to do."""

    #: Exit status of `gaze` when this error ends a command.
    exit_code = 2


class RunError(GazeError):
    """The command started its work and failed (not a bad input): `gaze` exits 1."""

    exit_code = 1


class CheckpointError(GazeError):
    """A checkpoint folder is missing files, or its config or tensors are wrong."""


class InputError(GazeError):
    """A user input (image, prompt, option) cannot be used."""


class MissingExtraError(GazeError):
    """A package of an optional extra (`gaze-edge[torch]`, `gaze-edge[runtime]`) is not installed."""


def interrupt_in_chain(exc: BaseException) -> KeyboardInterrupt | None:
    """The KeyboardInterrupt (or SIGTERM/SIGHUP interrupt) that `exc` was raised from, if any.

    An interrupt that lands inside an import can come out as an ImportError (pybind11 and some
    packages turn whatever their module initialisation raised into "ImportError: initialization
    failed"), and a guarded import then reports a missing package. Walking __cause__ and
    __context__ finds the interrupt underneath.
    """
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, KeyboardInterrupt):
            return e
        todo += [e.__cause__, e.__context__]
    return None
