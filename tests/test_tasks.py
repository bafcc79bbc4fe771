"""Several tasks from one trunk: heads (ordinal, regress), task checks, and a two-task model through export,
compress and evaluate on real ELPV cells at 64 px."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from components.data.config import IngestConfig
from components.data.ingest import declared_orders, declared_values
from components.data.ingest import run as ingest_run
from components.data.manifest import read_manifest, write_manifest
from components.data.preprocess import Preprocessing
from components.evaluation import evaluate
from components.evaluation.config import EvaluateConfig
from components.features import extract as features
from components.features.config import FeaturesConfig
from components.models.classifier import ViewAverage, build_model, load_checkpoint
from components.models.heads import CornHead, RegressHead, TaskHeads, build_head, head_spec
from components.models.onnx_io import model_tasks, open_session, predict_tasks, read_metadata, softmax
from components.packaging import compress, export
from components.packaging.budget import Budget
from components.packaging.config import CompressConfig, ExportConfig
from components.serving.pyfunc import log_model
from components.training.config import FinetuneConfig
from components.training.finetune import run as finetune
from components.training.tasks import (
    TaskError,
    TaskSet,
    bounds,
    choose_thresholds,
    class_of,
    resolve,
    soft_ordinal_loss,
    soft_targets,
)
from tests.conftest import venv_env
from tests.test_serve import service
from tests.tiny_model import make_dataset

REPO = Path(__file__).resolve().parents[1]
BACKBONE = "efficientnet_lite0"
FAST = {"partial": {"epochs": 2, "batch_size": 16, "views": 2, "blocks": 2},
        "full": {"epochs": 1, "batch_size": 16, "workers": 0}, "linear": {"taps": ["pooled"]}}
FOUR = ("p000", "p033", "p067", "p100")


class FourClassCells:
    """120 real ELPV cells in four classes (their defect probability) with their cell type, features at 64 px."""

    def __init__(self, root: Path):
        ingest_run(IngestConfig(limit=120, seed=7, label_mode="four_class"), root / "data")
        self.manifest = root / "data" / "manifest.csv"
        self.dataset = read_manifest(self.manifest)
        self.features, self.cache = root / "features", root / "cache"
        features.run(FeaturesConfig(image_size=64, taps=("pooled",)), (BACKBONE,), self.dataset, self.cache, self.features)
        self.orders = declared_orders(IngestConfig(label_mode="four_class"))

    def train(self, out: Path, **settings: object):
        cfg = FinetuneConfig.model_validate({**FAST, **settings})
        return finetune(cfg, BACKBONE, self.features, self.dataset, self.manifest, out / "finetune", self.cache,
                        out / "state", orders=self.orders)


@pytest.fixture(scope="module")
def cells(tmp_path_factory: pytest.TempPathFactory) -> FourClassCells:
    return FourClassCells(tmp_path_factory.mktemp("four"))


def test_a_two_task_model_has_one_output_per_task_and_onnx_matches_torch_on_each(cells: FourClassCells, tmp_path: Path) -> None:
    trained = cells.train(tmp_path, strategy="partial", tasks=["label", "cell_type"], head="ordinal")
    checkpoint = load_checkpoint(trained.artifacts["checkpoint"])
    assert [t["name"] for t in checkpoint["tasks"]] == ["label", "cell_type"]
    assert checkpoint["head_spec"]["kind"] == "tasks" and checkpoint["labels"] == list(FOUR)
    assert trained.metrics["val_accuracy"] == trained.metrics["val_accuracy.label"]
    # The cell-type figure is what the kept weights score on val, one view per image, recomputed in torch.
    val = cells.dataset.split("val")
    with torch.no_grad():
        cell_type = build_model(checkpoint)(torch.from_numpy(export.parity_images(
            cells.dataset, len(val), Preprocessing.of(checkpoint["preprocessing"]))))[1].argmax(1).numpy()
    expected = np.mean(np.array(["mono", "poly"])[cell_type] == export.held_out(cells.dataset, len(val))["cell_type"])
    assert trained.metrics["val_accuracy.cell_type"] == pytest.approx(expected)

    exported = export.run(ExportConfig(parity_images=4, tta_views=2), 0.0, trained.artifacts["checkpoint"], cells.dataset,
                          tmp_path / "export", features_dir=cells.features)
    path = exported.artifacts["fp32"]
    session = open_session(path)
    assert [o.name for o in session.get_outputs()] == ["label", "cell_type"]
    tasks = model_tasks(path, read_metadata(path))
    assert [(t.name, t.kind, t.labels, t.order) for t in tasks] == [
        ("label", "ordinal", FOUR, FOUR), ("cell_type", "classify", ("mono", "poly"), None)]
    # Each output, per task, is what the torch model computes (averaged over the 2 views export asked for).
    images = export.parity_images(cells.dataset, 6, Preprocessing.of(checkpoint["preprocessing"]))
    with torch.no_grad():
        expected = ViewAverage(build_model(checkpoint), 2)(torch.from_numpy(images))
    actual = session.run(None, {"image": images})
    assert len(actual) == len(expected) == 2
    for got, want in zip(actual, expected):
        assert got.shape == tuple(want.shape)
        assert np.abs(got - want.numpy()).max() < 1e-4
    with torch.no_grad():  # the ordinal output of one view: log class probabilities (views average in log space)
        assert torch.allclose(build_model(checkpoint)(torch.from_numpy(images))[0].exp().sum(dim=1), torch.ones(6), atol=1e-5)

    # compress counts every task in its budget; evaluate scores each against its own column.
    compressed = compress.run(CompressConfig(calibration_images=16, latency_runs=1), tmp_path / "export", cells.dataset,
                              tmp_path / "compress")
    assert "on every task (cell_type >=" in compressed.info["reason"]
    report = json.loads((tmp_path / "compress" / compress.REPORT_FILE).read_text())
    assert set(report["candidates"]["int8"]["val_accuracy_tasks"]) == {"label", "cell_type"}
    scored = evaluate.run(EvaluateConfig(), tmp_path / "compress" / compress.SHIPPED_FILE, cells.dataset, tmp_path / "evaluate")
    assert scored.metrics["accuracy"] == scored.metrics["task.label.accuracy"]
    test = cells.dataset.split("test")
    predicted = pd.read_csv(tmp_path / "evaluate" / "tasks" / "cell_type.predictions.csv")
    assert list(predicted["actual"]) == list(test["cell_type"])
    assert scored.metrics["task.cell_type.accuracy"] == pytest.approx((predicted["actual"] == predicted["predicted"]).mean())
    for name in ("label", "cell_type"):
        assert (tmp_path / "evaluate" / "tasks" / f"{name}.confusion_matrix.png").stat().st_size > 0
        assert (tmp_path / "evaluate" / "tasks" / f"{name}.reliability.png").stat().st_size > 0

    # The service and the registered pyfunc answer every task per image, as ONNX Runtime scores the shipped file.
    shipped = tmp_path / "compress" / compress.SHIPPED_FILE
    rows = test.head(5)
    expected = {task.name: softmax(scores.astype(np.float64))
                for task, scores in predict_tasks(shipped, cells.dataset, rows).items()}
    files = [cells.dataset.image_path(p) for p in rows["path"]]
    with service(model_uri=str(shipped)) as (client, _):
        answer = client.post("/predict", files=[("f", (f.name, f.read_bytes(), "image/png")) for f in files])
    assert answer.status_code == 200, answer.text
    predictions = answer.json()["predictions"]
    for name, labels in (("label", FOUR), ("cell_type", ("mono", "poly"))):
        served = np.array([[p["tasks"][name]["probabilities"][label] for label in labels] for p in predictions])
        np.testing.assert_allclose(served, expected[name], atol=1e-4)
        assert [p["tasks"][name]["label"] for p in predictions] == [labels[int(r.argmax())] for r in expected[name]]
    assert [p["label"] for p in predictions] == [p["tasks"]["label"]["label"] for p in predictions]  # the primary task
    mlflow.set_experiment("two-task-serving")
    with mlflow.start_run():
        info = log_model(shipped, "tlops-two-tasks-test")
    frame = mlflow.pyfunc.load_model(info.model_uri).predict(
        pd.DataFrame({"image": [base64.b64encode(f.read_bytes()).decode() for f in files]}))
    assert list(frame.columns) == ["label", "probabilities", "cell_type", "cell_type_probabilities"]
    assert list(frame["cell_type"]) == [p["tasks"]["cell_type"]["label"] for p in predictions]
    assert list(frame["label"]) == [p["label"] for p in predictions]


@pytest.mark.parametrize("strategy", ["linear", "full"])
def test_every_strategy_trains_a_head_per_task(cells: FourClassCells, tmp_path: Path, strategy: str) -> None:
    trained = cells.train(tmp_path, strategy=strategy, tasks=["label", "cell_type", "defect_probability"],
                          head={"label": "ordinal", "defect_probability": "regress"})
    checkpoint = load_checkpoint(trained.artifacts["checkpoint"])
    kinds = [task["head"]["kind"] for task in checkpoint["head_spec"]["tasks"]]
    assert kinds == ["corn", "linear", "regress"]
    regress = next(t for t in checkpoint["tasks"] if t["name"] == "defect_probability")
    # A numeric column is ordered by value; its thresholds were chosen on val and travel with the model.
    assert regress["order"] == sorted(regress["labels"], key=float) and len(regress["thresholds"]) == 3
    assert {f"val_accuracy.{t}" for t in ("label", "cell_type", "defect_probability")} <= set(trained.metrics)


@pytest.mark.parametrize("strategy", ["partial", "full"])
def test_a_regress_head_is_kept_by_its_val_accuracy_at_thresholds_chosen_on_val(cells: FourClassCells, tmp_path: Path,
                                                                               strategy: str) -> None:
    # Early stopping reads each epoch's accuracy at the thresholds the kept model will have, not at the targets'
    # midpoints; so the kept epoch's figure is the final model's calibrated val accuracy (fp32: the same values).
    trained = cells.train(tmp_path, strategy=strategy, head="regress", precision="fp32",
                          partial={**FAST["partial"], "epochs": 3}, full={**FAST["full"], "epochs": 2})
    calibration = json.loads(trained.artifacts["report"].read_text())["info"]["calibration"]["label"]
    assert trained.metrics["val_accuracy"] == pytest.approx(calibration["val_accuracy"], abs=1e-6)


def test_one_classify_task_is_todays_model(cells: FourClassCells, tmp_path: Path) -> None:
    trained = cells.train(tmp_path, strategy="linear")
    checkpoint = load_checkpoint(trained.artifacts["checkpoint"])
    assert "tasks" not in checkpoint and checkpoint["head_spec"]["kind"] == "linear"
    exported = export.run(ExportConfig(parity_images=4), 0.0, trained.artifacts["checkpoint"], cells.dataset,
                          tmp_path / "export", features_dir=cells.features)
    assert [o.name for o in open_session(exported.artifacts["fp32"]).get_outputs()] == ["logits"]
    assert "tasks" not in read_metadata(exported.artifacts["fp32"])


def test_the_ordinal_head_is_rank_consistent_and_its_loss_is_corns() -> None:
    torch.manual_seed(0)
    ranks = [2, 0, 3, 1]  # labels in output order stand at these places of the declared order
    head = CornHead(6, ranks)
    nn.init.normal_(head.linear.weight, std=3.0)
    features = torch.randn(200, 6) * 3
    with torch.no_grad():
        exceed = head.exceedance(features)  # P(y > k), declared order
        log_p = head(features)
    # Rank consistency: P(y > k) never rises with k, so thresholding it at any t gives a rank that only falls as t rises.
    assert (exceed[:, 1:] <= exceed[:, :-1] + 1e-7).all()
    thresholds = torch.linspace(0.01, 0.99, 50)
    predicted = torch.stack([(exceed > t).sum(dim=1) for t in thresholds], dim=1)
    assert (predicted[:, 1:] <= predicted[:, :-1]).all() and predicted.min() == 0 and predicted.max() == 3
    # The output: log class probabilities in label order, from the chain rule.
    ordered = torch.cat([1 - exceed[:, :1], exceed[:, :-1] - exceed[:, 1:], exceed[:, -1:]], dim=1)
    assert torch.allclose(log_p.exp(), ordered[:, ranks], atol=1e-5)
    # CORN's loss (the binary cross-entropies of the conditional subsets, summed) is -log P(y): plain CE trains it.
    labels = torch.randint(0, 4, (200,))
    rank = torch.as_tensor(ranks)[labels]
    logits = head.linear(features)
    corn = sum(nn.functional.binary_cross_entropy_with_logits(logits[rank >= k, k], (rank[rank >= k] > k).float(),
                                                              reduction="sum") for k in range(3))
    assert torch.allclose(corn, nn.functional.cross_entropy(head(features), labels, reduction="sum"), rtol=1e-4)


def test_a_regress_head_decides_by_its_thresholds_chosen_on_val() -> None:
    targets, ranks = [0.0, 1 / 3, 2 / 3, 1.0], [0, 1, 2, 3]
    thresholds = [0.2, 0.45, 0.8]
    lower, upper = bounds(thresholds, targets, ranks)
    head = RegressHead(1, targets, lower, upper, scale=20).eval()
    with torch.no_grad():
        head.linear.weight.fill_(1.0)
        head.linear.bias.zero_()
        values = torch.linspace(-0.5, 1.5, 400)[:, None]  # none on a threshold (float32 rounding would decide there)
        scores = head(values)
    assert torch.equal(scores.argmax(dim=1), torch.as_tensor(class_of(values[:, 0].numpy(), np.asarray(thresholds))))
    assert set(scores.argmax(dim=1).tolist()) == {0, 1, 2, 3}
    assert head.train()(values).shape == (400, 1)  # in training, the value itself (what the loss reads)
    # Chosen on val: where classes overlap the targets' midpoints, the thresholds move to what classifies best.
    rng = np.random.default_rng(0)
    true = rng.integers(0, 4, 400)
    observed = np.asarray([0.0, 0.25, 0.32, 1.0])[true] + rng.normal(0, 0.01, 400)  # class 2 sits below the 0.5 midpoint
    start = [1 / 6, 0.5, 5 / 6]
    chosen = choose_thresholds(observed, true, start)
    assert (class_of(observed, chosen) == true).mean() > (class_of(observed, np.asarray(start)) == true).mean() + 0.1
    assert list(chosen) == sorted(chosen)


def test_heads_round_trip_through_their_spec() -> None:
    torch.manual_seed(1)
    heads = TaskHeads({"a": CornHead(5, [0, 1, 2]), "b": nn.Linear(5, 2),
                       "c": RegressHead(5, [0.0, 1.0], *bounds([0.4], [0.0, 1.0], [0, 1]))}, uncertainty=True).eval()
    rebuilt = build_head(head_spec(heads), heads.state_dict())
    features = torch.randn(7, 5)
    for got, want in zip(rebuilt(features), heads(features)):
        assert torch.equal(got, want)


def test_soft_ordinal_labels_weigh_each_class_by_its_distance_from_the_value() -> None:
    ranks = torch.tensor([0.0, 1.0, 2.0, 3.0])  # ELPV's four levels in output order
    spread = soft_targets(ranks, ranks, 2.0)
    assert torch.allclose(spread.sum(dim=1), torch.ones(4)) and torch.equal(spread.argmax(dim=1), torch.arange(4))
    # A neighbour gets exp(-sharpness) of the class's own share, a class two off exp(-4 sharpness); one-hot: nothing.
    assert spread[1, 0] == pytest.approx(spread[1, 2].item()) and spread[1, 2] > spread[1, 3] > 0
    assert (spread[1, 0] / spread[1, 1]).item() == pytest.approx(np.exp(-2.0)) and spread[1, 3] / spread[1, 1] < 1e-3
    # Binary from a probability p: classes (defective, functional) rank 1 and 0, so P(defective) = sigmoid(s (2p - 1)).
    probability = torch.tensor([0.0, 1 / 3, 2 / 3, 1.0])
    binary = soft_targets(probability, torch.tensor([1.0, 0.0]), 3.0)
    assert torch.allclose(binary[:, 0], torch.sigmoid(3.0 * (2 * probability - 1)), atol=1e-6)
    # The loss: cross-entropy against those distributions, each class's term weighed by its class weight.
    torch.manual_seed(0)
    logits, places, weight = torch.randn(8, 4), ranks[torch.randint(0, 4, (8,))], torch.tensor([0.5, 2.0, 3.0, 0.7])
    expected = -(weight * soft_targets(places, ranks, 2.0) * logits.log_softmax(dim=1)).sum(dim=1).mean()
    assert torch.allclose(soft_ordinal_loss([0, 1, 2, 3], 2.0, weight)(logits, places), expected)


@pytest.fixture()
def tiny(tmp_path: Path):
    return make_dataset(tmp_path / "data")  # labels defective/functional, cell_type mono/poly, 2 of each per split


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"tasks": ["label", "colour"]}, r"finetune.tasks: 'colour' is not a column of the manifest"),
        ({"tasks": ["label", "one"]}, r"column 'one' holds one class only \('x'\)"),
        ({"tasks": ["cell_type"], "head": "ordinal"},
         r"finetune.head: ordinal for task 'cell_type' needs the order of its classes \['mono', 'poly'\].*finetune.orders.cell_type"),
        ({"tasks": ["label"], "head": "regress", "orders": {"label": ["functional", "broken"]}},
         r"finetune.orders.label: \['functional', 'broken'\] does not list exactly"),
    ],
)
def test_bad_tasks_are_refused_in_one_line(tiny, settings: dict, message: str) -> None:
    dataset = tiny.__class__(tiny.manifest.assign(one="x"), tiny.root, tiny.labels)
    with pytest.raises(TaskError, match=message) as refused:
        resolve(FinetuneConfig.model_validate(settings), dataset, settings.get("orders", {}))
    assert "\n" not in str(refused.value)


def test_soft_labels_train_on_each_images_value_and_weigh_classes_by_their_labels(tiny) -> None:
    probability = [1.0 if i % 4 == 0 else 2 / 3 if i % 2 == 0 else 1 / 3 if i % 4 == 1 else 0.0 for i in range(12)]
    dataset = tiny.__class__(tiny.manifest.assign(probability=probability), tiny.root, tiny.labels)
    orders = {"label": ["functional", "defective"]}
    train = dataset.split("train")
    cfg = FinetuneConfig()  # soft_labels.tasks: auto, and the source declares the column (as ELPV binary does)
    assert cfg.soft_plan({}) == {} and cfg.soft_plan({"label": "probability"}) == {"label": "probability"}
    for off in ({"strategy": "linear"}, {"soft_labels": {"tasks": []}}, {"head": "ordinal"}):
        assert FinetuneConfig.model_validate(off).soft_plan({"label": "probability"}) == {}
    one = TaskSet(resolve(cfg, dataset, orders, cfg.soft_plan({"label": "probability"})), cfg, dataset)
    assert one.tasks[0].soft and one.tasks[0].ranks == [1, 0]  # output order: defective, functional
    # Each image's own value placed between the classes' (0 and 1 here, so the value itself), not 1 and 0.
    assert one.train_targets().tolist() == pytest.approx(train["probability"].tolist())
    assert one.targets("train").tolist() == dataset.label_index(train)  # class weights still count classes
    cfg = FinetuneConfig.model_validate({"tasks": ["label", "cell_type"], "soft_labels": {"tasks": ["label"]}})
    two = TaskSet(resolve(cfg, dataset, orders), cfg, dataset)
    drawn = two.train_targets()  # without a values column: the class's rank; the other task keeps its index
    assert drawn[:, 0].tolist() == [1.0 if label == "defective" else 0.0 for label in train["label"]]
    assert drawn[:, 1].tolist() == two.targets("train")[:, 1].tolist()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"tasks": ["label", "cell_type"], "soft_labels": {"tasks": ["cell_type"]}},
         r"finetune.soft_labels for task 'cell_type' needs the order of its classes \['mono', 'poly'\]"),
        ({"soft_labels": {"tasks": ["label"], "values": {"label": "probabilty"}}},
         r"finetune.soft_labels.values.label: 'probabilty' is not a column of the manifest"),
        ({"soft_labels": {"tasks": ["label"], "values": {"label": "cell_type"}}},
         r"finetune.soft_labels.values.label: column 'cell_type' has no number in 12 row\(s\): row 1 \(images/defective/"),
    ],
)
def test_bad_soft_labels_are_refused_in_one_line(tiny, settings: dict, message: str) -> None:
    with pytest.raises(TaskError, match=message) as refused:
        resolve(FinetuneConfig.model_validate(settings), tiny, {"label": ["functional", "defective"]})
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("strategy", ["partial", "full"])
def test_soft_labels_change_what_partial_and_full_learn(cells: FourClassCells, tmp_path: Path, strategy: str) -> None:
    settings = {"strategy": strategy, "precision": "fp32", "class_weights": "none", "label_smoothing": 0.0,
                "tasks": ["label", "cell_type"] if strategy == "partial" else ["label"]}
    soft = {"tasks": ["label"], "sharpness": 1.0, "values": {"label": "defect_probability"}}
    hard = cells.train(tmp_path / "hard", **settings)
    spread = cells.train(tmp_path / "soft", **settings, soft_labels=soft)
    losses = [[h["train_loss"] for h in json.loads(t.artifacts["history"].read_text())] for t in (hard, spread)]
    # Same seed, same batches: only the targets differ, so every epoch's loss does; and a soft target's
    # cross-entropy is never below its entropy (sharpness 1 puts 30-40% of a four-class target off its class).
    assert all(abs(soft - one_hot) > 1e-3 for one_hot, soft in zip(*losses))
    places = cells.dataset.split("train")["defect_probability"].to_numpy() * 3  # p000..p100 rank 0..3
    targets = soft_targets(torch.tensor(places), torch.tensor([0.0, 1.0, 2.0, 3.0]), 1.0)
    assert min(losses[1]) >= -(targets * targets.log()).sum(dim=1).mean().item()
    saved = load_checkpoint(spread.artifacts["checkpoint"])
    assert saved["config"]["soft_labels"] == {**soft, "tasks": ["label"]}


def test_elpv_binary_trains_partial_on_the_annotators_probability_by_default(tmp_path: Path) -> None:
    # ELPV's binary label cuts a defect probability (0, 1/3, 2/3, 1) at 0.5; the source declares that column, and
    # the default soft_labels.tasks (auto) trains partial on it. Four-class labels are the levels: nothing declared.
    assert declared_values(IngestConfig()) == {"label": "defect_probability"}
    assert declared_values(IngestConfig(label_mode="four_class")) == {}
    assert declared_values(IngestConfig(source="imagefolder", path="cells")) == {}
    ingest_run(IngestConfig(limit=80, seed=3), tmp_path / "data")
    manifest = tmp_path / "data" / "manifest.csv"
    dataset = read_manifest(manifest)
    assert dataset.split("train")["defect_probability"].between(0.1, 0.9).any()  # doubted cells: 1/3 or 2/3
    features.run(FeaturesConfig(image_size=64, taps=("pooled",)), (BACKBONE,), dataset, tmp_path / "cache", tmp_path / "features")

    def train(out: str, **settings: object):
        cfg = FinetuneConfig.model_validate({**FAST, "strategy": "partial", "precision": "fp32", **settings})
        return finetune(cfg, BACKBONE, tmp_path / "features", dataset, manifest, tmp_path / out, tmp_path / "cache",
                        tmp_path / f"state-{out}", orders=declared_orders(IngestConfig()), values=declared_values(IngestConfig()))

    soft, hard = train("soft"), train("hard", soft_labels={"tasks": []})
    assert soft.info["soft_labels"] == "label <- defect_probability" and "soft_labels" not in hard.info
    losses = [[h["train_loss"] for h in json.loads(t.artifacts["history"].read_text())] for t in (soft, hard)]
    assert all(abs(a - b) > 1e-4 for a, b in zip(*losses))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["finetune.strategy=linear"], "soft_labels.tasks is set, but finetune.strategy=linear fits class labels"),
        (["finetune.head=ordinal"], "soft_labels.tasks: ['label'] have head ordinal, which has its own ordered loss"),
        (["finetune.distill.teacher=model.pt"], "soft_labels.tasks and finetune.distill.teacher cannot be combined"),
    ],
)
def test_soft_labels_where_they_cannot_apply_fail_in_one_line(overrides: list[str], message: str) -> None:
    sets = [arg for override in [*overrides, "finetune.soft_labels.tasks=[label]"] for arg in ("--set", override)]
    done = subprocess.run([sys.executable, "-m", "tlops.cli", "params", "--params", str(REPO / "params.yaml"), *sets],
                          capture_output=True, text=True, env=venv_env(), cwd=REPO, check=False)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]


def test_a_task_column_with_missing_values_is_refused_naming_the_rows(tiny, tmp_path: Path) -> None:
    frame = tiny.manifest.copy()
    frame.loc[[3, 8], "cell_type"] = None
    dataset = read_manifest(write_manifest(frame, tmp_path / "data" / "manifest.csv"))  # as read back: empty = missing
    paths = dataset.manifest["path"]
    missing = dataset.manifest.index[dataset.manifest["cell_type"].isna()].tolist()
    assert len(missing) == 2
    with pytest.raises(TaskError) as refused:
        resolve(FinetuneConfig(tasks=("label", "cell_type")), dataset, {})
    text = str(refused.value)
    assert "column 'cell_type' has no value in 2 row(s)" in text
    for row in missing:
        assert f"row {row + 1} ({paths[row]})" in text
    resolve(FinetuneConfig(tasks=("label",)), dataset, {})  # a task that does not read the column is fine


def test_a_bad_task_stops_finetune_before_any_training(cells: FourClassCells, tmp_path: Path) -> None:
    with pytest.raises(TaskError, match="needs the order of its classes"):
        cells.train(tmp_path, strategy="partial", tasks=["cell_type"], head="ordinal")
    assert not (tmp_path / "finetune").exists() and not (tmp_path / "state").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("finetune.head=ordnal", "finetune.head: 'ordnal' is not a head kind"),
        ("finetune.task_weights=[1, 2]", "finetune: task_weights has 2 value(s) for 1 task(s)"),
        ("finetune.tasks=[label, image]", "a task may not be empty or named 'image'"),
        ("finetune.head={cell_type: ordinal}", "finetune: head names ['cell_type'], which are not in tasks ['label']"),
    ],
)
def test_bad_task_params_fail_in_one_line_before_any_work(override: str, message: str) -> None:
    done = subprocess.run([sys.executable, "-m", "tlops.cli", "params", "--params", str(REPO / "params.yaml"),
                           "--set", override], capture_output=True, text=True, env=venv_env(), cwd=REPO, check=False)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tlops: error:") and message in lines[0]


def test_compress_ships_a_candidate_only_if_every_task_keeps_its_accuracy() -> None:
    fp32 = {"label": 0.80, "cell_type": 0.99}
    budget = Budget(fp32, 0.01)
    kept = compress.choose({"fp32": fp32, "int8": {"label": 0.80, "cell_type": 0.985}}, budget)
    assert kept[0] == "int8"
    lost = compress.choose({"fp32": fp32, "int8": {"label": 0.80, "cell_type": 0.95}}, budget)
    assert lost[0] == "fp32" and not lost[2]["int8"]
    assert "more compressed but over budget: int8 cell_type 0.9500" in lost[1]


def test_export_parity_checks_every_output(tmp_path: Path) -> None:
    from components.models.backbones import build_trunk
    from components.models.classifier import Classifier
    from components.models.onnx_export import export_onnx
    from components.models.registry import get_entry

    entry = get_entry(BACKBONE)
    torch.manual_seed(0)
    model = Classifier(build_trunk(entry, ("pooled",)), TaskHeads({"label": CornHead(entry.feature_dim, [0, 1, 2]),
                                                                   "cell_type": nn.Linear(entry.feature_dim, 2)})).eval()
    path = export_onnx(model, tmp_path / "model.onnx", {}, 64, 17, ("label", "cell_type"))
    images = np.random.default_rng(0).normal(size=(3, 3, 64, 64)).astype(np.float32)
    assert export.check_parity(model, path, images, atol=1e-4) < 1e-4
    with torch.no_grad():
        model.head.head("cell_type").bias.add_(0.01)  # the torch model's second output no longer what the file computes
    with pytest.raises(export.ExportParityError, match=r"max \|cell_type difference\| vs PyTorch is 0.01"):
        export.check_parity(model, path, images, atol=1e-4)


def test_validate_refuses_rows_without_a_task_value_and_an_unknown_task(tiny, tmp_path: Path) -> None:
    from components.data import validate
    from components.data.config import ValidateConfig

    frame = tiny.manifest.copy()
    frame.loc[[3, 8], "cell_type"] = None
    manifest = write_manifest(frame, tmp_path / "data" / "manifest.csv")
    blank = sorted(read_manifest(manifest).manifest.query("cell_type.isna()")["path"])
    cfg = ValidateConfig(min_per_class_split=1)
    with pytest.raises(validate.DataValidationError) as refused:
        validate.run(cfg, manifest, tiny.root, tmp_path / "out", tasks=("label", "cell_type"))
    for path in blank:
        assert f"- `{path}`: cell_type_present: column cell_type is blank" in str(refused.value)
    with pytest.raises(validate.DataValidationError, match=r"finetune.tasks: \['colour'\] not among the columns") as unknown:
        validate.run(cfg, manifest, tiny.root, tmp_path / "out2", tasks=("label", "colour"))
    assert "\n" not in str(unknown.value)
    assert validate.run(cfg, manifest, tiny.root, tmp_path / "out3").info["success"]  # no task reads the column
