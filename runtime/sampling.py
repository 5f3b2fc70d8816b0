"""Next-token choice in numpy: greedy, temperature, top-k, top-p, repetition penalty, seeded draws.

The filtering order and tie rules are those of model.modeling.sample_next_token
(temperature, then top-k keeping every logit >= the k-th, then top-p keeping the token
that crosses p). Draws use numpy's PCG64 seeded once per generation, so a seed
reproduces a run here; it does not reproduce torch.multinomial's stream.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from gaze_edge.errors import InputError


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

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise InputError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise InputError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise InputError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

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
        config.check()
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
        # Inverse-CDF draw: one uniform per sequence, so the stream depends only on the seed and batch size.
        u = np.asarray(self.rng.random(probs.shape[0]))[:, None]
        cdf = np.cumsum(probs, -1)
        token = (cdf <= u * cdf[:, -1:]).sum(-1)  # first index whose cdf exceeds the draw: never p = 0
        return np.asarray(np.minimum(token, probs.shape[-1] - 1), dtype=np.int64)
