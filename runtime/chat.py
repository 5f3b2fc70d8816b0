"""Multi-turn chat over one export, the KV cache reused across turns.

    from gaze_edge.runtime import GazeRuntime
    from gaze_edge.runtime.chat import ChatSession

    chat = ChatSession(GazeRuntime.load("out/"))
    for piece in chat.send("describe the image .", images=["scene.png"]):
        print(piece, end="", flush=True)
    print(chat.send("what is in this image ?").result())   # turn 2: only its own tokens are prefilled
    chat.last                                               # TurnStats: tokens prefilled / reused, KV bytes, ...
    chat.reset()

How a turn reuses the cache: the conversation (every message so far plus the new one) is
rendered with the chat template and tokenized; when the tokens already in the cache (the
previous prompt and every generated token that was fed back) are a prefix of it, the same
images (by content) came before, and the backend still holds this session's cache, only the
remaining tokens are laid out (`lay_out_prompt` over the whole conversation, so positions,
regions and image numbers continue), embedded and run through the decoder; then the one decode
loop (`GazeRuntime.stream`) generates from there. Otherwise (the first turn, a template or
tokenizer that does not re-tokenize the history the same way, another generation ran on the
backend in between) the whole conversation is prefilled again (`TurnStats.reused_cache` false).

The cache is allocated once per session at `capacity` slots (default: the export's max_seq_len).
A turn whose conversation + max_new_tokens does not fit is refused with InputError before
anything runs (no sliding window): `reset()` and start again, or lower max_new_tokens.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from gaze_edge.errors import InputError

from .cache import PromptLayout, lay_out_prompt
from .conversation import assistant_gaze_mask
from .generate import GazeRuntime, Prompt, Timings, _Prefilled
from .media import DEFAULT_POLICY, ImageInput, MediaPolicy, load_image_input
from .sampling import SamplingConfig


@dataclass
class TurnStats:
    """What one turn cost and where the cache stands after it."""

    prompt_tokens: int  # the conversation's prompt this turn (history + new message + generation prompt)
    prefilled_tokens: int  # tokens run through the decoder before generating: only the new ones when reused
    reused_tokens: int  # tokens already in the cache, not run again
    new_images: int  # images run through the vision encoder this turn
    reused_cache: bool
    generated_tokens: int = 0
    finish_reason: str = "running"  # "stop" (eos / stop token), "length" (max_new_tokens), "interrupted"
    cache_slots_used: int = 0
    cache_capacity: int = 0
    kv_bytes_allocated: int = 0  # K and V buffers of the session's cache (+ descriptors below)
    kv_bytes_used: int = 0  # the share of K/V that holds tokens
    descriptor_bytes: int = 0
    timings: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        how = (f"prefilled {self.prefilled_tokens} new tokens, reused {self.reused_tokens} from the cache"
               if self.reused_cache else f"prefilled the whole conversation ({self.prefilled_tokens} tokens)")
        return (f"{how}; {self.new_images} new images; generated {self.generated_tokens} ({self.finish_reason}); "
                f"cache {self.cache_slots_used}/{self.cache_capacity} slots, KV {self.kv_bytes_used / 1e6:.2f} of "
                f"{self.kv_bytes_allocated / 1e6:.2f} MB")


def image_digest(image: Image.Image) -> str:
    """Content hash of a decoded image (same pixels, same digest): decides whether cached images match."""
    h = hashlib.sha1(f"{image.mode}{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


@dataclass
class _Cache:
    """What this session left in the backend's cache."""

    spec: Any  # the backend's CacheSpec object when we allocated (identity: still ours?)
    slots: Any  # SlotState
    ids: list[int]  # tokens in the cache, prompt order
    digests: list[str]  # images in the cache, in order
    frames: bool


class Turn:
    """One reply being generated: iterate it for text pieces; `.text`, `.tokens`, `.stats` as it goes."""

    def __init__(self, session: ChatSession, plan: _Plan) -> None:
        self.session = session
        self.stats = plan.stats
        self.text = ""
        self.tokens: list[int] = []
        self._gen = session._run(plan, self)

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._gen)

    def close(self) -> None:
        """Stop generating; the reply so far stays in the conversation ("interrupted")."""
        self._gen.close()

    def result(self) -> str:
        """Run to the end; the whole reply."""
        for _ in self:
            pass
        return self.text

    @property
    def finish_reason(self) -> str:
        return self.stats.finish_reason


@dataclass
class _Plan:
    messages: list[dict[str, Any]]
    images: list[Image.Image]
    digests: list[str]
    frames: bool
    ids: list[int]
    reuse: int  # tokens of the cache kept (0: prefill everything into a fresh cache)
    sampling: SamplingConfig
    stats: TurnStats


class ChatSession:
    """A conversation over one GazeRuntime; not thread-safe (one turn at a time)."""

    def __init__(self, rt: GazeRuntime, sampling: SamplingConfig | None = None, capacity: int | None = None,
                 prefill_chunk: int | None = None, media_policy: MediaPolicy = DEFAULT_POLICY) -> None:
        self.rt = rt
        self.sampling = sampling or rt.default_sampling
        self.capacity = capacity or rt.shape.max_seq_len
        if not 1 <= self.capacity <= rt.shape.max_seq_len:
            raise InputError(f"a chat cache of {self.capacity} slots; this export holds 1 .. {rt.shape.max_seq_len}")
        self.prefill_chunk = prefill_chunk
        self.media_policy = media_policy
        self.messages: list[dict[str, Any]] = []
        self.images: list[Image.Image] = []
        self.frames = False
        self.turns: list[TurnStats] = []
        self._cache: _Cache | None = None

    @property
    def last(self) -> TurnStats | None:
        return self.turns[-1] if self.turns else None

    def reset(self) -> None:
        """Forget the conversation (the cache is reallocated by the next turn)."""
        self.messages, self.images, self.frames, self._cache = [], [], False, None

    # ------------------------------------------------------------------ turns

    def send(self, text: str, images: Sequence[ImageInput] = (), sampling: SamplingConfig | None = None,
             frames: bool = False) -> Turn:
        """Add a user message (text after its images, as the template orders them) and start the reply.

        Everything that can be refused is refused here, before the turn runs: unreadable images,
        special tokens in the text, too many images, a conversation that no longer fits the cache.
        `frames`: the images are frames of one video (as Prompt.frames).
        """
        loaded = [load_image_input(i, self.media_policy) for i in images]
        if not text.strip():
            raise InputError("the message text is empty")
        content: list[dict[str, Any]] = [{"type": "image"} for _ in loaded] + [{"type": "text", "text": text}]
        # The conversation counts as video frames only while every image in it is a frame.
        all_frames = (frames and (self.frames or not self.images)) if loaded else self.frames
        return self.complete([*self.messages, {"role": "user", "content": content}], [*self.images, *loaded],
                             sampling, frames=all_frames)

    def complete(self, messages: Sequence[dict[str, Any]], images: Sequence[Image.Image],
                 sampling: SamplingConfig | None = None, frames: bool = False) -> Turn:
        """Reply to a whole conversation (template messages; its image parts take `images` in order).

        The cache is reused when the conversation extends what is in it (the server's multi-turn clients).
        """
        sampling = sampling or self.sampling
        sampling.check()
        plan = self._plan(list(messages), list(images), bool(frames), sampling)
        return Turn(self, plan)

    def _plan(self, messages: list[dict[str, Any]], images: list[Image.Image], frames: bool,
              sampling: SamplingConfig) -> _Plan:
        rt, shape = self.rt, self.rt.shape
        if not messages:
            raise InputError("the conversation is empty")
        ids = rt.processor.encode(rt.processor.apply_chat_template(messages))
        image_tokens = sum(1 for i in ids if i == rt.folder.tokens.image) // shape.tokens_per_image
        if image_tokens != len(images):
            raise InputError(f"the conversation has {image_tokens} image parts but {len(images)} images were given")
        if len(images) > shape.max_images:
            raise InputError(f"the conversation would hold {len(images)} images or frames; this export takes at most "
                             f"{shape.max_images} per conversation (gaze export --max-images): reset the chat "
                             "(/reset) to start a new one")
        need = len(ids) + sampling.max_new_tokens
        if need > self.capacity:
            raise InputError(f"the conversation needs {need} cache slots ({len(ids)} prompt tokens + "
                             f"{sampling.max_new_tokens} new); this chat's cache holds {self.capacity} "
                             f"(gaze export --max-seq-len {shape.max_seq_len}): reset the chat (/reset) or "
                             "lower --max-new-tokens")
        digests = [image_digest(i) for i in images]
        reuse = self._reusable(ids, digests, frames)
        stats = TurnStats(prompt_tokens=len(ids), prefilled_tokens=len(ids) - reuse, reused_tokens=reuse,
                          new_images=len(images) - (len(self._cache.digests) if reuse and self._cache else 0),
                          reused_cache=reuse > 0, cache_capacity=self.capacity)
        return _Plan(messages, images, digests, frames, ids, reuse, sampling, stats)

    def _reusable(self, ids: list[int], digests: list[str], frames: bool) -> int:
        """How many cached tokens this conversation keeps (0: start a fresh cache)."""
        cache = self._cache
        if cache is None or self.rt.backend.spec is not cache.spec or cache.frames != frames:
            return 0
        n = len(cache.ids)
        if n >= len(ids) or ids[:n] != cache.ids or digests[: len(cache.digests)] != cache.digests:
            return 0
        return n

    # ------------------------------------------------------------------ running

    def _run(self, plan: _Plan, turn: Turn) -> Generator[str, None, None]:
        rt = self.rt
        timings = Timings()
        previous = self._cache
        if plan.reuse and self._reusable(plan.ids, plan.digests, plan.frames) != plan.reuse:
            plan.reuse = 0  # another turn ran since this one was planned: start afresh
            plan.stats.prefilled_tokens, plan.stats.reused_tokens = len(plan.ids), 0
            plan.stats.new_images, plan.stats.reused_cache = len(plan.images), False
        self._cache = None  # until this turn is recorded, the cache is in no known state
        if plan.reuse and previous is not None:
            state = self._append(plan, previous, timings)
        else:
            state = rt._prefill([Prompt(messages=plan.messages, images=plan.images, frames=plan.frames)],
                                self.capacity - len(plan.ids), self.prefill_chunk, timings)
        stop = {rt.folder.tokens.eos, *plan.sampling.stop_token_ids}
        finish = "interrupted"
        try:
            for step in rt.stream([], plan.sampling, timings=timings, prefilled=state):
                token = int(step.tokens[0])
                turn.tokens.append(token)
                turn.text += step.texts[0]
                if step.finished[0] and token in stop:
                    finish = "stop"
                elif len(turn.tokens) == plan.sampling.max_new_tokens:
                    finish = "length"
                if step.texts[0]:
                    yield step.texts[0]
        except GeneratorExit:  # the caller stopped reading: keep the reply so far
            self._record(plan, turn, state, timings, finish)
            raise
        except BaseException:  # a failure (or Ctrl-C) inside a decoder call: the cache cannot be trusted
            self._cache = None
            raise
        self._record(plan, turn, state, timings, finish)

    def _record(self, plan: _Plan, turn: Turn, state: _Prefilled, timings: Timings, finish: str) -> None:
        rt, spec, stats = self.rt, self.rt.backend.spec, plan.stats
        # The cache holds the prompt and every generated token but the last (never fed back).
        self._cache = _Cache(spec, state.slots, list(plan.ids) + turn.tokens[:-1], list(plan.digests), plan.frames)
        self.messages = [*plan.messages, {"role": "assistant", "content": rt.processor.decode(turn.tokens)}]
        self.images, self.frames = list(plan.images), plan.frames
        stats.generated_tokens = len(turn.tokens)
        stats.finish_reason = finish
        stats.cache_slots_used = int(state.slots.written)
        if spec is not None:
            stats.kv_bytes_allocated = int(spec.kv_bytes)
            stats.kv_bytes_used = int(spec.kv_bytes * state.slots.written // spec.capacity)
            stats.descriptor_bytes = int(spec.desc_bytes)
        stats.timings = timings.as_dict()
        self.turns.append(stats)

    def _append(self, plan: _Plan, cache: _Cache, timings: Timings) -> _Prefilled:
        """Lay out, embed and run only the conversation's new tokens into this session's cache."""
        rt = self.rt
        start = time.perf_counter()
        n = plan.reuse
        ids = np.asarray([plan.ids], dtype=np.int64)
        mask = np.ones_like(ids)
        # The whole conversation's layout (positions, regions, image numbers continue), then its new columns.
        full = lay_out_prompt(ids, mask, rt.shape, rt.folder.tokens.image, rt.region_major, np.array([plan.frames]))
        if (full.order[0, n:] < n).any():  # cannot happen: the cache ends on a text token
            raise InputError("internal: a cached image would be split between turns")
        tail = _tail(full, n)
        new_images = plan.images[len(cache.digests):]
        t = time.perf_counter()
        visual = rt.backend.vision(rt.processor.preprocess(new_images)) if new_images else None
        timings.vision_s = time.perf_counter() - t
        embeds = np.take_along_axis(rt._embed(ids[:, n:], visual), tail.order[..., None], 1)
        # The new tokens' gaze flags: earlier replies (the part of the last one never fed back, its <eos>) are gaze.
        gaze_all = assistant_gaze_mask(ids, mask, rt.folder.tokens.assistant, rt.folder.tokens.eos)
        gaze = np.take_along_axis(gaze_all[:, n:], tail.order, 1)
        slots = cache.slots
        t = time.perf_counter()
        begin, length = 0, ids.shape[1] - n
        logits = None
        for end in tail.split_points(self.prefill_chunk or length):
            cut = slice(begin, end)
            offset = slots.write(tail.pos[:, cut], tail.region[:, cut], tail.valid[:, cut], tail.image[:, cut])
            logits = rt.backend.decode(embeds[:, cut], gaze[:, cut], offset)
            begin = end
        assert logits is not None
        timings.prefill_s = time.perf_counter() - t
        return _Prefilled(ids, mask, slots, logits[:, -1].astype(np.float32), start, None)


def _tail(layout: PromptLayout, n: int) -> PromptLayout:
    """Columns n.. of a one-sequence layout, `order` renumbered from 0 (the columns hold exactly tokens n..)."""
    parts = {f.name: getattr(layout, f.name)[:, n:] for f in dataclasses.fields(layout)}
    parts["order"] = parts["order"] - n
    return PromptLayout(**parts)
