"""The `full` strategy: every layer trained end to end on decoded, augmented images.

Train images are augmented (`components/data/augmentation.py`: a mild random resized crop, flips
and 90° rotations, brightness/contrast jitter); val images get only the preprocessing the model
will see when served.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader

from components.data.augmentation import ImageSplit, Served, augmentation
from components.data.views import MAX_VIEWS
from components.models.backbones import build_classifier
from components.models.trunk_parts import FullModel, check_layout
from components.training.context import Context, Strategy
from components.training.loop import Trained, class_weight_vector, fit, scores, step_seconds

log = logging.getLogger(__name__)


def train(ctx: Context) -> Trained:
    """Fine-tune the whole network with a new head."""
    began = time.perf_counter()
    cfg, common, entry, preprocessing, dataset, placement = (ctx.cfg.full, ctx.cfg, ctx.entry, ctx.preprocessing,
                                                             ctx.dataset, ctx.placement)
    resume_path, fingerprint = ctx.resume("full", cfg)
    n_classes = len(dataset.labels)
    torch.manual_seed(common.seed)
    model = build_classifier(entry)
    check_layout(model, entry.name, "full")
    head = nn.Linear(model.num_features, n_classes)
    network = FullModel(model, head, cfg.dropout)
    for parameter in network.parameters():
        parameter.requires_grad_(True)
    train = ImageSplit(dataset, "train", augmentation(preprocessing, cfg.crop_scale_min, cfg.jitter))
    val = ImageSplit(dataset, "val", Served(preprocessing))
    pin = placement.device.type == "cuda"

    def batches(epoch: int, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # The loader's shuffling and its workers' augmentation seeds both come from `generator`.
        yield from DataLoader(train, batch_size=cfg.batch_size, shuffle=True, generator=generator, drop_last=len(train) > cfg.batch_size,
                              num_workers=cfg.workers, pin_memory=pin, persistent_workers=False)

    val_loader = DataLoader(val, batch_size=cfg.batch_size * 2, num_workers=cfg.workers, pin_memory=pin)

    def evaluate(net: nn.Module) -> dict[str, float]:
        logits, labels = [], []
        for x, y in val_loader:
            logits.append(net(x.to(placement.device)).float().cpu())
            labels.append(y)
        return scores(torch.cat(logits), torch.cat(labels))

    loss = nn.CrossEntropyLoss(weight=class_weight_vector(train.labels.tolist(), n_classes, common.class_weights)
                               .to(placement.device), label_smoothing=common.label_smoothing)
    steps = len(train) // cfg.batch_size if len(train) > cfg.batch_size else 1
    result = fit(network, network.layer_groups(), batches, steps, evaluate, loss, cfg.loop(common.seed), placement, resume_path,
                 fingerprint, ctx.progress, desc="finetune full", on_epoch=ctx.on_epoch)
    network.load_state_dict(result.state)
    network.cpu().eval()
    info = {"resumed_from_epoch": result.resumed_from, "stopped_early": result.stopped_early,
            "augmentation": repr(train.transform)}
    best = next(h for h in result.history if h["epoch"] == result.best_epoch)
    return Trained(model, head, result.history, best, time.perf_counter() - began, info)


def estimate_seconds(ctx: Context) -> float:
    """Every epoch at a measured step time plus measured decoding (no early stopping assumed)."""
    cfg, entry, preprocessing, dataset, placement = ctx.cfg.full, ctx.entry, ctx.preprocessing, ctx.dataset, ctx.placement
    model = build_classifier(entry)
    network = FullModel(model, nn.Linear(model.num_features, len(dataset.labels)), cfg.dropout)
    for parameter in network.parameters():
        parameter.requires_grad_(True)
    size = preprocessing.input_size
    n_train, n_val = len(dataset.split("train")), len(dataset.split("val"))
    batch = min(cfg.batch_size, max(n_train, 2))
    step = step_seconds(network, torch.zeros(batch, 3, size, size), len(dataset.labels), placement)
    sample = ImageSplit(dataset, "train", augmentation(preprocessing, cfg.crop_scale_min, cfg.jitter))
    began = time.perf_counter()
    for index in range(min(8, n_train)):
        sample[index]
    decode_s = (time.perf_counter() - began) / min(8, n_train)
    per_epoch = (n_train // batch) * step + (n_train + n_val) * decode_s + n_val / batch * step / 3
    return cfg.epochs * per_epoch


STRATEGY = Strategy("full", train, estimate_seconds, train_views=lambda cfg: MAX_VIEWS,  # flips and 90° turns
                    next_step="the pretrained weights do not help on this data; consider another backbone or more data")
