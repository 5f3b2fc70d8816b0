"""The Gaze Attention vision-language model in PyTorch.

ViT vision tower -> MLP projector -> visual embeddings placed at the prompt's
``<image>`` tokens, each image followed by learnable context tokens (``<ctx_i>``, whose
embeddings are ordinary trainable rows) -> Qwen2-style decoder (RMSNorm, rotary
embeddings, grouped-query attention, SwiGLU) whose attention is gaze attention
(model/gaze_op.py). Generated tokens are gaze queries; prompt, visual and context
tokens are dense queries.
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

# ----------------------------------------------------------------------------- vision


class VisionBlock(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class VisionTower(nn.Module):
    """Patchify -> learned positions -> pre-norm transformer -> projector to the decoder width."""

    def __init__(self, config: GazeConfig) -> None:
        super().__init__()
        dv = config.vision_hidden_size
        self.patch_embed = nn.Conv2d(3, dv, config.patch_size, stride=config.patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, config.tokens_per_image, dv))
        self.blocks = nn.ModuleList(
            VisionBlock(dv, config.vision_num_heads, config.vision_intermediate_size)
            for _ in range(config.vision_num_layers)
        )
        self.norm = nn.LayerNorm(dv)
        self.projector = nn.Sequential(
            nn.Linear(dv, config.hidden_size), nn.GELU(), nn.Linear(config.hidden_size, config.hidden_size)
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> [N, tokens_per_image, hidden] in row-major token order."""
        x = self.patch_embed(pixel_values).flatten(2).transpose(1, 2) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.projector(self.norm(x))


# ---------------------------------------------------------------------------- decoder


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in fp32: fp16 overflows here otherwise (see ARCHITECTURE.md pitfalls).
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
        self.q_proj = nn.Linear(config.hidden_size, self.heads * self.head_dim)
        self.k_proj = nn.Linear(config.hidden_size, self.kv_heads * self.head_dim)
        self.v_proj = nn.Linear(config.hidden_size, self.kv_heads * self.head_dim)
        self.o_proj = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, step: DecodeStep, cache: GazeCache | None) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q = rotary(q, step.q_pos, self.config.rope_theta)
        k = rotary(k, step.q_pos, self.config.rope_theta)
        if cache is not None:
            k, v = cache.append(self.layer, k, v)
        top_k = step.top_k if step.top_k is not None else self.config.layer_top_k(self.layer)
        result = gaze_attention(q, k, v, step.q_pos, step.gaze, step.keys, top_k, step.want_aux)
        if step.coverage is not None:
            step.coverage.append(region_coverage(q, k, step.q_pos, step.gaze, step.keys))
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

    def forward(self, x: torch.Tensor, step: DecodeStep, cache: GazeCache | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), step, cache)
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


# ------------------------------------------------------------------ layout and cache


@dataclass
class DecodeStep:
    """What every layer of one forward call shares: query positions, flags and key layout."""

    q_pos: torch.Tensor  # [B, T]
    gaze: torch.Tensor  # [B, T] bool
    keys: KeyLayout
    top_k: int | None = None
    want_aux: bool = False
    selections: list[torch.Tensor | None] = field(default_factory=list)
    aux_losses: list[torch.Tensor] = field(default_factory=list)
    coverage: list[RegionCoverage] | None = None  # per layer, when the caller asks (gaze calibrate)


class GazeCache:
    """KV cache of the PyTorch reference model: keys/values per layer plus the token layout.

    Grows by concatenation (the deployment runtime preallocates instead). Tracks, per
    sequence, the next rotary position and how many image tokens were seen, so that the
    layout of new tokens does not depend on how the prompt was split into calls.
    """

    def __init__(self, batch: int, num_layers: int, device: torch.device) -> None:
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        empty = torch.zeros(batch, 0, dtype=torch.long, device=device)
        self.pos = empty
        self.region = empty
        self.valid = empty.bool()
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.image_tokens_seen = torch.zeros(batch, dtype=torch.long, device=device)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        old_k, old_v = self.keys[layer], self.values[layer]
        if old_k is not None and old_v is not None:
            k, v = torch.cat([old_k, k], 2), torch.cat([old_v, v], 2)
        self.keys[layer], self.values[layer] = k, v
        return k, v

    @property
    def length(self) -> int:
        return self.pos.shape[1]


class TokenLayout:
    """Maps input ids to rotary positions and region ids (regions numbered across images)."""

    def __init__(self, config: GazeConfig) -> None:
        self.config = config
        rh, rw = config.region_size
        grid = config.grid_size
        self.region_of_token = torch.from_numpy(region_index_map(grid, grid, rh, rw))
        self.tokens_per_image = config.tokens_per_image
        self.regions_per_image = config.regions_per_image

    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        next_pos: torch.Tensor,
        image_tokens_seen: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Positions, regions and validity of new tokens [B, T], and image tokens seen after them."""
        valid = attention_mask.bool()
        pos = (next_pos[:, None] + valid.long().cumsum(1) - 1).clamp(min=0)
        is_image = (input_ids == self.config.image_token_id) & valid
        index = image_tokens_seen[:, None] + is_image.long().cumsum(1) - 1
        image_no = index.clamp(min=0) // self.tokens_per_image
        within = index.clamp(min=0) % self.tokens_per_image
        region = image_no * self.regions_per_image + self.region_of_token.to(input_ids.device)[within]
        region = torch.where(is_image, region, torch.full_like(region, -1))
        return pos, region, valid, image_tokens_seen + is_image.sum(1)

    def num_regions(self, image_tokens_seen: torch.Tensor) -> int:
        images = -(-int(image_tokens_seen.max()) // self.tokens_per_image) if image_tokens_seen.numel() else 0
        return images * self.regions_per_image


# ----------------------------------------------------------------------------- model


@dataclass
class GazeOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    past_key_values: GazeCache | None = None
    selections: list[torch.Tensor | None] | None = None  # per layer [B, Hkv, T, R]
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
        elif isinstance(module, VisionTower):
            nn.init.normal_(module.pos_embed, std=0.02)


class GazeForConditionalGeneration(GazePreTrainedModel):
    def __init__(self, config: GazeConfig) -> None:
        super().__init__(config)
        config.validate()
        self.vision = VisionTower(config)
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
    ) -> GazeOutput:
        """One call over new tokens. ``gaze_mask`` [B, T] flags gaze queries (generated tokens).

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
        next_pos = cache.next_pos if cache is not None else torch.zeros(batch, dtype=torch.long, device=device)
        seen = cache.image_tokens_seen if cache is not None else torch.zeros_like(next_pos)
        pos, region, valid, seen_after = self.layout(input_ids, attention_mask, next_pos, seen)
        if cache is not None:
            cache.pos = torch.cat([cache.pos, pos], 1)
            cache.region = torch.cat([cache.region, region], 1)
            cache.valid = torch.cat([cache.valid, valid], 1)
            cache.next_pos = next_pos + valid.sum(1)
            cache.image_tokens_seen = seen_after
            keys = KeyLayout(cache.pos, cache.region, cache.valid, self.layout.num_regions(seen_after))
        else:
            keys = KeyLayout(pos, region, valid, self.layout.num_regions(seen_after))
        step = DecodeStep(q_pos=pos, gaze=gaze_mask & valid, keys=keys, top_k=gaze_top_k, want_aux=aux_loss,
                          coverage=[] if coverage else None)

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
    ) -> GenerateOutput:
        """Reference generation with a KV cache: greedy, or sampling (temperature, top-k, top-p).

        ``prefill_chunk`` feeds the prompt in chunks of that many tokens (1 = token by token).
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
