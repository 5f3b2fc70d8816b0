"""Names of the gaze::GazeAttention node, shared by export, build and runtime; no imports, so cheap."""

DOMAIN = "gaze"
OP_TYPE = "GazeAttention"
OPSET_VERSION = 2  # v2: context tokens may see only their own image, per-query-head routing, runtime-owned tables
PLUGIN_NAMESPACE = "gaze"
PLUGIN_VERSION = "2"
MIN_OPSET = 18  # ReduceMax with an axes input, Shape with start/end
#: decoder.onnx metadata_props key: the nodes' top_k per layer as a JSON list. The runtime compares it with
#: gaze_config.json's gaze.top_k_per_layer (ONNX Runtime exposes metadata without parsing the graph), so a
#: folder whose two copies disagree (an interrupted `gaze calibrate`) is refused instead of run.
TOP_K_METADATA = "gaze_edge.top_k_per_layer"
#: INT attribute values of the node (docs/ONNX_CONTRACT.md): TensorRT's parser passes INT fields as int32,
#: which every plugin reads without string handling.
ROUTING = {"kv_head": 0, "query_head": 1}
CONTEXT_ATTENTION = {"causal": 0, "own_image": 1}
#: The decoder's per-call inputs, in graph order (docs/ONNX_CONTRACT.md); the past cache tensors follow.
DECODER_CALL_INPUTS = ("inputs_embeds", "logits_positions", "write_offset", "slot_pos", "slot_valid", "slot_region",
                       "slot_image", "gaze", "dense_slots", "region_slots", "region_count", "region_last")


def max_region_tokens(config: object) -> int:
    """M: the most tokens one region holds (rh * rw, times region_frames for video)."""
    rh, rw = config.region_size  # type: ignore[attr-defined]
    return int(rh * rw * getattr(config, "region_frames", 1))
