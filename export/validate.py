"""Drive exported graphs with numpy + ONNX Runtime, and check them against the PyTorch model.

`OnnxGazeGenerator` is a minimal runtime over an export folder (decoder.onnx, vision.onnx,
embed_tokens.npy): it owns the static KV cache, the descriptor sums and the slot
metadata (docs/ONNX_CONTRACT.md, "Runtime duties"), and runs prefill then greedy decode.
It imports no torch; `validate_export` (which does) compares it with
`GazeForConditionalGeneration` on held-out scenes and returns the validation report.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from gaze_edge.reference import region_index_map

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
        )


def session(path: Path, threads: int = 1) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
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
        self.slot_pos = np.zeros((batch, capacity), dtype=np.int64)
        self.slot_region = np.full((batch, capacity), -1, dtype=np.int64)
        self.slot_valid = np.zeros((batch, capacity), dtype=bool)
        self.written = 0
        self.next_pos = np.zeros(batch, dtype=np.int64)
        self.image_tokens_seen = np.zeros(batch, dtype=np.int64)

    def _lay_out(self, ids: np.ndarray, mask: np.ndarray) -> None:
        """Write positions, regions and validity of new tokens into their slots (as TokenLayout does)."""
        valid = mask.astype(bool)
        pos = np.clip(self.next_pos[:, None] + np.cumsum(valid, 1) - 1, 0, None)
        is_image = (ids == self.layout.image_token_id) & valid
        index = np.clip(self.image_tokens_seen[:, None] + np.cumsum(is_image, 1) - 1, 0, None)
        region = (index // self.layout.tokens_per_image) * self.layout.regions_per_image + self.region_of_token[
            index % self.layout.tokens_per_image]
        region = np.where(is_image, region, -1)
        if is_image.any() and region.max() >= self.num_regions:
            images = int(region.max()) // self.layout.regions_per_image + 1
            raise ValueError(f"a sequence holds {images} images; this export takes at most "
                             f"{self.num_regions // self.layout.regions_per_image}")
        new = slice(self.written, self.written + ids.shape[1])
        if new.stop > self.capacity:
            raise ValueError(f"{new.stop} tokens exceed the cache capacity {self.capacity}")
        self.slot_pos[:, new], self.slot_region[:, new], self.slot_valid[:, new] = pos, region, valid
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
        self._lay_out(ids, mask)
        feeds = {
            "inputs_embeds": embeds,
            "slot_pos": self.slot_pos,
            "slot_region": self.slot_region,
            "slot_valid": self.slot_valid,
            "gaze": np.full(ids.shape, gaze, dtype=bool),
            "write_offset": np.array([self.written], dtype=np.int64),
            **self.past,
        }
        outputs = self.decoder.run(None, feeds)
        names = [o.name for o in self.decoder.get_outputs()]
        for name, value in zip(names[1:], outputs[1:], strict=True):
            self.past[name.replace("present.", "past_key_values.", 1)] = value
        self.written += ids.shape[1]
        return outputs[0]

    # ------------------------------------------------------------ generation

    def generate(
        self,
        ids: np.ndarray,
        mask: np.ndarray,
        pixel_values: np.ndarray | None,
        max_new_tokens: int,
        prefill_chunk: int | None = None,
    ) -> tuple[np.ndarray, dict[str, float]]:
        """Greedy tokens [B, n] (pad after eos) as GazeForConditionalGeneration.generate, and timings."""
        batch, length = ids.shape
        self.reset(batch, length + max_new_tokens)
        start = time.perf_counter()
        embeds = self.embed(ids, pixel_values)
        chunk = prefill_chunk or length
        for s in range(0, length, chunk):
            logits = self.forward(embeds[:, s : s + chunk], ids[:, s : s + chunk], mask[:, s : s + chunk], False)
        prefill_s = time.perf_counter() - start
        finished = np.zeros(batch, dtype=bool)
        tokens = []
        start = time.perf_counter()
        for _ in range(max_new_tokens):
            last = logits[:, -1].astype(np.float32)
            last[:, list(self.layout.suppress_token_ids)] = -np.inf
            token = last.argmax(-1)
            token = np.where(finished, self.layout.pad_token_id, token)
            tokens.append(token)
            finished |= token == self.layout.eos_token_id
            if finished.all():
                break
            step = token[:, None]
            logits = self.forward(self.embed(step, None), step, np.ones_like(step), True)
        decode_s = time.perf_counter() - start
        return np.stack(tokens, 1), {"prefill_s": prefill_s, "decode_s": decode_s, "new_tokens": len(tokens)}


# ------------------------------------------------------------------ validation


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / max(float(np.linalg.norm(b)), 1e-30))


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
    tokens identical token for token. Tolerances from GAZE_SPEC.md: 1e-4 fp32, 1e-2 fp16.
    `passed` is false when a tolerance is exceeded or (fp32) a generation differs.
    """
    import torch

    from gaze_edge.model import scenes as scene_lib

    config = model.config
    tolerance = 1e-4 if dtype == "fp32" else 1e-2
    generator = OnnxGazeGenerator(folder, LayoutConfig.from_model_config(config), threads=threads)
    rng = np.random.default_rng(seed)
    sample = [scene_lib.sample_scene(rng, held_out=True) for _ in range(scenes)]
    images = [scene_lib.render(s, config.image_size, rng)[0] for s in sample]
    pixels = processor.preprocess(images)
    max_images = generator.num_regions // config.regions_per_image
    # A left-padded batch: sequences with 1 .. max_images images (batch padding and padding regions).
    counts = [1 + i % max(1, min(max_images, len(images))) for i in range(min(len(images), 3))]
    prompts = [processor.prompt(num_images=c) for c in counts]
    ids, mask = processor.batch_encode(prompts)
    batch_pixels = np.concatenate([pixels[: c] for c in counts])

    generator.reset(ids.shape[0], ids.shape[1] + 2)
    onnx_prefill = generator.forward(generator.embed(ids, batch_pixels), ids, mask, gaze=False)
    step = onnx_prefill[:, -1].astype(np.float32).argmax(-1)[:, None]
    onnx_step = generator.forward(generator.embed(step, None), step, np.ones_like(step), gaze=True)
    with torch.no_grad():
        cache = model.new_cache(ids.shape[0])
        ref = model(torch.from_numpy(ids), pixel_values=torch.from_numpy(batch_pixels),
                    attention_mask=torch.from_numpy(mask), past_key_values=cache)
        ref_step = model(torch.from_numpy(step), gaze_mask=torch.ones(step.shape, dtype=torch.bool),
                         past_key_values=cache)
    valid = mask.astype(bool)
    prefill_err = _rel(onnx_prefill[valid], ref.logits.float().numpy()[valid])
    step_err = _rel(onnx_step, ref_step.logits.float().numpy())

    generations = []
    for scene, pixel in zip(sample, pixels, strict=True):
        ids1, mask1 = processor.batch_encode([processor.prompt(num_images=1)])
        onnx_tokens, timing = generator.generate(ids1, mask1, pixel[None], max_new_tokens)
        torch_tokens = model.generate(torch.from_numpy(ids1), pixel_values=torch.from_numpy(pixel[None]),
                                      attention_mask=torch.from_numpy(mask1), max_new_tokens=max_new_tokens)
        a, b = onnx_tokens[0].tolist(), torch_tokens.sequences[0].tolist()
        generations.append({
            "truth": scene.caption(),
            "onnx": processor.decode(a),
            "pytorch": processor.decode(b),
            "identical": a == b,
            **{k: round(v, 4) if isinstance(v, float) else v for k, v in timing.items()},
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
