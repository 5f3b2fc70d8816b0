"""Drive exported graphs with numpy + ONNX Runtime, and check them against the PyTorch model.

`validate_export` compares the torch-free runtime (gaze_edge.runtime: the one decode loop,
region-major static cache, ONNX Runtime backend) with `GazeForConditionalGeneration` on
held-out scenes and returns the validation report. `OnnxGazeGenerator` is a single-call
driver (lay out tokens, run decoder.onnx once) for graph-level tests of bare graph
folders; it has no generation loop of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from gaze_edge.reference import region_index_map
from gaze_edge.runtime.backend import OrtBackend
from gaze_edge.runtime.cache import SlotState
from gaze_edge.runtime.folder import ExportFolder
from gaze_edge.runtime.generate import GazeRuntime, Prompt
from gaze_edge.runtime.sampling import SamplingConfig

from .node import max_region_tokens

NP_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


@dataclass
class LayoutConfig:
    """What the runtime needs to lay tokens into slots (from the runtime config)."""

    image_token_id: int
    tokens_per_image: int
    regions_per_image: int
    grid_size: int
    region_size: tuple[int, int]
    eos_token_id: int
    pad_token_id: int
    suppress_token_ids: tuple[int, ...] = ()  # never generated (GazeConfig.never_generated_ids)
    context_token_ids: tuple[int, ...] = ()
    max_region_tokens: int = 1

    @classmethod
    def from_model_config(cls, config: Any) -> LayoutConfig:
        return cls(
            image_token_id=config.image_token_id,
            tokens_per_image=config.tokens_per_image,
            regions_per_image=config.regions_per_image,
            grid_size=config.grid_size,
            region_size=(int(config.region_size[0]), int(config.region_size[1])),
            eos_token_id=config.eos_token_id,
            pad_token_id=config.pad_token_id,
            suppress_token_ids=tuple(config.never_generated_ids),
            context_token_ids=tuple(config.context_token_ids),
            max_region_tokens=max_region_tokens(config),
        )


def session(path: Path, threads: int = 1) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3  # see runtime/backend.py: a harmless optimizer warning per session
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@dataclass
class OnnxGazeGenerator:
    """Prefill + greedy decode over decoder.onnx with a static, runtime-owned cache."""

    folder: Path
    layout: LayoutConfig
    threads: int = 1
    decoder: ort.InferenceSession = field(init=False)
    vision: ort.InferenceSession = field(init=False)
    embed_tokens: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.decoder = session(self.folder / "decoder.onnx", self.threads)
        self.vision = session(self.folder / "vision.onnx", self.threads)
        self.embed_tokens = np.load(self.folder / "embed_tokens.npy", mmap_mode="r")
        inputs = {i.name: i for i in self.decoder.get_inputs()}
        self.dtype = NP_DTYPES[inputs["inputs_embeds"].type]
        self.num_layers = sum(1 for name in inputs if name.endswith(".key"))
        key = inputs["past_key_values.0.key"].shape
        self.kv_heads, self.head_dim = int(key[1]), int(key[3])
        self.num_regions = int(inputs["past_key_values.0.desc"].shape[2])
        rh, rw = self.layout.region_size
        self.region_of_token = region_index_map(self.layout.grid_size, self.layout.grid_size, rh, rw)

    # ------------------------------------------------------------ state

    def reset(self, batch: int, capacity: int) -> None:
        """Preallocate the cache (capacity slots) and clear the layout."""
        self.capacity = capacity
        self.past: dict[str, np.ndarray] = {}
        for i in range(self.num_layers):
            for kind in ("key", "value"):
                self.past[f"past_key_values.{i}.{kind}"] = np.zeros(
                    (batch, self.kv_heads, capacity, self.head_dim), dtype=self.dtype)
            self.past[f"past_key_values.{i}.desc"] = np.zeros(
                (batch, self.kv_heads, self.num_regions, self.head_dim), dtype=np.float32)
        self.slots = SlotState(batch, capacity, self.num_regions, self.layout.max_region_tokens)
        self.next_pos = np.zeros(batch, dtype=np.int64)
        self.image_tokens_seen = np.zeros(batch, dtype=np.int64)

    def _lay_out(self, ids: np.ndarray, mask: np.ndarray) -> None:
        """Write positions, regions, images and validity of new tokens into their slots (as TokenLayout does)."""
        valid = mask.astype(bool)
        pos = np.clip(self.next_pos[:, None] + np.cumsum(valid, 1) - 1, 0, None)
        is_image = (ids == self.layout.image_token_id) & valid
        seen = self.image_tokens_seen[:, None] + np.cumsum(is_image, 1)
        index = np.clip(seen - 1, 0, None)
        tpi = self.layout.tokens_per_image
        region = (index // tpi) * self.layout.regions_per_image + self.region_of_token[index % tpi]
        region = np.where(is_image, region, -1)
        if is_image.any() and region.max() >= self.num_regions:
            images = int(region.max()) // self.layout.regions_per_image + 1
            raise ValueError(f"a sequence holds {images} images; this export takes at most "
                             f"{self.num_regions // self.layout.regions_per_image}")
        is_context = np.isin(ids, np.asarray(self.layout.context_token_ids, dtype=ids.dtype)) & valid
        image = np.where(is_image, index // tpi, np.where(is_context, seen // tpi - 1, -1))
        self.slots.write(pos, region, valid, image)
        self.next_pos = self.next_pos + valid.sum(1)
        self.image_tokens_seen = self.image_tokens_seen + is_image.sum(1)

    def embed(self, ids: np.ndarray, pixel_values: np.ndarray | None) -> np.ndarray:
        embeds = np.asarray(self.embed_tokens[ids], dtype=self.dtype)
        is_image = ids == self.layout.image_token_id
        if is_image.any():
            if pixel_values is None:
                raise ValueError("the prompt has image tokens but no images were given")
            visual = self.vision.run(None, {"pixel_values": pixel_values.astype(self.dtype)})[0]
            embeds[is_image] = visual.reshape(-1, visual.shape[-1])
        return embeds

    def forward(self, embeds: np.ndarray, ids: np.ndarray, mask: np.ndarray, gaze: bool) -> np.ndarray:
        """One decoder call over new tokens; returns logits [B, T, V] and advances the cache."""
        offset = self.slots.written
        self._lay_out(ids, mask)
        feeds = {
            "inputs_embeds": embeds,
            "logits_positions": np.arange(ids.shape[1], dtype=np.int64),
            "gaze": np.full(ids.shape, gaze, dtype=bool),
            "write_offset": np.array([offset], dtype=np.int64),
            **self.slots.tables(),
            **self.past,
        }
        outputs = self.decoder.run(None, feeds)
        names = [o.name for o in self.decoder.get_outputs()]
        for name, value in zip(names, outputs, strict=True):
            if name.startswith("present."):  # gaze_query.* outputs (--gaze-map-outputs) are not cache
                self.past[name.replace("present.", "past_key_values.", 1)] = value
        return outputs[0]


# ------------------------------------------------------------------ validation


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / max(float(np.linalg.norm(b)), 1e-30))


def _runtime_for(folder: Path, config: Any, processor: Any, dtype: str, threads: int) -> GazeRuntime:
    """The runtime over a folder of graphs, its runtime config derived from the model (the folder may be bare)."""
    import argparse

    from .cli import runtime_config

    desc = session(folder / "decoder.onnx", threads)
    inputs = {i.name: i for i in desc.get_inputs()}
    num_regions = int(inputs["past_key_values.0.desc"].shape[2])
    queries = any(o.name.startswith("gaze_query.") for o in desc.get_outputs())
    del desc
    args = argparse.Namespace(max_images=num_regions // config.regions_per_image, dtype=dtype, opset=18,
                           trt_compat=False, gaze_map_outputs=queries)
    runtime = runtime_config(config, processor, args, config.max_position_embeddings)
    export = ExportFolder.from_config(folder, runtime, processor)
    return GazeRuntime(export, OrtBackend(export, threads=threads))


def validate_export(
    folder: Path,
    model: Any,
    processor: Any,
    *,
    dtype: str = "fp32",
    scenes: int = 4,
    max_new_tokens: int = 24,
    seed: int = 0,
    threads: int = 1,
) -> dict[str, Any]:
    """Compare the exported graphs with the PyTorch model (fp32) on held-out scenes; returns the report.

    Checks: prefill logits (relative error over valid tokens), one decode step's logits, and greedy
    tokens identical token for token. Tolerances from docs/GAZE_SEMANTICS.md: 1e-4 fp32, 1e-2 fp16.
    `passed` is false when a tolerance is exceeded or (fp32) a generation differs.
    """
    import torch

    from gaze_edge.model import scenes as scene_lib
    from gaze_edge.model.processing import DEFAULT_PROMPT

    config = model.config
    tolerance = 1e-4 if dtype == "fp32" else 1e-2
    runtime = _runtime_for(Path(folder), config, processor, dtype, threads)
    rng = np.random.default_rng(seed)
    sample = [scene_lib.sample_scene(rng, held_out=True) for _ in range(scenes)]
    images = [scene_lib.render(s, config.image_size, rng)[0] for s in sample]
    pixels = processor.preprocess(images)
    max_images = runtime.shape.max_images
    # A left-padded batch: sequences with 1 .. max_images images (batch padding and padding regions).
    counts = [1 + i % max(1, min(max_images, len(images))) for i in range(min(len(images), 3))]
    prompts = [processor.prompt(num_images=c) for c in counts]
    ids, mask = processor.batch_encode(prompts)
    batch_pixels = np.concatenate([pixels[: c] for c in counts])

    with torch.no_grad():
        cache = model.new_cache(ids.shape[0])
        ref = model(torch.from_numpy(ids), pixel_values=torch.from_numpy(batch_pixels),
                    attention_mask=torch.from_numpy(mask), past_key_values=cache)
        last = ref.logits[:, -1].float().numpy().copy()
        last[:, config.never_generated_ids] = -np.inf  # a random model may pick <image>, which needs pixels
        step = last.argmax(-1)
        ref_step = model(torch.from_numpy(step[:, None]), gaze_mask=torch.ones((len(step), 1), dtype=torch.bool),
                         past_key_values=cache)
    onnx_prefill, onnx_step = runtime.prompt_logits([Prompt(DEFAULT_PROMPT, images[:c]) for c in counts], step)
    valid = mask.astype(bool)
    prefill_err = _rel(onnx_prefill[valid], ref.logits.float().numpy()[valid])
    step_err = _rel(onnx_step, ref_step.logits.float().numpy())

    generations = []
    for scene, image, pixel in zip(sample, images, pixels, strict=True):
        ids1, mask1 = processor.batch_encode([processor.prompt(num_images=1)])
        result = runtime.generate(Prompt(DEFAULT_PROMPT, [image]), SamplingConfig(max_new_tokens=max_new_tokens))
        torch_tokens = model.generate(torch.from_numpy(ids1), pixel_values=torch.from_numpy(pixel[None]),
                                      attention_mask=torch.from_numpy(mask1), max_new_tokens=max_new_tokens)
        a, b = result.tokens[0].tolist(), torch_tokens.sequences[0].tolist()
        timing = result.timings
        generations.append({
            "truth": scene.caption(),
            "onnx": processor.decode(a),
            "pytorch": processor.decode(b),
            "identical": a == b,
            "prefill_s": round(timing.prefill_s, 4),
            "decode_s": round(sum(timing.step_s), 4),
            "new_tokens": len(a),
        })
    identical = sum(g["identical"] for g in generations)
    passed = prefill_err < tolerance and step_err < tolerance and (dtype != "fp32" or identical == len(generations))
    return {
        "passed": bool(passed),
        "dtype": dtype,
        "tolerance": tolerance,
        "prefill_logits_rel_err": prefill_err,
        "decode_logits_rel_err": step_err,
        "prefill_batch_images": counts,
        "greedy_identical": f"{identical}/{len(generations)}",
        "generations": generations,
        "scene_seed": seed,
        "backend": f"onnxruntime {ort.__version__} CPUExecutionProvider",
    }
