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

from components.core.errors import UserError
from components.data.augmentation import ImageSplit, Served, augmentation, usable_workers
from components.data.views import MAX_VIEWS
from components.models.backbones import build_classifier
from components.models.trunk_parts import FullModel, check_layout
from components.training.context import Context, Strategy
from components.training.cost import REFERENCE, Cost, forward_flops, training_seconds
from components.training.loop import Trained, fit
from components.training.tasks import Outputs, concat, to_cpu

log = logging.getLogger(__name__)


def train(ctx: Context) -> Trained:
    """Fine-tune the whole network with a new head."""
    began = time.perf_counter()
    cfg, common, entry, preprocessing, dataset, placement = (ctx.cfg.full, ctx.cfg, ctx.entry, ctx.preprocessing,
                                                             ctx.dataset, ctx.placement)
    resume_path, fingerprint = ctx.resume("full", cfg)
    tasks = ctx.tasks
    torch.manual_seed(common.seed)
    model = build_classifier(entry)
    check_layout(model, entry.name, "full")
    head = tasks.head(model.num_features)
    network = FullModel(model, head, cfg.dropout)
    for parameter in network.parameters():
        parameter.requires_grad_(True)
    train = ImageSplit(dataset, "train", augmentation(preprocessing, cfg.crop_scale_min, cfg.jitter), tasks.train_targets())
    val = ImageSplit(dataset, "val", Served(preprocessing), tasks.targets("val"))
    pin = placement.device.type == "cuda"
    workers = usable_workers(train, cfg.workers, cfg.batch_size)

    def batches(epoch: int, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # The loader's shuffling and its workers' augmentation seeds both come from `generator` (with several
        # training processes, each takes its share of every global batch).
        yield from ctx.replicas.loader(train, cfg.batch_size, generator, epoch, common.seed, num_workers=workers,
                                       pin_memory=pin, persistent_workers=False)

    val_loader = DataLoader(val, batch_size=cfg.batch_size * 2, num_workers=workers, pin_memory=pin)

    def val_outputs(net: nn.Module) -> Outputs:
        return concat([to_cpu(net(x.to(placement.device))) for x, _ in val_loader])

    def evaluate(net: nn.Module) -> dict[str, float]:
        return tasks.val_scores(net, val_outputs, val.labels)

    loss = tasks.loss(tasks.targets("train"), head, placement.device)
    steps = len(train) // cfg.batch_size if len(train) > cfg.batch_size else 1
    try:
        result = fit(network, network.layer_groups(), batches, steps, evaluate, loss, cfg.loop(common.seed), placement,
                     resume_path, fingerprint, ctx.progress, desc="finetune full", on_epoch=ctx.on_epoch,
                     replicas=ctx.replicas)
    except RuntimeError as error:
        if workers == 0 or "DataLoader worker" not in str(error):
            raise
        raise UserError(f"finetune.full.workers={workers}: a DataLoader worker process died during training "
                        f"({str(error).splitlines()[0][:160]}); set finetune.full.workers=0 to decode in the training "
                        f"process, or give it more memory and shared memory.") from None
    network.load_state_dict(result.state)
    calibration = tasks.calibrate(network, head, val_outputs, val.labels)
    network.cpu().eval()
    info = {"resumed_from_epoch": result.resumed_from, "stopped_early": result.stopped_early,
            "augmentation": repr(train.transform), "workers": workers}
    if calibration:
        info["calibration"] = calibration
    best = next(h for h in result.history if h["epoch"] == result.best_epoch)
    return Trained(model, head, result.history, best, time.perf_counter() - began, info)


def cost(ctx: Context) -> Cost:
    """The whole network forward and backward every epoch, and every train and val image decoded every epoch."""
    cfg, dataset = ctx.cfg.full, ctx.dataset
    model = build_classifier(ctx.entry)
    check_layout(model, ctx.entry.name, "full")
    network = FullModel(model, ctx.tasks.head(model.num_features), cfg.dropout)
    image = torch.zeros(1, 3, ctx.preprocessing.input_size, ctx.preprocessing.input_size)
    n_train, n_val = len(dataset.split("train")), len(dataset.split("val"))
    return Cost(training_s=training_seconds(forward_flops(network, image), cfg.epochs, n_train, n_val),
                decode_s=cfg.epochs * (n_train + n_val) * REFERENCE.decode_s)


STRATEGY = Strategy("full", train, cost, train_views=lambda cfg: MAX_VIEWS,  # flips and 90° turns
                    next_step="the pretrained weights do not help on this data; consider another backbone or more data")
