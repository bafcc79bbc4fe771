"""Images as torch datasets for `full`: DataLoader workers only where they can run."""

from __future__ import annotations

import os

import torch
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import get_worker_info

from components.data.augmentation import ImageSplit, Served, usable_workers
from components.data.manifest import Dataset
from components.models.registry import get_entry


class DiesInWorkers(TorchDataset):
    """A dataset whose items load in the training process but kill any worker process that loads them, as a
    worker without shared memory or killed for memory dies: with "DataLoader worker exited unexpectedly"."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if get_worker_info() is not None:
            os._exit(1)
        return torch.zeros(3, 8, 8), torch.tensor(0)


def test_workers_that_cannot_run_fall_back_to_the_training_process(elpv_small: Dataset, caplog) -> None:
    cells = ImageSplit(elpv_small, "train", Served(get_entry("efficientnet_lite0").preprocessing(64)))
    assert usable_workers(cells, 2, batch_size=8) == 2  # real cells, real worker processes: kept
    assert usable_workers(DiesInWorkers(), 2, batch_size=8) == 0
    assert "cannot run here" in caplog.text
    assert usable_workers(DiesInWorkers(), 0, batch_size=8) == 0
