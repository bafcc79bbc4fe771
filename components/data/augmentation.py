"""Images as torch datasets for the strategies that train on pixels (`full`, pruning recovery).

Training images are augmented with torchvision.transforms.v2 before the backbone's own
preprocessing: a mild random resized crop, flips and 90° rotations (a cell turned or mirrored is
still a cell), brightness/contrast jitter. Evaluation images get exactly the preprocessing the
model is served with (`components.data.preprocess.preprocess_image`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image
from torch.utils.data import Dataset as TorchDataset
from torchvision.transforms import InterpolationMode, v2

from components.data.manifest import Dataset
from components.data.preprocess import Preprocessing, model_mode, preprocess_image

Transform = Callable[[Image.Image], torch.Tensor]


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
    def __init__(self, dataset: Dataset, split: str, transform: Transform):
        frame = dataset.split(split)
        self.paths = [dataset.image_path(p) for p in frame["path"]]
        self.labels = torch.as_tensor(dataset.label_index(frame))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        with Image.open(self.paths[index]) as image:
            return self.transform(image), self.labels[index]


