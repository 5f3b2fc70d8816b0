"""The decode loop: prompts -> prefill -> sampled tokens, over any Backend (the only loop in the codebase).

`GazeRuntime.load(folder)` opens and checks an export folder and creates a backend;
`stream()` yields one `Step` per generated token, `generate()` collects them. Everything
that can be refused (empty or too-long prompt, too many images, bad sampling options)
is refused before the cache is allocated.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from gaze_edge.errors import InputError

from .backend import Backend, create_backend
from .cache import CacheSpec, SlotState, lay_out_prompt
from .conversation import assistant_gaze_mask
from .detok import StreamDetokenizer
from .folder import ExportFolder
from .media import load_image_input
from .sampling import Sampler, SamplingConfig
from .selection import select_from_cache

ImageLike = Image.Image | np.ndarray | str | Path | bytes
#: Prefill tokens per decoder call when the caller does not say (bounds the [heads, chunk, context] scores).
DEFAULT_PREFILL_CHUNK = 512


@dataclass
class Prompt:
    """One sequence of a batch: user text and its images (or the frames of a video, in order)."""

    text: str | None = None
    images: Sequence[ImageLike] = ()
    frames: bool = False  # the images are video frames (changes only the default text)
    # A whole conversation in chat-template form instead of `text` (runtime/chat.py, runtime/server.py):
    # its {"type": "image"} parts take `images` in order.
    messages: Sequence[dict[str, Any]] | None = None

    def resolved_text(self) -> str:
        if self.text is not None:
            return self.text
        if len(self.images) <= 1:
            return "describe the image ."
        return "describe the frames ." if self.frames else "describe the images ."


@dataclass
class Step:
    """One generated token of every sequence: ids [B], the text each adds, and (optionally) the regions selected."""

    index: int
    tokens: np.ndarray
    texts: list[str]
    finished: np.ndarray
    # Per layer [B, Hkv, R] bool: regions the gaze queries selected when this token was *predicted*
    # (None for the first token, predicted by the last prompt token, a dense query).
    selection: list[np.ndarray] | None = None


@dataclass
class Timings:
    vision_s: float = 0.0
    prefill_s: float = 0.0
    ttft_s: float = 0.0  # request start -> first token chosen (vision + embed + prefill + sampling)
    step_s: list[float] = field(default_factory=list)  # per decode step, wall
    step_session_s: list[float] = field(default_factory=list)  # per decode step, inside the backend's run

    def as_dict(self) -> dict[str, Any]:
        steps = np.asarray(self.step_s) * 1e3
        return {
            "vision_ms": self.vision_s * 1e3,
            "prefill_ms": self.prefill_s * 1e3,
            "ttft_ms": self.ttft_s * 1e3,
            "decode_steps": len(self.step_s),
            "decode_ms_per_token_median": float(np.median(steps)) if steps.size else None,
            "decode_ms_per_token_p90": float(np.percentile(steps, 90)) if steps.size else None,
            "decode_tokens_per_s": float(1e3 / np.median(steps)) if steps.size else None,
        }


@dataclass
class Generation:
    tokens: np.ndarray  # [B, n] (pad after a sequence stopped)
    texts: list[str]
    timings: Timings
    steps: list[Step]
    spec: CacheSpec


@dataclass
class _Prefilled:
    ids: np.ndarray
    mask: np.ndarray
    slots: SlotState
    last: np.ndarray  # [B, V] logits of the last prompt token
    start: float
    prompt_logits: np.ndarray | None


class GazeRuntime:
    """An export folder + a backend: prepare prompts, run the one decode loop."""

    def __init__(self, folder: ExportFolder, backend: Backend, region_major: bool = True) -> None:
        self.folder = folder
        self.backend = backend
        self.shape = folder.shape
        self.processor = folder.processor
        self.region_major = region_major
        self.embed_table = np.load(folder.embedding_path, mmap_mode="r")
        search = folder.search
        self.suppress_ids = tuple(int(i) for i in search.get("suppress_token_ids", ()))
        self.default_sampling = SamplingConfig(
            do_sample=bool(search.get("do_sample", False)), temperature=float(search.get("temperature", 1.0)),
            top_k=int(search.get("top_k", 0)), top_p=float(search.get("top_p", 1.0)),
            repetition_penalty=float(search.get("repetition_penalty", 1.0)))

    @classmethod
    def load(cls, path: str | Path, backend: str = "onnxruntime", threads: int | None = None,
             region_major: bool = True, provider: str | None = None, spinning: bool = True) -> GazeRuntime:
        folder = ExportFolder.open(path)
        return cls(folder, create_backend(backend, folder, threads=threads, provider=provider, spinning=spinning),
                   region_major)

    # ------------------------------------------------------------------ inputs

    def encode(self, prompts: Sequence[Prompt]) -> tuple[np.ndarray, np.ndarray, list[ImageLike]]:
        """Left-padded ids and mask [B, T] and the images of the batch in order; refuses bad prompts."""
        if not prompts:
            raise InputError("no prompt given")
        texts: list[str] = []
        images: list[ImageLike] = []
        for p in prompts:
            if p.messages is not None:
                texts.append(self.processor.apply_chat_template(list(p.messages)))
                images.extend(p.images)
                continue
            text = p.resolved_text()
            if not text.strip() and not p.images:
                raise InputError("the prompt is empty: give a text or at least one image")
            if not text.strip():
                raise InputError("the prompt text is empty; leave --prompt out to use the default")
            if len(p.images) > self.shape.max_images:
                raise InputError(f"{len(p.images)} images or frames in one prompt; this export takes at most "
                                 f"{self.shape.max_images} (gaze export --max-images)")
            content = [{"type": "image"}] * len(p.images) + [{"type": "text", "text": text}]
            texts.append(self.processor.apply_chat_template([{"role": "user", "content": content}]))
            images.extend(p.images)
        ids, mask = self.processor.batch_encode(texts)
        return ids, mask, images

    def _pixels(self, images: Sequence[ImageLike]) -> np.ndarray:
        loaded = [load_image_input(i) for i in images]  # paths, data: URIs, bytes, PIL, uint8 arrays
        return self.processor.preprocess(loaded)

    def _embed(self, ids: np.ndarray, visual: np.ndarray | None) -> np.ndarray:
        embeds = np.asarray(self.embed_table[ids], dtype=self.shape.dtype)
        is_image = ids == self.folder.tokens.image
        if is_image.any():
            assert visual is not None
            embeds[is_image] = visual.reshape(-1, visual.shape[-1])
        return embeds

    # ------------------------------------------------------------------ the loop

    def _prefill(self, prompts: Sequence[Prompt], capacity_extra: int, prefill_chunk: int | None,
                 timings: Timings, keep_logits: bool = False, gaze_replies: bool = True) -> _Prefilled:
        """Encode, check, allocate and run the prompt through the decoder, in chunks of at most
        `prefill_chunk` tokens (DEFAULT_PREFILL_CHUNK when None; never cut inside an image).

        The chunk bounds prefill memory: causal attention over a chunk holds [heads, chunk, context] scores.
        """
        start = time.perf_counter()
        ids, mask, images = self.encode(prompts)
        batch, length = ids.shape
        # Everything that can be refused is checked here, before a single cache byte exists.
        frames = np.array([p.frames for p in prompts], dtype=bool)
        layout = lay_out_prompt(ids, mask, self.shape, self.folder.tokens.image, self.region_major, frames)
        spec = CacheSpec.plan(self.shape, batch, length + capacity_extra)
        expected_images = int(((ids == self.folder.tokens.image) & (mask > 0)).sum()) // self.shape.tokens_per_image
        if expected_images != len(images):
            raise InputError(f"the prompts hold {expected_images} <image> tokens but {len(images)} images were given")
        pixels = self._pixels(images) if images else None

        t = time.perf_counter()
        visual = self.backend.vision(pixels) if pixels is not None else None
        timings.vision_s = time.perf_counter() - t
        embeds = np.take_along_axis(self._embed(ids, visual), layout.order[..., None], 1)
        # Earlier assistant replies in a conversation are gaze queries, as when generated (runtime/conversation.py).
        gaze = np.take_along_axis(assistant_gaze_mask(ids, mask, self.folder.tokens.assistant, self.folder.tokens.eos),
                                  layout.order, 1) & gaze_replies

        slots = SlotState(batch, spec.capacity, self.shape.num_regions, self.shape.max_region_tokens)
        self.backend.allocate(spec, slots)
        t = time.perf_counter()
        begin, parts = 0, []
        for end in layout.split_points(prefill_chunk or DEFAULT_PREFILL_CHUNK):
            cut = slice(begin, end)
            offset = slots.write(layout.pos[:, cut], layout.region[:, cut], layout.valid[:, cut], layout.image[:, cut])
            # Logits of the last column only, unless every prompt position is asked for (validation).
            columns = np.arange(end - begin) if keep_logits else None
            logits = self.backend.decode(embeds[:, cut], gaze[:, cut], offset, columns)
            if keep_logits:
                parts.append(np.array(logits, dtype=np.float32))
            begin = end
        last = logits[:, -1].astype(np.float32)  # the prompt's last column is text in both storage orders
        timings.prefill_s = time.perf_counter() - t
        prompt_logits = None
        if keep_logits:  # back to prompt order
            stored = np.concatenate(parts, 1)
            prompt_logits = np.empty_like(stored)
            np.put_along_axis(prompt_logits, layout.order[..., None], stored, 1)
        return _Prefilled(ids, mask, slots, last, start, prompt_logits)

    def prompt_logits(self, prompts: Sequence[Prompt], next_tokens: np.ndarray,
                      prefill_chunk: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Logits of every prompt token [B, T, V] (prompt order) and of one gaze step feeding next_tokens [B]."""
        state = self._prefill(list(prompts), 1, prefill_chunk, Timings(), keep_logits=True)
        assert state.prompt_logits is not None
        offset = state.slots.write(state.mask.sum(1)[:, None], np.full((len(next_tokens), 1), -1),
                                   np.ones((len(next_tokens), 1), dtype=bool))
        embeds = np.asarray(self.embed_table[next_tokens], dtype=self.shape.dtype)[:, None]
        step = self.backend.decode(embeds, np.ones((len(next_tokens), 1), dtype=bool), offset)
        return state.prompt_logits, np.array(step, dtype=np.float32)

    def stream(self, prompts: Sequence[Prompt] | Prompt, sampling: SamplingConfig | None = None, *,
               prefill_chunk: int | None = None, with_selection: bool = False,
               timings: Timings | None = None, prefilled: _Prefilled | None = None,
               gaze: bool = True) -> Iterator[Step]:
        """Yield one Step per generated token until every sequence stopped or max_new_tokens.

        `gaze=False` runs the decode steps as dense queries (causal attention over every cached token):
        the same model without gaze, for comparisons (with top_k >= R the two are the same function).

        `prefilled`: a prompt already in the cache (runtime/chat.py appends a turn to it), used instead of `prompts`.
        """
        prompts = [prompts] if isinstance(prompts, Prompt) else list(prompts)
        sampling = sampling or self.default_sampling
        sampling.check()
        if with_selection and not self.folder.has_gaze_queries:
            raise InputError(f"{self.folder.path} was exported without gaze query outputs; re-export with "
                             "`gaze export CKPT -o OUT --gaze-map-outputs` to draw gaze maps")
        timings = timings if timings is not None else Timings()
        state = prefilled or self._prefill(prompts, sampling.max_new_tokens, prefill_chunk, timings,
                                           gaze_replies=gaze)
        slots, last, batch = state.slots, state.last, state.ids.shape[0]

        sampler = Sampler(sampling, batch, self.shape.vocab_size, self.suppress_ids)
        sampler.observe(np.where(state.mask > 0, state.ids, self.folder.tokens.pad))
        eos = () if sampling.ignore_eos else (self.folder.tokens.eos,)
        stop = np.array(sorted({*eos, *sampling.stop_token_ids}), dtype=np.int64)
        finished = np.zeros(batch, dtype=bool)
        next_pos = state.mask.sum(1).astype(np.int64)
        # Per-step buffers, allocated once: a decode step allocates nothing the size of the cache.
        step_embeds = np.zeros((batch, 1, self.shape.hidden_size), dtype=self.shape.dtype)
        gaze_flags = np.full((batch, 1), gaze, dtype=bool)
        dense_region = np.full((batch, 1), -1, dtype=np.int64)
        ones = np.ones((batch, 1), dtype=bool)
        selection: list[np.ndarray] | None = None
        detok = StreamDetokenizer(self.processor.tokenizer, batch)
        finished_before = finished.copy()
        for index in range(sampling.max_new_tokens):
            token = sampler(last)
            token = np.where(finished, self.folder.tokens.pad, token)
            finished = finished | np.isin(token, stop)
            if index == 0:
                timings.ttft_s = time.perf_counter() - state.start
            last_step = finished | (index + 1 == sampling.max_new_tokens)
            yield Step(index, token, detok.push(token, finished_before, last_step), finished.copy(), selection)
            finished_before = finished.copy()
            if finished.all() or index + 1 == sampling.max_new_tokens:
                break
            t = time.perf_counter()
            session_before = self.backend.session_seconds
            sampler.observe(token[:, None])
            step_embeds[:, 0] = self.embed_table[token]
            offset = slots.write(next_pos[:, None], dense_region, ones)
            next_pos += 1
            last = self.backend.decode(step_embeds, gaze_flags, offset)[:, -1].astype(np.float32)
            if with_selection:
                selection = self._selection(slots, next_pos - 1)
            timings.step_s.append(time.perf_counter() - t)
            timings.step_session_s.append(self.backend.session_seconds - session_before)

    def _selection(self, slots: SlotState, query_pos: np.ndarray) -> list[np.ndarray]:
        queries = self.backend.gaze_queries()
        assert queries is not None
        return [select_from_cache(queries[i][:, :, -1], self.backend.descriptor_sums(i), slots, query_pos,
                                  self.shape.top_k_per_layer[i], self.shape.routing)
                for i in range(self.shape.num_layers)]

    def generate(self, prompts: Sequence[Prompt] | Prompt, sampling: SamplingConfig | None = None, *,
                 prefill_chunk: int | None = None, with_selection: bool = False) -> Generation:
        """Run the loop to the end; tokens [B, n] with pad after each sequence stopped, and decoded texts."""
        timings = Timings()
        steps = list(self.stream(prompts, sampling, prefill_chunk=prefill_chunk, with_selection=with_selection,
                                 timings=timings))
        tokens = np.stack([s.tokens for s in steps], 1)
        texts = [self.processor.decode(row) for row in tokens]
        assert self.backend.spec is not None
        return Generation(tokens, texts, timings, steps, self.backend.spec)

    def caption(self, images: Sequence[ImageLike] | ImageLike, prompt: str | None = None,
                sampling: SamplingConfig | None = None, frames: bool = False) -> str:
        """The caption of one image (or of several images / frames in one prompt)."""
        if isinstance(images, (str, Path, bytes, np.ndarray, Image.Image)):
            images = [images]
        return self.generate(Prompt(prompt, list(images), frames), sampling).texts[0]
