"""optimum-onnx description of the gaze_vlm decoder: input/output specs and dummy inputs.

optimum serves here as the declarative description (names, dynamic axes, dummy inputs for
validation); the export itself goes through torch.onnx's dynamo exporter because
optimum's export entry points cannot emit the custom ``gaze::GazeAttention`` node nor
attach its FunctionProto (docs/ONNX_CONTRACT.md, "Where optimum serves").
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from optimum.exporters.onnx.base import OnnxConfig
from optimum.utils import DummyInputGenerator, NormalizedConfig

from gaze_edge.runtime.cache import SlotState

from .node import DECODER_CALL_INPUTS, max_region_tokens
from .onnx_export import DecoderSpec


class GazeDecoderDummyInputGenerator(DummyInputGenerator):
    """A consistent first prefill call: empty cache, new tokens at slot 0 (a text token, then visual tokens).

    The layout tables come from the runtime's own SlotState, so they are what a runtime would pass.
    """

    SUPPORTED_INPUT_NAMES = (*DECODER_CALL_INPUTS, "past_key_values")

    def __init__(self, task: str, normalized_config: NormalizedConfig, batch_size: int = 2,
                 sequence_length: int = 7, cache_length: int = 11, max_images: int = 1, **kwargs: Any) -> None:
        self.config = normalized_config.config
        self.batch, self.length, self.slots, self.max_images = batch_size, sequence_length, cache_length, max_images
        c, b, t = self.config, self.batch, self.length
        self.layout = SlotState(b, self.slots, max_images * c.regions_per_image, max_region_tokens(c))
        region = np.full((b, t), -1, dtype=np.int64)
        region[:, 1:] = np.arange(t - 1) % c.regions_per_image
        pos = np.broadcast_to(np.arange(t), (b, t))
        self.layout.write(pos, region, np.ones((b, t), dtype=bool), np.where(region >= 0, 0, -1))

    def supports_input(self, input_name: str) -> bool:
        return any(input_name.startswith(name) for name in self.SUPPORTED_INPUT_NAMES)

    def generate(self, input_name: str, framework: str = "pt", int_dtype: str = "int64",
                 float_dtype: str = "fp32") -> torch.Tensor:
        if framework != "pt":
            raise ValueError("only PyTorch dummy inputs are provided")
        dtype = torch.float16 if float_dtype == "fp16" else torch.float32
        c, b, t, s = self.config, self.batch, self.length, self.slots
        tables = self.layout.tables()
        if input_name == "inputs_embeds":
            return torch.randn(b, t, c.hidden_size, dtype=dtype)
        if input_name == "logits_positions":
            return torch.tensor([t - 1], dtype=torch.int64)
        if input_name in tables:
            return torch.from_numpy(np.array(tables[input_name]))
        if input_name == "gaze":
            return torch.zeros(b, t, dtype=torch.bool)
        if input_name == "write_offset":
            return torch.zeros(1, dtype=torch.int64)
        if input_name.endswith(".desc"):
            regions = self.max_images * c.regions_per_image
            return torch.zeros(b, c.num_key_value_heads, regions, c.head_dim, dtype=torch.float32)
        return torch.zeros(b, c.num_key_value_heads, s, c.head_dim, dtype=dtype)


class GazeDecoderOnnxConfig(OnnxConfig):
    """The decoder graph of model_type gaze_vlm (docs/ONNX_CONTRACT.md)."""

    NORMALIZED_CONFIG_CLASS = NormalizedConfig
    DUMMY_INPUT_GENERATOR_CLASSES = (GazeDecoderDummyInputGenerator,)
    DEFAULT_ONNX_OPSET = 18
    ATOL_FOR_VALIDATION = 1e-4

    def __init__(self, config: Any, task: str = "text-generation", max_images: int = 1, **kwargs: Any) -> None:
        super().__init__(config, task=task, **kwargs)
        self.spec = DecoderSpec(config.num_hidden_layers, config.num_key_value_heads, config.head_dim,
                                max_images * config.regions_per_image, max_region_tokens(config))
        self.max_images = max_images

    def _create_dummy_input_generator_classes(self, **kwargs: Any) -> list[DummyInputGenerator]:
        return [GazeDecoderDummyInputGenerator(self.task, self._normalized_config, max_images=self.max_images,
                                               **kwargs)]

    @property
    def inputs(self) -> dict[str, dict[int, str]]:
        axes: dict[str, dict[int, str]] = {
            "inputs_embeds": {0: "batch", 1: "sequence_length"},
            "logits_positions": {0: "logits_length"},
            "write_offset": {},
            "slot_pos": {0: "batch", 1: "cache_length"},
            "slot_valid": {0: "batch", 1: "cache_length"},
            "slot_region": {0: "batch", 1: "cache_length"},
            "slot_image": {0: "batch", 1: "cache_length"},
            "gaze": {0: "batch", 1: "sequence_length"},
            "dense_slots": {0: "batch", 1: "dense_length"},
            "region_slots": {0: "batch"},
            "region_count": {0: "batch"},
            "region_last": {0: "batch"},
        }
        for layer in range(self.spec.num_layers):
            key, value, desc = self.spec.past_names(layer)
            axes.update({key: {0: "batch", 2: "cache_length"}, value: {0: "batch", 2: "cache_length"},
                         desc: {0: "batch"}})
        return axes

    @property
    def outputs(self) -> dict[str, dict[int, str]]:
        axes: dict[str, dict[int, str]] = {"logits": {0: "batch", 1: "logits_length"}}
        for layer in range(self.spec.num_layers):
            key, value, desc = self.spec.present_names(layer)
            axes.update({key: {0: "batch", 2: "cache_length"}, value: {0: "batch", 2: "cache_length"},
                         desc: {0: "batch"}})
        return axes
