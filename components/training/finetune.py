"""Finetune: train a classifier on the selected backbone, by one of the strategies in `strategies/`.

- `linear`: a logistic-regression probe on cached features of one or more taps (seconds).
- `partial`: the last N blocks, the top conv and a new head, trained from cached activations of
  the frozen part and cached flip/rotation views.
- `full`: everything, end to end on augmented images.
- `auto`: linear, then partial, then full while their counted cost fits the budget; best val accuracy wins.

Every run also fits a reference that knows nothing of ImageNet (a linear model on downsampled
pixels, `reference`): a transferred model that does not beat it on val by `guard.margin` is
reported as negative transfer (console, MLflow tag `tlops.negative_transfer`, `finetune.json`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from components.core.lineage import data_version
from components.core.progress import Progress, no_progress
from components.core.result import StageResult, write_json
from components.data.manifest import Dataset
from components.models.classifier import save_checkpoint
from components.training import ddp, reference
from components.training.config import FinetuneConfig
from components.training.context import Context, Strategy
from components.training.loop import OnEpoch, Trained
from components.training.strategies import AUTO_ORDER, strategies_for

if TYPE_CHECKING:
    from components.models.int8_recipe import Recipe

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "model.pt"
REPORT_FILE = "finetune.json"


def train_auto(ctx: Context, ref: reference.ReferenceResult,
               strategies: dict[str, Strategy]) -> tuple[str, Trained, list[dict[str, Any]], str]:
    """Each strategy, cheapest first, while its counted cost fits what is left of the budget.

    The budget is charged with each trained strategy's counted cost, not its measured time, so the
    choice depends on the data and params alone (components/training/cost.py); measured times are recorded.
    """
    budget, spent = ctx.cfg.budget_minutes * 60, 0.0
    tried: list[tuple[str, Trained]] = []
    candidates: list[dict[str, Any]] = []
    for strategy in AUTO_ORDER:
        if ctx.cfg.adapt.target_domain is not None and not strategies[strategy].adapts:
            reason = f"skipped: does not adapt to finetune.adapt.target_domain={ctx.cfg.adapt.target_domain!r}"
            candidates.append({"strategy": strategy, "status": "skipped", "reason": reason})
            log.info("auto: %s %s", strategy, reason)
            continue
        cost = strategies[strategy].cost(ctx)
        left = budget - spent
        estimate = f"estimated {cost.seconds / 60:.1f} min ({cost.training_s / 60:.1f} training, " \
                   f"{(cost.inference_s + cost.decode_s) / 60:.1f} activations and decoding)"
        if tried and cost.seconds > left:
            reason = f"skipped: {estimate}, {max(left, 0) / 60:.1f} min of the budget left"
            candidates.append({"strategy": strategy, "estimate": cost.describe(), "status": "skipped", "reason": reason})
            log.info("auto: %s %s", strategy, reason)
            continue
        log.info("auto: training %s, %s, %.1f min of the budget left", strategy, estimate, left / 60)
        trained = train_strategy(strategy, ctx, strategies)
        spent += cost.seconds
        verdict = reference.judge(trained.best["val_accuracy"], ref, ctx.cfg.guard.margin, f"{ctx.entry.name}/{strategy}",
                                  strategies[strategy].next_step)
        if verdict.fired:
            log.warning("auto: %s", verdict.message)
        candidates.append({"strategy": strategy, "estimate": cost.describe(), "status": "trained",
                           "val_accuracy": trained.best["val_accuracy"], "val_loss": trained.best["val_loss"],
                           "seconds": trained.seconds, "negative_transfer": verdict.fired})
        log.info("auto: %s reaches val accuracy %.4f in %.0f s (estimated %.0f s)%s", strategy,
                 trained.best["val_accuracy"], trained.seconds, cost.seconds, " (negative transfer)" if verdict.fired else "")
        tried.append((strategy, trained))
    # Best val accuracy; a tie goes to the cheaper strategy (earlier in AUTO_ORDER).
    chosen, best = max(tried, key=lambda item: (item[1].best["val_accuracy"], -AUTO_ORDER.index(item[0])))
    others = ", ".join(f"{c['strategy']} {c['val_accuracy']:.4f}" if c["status"] == "trained" else f"{c['strategy']} {c['reason']}"
                       for c in candidates if c["strategy"] != chosen)
    why = (f"auto chose {chosen}: best val accuracy {best.best['val_accuracy']:.4f} within "
           f"{ctx.cfg.budget_minutes:g} reference min (others: {others or 'none'})")
    return chosen, best, candidates, why


def train_strategy(strategy: str, ctx: Context, strategies: Mapping[str, Strategy]) -> Trained:
    """One strategy trained in this process, or in its `processes` processes (components/training/ddp.py; image
    encoders only, which `check_modality` makes sure of)."""
    world = ddp.processes(ctx.cfg, strategy)
    return ddp.train(strategy, ctx, world) if world > 1 else strategies[strategy].train(ctx)


def plot_history(history: list[dict[str, float]], path: Path, strategy: str) -> Path:
    figure = Figure(figsize=(10, 4))
    FigureCanvasAgg(figure)
    loss_ax, acc_ax = figure.subplots(1, 2)
    # The probes' curves run over their grid (L2 strength C, softmax scale), the others' over epochs.
    x_key, x_label = next(((key, label) for key, label in (("C", "L2 strength C (log)"), ("scale", "softmax scale (log)"))
                           if key in history[0]), ("epoch", "epoch"))
    steps = [h[x_key] for h in history]
    loss_ax.plot(steps, [h["train_loss"] for h in history], marker="o", label="train")
    loss_ax.plot(steps, [h["val_loss"] for h in history], marker="o", label="val")
    loss_ax.set(xlabel=x_label, ylabel="cross-entropy", title=f"Loss ({strategy})")
    acc_ax.plot(steps, [h["val_accuracy"] for h in history], marker="o")
    acc_ax.set(xlabel=x_label, ylabel="accuracy", title="Validation accuracy")
    if x_key != "epoch":
        loss_ax.set_xscale("log")
        acc_ax.set_xscale("log")
    loss_ax.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return path


def soft_labels(ctx: Context, strategy: str) -> str:
    """Which tasks the trained model learnt from soft labels, and from what ("label <- defect_probability"); the
    linear probe and prototypes fit classes."""
    if strategy not in ("partial", "full"):
        return ""
    return ", ".join(f"{t.name} <- {t.values or 'class rank'}" for t in ctx.tasks.tasks if t.soft)


def check_modality(cfg: FinetuneConfig, modality: str, single_task: bool, strategies: Mapping[str, Any],
                   soft: Sequence[str] = ()) -> None:
    """One line, before any work, for what the encoder's modality cannot train: text models train one classify
    task, by linear, partial or full, without domain adaptation; image models start their heads at random."""
    from components.core.errors import UserError

    if modality == "image":
        for block in ("partial", "full"):
            if getattr(cfg, block).head_init != "random" and cfg.strategy in (block, "auto"):
                raise UserError(f"finetune.{block}.head_init={getattr(cfg, block).head_init}: starting the head from the "
                                f"linear probe is built for text encoders; set it to random for an image encoder.")
        return
    if cfg.strategy != "auto" and cfg.strategy not in strategies:
        raise UserError(f"finetune.strategy={cfg.strategy} trains image encoders only; for a {modality} encoder use one "
                        f"of {sorted(strategies)} or auto.")
    if not single_task:
        raise UserError(f"finetune.tasks {list(cfg.tasks)} with head {cfg.head!r}: a {modality} encoder trains one classify "
                        f"task on `label`; set finetune.tasks: [label] and finetune.head: classify.")
    if cfg.adapt.target_domain is not None:
        raise UserError(f"finetune.adapt.target_domain={cfg.adapt.target_domain!r}: domain adaptation is built for image "
                        f"encoders; set it to null for a {modality} encoder.")
    if soft:
        raise UserError(f"finetune.soft_labels: {soft} would train on soft ordinal labels, which are built for image "
                        f"encoders; set finetune.soft_labels.tasks=[] for a {modality} encoder.")
    if cfg.full.processes > 1 and cfg.strategy in ("full", "auto"):
        raise UserError(f"finetune.full.processes={cfg.full.processes}: several training processes (DDP) train image "
                        f"encoders only; set it to 1 for a {modality} encoder.")


def check_taps(cfg: FinetuneConfig, record: dict[str, Any], backbone: str) -> None:
    from components.core.errors import UserError

    for block, used_by in (("linear", ("linear", "auto")), ("prototypes", ("prototypes",))):
        taps = getattr(cfg, block).taps
        missing = [t for t in taps if t not in record["taps"]]
        if cfg.strategy in used_by and missing:
            raise UserError(f"finetune.{block}.taps {list(taps)}: {missing} not cached for {backbone} "
                            f"(features.taps is {record['taps']}); add them to features.taps or drop them here.")


def run(cfg: FinetuneConfig, backbone: str, features_dir: Path, dataset: Dataset, manifest_path: Path, out_dir: Path,
        cache_dir: Path, state_dir: Path, opset: int = 17, atol: float = 1e-4,
        progress: Progress = no_progress, on_epoch: OnEpoch | None = None,
        int8_recipe: Recipe | None = None, orders: Mapping[str, Sequence[str]] | None = None,
        values: Mapping[str, str] | None = None) -> StageResult:
    """Train by `cfg.strategy`; `cache_dir` holds cached activations, `state_dir` per-epoch resume files.

    `int8_recipe`: how compress will quantize (None: it will not); `partial` then also trains on INT8 activations.
    `orders`: the declared class order of tasks (the source's, e.g. ELPV's four levels, and `cfg.orders`).
    `values`: the value column the source declares for a task (ELPV binary: label <- defect_probability), which
    `finetune.soft_labels` trains on.

    `on_epoch(epoch, entry)` is called after each epoch of partial/full; an exception it raises stops
    the run before anything is written to `out_dir`."""
    ctx = Context(cfg, backbone, features_dir, dataset, cache_dir, state_dir, opset, atol, progress, on_epoch, int8_recipe,
                  {**(orders or {}), **cfg.orders}, values=values)
    check_taps(cfg, ctx.record, backbone)
    if cfg.strategy in ("full", "auto"):
        ddp.check_processes(cfg, "full", ctx.placement.device.type == "cuda")
    log.info("finetune on %s", ctx.placement.reason)
    strategies = strategies_for(ctx.entry.modality)
    check_modality(cfg, ctx.entry.modality, ctx.tasks.single, strategies, [t.name for t in ctx.tasks.tasks if t.soft])
    ref = reference.fit_reference(cfg.guard, dataset.for_task(ctx.tasks.primary.name))  # judged on the primary task
    if cfg.strategy == "auto":
        strategy, trained, candidates, why = train_auto(ctx, ref, strategies)
    else:
        strategy, trained = cfg.strategy, train_strategy(cfg.strategy, ctx, strategies)
        candidates, why = [], f"finetune.strategy={strategy}"
    verdict = reference.judge(trained.best["val_accuracy"], ref, cfg.guard.margin, f"{backbone}/{strategy}",
                              strategies[strategy].next_step)
    (log.warning if verdict.fired else log.info)("%s", verdict.message)

    out_dir.mkdir(parents=True, exist_ok=True)
    taps = list(trained.info.get("taps", ["pooled"]))  # the probes read taps of their own; the others pooled
    trunk_state = None
    # Several tasks (or another head than classify): the checkpoint, hence the exported model, says which.
    calibrated = trained.info.get("calibration", {})  # a regress task's thresholds, chosen on val, go with it
    described = {} if ctx.tasks.single else {"tasks": [task | ({"thresholds": calibrated[task["name"]]["thresholds"]}
                                                               if task["name"] in calibrated else {})
                                                        for task in ctx.tasks.describe()]}
    if trained.network is not None and ctx.entry.modality == "text":
        from components.models.text_encoders import TextTrunk

        trunk_state = TextTrunk(trained.network, ctx.entry, tuple(taps)).state_dict()
    elif trained.network is not None:
        from components.models.backbones import Trunk

        trunk_state = Trunk(trained.network, {t: ctx.entry.taps[t] for t in taps}).state_dict()
    checkpoint = save_checkpoint(
        out_dir / CHECKPOINT_FILE, trained.head, trunk_state,
        backbone=ctx.entry.describe(), taps=taps, labels=list(ctx.tasks.primary.labels), preprocessing=ctx.preprocessing.model_dump(mode="json"),
        config=cfg.model_dump(mode="json"), strategy=strategy, data={"version": data_version(manifest_path)},
        features_cache_key=ctx.record["cache_key"], train_views=strategies[strategy].train_views(cfg), **described,
    )
    report = {"strategy": strategy, "why": why, "candidates": candidates, "placement": ctx.placement.describe(),
              "reference": asdict(ref), "negative_transfer": {"fired": verdict.fired, "message": verdict.message},
              "best": trained.best, "info": trained.info}
    write_json(out_dir / REPORT_FILE, report)
    write_json(out_dir / "history.json", trained.history)
    plot = plot_history(trained.history, out_dir / "training_curves.png", strategy)
    pictures = {Path(name).stem: draw(out_dir / name) for name, draw in trained.plots.items()}
    adapted = trained.info.get("adaptation") or {}
    result = StageResult(
        stage="finetune", out_dir=out_dir,
        metrics={"val_accuracy": trained.best["val_accuracy"], "val_loss": trained.best["val_loss"],
                 "best_epoch": trained.best["epoch"], "epochs_run": len(trained.history), "train_seconds": trained.seconds,
                 "n_train": len(dataset.split("train")), "reference_val_accuracy": ref.val_accuracy,
                 **{key: value for key, value in trained.best.items() if key.startswith("val_accuracy.")},
                 **{f"auto.{c['strategy']}.val_accuracy": c["val_accuracy"] for c in candidates if "val_accuracy" in c},
                 **{f"adapt.{k}": float(v) for k, v in adapted.items() if isinstance(v, float)}},
        artifacts={"checkpoint": checkpoint, "report": out_dir / REPORT_FILE, "history": out_dir / "history.json",
                   "training_curves": plot, **pictures},
        info={"backbone": backbone, "strategy": strategy, "labels": list(ctx.tasks.primary.labels), "tasks": ctx.tasks.names, "why": why,
              "negative_transfer": "fired" if verdict.fired else "no", "device": ctx.placement.describe()["device"],
              "precision": ctx.placement.precision,
              **({"soft_labels": soft} if (soft := soft_labels(ctx, strategy)) else {}),
              **({"adapt": f"{adapted['method']} to {adapted['target_domain']}"} if adapted else {})},
    )
    result.save()
    return result
