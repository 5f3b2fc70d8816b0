"""`gaze finetune`: folder data, answer-only loss, top_k schedules, resume, atomic output, bad inputs.

Everything runs on a tiny model built here (not the shipped checkpoints, whose shapes may change),
trained a few steps on generated scenes written as PNG + data.jsonl.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("accelerate")

from transformers import TrainerCallback  # noqa: E402

from gaze_edge.cli import main  # noqa: E402
from gaze_edge.model.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from gaze_edge.model.configuration import GazeConfig  # noqa: E402
from gaze_edge.model.finetune import (  # noqa: E402
    FinetuneOptions,
    collate,
    dataset_loss,
    finetune,
    latest_checkpoint,
    read_folder,
    scheduled_top_k,
    work_folder,
    write_scene_folder,
)
from gaze_edge.model.modeling import GazeForConditionalGeneration  # noqa: E402
from gaze_edge.model.processing import DEFAULT_PROMPT, default_processor  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A random tiny 2-layer checkpoint (top_k 2 of 9 regions), 64 training and 32 held-out scenes."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("finetune")
    processor = default_processor(48, 36, 2)
    torch.manual_seed(0)
    config = GazeConfig(vocab_size=processor.tokenizer.get_vocab_size(), hidden_size=32, intermediate_size=64,
                        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                        vision_hidden_size=32, vision_intermediate_size=64, vision_num_layers=1, vision_num_heads=2,
                        gaze_top_k=2)
    save_checkpoint(GazeForConditionalGeneration(config), processor, root / "ckpt")
    return {"root": root, "ckpt": root / "ckpt", "train": write_scene_folder(root / "train", 64, seed=0),
            "held_out": write_scene_folder(root / "held_out", 32, seed=1, held_out=True)}


def options(tiny: dict[str, Path], out: Path, **kw: Any) -> FinetuneOptions:
    base: dict[str, Any] = dict(steps=8, batch=8, lr=3e-3, warmup=1, save_steps=4, logging_steps=2, quiet=True)
    return FinetuneOptions(str(tiny["ckpt"]), str(tiny["train"]), str(out), **{**base, **kw})


def weights(path: Path) -> dict[str, Any]:
    return load_checkpoint(path)[0].state_dict()


# ----------------------------------------------------------------------------- schedules


def test_progressive_schedule_starts_dense_and_falls_gradually_to_the_target() -> None:
    ks = [scheduled_top_k(s, 100, [2, 3], 9, "progressive", 0.1, 0.6) for s in range(100)]
    assert ks[0] == [9, 9] and ks[9] == [9, 9]  # dense for the first 10%
    assert ks[60] == [2, 3] and ks[-1] == [2, 3]  # at the per-layer target from 60% on
    first = [k[0] for k in ks]
    assert all(a >= b for a, b in zip(first, first[1:], strict=False))  # never rises
    assert len(set(first[10:60])) >= 5  # many steps between 9 and 2, not a jump


def test_two_stage_schedule_is_dense_then_the_target() -> None:
    ks = [scheduled_top_k(s, 10, [2], 9, "two-stage", 0.5) for s in range(10)]
    assert ks == [[9]] * 5 + [[2]] * 5
    assert scheduled_top_k(0, 10, [12], 9, "two-stage", 0.0) == [9]  # a target above R is dense


# ----------------------------------------------------------------------------- data and loss


def test_labels_and_gaze_queries_cover_the_answer_only(tiny: dict[str, Path]) -> None:
    _, processor = load_checkpoint(tiny["ckpt"])
    data = read_folder(tiny["train"], processor)
    first = json.loads((tiny["train"] / "data.jsonl").read_text().splitlines()[0])
    example = data.examples[0]
    answer_ids = example.input_ids[example.answer_start :]
    assert processor.decode(answer_ids) == first["answer"]  # the answer's words, then <eos> (skipped in decode)
    assert answer_ids[-1] == processor.eos_token_id
    pixels = np.zeros((1, 3, 48, 48), dtype=np.float32)
    batch = collate([{"input_ids": e.input_ids, "answer_start": e.answer_start, "pixel_values": pixels}
                     for e in data.examples[:3]], processor.pad_token_id)
    assert batch["pixel_values"].shape == (3, 3, 48, 48)
    for i, e in enumerate(data.examples[:3]):
        labelled = (batch["labels"][i] != -100).nonzero().flatten().tolist()
        assert labelled == list(range(e.answer_start, len(e.input_ids)))
        assert batch["gaze_mask"][i].nonzero().flatten().tolist() == labelled


def test_finetune_writes_a_loadable_checkpoint_and_improves_held_out_loss(tiny: dict[str, Path], capfd) -> None:
    model, processor = load_checkpoint(tiny["ckpt"])
    held_out = read_folder(tiny["held_out"], processor)
    before = dataset_loss(model, processor, held_out)
    out = tiny["root"] / "improved"
    log = finetune(options(tiny, out, steps=30))
    assert capfd.readouterr().err == ""  # quiet: no progress
    tuned, tuned_processor = load_checkpoint(out)
    assert tuned.config.gaze_top_k == 2  # the target, whatever the schedule set last
    after = dataset_loss(tuned, tuned_processor, held_out)
    assert after < before - 0.3, (before, after)
    assert log["global_step"] == 30 and (out / "finetune_log.json").is_file()
    assert log["top_k_schedule"][0]["top_k"] == [9, 9] and log["top_k_schedule"][-1]["top_k"] == [2, 2]
    assert not work_folder(out).exists()  # Trainer's checkpoints are removed once OUT is in place
    assert not list(out.parent.glob(f".{out.name}.partial-*"))


def test_progress_is_shown_unless_quiet(tiny: dict[str, Path], capfd) -> None:
    out = tiny["root"] / "loud"
    finetune(options(tiny, out, steps=2, quiet=False, logging_steps=1))
    captured = capfd.readouterr()
    shown = captured.out + captured.err
    assert "fine-tuning" in captured.err and "'loss'" in shown and "2/2" in captured.err


def test_records_with_several_images_train_and_dense_counts_all_their_regions(tiny: dict[str, Path],
                                                                             tmp_path: Path) -> None:
    png = (tiny["train"] / "scene_00000.png").read_bytes()
    records = [{"images": ["a.png", "sub/b.png"], "prompt": "what is in the images ?",
                "answer": "a red circle at center"}, {"image": "a.png", "prompt": DEFAULT_PROMPT, "answer": "a"}]
    data = _write(tmp_path / "data", records * 2, {"a.png": png, "sub/b.png": png})
    log = finetune(FinetuneOptions(str(tiny["ckpt"]), str(data), str(tmp_path / "out"), steps=2, batch=4,
                                   warmup=0, quiet=True))
    assert log["top_k_schedule"][0]["top_k"] == [18, 18]  # dense: 9 regions x 2 images
    assert load_checkpoint(tmp_path / "out")[0].config.gaze_top_k == 2


class _Interrupt(TrainerCallback):
    """Ctrl-C right after the checkpoint of step `at` is saved."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.at:
            raise KeyboardInterrupt


class _Steps(TrainerCallback):
    def __init__(self) -> None:
        self.done: list[int] = []

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.done.append(state.global_step)


def test_resume_after_an_interruption_continues_and_matches_an_uninterrupted_run(tiny: dict[str, Path]) -> None:
    whole = tiny["root"] / "whole"
    finetune(options(tiny, whole, steps=8, save_steps=4))
    out = tiny["root"] / "resumed"
    with pytest.raises(KeyboardInterrupt):
        finetune(options(tiny, out, steps=8, save_steps=4), extra_callbacks=[_Interrupt(4)])
    assert not out.exists()  # nothing half-written where the checkpoint goes
    work = work_folder(out)
    last = latest_checkpoint(work)
    assert last is not None and last.name == "checkpoint-4"
    assert not (last / "training_args.bin").exists()  # Trainer's pickled arguments are not kept
    assert json.loads((last / "trainer_state.json").read_text())["global_step"] == 4
    steps = _Steps()
    log = finetune(options(tiny, out, steps=8, save_steps=4, resume=True), extra_callbacks=[steps])
    assert log["resumed_from"] == "checkpoint-4" and log["global_step"] == 8
    assert steps.done == [5, 6, 7, 8]  # this run trained the last four steps only
    assert [e["step"] for e in log["log_history"] if "loss" in e] == [2, 4, 6, 8]  # the whole run's log
    a, b = weights(whole), weights(out)
    for name in a:
        assert torch.equal(b[name], a[name]), name  # seeded, same data order and RNG: bit for bit
    assert not torch.equal(a["lm_head.weight"], weights(tiny["ckpt"])["lm_head.weight"])  # it did train


def test_an_interrupted_save_is_skipped_on_resume(tmp_path: Path) -> None:
    for step, files in ((4, ("model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json")),
                        (8, ("model.safetensors", "optimizer.pt"))):  # step 8: interrupted while saving
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        for f in files:
            (folder / f).write_text("x")
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-4"


@pytest.mark.slow
def test_the_output_exports(tiny: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "ft"
    finetune(options(tiny, out, steps=2))
    assert main(["export", str(out), "-o", str(tmp_path / "exp"), "--validate-scenes", "1", "--max-images", "1",
                 "-q"]) == 0
    assert (tmp_path / "exp" / "decoder.onnx").is_file()


# ----------------------------------------------------------------------------- bad input: one line, nothing written


def _write(folder: Path, records: list[Any] | str, images: dict[str, bytes] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    text = records if isinstance(records, str) else "\n".join(json.dumps(r) for r in records) + "\n"
    (folder / "data.jsonl").write_text(text)
    for name, data in (images or {}).items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder


def _png(tiny: dict[str, Path]) -> bytes:
    return (tiny["train"] / "scene_00000.png").read_bytes()


def _good(**kw: Any) -> dict[str, Any]:
    return {"image": "a.png", "prompt": DEFAULT_PROMPT, "answer": "a red circle at center", **kw}


BAD = {
    "missing folder": (None, "does not exist"),
    "no jsonl": ("nojsonl", "has no .jsonl file"),
    "empty jsonl": ("", "has no records"),
    "bad json": ("{not json}\n", "line 1 is not valid JSON"),
    "not an object": ("[1, 2]\n", "expected a JSON object"),
    "no answer": ([{"image": "a.png", "prompt": DEFAULT_PROMPT}], '"answer" must be a non-empty string'),
    "both image keys": ([_good(images=["a.png"])], 'exactly one of "image"'),
    "missing image": ([_good(image="b.png")], "b.png does not exist"),
    "unreadable image": ([_good(image="junk.png")], "not an image Pillow can read"),
    "escaping path": ([_good(image="../a.png")], "leaves the data folder"),
    "absolute path": ([_good(image="/etc/passwd")], "is absolute"),
    "symlink out of the folder": ([_good(image="link.png")], "leaves the data folder"),
    "unknown prompt word": ([_good(prompt="describe the zebra .")], "cannot represent 'zebra'"),
    "unknown answer word": ([_good(answer="a mauve circle at center")], "cannot represent 'mauve'"),
    "special token in prompt": ([_good(prompt="describe <image> .")], "special token"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_writes_nothing(case: str, tiny: dict[str, Path], tmp_path: Path, capsys) -> None:
    records, expected = BAD[case]
    data = tmp_path / "data"
    if records == "nojsonl":
        data.mkdir()
    elif records is not None:
        good = [_good(), _good(answer="a blue square at top left")]
        body = records if isinstance(records, str) else good + records
        _write(data, body, {"a.png": _png(tiny), "junk.png": b"this is not a png"})
        (tmp_path / "a.png").write_bytes(_png(tiny))  # exists, but outside the data folder
        (data / "link.png").symlink_to(tmp_path / "a.png")
    out = tmp_path / "out"
    code = main(["finetune", str(tiny["ckpt"]), "--data", str(data), "-o", str(out), "--steps", "1", "-q"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and expected in err, err
    assert not out.exists() and not work_folder(out).exists()
    assert {p.name for p in tmp_path.iterdir()} <= {"data", "a.png"}


def test_resume_refusals_are_one_line(tiny: dict[str, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    argv = ["finetune", str(tiny["ckpt"]), "--data", str(tiny["train"]), "-o", str(out), "--steps", "4",
            "--save-steps", "2", "--batch", "8", "--lr", "0.003", "--warmup-steps", "1", "--logging-steps", "2", "-q"]
    assert main([*argv, "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    with pytest.raises(KeyboardInterrupt):
        finetune(options(tiny, out, steps=4, save_steps=2), extra_callbacks=[_Interrupt(2)])
    assert main(argv) == 2  # a fresh start would silently throw the interrupted run away
    assert "pass --resume to continue it or --force" in capsys.readouterr().err
    assert main([*argv, "--resume", "--lr", "0.1"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "differs from the interrupted run in lr" in err
    assert main([*argv, "--gaze-top-k", "1,2,3", "--force"]) == 2
    assert "3 values but the model has 2 decoder layers" in capsys.readouterr().err
    assert main([*argv, "--resume"]) == 0 and load_checkpoint(out)[0].config.gaze_top_k == 2
