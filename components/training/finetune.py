"""Finetune: train a classifier on the selected backbone, by one of four strategies.

- `linear`: a logistic-regression probe on cached features of one or more taps (seconds).
- `partial`: the last N blocks, the top conv and a new head, trained from cached activations of
  the frozen part and cached flip/rotation views (`partial_finetune`).
- `full`: everything, end to end on augmented images (`full_finetune`).
- `auto`: linear, then partial, then full while the time budget allows; best val accuracy wins.

Every run also fits a reference that knows nothing of ImageNet (a linear model on downsampled
pixels, `reference`): a transferred model that does not beat it on val by `guard.margin` is
reported as negative transfer (console, MLflow tag `tlops.negative_transfer`, `finetune.json`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from pydantic import Field

from components.core import devices
from components.core.config import StageConfig
from components.core.lineage import data_version
from components.core.progress import Progress, no_progress
from components.core.result import StageResult, sha256_file, sha256_json, write_json
from components.data.manifest import Dataset
from components.data.preprocess import Preprocessing
from components.features.extract import read_record, split_features
from components.models.backbones import get_entry
from components.models.classifier import MAX_VIEWS, save_checkpoint
from components.training import reference
from components.training.distill import DistillConfig
from components.training.linear_probe import fit_probe
from components.training.loop import LoopConfig, OnEpoch, Trained

if TYPE_CHECKING:
    from components.models import quantization as int8

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "model.pt"
REPORT_FILE = "finetune.json"
AUTO_ORDER = ("linear", "partial", "full")  # cheapest first
NEXT_STEP = {"linear": reference.DEEPER_FINETUNING, "partial": "try finetune.strategy=full (auto does this)",
             "full": "the pretrained weights do not help on this data; consider another backbone or more data"}


class LinearConfig(StageConfig):
    taps: tuple[str, ...] = Field(("pooled",), min_length=1)  # concatenated; each must be in features.taps
    regularization: tuple[float, ...] = Field((0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0), min_length=1)  # sklearn C grid


class TrainConfig(StageConfig):
    """The epoch loop of partial and full fine-tuning."""

    epochs: int = Field(12, ge=1)
    lr: float = Field(1e-3, gt=0)  # the head's peak learning rate
    layer_decay: float = Field(0.7, gt=0, le=1)  # each earlier layer group: this times the next one's lr
    weight_decay: float = Field(0.01, ge=0)
    batch_size: int = Field(64, ge=2)
    warmup_epochs: int = Field(1, ge=0)
    schedule: Literal["cosine", "onecycle"] = "cosine"
    patience: int = Field(4, ge=1)  # epochs without a better val accuracy before early stopping
    dropout: float = Field(0.2, ge=0, lt=1)
    ema: float = Field(0.0, ge=0, lt=1)  # per-step decay of a moving average of the weights, which is kept; 0 = off

    def loop(self, seed: int) -> LoopConfig:
        return LoopConfig(self.epochs, self.lr, self.layer_decay, self.weight_decay, min(self.warmup_epochs, self.epochs - 1),
                          self.schedule, self.patience, seed, self.ema)


class PartialConfig(TrainConfig):
    blocks: int = Field(5, ge=1)  # the last N blocks trained (Lite0 has 16)
    views: int = Field(8, ge=1, le=8)  # cached views per train image: 4 rotations, then their mirrors
    # Also train on the frozen part's INT8 activations (compress's recipe), when compress quantizes.
    int8_views: bool = True


class FullConfig(TrainConfig):
    epochs: int = Field(15, ge=1)
    lr: float = Field(5e-4, gt=0)
    batch_size: int = Field(32, ge=2)
    crop_scale_min: float = Field(0.8, gt=0, le=1)  # RandomResizedCrop's smallest area share
    jitter: float = Field(0.2, ge=0, lt=1)  # brightness/contrast jitter
    workers: int = Field(1, ge=0)  # DataLoader processes decoding and augmenting


class FinetuneConfig(StageConfig):
    strategy: Literal["linear", "partial", "full", "auto"] = "auto"
    budget_minutes: float = Field(20.0, gt=0)  # auto: train no deeper strategy than fits in this
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast where the hardware has native bf16
    class_weights: Literal["balanced", "none"] = "balanced"
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    seed: int = 0
    guard: reference.ReferenceConfig = reference.ReferenceConfig()
    distill: DistillConfig = DistillConfig()  # partial strategy only: a teacher's cached logits in the loss
    linear: LinearConfig = LinearConfig()
    partial: PartialConfig = PartialConfig()
    full: FullConfig = FullConfig()


class Context:
    """What every strategy needs, resolved once."""

    def __init__(self, cfg: FinetuneConfig, backbone: str, features_dir: Path, dataset: Dataset, cache_dir: Path,
                 state_dir: Path, opset: int, atol: float, progress: Progress, on_epoch: OnEpoch | None = None,
                 int8_recipe: int8.Recipe | None = None):
        self.int8_recipe = int8_recipe
        self.cfg, self.dataset, self.features_dir, self.cache_dir, self.state_dir = cfg, dataset, features_dir, cache_dir, state_dir
        self.entry = get_entry(backbone)
        self.record = read_record(features_dir, backbone)
        self.preprocessing = Preprocessing.of(self.record["preprocessing"])
        self.opset, self.atol, self.progress, self.on_epoch = opset, atol, progress, on_epoch
        self.placement = devices.resolve(cfg.device, cfg.precision)

    def teacher_sha256(self) -> str | None:
        """The distillation teacher's content: a teacher retrained at the same path must not resume old state."""
        teacher = self.cfg.distill.teacher
        return sha256_file(Path(teacher)) if teacher and Path(teacher).is_file() else None

    def resume(self, strategy: str, block: StageConfig) -> tuple[Path, str]:
        """Where a strategy keeps its per-epoch state, and the fingerprint a saved state must match."""
        fingerprint = sha256_json({"strategy": strategy, "config": block.model_dump(mode="json"),
                                   "common": self.cfg.model_dump(mode="json", include={"class_weights", "label_smoothing", "seed", "distill"}),
                                   "backbone": self.entry.describe(), "features": self.record["cache_key"],
                                   "data": self.dataset.manifest[["sha256", "label", "split"]].to_dict("list"),
                                   "placement": self.placement.describe(),
                                   "int8": self.int8_recipe.as_dict() if self.int8_recipe and strategy == "partial" else None,
                                   "teacher_sha256": self.teacher_sha256() if strategy == "partial" else None})
        return self.state_dir / f"{strategy}-{fingerprint[:16]}.pt", fingerprint


def train_linear(ctx: Context) -> Trained:
    began = time.perf_counter()
    labels = {s: np.asarray(ctx.dataset.label_index(ctx.dataset.split(s))) for s in ("train", "val")}
    features = {s: np.concatenate([split_features(ctx.dataset, ctx.features_dir, ctx.entry.name, tap, s)
                                   for tap in ctx.cfg.linear.taps], axis=1) for s in ("train", "val")}
    probe = fit_probe((features["train"], labels["train"]), (features["val"], labels["val"]), len(ctx.dataset.labels),
                      ctx.cfg.linear.regularization, ctx.cfg.class_weights, ctx.cfg.seed)
    info = {"taps": list(ctx.cfg.linear.taps), "C": probe.best["C"], "n_features": int(features["train"].shape[1])}
    return Trained(None, probe.head, probe.history, probe.best, time.perf_counter() - began, info)


def train_partial(ctx: Context) -> Trained:
    from components.training.partial import train_partial as train

    path, fingerprint = ctx.resume("partial", ctx.cfg.partial)
    return train(ctx.cfg.partial, ctx.cfg, ctx.entry, ctx.preprocessing, ctx.dataset, ctx.cache_dir, ctx.placement,
                 path, fingerprint, ctx.opset, ctx.atol, ctx.progress, ctx.on_epoch, ctx.int8_recipe)


def train_full(ctx: Context) -> Trained:
    from components.training.full import train_full as train

    path, fingerprint = ctx.resume("full", ctx.cfg.full)
    return train(ctx.cfg.full, ctx.cfg, ctx.entry, ctx.preprocessing, ctx.dataset, ctx.placement, path, fingerprint,
                 ctx.progress, ctx.on_epoch)


def estimate_seconds(ctx: Context, strategy: str) -> float:
    """A strategy's wall time here, estimated from a few timed steps (no early stopping assumed).

    On ELPV it came out 13% below the real time of `partial` (436 s vs 504 s): timed steps run warm.
    """
    if strategy == "linear":
        return 0.0
    if strategy == "partial":
        from components.training.partial import estimate_seconds as estimate

        return estimate(ctx.cfg.partial, ctx.entry, ctx.preprocessing, ctx.dataset, ctx.cache_dir, ctx.placement,
                        ctx.opset, ctx.atol, ctx.int8_recipe)
    from components.training.full import estimate_seconds as estimate

    return estimate(ctx.cfg.full, ctx.entry, ctx.preprocessing, ctx.dataset, ctx.placement)


STRATEGIES: dict[str, Callable[[Context], Trained]] = {"linear": train_linear, "partial": train_partial, "full": train_full}


def train_auto(ctx: Context, ref: reference.ReferenceResult) -> tuple[str, Trained, list[dict[str, Any]], str]:
    """Each strategy, cheapest first, while its estimated time fits what is left of the budget."""
    budget, began = ctx.cfg.budget_minutes * 60, time.perf_counter()
    tried: list[tuple[str, Trained]] = []
    candidates: list[dict[str, Any]] = []
    for strategy in AUTO_ORDER:
        left = budget - (time.perf_counter() - began)
        estimate = estimate_seconds(ctx, strategy)
        if tried and estimate > left:
            reason = f"skipped: estimated {estimate / 60:.1f} min, {max(left, 0) / 60:.1f} min of the budget left"
            candidates.append({"strategy": strategy, "estimated_s": estimate, "status": "skipped", "reason": reason})
            log.info("auto: %s %s", strategy, reason)
            continue
        trained = STRATEGIES[strategy](ctx)
        verdict = reference.judge(trained.best["val_accuracy"], ref, ctx.cfg.guard.margin, f"{ctx.entry.name}/{strategy}",
                                  NEXT_STEP[strategy])
        if verdict.fired:
            log.warning("auto: %s", verdict.message)
        candidates.append({"strategy": strategy, "estimated_s": estimate, "status": "trained",
                           "val_accuracy": trained.best["val_accuracy"], "val_loss": trained.best["val_loss"],
                           "seconds": trained.seconds, "negative_transfer": verdict.fired})
        log.info("auto: %s reaches val accuracy %.4f in %.0f s%s", strategy, trained.best["val_accuracy"],
                 trained.seconds, " (negative transfer)" if verdict.fired else "")
        tried.append((strategy, trained))
    # Best val accuracy; a tie goes to the cheaper strategy (earlier in AUTO_ORDER).
    chosen, best = max(tried, key=lambda item: (item[1].best["val_accuracy"], -AUTO_ORDER.index(item[0])))
    others = ", ".join(f"{c['strategy']} {c['val_accuracy']:.4f}" if c["status"] == "trained" else f"{c['strategy']} {c['reason']}"
                       for c in candidates if c["strategy"] != chosen)
    why = (f"auto chose {chosen}: best val accuracy {best.best['val_accuracy']:.4f} within "
           f"{ctx.cfg.budget_minutes:g} min (others: {others or 'none'})")
    return chosen, best, candidates, why


def plot_history(history: list[dict[str, float]], path: Path, strategy: str) -> Path:
    figure = Figure(figsize=(10, 4))
    FigureCanvasAgg(figure)
    loss_ax, acc_ax = figure.subplots(1, 2)
    x_key, x_label = ("C", "L2 strength C (log)") if strategy == "linear" else ("epoch", "epoch")
    steps = [h[x_key] for h in history]
    loss_ax.plot(steps, [h["train_loss"] for h in history], marker="o", label="train")
    loss_ax.plot(steps, [h["val_loss"] for h in history], marker="o", label="val")
    loss_ax.set(xlabel=x_label, ylabel="cross-entropy", title=f"Loss ({strategy})")
    acc_ax.plot(steps, [h["val_accuracy"] for h in history], marker="o")
    acc_ax.set(xlabel=x_label, ylabel="accuracy", title="Validation accuracy")
    if strategy == "linear":
        loss_ax.set_xscale("log")
        acc_ax.set_xscale("log")
    loss_ax.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return path


def train_views(cfg: FinetuneConfig, strategy: str) -> int:
    """How many dihedral views of each image (rotations, then mirrors) the model saw in training; export's
    test-time averaging uses no more. Linear: the image as it is; full: random flips and 90° rotations."""
    return {"linear": 1, "partial": cfg.partial.views, "full": MAX_VIEWS}[strategy]


def check_taps(cfg: FinetuneConfig, record: dict[str, Any], backbone: str) -> None:
    missing = [t for t in cfg.linear.taps if t not in record["taps"]]
    if cfg.strategy in ("linear", "auto") and missing:
        from components.core.errors import UserError

        raise UserError(f"finetune.linear.taps {list(cfg.linear.taps)}: {missing} not cached for {backbone} "
                        f"(features.taps is {record['taps']}); add them to features.taps or drop them here.")


def run(cfg: FinetuneConfig, backbone: str, features_dir: Path, dataset: Dataset, manifest_path: Path, out_dir: Path,
        cache_dir: Path, state_dir: Path, opset: int = 17, atol: float = 1e-4,
        progress: Progress = no_progress, on_epoch: OnEpoch | None = None,
        int8_recipe: int8.Recipe | None = None) -> StageResult:
    """Train by `cfg.strategy`; `cache_dir` holds cached activations, `state_dir` per-epoch resume files.

    `int8_recipe`: how compress will quantize (None: it will not); `partial` then also trains on INT8 activations.

    `on_epoch(epoch, entry)` is called after each epoch of partial/full; an exception it raises stops
    the run before anything is written to `out_dir`."""
    ctx = Context(cfg, backbone, features_dir, dataset, cache_dir, state_dir, opset, atol, progress, on_epoch, int8_recipe)
    check_taps(cfg, ctx.record, backbone)
    log.info("finetune on %s", ctx.placement.reason)
    ref = reference.fit_reference(cfg.guard, dataset)
    if cfg.strategy == "auto":
        strategy, trained, candidates, why = train_auto(ctx, ref)
    else:
        strategy, trained = cfg.strategy, STRATEGIES[cfg.strategy](ctx)
        candidates, why = [], f"finetune.strategy={strategy}"
    verdict = reference.judge(trained.best["val_accuracy"], ref, cfg.guard.margin, f"{backbone}/{strategy}",
                              NEXT_STEP[strategy])
    (log.warning if verdict.fired else log.info)("%s", verdict.message)

    out_dir.mkdir(parents=True, exist_ok=True)
    taps = list(cfg.linear.taps) if strategy == "linear" else ["pooled"]
    trunk_state = None
    if trained.network is not None:
        from components.models.backbones import Trunk

        trunk_state = Trunk(trained.network, {t: ctx.entry.taps[t] for t in taps}).state_dict()
    checkpoint = save_checkpoint(
        out_dir / CHECKPOINT_FILE, trained.head, trunk_state,
        backbone=ctx.entry.describe(), taps=taps, labels=list(dataset.labels), preprocessing=ctx.preprocessing.model_dump(mode="json"),
        config=cfg.model_dump(mode="json"), strategy=strategy, data={"version": data_version(manifest_path)},
        features_cache_key=ctx.record["cache_key"], train_views=train_views(cfg, strategy),
    )
    report = {"strategy": strategy, "why": why, "candidates": candidates, "placement": ctx.placement.describe(),
              "reference": asdict(ref), "negative_transfer": {"fired": verdict.fired, "message": verdict.message},
              "best": trained.best, "info": trained.info}
    write_json(out_dir / REPORT_FILE, report)
    write_json(out_dir / "history.json", trained.history)
    plot = plot_history(trained.history, out_dir / "training_curves.png", strategy)
    result = StageResult(
        stage="finetune", out_dir=out_dir,
        metrics={"val_accuracy": trained.best["val_accuracy"], "val_loss": trained.best["val_loss"],
                 "best_epoch": trained.best["epoch"], "epochs_run": len(trained.history), "train_seconds": trained.seconds,
                 "n_train": len(dataset.split("train")), "reference_val_accuracy": ref.val_accuracy,
                 **{f"auto.{c['strategy']}.val_accuracy": c["val_accuracy"] for c in candidates if "val_accuracy" in c}},
        artifacts={"checkpoint": checkpoint, "report": out_dir / REPORT_FILE, "history": out_dir / "history.json",
                   "training_curves": plot},
        info={"backbone": backbone, "strategy": strategy, "labels": list(dataset.labels), "why": why,
              "negative_transfer": "fired" if verdict.fired else "no", "device": ctx.placement.describe()["device"],
              "precision": ctx.placement.precision},
    )
    result.save()
    return result
