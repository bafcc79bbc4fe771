"""The epoch loop that partial and full fine-tuning (and distillation) share.

Discriminative learning rates (each earlier layer group gets `layer_decay` times the next one's),
linear warm-up then cosine decay or one-cycle, label smoothing, optionally an exponential moving
average of the weights (torch.optim.swa_utils; then the average is what is evaluated, kept and
returned), early stopping on val (or, `keep="last"`, the last epoch kept), and a resume file written atomically after every epoch: a killed run continues from its last finished
epoch. Each epoch's shuffling, augmentation and dropout draw from generators seeded by
(seed, epoch), so a resumed run takes exactly the steps an uninterrupted one would have taken.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from components.core.devices import Placement
from components.core.progress import Progress, no_progress
from components.core.result import atomic_path
from components.training.config import LoopConfig
from components.training.replicas import SINGLE, Replicas

log = logging.getLogger(__name__)

Batches = Callable[[int, torch.Generator], Iterable[tuple[torch.Tensor, torch.Tensor]]]
Evaluate = Callable[[nn.Module], dict[str, float]]  # -> val_loss, val_accuracy
OnEpoch = Callable[[int, dict[str, float]], None]  # (epoch, history entry); may raise to stop training (tune's pruning)


@dataclass
class FitResult:
    state: dict[str, torch.Tensor]  # the best epoch's weights
    history: list[dict[str, float]]
    best_epoch: int
    resumed_from: int | None  # the epoch a killed run was continued after
    seconds: float
    stopped_early: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def param_groups(groups: Sequence[Sequence[nn.Parameter]], cfg: LoopConfig) -> list[dict[str, Any]]:
    """Optimizer groups, earliest first; the last group (the head) gets `cfg.lr`.

    Norm and bias parameters take no weight decay (the usual AdamW practice).
    """
    result = []
    for index, params in enumerate(groups):
        lr = cfg.lr * cfg.layer_decay ** (len(groups) - 1 - index)
        decay = [p for p in params if p.requires_grad and p.ndim > 1]
        no_decay = [p for p in params if p.requires_grad and p.ndim <= 1]
        result += [{"params": decay, "lr": lr, "weight_decay": cfg.weight_decay},
                   {"params": no_decay, "lr": lr, "weight_decay": 0.0}]
    return [g for g in result if g["params"]]


def lr_scheduler(optimizer: torch.optim.Optimizer, cfg: LoopConfig, steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=total,
            pct_start=max(cfg.warmup_epochs * steps_per_epoch / total, 0.05),
        )
    warmup = cfg.warmup_epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def better(entry: dict[str, float], best: dict[str, float] | None) -> bool:
    """Val accuracy decides; equal accuracy goes to the lower val loss."""
    if best is None:
        return True
    return (entry["val_accuracy"], -entry["val_loss"]) > (best["val_accuracy"], -best["val_loss"])


def fit(
    model: nn.Module,
    groups: Sequence[Sequence[nn.Parameter]],
    batches: Batches,
    steps_per_epoch: int,
    evaluate: Evaluate,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    cfg: LoopConfig,
    placement: Placement,
    resume_path: Path | None = None,
    resume_fingerprint: str = "",
    progress: Progress = no_progress,
    desc: str = "finetune",
    on_epoch: OnEpoch | None = None,
    replicas: Replicas = SINGLE,
) -> FitResult:
    """Train `model` in place; returns the best epoch's weights. `batches(epoch, generator)` yields (x, y).

    `replicas`: the processes training it together (components/training/replicas.py); each passes its own share
    of every batch, rank 0 alone evaluates and writes the resume file."""
    model.to(placement.device)
    trained = replicas.wrap(model, [p for group in groups for p in group])  # `model` itself in one process
    optimizer = torch.optim.AdamW(param_groups(groups, cfg))
    scheduler = lr_scheduler(optimizer, cfg, steps_per_epoch)
    # The weights evaluated and kept: the model itself, or its moving average (BatchNorm statistics averaged too).
    averaged = (AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True)
                if cfg.ema > 0 else None)
    kept = model if averaged is None else averaged.module
    history: list[dict[str, float]] = []
    best_state, best, stale, start, resumed_from, seconds = None, None, 0, 0, None, 0.0
    if resume_path is not None and resume_path.exists():
        saved = torch.load(resume_path, map_location=placement.device, weights_only=False)
        if saved.get("fingerprint") == resume_fingerprint:
            model.load_state_dict(saved["model"])
            if averaged is not None:
                averaged.load_state_dict(saved["averaged"])
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
            history, best_state, stale, seconds = saved["history"], saved["best_state"], saved["stale"], saved["seconds"]
            best = max(history, key=lambda h: (h["val_accuracy"], -h["val_loss"])) if history else None
            start = resumed_from = len(history)
            log.info("resuming %s after epoch %d of %d (%s)", desc, start, cfg.epochs, resume_path)
        else:
            log.info("%s: resume state is for other inputs; starting from epoch 0", resume_path)
    stopped_early = bool(history) and stale >= cfg.patience
    with progress(total=cfg.epochs, desc=desc, unit="epoch") as bar:
        bar.update(start)
        for epoch in range(start, cfg.epochs):
            if stopped_early:
                break
            began = time.perf_counter()
            generator = torch.Generator().manual_seed(replicas.seed(cfg.seed * 100_003 + epoch))
            torch.manual_seed(replicas.seed(cfg.seed * 100_003 + epoch))  # dropout, stochastic depth
            model.train()
            total, count = 0.0, 0
            for x, y in batches(epoch, generator):
                # x: one tensor, or a tuple of them (a text model takes hidden states or ids, and a mask)
                inputs = tuple(t.to(placement.device, non_blocking=True) for t in (x if isinstance(x, tuple) else (x,)))
                y = y.to(placement.device, non_blocking=True)
                optimizer.zero_grad(set_to_none=True)
                with placement.autocast():
                    loss = loss_fn(trained(*inputs), y)
                loss.backward()
                optimizer.step()
                scheduler.step()
                if averaged is not None:
                    averaged.update_parameters(model)
                total, count = total + loss.item() * len(y), count + len(y)
            kept.eval()
            with torch.no_grad(), placement.autocast():
                scores = replicas.from_writer(evaluate(kept) if replicas.writer else None)
            total, count = replicas.total(total, count)
            seconds += time.perf_counter() - began
            entry = {"epoch": epoch, "train_loss": total / max(count, 1), **scores,
                     "lr": optimizer.param_groups[-1]["lr"], "seconds": seconds}
            history.append(entry)
            if cfg.keep == "last" or better(entry, best):
                best, best_state, stale = entry, copy.deepcopy({k: v.cpu() for k, v in kept.state_dict().items()}), 0
            else:
                stale += 1
            stopped_early = stale >= cfg.patience
            if resume_path is not None and replicas.writer:
                with atomic_path(resume_path) as partial:
                    torch.save({"fingerprint": resume_fingerprint, "model": model.state_dict(),
                                "averaged": averaged.state_dict() if averaged is not None else None,
                                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                "history": history, "best_state": best_state, "stale": stale,
                                "seconds": seconds}, partial)
            bar.update(1)
            log.info("%s epoch %d: train loss %.4f, val loss %.4f, val accuracy %.4f (%.0f s)", desc, epoch,
                     entry["train_loss"], entry["val_loss"], entry["val_accuracy"], time.perf_counter() - began)
            if stopped_early:
                log.info("%s: early stop after epoch %d (best val accuracy %.4f at epoch %d)", desc, epoch,
                         best["val_accuracy"], best["epoch"])
            if on_epoch is not None:
                on_epoch(epoch, entry)
    assert best is not None and best_state is not None
    return FitResult(best_state, history, int(best["epoch"]), resumed_from, seconds, stopped_early)


@dataclass
class Trained:
    """What a strategy hands back: the network with its trained weights (None: trunk untouched), the head."""

    network: nn.Module | None
    head: nn.Module  # any head with a spec (components/models/heads.py)
    history: list[dict[str, float]]
    best: dict[str, float]
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)
    # Pictures the strategy can draw once it knows where: file name -> a function writing it to the path given.
    plots: dict[str, Callable[[Path], Path]] = field(default_factory=dict)


def class_weight_vector(labels: Sequence[int], n_classes: int, mode: str) -> torch.Tensor:
    """scikit-learn's "balanced" heuristic, n / (k * count); absent classes weigh 0. "none": all ones."""
    if mode == "none":
        return torch.ones(n_classes)
    counts = torch.bincount(torch.as_tensor(list(labels)), minlength=n_classes).double()
    weights = torch.where(counts > 0, len(labels) / (n_classes * counts.clamp(min=1)), torch.zeros_like(counts))
    return weights.float()


def scores(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Val loss (plain cross-entropy, no smoothing) and accuracy of float logits."""
    logits = logits.float()
    return {"val_loss": nn.functional.cross_entropy(logits, labels).item(),
            "val_accuracy": (logits.argmax(1) == labels).float().mean().item()}


