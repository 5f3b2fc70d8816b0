"""Real-size random-weight model (LLaVA-OneVision-0.5B or Cambrian-4B shapes, few layers): TTFT and decode
tokens/s, gaze vs dense.

    nice -n 15 .venv/bin/python bench/real_size.py [--model onevision-0.5b|cambrian-4b] [--layers 2]
        [--work /tmp/gaze-real] [--json out.json]

Then `gaze profile WORK/gaze --project-layers 36 --json` gives the full model's bytes per token
(weights + KV, gaze vs dense) and the Jetson projection from the reduced export.

Exports (once, cached in --work) a gaze decoder (top_k 8 of 81 regions per view) and a dense
twin (top_k = R: every region), both over one shared vision graph and embedding table, then
runs the torch-free runtime (ONNX Runtime CPU) with one image and with 8 frames. This
script imports torch for the export only. Prints a table and writes JSON. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

MAX_IMAGES = 8


def processor_for(config: Any) -> Any:
    """A word-level processor whose special tokens carry the real config's ids (the model has random weights)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from gaze_edge.model.processing import CHAT_TEMPLATE, PROMPT_WORDS, GazeProcessor, ImageConfig

    ctx = [f"<ctx_{i}>" for i in range(config.num_context_tokens)]
    # A config without an assistant token (Qwen3's ChatML has none): the word-level template's <assistant> takes
    # the id after the context tokens (random weights: any unused id will do).
    assistant = config.assistant_token_id if config.assistant_token_id is not None else max(
        config.context_token_ids) + 1
    vocab = {"<pad>": config.pad_token_id, "<bos>": config.pad_token_id + 1, "<eos>": config.eos_token_id,
             "<assistant>": assistant, "<image>": config.image_token_id, "<unk>": 0}
    vocab.update({t: i for t, i in zip(ctx, config.context_token_ids, strict=True)})
    vocab.update({w: 1 + i for i, w in enumerate(PROMPT_WORDS)})
    used = set(vocab.values())  # fill the holes: tokenizers warns (loudly) about a vocabulary with gaps
    vocab.update({f"<unused_{i}>": i for i in range(max(used) + 1) if i not in used})
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens([t for t in vocab if t.startswith("<") and not t.startswith("<unused")])
    return GazeProcessor(tokenizer, ImageConfig(image_size=config.image_size), CHAT_TEMPLATE,
                         config.tokens_per_image, ctx)


MODELS = ("onevision-0.5b", "cambrian-4b")


def model_config(name: str, layers: int) -> Any:
    from gaze_edge.model.configuration import cambrian_4b_config, llava_onevision_0_5b_config

    make = {"onevision-0.5b": llava_onevision_0_5b_config, "cambrian-4b": cambrian_4b_config}[name]
    return make(num_hidden_layers=layers, vision_num_layers=1)


def export(work: Path, layers: int, max_images: int = MAX_IMAGES, kinds: tuple[str, ...] = ("gaze", "dense"),
           max_seq_len: int = 8192, model_name: str = "onevision-0.5b") -> dict[str, Path]:
    """Export folders {'gaze': ..., 'dense': ...} unless already there (dense: the same weights, top_k = R)."""
    folders = {kind: work / kind for kind in kinds}
    if all((f / "gaze_config.json").is_file() for f in folders.values()):
        return folders
    import torch

    from gaze_edge.export import onnx_export as ox
    from gaze_edge.export.cli import decoder_weight_bytes, runtime_config
    from gaze_edge.model.modeling import GazeForConditionalGeneration

    torch.manual_seed(0)
    config = model_config(model_name, layers)
    model = GazeForConditionalGeneration(config).eval()
    processor = processor_for(config)
    shared = work / "shared"
    shared.mkdir(parents=True, exist_ok=True)
    ox.export_vision(model, shared / "vision.onnx", opset=18, external_data=True)
    ox.export_embeddings(model, shared / "embed_tokens.npy")
    for kind, folder in folders.items():
        folder.mkdir(parents=True, exist_ok=True)
        if kind == "dense":  # the same weights with top_k = R: every region of every view is read
            model.config.gaze_top_k = max_images * config.regions_per_image
        ox.export_decoder(model, folder / "decoder.onnx", max_images=max_images, opset=18, external_data=True)
        for name in ("vision.onnx", "vision.onnx.data", "embed_tokens.npy"):
            target = folder / name
            if not target.exists():  # hard links: the runtime refuses symlinks that leave an export folder
                os.link(shared / name, target)
        processor.save_pretrained(folder)
        args = SimpleNamespace(max_images=max_images, dtype="fp32", opset=18, trt_compat=False,
                               gaze_map_outputs=False)
        runtime = runtime_config(model.config, processor, args, max_seq_len)
        runtime["model"]["decoder"]["weights"] = decoder_weight_bytes(model, 4)
        (folder / "gaze_config.json").write_text(json.dumps(runtime))
    return folders


def run(folder: Path, images: int, new_tokens: int, threads: int, chunk: int) -> dict[str, Any]:
    from gaze_edge.runtime import GazeRuntime, Prompt, SamplingConfig, Timings

    rt = GazeRuntime.load(folder, threads=threads)
    size = rt.shape.image_size
    pictures = [np.random.default_rng(i).integers(0, 255, (size, size, 3), dtype=np.uint8) for i in range(images)]
    timings = Timings()
    steps = sum(1 for _ in rt.stream(Prompt(None, pictures, frames=images > 1),
                                     SamplingConfig(max_new_tokens=new_tokens, ignore_eos=True),
                                     prefill_chunk=chunk, timings=timings))
    out = timings.as_dict()
    out.update(new_tokens=steps, prompt_tokens=rt.backend.spec.capacity - new_tokens if rt.backend.spec else None,
               top_k=list(rt.shape.top_k_per_layer)[:1])
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", choices=MODELS, default="onevision-0.5b")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--max-images", type=int, default=MAX_IMAGES)
    p.add_argument("--max-seq-len", type=int, default=8192)
    p.add_argument("--work", type=Path, default=Path("/tmp/gaze-real"))
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--chunk", type=int, default=512, help="prefill chunk (grown to hold whole images)")
    p.add_argument("--json", type=Path, default=Path("bench/real_size.json"))
    p.add_argument("--clean", action="store_true", help="remove the exports afterwards")
    args = p.parse_args()
    start = time.perf_counter()
    folders = export(args.work, args.layers, args.max_images, max_seq_len=args.max_seq_len, model_name=args.model)
    print(f"exports ready in {time.perf_counter() - start:.0f} s", flush=True)
    rows = []
    for images in sorted({1, args.max_images}):
        for kind in ("gaze", "dense"):
            r = run(folders[kind], images, args.new_tokens, args.threads, args.chunk)
            rows.append({"kind": kind, "views": images, **r})
            print(f"{kind:<6} views {images}  prompt {r['prompt_tokens']:>5}  TTFT {r['ttft_ms']:9.1f} ms  "
                  f"decode {r['decode_ms_per_token_median']:8.2f} ms/token (p90 {r['decode_ms_per_token_p90']:.2f})"
                  f"  {r['decode_tokens_per_s']:7.2f} tok/s", flush=True)
    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": f"{platform.machine()}, 2 shared CPU cores",
              "model": args.model, "layers": args.layers, "threads": args.threads, "rows": rows}
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.clean:
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
