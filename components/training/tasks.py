"""Tasks: the manifest columns one model learns from one trunk, a head each, and what training needs of them.

`resolve` checks the columns against the manifest before any work (an unknown column, a missing
value, a task of one class, an ordered head on a task whose order is not declared: one line each)
and describes each task: its classes in output order (the column's values sorted, as `Dataset`
gives them) and, for an `ordinal` or `regress` head, their declared order, lowest first.

`TaskSet` is what every strategy asks of its tasks, so no strategy forks per task: the targets of a
split, the head, the loss, the val scores and, after training, the calibration of a `regress`
head (its class thresholds chosen on val, as Deitsch et al. did with the defect probability they
regressed). With the default `finetune.tasks: [label]` and a classify head it is exactly what
training did before tasks existed: one `nn.Linear` head, class-index targets, one cross-entropy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import numpy as np
import torch
from torch import nn

from components.core.errors import UserError
from components.data.domains import UNLABELLED, UNLABELLED_VAL
from components.data.manifest import Dataset
from components.models.heads import CornHead, RegressHead, TaskHeads
from components.training.config import FinetuneConfig, HeadKind
from components.training.loop import class_weight_vector, scores

Outputs = torch.Tensor | tuple[torch.Tensor, ...]
SCALES = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0)  # regress: softmax sharpness tried on val (lowest NLL wins)


class TaskError(UserError):
    """A task the data cannot support; the message names the column, the rows or the key to fix."""


@dataclass(frozen=True)
class Task:
    name: str  # the manifest column, and the name of the model's output for it
    kind: HeadKind
    labels: tuple[str, ...]  # the classes in output order: the column's values, sorted
    order: tuple[str, ...] | None = None  # the declared order, lowest first (ordinal and regress heads, soft labels)
    soft: bool = False  # trained on soft ordinal labels (`finetune.soft_labels`)
    values: str | None = None  # soft: the manifest column of each image's own value (None: its class's rank)

    @property
    def ranks(self) -> list[int]:
        """Where each label (in output order) stands in the declared order."""
        order = self.order or self.labels
        return [order.index(label) for label in self.labels]

    @property
    def targets(self) -> list[float]:
        """The value each label stands for (what `regress` predicts): the labels themselves when they are all
        numbers, else the rank scaled to [0, 1] (ELPV's p000..p100: 0, 1/3, 2/3, 1, the defect probability)."""
        numbers = as_numbers(self.labels)
        if numbers is not None:
            return numbers
        return [rank / (len(self.labels) - 1) for rank in self.ranks]

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "labels": list(self.labels),
                "order": list(self.order) if self.order else None} | (
                    {"soft_labels": {"values": self.values}} if self.soft else {})


def as_numbers(labels: Sequence[str]) -> list[float] | None:
    try:
        values = [float(label) for label in labels]
    except ValueError:
        return None
    return values if all(math.isfinite(v) for v in values) else None


def examples(items: Sequence[str], limit: int = 3) -> str:
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def resolve(cfg: FinetuneConfig, dataset: Dataset, orders: Mapping[str, Sequence[str]],
            soft: Mapping[str, str | None] | None = None) -> tuple[Task, ...]:
    """The tasks of `cfg`, checked against `dataset`; `orders` are the declared class orders (params and the source's),
    `soft` the tasks trained on soft labels with their value columns (`FinetuneConfig.soft_plan`; None: cfg's own)."""
    soft = cfg.soft_plan({}) if soft is None else soft
    manifest = dataset.manifest
    tasks = []
    for name in cfg.tasks:
        if name not in manifest.columns:
            raise TaskError(f"finetune.tasks: {name!r} is not a column of the manifest; it has "
                            f"{[c for c in manifest.columns]}. Name a column that holds a class for every image.")
        # The unlabelled splits (a target domain's train and val, `labelled_view`) have their labels hidden on purpose.
        labelled = ~manifest["split"].isin([UNLABELLED, UNLABELLED_VAL])
        missing = manifest.index[manifest[name].isna() & labelled].tolist()
        if missing:
            rows = [f"row {i + 1} ({manifest['path'][i]})" for i in missing]
            raise TaskError(f"finetune.tasks: column {name!r} has no value in {len(missing)} row(s) of the manifest: "
                            f"{examples(rows)}; give every image a value, drop those images, or drop the task.")
        view = dataset.for_task(name)
        if len(view.labels) < 2:
            raise TaskError(f"finetune.tasks: column {name!r} holds one class only ({view.labels[0]!r}); "
                            f"a task needs two or more. Drop it from finetune.tasks.")
        in_train = set(view.split("train")[name])
        absent = [label for label in view.labels if label not in in_train]
        if absent:
            raise TaskError(f"finetune.tasks: column {name!r} has no train image of class(es) {absent}; "
                            f"a head cannot learn a class it never sees. Add images or merge classes.")
        kind, column = cfg.head_of(name), soft.get(name)
        order = (declared_order(name, "finetune.soft_labels" if name in soft else f"finetune.head: {kind}", view.labels,
                                orders) if kind != "classify" or name in soft else None)
        if column is not None:
            check_values(name, column, manifest, labelled)
        tasks.append(Task(name, kind, view.labels, order, name in soft, column))
    return tuple(tasks)


def check_values(task: str, column: str, manifest: Any, labelled: Any) -> None:  # noqa: ANN401 (pandas)
    """A soft-labelled task's value column: present, and a finite number in every labelled row."""
    if column not in manifest.columns:
        raise TaskError(f"finetune.soft_labels.values.{task}: {column!r} is not a column of the manifest; it has "
                        f"{list(manifest.columns)}. Name a column of numbers on the task's scale, or drop the entry.")
    import pandas as pd

    numbers = pd.to_numeric(manifest[column], errors="coerce")
    bad = manifest.index[~np.isfinite(numbers.to_numpy(dtype=float)) & labelled.to_numpy()].tolist()
    if bad:
        rows = [f"row {i + 1} ({manifest['path'][i]}: {manifest[column][i]!r})" for i in bad]
        raise TaskError(f"finetune.soft_labels.values.{task}: column {column!r} has no number in {len(bad)} row(s): "
                        f"{examples(rows)}; give every image a number, or drop the entry.")


def declared_order(name: str, needs: str, labels: tuple[str, ...], orders: Mapping[str, Sequence[str]]) -> tuple[str, ...]:
    if name in orders:
        order = tuple(orders[name])
        if set(order) != set(labels):
            raise TaskError(f"finetune.orders.{name}: {list(order)} does not list exactly the column's classes "
                            f"{list(labels)} (missing {sorted(set(labels) - set(order))}, unknown "
                            f"{sorted(set(order) - set(labels))}).")
        return order
    numbers = as_numbers(labels)
    if numbers is not None:  # a numeric column is ordered by value
        return tuple(label for _, label in sorted(zip(numbers, labels)))
    raise TaskError(f"{needs} for task {name!r} needs the order of its classes {list(labels)}, and none "
                    f"is declared; set finetune.orders.{name}: [lowest, ..., highest], or use a classify head for it.")


def default_bounds(targets: Sequence[float], ranks: Sequence[int]) -> tuple[list[float], list[float]]:
    """Each label's interval of the value with thresholds halfway between neighbouring targets (label order)."""
    ordered = sorted(targets)
    return bounds([(a + b) / 2 for a, b in pairwise(ordered)], ordered, ranks)


def bounds(thresholds: Sequence[float], ordered_targets: Sequence[float], ranks: Sequence[int]) -> tuple[list[float], list[float]]:
    """Per label (output order): the interval between its thresholds. The outer classes' open ends are closed a
    span beyond the outer thresholds: the argmax is the same anywhere beyond, and the graph stays in a range
    INT8 can represent."""
    span = (ordered_targets[-1] - ordered_targets[0]) or 1.0
    edges = [thresholds[0] - span, *thresholds, thresholds[-1] + span]
    return [edges[r] for r in ranks], [edges[r + 1] for r in ranks]


def class_of(values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Rank in the declared order of each value: how many thresholds lie below it (a value on a threshold is in
    the lower class, as the head's scores tie there and argmax takes the first)."""
    return np.searchsorted(thresholds, values, side="left")


def choose_thresholds(values: np.ndarray, ranks: np.ndarray, start: Sequence[float], passes: int = 4) -> np.ndarray:
    """Thresholds (ascending) maximising accuracy on (`values`, true `ranks`), by coordinate ascent from `start`.

    Each threshold in turn moves to the candidate (halfway between neighbouring observed values) between
    its neighbours that classifies most values right; ties go to the candidate nearest `start`, so a
    threshold the data does not argue for stays where the targets put it.
    """
    thresholds = np.asarray(start, dtype=np.float64).copy()
    observed = np.unique(values)
    candidates = np.unique(np.concatenate([(observed[1:] + observed[:-1]) / 2, thresholds]))
    for _ in range(passes):
        moved = False
        for k in range(len(thresholds)):
            low = thresholds[k - 1] if k else -np.inf
            high = thresholds[k + 1] if k + 1 < len(thresholds) else np.inf
            options = candidates[(candidates > low) & (candidates < high)]
            trial = np.repeat(thresholds[None], len(options), axis=0)
            trial[:, k] = options
            correct = np.array([(class_of(values, t) == ranks).sum() for t in trial])
            best = options[np.lexsort((np.abs(options - start[k]), -correct))[0]]
            moved |= best != thresholds[k]
            thresholds[k] = best
        if not moved:
            break
    return thresholds


class TaskSet:
    """The tasks of one finetune run and what every strategy does with them."""

    def __init__(self, tasks: tuple[Task, ...], cfg: FinetuneConfig, dataset: Dataset):
        self.tasks, self.cfg = tasks, cfg
        self.single = cfg.single_task  # today's model: nothing below may change what it computes
        self.views = [dataset.for_task(task.name) for task in tasks]

    @property
    def primary(self) -> Task:
        return self.tasks[0]

    @property
    def names(self) -> list[str]:
        return [task.name for task in self.tasks]

    def targets(self, split: str) -> torch.Tensor:
        """Class indices (output order) of `split`'s images: (N,) for one classify task, else (N, tasks)."""
        columns = [torch.as_tensor(view.label_index(view.split(split))) for view in self.views]
        return columns[0] if self.single else torch.stack(columns, dim=1)

    def train_targets(self) -> torch.Tensor:
        """What training draws per train image: `targets("train")`, except that a soft-labelled task's entry is the
        image's place in the task's order (a float, `positions`), which its loss spreads over the classes. Class
        weights are still counted on `targets("train")`."""
        targets = self.targets("train")
        if not any(task.soft for task in self.tasks):
            return targets
        columns = targets[:, None] if self.single else targets
        drawn = [self.positions(task, view) if task.soft else columns[:, i].double()
                 for i, (task, view) in enumerate(zip(self.tasks, self.views))]
        return drawn[0] if self.single else torch.stack(drawn, dim=1)

    def positions(self, task: Task, view: Dataset) -> torch.Tensor:
        """Each train image's place in `task`'s order, in classes: its class's rank, or its own value from
        `soft_labels.values` placed between the classes' values (`Task.targets`) by linear interpolation, clamped at
        the ends (ELPV binary: a defect probability of 1/3 sits a third of the way from functional to defective)."""
        frame = view.split("train")
        column = task.values
        if column is None:
            return torch.as_tensor(task.ranks, dtype=torch.float64)[torch.as_tensor(view.label_index(frame))]
        targets, ranks = zip(*sorted(zip(task.targets, task.ranks)))
        return torch.tensor(np.interp(frame[column].to_numpy(dtype=np.float64), targets, ranks))

    def head(self, in_features: int) -> nn.Module:
        """A fresh head: `nn.Linear` for the one classify task, else one head per task in a `TaskHeads`."""
        if self.single:
            return nn.Linear(in_features, len(self.primary.labels))
        return TaskHeads({task.name: new_head(task, in_features) for task in self.tasks},
                         uncertainty=self.cfg.task_weights == "uncertainty")

    def loss(self, train: torch.Tensor, head: nn.Module, device: torch.device) -> Callable[[Outputs, torch.Tensor], torch.Tensor]:
        """The training loss on `head`'s outputs; class weights (`finetune.class_weights`) from the `train` targets."""
        cfg = self.cfg
        if self.single:
            return task_loss(self.primary, train, cfg, device)
        losses = [task_loss(task, train[:, i], cfg, device) for i, task in enumerate(self.tasks)]
        fixed = cfg.task_weights if isinstance(cfg.task_weights, tuple) else (1.0,) * len(self.tasks)

        def combined(outputs: Outputs, targets: torch.Tensor) -> torch.Tensor:  # a soft task's column holds values
            parts = torch.stack([loss(output, targets[:, i] if task.soft else targets[:, i].long())
                                 for i, (task, loss, output) in enumerate(zip(self.tasks, losses, outputs))])
            if head.log_variance is not None:  # learned: each task weighed by its precision, plus its log variance
                return (torch.exp(-head.log_variance) * parts + head.log_variance).sum()
            return (torch.as_tensor(fixed, device=parts.device, dtype=parts.dtype) * parts).sum()

        return combined

    def scores(self, outputs: Outputs, targets: torch.Tensor) -> dict[str, float]:
        """Val loss and accuracy of the primary task (what early stopping reads) and each task's accuracy."""
        if self.single:
            return scores(outputs, targets)
        result = {}
        for i, (task, output) in enumerate(zip(self.tasks, outputs)):
            scored = scores(output, targets[:, i])
            if i == 0:
                result |= scored
            result[f"val_accuracy.{task.name}"] = scored["val_accuracy"]
        return result

    def val_scores(self, network: nn.Module, outputs: Callable[[nn.Module], Outputs], targets: torch.Tensor) -> dict[str, float]:
        """What early stopping reads after an epoch: `scores` of `network` on val, each regress head first given the
        thresholds chosen on val (as the kept model will be). At the targets' midpoints the accuracy says little: with
        balanced class weights it peaked at epoch 1 (0.52) and fell while val loss fell, so ELPV four-class regress
        stopped at epoch 9 and tested 0.60. One pass over val: the regress heads' class scores come from the values
        the thresholds were chosen on."""
        if not any(task.kind == "regress" for task in self.tasks):
            return self.scores(outputs(network), targets)
        head = next(m for m in network.modules() if isinstance(m, TaskHeads))
        with torch.no_grad(), raw_outputs(network):
            values = outputs(network)
        self.calibrate_values(head, {name: value.numpy() for name, value in zip(self.names, values)}, targets)
        return self.scores(tuple(head.head(task.name).classes(value) if task.kind == "regress" else value
                                 for task, value in zip(self.tasks, values)), targets)

    def calibrate(self, network: nn.Module, head: nn.Module, outputs: Callable[[nn.Module], Outputs],
                  targets: torch.Tensor) -> dict[str, Any]:
        """After training: each regress head's class thresholds and softmax scale, chosen on val (nothing for the
        other kinds). `outputs(network)` runs the val images; `targets` are their class indices."""
        if not any(task.kind == "regress" for task in self.tasks):
            return {}
        with torch.no_grad(), raw_outputs(network):
            values = {name: output.numpy() for name, output in zip(self.names, outputs(network))}
        return self.calibrate_values(head, values, targets)

    def calibrate_values(self, head: nn.Module, values: Mapping[str, np.ndarray], targets: torch.Tensor) -> dict[str, Any]:
        """Regress heads: class thresholds chosen on val accuracy, then the softmax scale on val log loss;
        `values`: each regress task's predicted value of the val images."""
        chosen = {}
        for i, task in enumerate(self.tasks):
            if task.kind != "regress":
                continue
            regress = head.head(task.name)
            true_ranks = np.asarray(task.ranks)[targets[:, i].numpy()]
            ordered = sorted(task.targets)
            start = [(a + b) / 2 for a, b in pairwise(ordered)]
            value = np.asarray(values[task.name], dtype=np.float64).reshape(-1)
            thresholds = choose_thresholds(value, true_ranks, start)
            lower, upper = bounds(thresholds.tolist(), ordered, task.ranks)
            scale = fit_scale(value, np.asarray(lower), np.asarray(upper), targets[:, i].numpy())
            with torch.no_grad():
                regress.lower.copy_(torch.tensor(lower))
                regress.upper.copy_(torch.tensor(upper))
                regress.scale.fill_(scale)
            chosen[task.name] = {"thresholds": thresholds.tolist(), "midpoints": start, "scale": scale,
                                 "val_accuracy_midpoints": float((class_of(value, np.asarray(start)) == true_ranks).mean()),
                                 "val_accuracy": float((class_of(value, thresholds) == true_ranks).mean())}
        return chosen

    def describe(self) -> list[dict[str, Any]]:
        return [task.describe() for task in self.tasks]


def new_head(task: Task, in_features: int) -> nn.Module:
    if task.kind == "ordinal":
        return CornHead(in_features, task.ranks)
    if task.kind == "regress":
        lower, upper = default_bounds(task.targets, task.ranks)
        return RegressHead(in_features, task.targets, lower, upper)
    return nn.Linear(in_features, len(task.labels))


def task_loss(task: Task, train: torch.Tensor, cfg: FinetuneConfig, device: torch.device) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Cross-entropy on a classify or ordinal head's output (for CORN, -log P(y) is its own loss), against the soft
    ordinal distribution for a soft-labelled task; squared error of a regress head's value from its class's target,
    each image weighed like its class. `train`: the class indices of the train images (for the class weights)."""
    weight = class_weight_vector(train.tolist(), len(task.labels), cfg.class_weights).to(device)
    if task.soft:
        return soft_ordinal_loss(task.ranks, cfg.soft_labels.sharpness, weight)
    if task.kind != "regress":
        return nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)
    targets = torch.tensor(task.targets, device=device)

    def squared_error(value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        weights = weight[target]
        return (weights * (value.float().reshape(-1) - targets[target]) ** 2).sum() / weights.sum()

    return squared_error


def soft_targets(positions: torch.Tensor, ranks: torch.Tensor, sharpness: float) -> torch.Tensor:
    """SORD's target distributions: softmax over classes of -sharpness * (position - class rank)^2, one row per
    image; distances count classes, so a sharpness means the same for two classes as for ten."""
    return torch.softmax(-sharpness * (positions.float()[:, None] - ranks[None]) ** 2, dim=1)


def soft_ordinal_loss(ranks: Sequence[int], sharpness: float,
                      weight: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Cross-entropy of the logits against `soft_targets` of each image's position (`ranks`: each class's place in
    the order, output order). Label smoothing does not apply: the distribution already spreads over the
    neighbouring classes. Class weights weigh each class's term."""
    centres = torch.tensor(ranks, dtype=torch.float32, device=weight.device)

    def loss(logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits.float(), soft_targets(positions, centres, sharpness), weight=weight)

    return loss


def fit_scale(values: np.ndarray, lower: np.ndarray, upper: np.ndarray, labels: np.ndarray) -> float:
    """The softmax sharpness of the regress scores with the lowest log loss on val."""
    distance = np.minimum(values[:, None] - lower[None], upper[None] - values[:, None])

    def log_loss(scale: float) -> float:
        logits = scale * distance
        logits = logits - logits.max(axis=1, keepdims=True)
        return float(-(logits[np.arange(len(labels)), labels] - np.log(np.exp(logits).sum(axis=1))).mean())

    return min(SCALES, key=log_loss)


def regress_heads(head: nn.Module) -> list[RegressHead]:
    return [module for module in head.modules() if isinstance(module, RegressHead)]


@contextmanager
def raw_outputs(network: nn.Module) -> Iterator[None]:
    """`network` in eval mode except its regress heads, which then return their values (calibration reads them)."""
    network.eval()
    heads = regress_heads(network)
    for head in heads:
        head.train()
    try:
        yield
    finally:
        for head in heads:
            head.eval()


def concat(chunks: Sequence[Outputs]) -> Outputs:
    """Batches of outputs joined: tensors, or tuples of them (one per task)."""
    if isinstance(chunks[0], tuple):
        return tuple(torch.cat([chunk[i] for chunk in chunks]) for i in range(len(chunks[0])))
    return torch.cat(list(chunks))


def to_cpu(outputs: Outputs) -> Outputs:
    if isinstance(outputs, tuple):
        return tuple(output.float().cpu() for output in outputs)
    return outputs.float().cpu()
