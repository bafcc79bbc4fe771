"""Knowledge distillation: a larger fine-tuned teacher's logits guide the shipped student's training.

The teacher is a `model.pt` from an earlier finetune run (e.g. Lite2, partial). It runs once per
(image, view), exported to ONNX and in ONNX Runtime, on its *own* preprocessing (from its
checkpoint: size, mean/std, interpolation), with the same dihedral view the student's partial
strategy draws (`components.data.views.dihedral`, applied to the teacher's preprocessed input). Its
logits are cached by content: `<cache>/distill/<key>/<sha[:2]>/<image sha256>.<view>.npy`, the
key hashing the teacher checkpoint's sha256 (weights, head, preprocessing and labels are all in
that file), the opset and this code. The student's preprocessing is not in the key: the teacher
never sees it. So the student's epochs, seeds and later runs never re-run the teacher.

Loss (Hinton et al. 2015): (1 - alpha) * CE(student, label; label smoothing, class weights)
+ alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from components.core.code_version import source_sha256
from components.core.errors import UserError
from components.core.result import atomic_path, sha256_file, sha256_json, write_json
from components.data.manifest import Dataset
from components.data.preprocess import Preprocessing, load_batch
from components.data.views import dihedral
from components.models.classifier import build_model, load_checkpoint
from components.models.onnx_io import open_session
from components.training.activations import ViewStore

log = logging.getLogger(__name__)

TEACHER_FILE = "teacher.onnx"
KEY_FILE = "cache_key.json"


class TeacherError(UserError):
    """A teacher checkpoint that is missing, unreadable or labelled otherwise than the student's data."""


def teacher_checkpoint(path: str | Path, labels: tuple[str, ...] | list[str]) -> tuple[Path, dict]:
    """The teacher's checkpoint, checked: it exists, reads, and predicts the student's labels in the same order."""
    path = Path(path)
    if not path.is_file():
        raise TeacherError(f"finetune.distill.teacher: {path} not found; point it at the model.pt of an earlier "
                           f"finetune run (e.g. outputs/finetune/model.pt of a Lite2 run) or set it to null.")
    try:
        checkpoint = load_checkpoint(path)
    except UserError as error:
        raise TeacherError(f"finetune.distill.teacher: {error}") from None
    if list(checkpoint["labels"]) != list(labels):
        raise TeacherError(f"finetune.distill.teacher: {path} predicts {list(checkpoint['labels'])}, the student's data "
                           f"has {list(labels)}; use a teacher trained on the same labels.")
    return path, checkpoint


@dataclass
class TeacherLogits:
    train: np.ndarray  # (N, views, classes), rows in dataset.split("train") order
    val: np.ndarray  # (N, classes), view 0
    computed: int  # (image, view) pairs the teacher ran on in this call
    teacher_runs: int  # ONNX Runtime session.run calls in this call
    seconds: float


def prepare_store(checkpoint_path: Path, checkpoint: dict, cache_dir: Path, opset: int = 17) -> ViewStore:
    """The store for this teacher, with its ONNX export written once."""
    digest = sha256_file(checkpoint_path)
    inputs = {"teacher_checkpoint_sha256": digest, "opset": opset,
              "code_sha256": source_sha256((dihedral, teacher_logits))}
    store = ViewStore(cache_dir / "distill" / sha256_json(inputs)[:20], np.float32, "teacher logits")
    if not (store.dir / KEY_FILE).exists():
        write_json(store.dir / KEY_FILE, {"inputs": inputs})
    if not (store.dir / TEACHER_FILE).exists():
        from components.models.onnx_export import export_onnx

        size = Preprocessing.of(checkpoint["preprocessing"]).input_size
        with atomic_path(store.dir / TEACHER_FILE) as partial:
            export_onnx(build_model(checkpoint), partial, {}, size, opset)
    return store


def teacher_logits(checkpoint_path: Path, checkpoint: dict, dataset: Dataset, n_views: int, cache_dir: Path,
                   batch_size: int = 32, num_threads: int = 0) -> TeacherLogits:
    """Teacher logits for every train image and view < n_views, and view 0 of every val image; cached."""
    began = time.perf_counter()
    store = prepare_store(checkpoint_path, checkpoint, cache_dir)
    preprocessing = Preprocessing.of(checkpoint["preprocessing"])  # the teacher's own, not the student's
    n_classes = len(checkpoint["labels"])
    frames = {"train": dataset.split("train"), "val": dataset.split("val")}
    views = {"train": range(n_views), "val": range(1)}
    todo: dict[str, set[int]] = {}
    for split, frame in frames.items():
        for sha in frame["sha256"]:
            missing = {v for v in views[split] if store.get(sha, v, (n_classes,)) is None}
            if missing:
                todo.setdefault(sha, set()).update(missing)
    computed = runs = 0
    if todo:
        session = open_session(store.dir / TEACHER_FILE, num_threads)
        rows = dataset.manifest.drop_duplicates("sha256").set_index("sha256").loc[sorted(todo)].reset_index()
        for start in range(0, len(rows), batch_size):
            batch: pd.DataFrame = rows.iloc[start : start + batch_size]
            images = load_batch([dataset.image_path(p) for p in batch["path"]], preprocessing)
            for view in sorted(set().union(*(todo[sha] for sha in batch["sha256"]))):
                logits = session.run(None, {session.get_inputs()[0].name: dihedral(images, view)})[0]
                runs += 1
                for row, sha in enumerate(batch["sha256"]):
                    if view in todo[sha]:
                        store.put(sha, view, logits[row])
                        computed += 1
        log.info("teacher logits: %d (image, view) pairs computed in %d ONNX Runtime runs into %s", computed, runs,
                 store.dir)

    def load(sha: str, view: int) -> np.ndarray:
        array = store.get(sha, view, (n_classes,))
        if array is None:  # written above, so only a concurrent deletion gets here
            raise RuntimeError(f"{store.path(sha, view)}: teacher logits vanished from the cache while reading it.")
        return array

    train = np.stack([np.stack([load(sha, v) for v in views["train"]]) for sha in frames["train"]["sha256"]])
    val = np.stack([load(sha, 0) for sha in frames["val"]["sha256"]])
    return TeacherLogits(train, val, computed, runs, time.perf_counter() - began)


def teacher_accuracy(logits: TeacherLogits, labels: torch.Tensor) -> float:
    """The teacher's own val accuracy on view 0, reported beside the student's."""
    return float((torch.from_numpy(logits.val).argmax(1) == labels).float().mean())


def pack_targets(labels: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """(B,) labels and (B, C) teacher logits as one (B, 1 + C) float tensor: the shared loop moves one target."""
    return torch.cat([labels.float().unsqueeze(1), teacher.float()], dim=1)


def kd_loss(alpha: float, temperature: float, class_weight: torch.Tensor | None = None,
            label_smoothing: float = 0.0) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """loss(student_logits, packed_targets) with targets from `pack_targets`."""
    cross_entropy = nn.CrossEntropyLoss(weight=class_weight, label_smoothing=label_smoothing)

    def loss(student: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        labels, teacher = targets[:, 0].long(), targets[:, 1:]
        student = student.float()
        hard = cross_entropy(student, labels)
        if alpha == 0:
            return hard
        soft = nn.functional.kl_div(nn.functional.log_softmax(student / temperature, dim=1),
                                    nn.functional.log_softmax(teacher / temperature, dim=1),
                                    reduction="batchmean", log_target=True)
        return (1 - alpha) * hard + alpha * temperature**2 * soft

    return loss
