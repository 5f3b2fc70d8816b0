"""Per decode step: time outside the backend's session run, as a fraction of the step (aim < 10%).

    nice -n 15 .venv/bin/python bench/runtime_overhead.py EXPORT [--steps 200] [--json out.json]
Prints a table and writes JSON. Not a test.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from gaze_edge.runtime import GazeRuntime, Prompt, SamplingConfig, Timings


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("export", type=Path)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--images", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=Path("bench/runtime_overhead.json"))
    args = p.parse_args()
    rt = GazeRuntime.load(args.export, threads=args.threads)
    size = rt.shape.image_size
    imgs = [np.random.default_rng(i).integers(0, 255, (size, size, 3), dtype=np.uint8) for i in range(args.images)]
    rt.generate(Prompt(None, imgs), SamplingConfig(max_new_tokens=8, ignore_eos=True))  # warm up
    timings = Timings()
    for _ in rt.stream(Prompt(None, imgs), SamplingConfig(max_new_tokens=args.steps, ignore_eos=True),
                       timings=timings):
        pass
    step = np.asarray(timings.step_s) * 1e3
    session = np.asarray(timings.step_session_s) * 1e3
    outside = step - session
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": platform.machine(), "export": str(args.export),
        "steps": len(step), "threads": args.threads,
        "step_ms_median": float(np.median(step)), "session_ms_median": float(np.median(session)),
        "outside_ms_median": float(np.median(outside)),
        "outside_fraction_median": float(np.median(outside / step)),
        "outside_fraction_total": float(outside.sum() / step.sum()),
    }
    for k, v in result.items():
        print(f"{k:<26} {v:.4f}" if isinstance(v, float) else f"{k:<26} {v}")
    args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
