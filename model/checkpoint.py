"""Save and load Gaze checkpoints (Hugging Face layout), checking everything on the way in.

A checkpoint folder holds config.json, model.safetensors, tokenizer.json,
tokenizer_config.json and preprocessor_config.json. Loading never unpickles: tensors
come from safetensors only, and each problem (missing file, bad JSON, wrong model type,
missing or extra tensor, wrong shape or dtype, a config whose fp32 weights alone exceed this
machine's memory) is reported by name as CheckpointError, the last before torch allocates anything.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from gaze_edge.errors import CheckpointError
from gaze_edge.memory import check_weights_fit

from .configuration import GazeConfig
from .modeling import GazeForConditionalGeneration
from .processing import GazeProcessor, _read_json

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def save_checkpoint(model: GazeForConditionalGeneration, processor: GazeProcessor, path: str | Path) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.config.architectures = [type(model).__name__]
    (path / CONFIG_NAME).write_text(model.config.to_json_string(use_diff=False))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path / WEIGHTS_NAME), metadata={"format": "pt"})
    processor.save_pretrained(path)


def load_config(path: str | Path) -> GazeConfig:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder {path} does not exist")
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise CheckpointError(f"{path} has no {CONFIG_NAME}: is this a Hugging Face checkpoint folder?")
    data = _read_json(config_file)
    model_type = data.get("model_type")
    if model_type != GazeConfig.model_type:
        raise CheckpointError(
            f"{config_file}: model_type is {model_type!r}, expected {GazeConfig.model_type!r}; "
            "gaze-edge exports Gaze Attention checkpoints only"
        )
    if "context_attention" not in data:
        # Saved before spec v2, when context tokens attended causally: keep the behaviour it was trained with.
        data = {**data, "context_attention": "causal"}
    try:
        config = GazeConfig.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{config_file}: {exc}") from exc
    config.validate()
    # Before any tensor exists: a config whose weights alone exceed this machine's memory is refused by name.
    check_weights_fit(config.to_dict(), config_file, CheckpointError)
    return config


def load_checkpoint(
    path: str | Path, dtype: torch.dtype = torch.float32
) -> tuple[GazeForConditionalGeneration, GazeProcessor]:
    """The model (eval mode) and its processor; CheckpointError names whatever is wrong."""
    path = Path(path)
    config = load_config(path)
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{path} has no {WEIGHTS_NAME} (only safetensors weights are loaded, never pickle)")
    processor = GazeProcessor.from_pretrained(path)
    model = GazeForConditionalGeneration(config)
    expected = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(weights), framework="pt") as f:
            names = set(f.keys())
            missing = sorted(set(expected) - names)
            unexpected = sorted(names - set(expected))
            if missing or unexpected:
                raise CheckpointError(
                    f"{weights} does not match config.json: "
                    + (f"missing tensors {_shorten(missing)}" if missing else "")
                    + ("; " if missing and unexpected else "")
                    + (f"unexpected tensors {_shorten(unexpected)}" if unexpected else "")
                )
            for name in sorted(names):
                tensor = f.get_tensor(name)
                want = expected[name]
                if tuple(tensor.shape) != tuple(want.shape):
                    raise CheckpointError(
                        f"{weights}: tensor {name} has shape {tuple(tensor.shape)}, "
                        f"config.json implies {tuple(want.shape)}"
                    )
                if not tensor.dtype.is_floating_point:
                    raise CheckpointError(f"{weights}: tensor {name} has dtype {tensor.dtype}, expected floating point")
                state[name] = tensor
    except SafetensorError as exc:
        raise CheckpointError(f"{weights} is not a readable safetensors file ({exc}); it may be truncated") from exc
    except OSError as exc:
        raise CheckpointError(f"cannot read {weights}: {exc}") from exc
    model.load_state_dict(state, strict=True)
    torch.nn.Module.to(model, dtype=dtype)  # in place; PreTrainedModel.to has an odd type wrapper
    return model.eval(), processor


def _shorten(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")

