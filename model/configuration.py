"""GazeConfig: the Hugging Face config of a Gaze Attention vision-language model."""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from gaze_edge.errors import CheckpointError
from gaze_edge.reference import CONTEXT_ATTENTIONS, ROUTINGS, regions_per_image

DECODER_STYLES = ("qwen2", "qwen3")
VISION_STYLES = ("vit", "siglip")


class GazeConfig(PretrainedConfig):
    """Vision tower + MLP projector + Qwen-style decoder with gaze attention.

    The family (docs/MODEL.md): ``decoder_style`` ``qwen2`` (biases on q/k/v, none on o, as
    transformers' Qwen2Attention) or ``qwen3`` (per-head RMSNorm on q and k before rotary;
    biases on q/k/v/o only with ``attention_bias``, as Qwen3Attention); ``vision_style``
    ``vit`` (the tiny built-in tower) or ``siglip`` (model/towers.py). ``image_suffix_token_ids``:
    tokens the processor puts after each image's visual tokens, before its context tokens
    (LLaVA-OneVision's image newline, as a vocabulary row); never generated.

    Gaze fields (semantics: docs/GAZE_SEMANTICS.md): ``region_size`` [rh, rw] in visual
    tokens, ``region_frames`` (rt) consecutive video frames per region, ``gaze_top_k`` (an
    int, or one per decoder layer) regions kept per gaze query, ``num_context_tokens``
    learnable tokens appended after each image/frame (their ids in ``context_token_ids``),
    ``routing`` and ``context_attention``.

    Defaults for new models: ``context_attention = "own_image"`` is the paper's (a context
    token summarises its own image); ``routing = "kv_head"`` keeps GQA's saving (one
    region read serves the whole group; ``query_head`` may read up to G times as many
    regions per KV head). The shipped checkpoints are trained with ``"own_image"``; a config.json
    without the field (saved before spec v2) loads as ``"causal"``, what it was trained with.
    """

    model_type = "gaze_vlm"

    def __init__(
        self,
        vocab_size: int = 64,
        hidden_size: int = 128,
        intermediate_size: int = 384,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        num_key_value_heads: int = 2,
        head_dim: int = 64,
        rms_norm_eps: float = 1e-6,
        rope_theta: float = 10000.0,
        max_position_embeddings: int = 4096,
        decoder_style: str = "qwen2",
        attention_bias: bool = False,
        image_size: int = 48,
        patch_size: int = 8,
        vision_hidden_size: int = 128,
        vision_intermediate_size: int = 256,
        vision_num_layers: int = 2,
        vision_num_heads: int = 4,
        vision_style: str = "vit",
        vision_layer_norm_eps: float = 1e-6,
        vision_post_layernorm: bool = True,
        region_size: tuple[int, int] | list[int] = (2, 2),
        gaze_top_k: int | list[int] = 2,
        num_context_tokens: int = 2,
        region_frames: int = 1,
        routing: str = "kv_head",
        context_attention: str = "own_image",
        image_token_id: int = 4,
        context_token_ids: list[int] | None = None,
        image_suffix_token_ids: list[int] | None = None,
        assistant_token_id: int | None = 3,
        pad_token_id: int = 0,
        bos_token_id: int | None = 1,
        eos_token_id: int = 2,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.max_position_embeddings = max_position_embeddings
        self.decoder_style = decoder_style
        self.attention_bias = attention_bias
        self.image_size = image_size
        self.patch_size = patch_size
        self.vision_hidden_size = vision_hidden_size
        self.vision_intermediate_size = vision_intermediate_size
        self.vision_num_layers = vision_num_layers
        self.vision_num_heads = vision_num_heads
        self.vision_style = vision_style
        self.vision_layer_norm_eps = vision_layer_norm_eps
        self.vision_post_layernorm = vision_post_layernorm
        self.region_size = list(region_size)
        self.gaze_top_k = list(gaze_top_k) if isinstance(gaze_top_k, (list, tuple)) else gaze_top_k
        self.num_context_tokens = num_context_tokens
        self.region_frames = region_frames
        self.routing = routing
        self.context_attention = context_attention
        self.image_token_id = image_token_id
        self.context_token_ids = (
            list(context_token_ids)
            if context_token_ids is not None
            else list(range(5, 5 + num_context_tokens))
        )
        self.image_suffix_token_ids = list(image_suffix_token_ids or [])
        self.assistant_token_id = assistant_token_id
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            **kwargs,
        )

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens_per_image(self) -> int:
        return self.grid_size * self.grid_size

    @property
    def regions_per_image(self) -> int:
        rh, rw = self.region_size
        return regions_per_image(self.grid_size, self.grid_size, rh, rw)

    @property
    def qk_norm(self) -> bool:
        """Per-head RMSNorm on queries and keys before rotary (Qwen3)."""
        return self.decoder_style == "qwen3"

    @property
    def qkv_bias(self) -> bool:
        return self.decoder_style == "qwen2" or bool(self.attention_bias)

    @property
    def o_bias(self) -> bool:
        return self.decoder_style == "qwen3" and bool(self.attention_bias)

    @property
    def never_generated_ids(self) -> list[int]:
        """Tokens generation never emits: padding, bos, the assistant marker, image, image-suffix and context tokens."""
        ids = [self.pad_token_id, self.bos_token_id, self.assistant_token_id, self.image_token_id,
               *self.image_suffix_token_ids, *self.context_token_ids]
        return sorted({int(i) for i in ids if i is not None and i != self.eos_token_id})

    def layer_top_k(self, layer: int) -> int:
        return self.gaze_top_k[layer] if isinstance(self.gaze_top_k, list) else self.gaze_top_k

    def validate(self) -> None:
        """Raise CheckpointError naming the first inconsistent field."""
        problems = []
        positive = (
            "vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads num_key_value_heads "
            "head_dim image_size patch_size vision_hidden_size vision_intermediate_size vision_num_layers "
            "vision_num_heads"
        ).split()
        for name in positive:
            value = getattr(self, name, None)
            if not isinstance(value, int) or value <= 0:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if not problems:
            if self.num_attention_heads % self.num_key_value_heads:
                problems.append(
                    f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                    f"num_key_value_heads ({self.num_key_value_heads})"
                )
            if self.image_size % self.patch_size and self.vision_style != "siglip":  # SigLIP drops the remainder
                problems.append(
                    f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})"
                )
            if self.vision_hidden_size % self.vision_num_heads:
                problems.append("vision_hidden_size must be a multiple of vision_num_heads")
        if (
            len(self.region_size) != 2
            or not all(isinstance(x, int) and x > 0 for x in self.region_size)
        ):
            problems.append(f"region_size must be two positive integers, got {self.region_size!r}")
        top_ks = self.gaze_top_k if isinstance(self.gaze_top_k, list) else [self.gaze_top_k]
        if not all(isinstance(k, int) and k > 0 for k in top_ks):
            problems.append(f"gaze_top_k must be a positive integer or a list of them, got {self.gaze_top_k!r}")
        if isinstance(self.gaze_top_k, list) and len(self.gaze_top_k) != self.num_hidden_layers:
            problems.append(
                f"gaze_top_k has {len(self.gaze_top_k)} entries but the model has "
                f"{self.num_hidden_layers} layers"
            )
        if not isinstance(self.region_frames, int) or isinstance(self.region_frames, bool) or self.region_frames < 1:
            problems.append(f"region_frames must be an integer >= 1 (video frames per region), "
                            f"got {self.region_frames!r}")
        if self.routing not in ROUTINGS:
            problems.append(f"routing must be one of {', '.join(map(repr, ROUTINGS))}, got {self.routing!r}")
        if self.context_attention not in CONTEXT_ATTENTIONS:
            problems.append(
                f"context_attention must be one of {', '.join(map(repr, CONTEXT_ATTENTIONS))}, got "
                f"{self.context_attention!r} (checkpoints trained before spec v2 need 'causal')"
            )
        if self.decoder_style not in DECODER_STYLES:
            problems.append(f"decoder_style must be one of {', '.join(map(repr, DECODER_STYLES))}, "
                            f"got {self.decoder_style!r}")
        if self.vision_style not in VISION_STYLES:
            problems.append(f"vision_style must be one of {', '.join(map(repr, VISION_STYLES))}, "
                            f"got {self.vision_style!r}")
        if len(self.context_token_ids) != self.num_context_tokens:
            problems.append("context_token_ids must list num_context_tokens ids")
        special = [self.image_token_id, *self.context_token_ids, *self.image_suffix_token_ids]
        if self.assistant_token_id is not None:
            special.append(self.assistant_token_id)
        if not problems and any(not 0 <= t < self.vocab_size for t in special):
            problems.append(f"special token ids {special} must lie inside vocab_size {self.vocab_size}")
        if problems:
            raise CheckpointError("invalid config.json: " + "; ".join(problems))


def llava_onevision_0_5b_config(num_hidden_layers: int = 24, vision_num_layers: int = 26) -> GazeConfig:
    """LLaVA-OneVision-0.5B's shapes (Qwen2-0.5B + SigLIP-so400m/14 at 384 px), for random weights.

    27 x 27 = 729 visual tokens per view; 3 x 3 regions give 81 regions per view and
    gaze_top_k 8 keeps about 10% of them.
    """
    return GazeConfig(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=14,
        num_key_value_heads=2,
        head_dim=64,
        rope_theta=1000000.0,
        max_position_embeddings=32768,
        image_size=378,
        patch_size=14,
        vision_hidden_size=1152,
        vision_intermediate_size=4304,
        vision_num_layers=vision_num_layers,
        vision_num_heads=16,
        vision_style="siglip",
        region_size=(3, 3),
        gaze_top_k=8,
        num_context_tokens=4,
        image_token_id=151646,
        context_token_ids=[151647, 151648, 151649, 151650],
        assistant_token_id=151651,
        pad_token_id=151643,
        bos_token_id=151643,
        eos_token_id=151645,
    )


def cambrian_4b_config(num_hidden_layers: int = 36, vision_num_layers: int = 27, gaze_top_k: int = 4) -> GazeConfig:
    """Cambrian-4B's shapes (the paper's model: Qwen3-4B + SigLIP2-So400m/16 at 512 px), for random weights.

    32 x 32 = 1024 visual tokens per image; 8 x 8-token regions give 16 regions per image, gaze_top_k 4 of
    them (the paper trains K = 2 / 4 / 8); 4 context tokens per image that attend to their own image only.
    Qwen3-4B: 36 layers, 32 query / 8 KV heads of 128, q/k RMSNorm (its tied embedding is held as a separate
    lm_head, as `gaze convert` writes a tied checkpoint); the special token ids
    are Qwen3's (no bos; image = <|image_pad|>), the context tokens take ids past its 151669 tokens.
    """
    return GazeConfig(
        vocab_size=151936,
        hidden_size=2560,
        intermediate_size=9728,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        max_position_embeddings=40960,
        decoder_style="qwen3",
        image_size=512,
        patch_size=16,
        vision_hidden_size=1152,
        vision_intermediate_size=4304,
        vision_num_layers=vision_num_layers,
        vision_num_heads=16,
        vision_style="siglip",
        region_size=(8, 8),
        gaze_top_k=gaze_top_k,
        num_context_tokens=4,
        context_attention="own_image",
        image_token_id=151655,
        context_token_ids=[151669, 151670, 151671, 151672],
        assistant_token_id=None,
        pad_token_id=151643,
        bos_token_id=None,
        eos_token_id=151645,
    )
