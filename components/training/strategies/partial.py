"""The `partial` strategy: unfreeze the last N blocks, train them from cached activations.

The frozen part (stem and all but the last N blocks) runs once per image and view, and its
activations are cached by content (`components/training/activations.py`), so every epoch, seed and
later run trains on stored tensors instead of re-running most of the network. Augmentation keeps
that cacheable: a fixed set of views per image, the dihedral group's flips and 90° rotations (a
solar cell turned or mirrored is still a solar cell), of which each epoch draws one per training
image. Val and test use the image as it is.

INT8-aware: when compress will quantize, the frozen part is also quantized with compress's recipe
and calibration images, and its INT8 activations of the same views are cached beside the float
ones; each epoch draws from both. The tail then learns from the inputs the INT8 model will feed it.
On ELPV, a tail trained on float activations alone lost 8.8 points of val accuracy when only the
frozen part was INT8 (0.868 -> 0.780) and full INT8 lost 10.6; trained on both, full INT8 lost 0.5
and shipped, with the same FP32 val accuracy (0.868).

Adapting to a target domain (`finetune.adapt.target_domain`): the target's unlabelled train images'
activations are cached too (every view), and each batch of source images goes beside as many
target images, drawn at random with a random view; `adapt.method`'s alignment loss acts on the
pooled features the tail produces (`components/training/adaptation.py`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator
from functools import partial

import torch
from torch import nn

from components.data.domains import UNLABELLED, UNLABELLED_VAL
from components.models import quantization as int8
from components.models.backbones import build_classifier
from components.models.trunk_parts import FrozenPart, TrainedTail, check_layout
from components.training import adaptation
from components.training.activations import cache_activations
from components.training.context import Context, Strategy
from components.training.cost import REFERENCE, Cost, forward_flops, training_seconds
from components.training.loop import Trained, class_weight_vector, fit
from components.training.tasks import Outputs, concat, to_cpu

log = logging.getLogger(__name__)


def train(ctx: Context) -> Trained:
    """Train the last `blocks` blocks, the top and a new head on cached activations (distilled if a teacher is set).

    With an INT8 recipe (compress will quantize) and `int8_views`, each epoch draws every train image's
    view from its float and its INT8 activations alike.
    """
    began = time.perf_counter()
    cfg, common, entry, dataset, placement = ctx.cfg.partial, ctx.cfg, ctx.entry, ctx.dataset, ctx.placement
    resume_path, fingerprint = ctx.resume("partial", cfg)
    distilling = common.distill.teacher is not None
    if distilling:  # checked before any work: a wrong path fails in one line
        from components.training import distill

        teacher_path, teacher_checkpoint = distill.teacher_checkpoint(common.distill.teacher, dataset.labels)
    recipe = ctx.int8_recipe if cfg.int8_views else None
    adapt = common.adapt if common.adapt.target_domain is not None else None
    activations = cache_activations(entry, ctx.preprocessing, cfg.blocks, cfg.views, dataset, ctx.cache_dir, ctx.opset,
                                    ctx.atol, progress=ctx.progress, int8_recipe=recipe, adapting=adapt is not None)
    cached_seconds = time.perf_counter() - began
    tasks = ctx.tasks
    labels = {split: tasks.targets(split) for split in ("train", "val")}
    drawn_targets = tasks.train_targets()  # the class indices, or a soft-labelled task's values
    torch.manual_seed(common.seed)
    model = build_classifier(entry)
    head = tasks.head(model.num_features)
    tail = TrainedTail(model, cfg.blocks, head, cfg.dropout)
    for parameter in tail.parameters():
        parameter.requires_grad_(True)
    train_x, val_x = torch.from_numpy(activations["train"]), torch.from_numpy(activations["val"])
    n_train, n_views = train_x.shape[:2]
    sources = [train_x] + ([torch.from_numpy(activations["train_int8"])] if recipe is not None else [])
    network: nn.Module = tail
    if adapt is not None:
        target_x = torch.from_numpy(activations[UNLABELLED])
        steps_per_epoch = (n_train + cfg.batch_size - 1) // cfg.batch_size
        network = adaptation.AdaptingModel(tail, adaptation.Aligner(
            adapt.method, model.num_features, adapt.discriminator_width,
            max(1, round(adapt.grl_warmup_epochs * steps_per_epoch))))
    if distilling:  # teacher logits of the same (image, view) pairs as the activations, same row order
        teacher = distill.teacher_logits(teacher_path, teacher_checkpoint, dataset, n_views, ctx.cache_dir)
        teacher_train = torch.from_numpy(teacher.train)

    def batches(epoch: int, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(n_train, generator=generator)
        # One draw per image among its views of every source: 0..views-1 float, views..2*views-1 INT8.
        draws = torch.randint(0, n_views * len(sources), (n_train,), generator=generator)
        for index in order.split(cfg.batch_size):
            views, source = draws[index] % n_views, draws[index] // n_views
            target = drawn_targets[index]
            if distilling:
                target = distill.pack_targets(target, teacher_train[index, views])
            batch = sources[0][index, views]
            for number in range(1, len(sources)):
                chosen = source == number
                batch[chosen] = sources[number][index[chosen], views[chosen]]
            if adapt is not None:  # as many unlabelled target images, each a random view, drawn with replacement
                drawn = torch.randint(0, len(target_x), (len(index),), generator=generator)
                batch = torch.cat([batch, target_x[drawn, torch.randint(0, n_views, (len(index),), generator=generator)]])
                target = torch.cat([target, torch.full((len(index),), adaptation.TARGET)])
            yield batch.float(), target

    def val_outputs(network: nn.Module) -> Outputs:  # the tail's outputs on the val images (one per task)
        return to_cpu(concat([network(chunk.float().to(placement.device)) for chunk in val_x.split(256)]))

    def evaluate(network: nn.Module) -> dict[str, float]:
        tail_only = network.model if adapt is not None else network
        result = tasks.val_scores(tail_only, val_outputs, labels["val"])
        if adapt is not None:  # label-free: how far apart held-out source and target features still are
            result["val_coral_distance"] = adaptation.coral_loss(
                pooled(tail_only, val_x), pooled(tail_only, torch.from_numpy(activations[UNLABELLED_VAL]))).item()
        return result

    def pooled(network: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([network.features(chunk.float().to(placement.device)) for chunk in x.split(256)])

    if distilling:
        weight = class_weight_vector(labels["train"].tolist(), len(dataset.labels), common.class_weights).to(placement.device)
        loss = distill.kd_loss(common.distill.alpha, common.distill.temperature, weight, common.label_smoothing)
    else:
        loss = tasks.loss(labels["train"], head, placement.device)
    loop = cfg.loop(common.seed)
    if adapt is not None:  # one classify task (the config refuses adaptation with several)
        loss = adaptation.adaptation_loss(network, adapt.weight, loss)
        if adapt.keep == "last":  # choosing on source val accuracy would undo the alignment
            loop = dataclasses.replace(loop, keep="last", patience=loop.epochs)
    steps = (n_train + cfg.batch_size - 1) // cfg.batch_size
    desc = f"finetune partial ({cfg.blocks} blocks)" + (f", adapt {adapt.method}" if adapt is not None else "")
    result = fit(network, network.layer_groups(), batches, steps, evaluate, loss, loop, placement, resume_path,
                 fingerprint, ctx.progress, desc=desc, on_epoch=ctx.on_epoch)
    network.load_state_dict(result.state)
    calibration = tasks.calibrate(tail, head, val_outputs, labels["val"])
    network.cpu().eval()
    info = {"trainable_blocks": cfg.blocks, "views": n_views, "activation_shape": list(train_x.shape[2:]),
            "int8_views": (recipe.describe(len(int8.calibration_frame(dataset, recipe.calibration_images)))
                           if recipe is not None else None),
            "activation_seconds": cached_seconds, "resumed_from_epoch": result.resumed_from,
            "stopped_early": result.stopped_early}
    if calibration:
        info["calibration"] = calibration
    if distilling:
        info["distill"] = {"teacher": str(teacher_path), "teacher_backbone": teacher_checkpoint["backbone"]["name"],
                           "teacher_val_accuracy": distill.teacher_accuracy(teacher, labels["val"]),
                           "teacher_pairs_computed": teacher.computed, "teacher_onnx_runs": teacher.teacher_runs,
                           "teacher_seconds": teacher.seconds}
    best = next(h for h in result.history if h["epoch"] == result.best_epoch)
    plots = {}
    if adapt is not None:
        before, after = alignment_features(ctx, tail, activations)
        info["adaptation"] = adaptation.alignment_report(adapt.target_domain, adapt.method, before, after,
                                                         best["val_accuracy"], common.seed)
        plots["adaptation.png"] = partial(adaptation.plot_alignment, (before["val"], before[UNLABELLED_VAL]),
                                          (after["val"], after[UNLABELLED_VAL]), info["adaptation"],
                                          f"{entry.name} partial, adapt {adapt.method} to {adapt.target_domain!r}")
    return Trained(model, head, result.history, best, time.perf_counter() - began, info, plots=plots)


ALIGNMENT_IMAGES = 400  # per split: enough for a domain classifier's accuracy, a few seconds of the tail


def alignment_features(ctx: Context, tail: TrainedTail, activations: dict) -> tuple[dict, dict]:  # noqa: ANN001
    """Pooled features of (up to ALIGNMENT_IMAGES) images of each split, view 0, through the pretrained tail
    (before) and the trained one (after)."""
    pretrained = TrainedTail(build_classifier(ctx.entry), ctx.cfg.partial.blocks, nn.Identity(), 0.0).eval()
    inputs = {split: torch.from_numpy(activations[split][:ALIGNMENT_IMAGES]) for split in
              ("train", UNLABELLED, "val", UNLABELLED_VAL)}
    inputs = {split: x[:, 0] if x.ndim == 5 else x for split, x in inputs.items()}  # view 0 of the trained-on splits
    with torch.no_grad():
        return tuple({split: torch.cat([network.features(c.float()) for c in x.split(128)]).numpy()
                      for split, x in inputs.items()} for network in (pretrained, tail.eval()))


def cost(ctx: Context) -> Cost:
    """The frozen part once per image and view (twice for train images when INT8 twins are cached), and the
    tail forward and backward every epoch; counted as if nothing were cached, so the answer is the data's and
    the params', not the cache's."""
    cfg, dataset = ctx.cfg.partial, ctx.dataset
    model = build_classifier(ctx.entry)
    check_layout(model, ctx.entry.name, "partial")
    image = torch.zeros(1, 3, ctx.preprocessing.input_size, ctx.preprocessing.input_size)
    frozen = FrozenPart(model, cfg.blocks)
    frozen_flops = forward_flops(frozen, image)
    with torch.no_grad():
        activation = frozen(image)
    tail = TrainedTail(model, cfg.blocks, ctx.tasks.head(model.num_features), cfg.dropout)  # the heads' FLOPs count too
    n_train, n_val, n_test = (len(dataset.split(split)) for split in ("train", "val", "test"))
    twins = 2 if ctx.int8_recipe is not None and cfg.int8_views else 1  # float and INT8 activations of train views
    n_target = len(dataset.split(UNLABELLED)) if ctx.cfg.adapt.target_domain is not None else 0
    views = n_train * cfg.views * twins + n_val + n_test + n_target * cfg.views  # target: its views, float only
    return Cost(inference_s=views * frozen_flops / REFERENCE.inference_flops_per_s,
                training_s=training_seconds(forward_flops(tail, activation), cfg.epochs, n_train, n_val),
                decode_s=(n_train * twins + n_val + n_test) * REFERENCE.decode_s)


STRATEGY = Strategy("partial", train, cost, train_views=lambda cfg: cfg.partial.views,
                    next_step="try finetune.strategy=full (auto does this)", adapts=True)
