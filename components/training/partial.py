"""The `partial` strategy: unfreeze the last N blocks, train them from cached activations.

The frozen part (stem and all but the last N blocks) runs once per image and view in ONNX Runtime;
its activations are cached by content like features are (`<cache>/<backbone>/partial-<key>/`),
so every epoch, every seed and every later run trains on stored tensors instead of re-running
most of the network. Augmentation keeps that cacheable: a fixed set of views per image, the
dihedral group's flips and 90° rotations (a solar cell turned or mirrored is still a solar
cell), of which each epoch draws one per training image. Val and test use the image as it is.

INT8-aware: when compress will quantize (`int8` given), the frozen part is also quantized with
compress's recipe and calibration images, and its INT8 activations of the same views are cached
beside the float ones; each epoch draws from both. The tail then learns from the inputs the INT8
model will feed it. On ELPV, a tail trained on float activations alone lost 8.8 points of val
accuracy when only the frozen part was INT8 (0.868 -> 0.780) and full INT8 lost 10.6; trained on
both, full INT8 lost 0.5 and shipped, with the same FP32 val accuracy (0.868).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from torch import nn

from components.core.devices import Placement
from components.core.errors import UserError
from components.core.progress import Progress, no_progress
from components.core.result import atomic_path, sha256_json, write_json
from components.data.manifest import Dataset
from components.data.preprocess import Preprocessing, load_batch
from components.features import extract as features
from components.features.extract import TrunkParityError, decode_ahead, source_sha256
from components.models import quantization as int8
from components.models.backbones import BackboneEntry, build_classifier
from components.models.onnx_io import open_session
from components.models.trunk_parts import FrozenPart, TrainedTail, check_layout
from components.training.loop import OnEpoch, Trained, best_seconds, class_weight_vector, fit, scores, step_seconds

if TYPE_CHECKING:
    from components.training.finetune import FinetuneConfig, PartialConfig

log = logging.getLogger(__name__)

FROZEN_FILE = "frozen.onnx"
FROZEN_INT8_FILE = "frozen_int8.onnx"
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
                     "code_sha256": inputs["code_sha256"] | source_sha256((FrozenPart, dihedral, export_frozen, store_views))}


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
            # The deeper the cut, the larger the activations and the float error they carry: give the scale.
            raise TrunkParityError(f"backbone {entry.name!r}: the frozen part in ONNX Runtime differs from torch by "
                                   f"{diff:.3g} (> features.parity_atol={atol:g}) on activations up to "
                                   f"{float(np.max(np.abs(want))):.3g}; try another features.opset, or raise "
                                   f"features.parity_atol if that difference is float rounding at this scale.")
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


def int8_store(store: ViewStore, recipe: int8.Recipe, dataset: Dataset) -> ViewStore:
    """Beside `store`, the store of the frozen part's activations as INT8 with `recipe` computes them.

    Keyed by the float store (every input of the float activations), the recipe, the calibration
    images (chosen from the train split, as compress chooses them) and the quantization code.
    """
    calibration = int8.calibration_frame(dataset, recipe.calibration_images)
    inputs = {"float_store": store.dir.name, "recipe": recipe.as_dict(),
              "calibration_sha256": sha256_json(sorted(calibration["sha256"])),
              "code_sha256": source_sha256((int8.quantize, int8.prepare, int8.shape_arithmetic_nodes,
                                            int8.calibration_frame, int8_store, quantize_frozen))}
    quantized = ViewStore(store.dir / f"int8-{sha256_json(inputs)[:16]}", np.float16, "INT8 activation")
    if not (quantized.dir / KEY_FILE).exists():
        write_json(quantized.dir / KEY_FILE, {"inputs": inputs})
    return quantized


def quantize_frozen(store: ViewStore, quantized: ViewStore, recipe: int8.Recipe, dataset: Dataset,
                    preprocessing: Preprocessing) -> Path:
    """The frozen part quantized with `recipe` and compress's calibration images, once per INT8 store."""
    path = quantized.dir / FROZEN_INT8_FILE
    if not path.exists():
        images = int8.calibration_images(dataset, recipe.calibration_images, preprocessing)
        with tempfile.TemporaryDirectory() as scratch, atomic_path(path) as partial:
            prepared = Path(scratch) / "prepared.onnx"
            int8.prepare(store.dir / FROZEN_FILE, prepared, Path(scratch))
            int8.quantize(prepared, partial, images, recipe)
        log.info("frozen part quantized (%s) -> %s", recipe.describe(len(images)), path)
    return path


def missing_views(store: ViewStore, dataset: Dataset, wanted: dict[str, int]) -> dict[str, set[int]]:
    """Per image sha256, the views of it the store lacks (`wanted[split]` views of each image in split)."""
    todo: dict[str, set[int]] = {}
    for split, n_views in wanted.items():
        for sha in dataset.split(split)["sha256"]:
            missing = {v for v in range(n_views) if not store.path(sha, v).exists()}
            if missing:
                todo.setdefault(sha, set()).update(missing)
    return todo


def float_views(n_views: int) -> dict[str, int]:
    """Float activations: every view of a train image; val and test as they are."""
    return {"train": n_views, "val": 1, "test": 1}


def store_views(store: ViewStore, model_path: Path, shape: tuple[int, ...], wanted: dict[str, int], dataset: Dataset,
                preprocessing: Preprocessing, desc: str, batch_size: int = 32, num_threads: int = 0,
                progress: Progress = no_progress) -> dict[str, np.ndarray]:
    """Per split in `wanted`, the activations `model_path` gives: train (N, views, C, H, W), others (N, C, H, W).

    Missing ones are computed first (one decode per image, every missing view of it), then all are read.
    """

    def decode(batch: pd.DataFrame) -> np.ndarray:
        return load_batch([dataset.image_path(p) for p in batch["path"]], preprocessing)

    todo = missing_views(store, dataset, wanted)
    if todo:
        session = open_session(model_path, num_threads)
        rows = dataset.manifest.drop_duplicates("sha256").set_index("sha256").loc[sorted(todo)].reset_index()
        batches = [rows.iloc[i : i + batch_size] for i in range(0, len(rows), batch_size)]
        began, count = time.perf_counter(), 0
        with progress(total=sum(len(v) for v in todo.values()), desc=desc, unit="view") as bar:
            for batch, images in decode_ahead(batches, decode):
                views = sorted(set().union(*(todo[sha] for sha in batch["sha256"])))
                for view in views:
                    out = session.run(["activation"], {"image": dihedral(images, view)})[0]
                    for row, sha in enumerate(batch["sha256"]):
                        if view in todo[sha]:
                            store.put(sha, view, out[row])
                            count += 1
                    bar.update(sum(view in todo[sha] for sha in batch["sha256"]))
        log.info("%s: %d computed (%.0f views/s) into %s", desc, count, count / (time.perf_counter() - began), store.dir)

    def load(sha: str, view: int) -> np.ndarray:
        array = store.get(sha, view, shape)
        if array is None:  # unreadable or misshapen: recompute this one entry
            image = decode(dataset.manifest[dataset.manifest["sha256"] == sha].head(1))
            array = open_session(model_path, num_threads).run(["activation"], {"image": dihedral(image, view)})[0][0]
            store.put(sha, view, array)
            array = array.astype(np.float16)
        return array

    return {
        split: np.stack([np.stack([load(sha, v) for v in range(n_views)]) for sha in dataset.split(split)["sha256"]])
        if split == "train" else np.stack([load(sha, 0) for sha in dataset.split(split)["sha256"]])
        for split, n_views in wanted.items()
    }


def cache_activations(entry: BackboneEntry, preprocessing: Preprocessing, trainable: int, n_views: int,
                      dataset: Dataset, cache_dir: Path, opset: int, atol: float, batch_size: int = 32,
                      num_threads: int = 0, progress: Progress = no_progress,
                      int8_recipe: int8.Recipe | None = None) -> dict[str, np.ndarray]:
    """Per split, float16 activations: train (N, views, C, H, W); val and test (N, C, H, W) of view 0.

    With `int8_recipe`, also `train_int8`: the train views through the frozen part quantized with it.
    """
    store, shape = prepare_store(entry, preprocessing, trainable, dataset, cache_dir, opset, atol)
    activations = store_views(store, store.dir / FROZEN_FILE, shape, float_views(n_views), dataset, preprocessing,
                              f"activations {entry.name}", batch_size, num_threads, progress)
    if int8_recipe is not None:
        quantized = int8_store(store, int8_recipe, dataset)
        model_path = quantize_frozen(store, quantized, int8_recipe, dataset, preprocessing)
        activations["train_int8"] = store_views(quantized, model_path, shape, {"train": n_views},
                                                dataset, preprocessing, f"INT8 activations {entry.name}", batch_size,
                                                num_threads, progress)["train"]
    return activations


def train_partial(cfg: PartialConfig, common: FinetuneConfig, entry: BackboneEntry, preprocessing: Preprocessing,
                  dataset: Dataset, cache_dir: Path, placement: Placement, resume_path: Path | None, fingerprint: str,
                  opset: int, atol: float, progress: Progress = no_progress, on_epoch: OnEpoch | None = None,
                  int8_recipe: int8.Recipe | None = None) -> Trained:
    """Train the last `cfg.blocks` blocks, the top and a new head on cached activations (distilled if a teacher is set).

    With `int8_recipe` (and `cfg.int8_views`), each epoch draws every train image's view from its float
    and its INT8 activations alike.
    """
    began = time.perf_counter()
    distilling = common.distill.teacher is not None
    if distilling:  # checked before any work: a wrong path fails in one line
        from components.training import distill

        teacher_path, teacher_checkpoint = distill.teacher_checkpoint(common.distill.teacher, dataset.labels)
    recipe = int8_recipe if cfg.int8_views else None
    activations = cache_activations(entry, preprocessing, cfg.blocks, cfg.views, dataset, cache_dir, opset, atol,
                                    progress=progress, int8_recipe=recipe)
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
    sources = [train_x] + ([torch.from_numpy(activations["train_int8"])] if recipe is not None else [])
    if distilling:  # teacher logits of the same (image, view) pairs as the activations, same row order
        teacher = distill.teacher_logits(teacher_path, teacher_checkpoint, dataset, n_views, cache_dir)
        teacher_train = torch.from_numpy(teacher.train)

    def batches(epoch: int, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(n_train, generator=generator)
        # One draw per image among its views of every source: 0..views-1 float, views..2*views-1 INT8.
        draws = torch.randint(0, n_views * len(sources), (n_train,), generator=generator)
        for index in order.split(cfg.batch_size):
            views, source = draws[index] % n_views, draws[index] // n_views
            target = labels["train"][index]
            if distilling:
                target = distill.pack_targets(target, teacher_train[index, views])
            batch = sources[0][index, views]
            for number in range(1, len(sources)):
                chosen = source == number
                batch[chosen] = sources[number][index[chosen], views[chosen]]
            yield batch.float(), target

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
            "int8_views": (recipe.describe(len(int8.calibration_frame(dataset, recipe.calibration_images)))
                           if recipe is not None else None),
            "activation_seconds": cached_seconds, "resumed_from_epoch": result.resumed_from,
            "stopped_early": result.stopped_early}
    if distilling:
        info["distill"] = {"teacher": str(teacher_path), "teacher_backbone": teacher_checkpoint["backbone"]["name"],
                           "teacher_val_accuracy": distill.teacher_accuracy(teacher, labels["val"]),
                           "teacher_pairs_computed": teacher.computed, "teacher_onnx_runs": teacher.teacher_runs,
                           "teacher_seconds": teacher.seconds}
    best = next(h for h in result.history if h["epoch"] == result.best_epoch)
    return Trained(model, head, result.history, best, time.perf_counter() - began, info)


def estimate_seconds(cfg: PartialConfig, entry: BackboneEntry, preprocessing: Preprocessing, dataset: Dataset,
                     cache_dir: Path, placement: Placement, opset: int, atol: float,
                     int8_recipe: int8.Recipe | None = None) -> float:
    """Missing activations at a measured rate, plus every epoch at a measured step time."""
    store, shape = prepare_store(entry, preprocessing, cfg.blocks, dataset, cache_dir, opset, atol)
    todo = [missing_views(store, dataset, float_views(cfg.views))]
    if int8_recipe is not None and cfg.int8_views:
        # INT8 views run about as fast as float ones on AVX2; calibration runs the calibration images once.
        quantized = int8_store(store, int8_recipe, dataset)
        todo.append(missing_views(quantized, dataset, {"train": cfg.views}))
        if not (quantized.dir / FROZEN_INT8_FILE).exists():
            todo.append({sha: {0} for sha in int8.calibration_frame(dataset, int8_recipe.calibration_images)["sha256"]})
    seconds = 0.0
    images, views = set().union(*todo), sum(len(v) for missing in todo for v in missing.values())
    if views:
        sample = dataset.manifest.head(8)
        began = time.perf_counter()
        batch = load_batch([dataset.image_path(p) for p in sample["path"]], preprocessing)
        decode_s = (time.perf_counter() - began) / len(sample)
        session = open_session(store.dir / FROZEN_FILE, 0)
        view_s = best_seconds(lambda: session.run(["activation"], {"image": batch})) / len(sample)
        seconds += len(images) * decode_s + views * view_s
    model = build_classifier(entry)
    tail = TrainedTail(model, cfg.blocks, nn.Linear(model.num_features, len(dataset.labels)), cfg.dropout)
    for parameter in tail.parameters():
        parameter.requires_grad_(True)
    batch = min(cfg.batch_size, max(len(dataset.split("train")), 2))
    step = step_seconds(tail, torch.zeros(batch, *shape), len(dataset.labels), placement)
    steps = -(-len(dataset.split("train")) // cfg.batch_size)
    evaluation = len(dataset.split("val")) / batch * step / 3  # forward only
    return seconds + cfg.epochs * (steps * step + evaluation)
