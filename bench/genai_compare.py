"""Our dense decoder vs onnxruntime-genai on the same shapes: CPU, fp32, ms per decode token, batch 1 and 4.

    nice -n 15 .venv/bin/python bench/genai_compare.py [--work /tmp/genai-compare] [--threads 1,2]
        [--batch 1,4] [--contexts 1000,6000] [--warmup 3] [--repeats 60] [--json bench/genai_compare.json]
        [--profile-steps 8] [--profile-context 6000]

Set-up (once): `.venv/bin/pip install -r bench/requirements-genai.txt` (onnxruntime-genai next to
requirements.lock's onnxruntime), and a builder venv for the model builder, which needs transformers 5.x
(bench/requirements-genai-builder.txt says how; --builder-python points elsewhere).

Shapes: LLaVA-OneVision-0.5B's decoder (Qwen2-0.5B widths: hidden 896, 14 query / 2 KV heads,
head dim 64, intermediate 4864, vocab 151936), 2 layers, random weights.

- Ours: `model.configuration.llava_onevision_0_5b_config(num_hidden_layers=2, vision_num_layers=1)`
  exported once (cached in --work/ours) with GazeAttention node version 2, run with the torch-free
  runtime (`GazeRuntime.load(folder, threads=T, spinning=False)`). "dense" = `stream(..., gaze=False)`
  (causal attention over every cached token), "gaze" = the same export's gaze decode (top_k 8 of
  81 regions per view). The context is set by the number of images (1 image = 729 visual + 4 context
  tokens) plus filler words in the prompt text, to land near each --contexts target.
- onnxruntime-genai: a transformers Qwen2ForCausalLM with the same config and random weights,
  saved with save_pretrained (no hub), converted by `python -m onnxruntime_genai.models.builder
  -i HF -o OUT -p fp32 -e cpu --extra_options prune_lm_head=true` (last-token logits in prefill, as
  ours), cached in --work/genai. Its prompt: random token ids of exactly our prompt's length (one
  append_tokens call), then forced decode tokens (min_length = max_length).
- Both run in this one process on the same onnxruntime shared library (onnxruntime-genai loads the
  onnxruntime package's), thread spinning off in both (`session.intra_op.allow_spinning` = 0;
  genai: a config entry in genai_config.json's decoder session_options), intra-op threads T in
  both. The decode steps are interleaved: one token of ours dense, one of ours gaze, one of genai,
  again and again, after warm-up tokens; medians and p90 of each side's per-token wall time.
- Then (--profile-steps) ORT's profiler on our dense decode step: top ops by time.

This script imports torch/transformers for building the models only. Prints a table and writes JSON.
Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_size import MAX_IMAGES, processor_for  # noqa: E402  (bench/ is not a package)

LAYERS = 2
MAX_SEQ_LEN = 8192  # both sides' cache capacity limit (ours: context_length; genai: max_length)
FILLER = "what is in this image ?"  # prompt words the processor knows (each one token)


# ------------------------------------------------------------------------------------------ models


def _config() -> Any:
    from gaze_edge.model.configuration import llava_onevision_0_5b_config

    return llava_onevision_0_5b_config(num_hidden_layers=LAYERS, vision_num_layers=1)


def export_ours(work: Path) -> Path:
    """One export folder (gaze decoder, top_k 8; dense = the same export with gaze off), cached."""
    folder = work / "ours"
    if (folder / "gaze_config.json").is_file():
        return folder
    import torch

    from gaze_edge.export import onnx_export as ox
    from gaze_edge.export.cli import runtime_config
    from gaze_edge.model.modeling import GazeForConditionalGeneration

    torch.manual_seed(0)
    config = _config()
    model = GazeForConditionalGeneration(config).eval()
    processor = processor_for(config)
    partial = work / "ours.partial"
    partial.mkdir(parents=True, exist_ok=True)
    ox.export_vision(model, partial / "vision.onnx", opset=18, external_data=True)
    ox.export_embeddings(model, partial / "embed_tokens.npy")
    ox.export_decoder(model, partial / "decoder.onnx", max_images=MAX_IMAGES, opset=18, external_data=True)
    processor.save_pretrained(partial)
    args = SimpleNamespace(max_images=MAX_IMAGES, dtype="fp32", opset=18, trt_compat=False, gaze_map_outputs=False)
    (partial / "gaze_config.json").write_text(json.dumps(runtime_config(model.config, processor, args, MAX_SEQ_LEN)))
    partial.rename(folder)
    return folder


def _write_tokenizer(folder: Path, vocab_size: int, eos: int, pad: int) -> None:
    """A word-level tokenizer over the whole id range (genai loads tokenizer files; we feed ids directly)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": f"t{eos}", "pad_token": f"t{pad}",
        "bos_token": None, "unk_token": "t0", "model_max_length": MAX_SEQ_LEN}))


BUILDER_VENV = Path("/tmp/genai-build-venv/bin/python")


def find_builder_python(given: str | None) -> str:
    """A python whose transformers the genai 0.18 builder can import (it needs 5.x; requirements.lock has 4.57)."""
    if given:
        return given
    if BUILDER_VENV.exists():
        return str(BUILDER_VENV)
    import importlib.util

    if importlib.util.find_spec("transformers.models.qwen3_5") is not None:
        return sys.executable
    raise SystemExit("onnxruntime-genai's model builder needs transformers 5.x (this venv has requirements.lock's "
                     f"4.57); set up {BUILDER_VENV.parent.parent} as bench/requirements-genai-builder.txt says, "
                     "or pass --builder-python")


def build_genai(work: Path, builder_python: str | None) -> Path:
    """A same-shaped Qwen2ForCausalLM (random weights) -> onnxruntime-genai's model builder, fp32 CPU; cached."""
    out = work / "genai"
    if (out / "genai_config.json").is_file():
        return out
    builder = find_builder_python(builder_python)
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    ours = _config()
    hf = work / "hf-qwen2"
    if not (hf / "config.json").is_file():
        torch.manual_seed(0)
        cfg = Qwen2Config(vocab_size=ours.vocab_size, hidden_size=ours.hidden_size,
                          intermediate_size=ours.intermediate_size, num_hidden_layers=LAYERS,
                          num_attention_heads=ours.num_attention_heads, num_key_value_heads=ours.num_key_value_heads,
                          head_dim=ours.head_dim, rope_theta=ours.rope_theta, rms_norm_eps=ours.rms_norm_eps,
                          max_position_embeddings=ours.max_position_embeddings, tie_word_embeddings=False,
                          bos_token_id=ours.bos_token_id, eos_token_id=ours.eos_token_id,
                          pad_token_id=ours.pad_token_id, torch_dtype="float32")
        model = Qwen2ForCausalLM(cfg).eval()  # random init; tie_word_embeddings False like ours (own lm_head)
        hf.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(hf, safe_serialization=True)
        _write_tokenizer(hf, ours.vocab_size, ours.eos_token_id, ours.pad_token_id)
    partial = work / "genai.partial"
    cmd = [builder, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(partial),
           "-p", "fp32", "-e", "cpu", "-c", str(work / "genai-cache"), "--extra_options", "prune_lm_head=true"]
    print("building:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    version = subprocess.run([builder, "-c", "import transformers; print(transformers.__version__)"],
                             check=True, capture_output=True, text=True).stdout.strip()
    (partial / "builder.json").write_text(json.dumps({"python": builder, "transformers": version,
                                                      "command": cmd}, indent=2))
    partial.rename(out)
    return out


def set_genai_session(folder: Path, threads: int, profile: str | None = None) -> None:
    """decoder session_options in genai_config.json: T intra-op threads, 1 inter-op, no spinning."""
    path = folder / "genai_config.json"
    config = json.loads(path.read_text())
    options = config["model"]["decoder"].setdefault("session_options", {})
    options.update({"intra_op_num_threads": threads, "inter_op_num_threads": 1,
                    "session.intra_op.allow_spinning": "0", "log_severity_level": 3})
    options.pop("enable_profiling", None)
    if profile:
        options["enable_profiling"] = profile
    config["search"]["max_length"] = MAX_SEQ_LEN
    config["model"]["context_length"] = max(config["model"]["context_length"], MAX_SEQ_LEN)
    path.write_text(json.dumps(config, indent=2))


# ------------------------------------------------------------------------------------------ sides


def _pictures(count: int, size: int) -> list[np.ndarray]:
    return [np.random.default_rng(i).integers(0, 255, (size, size, 3), dtype=np.uint8) for i in range(count)]


def our_prompts(rt: Any, target: int, batch: int) -> tuple[list[Any], int]:
    """B equal prompts near `target` tokens: the most views that fit (<= MAX_IMAGES) + filler words; their length."""
    from gaze_edge.runtime import Prompt

    views = max(1, min(MAX_IMAGES, (target - 16) // rt.shape.tokens_per_image))
    pictures = _pictures(views, rt.shape.image_size)
    frames = views > 1

    def prompt(filler_words: int) -> Any:
        words = (FILLER.split() * (filler_words // len(FILLER.split()) + 1))[:filler_words]
        base = "describe the frames ." if frames else "describe the image ."
        return Prompt(" ".join([*words, base]), pictures, frames=frames)

    length = rt.encode([prompt(0)])[0].shape[1]
    p = prompt(max(0, target - length))
    length = rt.encode([p])[0].shape[1]
    return [p] * batch, int(length)


SHRINK = "memory.enable_memory_arena_shrinkage"  # ORT run option: give free arena memory back after the run


class _ShrinkingRuns:
    """Our decoder session, its runs with arena shrinkage while `shrink` (the prefill; decode steps run plain).

    ORT's CPU arena keeps its peak: our batch-4 6000-token prefill peaks near 9 GB, genai's near 8 GB,
    so three prefilled sessions held at once do not fit this 23 GB machine. Shrinking after the
    (untimed) prefill runs frees that; the timed decode runs are the runtime's own call unchanged.
    """

    def __init__(self, session: Any) -> None:
        import onnxruntime as ort

        self.session, self.shrink = session, True
        self.options = ort.RunOptions()
        self.options.add_run_config_entry(SHRINK, "cpu:0")

    def run_with_iobinding(self, io: Any, run_options: Any = None) -> None:
        self.session.run_with_iobinding(io, self.options if self.shrink else run_options)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.session, name)


class OurSide:
    """One stream of our runtime: next() = one decode token (the first call: prefill + first token, untimed)."""

    def __init__(self, rt: Any, prompts: list[Any], tokens: int, gaze: bool) -> None:
        from gaze_edge.runtime import SamplingConfig, Timings

        session = rt.backend.decoder
        runs = _ShrinkingRuns(session)
        rt.backend.decoder = runs
        self.timings = Timings()
        self.stream = rt.stream(prompts, SamplingConfig(max_new_tokens=tokens, ignore_eos=True), prefill_chunk=512,
                                timings=self.timings, gaze=gaze)
        start = time.perf_counter()
        try:
            next(self.stream)
        finally:
            rt.backend.decoder = session  # decode steps call the session itself, as the runtime does
        self.prefill_s = time.perf_counter() - start

    def __call__(self) -> None:
        next(self.stream)

    def close(self) -> None:
        self.stream.close()


class GenaiSide:
    """An og.Generator after a prompt of random ids [B, L]; call = generate_next_token (one decode step)."""

    def __init__(self, og: Any, model: Any, batch: int, length: int, tokens: int, vocab: int, seed: int = 0) -> None:
        params = og.GeneratorParams(model)
        total = length + tokens
        # One prefill call (genai's search.chunk_size chunking refuses batch > 1: "batch_size must be 1 for
        # continuous decoding"); on CPU GroupQueryAttention then holds B x 14 x L x max_length fp32 scores
        # (8 GB at batch 4, 6000 tokens) for the prefill only.
        params.set_search_options(batch_size=batch, max_length=total, min_length=total, do_sample=False)
        self.generator = og.Generator(model, params)
        ids = np.random.default_rng(seed).integers(0, vocab - 1024, (batch, length), dtype=np.int32)
        start = time.perf_counter()
        self.generator.set_runtime_option(SHRINK, "cpu:0")  # as ours: free the prefill's arena peak afterwards
        self.generator.append_tokens(ids)  # prefill
        self.generator.set_runtime_option(SHRINK, "")  # decode runs: no shrinkage
        self.generator.generate_next_token()  # picks the first token from the prefill logits: no model run
        self.prefill_s = time.perf_counter() - start

    def __call__(self) -> None:
        self.generator.generate_next_token()  # runs the model on the last token, then greedy search

    def close(self) -> None:
        del self.generator


def interleaved(sides: dict[str, Any], warmup: int, repeats: int) -> dict[str, list[float]]:
    """One token of each side per round, the order rotated every round; warm-up rounds untimed."""
    names = list(sides)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            start = time.perf_counter()
            sides[name]()
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def stats(seconds: list[float]) -> dict[str, float]:
    a = np.asarray(seconds, dtype=np.float64) * 1e3
    return {"median_ms": float(np.median(a)), "p90_ms": float(np.percentile(a, 90)), "n": int(a.size)}


# ---------------------------------------------------------------------------------------- profiles


def top_ops(profile_file: Path, runs: int, top: int = 12) -> dict[str, Any]:
    """Node kernel times of the last `runs` model runs of an ORT profile: by op type and by node, per run."""
    events = json.loads(profile_file.read_text())
    model_runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                        key=lambda e: e["ts"])[-runs:]
    windows = [(e["ts"], e["ts"] + e["dur"]) for e in model_runs]
    by_type: dict[str, float] = defaultdict(float)
    by_node: dict[tuple[str, str], float] = defaultdict(float)
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        if not any(a <= e["ts"] <= b for a, b in windows):
            continue
        op = e.get("args", {}).get("op_name", "?")
        by_type[op] += e["dur"]
        by_node[(op, e["name"][: -len("_kernel_time")])] += e["dur"]
    n = max(1, len(windows))
    run_ms = sum(b - a for a, b in windows) / n / 1e3
    # `If` (and `Loop`/`Scan`) kernels include their subgraph's nodes, which are listed on their own too.
    control = {"If", "Loop", "Scan"}
    flat_ms = sum(v for k, v in by_type.items() if k not in control) / n / 1e3
    return {
        "runs": len(windows), "model_run_ms": run_ms, "sum_of_kernels_ms_excluding_If": flat_ms,
        "by_op_type": [{"op": k, "ms_per_step": v / n / 1e3, "share_of_run": v / n / 1e3 / run_ms if run_ms else None}
                       for k, v in sorted(by_type.items(), key=lambda kv: -kv[1])[:top]],
        "by_node": [{"op": op, "node": node, "ms_per_step": v / n / 1e3}
                    for (op, node), v in sorted(by_node.items(), key=lambda kv: -kv[1])[:top]],
    }


def profile_ours(folder: Path, threads: int, target: int, batch: int, steps: int, out: Path) -> dict[str, Any]:
    """ORT's profiler on our dense decode steps: the runtime's decoder session swapped for a profiling one."""
    import onnxruntime as ort

    from gaze_edge.runtime import GazeRuntime

    rt = GazeRuntime.load(folder, threads=threads, spinning=False)
    options = ort.SessionOptions()  # the backend's options (runtime/backend.py), plus profiling
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.enable_profiling = True
    options.profile_file_prefix = str(out / f"ours_dense_t{threads}_b{batch}")
    rt.backend.decoder = ort.InferenceSession(str(rt.folder.decoder_path), options,
                                              providers=["CPUExecutionProvider"])
    rt.backend.io = rt.backend.decoder.io_binding()
    prompts, length = our_prompts(rt, target, batch)
    side = OurSide(rt, prompts, steps + 2, gaze=False)
    for _ in range(steps):
        side()
    side.close()
    path = Path(rt.backend.decoder.end_profiling())
    result = top_ops(path, steps)
    result.update(side="ours dense", prompt_tokens=length, batch=batch, threads=threads, file=str(path))
    return result


def profile_genai(og: Any, folder: Path, threads: int, length: int, batch: int, steps: int, vocab: int,
                  out: Path) -> dict[str, Any]:
    """ORT's profiler inside onnxruntime-genai (decoder session_options enable_profiling = file prefix)."""
    import gc

    prefix = out / f"genai_t{threads}_b{batch}"
    set_genai_session(folder, threads, profile=str(prefix))
    try:
        model = og.Model(str(folder))
        side = GenaiSide(og, model, batch, length, steps + 2, vocab)
        for _ in range(steps):
            side()
        side.close()
        del side, model
        gc.collect()  # the session writes its profile when it is destroyed
    finally:
        set_genai_session(folder, threads)
    files = sorted(out.glob(f"{prefix.name}*.json"), key=lambda p: p.stat().st_mtime)
    if not files:
        return {"side": "genai", "error": f"no profile file {prefix}*.json written"}
    result = top_ops(files[-1], steps)
    result.update(side="onnxruntime-genai", prompt_tokens=length, batch=batch, threads=threads, file=str(files[-1]))
    return result


# -------------------------------------------------------------------------------------------- main


def versions() -> dict[str, str]:
    import onnxruntime as ort
    import onnxruntime_genai as og

    out = {"python": platform.python_version(), "onnxruntime": ort.__version__, "onnxruntime_genai": og.__version__,
           "numpy": np.__version__}
    try:
        import torch
        import transformers

        out.update(torch=torch.__version__, transformers=transformers.__version__)
    except ImportError:
        pass
    return out


def _builder_info(folder: Path) -> Any:
    path = folder / "builder.json"  # written by build_genai: which python/transformers ran the model builder
    return json.loads(path.read_text()) if path.is_file() else None


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/genai-compare"))
    p.add_argument("--builder-python", default=None,
                   help="python that runs onnxruntime_genai.models.builder (it needs transformers 5.x, newer than "
                        f"requirements.lock's; default: {BUILDER_VENV} if there, else this one if it can)")
    p.add_argument("--threads", type=_ints, default=[1, 2])
    p.add_argument("--batch", type=_ints, default=[1, 4])
    p.add_argument("--contexts", type=_ints, default=[1000, 6000], help="prompt length targets (tokens)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=60)
    p.add_argument("--profile-steps", type=int, default=8, help="0: no ORT profiles")
    p.add_argument("--profile-context", type=int, default=None, help="default: the largest --contexts")
    p.add_argument("--json", type=Path, default=Path("bench/genai_compare.json"))
    args = p.parse_args()
    import onnxruntime_genai as og

    start = time.perf_counter()
    ours_folder = export_ours(args.work)
    genai_folder = build_genai(args.work, args.builder_python)
    print(f"models ready in {time.perf_counter() - start:.0f} s", flush=True)

    from gaze_edge.runtime import GazeRuntime

    vocab = _config().vocab_size
    tokens = args.warmup + args.repeats + 2
    rows: list[dict[str, Any]] = []
    profiles: list[dict[str, Any]] = []
    report = {"bench": "genai_compare", "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "command": " ".join([Path(sys.executable).name, *sys.argv]),
              "machine": {"machine": platform.machine(), "processor": platform.processor(), "cpus": os.cpu_count(),
                          "note": "2 CPU cores shared with other jobs"},
              "versions": versions(), "genai_builder": _builder_info(genai_folder), "layers": LAYERS,
              "warmup": args.warmup, "repeats": args.repeats,
              "ms_per_token": "wall time of one decode token of the loop: ours next(stream) (embed, slot write, "
                              "decoder run, logits copy, sampling, detokenize); genai generate_next_token "
                              "(decoder run + greedy search)",
              "rows": rows, "profiles": profiles, "complete": False}

    def save() -> None:  # after every row: a run cut short still leaves what it measured
        tmp = args.json.with_name(f".{args.json.name}.partial")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        tmp.replace(args.json)

    header = (f"{'T':>2} {'batch':>5} {'context':>7} | {'ours dense':>17} {'ours gaze':>17} {'genai':>17} | "
              f"{'dense/genai':>11} {'gaze/genai':>10} | {'paired d/g':>10} {'paired z/g':>10}")
    print("ms per decode token, median (p90); ratios of medians, then medians of per-round ratios", flush=True)
    print(header + "\n" + "-" * len(header), flush=True)
    for threads in args.threads:
        set_genai_session(genai_folder, threads)
        genai_model = og.Model(str(genai_folder))
        runtimes = {"dense": GazeRuntime.load(ours_folder, threads=threads, spinning=False),
                    "gaze": GazeRuntime.load(ours_folder, threads=threads, spinning=False)}
        for target in args.contexts:
            for batch in args.batch:
                prompts, length = our_prompts(runtimes["dense"], target, batch)
                sides: dict[str, Any] = {name: OurSide(rt, prompts, tokens, gaze=name == "gaze")
                                         for name, rt in runtimes.items()}
                sides["genai"] = GenaiSide(og, genai_model, batch, length, tokens, vocab)
                times = interleaved(sides, args.warmup, args.repeats)
                row: dict[str, Any] = {"threads": threads, "batch": batch, "prompt_tokens": length,
                                       "views": len(prompts[0].images)}
                for name, side in sides.items():
                    row[name] = {**stats(times[name]), "prefill_s": side.prefill_s}
                    if isinstance(side, OurSide):  # the runtime's own step timer (excludes sampling)
                        row[name]["runtime_step"] = stats(side.timings.step_s[args.warmup:])
                    side.close()
                sides.clear()
                row["process_peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
                row["dense_over_genai"] = row["dense"]["median_ms"] / row["genai"]["median_ms"]
                row["gaze_over_genai"] = row["gaze"]["median_ms"] / row["genai"]["median_ms"]
                # The same ratios per round (the three tokens of one round ran within ~0.2 s of each other),
                # then their median and p10/p90: robust to the machine's load drifting during a row.
                genai_t = np.asarray(times["genai"])
                for name in ("dense", "gaze"):
                    per_round = np.asarray(times[name]) / genai_t
                    row[f"{name}_over_genai_paired"] = {
                        "median": float(np.median(per_round)), "p10": float(np.percentile(per_round, 10)),
                        "p90": float(np.percentile(per_round, 90))}
                rows.append(row)
                save()

                def cell(r: dict[str, float]) -> str:
                    return f"{r['median_ms']:7.1f} ({r['p90_ms']:6.1f})"

                paired = row["dense_over_genai_paired"]["median"], row["gaze_over_genai_paired"]["median"]
                print(f"{threads:>2} {batch:>5} {length:>7} | {cell(row['dense']):>17} {cell(row['gaze']):>17} "
                      f"{cell(row['genai']):>17} | {row['dense_over_genai']:>10.2f}x {row['gaze_over_genai']:>9.2f}x"
                      f" | {paired[0]:>9.2f}x {paired[1]:>9.2f}x", flush=True)
        del runtimes, genai_model

    if args.profile_steps:
        out = args.work / "profiles"
        out.mkdir(exist_ok=True)
        threads, target = max(args.threads), args.profile_context or max(args.contexts)
        for batch in args.batch:
            ours = profile_ours(ours_folder, threads, target, batch, args.profile_steps, out)
            profiles.append(ours)
            profiles.append(profile_genai(og, genai_folder, threads, ours["prompt_tokens"], batch,
                                          args.profile_steps, vocab, out))
            save()
        for prof in profiles:
            if "error" in prof:
                print(prof["side"], prof["error"])
                continue
            print(f"\n{prof['side']}: T {prof['threads']}, batch {prof['batch']}, context {prof['prompt_tokens']}: "
                  f"model_run {prof['model_run_ms']:.2f} ms/step")
            for op in prof["by_op_type"][:8]:
                print(f"  {op['op']:<28} {op['ms_per_step']:8.2f} ms/step  {100 * (op['share_of_run'] or 0):5.1f} %")

    report["complete"] = True
    save()
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
