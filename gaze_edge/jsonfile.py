"""Reading the project's small JSON files (configs, manifests) with errors that say how to fix them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import GazeError


def read_json_object(path: Path, error: type[GazeError], fix: str) -> dict[str, Any]:
    """The JSON object in `path`; `error(...)` naming the file and `fix` when it is unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))  # JSON is UTF-8 (RFC 8259), whatever the locale
    except UnicodeDecodeError as exc:
        raise error(f"{path} is not valid JSON: not UTF-8 text (byte {exc.start}); {fix}") from exc
    except OSError as exc:
        raise error(f"cannot read {path} ({exc.strerror or exc}); {fix}") from exc
    except json.JSONDecodeError as exc:
        raise error(f"{path} is not valid JSON ({exc}); {fix}") from exc
    if not isinstance(data, dict):
        raise error(f"{path} must hold a JSON object; {fix}")
    return data
