"""Torch-free runtime: export folder, static KV cache, sampling, one decode loop over pluggable backends.

    from gaze_edge.runtime import GazeRuntime, Prompt, SamplingConfig
    rt = GazeRuntime.load("out/")                      # checks the folder, creates the ONNX Runtime backend
    rt.caption("cat.jpg")                              # one caption
    for step in rt.stream(Prompt(None, ["a.jpg"])):    # tokens as they come
        print(step.texts[0], end=" ")
"""

from .backend import Backend, BackendError, OrtBackend, create_backend
from .folder import ExportFolder, ExportFolderError
from .generate import GazeRuntime, Generation, Prompt, Step, Timings
from .sampling import SamplingConfig

__all__ = ["Backend", "BackendError", "ExportFolder", "ExportFolderError", "GazeRuntime", "Generation",
           "OrtBackend", "Prompt", "SamplingConfig", "Step", "Timings", "create_backend"]
