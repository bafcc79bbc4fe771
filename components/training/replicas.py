"""The processes that train one model together, as the epoch loop and a strategy's loaders see them.

`SINGLE` is one process alone: its loader, seeds and writes are exactly those of training without
DistributedDataParallel, so `processes: 1` is unchanged. With `world > 1` (set up by
`components/training/ddp.py` inside each process torch.distributed.run starts):

- the model trains wrapped in `DistributedDataParallel`: gradients are averaged over the processes
  after every backward, so each step is one step of the global batch;
- each epoch's images are split by a `DistributedSampler` seeded with the run's seed and set to the
  epoch (`set_epoch`), so every process sees a different share and a resumed epoch the same share;
  the global batch stays `batch_size`, each process takes `batch_size / world`;
- BatchNorm normalises each process's share with that share's statistics (torch's `SyncBatchNorm`
  runs on CUDA only, and the same choice everywhere keeps a CPU-tested run what a GPU run does); the
  running statistics that evaluation and export use are rank 0's, which DDP broadcasts before every
  forward (`broadcast_buffers`);
- rank 0 alone evaluates, writes resume files and reports; the others receive its scores, so every
  process stops early at the same epoch.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from torch.utils.data import Dataset as TorchDataset


@dataclass(frozen=True)
class Replicas:
    rank: int = 0
    world: int = 1

    @property
    def writer(self) -> bool:
        """Whether this process writes resume files and results (rank 0)."""
        return self.rank == 0

    def loader(self, dataset: TorchDataset, global_batch: int, generator: torch.Generator, epoch: int, seed: int,
               **options: Any) -> DataLoader:
        """One epoch of shuffled training batches: the whole batch here alone, this process's share of it otherwise.

        `generator` (seeded by the loop per epoch) shuffles a lone process's images and seeds the loader's
        worker processes; with several processes the sampler shuffles by (seed, epoch) and the generator
        only seeds this process's augmentation."""
        drop_last = len(dataset) > global_batch  # a last, short batch would be a noisy step; a tiny set keeps its one
        if self.world == 1:
            return DataLoader(dataset, batch_size=global_batch, shuffle=True, generator=generator, drop_last=drop_last,
                              **options)
        # drop_last on both: every process takes len // batch steps, as one process would.
        sampler = DistributedSampler(dataset, num_replicas=self.world, rank=self.rank, shuffle=True, seed=seed,
                                     drop_last=drop_last)
        sampler.set_epoch(epoch)
        return DataLoader(dataset, batch_size=global_batch // self.world, sampler=sampler, generator=generator,
                          drop_last=drop_last, **options)

    def seed(self, base: int) -> int:
        """The seed of this process's random draws (dropout, augmentation) in one epoch: `base` for a lone process."""
        return base if self.world == 1 else base * self.world + self.rank

    def wrap(self, model: nn.Module, trained: Iterable[nn.Parameter]) -> nn.Module:
        """The module to train: `model` itself, or `model` in DistributedDataParallel, which averages the gradients
        of the `trained` parameters (those the optimizer steps; a backbone's unused ImageNet classifier is not)."""
        if self.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        stepped = {id(p) for p in trained}
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            model, [name for name, p in model.named_parameters() if id(p) not in stepped])
        device_ids = [model_device(model).index] if model_device(model).type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)

    def total(self, *values: float) -> list[float]:
        """`values` summed over the processes (a lone process's own)."""
        if self.world == 1:
            return list(values)
        summed = torch.tensor(values, dtype=torch.float64, device=collective_device())
        torch.distributed.all_reduce(summed)
        return summed.tolist()

    def from_writer(self, scores: dict[str, float] | None) -> dict[str, float]:
        """Rank 0's `scores` in every process (the others pass None)."""
        if self.world == 1:
            assert scores is not None
            return scores
        box = [scores]
        torch.distributed.broadcast_object_list(box, src=0, device=collective_device())
        return box[0]


SINGLE = Replicas()


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def collective_device() -> torch.device:
    """Where tensors of a collective live: NCCL moves CUDA tensors only, gloo CPU tensors."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
