"""Names of the gaze::GazeAttention node, shared by export, build and runtime; no imports, so cheap."""

DOMAIN = "gaze"
OP_TYPE = "GazeAttention"
OPSET_VERSION = 1
PLUGIN_NAMESPACE = "gaze"
PLUGIN_VERSION = "1"
MIN_OPSET = 18  # ReduceMax with an axes input, Shape with start/end
