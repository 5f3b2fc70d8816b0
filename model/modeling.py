"""The Gaze Attention vision-language model in PyTorch.

Vision tower (model/towers.py: the tiny ViT or SigLIP) -> MLP projector -> visual
embeddings placed at the prompt's image tokens, each image followed by learnable context
tokens (whose embeddings are ordinary trainable rows) -> Qwen2- or Qwen3-style decoder
(RMSNorm, rotary embeddings, grouped-query attention, SwiGLU; Qwen3 adds a per-head
RMSNorm on q and k before rotary) whose attention is gaze attention (model/gaze_op.py,
docs/GAZE_SEMANTICS.md). Generated tokens are gaze queries; prompt,
visual and context tokens are dense queries.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from gaze_edge.reference import region_index_map

from .configuration import GazeConfig
from .gaze_op import KeyLayout, RegionCoverage, gaze_attention, region_coverage
from .towers import SiglipTower, VisionTower, vision_tower

# ---------------------------------------------------------------------------- decoder


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in fp32: fp16 overflows here otherwise (a known pitfall of fp16 TensorRT engines).
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotary(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate-half rotary embedding (Qwen2/Llama); x [B, H, T, D], pos [B, T]."""
    dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=x.device, dtype=torch.float32) / dim))
    angles = pos[:, None, :, None].float() * inv_freq
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    x1, x2 = x[..., : dim // 2], x[..., dim // 2 :]
    rotated = torch.cat([-x2, x1], -1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class GazeSelfAttention(nn.Module):
    def __init__(self, config: GazeConfig, layer: int) -> None:
        super().__init__()
        self.config = config
        self.layer = layer
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        bias = config.qkv_bias
        self.q_proj = nn.Linear(config.hidden_size, self.heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=config.o_bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None

    def project(self, x: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [B, Hq, T, D], k and v [B, Hkv, T, D] of normed hidden states x [B, T, H]; rotary at positions pos.

        The ONNX export calls this too (export/onnx_export.py), so the two cannot drift.
        """
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None and self.k_norm is not None:  # Qwen3: per head, before rotary
            q, k = self.q_norm(q), self.k_norm(k)
        q = rotary(q.transpose(1, 2), pos, self.config.rope_theta)
        k = rotary(k.transpose(1, 2), pos, self.config.rope_theta)
        return q, k, v

    def forward(self, x: torch.Tensor, step: DecodeStep, cache: GazeCache | None) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.project(x, step.q_pos)
        if cache is not None:
            k, v = cache.append(self.layer, k, v)
        top_k = step.top_k if step.top_k is not None else self.config.layer_top_k(self.layer)
        result = gaze_attention(
            q, k, v, step.q_pos, step.gaze, step.keys, top_k, step.want_aux, q_context_image=step.q_context_image,
            routing=self.config.routing, context_attention=self.config.context_attention,
        )
        if step.coverage is not None:
            step.coverage.append(region_coverage(q, k, step.q_pos, step.gaze, step.keys, routing=self.config.routing))
        step.selections.append(result.selected)
        if result.aux_loss is not None:
            step.aux_losses.append(result.aux_loss)
        return self.o_proj(result.out.transpose(1, 2).reshape(b, t, -1))


class DecoderLayer(nn.Module):
    def __init__(self, config: GazeConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = GazeSelfAttention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def mlp(self, h: torch.Tensor) -> torch.Tensor:
        """SwiGLU of the post-attention-normed hidden states."""
        return self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))

    def forward(self, x: torch.Tensor, step: DecodeStep, cache: GazeCache | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), step, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


# ------------------------------------------------------------------ layout and cache


@dataclass
class DecodeStep:
    """What every layer of one forward call shares: query positions, flags and key layout."""

    q_pos: torch.Tensor  # [B, T]
    gaze: torch.Tensor  # [B, T] bool
    q_context_image: torch.Tensor  # [B, T] image/frame of a context token, -1 for every other token
    keys: KeyLayout
    top_k: int | None = None
    want_aux: bool = False
    selections: list[torch.Tensor | None] = field(default_factory=list)
    aux_losses: list[torch.Tensor] = field(default_factory=list)
    coverage: list[RegionCoverage] | None = None  # per layer, when the caller asks (gaze calibrate)


class GazeCache:
    """KV cache of the PyTorch reference model: keys/values per layer plus the token layout.

    Grows by concatenation (the deployment runtime preallocates instead). Tracks, per
    sequence, the next rotary position, how many image tokens were seen and whether its
    images are video frames, so that the layout of new tokens does not depend on how the
    prompt was split into calls.
    """

    def __init__(self, batch: int, num_layers: int, device: torch.device) -> None:
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        empty = torch.zeros(batch, 0, dtype=torch.long, device=device)
        self.pos = empty
        self.region = empty
        self.image = empty
        self.valid = empty.bool()
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.image_tokens_seen = torch.zeros(batch, dtype=torch.long, device=device)
        self.frames = torch.zeros(batch, dtype=torch.bool, device=device)

    def add(self, new: TokenPlacement) -> None:
        """Record the layout of the tokens this call appends (their keys follow, layer by layer)."""
        self.pos = torch.cat([self.pos, new.pos], 1)
        self.region = torch.cat([self.region, new.region], 1)
        self.image = torch.cat([self.image, new.image], 1)
        self.valid = torch.cat([self.valid, new.valid], 1)
        self.next_pos = self.next_pos + new.valid.sum(1)
        self.image_tokens_seen = new.image_tokens_seen

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        old_k, old_v = self.keys[layer], self.values[layer]
        if old_k is not None and old_v is not None:
            k, v = torch.cat([old_k, k], 2), torch.cat([old_v, v], 2)
        self.keys[layer], self.values[layer] = k, v
        return k, v

    @property
    def length(self) -> int:
        return self.pos.shape[1]


@dataclass
class TokenPlacement:
    """The layout of the new tokens of one call, [B, T] unless said otherwise."""

    pos: torch.Tensor  # rotary position
    region: torch.Tensor  # region id of a visual token, -1 otherwise
    valid: torch.Tensor  # False for padding
    image: torch.Tensor  # image/frame index (per sequence, from 0) of a visual or context token, -1 otherwise
    context_image: torch.Tensor  # image/frame index of a context token, -1 otherwise
    image_tokens_seen: torch.Tensor  # [B] image tokens seen up to and including these tokens


class TokenLayout:
    """Maps input ids to rotary positions, region ids (numbered across images) and image indices.

    Images count 0, 1, ... per sequence in order of appearance; a context token belongs to
    the image just before it. For a sequence whose images are the frames of one video
    (``frames``), frames are grouped ``region_frames`` at a time and a region is the same
    rectangle in every frame of its group; separate images always have regions of their own.
    """

    def __init__(self, config: GazeConfig) -> None:
        self.config = config
        rh, rw = config.region_size
        grid = config.grid_size
        self.region_of_token = torch.from_numpy(region_index_map(grid, grid, rh, rw))
        self.context_token_ids = torch.tensor(config.context_token_ids, dtype=torch.long)
        self.tokens_per_image = config.tokens_per_image
        self.regions_per_image = config.regions_per_image

    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        next_pos: torch.Tensor,
        image_tokens_seen: torch.Tensor,
        frames: torch.Tensor | None = None,
    ) -> TokenPlacement:
        """The layout of new tokens; ``frames`` [B] bool marks sequences whose images are video frames."""
        device = input_ids.device
        valid = attention_mask.bool()
        pos = (next_pos[:, None] + valid.long().cumsum(1) - 1).clamp(min=0)
        is_image = (input_ids == self.config.image_token_id) & valid
        is_context = torch.isin(input_ids, self.context_token_ids.to(device)) & valid
        seen = image_tokens_seen[:, None] + is_image.long().cumsum(1)  # image tokens up to and including each
        # The image a visual token is part of, or the last one before a context token (-1 before any
        # image: such a token is plain text).
        image = torch.div(seen - 1, self.tokens_per_image, rounding_mode="floor")
        within = (seen - 1).clamp(min=0) % self.tokens_per_image
        group = image.clamp(min=0) // self.frames_per_group(frames, input_ids.shape[0], device)[:, None]
        region = group * self.regions_per_image + self.region_of_token.to(device)[within]
        none = torch.full_like(region, -1)
        return TokenPlacement(
            pos=pos,
            region=torch.where(is_image, region, none),
            valid=valid,
            image=torch.where(is_image | is_context, image, none),
            context_image=torch.where(is_context & (image >= 0), image, none),
            image_tokens_seen=image_tokens_seen + is_image.sum(1),
        )

    def frames_per_group(self, frames: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
        """[B]: region_frames for a video, 1 for separate images."""
        if frames is None:
            return torch.ones(batch, dtype=torch.long, device=device)
        return torch.where(frames.to(device), self.config.region_frames, 1).long()

    def num_regions(self, image_tokens_seen: torch.Tensor, frames: torch.Tensor | None = None) -> int:
        """R: regions of the sequence with the most (a partly seen image or frame group counts whole)."""
        if not image_tokens_seen.numel():
            return 0
        images = -(-image_tokens_seen // self.tokens_per_image)
        groups = -(-images // self.frames_per_group(frames, images.shape[0], images.device))
        return int(groups.max()) * self.regions_per_image


# ----------------------------------------------------------------------------- model


@dataclass
class GazeOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    past_key_values: GazeCache | None = None
    selections: list[torch.Tensor | None] | None = None  # per layer [B, Hsel, T, R] (Hsel: Hkv or Hq by routing)
    coverage: list[RegionCoverage] | None = None  # per layer, with forward(coverage=True)


@dataclass
class GenerateOutput:
    sequences: torch.Tensor  # [B, new] generated ids (pad after eos)
    selections: list[list[torch.Tensor | None]] = field(default_factory=list)  # per step, per layer


class GazePreTrainedModel(PreTrainedModel):
    config_class = GazeConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, (VisionTower, SiglipTower)):
            nn.init.normal_(module.pos_embed, std=0.02)


class GazeForConditionalGeneration(GazePreTrainedModel):
    def __init__(self, config: GazeConfig) -> None:
        super().__init__(config)
        config.validate()
        self.vision = vision_tower(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.layout = TokenLayout(config)
        self.post_init()

    def new_cache(self, batch: int) -> GazeCache:
        return GazeCache(batch, self.config.num_hidden_layers, self.device)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with each image's visual embeddings placed at its ``<image>`` tokens.

        ``pixel_values`` [N, 3, H, W] holds the images of the whole batch in order of
        appearance (sequence 0's first, ...).
        """
        embeds = self.embed_tokens(input_ids)
        is_image = input_ids == self.config.image_token_id
        count = int(is_image.sum())
        if count == 0:
            return embeds
        if pixel_values is None or pixel_values.shape[0] * self.config.tokens_per_image != count:
            given = 0 if pixel_values is None else pixel_values.shape[0]
            raise ValueError(
                f"the prompt holds {count} image tokens ({count / self.config.tokens_per_image:g} images) "
                f"but {given} images were given"
            )
        visual = self.vision(pixel_values.to(embeds.dtype)).reshape(-1, self.config.hidden_size)
        return embeds.masked_scatter(is_image[..., None], visual)

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        gaze_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        past_key_values: GazeCache | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool = False,
        gaze_top_k: int | None = None,
        aux_loss: bool = False,
        coverage: bool = False,
        frames: torch.Tensor | None = None,
    ) -> GazeOutput:
        """One call over new tokens. ``gaze_mask`` [B, T] flags gaze queries (generated tokens).

        ``frames`` [B] bool: the images of sequence b are the frames of one video, in order
        (regions then span ``region_frames`` frames); a cache keeps it for later calls.
        ``gaze_top_k`` overrides the configured top_k (training curriculum, dense twin).
        ``coverage`` also returns, per layer, how much dense attention mass each budget k keeps
        (model/gaze_op.py RegionCoverage; `gaze calibrate` runs it with ``gaze_top_k`` = R).
        """
        batch, length = input_ids.shape
        device = input_ids.device
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if gaze_mask is None:
            gaze_mask = torch.zeros_like(input_ids, dtype=torch.bool)
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, pixel_values)
        cache = past_key_values
        if cache is None and use_cache:
            cache = self.new_cache(batch)
        if frames is None:
            frames = cache.frames if cache is not None else torch.zeros(batch, dtype=torch.bool, device=device)
        frames = frames.to(device=device, dtype=torch.bool)
        if frames.shape != (batch,):
            raise ValueError(f"frames must be one flag per sequence, shape ({batch},), got {tuple(frames.shape)}")
        next_pos = cache.next_pos if cache is not None else torch.zeros(batch, dtype=torch.long, device=device)
        seen = cache.image_tokens_seen if cache is not None else torch.zeros_like(next_pos)
        new = self.layout(input_ids, attention_mask, next_pos, seen, frames)
        num_regions = self.layout.num_regions(new.image_tokens_seen, frames)
        if cache is not None:
            cache.frames = frames
            cache.add(new)
            keys = KeyLayout(cache.pos, cache.region, cache.valid, num_regions, cache.image)
        else:
            keys = KeyLayout(new.pos, new.region, new.valid, num_regions, new.image)
        step = DecodeStep(q_pos=new.pos, gaze=gaze_mask & new.valid, q_context_image=new.context_image, keys=keys,
                          top_k=gaze_top_k, want_aux=aux_loss, coverage=[] if coverage else None)

        x = inputs_embeds
        for layer in self.layers:
            x = layer(x, step, cache)
        logits = self.lm_head(self.norm(x))

        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        aux = torch.stack(step.aux_losses).mean() if step.aux_losses else None
        return GazeOutput(
            logits=logits, loss=loss, aux_loss=aux, past_key_values=cache, selections=step.selections,
            coverage=step.coverage,
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        gaze_top_k: int | None = None,
        prefill_chunk: int | None = None,
        frames: torch.Tensor | None = None,
    ) -> GenerateOutput:
        """Reference generation with a KV cache: greedy, or sampling (temperature, top-k, top-p).

        ``prefill_chunk`` feeds the prompt in chunks of that many tokens (1 = token by token).
        ``frames`` [B] bool: sequence b's images are video frames (see ``forward``).
        """
        batch, length = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        generator = torch.Generator(device=input_ids.device)
        if seed is not None:
            generator.manual_seed(seed)
        embeds = self.embed(input_ids, pixel_values)
        cache = self.new_cache(batch)
        chunk = prefill_chunk or length
        for start in range(0, length, chunk):
            out = self(
                input_ids[:, start : start + chunk],
                attention_mask=attention_mask[:, start : start + chunk],
                inputs_embeds=embeds[:, start : start + chunk],
                past_key_values=cache,
                gaze_top_k=gaze_top_k,
                frames=frames,
            )
        eos, pad = self.config.eos_token_id, self.config.pad_token_id
        assert eos is not None and pad is not None, "config.json needs eos_token_id and pad_token_id"
        finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
        tokens: list[torch.Tensor] = []
        selections: list[list[torch.Tensor | None]] = []
        for _ in range(max_new_tokens):
            logits = out.logits[:, -1].float()
            logits[:, self.config.never_generated_ids] = float("-inf")
            next_token = sample_next_token(logits, do_sample, temperature, top_k, top_p, generator)
            next_token = torch.where(finished, torch.full_like(next_token, pad), next_token)
            tokens.append(next_token)
            finished |= next_token == eos
            if bool(finished.all()):
                break
            ids = next_token[:, None]
            out = self(
                ids,
                gaze_mask=torch.ones_like(ids, dtype=torch.bool),
                past_key_values=cache,
                gaze_top_k=gaze_top_k,
            )
            selections.append(out.selections or [])
        return GenerateOutput(sequences=torch.stack(tokens, 1), selections=selections)


def sample_next_token(
    logits: torch.Tensor,
    do_sample: bool,
    temperature: float,
    top_k: int,
    top_p: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """Greedy argmax, or a draw after temperature, top-k and top-p (nucleus) filtering."""
    if not do_sample or temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = torch.softmax(sorted_logits, -1).cumsum(-1)
        drop = cumulative - torch.softmax(sorted_logits, -1) >= top_p  # keep the token crossing top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    probs = torch.softmax(logits, -1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def count_parameters(model: nn.Module) -> int:
    return int(sum(np.prod(p.shape) for p in model.parameters()))


AutoConfig.register(GazeConfig.model_type, GazeConfig)
AutoModelForCausalLM.register(GazeConfig, GazeForConditionalGeneration)
