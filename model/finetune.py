"""`gaze finetune CKPT --data DATA -o OUT`: fine-tune a gaze checkpoint on a folder of captioned images.

DATA is a folder holding one JSONL file (``data.jsonl``, or the only ``*.jsonl`` there; or DATA is
that file), one record a line::

    {"image": "a.png", "prompt": "describe the image .", "answer": "a red circle at center"}
    {"images": ["a.png", "b.png"], "prompt": "what is in the images ?", "answer": "..."}

Image paths are relative to the folder and may not leave it. The loss is the next-token loss on
the answer tokens only (the answer tokens are the gaze queries, as in generation). Built on
transformers' Trainer (so `torchrun` / `accelerate launch` runs on several GPUs need no code here);
a TrainerCallback sets the model's per-layer top_k at every step:

- ``progressive`` (default; the paper's progressive Top-K): dense (top_k = every region) for the first
  ``--dense-frac`` of the steps, then top_k falls linearly to the target until ``--shrink-end``, then
  stays at the target;
- ``two-stage`` (model/train.py's recipe in one run): dense for ``--dense-frac`` of the steps, then at
  the target top_k.

The target is the checkpoint's ``gaze_top_k`` (int or one per layer), or ``--gaze-top-k``. Trainer's
checkpoints go to ``OUT.train/`` beside OUT (weights as safetensors; see docs/FINETUNE.md for the
optimizer and RNG files); ``--resume`` continues from the newest complete one. OUT itself is written
once, atomically, when training ends: a gaze checkpoint (model/checkpoint.py) plus finetune_log.json.
Every input is checked before anything is written; each problem is one line (InputError).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gaze_edge.errors import GazeError, InputError

if TYPE_CHECKING:  # heavy imports stay inside functions: `gaze --help` needs no torch
    import torch

    from .modeling import GazeForConditionalGeneration
    from .processing import GazeProcessor

SCHEDULES = ("progressive", "two-stage")
#: --dense-frac when not given: progressive Top-K starts shrinking early, two-stage spends half the run dense.
DEFAULT_DENSE_FRAC = {"progressive": 0.1, "two-stage": 0.5}
RUN_FILE = "finetune_run.json"  # the settings of a run, in OUT.train/: --resume checks them
LOG_FILE = "finetune_log.json"  # in OUT: settings, schedule and Trainer's log history
#: Files a Trainer checkpoint needs before --resume will use it (written in this order; trainer_state.json last).
CHECKPOINT_FILES = ("model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json")


class FinetuneError(InputError):
    """A fine-tuning input (data folder, record, image, option, output folder) cannot be used."""


# ----------------------------------------------------------------------------- settings


@dataclass
class FinetuneOptions:
    checkpoint: str
    data: str
    output: str
    schedule: str = "progressive"
    gaze_top_k: list[int] | None = None  # target per layer (one value: every layer); None: the checkpoint's
    steps: int = 300
    batch: int = 16
    grad_accum: int = 1
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup: int = 20
    dense_frac: float | None = None  # None: DEFAULT_DENSE_FRAC[schedule]
    shrink_end: float = 0.6  # progressive: top_k reaches the target at this fraction of the steps
    seed: int = 0
    save_steps: int = 100
    logging_steps: int = 10
    resume: bool = False
    force: bool = False
    keep_checkpoints: bool = False
    quiet: bool = False

    def resolved_dense_frac(self) -> float:
        return DEFAULT_DENSE_FRAC[self.schedule] if self.dense_frac is None else self.dense_frac

    def run_settings(self) -> dict[str, Any]:
        """What must be the same for --resume to continue a run (not where it is written, nor how loudly)."""
        out = asdict(self)
        for key in ("output", "resume", "force", "keep_checkpoints", "quiet"):
            out.pop(key)
        out["checkpoint"] = str(Path(self.checkpoint).resolve())
        out["data"] = str(Path(self.data).resolve())
        out["dense_frac"] = self.resolved_dense_frac()
        return out


def work_folder(output: str | Path) -> Path:
    """Where Trainer's resumable checkpoints go: OUT.train beside OUT."""
    out = Path(output)
    return out.with_name(out.name + ".train")


# ----------------------------------------------------------------------------- schedule


def scheduled_top_k(step: int, total: int, target: Sequence[int], num_regions: int, schedule: str,
                    dense_frac: float, shrink_end: float = 0.6) -> list[int]:
    """Per-layer top_k at optimizer step `step` of `total` (0-based). `num_regions`: top_k that is dense."""
    start, end = dense_frac * total, shrink_end * total  # in steps (model/train.py's curriculum uses this too)
    out = []
    for t in target:
        t = min(t, num_regions)
        if step < start:
            k = num_regions
        elif schedule == "two-stage" or step >= end:
            k = t
        else:  # progressive: linear from dense to the target between dense_frac and shrink_end
            f = (step - start) / max(1.0, end - start)
            k = int(round(num_regions + f * (t - num_regions)))
        out.append(max(t, min(num_regions, k)))
    return out


# ----------------------------------------------------------------------------- data


@dataclass
class Example:
    line: int
    images: list[Path]
    input_ids: list[int]
    answer_start: int  # first answer token (labels and gaze queries from here on)


@dataclass
class FolderData:
    jsonl: Path
    examples: list[Example]
    digest: str  # sha256 of the JSONL bytes: --resume refuses a changed data file
    max_images: int = 1
    answer_tokens: int = 0


def find_jsonl(data: Path) -> Path:
    if data.is_file():
        if data.suffix.lower() != ".jsonl":
            raise FinetuneError(f"--data {data} is a file but not a .jsonl file; give the data folder "
                                "(with data.jsonl in it) or the JSONL file")
        return data
    if not data.is_dir():
        raise FinetuneError(f"--data {data} does not exist; give a folder with a data.jsonl file")
    if (data / "data.jsonl").is_file():
        return data / "data.jsonl"
    found = sorted(p for p in data.glob("*.jsonl") if p.is_file())
    if not found:
        raise FinetuneError(f"--data {data} has no .jsonl file; put the records in {data / 'data.jsonl'}")
    if len(found) > 1:
        raise FinetuneError(f"--data {data} has {len(found)} .jsonl files ({', '.join(p.name for p in found[:4])}) "
                            "and no data.jsonl; name the one to use data.jsonl or pass the file itself")
    return found[0]


def _image_path(folder: Path, value: Any, where: str) -> Path:
    if not isinstance(value, str) or not value:
        raise FinetuneError(f"{where}: an image must be a non-empty path string, got {value!r}")
    rel = Path(value)
    if rel.is_absolute():
        raise FinetuneError(f"{where}: image path {value!r} is absolute; give it relative to {folder}")
    path = folder / rel
    root = folder.resolve()
    resolved = path.resolve()
    if resolved != root and root not in resolved.parents:
        raise FinetuneError(f"{where}: image path {value!r} leaves the data folder {folder}; "
                            "copy the image into the folder")
    return path


def conversation(processor: GazeProcessor, num_images: int, prompt: str,
                 answer: str | None) -> list[dict[str, Any]]:
    content: list[dict[str, Any]] = [{"type": "image"}] * num_images + [{"type": "text", "text": prompt}]
    messages: list[dict[str, Any]] = [{"role": "user", "content": content}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


def encode_example(processor: GazeProcessor, num_images: int, prompt: str, answer: str) -> tuple[list[int], int]:
    """(token ids of prompt + answer, index of the first answer token); InputError when it cannot be encoded."""
    prompt_ids = processor.encode(processor.apply_chat_template(conversation(processor, num_images, prompt, None)))
    full = processor.apply_chat_template(conversation(processor, num_images, prompt, answer),
                                         add_generation_prompt=False)
    ids = processor.encode(full)
    if ids[: len(prompt_ids)] != prompt_ids or len(ids) <= len(prompt_ids):
        raise InputError("the checkpoint's chat template does not render the answer after the generation prompt; "
                         "fine-tuning needs a template whose prompt is a prefix of prompt + answer")
    return ids, len(prompt_ids)


def read_folder(data: str | Path, processor: GazeProcessor, max_positions: int | None = None) -> FolderData:
    """Every record checked, every image decoded once; FinetuneError (one line) for the first problem."""
    from gaze_edge.runtime.images import load_image

    jsonl = find_jsonl(Path(data))
    folder = jsonl.parent
    try:
        raw = jsonl.read_bytes()
    except OSError as exc:
        raise FinetuneError(f"cannot read {jsonl} ({exc.strerror or exc})") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FinetuneError(f"{jsonl} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from exc
    examples: list[Example] = []
    checked: dict[Path, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{jsonl} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise FinetuneError(f"{where} is not valid JSON ({exc.msg} at column {exc.colno}); "
                                "one JSON object per line") from exc
        if not isinstance(record, dict):
            raise FinetuneError(f"{where}: expected a JSON object with image(s), prompt and answer, "
                                f"got {type(record).__name__}")
        if ("image" in record) == ("images" in record):
            raise FinetuneError(f"{where}: give exactly one of \"image\" (a path) or \"images\" (a list of paths)")
        names = [record["image"]] if "image" in record else record["images"]
        if not isinstance(names, list) or not names:
            raise FinetuneError(f"{where}: \"images\" must be a non-empty list of paths, got {names!r}")
        for key in ("prompt", "answer"):
            if not isinstance(record.get(key), str) or not record[key].strip():
                raise FinetuneError(f"{where}: \"{key}\" must be a non-empty string, got {record.get(key)!r}")
        paths = [_image_path(folder, name, where) for name in names]
        for path in paths:
            if path not in checked:
                try:
                    load_image(path)
                except InputError as exc:
                    raise FinetuneError(f"{where}: {exc}") from exc
                checked[path] = "ok"
        try:
            ids, start = encode_example(processor, len(paths), record["prompt"], record["answer"])
        except InputError as exc:
            raise FinetuneError(f"{where}: {exc}") from exc
        if max_positions is not None and len(ids) > max_positions:
            raise FinetuneError(f"{where}: the record is {len(ids)} tokens, more than the model's "
                                f"{max_positions} positions; shorten it or use fewer images")
        examples.append(Example(number, paths, ids, start))
    if not examples:
        raise FinetuneError(f"{jsonl} has no records; write one JSON object per line "
                            '({"image": "a.png", "prompt": "...", "answer": "..."})')
    return FolderData(jsonl, examples, hashlib.sha256(raw).hexdigest(),
                      max_images=max(len(e.images) for e in examples),
                      answer_tokens=sum(len(e.input_ids) - e.answer_start for e in examples))


class FolderDataset:
    """A torch-style map dataset over checked examples: images decoded and preprocessed on access."""

    def __init__(self, data: FolderData, processor: GazeProcessor) -> None:
        self.data = data
        self.processor = processor

    def __len__(self) -> int:
        return len(self.data.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from gaze_edge.runtime.images import load_image

        example = self.data.examples[index]
        pixels = self.processor.preprocess([load_image(p) for p in example.images])
        return {"input_ids": example.input_ids, "answer_start": example.answer_start, "pixel_values": pixels}


def collate(features: list[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ids; labels and gaze queries on the answer tokens only; images of the batch in order."""
    import numpy as np
    import torch

    width = max(len(f["input_ids"]) for f in features)
    batch = len(features)
    ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((batch, width), dtype=torch.long)
    answer = torch.zeros((batch, width), dtype=torch.bool)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        ids[i, :n] = torch.tensor(f["input_ids"], dtype=torch.long)
        mask[i, :n] = 1
        answer[i, f["answer_start"] : n] = True
    labels = torch.where(answer, ids, torch.full_like(ids, -100))
    pixels = torch.from_numpy(np.concatenate([f["pixel_values"] for f in features]))
    return {"input_ids": ids, "attention_mask": mask, "gaze_mask": answer, "labels": labels, "pixel_values": pixels}


def answer_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross entropy over the answer tokens (labels -100 elsewhere)."""
    import torch.nn.functional as F

    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                           ignore_index=-100, reduction="sum")


def dataset_loss(model: GazeForConditionalGeneration, processor: GazeProcessor, data: FolderData,
                 batch: int = 32, gaze_top_k: int | None = None) -> float:
    """Mean next-token loss per answer token over the whole folder (the model's configured top_k)."""
    import torch

    dataset = FolderDataset(data, processor)
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        for first in range(0, len(dataset), batch):
            items = [dataset[i] for i in range(first, min(first + batch, len(dataset)))]
            inputs = {k: v.to(device) for k, v in collate(items, processor.pad_token_id).items()}
            labels = inputs.pop("labels")
            out = model(**inputs, gaze_top_k=gaze_top_k)
            total += float(answer_loss_sum(out.logits, labels))
            count += int((labels[:, 1:] != -100).sum())
    model.train(was_training)
    return total / max(1, count)


# ----------------------------------------------------------------------------- Trainer pieces


def _target_top_k(config: Any, override: list[int] | None) -> list[int]:
    layers = int(config.num_hidden_layers)
    if override is None:
        return [int(config.layer_top_k(i)) for i in range(layers)]
    if len(override) == 1:
        return override * layers
    if len(override) != layers:
        raise FinetuneError(f"--gaze-top-k has {len(override)} values but the model has {layers} decoder layers; "
                            "give one K or one per layer")
    return list(override)


def _config_top_k(ks: list[int]) -> int | list[int]:
    return ks[0] if len(set(ks)) == 1 else list(ks)


def _make_callbacks(model: GazeForConditionalGeneration, target: list[int], num_regions: int,
                    opts: FinetuneOptions, history: list[dict[str, Any]]) -> list[Any]:
    from transformers import TrainerCallback

    class TopKSchedule(TrainerCallback):
        """Sets the model's per-layer top_k (config.gaze_top_k, which every attention layer reads) each step."""

        def _set(self, step: int, total: int) -> None:
            ks = scheduled_top_k(step, total, target, num_regions, opts.schedule, opts.resolved_dense_frac(),
                                 opts.shrink_end)
            model.config.gaze_top_k = _config_top_k(ks)
            if not history or history[-1]["top_k"] != ks:
                history.append({"step": step, "top_k": ks})

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._set(state.global_step, state.max_steps)

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._set(state.global_step, state.max_steps)

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
                   **kwargs: Any) -> None:
            if logs is not None and "loss" in logs:
                logs["top_k"] = model.config.gaze_top_k

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            # Trainer pickles its TrainingArguments beside each checkpoint; nothing here loads it: remove it.
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            (folder / "training_args.bin").unlink(missing_ok=True)

    return [TopKSchedule()]


def latest_checkpoint(work: Path) -> Path | None:
    """The newest Trainer checkpoint in `work` with every file --resume needs (an interrupted save is skipped)."""
    found = []
    for p in work.glob("checkpoint-*"):
        suffix = p.name.split("-", 1)[1]
        if p.is_dir() and suffix.isdigit() and all((p / f).is_file() for f in CHECKPOINT_FILES):
            found.append((int(suffix), p))
    return max(found)[1] if found else None


def _main_process() -> bool:
    """Rank 0 of a torchrun / accelerate launch (or a plain run): the one process that writes files."""
    return os.environ.get("RANK", "0") == "0"


def _check_output(opts: FinetuneOptions) -> tuple[Path, Path, Path | None]:
    from gaze_edge.atomic import check_new_folder

    out = Path(opts.output)
    work = work_folder(out)
    if out.parent.is_dir():  # a missing parent is created (with its parents) once the inputs are checked
        check_new_folder(out, opts.force, FinetuneError)
    resume_from = None
    if opts.resume:
        if opts.force:
            raise FinetuneError("--resume continues a run and --force starts over: give one of them")
        if not (work / RUN_FILE).is_file():
            raise FinetuneError(f"nothing to resume: {work} holds no interrupted run; run without --resume")
        try:
            saved = json.loads((work / RUN_FILE).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise FinetuneError(f"{work / RUN_FILE} is unreadable ({exc}); start over with --force") from exc
        now = opts.run_settings()
        differ = sorted(k for k in set(now) | set(saved.get("settings", {}))
                        if now.get(k) != saved.get("settings", {}).get(k))
        if differ:
            raise FinetuneError(f"--resume: this command differs from the interrupted run in {', '.join(differ)}; "
                                f"repeat its command with --resume, or start over with --force")
        resume_from = latest_checkpoint(work)
    elif work.exists() and not opts.force and _main_process():
        raise FinetuneError(f"{work} holds an interrupted run; pass --resume to continue it or --force to start over")
    return out, work, resume_from


def finetune(opts: FinetuneOptions, extra_callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Run a fine-tuning; returns the log written to OUT/finetune_log.json. Raises GazeError on bad input."""
    import torch
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from transformers.utils import logging as hf_logging

    from gaze_edge.atomic import move_folder_into_place, partial_folder, replace_file

    from .checkpoint import load_checkpoint, save_checkpoint

    if opts.schedule not in SCHEDULES:
        raise FinetuneError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {opts.schedule!r}")
    dense_frac = opts.resolved_dense_frac()
    if not 0.0 <= dense_frac <= 1.0 or not dense_frac <= opts.shrink_end <= 1.0:
        raise FinetuneError(f"need 0 <= --dense-frac ({dense_frac}) <= --shrink-end ({opts.shrink_end}) <= 1")
    out, work, resume_from = _check_output(opts)
    model, processor = load_checkpoint(opts.checkpoint)
    config = model.config
    data = read_folder(opts.data, processor, int(config.max_position_embeddings))
    settings = opts.run_settings()
    if opts.resume:
        saved = json.loads((work / RUN_FILE).read_text(encoding="utf-8"))
        if saved.get("data_sha256") != data.digest:
            raise FinetuneError(f"--resume: {data.jsonl} changed since the interrupted run; start over with --force")
    target = _target_top_k(config, opts.gaze_top_k)
    num_regions = int(config.regions_per_image) * data.max_images
    final_top_k = _config_top_k(target) if opts.gaze_top_k is not None else config.gaze_top_k

    # Every input is good: from here on files are written.
    if _main_process():
        work.parent.mkdir(parents=True, exist_ok=True)
    if not opts.resume and _main_process():
        if work.exists():  # --force: start over
            shutil.rmtree(work)
        work.mkdir(parents=True)
        run = {"settings": settings, "data_sha256": data.digest}
        replace_file(work / RUN_FILE, (json.dumps(run, indent=1) + "\n").encode())

    hf_logging.set_verbosity_error() if opts.quiet else hf_logging.set_verbosity_warning()
    args = TrainingArguments(
        output_dir=str(work), max_steps=opts.steps, per_device_train_batch_size=opts.batch,
        gradient_accumulation_steps=opts.grad_accum, learning_rate=opts.lr, weight_decay=opts.weight_decay,
        adam_beta2=0.98, max_grad_norm=1.0, warmup_steps=opts.warmup, lr_scheduler_type="cosine",
        logging_steps=opts.logging_steps, save_strategy="steps", save_steps=opts.save_steps, save_total_limit=2,
        save_safetensors=True, seed=opts.seed, data_seed=opts.seed, report_to=[], disable_tqdm=opts.quiet,
        remove_unused_columns=False, dataloader_num_workers=0, dataloader_pin_memory=torch.cuda.is_available(),
        log_level="error" if opts.quiet else "warning", use_cpu=not torch.cuda.is_available(),
    )

    def loss_func(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
        total = answer_loss_sum(outputs.logits, labels)
        count = num_items_in_batch if num_items_in_batch is not None else (labels[:, 1:] != -100).sum()
        return total / count

    history: list[dict[str, Any]] = []
    pad = processor.pad_token_id
    trainer = Trainer(
        model=model, args=args, train_dataset=FolderDataset(data, processor),
        data_collator=lambda features: collate(features, pad), compute_loss_func=loss_func,
        callbacks=[*_make_callbacks(model, target, num_regions, opts, history), *extra_callbacks],
    )
    if opts.quiet:
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
    if not opts.quiet:
        start = f", resuming from {resume_from.name}" if resume_from else ""
        print(f"fine-tuning {opts.checkpoint} on {len(data.examples)} records of {data.jsonl} ({opts.schedule} "
              f"top_k schedule, target {final_top_k} of {num_regions} regions, {opts.steps} steps of "
              f"{opts.batch}{start}); checkpoints in {work}", file=sys.stderr, flush=True)
    began = time.time()
    with warnings.catch_warnings():  # Trainer's checkpoint rotation on filesystems with coarse mtimes: harmless
        warnings.filterwarnings("ignore", message="mtime may not be reliable")
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)

    model.config.gaze_top_k = final_top_k
    torch.nn.Module.to(model, "cpu")  # in place (as model/checkpoint.py does)
    model.eval()
    log = {"settings": settings, "data": str(data.jsonl), "data_sha256": data.digest, "records": len(data.examples),
           "global_step": trainer.state.global_step, "seconds_this_run": round(time.time() - began, 1),
           "resumed_from": resume_from.name if resume_from else None, "top_k_schedule": history,
           "log_history": trainer.state.log_history}
    if trainer.is_world_process_zero():
        with partial_folder(out, FinetuneError) as tmp:
            save_checkpoint(model, processor, tmp)
            (tmp / LOG_FILE).write_text(json.dumps(log, indent=1) + "\n")
            move_folder_into_place(tmp, out, FinetuneError, "the fine-tuned checkpoint")
        if not opts.keep_checkpoints:
            shutil.rmtree(work, ignore_errors=True)
        if not opts.quiet:
            print(f"wrote {out} after {trainer.state.global_step} steps (top_k {final_top_k})", flush=True)
    return log


# ----------------------------------------------------------------------------- command line


def add_finetune_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `finetune` subcommand to a `gaze` argparse subparsers object."""
    from gaze_edge import cli_args as ca

    from .convert import _top_k

    p = subparsers.add_parser("finetune", help="fine-tune a gaze checkpoint on a folder of images + JSONL "
                                               "(progressive Top-K; transformers Trainer)")
    p.add_argument("checkpoint", type=Path, help="the gaze checkpoint folder to start from")
    p.add_argument("--data", type=Path, required=True,
                   help="folder with data.jsonl: {\"image\" or \"images\", \"prompt\", \"answer\"} per line")
    p.add_argument("-o", "--output", type=ca.output_folder, required=True,
                   help="gaze checkpoint folder to write (Trainer's checkpoints go to OUTPUT.train)")
    p.add_argument("--schedule", choices=SCHEDULES, default="progressive",
                   help="top_k schedule: progressive (dense, then shrinking to the target) or two-stage "
                        "(dense, then the target)")
    p.add_argument("--gaze-top-k", type=_top_k, default=None, metavar="K[,K1,...]",
                   help="target regions per gaze query (default: the checkpoint's gaze_top_k)")
    p.add_argument("--steps", type=ca.int_in(1), default=FinetuneOptions.steps, help="optimizer steps")
    p.add_argument("--batch", type=ca.int_in(1, 65536), default=FinetuneOptions.batch, help="records per step "
                                                                                             "and device")
    p.add_argument("--grad-accum", type=ca.int_in(1, 65536), default=1, help="gradient accumulation steps")
    p.add_argument("--lr", type=ca.number_in(0.0, 1.0, low_open=True), default=FinetuneOptions.lr,
                   help="peak learning rate (AdamW, warmup then cosine)")
    p.add_argument("--weight-decay", type=ca.number_in(0.0, 1.0), default=FinetuneOptions.weight_decay,
                   help="AdamW weight decay")
    p.add_argument("--warmup-steps", type=ca.int_in(0), default=FinetuneOptions.warmup,
                   help="steps of linear learning-rate warmup")
    p.add_argument("--dense-frac", type=ca.number_in(0.0, 1.0), default=None,
                   help="fraction of the steps at dense top_k (default: 0.1 progressive, 0.5 two-stage)")
    p.add_argument("--shrink-end", type=ca.number_in(0.0, 1.0), default=FinetuneOptions.shrink_end,
                   help="progressive: fraction of the steps where top_k reaches the target")
    p.add_argument("--seed", type=ca.int_in(0, 2**32 - 1), default=0, help="seed of the model's training order")
    p.add_argument("--save-steps", type=ca.int_in(1), default=FinetuneOptions.save_steps,
                   help="steps between resumable checkpoints")
    p.add_argument("--logging-steps", type=ca.int_in(1), default=FinetuneOptions.logging_steps,
                   help="steps between progress log lines")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from OUTPUT.train")
    p.add_argument("--force", action="store_true", help="replace OUTPUT, and start over an interrupted run")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep OUTPUT.train when training ends")
    p.set_defaults(func=run_finetune)
    return p


def run_finetune(args: argparse.Namespace) -> int:
    top_k = [args.gaze_top_k] if isinstance(args.gaze_top_k, int) else args.gaze_top_k  # convert's parser: K or list
    opts = FinetuneOptions(
        checkpoint=str(args.checkpoint), data=str(args.data), output=str(args.output), schedule=args.schedule,
        gaze_top_k=top_k, steps=args.steps, batch=args.batch, grad_accum=args.grad_accum, lr=args.lr,
        weight_decay=args.weight_decay, warmup=args.warmup_steps, dense_frac=args.dense_frac,
        shrink_end=args.shrink_end, seed=args.seed, save_steps=args.save_steps, logging_steps=args.logging_steps,
        resume=args.resume, force=args.force, keep_checkpoints=args.keep_checkpoints,
        quiet=int(getattr(args, "quiet", 0) or 0) > 0,
    )
    finetune(opts)
    return 0


# ----------------------------------------------------------------------------- helpers for tests and docs


def write_scene_folder(folder: str | Path, count: int, seed: int = 0, held_out: bool = False,
                       image_size: int = 64, prompt: str | None = None) -> Path:
    """Generated scenes (model/scenes.py) as PNG files + data.jsonl with their true captions."""
    import numpy as np
    from PIL import Image

    from . import scenes
    from .processing import DEFAULT_PROMPT

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(count):
        scene = scenes.sample_scene(rng, held_out)
        image, _ = scenes.render(scene, image_size, rng)
        Image.fromarray(image).save(folder / f"scene_{i:05d}.png")
        lines.append(json.dumps({"image": f"scene_{i:05d}.png", "prompt": prompt or DEFAULT_PROMPT,
                                 "answer": scene.caption()}))
    (folder / "data.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def compare_schedules(start: str | Path, train: str | Path, held_out: str | Path, out: str | Path, top_k: int,
                      steps: int, batch: int, lr: float, scenes: int = 200, seed: int = 0) -> list[dict[str, Any]]:
    """Fine-tune `start` with each schedule (same steps, data, seed) and score it on held-out data and scenes:
    answer-token loss on the `held_out` folder, exact-caption accuracy on `scenes` generated held-out scenes
    (model/evaluate.py). The start checkpoint is scored too, as it is and at `top_k` without training."""
    from . import evaluate as ev
    from .checkpoint import load_checkpoint

    out = Path(out)
    rows: list[dict[str, Any]] = []

    def score(name: str, path: Path, k: int | None, seconds: float | None) -> None:
        model, processor = load_checkpoint(path)
        data = read_folder(held_out, processor)
        result = ev.evaluate(model, processor, scenes, gaze_top_k=k)
        used = k if k is not None else model.config.gaze_top_k
        rows.append({"model": name, "top_k": used, "held_out_loss": dataset_loss(model, processor, data, gaze_top_k=k),
                     "accuracy": result.accuracy, "scenes": scenes, "train_seconds": seconds})
        print(json.dumps(rows[-1]), flush=True)

    score("start", Path(start), None, None)
    score("start, no training", Path(start), top_k, None)
    for schedule in SCHEDULES:
        began = time.time()
        finetune(FinetuneOptions(str(start), str(train), str(out / schedule), schedule=schedule, gaze_top_k=[top_k],
                                 steps=steps, batch=batch, lr=lr, seed=seed, quiet=True, force=True))
        score(f"{schedule}, {steps} steps", out / schedule, None, round(time.time() - began, 1))
    return rows


def main(argv: list[str] | None = None) -> int:
    """python -m gaze_edge.model.finetune scenes | loss | compare (see --help)"""
    parser = argparse.ArgumentParser(description="fine-tuning helpers: scene folders, held-out loss, schedules")
    sub = parser.add_subparsers(dest="command", required=True)
    sc = sub.add_parser("scenes", help="write generated scenes as PNG + data.jsonl")
    sc.add_argument("folder", type=Path)
    sc.add_argument("--count", type=int, default=200)
    sc.add_argument("--seed", type=int, default=0)
    sc.add_argument("--held-out", action="store_true")
    sc.add_argument("--size", type=int, default=64, help="image side in pixels (the default model's 64)")
    lo = sub.add_parser("loss", help="mean answer-token loss of a checkpoint on a data folder")
    lo.add_argument("checkpoint", type=Path)
    lo.add_argument("--data", type=Path, required=True)
    lo.add_argument("--top-k", type=int, default=None, help="override the checkpoint's top_k")
    co = sub.add_parser("compare", help="progressive vs two-stage from one checkpoint (markdown table)")
    co.add_argument("checkpoint", type=Path)
    co.add_argument("--train", type=Path, required=True)
    co.add_argument("--held-out", type=Path, required=True)
    co.add_argument("-o", "--output", type=Path, required=True)
    co.add_argument("--top-k", type=int, default=2)
    co.add_argument("--steps", type=int, default=400)
    co.add_argument("--batch", type=int, default=16)
    co.add_argument("--lr", type=float, default=5e-4)
    co.add_argument("--scenes", type=int, default=200)
    args = parser.parse_args(argv)
    try:
        if args.command == "scenes":
            write_scene_folder(args.folder, args.count, args.seed, args.held_out, image_size=args.size)
            print(f"wrote {args.count} scenes to {args.folder}")
        elif args.command == "loss":
            from .checkpoint import load_checkpoint

            model, processor = load_checkpoint(args.checkpoint)
            data = read_folder(args.data, processor)
            print(json.dumps({"checkpoint": str(args.checkpoint), "records": len(data.examples),
                              "loss": dataset_loss(model, processor, data, gaze_top_k=args.top_k)}))
        else:
            rows = compare_schedules(args.checkpoint, args.train, args.held_out, args.output, args.top_k,
                                     args.steps, args.batch, args.lr, args.scenes)
            print("| model | top_k | held-out loss | exact-caption accuracy | train s |\n|---|---|---|---|---|")
            for r in rows:
                secs = "" if r["train_seconds"] is None else f"{r['train_seconds']:.0f}"
                print(f"| {r['model']} | {r['top_k']} | {r['held_out_loss']:.4f} | {r['accuracy']:.1%} "
                      f"({r['scenes']}) | {secs} |")
    except GazeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
