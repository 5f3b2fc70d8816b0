"""Train the tiny Gaze Attention scene captioner on 2 CPU cores in minutes.

    python -m gaze_edge.model.train --out checkpoints/gaze-tiny            # gaze, top_k 2 of 16
    python -m gaze_edge.model.train --out checkpoints/gaze-tiny-dense --dense

Why it matches its dense twin although hard top-k is not differentiable:
- a k curriculum: dense attention first, then k shrinks linearly to the target, so the
  model learns the task before it must learn where to look;
- an auxiliary loss (KL from the dense attention mass per region to the softmax of the
  selection scores) that teaches the descriptors to rank regions as attention would.
Everything is seeded: the same command gives the same checkpoint on the same machine.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from . import scenes
from .checkpoint import load_checkpoint, save_checkpoint
from .configuration import GazeConfig
from .finetune import scheduled_top_k
from .modeling import GazeForConditionalGeneration, count_parameters
from .processing import DEFAULT_PROMPT, GazeProcessor, default_processor


@dataclass
class TrainConfig:
    out: str
    dense: bool = False
    top_k: int = 2
    steps: int = 1500
    batch: int = 48
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup: int = 100
    dense_frac: float = 0.2  # curriculum: train dense for this fraction of steps ...
    shrink_end_frac: float = 0.6  # ... then shrink k linearly until this fraction
    aux_weight: float = 0.0  # 1.0 hurt: see docs/MODEL.md
    seed: int = 0
    threads: int = 1
    log_every: int = 50
    init_from: str | None = None  # continue from this checkpoint (stage 2 of the recipe)


IMAGE_SIZE = 64  # 4x4 scene cells of 16 px
PATCH_SIZE = 8  # 8x8 visual tokens; a 2x2-token region is one scene cell: 16 regions
NUM_CONTEXT_TOKENS = 4


def tiny_processor() -> GazeProcessor:
    """The processor of the tiny default: 64 px, 64 visual tokens, 4 context tokens (the word-level
    tokenizer names two context tokens among its specials; default_processor adds the others after the
    caption words, so every word keeps its id)."""
    return default_processor(IMAGE_SIZE, (IMAGE_SIZE // PATCH_SIZE) ** 2, NUM_CONTEXT_TOKENS)


def tiny_config(vocab_size: int, top_k: int, context_token_ids: list[int]) -> GazeConfig:
    """The paper's family in miniature: a SigLIP-style tower and a Qwen3-style decoder.

    64 px scenes, 8x8 visual tokens, 2x2-token regions (one per scene cell): 16 regions,
    4 context tokens per image that attend to their own image (spec v2, ``own_image``).
    """
    return GazeConfig(
        vocab_size=vocab_size, gaze_top_k=top_k, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE,
        region_size=(2, 2), decoder_style="qwen3", vision_style="siglip",
        num_context_tokens=NUM_CONTEXT_TOKENS, context_token_ids=context_token_ids,
        context_attention="own_image",
    )


def make_batch(
    rng: np.random.Generator, processor: GazeProcessor, batch: int, held_out: bool = False
) -> dict[str, torch.Tensor]:
    """Scenes rendered and tokenised for teacher forcing; caption tokens are gaze queries."""
    sample = [scenes.sample_scene(rng, held_out) for _ in range(batch)]
    images = [scenes.render(s, processor.image.image_size, rng)[0] for s in sample]
    texts = [
        processor.apply_chat_template(
            [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": DEFAULT_PROMPT}]},
                {"role": "assistant", "content": s.caption()},
            ],
            add_generation_prompt=False,
        )
        for s in sample
    ]
    encoded = [processor.encode(t) for t in texts]
    width = max(len(e) for e in encoded)
    ids = torch.full((batch, width), processor.pad_token_id, dtype=torch.long)
    mask = torch.zeros((batch, width), dtype=torch.long)
    for i, e in enumerate(encoded):  # right padding: pads come after every real token
        ids[i, : len(e)] = torch.tensor(e)
        mask[i, : len(e)] = 1
    assistant = processor._token_id("<assistant>")
    after_prompt = (ids == assistant).long().cumsum(1) > 0
    gaze = after_prompt & (ids != assistant) & mask.bool()
    labels = torch.where(gaze, ids, torch.full_like(ids, -100))
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "gaze_mask": gaze,
        "labels": labels,
        "pixel_values": torch.from_numpy(processor.preprocess(images)),
    }


def curriculum_top_k(step: int, cfg: TrainConfig, num_regions: int) -> int:
    """The k curriculum: `gaze finetune`'s progressive schedule (dense, then linear down to top_k)."""
    if cfg.dense:
        return num_regions
    return scheduled_top_k(step, cfg.steps, [cfg.top_k], num_regions, "progressive", cfg.dense_frac,
                           cfg.shrink_end_frac)[0]


def learning_rate(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(cfg: TrainConfig) -> GazeForConditionalGeneration:
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    rng = np.random.default_rng(cfg.seed)
    processor = tiny_processor()
    vocab, ctx = processor.tokenizer.get_vocab_size(), processor.context_token_ids
    regions = tiny_config(vocab, 1, ctx).regions_per_image
    config = tiny_config(vocab, regions if cfg.dense else cfg.top_k, ctx)
    assert config.tokens_per_image == processor.tokens_per_image
    model = GazeForConditionalGeneration(config)
    if cfg.init_from:
        start_model, _ = load_checkpoint(cfg.init_from)
        model.load_state_dict(start_model.state_dict())
        print(f"starting from {cfg.init_from}", flush=True)
    print(f"training {'dense' if cfg.dense else 'gaze'} model: {count_parameters(model):,} parameters, "
          f"{cfg.steps} steps of {cfg.batch}, target top_k {config.gaze_top_k} of {regions} regions", flush=True)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.98),
    )
    model.train()
    start = time.time()
    history = []
    for step in range(cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, cfg)
        k = curriculum_top_k(step, cfg, regions)
        batch = make_batch(rng, processor, cfg.batch)
        out = model(**batch, gaze_top_k=k, aux_loss=not cfg.dense and cfg.aux_weight > 0)
        assert out.loss is not None
        loss = out.loss + (cfg.aux_weight * out.aux_loss if out.aux_loss is not None else 0.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            elapsed = time.time() - start
            eta = elapsed / (step + 1) * (cfg.steps - step - 1)
            aux = float(out.aux_loss.detach()) if out.aux_loss is not None else 0.0
            history.append({"step": step, "loss": float(out.loss.detach()), "aux": aux, "top_k": k})
            print(f"step {step:5d}/{cfg.steps}  loss {float(out.loss.detach()):.4f}  aux {aux:.4f}  k {k}  "
                  f"{elapsed:6.0f}s elapsed, eta {eta:5.0f}s", flush=True)
    model.eval()
    save_checkpoint(model, processor, cfg.out)
    log = {"train_config": asdict(cfg), "seconds": time.time() - start, "history": history}
    (Path(cfg.out) / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")
    print(f"saved {cfg.out} after {time.time() - start:.0f}s", flush=True)
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--dense", action="store_true", help="train the dense twin (top_k >= R)")
    parser.add_argument("--init-from", help="checkpoint to continue from")
    for field in ("top_k", "steps", "batch", "seed", "threads", "warmup", "log_every"):
        parser.add_argument(f"--{field.replace('_', '-')}", type=int, default=getattr(TrainConfig, field))
    for field in ("lr", "aux_weight", "dense_frac", "shrink_end_frac"):
        parser.add_argument(f"--{field.replace('_', '-')}", type=float, default=getattr(TrainConfig, field))
    args = parser.parse_args(argv)
    train(TrainConfig(**vars(args)))


if __name__ == "__main__":
    main()
