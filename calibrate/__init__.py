"""Per-layer gaze budget and quantization calibration (issue 6; not built yet)."""
