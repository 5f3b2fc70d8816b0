"""Calibration for deployment: the per-layer gaze budget (`gaze calibrate`, budget.py) and INT8 quantization
(`gaze quantize`, quantize.py), both fed by the same calibration images (data.py)."""
