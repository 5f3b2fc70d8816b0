"""Procedural scenes: one to four coloured shapes of a few sizes on a 4x4 grid, with captions.

The captions come from a small grammar, one clause per object in row-major order:
``a red circle at top left and a blue square at upper center left``. A caption's *facts* are the
set of (colour, shape, position) triples it names; captions are scored on exact fact
sets. Numpy only (no torch), so the runtime and calibration can use it too.

Held-out split: a scene whose fact set hashes into bucket 0 of 10 is held out; the
training sampler rejects such scenes, so evaluation never sees a trained-on caption.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (160, 60, 210),
    "white": (235, 235, 235),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = {"small": 0.6, "large": 0.9}  # fraction of the cell side
ROW_WORDS = ("top", "upper", "lower", "bottom")
COL_WORDS = ("left", "center left", "center right", "right")  # every old word stays in the vocabulary
GRID = 4
MAX_OBJECTS = 4
HELD_OUT_BUCKETS = 10

Fact = tuple[str, str, str]


def position_name(row: int, col: int) -> str:
    """Row word then column words: ``top left``, ``upper center left``, ... ``bottom right``."""
    return f"{ROW_WORDS[row]} {COL_WORDS[col]}"


POSITIONS = tuple(position_name(r, c) for r in range(GRID) for c in range(GRID))
CAPTION_WORDS = sorted(
    {"a", "at", "and"} | set(COLOURS) | set(SHAPES) | set(ROW_WORDS) | {w for c in COL_WORDS for w in c.split()}
)


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    size: str
    row: int
    col: int

    @property
    def fact(self) -> Fact:
        return (self.colour, self.shape, position_name(self.row, self.col))


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]

    @property
    def facts(self) -> frozenset[Fact]:
        return frozenset(o.fact for o in self.objects)

    def caption(self) -> str:
        ordered = sorted(self.objects, key=lambda o: (o.row, o.col))
        return " and ".join(f"a {o.colour} {o.shape} at {position_name(o.row, o.col)}" for o in ordered)

    def is_held_out(self) -> bool:
        key = "|".join(sorted(",".join(f) for f in self.facts)).encode()
        return int(hashlib.sha256(key).hexdigest(), 16) % HELD_OUT_BUCKETS == 0


def sample_scene(rng: np.random.Generator, held_out: bool = False) -> Scene:
    """A random scene from the training split, or from the held-out split."""
    while True:
        count = int(rng.integers(1, MAX_OBJECTS + 1))
        cells = rng.choice(GRID * GRID, size=count, replace=False)
        objects = tuple(
            SceneObject(
                colour=str(rng.choice(list(COLOURS))),
                shape=str(rng.choice(SHAPES)),
                size=str(rng.choice(list(SIZES))),
                row=int(c) // GRID,
                col=int(c) % GRID,
            )
            for c in cells
        )
        scene = Scene(objects)
        if scene.is_held_out() == held_out:
            return scene


def _shape_mask(shape: str, size: int) -> np.ndarray:
    """A size x size boolean stencil of the shape."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    c = size / 2.0
    if shape == "circle":
        return np.asarray((yy - c) ** 2 + (xx - c) ** 2 <= c * c, dtype=bool)
    if shape == "square":
        return np.ones((size, size), dtype=bool)
    if shape == "triangle":
        # apex at the top, base at the bottom
        return np.asarray(np.abs(xx - c) <= (yy / size) * c, dtype=bool)
    if shape == "cross":
        arm = max(1.0, size / 6.0)
        return np.asarray((np.abs(xx - c) <= arm) | (np.abs(yy - c) <= arm), dtype=bool)
    raise ValueError(f"unknown shape {shape!r}")


def render(
    scene: Scene, image_size: int, rng: np.random.Generator | None = None
) -> tuple[np.ndarray, list[np.ndarray]]:
    """RGB uint8 image [H, W, 3] and one boolean pixel mask per object (scene order).

    Each object sits inside its grid cell, with a small random jitter when ``rng`` is
    given, over a dark background with mild noise.
    """
    cell = image_size // GRID
    rng = rng if rng is not None else np.random.default_rng(0)
    image = np.full((image_size, image_size, 3), 24.0)
    image += rng.normal(0.0, 6.0, size=image.shape)
    masks = []
    for obj in scene.objects:
        side = max(3, int(round(cell * SIZES[obj.size])))
        slack = cell - side
        dy = int(rng.integers(0, slack + 1)) if slack > 0 else 0
        dx = int(rng.integers(0, slack + 1)) if slack > 0 else 0
        y0, x0 = obj.row * cell + dy, obj.col * cell + dx
        stencil = _shape_mask(obj.shape, side)
        mask = np.zeros((image_size, image_size), dtype=bool)
        mask[y0 : y0 + side, x0 : x0 + side] = stencil
        image[mask] = COLOURS[obj.colour]
        masks.append(mask)
    return np.clip(image, 0, 255).astype(np.uint8), masks


def parse_caption(text: str) -> frozenset[Fact] | None:
    """The fact set of a caption, or None when it does not follow the grammar."""
    facts = set()
    for clause in text.strip().split(" and "):
        words = clause.split()
        if len(words) < 5 or words[0] != "a" or words[3] != "at":
            return None
        colour, shape, position = words[1], words[2], " ".join(words[4:])
        if colour not in COLOURS or shape not in SHAPES or position not in POSITIONS:
            return None
        facts.add((colour, shape, position))
    return frozenset(facts)
