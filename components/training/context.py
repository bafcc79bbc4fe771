"""What a fine-tuning strategy is handed (`Context`) and what it hands the finetune stage (`Strategy`).

Resolved once per finetune run (the backbone entry, the features' record and preprocessing, the
device and precision), so a strategy reads what it needs and nothing is looked up twice.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from components.core import devices
from components.core.config import StageConfig
from components.core.progress import Progress
from components.core.result import sha256_file, sha256_json
from components.data.manifest import Dataset
from components.data.tokenization import preprocessing_for
from components.features.cache import read_record
from components.models.registry import get_entry
from components.training.config import FinetuneConfig
from components.training.loop import OnEpoch, Trained
from components.training.replicas import SINGLE, Replicas
from components.training.tasks import TaskSet, resolve

if TYPE_CHECKING:
    from components.models.int8_recipe import Recipe
    from components.training.cost import Cost


class Context:
    """What every strategy needs, resolved once."""

    def __init__(self, cfg: FinetuneConfig, backbone: str, features_dir: Path, dataset: Dataset, cache_dir: Path,
                 state_dir: Path, opset: int, atol: float, progress: Progress, on_epoch: OnEpoch | None = None,
                 int8_recipe: Recipe | None = None, orders: Mapping[str, Sequence[str]] | None = None,
                 replicas: Replicas = SINGLE, values: Mapping[str, str] | None = None):
        self.int8_recipe = int8_recipe
        self.replicas = replicas  # the processes training together (one, unless components/training/ddp.py started more)
        # Checked before anything is computed: an unknown column or an undeclared order fails in one line.
        self.orders = {task: list(order) for task, order in (orders or {}).items()}  # ddp's processes resolve alike
        self.values = dict(values or {})  # the value columns the source declares (soft labels' `auto`)
        self.tasks = TaskSet(resolve(cfg, dataset, self.orders, cfg.soft_plan(self.values)), cfg, dataset)
        self.cfg, self.dataset, self.features_dir, self.cache_dir, self.state_dir = cfg, dataset, features_dir, cache_dir, state_dir
        self.entry = get_entry(backbone)
        self.record = read_record(features_dir, backbone)
        # An image backbone's Preprocessing, or a text encoder's Tokenization.
        self.preprocessing = preprocessing_for(self.record["entry"], self.record["preprocessing"])
        self.opset, self.atol, self.progress, self.on_epoch = opset, atol, progress, on_epoch
        self.placement = devices.resolve(cfg.device, cfg.precision)

    def teacher_sha256(self) -> str | None:
        """The distillation teacher's content: a teacher retrained at the same path must not resume old state."""
        teacher = self.cfg.distill.teacher
        return sha256_file(Path(teacher)) if teacher and Path(teacher).is_file() else None

    def resume(self, strategy: str, block: StageConfig) -> tuple[Path, str]:
        """Where a strategy keeps its per-epoch state, and the fingerprint a saved state must match."""
        tasks = {} if self.tasks.single else {  # keyed only when set, so today's resume files stay valid
            "tasks": self.tasks.describe(), "task_weights": self.cfg.model_dump(mode="json")["task_weights"],
            "task_data": self.dataset.manifest[list(self.cfg.tasks)].astype(str).to_dict("list")}
        columns = sorted({task.values for task in self.tasks.tasks if task.values})
        if any(task.soft for task in self.tasks.tasks):  # keyed only when used, as above
            tasks |= {"tasks": self.tasks.describe(), "sharpness": self.cfg.soft_labels.sharpness,
                      "soft_values": self.dataset.manifest[columns].astype(str).to_dict("list")}
        fingerprint = sha256_json({**tasks, "strategy": strategy, "config": block.model_dump(mode="json"),
                                   "common": self.cfg.model_dump(mode="json", include={"class_weights", "label_smoothing", "seed", "distill",
                                                                                      "adapt"}),
                                   "backbone": self.entry.describe(), "features": self.record["cache_key"],
                                   "data": self.dataset.manifest[["sha256", "label", "split"]].to_dict("list"),
                                   "placement": self.placement.describe(),
                                   "int8": self.int8_recipe.as_dict() if self.int8_recipe and strategy == "partial" else None,
                                   "teacher_sha256": self.teacher_sha256() if strategy == "partial" else None})
        return self.state_dir / f"{strategy}-{fingerprint[:16]}.pt", fingerprint




@dataclass(frozen=True)
class Strategy:
    """One way to fine-tune (a module in `components/training/strategies/`), as the finetune stage sees it."""

    name: str
    train: Callable[[Context], Trained]
    # Its cost before it runs, counted (components/training/cost.py), for `auto`'s budget.
    cost: Callable[[Context], Cost]
    # How many dihedral views of each image the model saw in training; export's test-time averaging uses no more.
    train_views: Callable[[FinetuneConfig], int]
    # What the negative-transfer guard suggests when this strategy does not beat the pixel reference.
    next_step: str
    adapts: bool = False  # trains with finetune.adapt (an unlabelled target domain); auto skips those that do not
