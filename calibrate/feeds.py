"""Calibration feeds and teacher-forced logits, taken from an export running in the real torch-free runtime.

`record_feeds` runs the fp32 export over calibration images with `GazeRuntime` (the one
decode loop) behind `RecordingBackend`, an `OrtBackend` that snapshots, before each call,
exactly what the graph is given: `pixel_values` for vision.onnx; for decoder.onnx
`inputs_embeds`, `gaze`, `write_offset`, `slot_pos` / `slot_region` / `slot_valid` and copies
of every `past_key_values.*` buffer (the backend binds past and present to one buffer, so
the copy must be taken before the call). The prefill call and the first `decode_steps`
decode steps of each batch are kept. Feeds go to .npz files in a scratch folder, one per
call, and `NpzFeedReader` (an onnxruntime CalibrationDataReader) reads them back one at a
time, so memory stays at one feed whatever the number of images or the cache size.

`forced_logits` feeds a fixed token sequence (teacher forcing) through the same prefill and
decode calls `GazeRuntime.stream` makes, so on the model that produced the tokens it returns
exactly the logits its generation saw.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from gaze_edge.runtime.backend import OrtBackend
from gaze_edge.runtime.cache import CacheSpec, SlotState
from gaze_edge.runtime.folder import ExportFolder
from gaze_edge.runtime.generate import GazeRuntime, ImageLike, Prompt, Timings
from gaze_edge.runtime.sampling import SamplingConfig

VISION, DECODER = "vision", "decoder"


class FeedStore:
    """Feeds of one graph as numbered .npz files in `folder` (written once, read back in order)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.files: list[Path] = []
        self.nbytes = 0

    def add(self, feed: dict[str, np.ndarray]) -> None:
        path = self.folder / f"feed_{len(self.files):05d}.npz"
        np.savez(path, **feed)  # type: ignore[arg-type]
        self.files.append(path)
        self.nbytes += sum(a.nbytes for a in feed.values())

    def __len__(self) -> int:
        return len(self.files)


class NpzFeedReader(CalibrationDataReader):
    """onnxruntime's calibration reader over a FeedStore: one feed in memory at a time."""

    def __init__(self, files: Sequence[Path]) -> None:
        self.files = list(files)
        self.index = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.index >= len(self.files):
            return None
        with np.load(self.files[self.index]) as data:
            feed = {name: np.array(data[name]) for name in data.files}
        self.index += 1
        return feed

    def __len__(self) -> int:
        return len(self.files)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.files = self.files[start_index:end_index]
        self.index = 0

    def rewind(self) -> None:
        self.index = 0


class RecordingBackend(OrtBackend):
    """OrtBackend that records the exact input feeds of vision.onnx and of the first decoder calls."""

    def __init__(self, folder: ExportFolder, vision_store: FeedStore, decoder_store: FeedStore,
                 decode_steps: int, threads: int | None = None) -> None:
        super().__init__(folder, threads=threads)
        self.vision_store = vision_store
        self.decoder_store = decoder_store
        self.decode_steps = decode_steps
        self._calls = 0
        self._prefilled = False
        self._slots: SlotState | None = None

    def vision(self, pixel_values: np.ndarray) -> np.ndarray:
        self.vision_store.add({"pixel_values": np.ascontiguousarray(pixel_values, dtype=self.folder.shape.dtype)})
        return super().vision(pixel_values)

    def allocate(self, spec: CacheSpec, slots: SlotState) -> None:
        super().allocate(spec, slots)
        self._slots = slots
        self._calls = 0
        self._prefilled = False

    def decode(self, embeds: np.ndarray, gaze: np.ndarray, write_offset: int,
               logits_positions: np.ndarray | None = None) -> np.ndarray:
        decode_step = bool(gaze.any())  # prefill calls (any number of chunks) carry gaze = false
        if decode_step:
            self._calls += 1
        if not decode_step or self._calls <= self.decode_steps:
            assert self._slots is not None
            s = self.folder.shape
            positions = np.array([embeds.shape[1] - 1]) if logits_positions is None else logits_positions
            feed = {"inputs_embeds": np.array(embeds, dtype=s.dtype), "gaze": np.array(gaze, dtype=bool),
                    "write_offset": np.array([write_offset], dtype=np.int64),
                    "logits_positions": np.array(positions, dtype=np.int64),
                    **{name: table.copy() for name, table in self._slots.tables().items()}}
            for name, buf in self.kv.items():  # the past, copied before the call rewrites it in place
                feed[f"past_key_values.{name}"] = buf.copy()
            self.decoder_store.add(feed)
        return super().decode(embeds, gaze, write_offset, logits_positions)


def record_feeds(folder: ExportFolder, images: Sequence[ImageLike], scratch: Path, *, decode_steps: int = 8,
                 batch: int = 8, max_new_tokens: int = 32, threads: int | None = None,
                 progress: Callable[[int], None] | None = None) -> tuple[FeedStore, FeedStore]:
    """Greedy-caption `images` (default prompt, one image each) with the fp32 export, recording the feeds."""
    vision_store, decoder_store = FeedStore(scratch / VISION), FeedStore(scratch / DECODER)
    backend = RecordingBackend(folder, vision_store, decoder_store, decode_steps, threads=threads)
    rt = GazeRuntime(folder, backend)
    sampling = _greedy(rt, max_new_tokens)
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch]
        prompts = [Prompt(None, [image]) for image in chunk]
        for index, _ in enumerate(rt.stream(prompts, sampling)):
            if index >= decode_steps:  # prefill + decode_steps calls recorded: the rest adds nothing
                break
        if progress is not None:
            progress(len(chunk))
    return vision_store, decoder_store


def _greedy(rt: GazeRuntime, max_new_tokens: int) -> SamplingConfig:
    return replace(rt.default_sampling, max_new_tokens=max_new_tokens, do_sample=False)


def sequence_lengths(tokens: np.ndarray, stop_ids: Sequence[int]) -> np.ndarray:
    """Generated tokens per row up to and including the first stop token (all when it never stops)."""
    stops = np.isin(tokens, np.asarray(list(stop_ids), dtype=np.int64))
    first = np.where(stops.any(1), stops.argmax(1) + 1, tokens.shape[1])
    return first.astype(np.int64)


def forced_logits(rt: GazeRuntime, prompts: Sequence[Prompt], tokens: np.ndarray,
                  selections: list[np.ndarray] | None = None) -> np.ndarray:
    """Logits [B, n, V] (float32) predicting each of `tokens` [B, n] when those very tokens are fed back.

    Position 0 is the last prompt token's logits; position i > 0 comes from the gaze step that feeds
    tokens[:, i - 1], as in `GazeRuntime.stream` (rows that stopped are fed what the generation fed them).
    With `selections` (a list; the export must have gaze query outputs) each gaze step appends the
    regions it selected, [layers, B, Hkv, R] bool, recomputed as `GazeRuntime._selection` does.
    """
    batch, length = tokens.shape
    state = rt._prefill(list(prompts), length, None, Timings())
    shape = rt.shape
    out = np.empty((batch, length, shape.vocab_size), dtype=np.float32)
    out[:, 0] = state.last
    next_pos = state.mask.sum(1).astype(np.int64)
    step_embeds = np.zeros((batch, 1, shape.hidden_size), dtype=shape.dtype)
    gaze = np.ones((batch, 1), dtype=bool)
    dense = np.full((batch, 1), -1, dtype=np.int64)
    for i in range(length - 1):
        step_embeds[:, 0] = rt.embed_table[tokens[:, i]]
        offset = state.slots.write(next_pos[:, None], dense, gaze)
        next_pos += 1
        out[:, i + 1] = rt.backend.decode(step_embeds, gaze, offset)[:, -1]
        if selections is not None:
            selections.append(np.stack(rt._selection(state.slots, next_pos - 1)))
    return out
