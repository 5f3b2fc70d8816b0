"""Next-token choice in numpy: greedy, temperature, top-k, top-p, repetition penalty, seeded draws.

The filtering order and tie rules are those of model.modeling.sample_next_token
(temperature, then top-k keeping every logit >= the k-th, then top-p keeping the token
that crosses p). Draws use numpy's PCG64 seeded once per generation, so a seed
reproduces a run here; it does not reproduce torch.multinomial's stream.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gaze_edge.errors import InputError, RunError

MAX_SEED = 2**64 - 1


def _number(value: Any, name: str, rule: str, ok: Callable[[float], bool]) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise InputError(f"{name} must be a number {rule}, got {value!r}")
    if not math.isfinite(float(value)) or not ok(float(value)):
        raise InputError(f"{name} must be a finite number {rule}, got {value!r}")


def _int(value: Any, name: str, low: int, note: str = "", high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InputError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in {low} .. {high}"
        raise InputError(f"{name} must be {bound}{' ' + note if note else ''}, got {value}")


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick tokens. Defaults come from the export's `search` block (greedy)."""

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1.0: no nucleus filter
    repetition_penalty: float = 1.0  # 1.0: off; > 1 discourages tokens already in the prompt or output
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)  # besides eos
    ignore_eos: bool = False  # run exactly max_new_tokens (benchmarks, profiles)

    def check(self, vocab_size: int | None = None) -> None:
        """InputError naming the first option that is not finite or out of range (before anything runs)."""
        _int(self.max_new_tokens, "max_new_tokens", 1)
        _number(self.temperature, "temperature", ">= 0 (0: greedy)", lambda v: v >= 0)
        _int(self.top_k, "top_k", 0, "(0 disables it)")
        _number(self.top_p, "top_p", "in (0, 1]", lambda v: 0.0 < v <= 1.0)
        _number(self.repetition_penalty, "repetition_penalty", "> 0 (1: off)", lambda v: v > 0)
        if self.seed is not None:
            _int(self.seed, "seed", 0, f"(numpy takes 0 .. {MAX_SEED})", MAX_SEED)
        high = MAX_SEED if vocab_size is None else vocab_size - 1
        for token in self.stop_token_ids:
            _int(token, "stop token id", 0, "(a token id of the vocabulary)", high)

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0


def filter_logits(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """Scaled logits [B, V] (float64) with filtered-out entries set to -inf."""
    out = logits.astype(np.float64) / temperature
    vocab = out.shape[-1]
    if 0 < top_k < vocab:
        kth = np.partition(out, vocab - top_k, axis=-1)[:, vocab - top_k : vocab - top_k + 1]
        out = np.where(out < kth, -np.inf, out)
    if top_p < 1.0:
        order = np.argsort(-out, axis=-1, kind="stable")
        probs = softmax(np.take_along_axis(out, order, -1))
        cumulative = np.cumsum(probs, -1)
        drop_sorted = cumulative - probs >= top_p  # the token that crosses top_p is kept
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, -1)
        out = np.where(drop, -np.inf, out)
    return out


def softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - np.max(x, axis=-1, keepdims=True)
    e = np.exp(shifted)
    return np.asarray(e / e.sum(-1, keepdims=True))


class Sampler:
    """Picks the next token of each sequence; holds the RNG and the seen-token mask of one generation."""

    def __init__(self, config: SamplingConfig, batch: int, vocab: int, suppress_ids: Iterable[int]) -> None:
        config.check(vocab)
        self.config = config
        self.rng = np.random.Generator(np.random.PCG64(config.seed))
        self.suppress = np.array(sorted(set(suppress_ids)), dtype=np.int64)
        self.seen = np.zeros((batch, vocab), dtype=bool) if config.repetition_penalty != 1.0 else None

    def observe(self, tokens: np.ndarray) -> None:
        """Mark tokens [B, T] (prompt, or the token just chosen) as seen for the repetition penalty."""
        if self.seen is not None:
            rows = np.repeat(np.arange(tokens.shape[0]), tokens.shape[1])
            self.seen[rows, tokens.reshape(-1)] = True

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        """Next token [B] (int64) from last-position logits [B, V]; `logits` may be modified in place."""
        logits = logits.astype(np.float32, copy=False)
        if self.seen is not None:
            # HF/CTRL rule: shrink a seen token's logit toward "less likely" whatever its sign.
            p = self.config.repetition_penalty
            logits = np.where(self.seen, np.where(logits > 0, logits / p, logits * p), logits)
        if self.suppress.size:
            logits[:, self.suppress] = -np.inf
        if self.config.greedy:
            return np.asarray(logits.argmax(-1), dtype=np.int64)
        probs = softmax(filter_logits(logits, self.config.temperature, self.config.top_k, self.config.top_p))
        if not np.isfinite(probs).all():
            raise RunError("the model produced non-finite logits (nan or inf), so no token can be sampled; the export "
                           "is broken or was run out of range: re-run `gaze export`")
        # Inverse-CDF draw: one uniform per sequence, so the stream depends only on the seed and batch size.
        u = np.asarray(self.rng.random(probs.shape[0]))[:, None]
        cdf = np.cumsum(probs, -1)
        token = (cdf <= u * cdf[:, -1:]).sum(-1)  # first index whose cdf exceeds the draw: never p = 0
        return np.asarray(np.minimum(token, probs.shape[-1] - 1), dtype=np.int64)
