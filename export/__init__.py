"""Checkpoint -> ONNX export with GazeAttention nodes (issue 3; not built yet)."""
