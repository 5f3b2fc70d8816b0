"""Checkpoint -> validated ONNX export with one gaze::GazeAttention node per layer (docs/ONNX_CONTRACT.md)."""
