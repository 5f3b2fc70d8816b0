"""The gaze budget: per-layer top_k chosen from how much dense attention mass each k keeps.

`gaze calibrate OUT --calib DIR [--coverage 0.95]`, in four stages:

1. **Captions.** The PyTorch checkpoint OUT was exported from captions every calibration
   image at the export's current budget (greedy), as the deployed model would.
2. **Coverage.** One teacher-forced pass over prompt + caption with every layer dense
   (top_k = R): for each generated token (a gaze query), layer and KV head, the dense
   attention mass on each visual region (averaged over the group's query heads) and the
   order in which the selection rule ranks the regions (descriptor scores, max over the
   group, ties to the lower index). coverage(k) = share of the visual mass held by the
   k regions ranked first: exactly what `top_k = k` would let that query read.
3. **Choice.** Per layer, the smallest k whose coverage, averaged over all gaze queries and
   KV heads of the calibration set, reaches the target. Per-KV-head choices are measured
   and reported (what they would save) but not written: the GazeAttention node takes one
   top_k per layer (docs/ONNX_CONTRACT.md).
4. **Budget vs quality.** Greedy captions for every uniform k = 1..R, the trained budget and
   the chosen one: agreement with the dense model (same weights, top_k = R), accuracy where
   the folder has truth.txt, and KV bytes read per generated token (runtime/profile.py's
   formula). Then the chosen top_k is written into both places that hold it, decoder.onnx's
   node attributes and gaze_config.json (`write_top_k`), and the held-out check runs the
   rewritten export with the torch-free runtime (ONNX Runtime).

Why PyTorch: dense attention mass per region exists only inside attention; the exported
graph does not output it, and calibration is a host-side step like export.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gaze_edge.atomic import replace_files
from gaze_edge.errors import GazeError, InputError
from gaze_edge.runtime.folder import ExportFolder
from gaze_edge.runtime.profile import kv_bytes_per_step

from .data import ImageSet, accuracy

Progress = Callable[[str, int, int], None]


class CalibrationError(GazeError):
    """The export and the checkpoint do not belong together, or the export cannot be rewritten."""


def check_coverage(coverage: float) -> float:
    if not (0.0 < coverage <= 1.0) or np.isnan(coverage):
        raise InputError(f"--coverage must be in (0, 1] (the share of dense attention mass the selected regions "
                         f"must keep, e.g. 0.95), got {coverage}")
    return float(coverage)


# ------------------------------------------------------------------------- stage 1-2


@dataclass
class CoverageCurves:
    """Mean coverage over the calibration set's gaze queries, for k = 1..R (index k - 1)."""

    visual: np.ndarray  # [L, Hkv, R] share of the visual attention mass kept
    kept: np.ndarray  # [L, Hkv, R] share of all attention mass kept (dense tokens always are)
    visual_p10: np.ndarray  # [L, R] 10th percentile over queries and heads of the visual share
    queries: int  # gaze queries measured (each counted once per layer and KV head)

    @property
    def per_layer(self) -> np.ndarray:
        return self.visual.mean(1)


def _batches(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


@dataclass
class Captioner:
    """Greedy captions and coverage from the PyTorch model at any per-layer budget."""

    model: Any
    processor: Any
    images: ImageSet
    prompts: list[str | None]
    batch_size: int = 32
    max_new_tokens: int = 40

    def _inputs(self, part: slice) -> tuple[Any, Any, Any]:
        import torch

        texts = [self.processor.prompt(p) if p is not None else self.processor.prompt()
                 for p in (self.prompts[i % len(self.prompts)] for i in range(part.start, part.stop))]
        ids, mask = self.processor.batch_encode(texts)
        pixels = self.processor.preprocess(self.images.images[part])
        return torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(pixels)

    @contextlib.contextmanager
    def _budget(self, top_k: Sequence[int]) -> Iterator[None]:
        config = self.model.config
        saved = config.gaze_top_k
        config.gaze_top_k = [int(k) for k in top_k]
        try:
            yield
        finally:
            config.gaze_top_k = saved

    def captions(self, top_k: Sequence[int]) -> np.ndarray:
        """Greedy token ids [N, max_new_tokens] (pad after eos) at this budget."""
        import torch

        pad = self.processor.pad_token_id
        out = np.full((len(self.images), self.max_new_tokens), pad, dtype=np.int64)
        with self._budget(top_k), torch.no_grad():
            for part in _batches(len(self.images), self.batch_size):
                ids, mask, pixels = self._inputs(part)
                seq = self.model.generate(ids, pixel_values=pixels, attention_mask=mask,
                                          max_new_tokens=self.max_new_tokens).sequences.numpy()
                out[part, : seq.shape[1]] = seq
        return out

    def texts(self, tokens: np.ndarray) -> list[str]:
        return [self.processor.decode(row) for row in tokens]

    def coverage(self, tokens: np.ndarray, progress: Progress | None = None) -> CoverageCurves:
        """Teacher-forced dense pass over prompt + `tokens`; gaze queries are the generated tokens fed back."""
        import torch

        config = self.model.config
        eos, pad = config.eos_token_id, self.processor.pad_token_id
        visual_sum = kept_sum = None
        samples: list[np.ndarray] = []
        count = 0
        total = len(self.images)
        for part in _batches(total, self.batch_size):
            ids, mask, pixels = self._inputs(part)
            gen = torch.from_numpy(tokens[part])
            # A generated token is fed back (and gazes) unless it is eos or comes after it.
            after_eos = torch.cumsum((gen == eos).long(), 1) - (gen == eos).long() > 0
            fed = (gen != eos) & ~after_eos & (gen != pad)
            full_ids = torch.cat([ids, torch.where(fed, gen, torch.full_like(gen, pad))], 1)
            full_mask = torch.cat([mask, fed.long()], 1)
            gaze = torch.cat([torch.zeros_like(mask, dtype=torch.bool), fed], 1)
            with torch.no_grad():
                out = self.model(full_ids, pixel_values=pixels, attention_mask=full_mask, gaze_mask=gaze,
                                 gaze_top_k=10**9, coverage=True)
            per_layer_v, per_layer_k = [], []
            for cov in out.coverage:
                rows = cov.rows  # [B, Hkv, T]
                per_layer_v.append((cov.visual * rows[..., None]).sum((0, 2)).numpy())  # [Hkv, R]
                per_layer_k.append((cov.kept * rows[..., None]).sum((0, 2)).numpy())
                samples_layer = cov.visual[rows].numpy()  # [n, R] (n = rows over batch, heads, tokens)
                samples.append(samples_layer)
            n = int(out.coverage[0].rows.sum()) // out.coverage[0].rows.shape[1]
            count += n
            v, k = np.stack(per_layer_v), np.stack(per_layer_k)
            visual_sum = v if visual_sum is None else visual_sum + v
            kept_sum = k if kept_sum is None else kept_sum + k
            if progress:
                progress("coverage", part.stop, total)
        assert visual_sum is not None and kept_sum is not None
        if count == 0:
            raise InputError("no caption produced a gaze query (every caption ended at once); calibration needs "
                             "images the model describes")
        layers = len(out.coverage)
        by_layer = [np.concatenate(samples[i::layers]) for i in range(layers)]
        return CoverageCurves(visual=visual_sum / count, kept=kept_sum / count,
                              visual_p10=np.stack([np.percentile(s, 10, axis=0) for s in by_layer]),
                              queries=count)


# --------------------------------------------------------------------------- stage 3


def choose_top_k(curve: np.ndarray, coverage: float) -> np.ndarray:
    """Smallest k per row of `curve` [..., R] (coverage at k = 1..R) reaching `coverage`; R where none does."""
    meets = curve >= coverage - 1e-9  # k = R keeps all the visual mass, up to rounding
    return np.where(meets.any(-1), meets.argmax(-1) + 1, curve.shape[-1]).astype(np.int64)


def descend_by_agreement(captioner: Captioner, start: Sequence[int], dense: np.ndarray, min_agreement: float,
                         progress: Progress | None = None) -> tuple[list[int], list[dict[str, Any]]]:
    """Greedy: lower one layer's k at a time (largest first) while captions still agree with `dense`.

    Agreement = share of calibration captions identical to the dense model's. Returns the final
    budget and every trial (top_k, agreement, accepted) for the report.
    """
    current = [int(k) for k in start]
    trials: list[dict[str, Any]] = []
    blocked: set[int] = set()
    while True:
        candidates = [i for i in sorted(range(len(current)), key=lambda i: -current[i])
                      if current[i] > 1 and i not in blocked]
        if not candidates:
            return current, trials
        layer = candidates[0]
        trial = list(current)
        trial[layer] -= 1
        agreement = float((captioner.captions(trial) == dense).all(1).mean())
        accepted = agreement >= min_agreement
        trials.append({"top_k": trial, "agreement": agreement, "accepted": accepted})
        if progress:
            progress("agreement search", len(trials), len(trials) + len(candidates))
        if accepted:
            current = trial
        else:
            blocked.add(layer)  # this layer cannot go lower without losing captions; keep its k


# --------------------------------------------------------------------------- stage 4


@dataclass
class BudgetRow:
    name: str
    top_k: list[int]
    kv_bytes_per_token: float
    context_len: float  # mean KV length a generated token attends over
    agreement: float  # identical greedy token sequences vs dense (top_k = R)
    accuracy: float | None = None


@dataclass
class CalibrationReport:
    coverage_target: float
    images: int
    queries: int
    regions: int
    trained_top_k: list[int]
    chosen_top_k: list[int]
    coverage_top_k: list[int]  # the coverage rule's choice (= chosen unless --min-agreement lowered it)
    min_agreement: float | None
    agreement_search: list[dict[str, Any]]
    per_head_top_k: list[list[int]]
    per_head_kv_bytes_per_token: float
    coverage_per_layer: list[list[float]]  # [L][R]
    coverage_p10_per_layer: list[list[float]]
    kept_mass_per_layer: list[list[float]]
    rows: list[BudgetRow] = field(default_factory=list)
    held_out: dict[str, Any] | None = None
    written: bool = False

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "rows"}
        out["budgets"] = [r.__dict__ for r in self.rows]
        return out


def kv_bytes_per_token(shape: Any, top_k: Sequence[float], context_len: float) -> float:
    """Bytes of KV + descriptors one generated token reads at the mean decode context (1 image).

    Bytes are linear in the context, so the mean over the decode steps is the value at the mean context.
    """
    return float(kv_bytes_per_step(shape, 1, 1, context_len, top_k)["gaze"])


def sweep(captioner: Captioner, shape: Any, budgets: dict[str, list[int]], reference: str, prompt_len: float,
          progress: Progress | None = None) -> list[BudgetRow]:
    """Greedy captions at each budget; agreement with the budget named `reference` (dense)."""
    tokens: dict[str, np.ndarray] = {}
    for i, (name, top_k) in enumerate(budgets.items()):
        tokens[name] = captioner.captions(top_k)
        if progress:
            progress("budgets", i + 1, len(budgets))
    images = captioner.images
    rows = []
    for name, top_k in budgets.items():
        t = tokens[name]
        generated = (t != captioner.processor.pad_token_id).sum(1).mean()
        # Decode steps feed generated tokens 0..n-2 (not the last) at contexts prompt_len+1 .. prompt_len+n-1.
        context = prompt_len + generated / 2
        acc = accuracy(captioner.texts(t), images.names, images.truth) if images.has_truth else None
        rows.append(BudgetRow(name, list(top_k), kv_bytes_per_token(shape, top_k, context), float(context),
                              float((t == tokens[reference]).all(1).mean()), acc))
    return rows


# ------------------------------------------------------------------- writing top_k


def write_top_k(folder: ExportFolder, top_k: Sequence[int], calibration: dict[str, Any]) -> None:
    """Set top_k per layer in decoder.onnx (node attributes + metadata) and gaze_config.json.

    Both files are replaced as one step (gaze_edge.atomic.replace_files): each temp file is
    written and fsynced in the folder first, so a failed write (disk full) changes neither; then
    the two renames run as one `held_signals` section, so Ctrl-C, SIGTERM or SIGHUP lands before
    the first or is raised after the second, never between them. Should the folder still end up
    with copies that disagree (a rename failing half-way, a crash of the machine), the runtime
    refuses it by name (runtime/backend.py check_top_k_metadata) and a second `gaze calibrate`
    repairs it. External weights are not rewritten.
    """
    import onnx

    from gaze_edge.export.node import DOMAIN, OP_TYPE, TOP_K_METADATA

    top_k = [int(k) for k in top_k]
    path = folder.decoder_path
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and OSError; onnx has no stable error type
        raise CalibrationError(f"cannot read {path} ({exc}); re-run `gaze export`") from exc
    nodes = [n for n in proto.graph.node if n.domain == DOMAIN and n.op_type == OP_TYPE]
    if len(nodes) != len(top_k):
        raise CalibrationError(f"{path} has {len(nodes)} GazeAttention nodes for {len(top_k)} layers; re-run "
                               "`gaze export`")
    for node, k in zip(nodes, top_k, strict=True):  # graph order is layer order (export writes them so)
        attrs = [a for a in node.attribute if a.name == "top_k"]
        if len(attrs) != 1:
            raise CalibrationError(f"{path}: node {node.name} has no top_k attribute; re-run `gaze export`")
        attrs[0].i = k
    props = {p.key: p.value for p in proto.metadata_props}
    props[TOP_K_METADATA] = json.dumps(top_k)
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, props)

    config = json.loads(json.dumps(folder.config))
    config["gaze"]["top_k_per_layer"] = top_k
    config["gaze"]["calibration"] = calibration
    # Both temp files written first, then both renamed in one held_signals section (gaze_edge/atomic.py).
    replace_files([(path, proto.SerializeToString()),
                   (folder.path / "gaze_config.json", (json.dumps(config, indent=2) + "\n").encode())])
    folder.config = config


class TqdmProgress:
    """Progress bars on stderr, one per stage (tqdm: redraws in a terminal, plain lines in a log)."""

    def __init__(self) -> None:
        self.bars: dict[str, Any] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        from tqdm import tqdm

        bar = self.bars.get(stage)
        if bar is None:
            bar = self.bars[stage] = tqdm(total=total, desc=stage, file=sys.stderr, leave=True, mininterval=0.5)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()
