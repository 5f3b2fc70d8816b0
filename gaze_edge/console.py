"""What every `gaze` command shares on the console: verbosity (-v/-q), progress on stderr, --help defaults,
renamed flags, and `--json FILE|-` output (docs/CLI.md). Standard library only.

- **Verbosity.** `gaze_edge.cli.main` sets it from `-q` (0: results and errors only), the default
  (1: progress lines) and `-v` (2: details as well). `progress()` and `detail()` print to
  **stderr**, so stdout carries only results (text, tables, JSON) and can be piped.
- **--help** shows every default (`HelpFormatter`, an ArgumentDefaultsHelpFormatter that leaves out
  defaults that say nothing: None, False, empty lists, or a help text that already names its default).
- **Renamed flags** (`add_renamed`): the old spelling still works, hidden from --help, with a note
  on stderr naming the new one.
- **`--json [FILE|-]`** (`add_json_flag`, `write_json`): the machine-readable result; to FILE (written
  atomically) in addition to the text, or with `-` (or no value) to stdout *instead of* the text.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

#: 0: -q (results and errors only), 1: default (progress), 2+: -v (details).
_verbosity = 1
#: Notes found while parsing (a renamed flag), printed once the verbosity is known.
_pending: list[str] = []


def set_verbosity(level: int) -> None:
    """Set the level (gaze_edge.cli.main does, from -v/-q) and print the notes parsing left."""
    global _verbosity
    _verbosity = max(0, int(level))
    while _pending:
        progress(_pending.pop(0))


def verbosity() -> int:
    return _verbosity


def progress(message: str) -> None:
    """A progress line on stderr (hidden by -q)."""
    if _verbosity >= 1:
        print(message, file=sys.stderr, flush=True)


def detail(message: str) -> None:
    """A detail line on stderr (shown with -v)."""
    if _verbosity >= 2:
        print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ --help


def _shown_default(action: argparse.Action) -> str | None:
    default = action.default
    if (default is None or default is argparse.SUPPRESS or default is False or default == [] or default == ()
            or isinstance(action, (argparse._StoreConstAction, argparse._CountAction, argparse._HelpAction,
                                   argparse._VersionAction, argparse._StoreTrueAction,
                                   argparse._StoreFalseAction))
            or not action.option_strings):
        return None
    if isinstance(default, (list, tuple)):
        return ",".join(str(v) for v in default)
    return str(default)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown after each option's help (also for options without a help text)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = _shown_default(action)
        if shown is None or "default" in text.lower():
            return text
        return (text + " " if text else "") + f"(default: {shown.replace('%', '%%')})"

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and _shown_default(action) is not None:
            action = copy.copy(action)
            action.help = " "  # non-empty, so that argparse asks _get_help_string for the default
        return super()._format_action(action)


class RawHelpFormatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """HelpFormatter, with the description kept as written (line breaks of command lists)."""


def use_help_formatter(parser: argparse.ArgumentParser) -> None:
    """Give a parser built anywhere the formatter that shows defaults (keeping a raw description raw)."""
    raw = issubclass(parser.formatter_class, argparse.RawDescriptionHelpFormatter)  # type: ignore[arg-type]
    parser.formatter_class = RawHelpFormatter if raw else HelpFormatter


def walk_parsers(parser: argparse.ArgumentParser) -> Iterable[argparse.ArgumentParser]:
    """The parser and every subcommand parser below it."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):  # aliases map to the same parser
                yield from walk_parsers(sub)


def add_verbosity_flags(parser: argparse.ArgumentParser, top: bool) -> None:
    """-v/--verbose and -q/--quiet; on a subcommand they default to SUPPRESS so `gaze -v CMD` is kept."""
    default: Any = 0 if top else argparse.SUPPRESS
    group = parser.add_argument_group("output")
    group.add_argument("-v", "--verbose", action="count", default=default,
                       help="more detail on stderr (repeatable)")
    group.add_argument("-q", "--quiet", action="count", default=default,
                       help="no progress on stderr: results and errors only")


# ------------------------------------------------------------------------------------- renamed flags


class _Renamed(argparse.Action):
    def __init__(self, option_strings: list[str], dest: str, new: str = "", **kwargs: Any) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.new = new

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        _pending.append(f"{parser.prog}: note: {option_string} is now {self.new} (the old name still works for now)")
        setattr(namespace, self.dest, values)


def add_renamed(parser: argparse.ArgumentParser, old: str, new: str) -> None:
    """Accept `old` as a hidden spelling of the option `new` (same dest and checks), with a note on stderr."""
    target = next(a for a in parser._actions if new in a.option_strings)
    kwargs: dict[str, Any] = {"type": target.type} if target.type is not None else {}
    parser.add_argument(old, dest=target.dest, nargs=target.nargs, const=target.const, default=argparse.SUPPRESS,
                        help=argparse.SUPPRESS, action=_Renamed, new=new, **kwargs)


# --------------------------------------------------------------------------------------------- --json


def add_json_flag(parser: argparse.ArgumentParser, what: str, file_type: Callable[[str], Path]) -> None:
    """`--json [FILE|-]`: FILE also gets the result as JSON; '-' (or no value) prints it instead of the text."""
    parser.add_argument("--json", type=file_type, nargs="?", const=Path("-"), default=None, metavar="FILE|-",
                        help=f"{what} as JSON: to FILE besides the text, or to stdout instead of it ('-' or no value)")


def json_to_stdout(target: Path | str | None) -> bool:
    return target is not None and str(target) == "-"


def write_json(report: Any, target: Path | str | None) -> None:
    """Write `report` to `target` (atomically: temp file, fsync, rename) or, for '-', to stdout."""
    if target is None:
        return
    text = json.dumps(report, indent=2) + "\n"
    if json_to_stdout(target):
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    from .atomic import replace_file

    replace_file(Path(target), text.encode())
