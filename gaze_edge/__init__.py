"""gaze-edge: deploy Gaze Attention vision-language models on Jetson-class GPUs."""

from pathlib import Path

__version__ = "0.1.0"

#: The built-in default model, trained here on procedurally generated scenes.
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "checkpoints" / "gaze-tiny"
