"""The `prototypes` strategy: nearest class centroid on cached features, as SimpleShot does it (seconds).

Wang et al., "SimpleShot: Revisiting Nearest-Neighbor Classification for Few-Shot Learning" (2019):
subtract the mean feature, L2-normalise, and the nearest normalised class mean wins; centring and
normalisation alone bring a nearest-centroid classifier to the level of meta-learned prototypical
networks. Here the mean is that of every train image's features (no label needed), each class's
prototype the normalised mean of its train images' normalised features (at most `shots` of them),
and the logits `scale` x cosine to each prototype: one matrix product, so the classifier is part of
the exported ONNX graph (`components/models/heads.py`, `PrototypeHead`). The scale is the softmax
temperature with the lowest val log loss; it changes no prediction, only how confident the
probabilities are.

Nothing is trained, so a class can be added later from a few images without touching the others
(`tlops add-class`).
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import log_loss

from components.data.manifest import unit_hash
from components.features.cache import split_features
from components.models.heads import PrototypeHead
from components.training.context import Context, Strategy
from components.training.cost import Cost
from components.training.loop import Trained
from components.training.reference import DEEPER_FINETUNING


def normalised(x: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Centred by `mean`, each row scaled to unit length."""
    centred = x - mean
    return centred / np.maximum(np.linalg.norm(centred, axis=1, keepdims=True), 1e-12)


def class_prototypes(embeddings: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """(features, classes): each class's normalised mean embedding, as a column."""
    columns = []
    for c in range(n_classes):
        mean = embeddings[labels == c].mean(0)
        columns.append(mean / max(np.linalg.norm(mean), 1e-12))
    return np.stack(columns, axis=1)


def support(frame: pd.DataFrame, shots: int | None, seed: int) -> np.ndarray:
    """Row positions of at most `shots` images per label, the same ones for the same seed (by content hash)."""
    if shots is None:
        return np.arange(len(frame))
    order = frame.assign(_rank=frame["sha256"].map(lambda s: unit_hash("shots", seed, s)), _row=np.arange(len(frame)))
    return np.sort(order.sort_values("_rank").groupby("label").head(shots)["_row"].to_numpy())


def features_of(ctx: Context, split: str) -> np.ndarray:
    taps = ctx.cfg.prototypes.taps
    return np.concatenate([split_features(ctx.dataset, ctx.features_dir, ctx.entry.name, t, split) for t in taps], 1)


def fit(train: np.ndarray, train_labels: np.ndarray, n_classes: int) -> PrototypeHead:
    """The head: train features' mean and the class prototypes, scale 1."""
    mean = train.mean(0)
    head = PrototypeHead(train.shape[1], n_classes)
    head.mean.copy_(torch.from_numpy(mean).float())
    head.prototypes.copy_(torch.from_numpy(class_prototypes(normalised(train, mean), train_labels, n_classes)).float())
    return head.eval()


def train(ctx: Context) -> Trained:
    began = time.perf_counter()
    cfg, dataset = ctx.cfg.prototypes, ctx.dataset
    train_frame = dataset.split("train")
    chosen = support(train_frame, cfg.shots, ctx.cfg.seed)
    x = {"train": features_of(ctx, "train"), "val": features_of(ctx, "val")}
    y = {"train": np.asarray(dataset.label_index(train_frame)), "val": np.asarray(dataset.label_index(dataset.split("val")))}
    n_classes = len(dataset.labels)
    missing = sorted(set(range(n_classes)) - set(y["train"][chosen].tolist()))
    if missing:  # validate's min_per_class_split guarantees this for pipeline runs
        raise ValueError(f"no train images of {[dataset.labels[i] for i in missing]} to make a prototype from")
    # The mean is every train image's (no label needed); the prototypes are the chosen shots'.
    head = fit(x["train"], y["train"], n_classes)
    head.prototypes.copy_(torch.from_numpy(class_prototypes(normalised(x["train"][chosen], head.mean.numpy()),
                                                            y["train"][chosen], n_classes)).float())
    with torch.no_grad():
        cosine = {s: head(torch.from_numpy(x[s])).numpy() for s in ("train", "val")}
    classes = list(range(n_classes))
    history = []
    for index, scale in enumerate(cfg.scales):
        probabilities = {s: np.exp(scale * c - (scale * c).max(1, keepdims=True)) for s, c in cosine.items()}
        probabilities = {s: p / p.sum(1, keepdims=True) for s, p in probabilities.items()}
        history.append({"epoch": index, "scale": float(scale),
                        "train_loss": log_loss(y["train"], probabilities["train"], labels=classes),
                        "val_loss": log_loss(y["val"], probabilities["val"], labels=classes),
                        "val_accuracy": float((cosine["val"].argmax(1) == y["val"]).mean())})
    best = min(history, key=lambda h: h["val_loss"])
    head.scale.fill_(best["scale"])
    info = {"taps": list(cfg.taps), "head": head.spec(), "scale": best["scale"], "n_features": int(x["train"].shape[1]),
            "shots_per_class": {dataset.labels[c]: int((y["train"][chosen] == c).sum()) for c in classes}}
    return Trained(None, head, history, best, time.perf_counter() - began, info)


STRATEGY = Strategy("prototypes", train, cost=lambda ctx: Cost(), train_views=lambda cfg: 1,  # seconds: features are cached
                    next_step=DEEPER_FINETUNING)
