"""Vision towers: pixels -> visual embeddings at the decoder width, one per visual token.

Two styles (``GazeConfig.vision_style``), both ending in the same MLP projector
(LLaVA / LLaVA-OneVision's: Linear - GELU - Linear):

- ``vit``: the tiny built-in tower (fused qkv, exact GELU, LayerNorm eps 1e-5, final norm).
- ``siglip``: SigLIP's vision transformer (patch conv, learned position embeddings, no class
  token, pre-LayerNorm blocks with separate q/k/v/out projections, GELU-tanh MLP, optional
  post-LayerNorm). LLaVA models read the last encoder layer's hidden states, before
  SigLIP's post-LayerNorm, so a converted tower has ``vision_post_layernorm = False``.

Tokens come out in row-major order of the patch grid (image_size // patch_size per side;
SigLIP's convolution drops a remainder, e.g. 384 px at patch 14 gives 27 x 27).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .configuration import GazeConfig


def projector(config: GazeConfig) -> nn.Sequential:
    """The MLP projector from the vision width to the decoder width: Linear - GELU - Linear."""
    return nn.Sequential(
        nn.Linear(config.vision_hidden_size, config.hidden_size), nn.GELU(),
        nn.Linear(config.hidden_size, config.hidden_size),
    )


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
    """The ``vit`` style: patchify -> learned positions -> pre-norm transformer -> norm -> projector."""

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
        self.projector = projector(config)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> [N, tokens_per_image, hidden] in row-major token order."""
        x = self.patch_embed(pixel_values).flatten(2).transpose(1, 2) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.projector(self.norm(x))


class SiglipBlock(nn.Module):
    """SigLIP's encoder layer: x + attn(LN(x)), then x + fc2(gelu_tanh(fc1(LN(x))))."""

    def __init__(self, dim: int, heads: int, hidden: int, eps: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.norm1(x)
        q, k, v = (p(h).view(b, n, self.heads, d // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        a = F.scaled_dot_product_attention(q, k, v)
        x = x + self.out_proj(a.transpose(1, 2).reshape(b, n, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x)), approximate="tanh"))


class SiglipTower(nn.Module):
    """The ``siglip`` style: patch conv + learned positions (no class token) -> SigLIP blocks ->
    optional post-LayerNorm -> projector."""

    def __init__(self, config: GazeConfig) -> None:
        super().__init__()
        dv, eps = config.vision_hidden_size, config.vision_layer_norm_eps
        self.patch_embed = nn.Conv2d(3, dv, config.patch_size, stride=config.patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, config.tokens_per_image, dv))
        self.blocks = nn.ModuleList(
            SiglipBlock(dv, config.vision_num_heads, config.vision_intermediate_size, eps)
            for _ in range(config.vision_num_layers)
        )
        self.norm = nn.LayerNorm(dv, eps=eps) if config.vision_post_layernorm else None
        self.projector = projector(config)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> [N, tokens_per_image, hidden] in row-major token order."""
        x = self.patch_embed(pixel_values).flatten(2).transpose(1, 2) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        if self.norm is not None:
            x = self.norm(x)
        return self.projector(x)


def vision_tower(config: GazeConfig) -> VisionTower | SiglipTower:
    return SiglipTower(config) if config.vision_style == "siglip" else VisionTower(config)
