"""Names of the gaze::GazeAttention node, shared by export, build and runtime; no imports, so cheap."""

DOMAIN = "gaze"
OP_TYPE = "GazeAttention"
OPSET_VERSION = 1
PLUGIN_NAMESPACE = "gaze"
PLUGIN_VERSION = "1"
MIN_OPSET = 18  # ReduceMax with an axes input, Shape with start/end
#: decoder.onnx metadata_props key: the nodes' top_k per layer as a JSON list. The runtime compares it with
#: gaze_config.json's gaze.top_k_per_layer (ONNX Runtime exposes metadata without parsing the graph), so a
#: folder whose two copies disagree (an interrupted `gaze calibrate`) is refused instead of run.
TOP_K_METADATA = "gaze_edge.top_k_per_layer"
