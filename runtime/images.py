"""Reading user images safely: not an image, truncated, or a decompression bomb -> InputError.

Preprocessing itself (resize, rescale, normalise) is GazeProcessor.preprocess, the same
code the model was trained with; this module only turns files (or bytes) into checked RGB
images, EXIF orientation applied as transformers' `load_image` does
(`PIL.ImageOps.exif_transpose`). Other sources (data: URIs, base64, arrays, video) are in
runtime/media.py, which decodes through `decode_image` here.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import IO

from PIL import Image, ImageOps, UnidentifiedImageError

from gaze_edge.errors import InputError

#: Largest image accepted (pixels). Pillow's own default guard is ~89 MP; a captioner that resizes
#: to a few hundred pixels has no use for more, and decoding more is how a bomb exhausts memory.
MAX_IMAGE_PIXELS = 64_000_000


def decode_image(data: str | Path | bytes | IO[bytes], label: str, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Open, fully decode, apply EXIF orientation and convert to RGB; InputError naming `label` otherwise."""
    source: str | Path | IO[bytes] = io.BytesIO(data) if isinstance(data, bytes) else data
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that; a warning is as bad as the error.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                img.load()  # decode now: a truncated file fails here, not later inside the model
                upright = ImageOps.exif_transpose(img)  # a copy, rotated/flipped as the EXIF tag says
                return upright.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(f"{label} is too large to decode safely ({exc}); the limit is {max_pixels} pixels: "
                         "resize it first") from exc
    except UnidentifiedImageError as exc:
        raise InputError(f"{label} is not an image Pillow can read (PNG, JPEG, ...)") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"{label} is truncated or corrupt ({exc}); re-save or replace it") from exc
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def load_image(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Open, fully decode and convert one image file to RGB (EXIF orientation applied); InputError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"image {path} does not exist or is not a file")
    return decode_image(path, str(path), max_pixels)
