"""Images as torch datasets for the strategies that train on pixels (`full`, pruning recovery).

Training images are augmented with torchvision.transforms.v2 before the backbone's own
preprocessing: a mild random resized crop, flips and 90° rotations (a cell turned or mirrored is
still a cell), brightness/contrast jitter. Evaluation images get exactly the preprocessing the
model is served with (`components.data.preprocess.preprocess_image`).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable

import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset
from torch.utils.data import Dataset as TorchDataset
from torchvision.transforms import InterpolationMode, v2

from components.data.manifest import Dataset
from components.data.preprocess import Preprocessing, model_mode, preprocess_image

log = logging.getLogger(__name__)

Transform = Callable[[Image.Image], torch.Tensor]
SHARED_MEMORY = "/dev/shm"


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


class Served:
    """Evaluation transform: PIL image -> the tensor the served model sees (picklable, for DataLoader workers)."""

    def __init__(self, preprocessing: Preprocessing):
        self.preprocessing = preprocessing

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(preprocess_image(image, self.preprocessing))


class ImageSplit(TorchDataset):
    """`split`'s images, transformed, with their class indices, or the `targets` given (one row per image:
    several tasks' classes)."""

    def __init__(self, dataset: Dataset, split: str, transform: Transform, targets: torch.Tensor | None = None):
        frame = dataset.split(split)
        self.paths = [dataset.image_path(p) for p in frame["path"]]
        self.labels = torch.as_tensor(dataset.label_index(frame)) if targets is None else targets
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        with Image.open(self.paths[index]) as image:
            return self.transform(image), self.labels[index]


def usable_workers(dataset: TorchDataset, requested: int, batch_size: int) -> int:
    """`requested` DataLoader worker processes if they can run here, else 0 (decode in the training process).

    Workers hand batches over shared memory: a container's default 64 MB /dev/shm holds less than two
    prefetched batches of 32 images at 300 px, and some sandboxes cannot start the processes at all; either
    kills training with "DataLoader worker exited unexpectedly". So the room is checked and one worker is
    started on one image first; where that fails, training runs without worker processes, slower but whole.
    """
    if requested == 0 or len(dataset) == 0:
        return requested
    example, _ = dataset[0]
    needed = 4 * requested * batch_size * example.numel() * example.element_size()  # prefetch 2 batches, x2 headroom
    try:
        free = shutil.disk_usage(SHARED_MEMORY).free
    except OSError:
        free = 0
    if free < needed:
        log.warning("%s has %.0f MB free, DataLoader workers need ~%.0f MB: decoding in the training process "
                    "instead (give the container more shared memory, e.g. docker --shm-size=1g)", SHARED_MEMORY,
                    free / 2**20, needed / 2**20)
        return 0
    try:
        for _ in DataLoader(Subset(dataset, [0]), batch_size=1, num_workers=1):
            pass
    except Exception as error:  # noqa: BLE001 - whatever stops a worker process here means: run without them
        log.warning("DataLoader worker processes cannot run here (%s): decoding in the training process instead",
                    str(error).splitlines()[0][:200])
        return 0
    return requested
