"""Calibration data: a folder of images (+ optional true captions) and the prompts to pair them with.

Both `gaze calibrate` (gaze budget) and `gaze quantize` (INT8) read calibration images
the same way: every PNG/JPEG/BMP/WebP file directly in the folder, in name order. First
every file's header is read (no pixels decoded) and the folder's total pixel count is held
against a budget (`--max-total-pixels`, default 2 G pixels): a folder of small, highly
compressed huge images is refused before any is decoded. Then the images are decoded one
at a time by the runtime's safe loader (runtime/images.py), so a corrupt file is named
before minutes of work start, and each is kept only at the model's input size: resized
exactly as GazeProcessor.preprocess would resize it (so preprocessing the kept image gives
the same array), the full-size decode dropped before the next file is read. Peak memory is
one full-size image plus N model-size ones, whatever the files' sizes. A folder written by
`gaze scenes` also has `truth.txt` (name<TAB>caption); with it, a report can score caption
accuracy, not only agreement.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from gaze_edge.cli_args import DEFAULT_MAX_TOTAL_PIXELS, read_text
from gaze_edge.errors import InputError
from gaze_edge.memory import gib, total_memory_bytes
from gaze_edge.runtime.images import MAX_IMAGE_PIXELS, load_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
TRUTH_FILE = "truth.txt"
__all__ = ["DEFAULT_MAX_TOTAL_PIXELS", "ImageSet", "accuracy", "load_image_set", "read_prompts"]


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


def load_image_set(folder: str | Path, limit: int | None = None, what: str = "calibration", *,
                   processor: Any = None, max_total_pixels: int = DEFAULT_MAX_TOTAL_PIXELS) -> ImageSet:
    """Read the images of `folder` (sorted by name, first `limit`); InputError names what is wrong.

    With `processor` (a GazeProcessor) each image is kept at its input size, resized as its
    `preprocess` resizes; without, at full size (tests, small sets). A folder whose files hold
    more than `max_total_pixels` pixels in all is refused before any image is decoded.
    """
    folder = Path(folder)
    if not folder.exists():
        flag = "--held-out" if what == "held-out" else "--calib"
        raise InputError(f"{what} folder {folder} does not exist; point {flag} at a folder of PNG/JPEG files "
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
    total = sum(image_pixels(p) for p in files)  # headers only: nothing decoded yet
    if total > max_total_pixels:
        raise InputError(f"{what} folder {folder}: its {len(files)} images hold {total:,} pixels in all, more than "
                         f"the budget of {max_total_pixels:,} (--max-total-pixels); use fewer or smaller images, or "
                         "raise --max-total-pixels")
    fit = _fitter(processor)
    if processor is not None:
        size = int(processor.image.image_size)
        kept, have = len(files) * size * size * 3, total_memory_bytes()
        if have is not None and kept > have // 2:
            raise InputError(f"{len(files)} {what} images at the model's {size} x {size} pixels need {gib(kept)}; "
                             f"this machine has {gib(have)}: use fewer images")
    images = []
    for path in files:
        image = load_image(path)  # InputError names an unreadable or corrupt file
        images.append(fit(image))
        del image  # the full-size decode goes before the next file is read
    return ImageSet(folder, [p.name for p in files], images, _read_truth(folder))


def image_pixels(path: Path) -> int:
    """Width x height from the file's header (nothing decoded); InputError from the safe loader if unreadable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
    except Exception:  # Pillow raises many types on a bad header; the loader names the problem
        load_image(path)
        raise InputError(f"image {path} cannot be read; re-save or replace it") from None
    if width * height > MAX_IMAGE_PIXELS:
        load_image(path)  # refuses it with the per-image limit's message
    return int(width * height)


def _fitter(processor: Any) -> Any:
    """image -> the image GazeProcessor.preprocess would turn into the model's input (same size, same filter)."""
    if processor is None:
        return lambda image: image
    from gaze_edge.model.processing import RESAMPLING

    size, resample = int(processor.image.image_size), RESAMPLING[processor.image.resample]

    def fit(image: Image.Image) -> Image.Image:
        return image if image.size == (size, size) else image.resize((size, size), resample)

    return fit


def _read_truth(folder: Path) -> dict[str, str]:
    path = folder / TRUTH_FILE
    if not path.is_file():
        return {}
    truth: dict[str, str] = {}
    lines = read_text(path, "truth file", "it should hold name<TAB>caption lines in UTF-8", InputError).splitlines()
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
    text = read_text(path, "prompts file", "it should hold one prompt per line in UTF-8", InputError)
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
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
