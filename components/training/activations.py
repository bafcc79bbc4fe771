"""Cached activations of a backbone's frozen part, per image and dihedral view, for `partial`.

The frozen part (stem and all but the last N blocks) is exported to ONNX, checked against torch,
and run once per image and view in ONNX Runtime; its float16 activations are cached by content
like features are (`<cache>/<backbone>/partial-<key>/<sha[:2]>/<sha>.<view>.npy`), so every epoch,
seed and later run trains on stored tensors. The key covers everything the features key covers,
the cut, and the source of the code that computes an activation (this module, the views, the
network parts), hashed whole.

INT8 twins: the frozen part quantized with compress's recipe and calibration images, and its
activations of the same views, cached beside the float ones (`int8-<key>/`), keyed by the float
store, the recipe, the calibration images and the quantization code. `ViewStore` also holds
distillation's teacher logits.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from components.core.code_version import source_sha256
from components.core.progress import Progress, no_progress
from components.core.result import atomic_path, sha256_json, write_json
from components.data import views
from components.data.domains import UNLABELLED, UNLABELLED_VAL
from components.data.manifest import Dataset
from components.data.preprocess import Preprocessing, load_batch
from components.data.views import dihedral
from components.features import extract as features
from components.features.extract import TrunkParityError, decode_ahead
from components.models import quantization as int8
from components.models import trunk_parts
from components.models.backbones import build_classifier
from components.models.int8_recipe import Recipe
from components.models.onnx_io import open_session
from components.models.registry import BackboneEntry
from components.models.trunk_parts import FrozenPart, check_layout

log = logging.getLogger(__name__)

FROZEN_FILE = "frozen.onnx"
FROZEN_INT8_FILE = "frozen_int8.onnx"
KEY_FILE = "cache_key.json"
SHAPE_FILE = "shape.json"


def activation_key_inputs(entry: BackboneEntry, preprocessing: Preprocessing, trainable: int, opset: int) -> dict:
    """What an activation depends on besides the image: the features key inputs, the cut, and the code that
    cuts the network, turns the image and stores the result (whole modules: a helper such as
    `trunk_parts.flat_blocks` changes the cut as surely as `FrozenPart` does)."""
    inputs = features.key_inputs(entry, preprocessing, (), opset)
    return inputs | {"trainable_blocks": trainable, "dtype": "float16",
                     "code_sha256": inputs["code_sha256"] | source_sha256((trunk_parts, views, sys.modules[__name__]))}


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


def int8_store(store: ViewStore, recipe: Recipe, dataset: Dataset) -> ViewStore:
    """Beside `store`, the store of the frozen part's activations as INT8 with `recipe` computes them.

    Keyed by the float store (every input of the float activations), the recipe, the calibration
    images (chosen from the train split, as compress chooses them) and the quantization code.
    """
    calibration = int8.calibration_frame(dataset, recipe.calibration_images)
    inputs = {"float_store": store.dir.name, "recipe": recipe.as_dict(),
              "calibration_sha256": sha256_json(sorted(calibration["sha256"])),
              "code_sha256": source_sha256((int8, sys.modules[__name__]))}
    quantized = ViewStore(store.dir / f"int8-{sha256_json(inputs)[:16]}", np.float16, "INT8 activation")
    if not (quantized.dir / KEY_FILE).exists():
        write_json(quantized.dir / KEY_FILE, {"inputs": inputs})
    return quantized


def quantize_frozen(store: ViewStore, quantized: ViewStore, recipe: Recipe, dataset: Dataset,
                    preprocessing: Preprocessing) -> Path:
    """The frozen part quantized with `recipe` and compress's calibration images, once per INT8 store."""
    path = quantized.dir / FROZEN_INT8_FILE
    if not path.exists():
        images = int8.calibration_images(dataset, recipe.calibration_images, preprocessing, recipe.calibration_views)
        with tempfile.TemporaryDirectory() as scratch, atomic_path(path) as partial:
            prepared = Path(scratch) / "prepared.onnx"
            int8.prepare(store.dir / FROZEN_FILE, prepared, Path(scratch))
            int8.quantize(prepared, partial, images, recipe)
        log.info("frozen part quantized (%s) -> %s", recipe.describe(len(images) // recipe.calibration_views), path)
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


VIEWED_SPLITS = ("train", UNLABELLED)  # splits trained on: every view of each image


def float_views(n_views: int, adapting: bool = False) -> dict[str, int]:
    """Float activations: every view of a train image; val and test as they are. Adapting to a target domain,
    also every view of its unlabelled train images and its unlabelled val images as they are."""
    return {"train": n_views, "val": 1, "test": 1} | ({UNLABELLED: n_views, UNLABELLED_VAL: 1} if adapting else {})


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
        if split in VIEWED_SPLITS else np.stack([load(sha, 0) for sha in dataset.split(split)["sha256"]])
        for split, n_views in wanted.items()
    }


def cache_activations(entry: BackboneEntry, preprocessing: Preprocessing, trainable: int, n_views: int,
                      dataset: Dataset, cache_dir: Path, opset: int, atol: float, batch_size: int = 32,
                      num_threads: int = 0, progress: Progress = no_progress,
                      int8_recipe: Recipe | None = None, adapting: bool = False) -> dict[str, np.ndarray]:
    """Per split, float16 activations: train (N, views, C, H, W); val and test (N, C, H, W) of view 0.

    With `int8_recipe`, also `train_int8`: the train views through the frozen part quantized with it.
    `adapting`: also the unlabelled target splits (`unlabelled` with its views, `unlabelled_val` as is).
    """
    store, shape = prepare_store(entry, preprocessing, trainable, dataset, cache_dir, opset, atol)
    activations = store_views(store, store.dir / FROZEN_FILE, shape, float_views(n_views, adapting), dataset, preprocessing,
                              f"activations {entry.name}", batch_size, num_threads, progress)
    if int8_recipe is not None:
        quantized = int8_store(store, int8_recipe, dataset)
        model_path = quantize_frozen(store, quantized, int8_recipe, dataset, preprocessing)
        activations["train_int8"] = store_views(quantized, model_path, shape, {"train": n_views},
                                                dataset, preprocessing, f"INT8 activations {entry.name}", batch_size,
                                                num_threads, progress)["train"]
    return activations


