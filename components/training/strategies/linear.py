"""The `linear` strategy: a logistic-regression probe on cached trunk features (seconds).

Features of one or several taps are concatenated and standardised (mean and scale from train);
the L2 strength is chosen on val from a grid. The fitted probe is folded into one `nn.Linear` on
the raw features, so the exported model needs no separate scaler.

Several tasks: one probe per task on the same features (frozen features leave the tasks nothing to
share), each of its head's kind: a logistic regression (classify), CORN's K-1 conditional logistic
regressions (ordinal), a ridge regression of the class targets with thresholds chosen on val (regress).

A feature's scale is floored at `SCALE_FLOOR` times the median feature's: pooled ReLU6 channels
that are almost always 0 have spreads of 1e-4, and dividing by that multiplied rounding noise by
10^4 (a folded weight of 5,662 on ELPV Lite0, whose ONNX Runtime export then missed torch by 1.3e-4).

With `finetune.adapt.target_domain` set, a logistic regression has nothing to align, so the probe is
a trainable head instead (`bottleneck`: standardise, a bottleneck layer, the classifier), trained in
torch on the same cached features of the labelled source images and of the unlabelled target images
(`adapt.method`: the alignment loss on the bottleneck's output, `components/training/adaptation.py`),
chosen and early-stopped on source val accuracy.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import log_loss
from sklearn.preprocessing import StandardScaler
from torch import nn

from components.data.domains import UNLABELLED, UNLABELLED_VAL
from components.features.cache import split_features
from components.models.heads import BottleneckHead, CornHead, RegressHead, TaskHeads
from components.training import adaptation
from components.training.context import Context, Strategy
from components.training.cost import Cost
from components.training.loop import Trained, class_weight_vector, fit, scores
from components.training.reference import DEEPER_FINETUNING
from components.training.tasks import Task, default_bounds

log = logging.getLogger(__name__)

SCALE_FLOOR = 0.1  # a feature is never scaled up by more than 10x the median feature's factor


@dataclass(frozen=True)
class ProbeResult:
    head: nn.Linear
    history: list[dict[str, float]]  # one entry per grid point, in grid order
    best: dict[str, float]


def folded(coef: np.ndarray, intercept: np.ndarray, scaler: StandardScaler) -> tuple[np.ndarray, np.ndarray]:
    """The weights and bias of `x @ coef.T + intercept` on standardised x, as weights and bias on raw x."""
    return coef / scaler.scale_, intercept - (coef * scaler.mean_ / scaler.scale_).sum(1)


def copy_into(linear: nn.Linear, coef: np.ndarray, intercept: np.ndarray) -> None:
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(coef).float())
        linear.bias.copy_(torch.from_numpy(intercept).float())


def fold_scaler(model: LogisticRegression, scaler: StandardScaler, n_classes: int) -> nn.Linear:
    """`model(scaler(x))` as one linear layer on `x` (softmax logits; binary gets [0, z])."""
    coef, intercept = folded(model.coef_, model.intercept_, scaler)
    if coef.shape[0] == 1 and n_classes == 2:  # sklearn's binary model: one logit for the positive class
        coef = np.vstack([np.zeros_like(coef), coef])
        intercept = np.array([0.0, intercept[0]])
    head = nn.Linear(coef.shape[1], n_classes)
    copy_into(head, coef, intercept)
    return head.eval()


def standardiser(x: np.ndarray) -> StandardScaler:
    """Mean and scale from `x`, each scale at least `SCALE_FLOOR` x the median one (near-dead features stay quiet)."""
    scaler = StandardScaler().fit(x)
    scaler.scale_ = np.maximum(scaler.scale_, SCALE_FLOOR * np.median(scaler.scale_))
    return scaler


def fit_probe(train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray], n_classes: int,
              regularization: tuple[float, ...], class_weights: str, seed: int) -> ProbeResult:
    """One probe per L2 strength `C` (sklearn's inverse strength); the best val accuracy wins, ties to lower loss."""
    present = sorted(set(train[1].tolist()))
    if present != list(range(n_classes)):  # validate's min_per_class_split guarantees this for pipeline runs
        raise ValueError(f"the train split holds classes {present}, expected all of {list(range(n_classes))}")
    scaler = standardiser(train[0])
    x_train, x_val = scaler.transform(train[0]), scaler.transform(val[0])
    history, fitted = [], []
    for index, c in enumerate(regularization):
        began = time.perf_counter()
        model = LogisticRegression(C=c, max_iter=2000, class_weight="balanced" if class_weights == "balanced" else None,
                                   random_state=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # the grid's weakest penalties may stop at max_iter
            model.fit(x_train, train[1])
        train_loss = log_loss(train[1], model.predict_proba(x_train), labels=model.classes_)
        probabilities = model.predict_proba(x_val)
        val_loss = log_loss(val[1], probabilities, labels=model.classes_)
        val_accuracy = float((model.classes_[probabilities.argmax(1)] == val[1]).mean())
        history.append({"epoch": index, "C": c, "train_loss": train_loss, "val_loss": val_loss,
                        "val_accuracy": val_accuracy, "seconds": time.perf_counter() - began})
        fitted.append(model)
        log.info("linear probe C=%g: val accuracy %.4f, val loss %.4f", c, val_accuracy, val_loss)
    best = max(range(len(history)), key=lambda i: (history[i]["val_accuracy"], -history[i]["val_loss"]))
    return ProbeResult(fold_scaler(fitted[best], scaler, n_classes), history, history[best])


def tap_features(ctx: Context, split: str, taps: tuple[str, ...]) -> np.ndarray:
    return np.concatenate([split_features(ctx.dataset, ctx.features_dir, ctx.entry.name, tap, split) for tap in taps],
                          axis=1)


def probe_head(ctx: Context) -> nn.Linear:
    """The classify head a deeper strategy starts from (`head_init: probe`): the linear probe on the cached pooled
    features of train, its C chosen on val, folded onto the raw features the trained layers' pooling produces."""
    x = {s: tap_features(ctx, s, ("pooled",)) for s in ("train", "val")}
    y = {s: np.asarray(ctx.dataset.label_index(ctx.dataset.split(s))) for s in ("train", "val")}
    probe = fit_probe((x["train"], y["train"]), (x["val"], y["val"]), len(ctx.dataset.labels),
                      ctx.cfg.linear.regularization, ctx.cfg.class_weights, ctx.cfg.seed)
    log.info("the head starts as the linear probe (C=%g, val accuracy %.4f)", probe.best["C"], probe.best["val_accuracy"])
    return probe.head.train()


def train_adapted(ctx: Context) -> Trained:
    """The bottleneck head on cached source and target features, with `adapt.method`'s alignment loss."""
    began = time.perf_counter()
    cfg, common, placement = ctx.cfg.adapt, ctx.cfg, ctx.placement
    splits = ("train", "val", UNLABELLED, UNLABELLED_VAL)
    x = {s: tap_features(ctx, s, ctx.cfg.linear.taps) for s in splits}
    y = {s: torch.as_tensor(ctx.dataset.label_index(ctx.dataset.split(s))) for s in ("train", "val")}
    # Each domain standardised with its own statistics (the target's from its unlabelled images), or all with the
    # source's. The head trains on standardised features; the exported head standardises with the target's
    # statistics (per_domain: the model is the target domain's) or the source's.
    scalers = {"source": standardiser(x["train"])}
    scalers["target"] = standardiser(x[UNLABELLED]) if cfg.normalise == "per_domain" else scalers["source"]
    standardised = {s: scalers["target" if s in (UNLABELLED, UNLABELLED_VAL) else "source"].transform(x[s])
                    for s in splits}
    n_classes = len(ctx.dataset.labels)
    torch.manual_seed(common.seed)
    head = BottleneckHead(x["train"].shape[1], cfg.bottleneck, n_classes, cfg.dropout)
    t = {s: torch.from_numpy(v).float() for s, v in standardised.items()}
    steps = (len(t["train"]) + cfg.batch_size - 1) // cfg.batch_size
    model = adaptation.AdaptingModel(head, adaptation.Aligner(cfg.method, cfg.bottleneck, cfg.discriminator_width,
                                                              max(1, round(cfg.grl_warmup_epochs * steps))))
    target_label = torch.full((cfg.batch_size,), adaptation.TARGET)

    def batches(epoch: int, generator: torch.Generator):  # noqa: ANN202 - (x, y) pairs
        for source, target in adaptation.mixed_batches(len(t["train"]), len(t[UNLABELLED]), cfg.batch_size, generator):
            yield (torch.cat([t["train"][source], t[UNLABELLED][target]]),
                   torch.cat([y["train"][source], target_label[: len(target)]]))

    def evaluate(network: nn.Module) -> dict[str, float]:
        device = placement.device
        features = {s: network.model.features(t[s].to(device)) for s in ("val", UNLABELLED_VAL)}
        return {**scores(network.model.classify(features["val"]).cpu(), y["val"]),
                # Label-free: how far apart the held-out source and target features still are.
                "val_coral_distance": adaptation.coral_loss(features["val"], features[UNLABELLED_VAL]).item()}

    weight = class_weight_vector(y["train"].tolist(), n_classes, common.class_weights).to(placement.device)
    class_loss = nn.CrossEntropyLoss(weight=weight, label_smoothing=common.label_smoothing)
    resume_path, fingerprint = ctx.resume("linear-adapt", cfg)
    result = fit(model, model.layer_groups(), batches, steps, evaluate,
                 adaptation.adaptation_loss(model, cfg.weight, class_loss), cfg.loop(common.seed), placement,
                 resume_path, fingerprint, ctx.progress, desc=f"finetune linear, adapt {cfg.method}",
                 on_epoch=ctx.on_epoch)
    model.load_state_dict(result.state)
    model.cpu().eval()
    with torch.no_grad():
        adapted = {s: head.features(t[s]).numpy() for s in splits}
    head.mean.copy_(torch.from_numpy(scalers["target"].mean_).float())  # the served head standardises raw features
    head.scale.copy_(torch.from_numpy(scalers["target"].scale_).float())
    best = next(h for h in result.history if h["epoch"] == result.best_epoch)
    before = {s: scalers["source"].transform(x[s]) for s in splits}  # what a source-only probe reads
    report = adaptation.alignment_report(cfg.target_domain, cfg.method, before, adapted, best["val_accuracy"],
                                         common.seed)
    info = {"taps": list(ctx.cfg.linear.taps), "head": head.spec(), "n_features": int(x["train"].shape[1]),
            "normalise": cfg.normalise,
            "stopped_early": result.stopped_early, "resumed_from_epoch": result.resumed_from, "adaptation": report}
    plot = partial(adaptation.plot_alignment, (before["val"], before[UNLABELLED_VAL]),
                   (adapted["val"], adapted[UNLABELLED_VAL]), report,
                   f"{ctx.entry.name} linear, adapt {cfg.method} to {cfg.target_domain!r}")
    return Trained(None, head.eval(), result.history, best, time.perf_counter() - began, info,
                   plots={"adaptation.png": plot})


def balanced_weights(labels: np.ndarray, n_classes: int, class_weights: str) -> np.ndarray | None:
    """Per-sample weights that give each class the weight scikit-learn's "balanced" gives it (None: unweighted)."""
    if class_weights != "balanced":
        return None
    return class_weight_vector(labels.tolist(), n_classes, "balanced").numpy()[labels]


def head_scores(head: nn.Module, x: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(accuracy, log loss) of `head`'s class scores on raw features `x` (softmax of its output)."""
    with torch.no_grad():
        output = head.eval()(torch.from_numpy(x).float()).double()
    log_p = torch.log_softmax(output, dim=1).numpy()
    return float((log_p.argmax(1) == labels).mean()), float(-log_p[np.arange(len(labels)), labels].mean())


def fit_per_c(train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray],
              regularization: tuple[float, ...], fit_one: Callable[[np.ndarray, float], nn.Module]) -> ProbeResult:
    """One head per L2 strength `C` from `fit_one(standardised train x, C)` (a head on standardised features);
    each folded onto raw features and scored; the best val accuracy wins, ties to lower loss."""
    scaler = standardiser(train[0])
    x_train = scaler.transform(train[0])
    history, heads = [], []
    for index, c in enumerate(regularization):
        began = time.perf_counter()
        head = fit_one(x_train, c)
        linear = head.linear
        copy_into(linear, *folded(linear.weight.detach().double().numpy(), linear.bias.detach().double().numpy(), scaler))
        _, train_loss = head_scores(head, train[0], train[1])
        val_accuracy, val_loss = head_scores(head, val[0], val[1])
        history.append({"epoch": index, "C": c, "train_loss": train_loss, "val_loss": val_loss,
                        "val_accuracy": val_accuracy, "seconds": time.perf_counter() - began})
        heads.append(head)
        log.info("probe C=%g: val accuracy %.4f, val loss %.4f", c, val_accuracy, val_loss)
    best = max(range(len(history)), key=lambda i: (history[i]["val_accuracy"], -history[i]["val_loss"]))
    return ProbeResult(heads[best], history, history[best])


def fit_ordinal_probe(train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray], task: Task,
                      regularization: tuple[float, ...], class_weights: str, seed: int) -> ProbeResult:
    """A CORN head from K-1 logistic regressions: the k-th on the train images of rank >= k, told whether the rank
    is above k. CORN's loss is the sum of those conditional binary losses and each logit has its own weights,
    so fitting them one by one is fitting CORN."""
    ranks = np.asarray(task.ranks)[train[1]]
    weights = balanced_weights(train[1], len(task.labels), class_weights)

    def fit_one(x: np.ndarray, c: float) -> nn.Module:
        head = CornHead(x.shape[1], task.ranks)
        coef, intercept = [], []
        for k in range(len(task.labels) - 1):
            subset = ranks >= k
            model = LogisticRegression(C=c, max_iter=2000, random_state=seed)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                model.fit(x[subset], (ranks[subset] > k).astype(int), sample_weight=None if weights is None else weights[subset])
            coef.append(model.coef_[0])
            intercept.append(model.intercept_[0])
        copy_into(head.linear, np.stack(coef), np.asarray(intercept))
        return head

    return fit_per_c(train, val, regularization, fit_one)


def fit_regress_probe(train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray], task: Task,
                      regularization: tuple[float, ...], class_weights: str) -> ProbeResult:
    """A ridge regression of each image's class target (alpha = 1 / 2C: the L2 strength logistic regression's C
    stands for, on squared error), with thresholds halfway between the targets until `calibrate_values`."""
    targets = np.asarray(task.targets)[train[1]]
    weights = balanced_weights(train[1], len(task.labels), class_weights)

    def fit_one(x: np.ndarray, c: float) -> nn.Module:
        lower, upper = default_bounds(task.targets, task.ranks)
        head = RegressHead(x.shape[1], task.targets, lower, upper)
        model = Ridge(alpha=1 / (2 * c)).fit(x, targets, sample_weight=weights)
        copy_into(head.linear, model.coef_[None], np.asarray([model.intercept_]))
        return head

    return fit_per_c(train, val, regularization, fit_one)


def train(ctx: Context) -> Trained:
    if ctx.cfg.adapt.target_domain is not None:
        return train_adapted(ctx)
    began = time.perf_counter()
    tasks = ctx.tasks
    features = {s: tap_features(ctx, s, ctx.cfg.linear.taps) for s in ("train", "val")}
    targets = {s: tasks.targets(s) for s in ("train", "val")}
    probes: dict[str, ProbeResult] = {}
    for i, task in enumerate(tasks.tasks):  # a probe per task: on frozen features, the tasks share nothing to train
        labels = {s: (targets[s] if tasks.single else targets[s][:, i]).numpy() for s in ("train", "val")}
        train_set, val_set = (features["train"], labels["train"]), (features["val"], labels["val"])
        regularization, class_weights, seed = ctx.cfg.linear.regularization, ctx.cfg.class_weights, ctx.cfg.seed
        if task.kind == "ordinal":
            probes[task.name] = fit_ordinal_probe(train_set, val_set, task, regularization, class_weights, seed)
        elif task.kind == "regress":
            probes[task.name] = fit_regress_probe(train_set, val_set, task, regularization, class_weights)
        else:
            probes[task.name] = fit_probe(train_set, val_set, len(task.labels), regularization, class_weights, seed)
    primary = probes[tasks.primary.name]
    info = {"taps": list(ctx.cfg.linear.taps), "C": primary.best["C"], "n_features": int(features["train"].shape[1])}
    if tasks.single:
        return Trained(None, primary.head, primary.history, primary.best, time.perf_counter() - began, info)
    head = TaskHeads({name: probe.head for name, probe in probes.items()})
    with torch.no_grad():
        values = {task.name: head.head(task.name).value(torch.from_numpy(features["val"]).float()).numpy()
                  for task in tasks.tasks if task.kind == "regress"}
    calibration = tasks.calibrate_values(head, values, targets["val"])
    best = dict(primary.best)
    for task in tasks.tasks:  # each task's val accuracy as its head ships (regress: with the thresholds chosen on val)
        accuracy, _ = head_scores(head.head(task.name), features["val"], targets["val"][:, tasks.names.index(task.name)].numpy())
        best[f"val_accuracy.{task.name}"] = accuracy
    best["val_accuracy"] = best[f"val_accuracy.{tasks.primary.name}"]
    info |= {"C_per_task": {name: probe.best["C"] for name, probe in probes.items()}}
    if calibration:
        info["calibration"] = calibration
    return Trained(None, head.eval(), primary.history, best, time.perf_counter() - began, info)


STRATEGY = Strategy("linear", train, cost=lambda ctx: Cost(), train_views=lambda cfg: 1,  # seconds: features are cached
                    next_step=DEEPER_FINETUNING, adapts=True)
