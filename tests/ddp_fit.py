"""One process of tests/test_ddp.py's gradient check: the shared epoch loop on a tiny model, full-batch steps.

Run plainly it trains alone (`SINGLE`); under `python -m torch.distributed.run --nproc-per-node 2` each
process joins a gloo group and trains with `Replicas(rank, 2)`, taking half of every batch. With the
whole set as one batch, the order of the images cannot matter, so the two runs must take the same
steps: rank 0 writes its history and final weights to the file named on the command line.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from torch import nn
from torch.utils.data import TensorDataset

from components.core.devices import resolve
from components.training.config import LoopConfig
from components.training.loop import fit
from components.training.replicas import SINGLE, Replicas


def main(out: str) -> None:
    distributed = "RANK" in os.environ
    if distributed:
        torch.distributed.init_process_group("gloo")
    replicas = Replicas(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if distributed else SINGLE
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, generator=generator)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    data = TensorDataset(x, y)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2))

    def evaluate(net: nn.Module) -> dict[str, float]:
        logits = net(x)
        return {"val_loss": float(nn.functional.cross_entropy(logits, y)),
                "val_accuracy": float((logits.argmax(1) == y).float().mean())}

    cfg = LoopConfig(epochs=6, lr=0.05, layer_decay=1.0, weight_decay=0.0, warmup_epochs=0, schedule="cosine",
                     patience=10, seed=0)
    result = fit(model, [list(model.parameters())], lambda epoch, g: replicas.loader(data, len(data), g, epoch, seed=0),
                 1, evaluate, nn.CrossEntropyLoss(), cfg, resolve("cpu", "fp32"), replicas=replicas)
    if replicas.writer:
        weights = {k: v.flatten().tolist() for k, v in model.state_dict().items()}
        with open(out, "w") as f:
            json.dump({"history": result.history, "weights": weights, "world": replicas.world}, f)
    if distributed:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
