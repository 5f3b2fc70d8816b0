"""Calibration data: a folder of images (+ optional true captions) and the prompts to pair them with.

Both `gaze calibrate` (gaze budget) and `gaze quantize` (INT8) read calibration images
the same way: every PNG/JPEG/BMP/WebP file directly in the folder, in name order, each
fully decoded up front by the runtime's safe loader (runtime/images.py), so a corrupt
file is named before minutes of work start, not in the middle of them. A folder
written by `gaze scenes` also has `truth.txt` (name<TAB>caption); with it, a report can
score caption accuracy, not only agreement.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from gaze_edge.errors import InputError
from gaze_edge.runtime.images import load_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
TRUTH_FILE = "truth.txt"


@dataclass
class ImageSet:
    """Decoded RGB images of one folder, their file names, and true captions where the folder has them."""

    folder: Path
    names: list[str]
    images: list[Image.Image]
    truth: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.names)

    @property
    def has_truth(self) -> bool:
        return bool(self.truth) and all(n in self.truth for n in self.names)


def load_image_set(folder: str | Path, limit: int | None = None, what: str = "calibration") -> ImageSet:
    """Read every image of `folder` (sorted by name, first `limit`); InputError names what is wrong."""
    folder = Path(folder)
    if not folder.exists():
        raise InputError(f"{what} folder {folder} does not exist; point --images at a folder of PNG/JPEG files "
                         "(`gaze scenes -o DIR --count 64` writes generated ones)")
    if not folder.is_dir():
        raise InputError(f"{what} images must be a folder, {folder} is a file")
    try:
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    except OSError as exc:
        raise InputError(f"cannot list {what} folder {folder} ({exc}); check its permissions") from exc
    if not files:
        raise InputError(f"{what} folder {folder} has no images ({', '.join(IMAGE_SUFFIXES)}); add some, e.g. "
                         f"`gaze scenes -o {folder} --count 64`")
    if limit is not None:
        if limit < 1:
            raise InputError(f"the number of {what} images must be >= 1, got {limit}")
        files = files[:limit]
    images = [load_image(p) for p in files]  # InputError names an unreadable or corrupt file
    return ImageSet(folder, [p.name for p in files], images, _read_truth(folder))


def _read_truth(folder: Path) -> dict[str, str]:
    path = folder / TRUTH_FILE
    if not path.is_file():
        return {}
    truth: dict[str, str] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {path} ({exc}); it should hold name<TAB>caption lines") from exc
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        name, sep, caption = line.partition("\t")
        if not sep:
            raise InputError(f"{path} line {number} is not name<TAB>caption: {line[:60]!r}")
        truth[name.strip()] = caption.strip()
    return truth


def read_prompts(path: str | Path | None) -> list[str | None]:
    """Prompts to pair with the images, one per line (cycled); None: the export's default prompt."""
    if path is None:
        return [None]
    path = Path(path)
    try:
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read prompts file {path} ({exc}); it should hold one prompt per line") from exc
    if not prompts:
        raise InputError(f"prompts file {path} is empty; write one prompt per line")
    return list(prompts)


def caption_matches(generated: str, truth: str) -> bool:
    """A caption is right when it states exactly the truth's facts (scene grammar), else the same words."""
    from gaze_edge.model.scenes import parse_caption

    facts = parse_caption(truth)
    if facts is not None:
        return parse_caption(generated) == facts
    return generated.split() == truth.split()


def accuracy(texts: list[str], names: list[str], truth: dict[str, str]) -> float:
    """Fraction of captions that match the folder's truth.txt."""
    if not names:
        return float("nan")
    return sum(caption_matches(t, truth[n]) for t, n in zip(texts, names, strict=True)) / len(names)
