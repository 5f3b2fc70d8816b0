"""Gaze maps: for each generated word, the regions the model selected, drawn over the image (Pillow only).

A region's weight is the fraction of (layer, KV head) pairs that selected it when the word
was predicted; weight 0 leaves the image untouched, so the tinted cells are exactly the
selected regions. The first word is predicted by the last prompt token, a dense query
that reads every region: its panel is marked "dense".
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .folder import ModelShape

PANEL = 144  # display size of one image in a panel (pixels)
LABEL = 16
ROW_WIDTH = 6 * PANEL  # words wrap into rows of about this many pixels
RESAMPLE = Image.Resampling.NEAREST  # crisp tokens: the model's images are small


def region_weights(selection: list[np.ndarray], sequence: int = 0) -> np.ndarray:
    """[R] fraction of layers x KV heads that selected each region (selection: per layer [B, Hkv, R])."""
    stacked = np.stack([s[sequence] for s in selection])  # [L, Hkv, R]
    return np.asarray(stacked.reshape(-1, stacked.shape[-1]).mean(0))


def region_boxes(shape: ModelShape, size: int) -> list[tuple[int, int, int, int]]:
    """Pixel box (x0, y0, x1, y1) of each region of one image shown at size x size."""
    gh, gw = shape.grid
    rh, rw = shape.region_size
    per_token_y, per_token_x = size / gh, size / gw
    boxes = []
    for r0 in range(0, gh, rh):
        for c0 in range(0, gw, rw):
            boxes.append((round(c0 * per_token_x), round(r0 * per_token_y),
                          round(min(c0 + rw, gw) * per_token_x), round(min(r0 + rh, gh) * per_token_y)))
    return boxes


def words_per_row(num_images: int) -> int:
    return max(1, ROW_WIDTH // (PANEL * num_images))


def cell_origin(index: int, num_images: int) -> tuple[int, int]:
    """Top-left pixel of word `index`'s cell (its label above, its images below)."""
    per_row = words_per_row(num_images)
    return (index % per_row) * PANEL * num_images, (index // per_row) * (PANEL + LABEL)


def draw_gaze_map(images: Sequence[Image.Image], words: Sequence[str], weights: Sequence[np.ndarray | None],
                  shape: ModelShape, path: str | Path) -> None:
    """One cell per word, in reading order: the word, then each image with its selected regions tinted red."""
    views = [img.convert("RGB").resize((PANEL, PANEL), RESAMPLE) for img in images]
    boxes = region_boxes(shape, PANEL)
    rpi = shape.regions_per_image
    per_row = words_per_row(len(views))
    rows = -(-len(words) // per_row)
    canvas = Image.new("RGB", (PANEL * len(views) * min(per_row, len(words)), (PANEL + LABEL) * rows), "white")
    draw = ImageDraw.Draw(canvas)
    for index, (word, weight) in enumerate(zip(words, weights, strict=True)):
        left, top = cell_origin(index, len(views))
        draw.text((left + 2, top + 2), f"{word}" + ("  (dense)" if weight is None else ""), fill="black")
        for n, view in enumerate(views):
            panel = np.asarray(view, dtype=np.float32).copy()
            if weight is not None:
                for j, (x0, y0, x1, y1) in enumerate(boxes):
                    w = float(weight[n * rpi + j])
                    if w > 0:
                        alpha = 0.25 + 0.5 * w
                        panel[y0:y1, x0:x1] = (1 - alpha) * panel[y0:y1, x0:x1] + alpha * np.array([255, 0, 0])
            canvas.paste(Image.fromarray(panel.round().astype(np.uint8)), (left + n * PANEL, top + LABEL))
    canvas.save(path)
