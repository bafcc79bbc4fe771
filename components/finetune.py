"""Finetune: train a classifier on the selected backbone.

`linear` trains a head on cached trunk features (seconds, not hours). Partial unfreezing and
full fine-tuning plug in as further entries of `STRATEGIES`; their checkpoints carry the trunk
state as well, which `classifier.build_model` already loads.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable

from pathlib import Path
from typing import Literal

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from pydantic import Field
from torch import nn

from components.backbones import get_entry
from components.classifier import save_checkpoint
from components.config import StageConfig
from components.features import split_features
from components.lineage import data_version
from components.manifest import Dataset
from components.progress import Progress, no_progress
from components.result import StageResult, sha256_file, write_json

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "model.pt"


class FinetuneConfig(StageConfig):
    strategy: Literal["linear"] = "linear"
    epochs: int = Field(200, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    batch_size: int = Field(64, ge=1)
    patience: int = Field(20, ge=1)  # epochs without a better val loss before stopping
    class_weights: Literal["balanced", "none"] = "balanced"
    seed: int = 0


def labelled_features(features_dir: Path, backbone: str, tap: str, dataset: Dataset, split: str) -> tuple[np.ndarray, np.ndarray]:
    features = split_features(dataset, features_dir, backbone, tap, split)
    return features, np.asarray(dataset.label_index(dataset.split(split)))


def class_weight_vector(labels: np.ndarray, n_classes: int, mode: str) -> torch.Tensor:
    if mode == "none":
        return torch.ones(n_classes)
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    # The "balanced" heuristic of scikit-learn: n / (k * count), absent classes weigh 0.
    weights = np.divide(len(labels), n_classes * counts, out=np.zeros_like(counts), where=counts > 0)
    return torch.tensor(weights, dtype=torch.float32)


def train_linear(cfg: FinetuneConfig, train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray],
                 n_classes: int, progress: Progress = no_progress) -> tuple[nn.Linear, list[dict[str, float]]]:
    """AdamW on a linear head with early stopping on val loss; returns the best head."""
    torch.manual_seed(cfg.seed)
    x_train, y_train = torch.from_numpy(train[0]), torch.from_numpy(train[1]).long()
    x_val, y_val = torch.from_numpy(val[0]), torch.from_numpy(val[1]).long()
    head = nn.Linear(x_train.shape[1], n_classes)
    loss_fn = nn.CrossEntropyLoss(weight=class_weight_vector(train[1], n_classes, cfg.class_weights))
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)
    best, best_loss, stale, history = copy.deepcopy(head), float("inf"), 0, []
    with progress(total=cfg.epochs, desc="finetune linear", unit="epoch") as bar:
        for epoch in range(cfg.epochs):
            head.train()
            for batch in torch.randperm(len(x_train), generator=generator).split(cfg.batch_size):
                optimizer.zero_grad()
                loss_fn(head(x_train[batch]), y_train[batch]).backward()
                optimizer.step()
            head.eval()
            with torch.no_grad():
                train_loss = loss_fn(head(x_train), y_train).item()
                val_logits = head(x_val)
                val_loss = loss_fn(val_logits, y_val).item()
                val_acc = (val_logits.argmax(1) == y_val).float().mean().item()
            history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "val_accuracy": val_acc})
            bar.update(1)
            if val_loss < best_loss - 1e-6:
                best, best_loss, stale = copy.deepcopy(head), val_loss, 0
            else:
                stale += 1
                if stale >= cfg.patience:
                    log.info("early stop at epoch %d (best val loss %.4f)", epoch, best_loss)
                    break
    return best.eval(), history


STRATEGIES: dict[str, Callable[..., tuple[nn.Linear, list[dict[str, float]]]]] = {"linear": train_linear}


def plot_history(history: list[dict[str, float]], path: Path) -> Path:
    figure = Figure(figsize=(10, 4))
    FigureCanvasAgg(figure)
    loss_ax, acc_ax = figure.subplots(1, 2)
    epochs = [h["epoch"] for h in history]
    loss_ax.plot(epochs, [h["train_loss"] for h in history], label="train")
    loss_ax.plot(epochs, [h["val_loss"] for h in history], label="val")
    loss_ax.set(xlabel="epoch", ylabel="weighted cross-entropy", title="Loss")
    loss_ax.legend()
    acc_ax.plot(epochs, [h["val_accuracy"] for h in history])
    acc_ax.set(xlabel="epoch", ylabel="accuracy", title="Validation accuracy", ylim=(0, 1))
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return path


def run(cfg: FinetuneConfig, backbone: str, tap: str, features_dir: Path, dataset: Dataset,
        manifest_path: Path, out_dir: Path, progress: Progress = no_progress) -> StageResult:
    entry = get_entry(backbone)
    described = json.loads((features_dir / backbone / "backbone.json").read_text())
    preprocessing = described["preprocessing"]
    train = labelled_features(features_dir, backbone, tap, dataset, "train")
    val = labelled_features(features_dir, backbone, tap, dataset, "val")
    head, history = STRATEGIES[cfg.strategy](cfg, train, val, len(dataset.labels), progress)
    best = min(history, key=lambda h: h["val_loss"])

    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = save_checkpoint(
        out_dir / CHECKPOINT_FILE, head, None,
        backbone=entry.describe(), tap=tap, labels=list(dataset.labels), preprocessing=preprocessing,
        config=cfg.model_dump(mode="json"), strategy=cfg.strategy, data={"version": data_version(manifest_path)},
        features_cache_key=described["cache_key"],
    )
    write_json(out_dir / "history.json", history)
    plot = plot_history(history, out_dir / "training_curves.png")
    result = StageResult(
        stage="finetune", out_dir=out_dir,
        metrics={"best_epoch": best["epoch"], "val_loss": best["val_loss"], "val_accuracy": best["val_accuracy"],
                 "epochs_run": len(history), "n_train": len(train[1])},
        artifacts={"checkpoint": checkpoint, "history": out_dir / "history.json", "training_curves": plot},
        info={"backbone": backbone, "strategy": cfg.strategy, "labels": list(dataset.labels)},
    )
    result.save()
    return result

