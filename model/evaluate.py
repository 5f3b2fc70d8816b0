"""Held-out evaluation of a scene captioner: exact-fact accuracy and where the model looks.

    python -m gaze_edge.model.evaluate checkpoints/gaze-tiny [--scenes 500] [--json FILE]

- accuracy: fraction of greedy captions whose (colour, shape, position) fact set equals
  the scene's exactly (also per number of objects in the scene);
- gaze coverage: for each generated colour or shape word that names an object of the
  scene, the fraction of (layer, KV head) selections that include a region the object
  touches, against the rate a uniformly random choice of as many regions would give.
"""

from __future__ import annotations

import argparse
import json
import math
import textwrap
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import cast

import numpy as np
import torch

from gaze_edge.reference import region_index_map

from . import scenes
from .checkpoint import load_checkpoint
from .configuration import GazeConfig
from .modeling import GazeForConditionalGeneration
from .processing import GazeProcessor


@dataclass
class EvalResult:
    scenes: int
    accuracy: float
    top_k: int | list[int] | None = None  # regions kept per gaze query (config.gaze_top_k)
    regions: int | None = None  # regions per image
    accuracy_by_objects: dict[str, float] = field(default_factory=dict)  # objects in the scene -> accuracy
    gaze_coverage: float | None = None  # selected regions touch the named object
    random_coverage: float | None = None  # same for a random choice of as many regions
    named_words: int = 0
    coverage_per_layer: list[float] = field(default_factory=list)
    examples: list[dict[str, str]] = field(default_factory=list)


def object_regions(mask: np.ndarray, config: GazeConfig) -> set[int]:
    """Regions whose tokens (patches) contain any pixel of the object."""
    grid, patch = config.grid_size, config.patch_size
    touched = mask.reshape(grid, patch, grid, patch).any(axis=(1, 3)).reshape(-1)
    region_of = region_index_map(grid, grid, *config.region_size)
    return {int(r) for r in region_of[touched]}


def random_hit_rate(num_regions: int, k: int, touched: int) -> float:
    """P(a uniform random set of k of R regions includes one of `touched` regions)."""
    k = min(k, num_regions)
    return 1.0 - math.comb(num_regions - touched, k) / math.comb(num_regions, k)


def named_object_words(words: list[str], scene: scenes.Scene) -> list[tuple[int, int]]:
    """(word index, object index) for colour/shape words of clauses that name a scene object."""
    found = []
    start = 0
    while start < len(words):
        end = words.index("and", start) if "and" in words[start:] else len(words)
        clause = words[start:end]
        fact = scenes.parse_caption(" ".join(clause))
        if fact is not None and len(fact) == 1:
            (one,) = tuple(fact)
            for obj_index, obj in enumerate(scene.objects):
                if obj.fact == one:
                    found += [(start + 1, obj_index), (start + 2, obj_index)]
        start = end + 1
    return found


def evaluate(
    model: GazeForConditionalGeneration,
    processor: GazeProcessor,
    num_scenes: int = 500,
    seed: int = 1234,
    batch: int = 100,
    gaze_top_k: int | None = None,
) -> EvalResult:
    config = cast(GazeConfig, model.config)
    rng = np.random.default_rng(seed)
    correct = 0
    by_count: dict[int, list[bool]] = {}
    hits: list[float] = []
    per_layer: dict[int, list[float]] = {}
    chance: list[float] = []
    examples: list[dict[str, str]] = []
    prompt_ids = processor.encode(processor.prompt())
    eos = processor.eos_token_id
    for first in range(0, num_scenes, batch):
        count = min(batch, num_scenes - first)
        sample = [scenes.sample_scene(rng, held_out=True) for _ in range(count)]
        rendered = [scenes.render(s, config.image_size, rng) for s in sample]
        pixels = torch.from_numpy(processor.preprocess([r[0] for r in rendered]))
        ids = torch.tensor([prompt_ids] * count)
        out = model.generate(ids, pixel_values=pixels, max_new_tokens=40, gaze_top_k=gaze_top_k)
        for b, scene in enumerate(sample):
            tokens = [int(t) for t in out.sequences[b]]
            if eos in tokens:
                tokens = tokens[: tokens.index(eos)]
            text = processor.decode(tokens)
            ok = scenes.parse_caption(text) == scene.facts
            correct += ok
            by_count.setdefault(len(scene.objects), []).append(ok)
            if len(examples) < 8:
                examples.append({"truth": scene.caption(), "generated": text, "correct": str(ok)})
            words = [processor.decode([t]) for t in tokens]
            for word_index, obj_index in named_object_words(words, scene):
                touched = object_regions(rendered[b][1][obj_index], config)
                layer_hits = []
                for layer, selected in enumerate(out.selections[word_index - 1]):
                    if selected is None:
                        continue
                    sel = selected[b, :, 0]  # [Hkv, R]
                    if int(sel[0].sum()) >= sel.shape[-1]:
                        continue  # dense selection: nothing to measure
                    picked = sel[:, sorted(touched)].any(-1).float()
                    layer_hits.append(float(picked.mean()))
                    per_layer.setdefault(layer, []).append(float(picked.mean()))
                    k = int(sel[0].sum())
                    chance.append(random_hit_rate(sel.shape[-1], k, len(touched)))
                if layer_hits:
                    hits.append(float(np.mean(layer_hits)))
    return EvalResult(
        scenes=num_scenes,
        accuracy=correct / num_scenes,
        top_k=config.gaze_top_k if gaze_top_k is None else gaze_top_k,
        regions=config.regions_per_image,
        accuracy_by_objects={str(n): float(np.mean(v)) for n, v in sorted(by_count.items())},
        gaze_coverage=float(np.mean(hits)) if hits else None,
        random_coverage=float(np.mean(chance)) if chance else None,
        named_words=len(hits),
        coverage_per_layer=[float(np.mean(per_layer[i])) for i in sorted(per_layer)],
        examples=examples,
    )


def draw_gaze_examples(
    model: GazeForConditionalGeneration, processor: GazeProcessor, path: Path, count: int = 4, seed: int = 99
) -> None:
    """A PNG: each held-out scene, then for each generated shape word the regions selected
    while producing it (share of layers x KV heads that picked each region)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config = cast(GazeConfig, model.config)
    rng = np.random.default_rng(seed)
    sample = [scenes.sample_scene(rng, held_out=True) for _ in range(count)]
    images = [scenes.render(s, config.image_size, rng)[0] for s in sample]
    ids = torch.tensor([processor.encode(processor.prompt())] * count)
    out = model.generate(ids, pixel_values=torch.from_numpy(processor.preprocess(images)), max_new_tokens=40)
    grid = config.grid_size
    region_of = region_index_map(grid, grid, *config.region_size).reshape(grid, grid)
    columns = 1 + scenes.MAX_OBJECTS  # the scene, then one gaze map per named shape
    fig, axes = plt.subplots(count, columns, figsize=(2.5 * columns, 3.1 * count), squeeze=False)
    for b in range(count):
        tokens = [int(t) for t in out.sequences[b] if int(t) != processor.eos_token_id]
        words = [processor.decode([t]) for t in tokens]
        axes[b, 0].imshow(images[b])
        axes[b, 0].set_title(textwrap.fill(processor.decode(tokens), 40), fontsize=7)
        shape_steps = [i for i, w in enumerate(words) if w in scenes.SHAPES and i > 0]
        for col in range(1, columns):
            ax = axes[b, col]
            ax.axis("off")
            if col - 1 >= len(shape_steps):
                continue
            step = shape_steps[col - 1]
            picked = torch.stack([s[b, :, 0] for s in out.selections[step - 1] if s is not None]).float()
            share = picked.mean(dim=(0, 1)).numpy()  # [R]
            heat = np.kron(share[region_of], np.ones((config.patch_size, config.patch_size)))
            ax.imshow(images[b])
            ax.imshow(heat, cmap="magma", alpha=0.55, vmin=0, vmax=1)
            ax.set_title(f"gaze for '{' '.join(words[max(0, step - 2) : step + 1])}'", fontsize=8)
        axes[b, 0].axis("off")
    fig.suptitle(f"where the model looks: top_k {config.gaze_top_k} of {config.regions_per_image} regions "
                 "(brightness = share of layers x KV heads selecting the region)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--scenes", type=int, default=500)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--figure", type=Path, help="draw gaze maps of a few held-out scenes to this PNG")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, processor = load_checkpoint(args.checkpoint)
    result = evaluate(model, processor, args.scenes, args.seed)
    print(f"{args.checkpoint}: top_k {model.config.gaze_top_k} of {model.config.regions_per_image} regions")
    print(f"  held-out exact-fact accuracy: {result.accuracy:.1%} over {result.scenes} scenes")
    print("  by objects in the scene: " + ", ".join(f"{n}: {a:.1%}" for n, a in result.accuracy_by_objects.items()))
    if result.gaze_coverage is not None:
        print(f"  selected regions cover the named object: {result.gaze_coverage:.1%} "
              f"(random choice of as many regions: {result.random_coverage:.1%}, {result.named_words} words)")
        print("  per layer: " + ", ".join(f"{i}: {c:.1%}" for i, c in enumerate(result.coverage_per_layer)))
    for ex in result.examples[:4]:
        print(f"  truth: {ex['truth']}\n  model: {ex['generated']}")
    if args.json:
        args.json.write_text(json.dumps(asdict(result), indent=1) + "\n")
    if args.figure:
        draw_gaze_examples(model, processor, args.figure)
        print(f"  gaze maps drawn to {args.figure}")


if __name__ == "__main__":
    main()
