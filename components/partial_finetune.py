"""The `partial` strategy: unfreeze the last N blocks, train them from cached activations.

The frozen part (stem and all but the last N blocks) runs once per image and view in ONNX Runtime;
its activations are cached by content like features are (`<cache>/<backbone>/partial-<key>/`),
so every epoch, every seed and every later run trains on stored tensors instead of re-running
most of the network. Augmentation keeps that cacheable: a fixed set of views per image, the
dihedral group's flips and 90° rotations (a solar cell turned or mirrored is still a solar
cell), of which each epoch draws one per training image. Val and test use the image as it is.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from torch import nn

from components import features
from components.backbones import BackboneEntry, build_classifier
from components.errors import UserError
from components.features import TrunkParityError, decode_ahead, source_sha256
from components.manifest import Dataset
from components.onnx_runtime import open_session
from components.preprocess import Preprocessing, load_batch
from components.progress import Progress, no_progress
from components.result import atomic_path, sha256_json, write_json
from components.devices import Placement
from components.train_loop import OnEpoch, Trained, class_weight_vector, fit, scores
from components.trunk_parts import FrozenPart, TrainedTail, check_layout

if TYPE_CHECKING:
    from components.finetune import FinetuneConfig, PartialConfig

log = logging.getLogger(__name__)

FROZEN_FILE = "frozen.onnx"
KEY_FILE = "cache_key.json"
SHAPE_FILE = "shape.json"
MAX_VIEWS = 8


def dihedral(images: np.ndarray, view: int) -> np.ndarray:
    """View 0-3: rotation by view x 90°; 4-7: the same, mirrored left-right. NCHW in, NCHW out."""
    rotated = np.rot90(images, view % 4, axes=(2, 3))
    return np.ascontiguousarray(rotated[..., ::-1] if view >= 4 else rotated)


def activation_key_inputs(entry: BackboneEntry, preprocessing: Preprocessing, trainable: int, opset: int) -> dict:
    """What an activation depends on besides the image: the features key inputs, the cut, the views' code."""
    inputs = features.key_inputs(entry, preprocessing, (), opset)
    return inputs | {"trainable_blocks": trainable, "dtype": "float16",
                     "code_sha256": inputs["code_sha256"] | source_sha256((FrozenPart, dihedral, cache_activations))}


class ViewStore:
    """One `.npy` of `dtype` per (image, view) under `root/<sha[:2]>/<sha>.<view>.npy`, written atomically.

    Holds partial's frozen-part activations (float16) and distillation's teacher logits (float32).
    """

    def __init__(self, root: Path, dtype: type[np.floating], what: str):
        self.dir, self.dtype, self.what = root, np.dtype(dtype), what

    def path(self, sha256: str, view: int) -> Path:
        return self.dir / sha256[:2] / f"{sha256}.{view}.npy"

    def get(self, sha256: str, view: int, shape: tuple[int, ...]) -> np.ndarray | None:
        """The entry, or None when it is absent, unreadable, misshapen or not finite (then it is recomputed)."""
        path = self.path(sha256, view)
        if not path.exists():
            return None
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as error:
            log.warning("%s: unreadable cached %s (%s); recomputing it", path, self.what, error)
            return None
        if array.dtype != self.dtype or array.shape != shape or not np.isfinite(array).all():
            log.warning("%s: cached %s holds %s%s, expected finite %s%s; recomputing it", path, self.what, array.dtype,
                        list(array.shape), self.dtype, list(shape))
            return None
        return array

    def put(self, sha256: str, view: int, array: np.ndarray) -> None:
        with atomic_path(self.path(sha256, view)) as partial, open(partial, "wb") as f:
            np.save(f, array.astype(self.dtype))


def export_frozen(entry: BackboneEntry, preprocessing: Preprocessing, trainable: int, opset: int, path: Path,
                  sample: np.ndarray, atol: float) -> tuple[int, ...]:
    """The frozen part as ONNX, checked against torch on real images; returns one activation's shape."""
    model = build_classifier(entry)
    check_layout(model, entry.name, "partial")
    frozen = FrozenPart(model, trainable).eval()
    size = preprocessing.input_size
    with atomic_path(path) as partial, torch.no_grad():
        torch.onnx.export(frozen, (torch.zeros(1, 3, size, size),), str(partial), dynamo=False,
                          input_names=["image"], output_names=["activation"],
                          dynamic_axes={"image": {0: "batch"}, "activation": {0: "batch"}}, opset_version=opset)
        got = open_session(partial, 0).run(["activation"], {"image": sample})[0]
        want = frozen(torch.from_numpy(sample)).numpy()
        diff = float(np.max(np.abs(got - want)))
        if not diff <= atol:
            raise TrunkParityError(f"backbone {entry.name!r}: the frozen part in ONNX Runtime differs from torch by "
                                   f"{diff:.3g} (> features.parity_atol={atol:g}); try another features.opset.")
    return tuple(want.shape[1:])


def prepare_store(entry: BackboneEntry, preprocessing: Preprocessing, trainable: int, dataset: Dataset,
                  cache_dir: Path, opset: int, atol: float) -> tuple[ViewStore, tuple[int, ...]]:
    """The store for this cut, with its frozen part exported and checked; and one activation's shape."""
    inputs = activation_key_inputs(entry, preprocessing, trainable, opset)
    store = ViewStore(cache_dir / entry.name / f"partial-{sha256_json(inputs)[:20]}", np.float16, "activation")
    if not (store.dir / KEY_FILE).exists():
        write_json(store.dir / KEY_FILE, {"inputs": inputs})
    shape_file = store.dir / SHAPE_FILE
    if not (store.dir / FROZEN_FILE).exists() or not shape_file.exists():
        sample = load_batch([dataset.image_path(p) for p in dataset.manifest["path"].head(4)], preprocessing)
        write_json(shape_file, list(export_frozen(entry, preprocessing, trainable, opset, store.dir / FROZEN_FILE,
                                                   sample, atol)))
    return store, tuple(json.loads(shape_file.read_text()))


def missing_views(store: ViewStore, dataset: Dataset, n_views: int) -> dict[str, set[int]]:
    """Per image sha256, the views of it the store lacks (all views for train images, view 0 otherwise)."""
    todo: dict[str, set[int]] = {}
    for split in ("train", "val", "test"):
        for sha in dataset.split(split)["sha256"]:
            missing = {v for v in range(n_views if split == "train" else 1) if not store.path(sha, v).exists()}
            if missing:
                todo.setdefault(sha, set()).update(missing)
    return todo


def cache_activations(entry: BackboneEntry, preprocessing: Preprocessing, trainable: int, n_views: int,
                      dataset: Dataset, cache_dir: Path, opset: int, atol: float, batch_size: int = 32,
                      num_threads: int = 0, progress: Progress = no_progress) -> dict[str, np.ndarray]:
    """Per split, float16 activations: train (N, views, C, H, W); val and test (N, C, H, W) of view 0."""
    store, shape = prepare_store(entry, preprocessing, trainable, dataset, cache_dir, opset, atol)
    frozen_path = store.dir / FROZEN_FILE
    splits = {split: dataset.split(split) for split in ("train", "val", "test")}
    wanted = {split: range(n_views) if split == "train" else range(1) for split in splits}

    def decode(batch: pd.DataFrame) -> np.ndarray:
        return load_batch([dataset.image_path(p) for p in batch["path"]], preprocessing)

    todo = missing_views(store, dataset, n_views)
    if todo:
        session = open_session(frozen_path, num_threads)
        rows = dataset.manifest.drop_duplicates("sha256").set_index("sha256").loc[sorted(todo)].reset_index()
        batches = [rows.iloc[i : i + batch_size] for i in range(0, len(rows), batch_size)]
        began, count = time.perf_counter(), 0
        with progress(total=sum(len(v) for v in todo.values()), desc=f"activations {entry.name}", unit="view") as bar:
            for batch, images in decode_ahead(batches, decode):
                views = sorted(set().union(*(todo[sha] for sha in batch["sha256"])))
                for view in views:
                    out = session.run(["activation"], {"image": dihedral(images, view)})[0]
                    for row, sha in enumerate(batch["sha256"]):
                        if view in todo[sha]:
                            store.put(sha, view, out[row])
                            count += 1
                    bar.update(sum(view in todo[sha] for sha in batch["sha256"]))
        log.info("%s: %d activations computed (%.0f views/s) into %s", entry.name, count,
                 count / (time.perf_counter() - began), store.dir)

    def load(sha: str, view: int) -> np.ndarray:
        array = store.get(sha, view, shape)
        if array is None:  # unreadable or misshapen: recompute this one entry
            image = decode(dataset.manifest[dataset.manifest["sha256"] == sha].head(1))
            array = open_session(frozen_path, num_threads).run(["activation"], {"image": dihedral(image, view)})[0][0]
            store.put(sha, view, array)
            array = array.astype(np.float16)
        return array

    return {
        split: np.stack([np.stack([load(sha, v) for v in wanted[split]]) for sha in frame["sha256"]])
        if split == "train" else np.stack([load(sha, 0) for sha in frame["sha256"]])
        for split, frame in splits.items()
    }


def train_partial(cfg: PartialConfig, common: FinetuneConfig, entry: BackboneEntry, preprocessing: Preprocessing,
                  dataset: Dataset, cache_dir: Path, placement: Placement, resume_path: Path | None, fingerprint: str,
                  opset: int, atol: float, progress: Progress = no_progress, on_epoch: OnEpoch | None = None) -> Trained:
    """Train the last `cfg.blocks` blocks, the top and a new head on cached activations (distilled if a teacher is set)."""
    began = time.perf_counter()
    distilling = common.distill.teacher is not None
    if distilling:  # checked before any work: a wrong path fails in one line
        from components import distill

        teacher_path, teacher_checkpoint = distill.teacher_checkpoint(common.distill.teacher, dataset.labels)
    activations = cache_activations(entry, preprocessing, cfg.blocks, cfg.views, dataset, cache_dir, opset, atol,
                                    progress=progress)
    cached_seconds = time.perf_counter() - began
    labels = {split: torch.as_tensor(dataset.label_index(dataset.split(split))) for split in ("train", "val")}
    n_classes = len(dataset.labels)
    torch.manual_seed(common.seed)
    model = build_classifier(entry)
    head = nn.Linear(model.num_features, n_classes)
    tail = TrainedTail(model, cfg.blocks, head, cfg.dropout)
    for parameter in tail.parameters():
        parameter.requires_grad_(True)
    train_x, val_x = torch.from_numpy(activations["train"]), torch.from_numpy(activations["val"])
    n_train, n_views = train_x.shape[:2]
    if distilling:  # teacher logits of the same (image, view) pairs as the activations, same row order
        teacher = distill.teacher_logits(teacher_path, teacher_checkpoint, dataset, n_views, cache_dir)
        teacher_train = torch.from_numpy(teacher.train)

    def batches(epoch: int, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(n_train, generator=generator)
        views = torch.randint(0, n_views, (n_train,), generator=generator)
        for index in order.split(cfg.batch_size):
            target = labels["train"][index]
            if distilling:
                target = distill.pack_targets(target, teacher_train[index, views[index]])
            yield train_x[index, views[index]].float(), target

    def evaluate(network: nn.Module) -> dict[str, float]:
        logits = torch.cat([network(chunk.float().to(placement.device)) for chunk in val_x.split(256)])
        return scores(logits.cpu(), labels["val"])

    weight = class_weight_vector(labels["train"].tolist(), n_classes, common.class_weights).to(placement.device)
    loss = (distill.kd_loss(common.distill.alpha, common.distill.temperature, weight, common.label_smoothing) if distilling
            else nn.CrossEntropyLoss(weight=weight, label_smoothing=common.label_smoothing))
    steps = (n_train + cfg.batch_size - 1) // cfg.batch_size
    result = fit(tail, tail.layer_groups(), batches, steps, evaluate, loss, cfg.loop(common.seed), placement, resume_path,
                 fingerprint, progress, desc=f"finetune partial ({cfg.blocks} blocks)", on_epoch=on_epoch)
    tail.load_state_dict(result.state)
    tail.cpu().eval()
    info = {"trainable_blocks": cfg.blocks, "views": n_views, "activation_shape": list(train_x.shape[2:]),
            "activation_seconds": cached_seconds, "resumed_from_epoch": result.resumed_from,
            "stopped_early": result.stopped_early}
    if distilling:
        info["distill"] = {"teacher": str(teacher_path), "teacher_backbone": teacher_checkpoint["backbone"]["name"],
                           "teacher_val_accuracy": distill.teacher_accuracy(teacher, labels["val"]),
                           "teacher_pairs_computed": teacher.computed, "teacher_onnx_runs": teacher.teacher_runs,
                           "teacher_seconds": teacher.seconds}
    best = next(h for h in result.history if h["epoch"] == result.best_epoch)
    return Trained(model, head, result.history, best, time.perf_counter() - began, info)


def step_seconds(module: nn.Module, batch: torch.Tensor, n_classes: int, placement: Placement, steps: int = 2) -> float:
    """Seconds of one AdamW training step of `module` on `batch`, after one untimed warm-up step."""
    module.to(placement.device).train()
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad])
    labels = torch.zeros(len(batch), dtype=torch.long, device=placement.device)
    batch = batch.to(placement.device)
    timings = []
    for _ in range(steps + 1):
        began = time.perf_counter()
        optimizer.zero_grad()
        with placement.autocast():
            loss = nn.functional.cross_entropy(module(batch), labels)
        loss.backward()
        optimizer.step()
        if placement.device.type == "cuda":
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - began)
    return min(timings[1:])


def estimate_seconds(cfg: PartialConfig, entry: BackboneEntry, preprocessing: Preprocessing, dataset: Dataset,
                     cache_dir: Path, placement: Placement, opset: int, atol: float) -> float:
    """Missing activations at a measured rate, plus every epoch at a measured step time."""
    store, shape = prepare_store(entry, preprocessing, cfg.blocks, dataset, cache_dir, opset, atol)
    todo = missing_views(store, dataset, cfg.views)
    seconds = 0.0
    if todo:
        sample = dataset.manifest.head(8)
        began = time.perf_counter()
        images = load_batch([dataset.image_path(p) for p in sample["path"]], preprocessing)
        decode_s = (time.perf_counter() - began) / len(sample)
        session = open_session(store.dir / FROZEN_FILE, 0)
        session.run(["activation"], {"image": images})
        began = time.perf_counter()
        session.run(["activation"], {"image": images})
        view_s = (time.perf_counter() - began) / len(sample)
        seconds += len(todo) * decode_s + sum(len(v) for v in todo.values()) * view_s
    model = build_classifier(entry)
    tail = TrainedTail(model, cfg.blocks, nn.Linear(model.num_features, len(dataset.labels)), cfg.dropout)
    for parameter in tail.parameters():
        parameter.requires_grad_(True)
    batch = min(cfg.batch_size, max(len(dataset.split("train")), 2))
    step = step_seconds(tail, torch.zeros(batch, *shape), len(dataset.labels), placement)
    steps = -(-len(dataset.split("train")) // cfg.batch_size)
    evaluation = len(dataset.split("val")) / batch * step / 3  # forward only
    return seconds + cfg.epochs * (steps * step + evaluation)
