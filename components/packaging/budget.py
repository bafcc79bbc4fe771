"""The budget a compressed candidate must keep against the FP32 model, one rule for every place that asks.

A candidate is within it when every task keeps its val accuracy within `compress.max_accuracy_drop` of
FP32's, and its val answers agree with FP32's on at least `compress.min_agreement` of the images in the
task where they agree least. The mixed-precision search stops at the first candidate within it
(int8_search.py), and compress ships the most compressed one within it (compress.choose): both ask
`Budget.shortfalls`, so the search cannot stop at a candidate that compress would then refuse.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from components.data.manifest import Dataset
from components.models.onnx_io import predict_tasks

# k/n accuracies that meet the floor exactly must not fail on rounding.
TOLERANCE = 1e-9


def task_answers(model_path: Path, dataset: Dataset, split: str, batch_size: int = 32) -> dict[str, np.ndarray]:
    """Each of the model's tasks' answer (a class index) per `split` image, the primary first, from one pass."""
    frame = dataset.split(split)
    if frame.empty:
        raise ValueError(f"the dataset has no `{split}` rows to measure {model_path.name}'s accuracy on.")
    return {task.name: scores.argmax(axis=1) for task, scores in predict_tasks(model_path, dataset, frame, batch_size).items()}


def accuracies(answers: dict[str, np.ndarray], dataset: Dataset, split: str) -> dict[str, float]:
    """Each task's accuracy of `answers` (task_answers) on `split`."""
    views = {task: dataset.for_task(task) for task in answers}
    return {task: float(np.mean(given == np.asarray(views[task].label_index(views[task].split(split)))))
            for task, given in answers.items()}


def agreement(answers: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float:
    """The share of images on which `answers` match `reference`'s, in the task where they match least."""
    return min(float(np.mean(answers[task] == reference[task])) for task in reference)


def onnx_accuracy(model_path: Path, dataset: Dataset, split: str, batch_size: int = 32) -> float:
    """The primary task's accuracy on `split`."""
    return next(iter(accuracies(task_answers(model_path, dataset, split, batch_size), dataset, split).values()))


@dataclass(frozen=True)
class Budget:
    """FP32's val accuracy per task (the primary first) and how far a candidate may stray from FP32."""

    fp32: dict[str, float]
    max_drop: float
    min_agreement: float = 0.0

    def floor(self, task: str) -> float:
        return self.fp32[task] - self.max_drop

    def shortfalls(self, accuracy: dict[str, float], agrees: float = 1.0) -> list[str]:
        """Why a candidate with these val accuracies per task and this agreement with FP32 is over the budget;
        empty when it is within. The primary task's accuracy is written bare, the others after their names."""
        primary = next(iter(self.fp32))
        why = [f"{value:.4f}" if task == primary else f"{task} {value:.4f}"
               for task, value in accuracy.items() if value < self.floor(task) - TOLERANCE]
        if agrees < self.min_agreement - TOLERANCE:
            why.append(f"{agrees:.1%} agreement")
        return why

    def describe(self) -> str:
        primary, *others = self.fp32
        text = (f"val accuracy >= {self.floor(primary):.4f} "
                f"(fp32 {self.fp32[primary]:.4f} - compress.max_accuracy_drop {self.max_drop:g})")
        if others:
            text += f" on every task ({', '.join(f'{task} >= {self.floor(task):.4f}' for task in others)})"
        if self.min_agreement > 0:
            text += f", agreeing with fp32 on >= {self.min_agreement:.1%} of val answers (compress.min_agreement)"
        return text
