"""The `full` strategy: every layer trained end to end on decoded, augmented images.

Augmentation is torchvision.transforms.v2 on the decoded image before the backbone's own
preprocessing: a mild random resized crop, flips and 90° rotations, brightness/contrast jitter.
Val images get only the preprocessing the model will see when served.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset
from torchvision.transforms import InterpolationMode, v2

from components.core.devices import Placement
from components.core.progress import Progress, no_progress
from components.data.manifest import Dataset
from components.data.preprocess import Preprocessing, build_transform, model_mode
from components.models.backbones import BackboneEntry, build_classifier
from components.models.trunk_parts import FullModel, check_layout
from components.training.loop import OnEpoch, Trained, class_weight_vector, fit, scores, step_seconds

if TYPE_CHECKING:
    from components.training.finetune import FinetuneConfig, FullConfig

log = logging.getLogger(__name__)


def augmentation(preprocessing: Preprocessing, scale_min: float, jitter: float) -> v2.Compose:
    """Train-time transform: PIL image -> normalised CHW float tensor at the model's input size."""
    size = preprocessing.input_size
    interpolation = InterpolationMode[preprocessing.interpolation.upper()]
    return v2.Compose([
        v2.Lambda(lambda image: (model_mode(image) or image).convert(preprocessing.color)),
        v2.ToImage(),
        v2.RandomResizedCrop((size, size), scale=(scale_min, 1.0), ratio=(0.9, 1.1), interpolation=interpolation,
                             antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomChoice([v2.RandomRotation((angle, angle)) for angle in (0, 90, 180, 270)]),
        v2.ColorJitter(brightness=jitter, contrast=jitter),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(preprocessing.mean, preprocessing.std),
    ])


class ImageSplit(TorchDataset):
    def __init__(self, dataset: Dataset, split: str, transform: v2.Compose):
        frame = dataset.split(split)
        self.paths = [dataset.image_path(p) for p in frame["path"]]
        self.labels = torch.as_tensor(dataset.label_index(frame))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        with Image.open(self.paths[index]) as image:
            return self.transform(image), self.labels[index]


def train_full(cfg: FullConfig, common: FinetuneConfig, entry: BackboneEntry, preprocessing: Preprocessing,
               dataset: Dataset, placement: Placement, resume_path: Path | None, fingerprint: str,
               progress: Progress = no_progress, on_epoch: OnEpoch | None = None) -> Trained:
    """Fine-tune the whole network with a new head."""
    began = time.perf_counter()
    n_classes = len(dataset.labels)
    torch.manual_seed(common.seed)
    model = build_classifier(entry)
    check_layout(model, entry.name, "full")
    head = nn.Linear(model.num_features, n_classes)
    network = FullModel(model, head, cfg.dropout)
    for parameter in network.parameters():
        parameter.requires_grad_(True)
    train = ImageSplit(dataset, "train", augmentation(preprocessing, cfg.crop_scale_min, cfg.jitter))
    val = ImageSplit(dataset, "val", build_transform(preprocessing))
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
                 fingerprint, progress, desc="finetune full", on_epoch=on_epoch)
    network.load_state_dict(result.state)
    network.cpu().eval()
    info = {"resumed_from_epoch": result.resumed_from, "stopped_early": result.stopped_early,
            "augmentation": repr(train.transform)}
    best = next(h for h in result.history if h["epoch"] == result.best_epoch)
    return Trained(model, head, result.history, best, time.perf_counter() - began, info)


def estimate_seconds(cfg: FullConfig, entry: BackboneEntry, preprocessing: Preprocessing, dataset: Dataset,
                     placement: Placement) -> float:
    """Every epoch at a measured step time plus measured decoding (no early stopping assumed)."""
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
