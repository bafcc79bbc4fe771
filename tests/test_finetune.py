"""Finetune: each strategy on real ELPV cells at 64 px, the probe's algebra, resume after a kill, devices."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from components.core import devices
from components.core.errors import UserError
from components.core.progress import no_progress
from components.data.config import IngestConfig
from components.data.ingest import run as ingest_run
from components.data.manifest import read_manifest
from components.features import extract as features
from components.features.config import FeaturesConfig
from components.models.classifier import CheckpointError, build_model, load_checkpoint, save_checkpoint
from components.models.int8_recipe import Recipe
from components.packaging import export
from components.training import activations
from components.training.config import FinetuneConfig, LoopConfig
from components.training.context import Context
from components.training.finetune import run
from components.training.loop import FitResult, class_weight_vector, fit, lr_scheduler, param_groups, scores
from components.training.strategies import STRATEGIES
from components.training.strategies.linear import fit_probe

REPO = Path(__file__).resolve().parents[1]
BACKBONE = "efficientnet_lite0"
FAST = {"partial": {"epochs": 2, "batch_size": 16, "views": 2, "blocks": 2},
        "full": {"epochs": 2, "batch_size": 16, "workers": 0}, "linear": {"taps": ["pooled", "stage5"]}}


class Cells:
    def __init__(self, root: Path):
        self.root = root
        ingest_run(IngestConfig(limit=80, seed=7), root / "data")
        self.manifest = root / "data" / "manifest.csv"
        self.dataset = read_manifest(self.manifest)
        self.features = root / "features"
        self.cache = root / "cache"
        features.run(FeaturesConfig(image_size=64, taps=("pooled", "stage5")), (BACKBONE,), self.dataset,
                     self.cache, self.features)

    def run(self, out: Path, state: Path | None = None, int8_recipe: Recipe | None = None, **settings: object):
        cfg = FinetuneConfig.model_validate({**FAST, **settings})
        return run(cfg, BACKBONE, self.features, self.dataset, self.manifest, out, self.cache, state or out.parent / "state",
                   int8_recipe=int8_recipe)


@pytest.fixture(scope="module")
def cells(tmp_path_factory: pytest.TempPathFactory) -> Cells:
    return Cells(tmp_path_factory.mktemp("cells"))


@pytest.mark.parametrize("strategy", ["linear", "partial", "full"])
def test_each_strategy_trains_a_self_describing_checkpoint_that_exports(cells: Cells, tmp_path: Path, strategy: str) -> None:
    result = cells.run(tmp_path / "out", strategy=strategy)
    checkpoint = load_checkpoint(result.artifacts["checkpoint"])
    assert checkpoint["strategy"] == strategy and checkpoint["labels"] == list(cells.dataset.labels)
    assert checkpoint["backbone"]["name"] == BACKBONE and checkpoint["preprocessing"]["input_size"] == 64
    assert checkpoint["data"]["version"] == hashlib.md5(cells.manifest.read_bytes()).hexdigest()
    assert checkpoint["config"]["strategy"] == strategy
    # Only the deeper strategies change the trunk; linear reads two taps concatenated.
    assert (checkpoint["trunk"] is None) == (strategy == "linear")
    assert checkpoint["taps"] == (["pooled", "stage5"] if strategy == "linear" else ["pooled"])
    # The dihedral views it saw in training (export averages over no more): partial's 2 cached views here.
    assert checkpoint["train_views"] == {"linear": 1, "partial": 2, "full": 8}[strategy]
    assert build_model(checkpoint).head.weight.shape[1] == (1280 + 192 if strategy == "linear" else 1280)
    report = json.loads(result.artifacts["report"].read_text())
    assert report["strategy"] == strategy and report["reference"]["n_train"] == len(cells.dataset.split("train"))
    assert report["negative_transfer"]["fired"] == (
        report["best"]["val_accuracy"] <= report["reference"]["val_accuracy"] + 0.02)
    exported = export.run(export.ExportConfig(parity_images=4), 0.0, result.artifacts["checkpoint"], cells.dataset,
                          tmp_path / "export", features_dir=cells.features)
    assert exported.metrics["parity_max_diff_fp32"] < 1e-4
    if strategy != "linear":
        # The trained trunk really differs from the pretrained one.
        pretrained = build_model({**checkpoint, "trunk": None}).trunk.state_dict()
        changed = [k for k, v in checkpoint["trunk"].items() if v.dtype.is_floating_point and not torch.equal(v, pretrained[k])]
        assert changed


def test_partial_trains_only_the_last_blocks_and_caches_their_inputs(cells: Cells, tmp_path: Path, caplog) -> None:
    first = cells.run(tmp_path / "a", strategy="partial")
    checkpoint = load_checkpoint(first.artifacts["checkpoint"])
    pretrained = build_model({**checkpoint, "trunk": None}).trunk.state_dict()
    changed = {k for k, v in checkpoint["trunk"].items() if v.dtype.is_floating_point and not torch.equal(v, pretrained[k])}
    # Lite0's last two blocks are blocks.5.3 and blocks.6.0; the stem and everything before stays pretrained.
    assert any("blocks.6.0" in k for k in changed) and any("blocks.5.3" in k for k in changed)
    assert not any("blocks.5.2" in k or "conv_stem" in k or "blocks.0." in k for k in changed)
    # A second run (another seed) trains on the cached activations: with one view of one train image taken out of
    # the store, that view and nothing else is computed again (the store logs how many it computed).
    store = next(s for s in (cells.cache / BACKBONE).glob("partial-*")
                 if '"trainable_blocks": 2' in (s / "cache_key.json").read_text())
    sha = cells.dataset.split("train")["sha256"].iloc[0]
    victim = store / sha[:2] / f"{sha}.1.npy"
    victim.unlink()
    caplog.set_level("INFO", logger="components.training.activations")
    caplog.clear()
    cells.run(tmp_path / "b", strategy="partial", seed=1)
    computed = [r.getMessage().split(" (")[0] for r in caplog.records
                if r.name == "components.training.activations" and " computed (" in r.getMessage()]
    assert computed == [f"activations {BACKBONE}: 1 computed"]
    assert victim.is_file()
    stores = list((cells.cache / BACKBONE).glob("partial-*"))
    n_train = len(cells.dataset.split("train"))
    n_other = len(cells.dataset.split("val")) + len(cells.dataset.split("test"))
    assert sum(len(list(s.glob("*/*.npy"))) for s in stores) == 2 * n_train + n_other


def test_partial_also_trains_on_the_int8_activations_compress_will_serve(cells: Cells, tmp_path: Path) -> None:
    recipe = Recipe(calibration_images=8)
    settings = {"partial": {**FAST["partial"], "blocks": 1, "epochs": 1}}
    result = cells.run(tmp_path / "a", tmp_path / "state-a", int8_recipe=recipe, strategy="partial", **settings)
    report = json.loads(result.artifacts["report"].read_text())
    assert report["info"]["int8_views"] == recipe.describe(8)
    store = next(s for s in (cells.cache / BACKBONE).glob("partial-*") if '"trainable_blocks": 1' in (s / "cache_key.json").read_text())
    quantized = activations.int8_store(activations.ViewStore(store, np.float16, "activation"), recipe, cells.dataset)
    assert (quantized.dir / activations.FROZEN_INT8_FILE).exists()
    train = cells.dataset.split("train")["sha256"]
    assert len(list(quantized.dir.glob("*/*.npy"))) == 2 * len(train)  # every view of every train image, nothing else
    # INT8 activations are the float ones plus quantization noise: close, not equal.
    sha = train.iloc[0]
    exact, noisy = (np.load(s.path(sha, 1)).astype(np.float32) for s in (activations.ViewStore(store, np.float16, ""), quantized))
    assert not np.array_equal(exact, noisy) and np.abs(noisy - exact).mean() < 0.25 * np.abs(exact).mean()
    # Another recipe is another store; the same one is found again without quantizing.
    other = activations.int8_store(activations.ViewStore(store, np.float16, ""),
                                        Recipe(calibration_images=8, calibration_method="percentile"), cells.dataset)
    assert other.dir != quantized.dir and not (other.dir / activations.FROZEN_INT8_FILE).exists()
    # Negative: when compress will not quantize (no recipe), or int8_views is off, only float activations train.
    plain = cells.run(tmp_path / "b", tmp_path / "state-b", strategy="partial", **settings)
    off = cells.run(tmp_path / "c", tmp_path / "state-c", int8_recipe=recipe, strategy="partial",
                    partial={**settings["partial"], "int8_views": False})
    for trained in (plain, off):
        assert json.loads(trained.artifacts["report"].read_text())["info"]["int8_views"] is None
    heads = [load_checkpoint(r.artifacts["checkpoint"])["head"]["weight"] for r in (result, plain, off)]
    assert torch.equal(heads[1], heads[2]) and not torch.equal(heads[0], heads[1])


def test_a_corrupt_cached_activation_is_recomputed(cells: Cells, tmp_path: Path) -> None:
    cells.run(tmp_path / "a", strategy="partial", partial={**FAST["partial"], "blocks": 1, "epochs": 1})
    store = next(s for s in (cells.cache / BACKBONE).glob("partial-*") if '"trainable_blocks": 1' in (s / "cache_key.json").read_text())
    victim = next(store.rglob("*.0.npy"))
    good = np.load(victim)
    victim.write_bytes(b"not an array")
    cells.run(tmp_path / "b", strategy="partial", partial={**FAST["partial"], "blocks": 1, "epochs": 1})
    assert np.array_equal(np.load(victim), good)


def test_the_seed_decides_the_weights(cells: Cells, tmp_path: Path) -> None:
    def head(seed: int, out: str) -> torch.Tensor:
        result = cells.run(tmp_path / out, tmp_path / f"state-{out}", strategy="partial", seed=seed)
        return load_checkpoint(result.artifacts["checkpoint"])["head"]["weight"]

    first = head(0, "a")
    assert torch.equal(first, head(0, "b"))
    assert not torch.equal(first, head(1, "c"))


def test_auto_skips_what_the_budget_cannot_hold_and_says_why(cells: Cells, tmp_path: Path) -> None:
    result = cells.run(tmp_path / "out", strategy="auto", budget_minutes=0.001)
    report = json.loads(result.artifacts["report"].read_text())
    assert [c["status"] for c in report["candidates"]] == ["trained", "skipped", "skipped"]
    assert report["strategy"] == "linear" == result.info["strategy"]
    assert "auto chose linear" in report["why"] and "partial skipped: estimated" in report["why"]
    assert load_checkpoint(result.artifacts["checkpoint"])["trunk"] is None


def test_auto_keeps_the_best_val_accuracy(cells: Cells, tmp_path: Path) -> None:
    result = cells.run(tmp_path / "out", strategy="auto", budget_minutes=60)
    report = json.loads(result.artifacts["report"].read_text())
    trained = {c["strategy"]: c["val_accuracy"] for c in report["candidates"]}
    assert set(trained) == {"linear", "partial", "full"}
    assert trained[report["strategy"]] == max(trained.values()) == result.metrics["val_accuracy"]


def test_auto_decides_on_counted_costs_the_same_way_twice(cells: Cells, tmp_path: Path) -> None:
    # The costs are counted from the networks and the data, so a cold and a warm cache, a loaded and an idle
    # machine, give the same estimate; a budget between partial's cost and partial's + full's trains partial only.
    cfg = FinetuneConfig.model_validate({**FAST, "strategy": "auto"})
    ctx = Context(cfg, BACKBONE, cells.features, cells.dataset, cells.cache, tmp_path / "state", 17, 1e-4, no_progress)
    before = {name: STRATEGIES[name].cost(ctx).describe() for name in ("linear", "partial", "full")}
    assert before["linear"]["seconds"] == 0 < before["partial"]["seconds"] < before["full"]["seconds"]
    assert before["partial"]["inference_s"] > 0 and before["full"]["inference_s"] == 0
    budget = (before["partial"]["seconds"] + before["full"]["seconds"] / 2) / 60
    reports = []
    for attempt in ("a", "b"):
        result = cells.run(tmp_path / attempt, tmp_path / f"state-{attempt}", strategy="auto", budget_minutes=budget)
        reports.append(json.loads(result.artifacts["report"].read_text()))
    for report in reports:
        assert [(c["strategy"], c["status"]) for c in report["candidates"]] == [
            ("linear", "trained"), ("partial", "trained"), ("full", "skipped")]
        assert [c["estimate"] for c in report["candidates"]] == list(before.values())
    assert reports[0]["strategy"] == reports[1]["strategy"]
    assert {name: STRATEGIES[name].cost(ctx).describe() for name in before} == before  # the warm cache changed nothing


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"strategy": "linear", "linear": {"taps": ["pooled", "stage3"]}}, "finetune.linear.taps"),
        ({"strategy": "partial", "partial": {"blocks": 40}}, "finetune.partial.blocks=40"),
        ({"strategy": "full", "device": "cuda"}, "finetune.device=cuda"),
    ],
)
def test_each_strategy_refuses_what_it_cannot_do_before_training(cells: Cells, tmp_path: Path, settings: dict, named: str) -> None:
    if settings.get("device") == "cuda" and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(UserError, match=named.replace(".", r"\.").replace("[", r"\[")):
        cells.run(tmp_path / "out", **settings)
    assert not (tmp_path / "out" / "model.pt").exists()


def test_a_frozen_part_unlike_torch_is_refused_with_the_activations_scale(cells: Cells, tmp_path: Path) -> None:
    cfg = FinetuneConfig.model_validate({**FAST, "strategy": "partial", "partial": {**FAST["partial"], "blocks": 3}})
    # No two kernel libraries agree to the last bit, so a tolerance of 0 must refuse the export.
    with pytest.raises(features.TrunkParityError,
                       match=r"differs from torch by \S+ \(> features.parity_atol=0\) on activations up to \d.*features.parity_atol if"):
        run(cfg, BACKBONE, cells.features, cells.dataset, cells.manifest, tmp_path / "out", cells.cache,
            tmp_path / "state", atol=0.0)
    stores = [s for s in (cells.cache / BACKBONE).glob("partial-*") if '"trainable_blocks": 3' in (s / "cache_key.json").read_text()]
    assert stores and not any((s / activations.FROZEN_FILE).exists() for s in stores)  # nothing cached from it
    assert not (tmp_path / "out" / "model.pt").exists()


def test_a_killed_full_run_resumes_from_its_last_epoch(cells: Cells, tmp_path: Path) -> None:
    settings = {"strategy": "full", "full": {**FAST["full"], "epochs": 4, "patience": 10}}
    script = (
        "import sys, json; from pathlib import Path; from tests.test_finetune import Cells;"
        "cells = Cells.__new__(Cells); root = Path(sys.argv[1]); cells.root = root;"
        "cells.manifest = root / 'data/manifest.csv'; from components.data.manifest import read_manifest;"
        "cells.dataset = read_manifest(cells.manifest); cells.features = root / 'features'; cells.cache = root / 'cache';"
        "cells.run(Path(sys.argv[2]), Path(sys.argv[3]), **json.loads(sys.argv[4]))"
    )
    state = tmp_path / "state"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-c", script, str(cells.root), str(tmp_path / "killed"), str(state),
                              json.dumps(settings)], env=env, cwd=REPO)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and child.poll() is None:
        saved = list(state.glob("full-*.pt"))
        if saved and len(torch.load(saved[0], weights_only=False)["history"]) >= 2:
            break
        time.sleep(0.5)
    child.send_signal(signal.SIGKILL)
    child.wait()
    done_before = len(torch.load(next(state.glob("full-*.pt")), weights_only=False)["history"])
    assert 2 <= done_before < 4, "the child should have been killed mid-run"
    assert not (tmp_path / "killed" / "model.pt").exists()
    resumed = cells.run(tmp_path / "resumed", state, **settings)
    report = json.loads(resumed.artifacts["report"].read_text())
    assert report["info"]["resumed_from_epoch"] == done_before
    history = json.loads(resumed.artifacts["history"].read_text())
    assert [h["epoch"] for h in history] == [0, 1, 2, 3]
    # The resumed epochs continue the same run: an uninterrupted run takes the same steps.
    straight = cells.run(tmp_path / "straight", tmp_path / "other-state", **settings)
    straight_history = json.loads(straight.artifacts["history"].read_text())
    assert [h["val_loss"] for h in history] == pytest.approx([h["val_loss"] for h in straight_history], rel=1e-4)


def test_the_probe_folds_its_standardisation_into_one_linear_layer() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    x = rng.normal(5.0, 3.0, (300, 40)).astype(np.float32)
    x[:, :4] += np.where(labels == 0, 2.0, -2.0)[:, None]
    probe = fit_probe((x[:200], labels[:200]), (x[200:], labels[200:]), 2, (0.01, 0.1, 1.0), "balanced", 0)
    assert probe.best["val_accuracy"] > 0.9
    with torch.no_grad():
        logits = probe.head(torch.from_numpy(x[200:])).numpy()
    assert (logits.argmax(1) == labels[200:]).mean() == pytest.approx(probe.best["val_accuracy"])
    noise = fit_probe((x[:200, 4:], labels[:200]), (x[200:, 4:], labels[200:]), 2, (0.01, 0.1, 1.0), "balanced", 0)
    assert noise.best["val_accuracy"] < 0.7


def test_a_near_dead_feature_does_not_amplify_rounding_noise() -> None:
    # A pooled ReLU6 channel that is almost always 0: its spread is 1e-5, and plain standardisation
    # would multiply it (and any float or INT8 rounding in it) by ~1e5 in the folded layer.
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    x = rng.normal(0.0, 1.0, (300, 20)).astype(np.float32)
    x[:, :4] += np.where(labels == 0, 1.5, -1.5)[:, None]
    x[:, 4] = rng.normal(0.0, 1e-5, 300) + np.where(labels == 0, 1e-5, -1e-5)
    probe = fit_probe((x[:200], labels[:200]), (x[200:], labels[200:]), 2, (0.1, 1.0), "balanced", 0)
    assert probe.best["val_accuracy"] > 0.9
    assert float(probe.head.weight.detach().abs().max()) < 20.0
    with torch.no_grad():  # a rounding-sized change of every input barely moves a logit
        nudged = probe.head(torch.from_numpy(x * (1 + 1e-6))) - probe.head(torch.from_numpy(x))
    assert float(nudged.abs().max()) < 1e-4


def test_discriminative_learning_rates_and_warmup() -> None:
    cfg = LoopConfig(epochs=10, lr=1e-3, layer_decay=0.5, weight_decay=0.01, warmup_epochs=2, schedule="cosine",
                     patience=3, seed=0)
    layers = [torch.nn.Linear(2, 2) for _ in range(3)]
    groups = param_groups([list(layer.parameters()) for layer in layers], cfg)
    assert [g["lr"] for g in groups] == pytest.approx([2.5e-4, 2.5e-4, 5e-4, 5e-4, 1e-3, 1e-3])
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0] * 3  # no decay on biases
    optimizer = torch.optim.AdamW(groups)
    scheduler = lr_scheduler(optimizer, cfg, steps_per_epoch=5)
    rates = []
    for _ in range(50):
        rates.append(optimizer.param_groups[-1]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] == pytest.approx(1e-4) and rates[9] == pytest.approx(1e-3)  # linear warm-up over 2 epochs
    assert rates[-1] < 1e-5  # cosine decays to ~0
    assert all(a >= b for a, b in zip(rates[10:], rates[11:]))


def test_ema_keeps_the_moving_average_of_the_weights(tmp_path: Path) -> None:
    """With `ema`, the weights evaluated and returned are the average, and a resumed run continues it."""
    from components.core.devices import Placement

    x, y = torch.randn(64, 4, generator=torch.Generator().manual_seed(0)), torch.arange(64) % 2
    placement = Placement(torch.device("cpu"), None, "cpu")

    class Killed(Exception):
        pass

    def train(ema: float, resume: Path | None = None, kill_after: int | None = None) -> tuple[torch.nn.Module, FitResult]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
        cfg = LoopConfig(epochs=3, lr=0.05, layer_decay=1.0, weight_decay=0.0, warmup_epochs=0,
                         schedule="cosine", patience=3, seed=0, ema=ema)
        seen = []

        def evaluate(network: torch.nn.Module) -> dict[str, float]:
            seen.append(network)
            return scores(network(x), y)

        def on_epoch(epoch: int, entry: dict[str, float]) -> None:
            if epoch == kill_after:
                raise Killed

        def batches(epoch: int, generator: torch.Generator):
            return [(x[i], y[i]) for i in torch.randperm(64, generator=generator).split(16)]

        result = fit(model, [list(model.parameters())], batches, 4, evaluate, torch.nn.functional.cross_entropy, cfg,
                     placement, resume, "f", on_epoch=on_epoch)
        assert all(network is not model for network in seen) == (ema > 0)
        return model, result

    train(0.0)  # without ema, the model itself is evaluated
    model, averaged = train(0.9)
    final = model.state_dict()
    # The kept weights are not the last step's: they lag behind it, and BatchNorm's statistics are averaged too.
    assert not torch.allclose(averaged.state["0.weight"], final["0.weight"])
    assert not torch.allclose(averaged.state["1.running_mean"], final["1.running_mean"])
    with pytest.raises(Killed):
        train(0.9, tmp_path / "state.pt", kill_after=1)
    _, resumed = train(0.9, tmp_path / "state.pt")
    assert resumed.resumed_from == 2
    assert [h["val_loss"] for h in resumed.history] == pytest.approx([h["val_loss"] for h in averaged.history])
    for key, value in averaged.state.items():
        assert torch.allclose(resumed.state[key].float(), value.float()), key


def test_balanced_class_weights() -> None:
    assert class_weight_vector([0, 0, 0, 1], 2, "balanced").tolist() == pytest.approx([4 / 6, 2.0])
    assert class_weight_vector([0, 0, 0, 1], 2, "none").tolist() == [1.0, 1.0]


def test_bf16_only_where_the_hardware_has_it() -> None:
    if torch.cuda.is_available():
        pytest.skip("the CPU rules apply without CUDA")
    assert devices.resolve("auto", "auto", frozenset({"avx2", "amx_bf16"})).precision == "bf16"
    assert devices.resolve("auto", "auto", frozenset({"avx2", "avx512_bf16"})).precision == "bf16"
    assert devices.resolve("auto", "auto", frozenset({"avx2", "fma"})).precision == "fp32"
    assert devices.resolve("cpu", "fp32", frozenset({"amx_bf16"})).precision == "fp32"
    with pytest.raises(UserError, match="finetune.precision=bf16"):
        devices.resolve("cpu", "bf16", frozenset({"avx2"}))


def test_the_checkpoint_loader_refuses_what_is_not_a_tlops_checkpoint(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="not a tlops checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(ValueError, match="lacks"):
        save_checkpoint(tmp_path / "incomplete.pt", torch.nn.Linear(2, 2), None, backbone={}, taps=["pooled"])
    (tmp_path / "truncated.pt").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(CheckpointError, match="truncated.pt: not a readable checkpoint"):
        load_checkpoint(tmp_path / "truncated.pt")


@pytest.mark.slow
def test_on_data_far_from_imagenet_the_guard_fires_and_auto_recovers(tmp_path: Path) -> None:
    from tests.far_dataset import write_far_dataset

    source = write_far_dataset(tmp_path / "far", per_class=80, contrast=0.05)
    ingest_run(IngestConfig(source="imagefolder", path=str(source), test_fraction=0.1, val_fraction=0.4), tmp_path / "data")
    dataset = read_manifest(tmp_path / "data" / "manifest.csv")
    features.run(FeaturesConfig(image_size=64), (BACKBONE,), dataset, tmp_path / "cache", tmp_path / "features")
    cfg = FinetuneConfig.model_validate({
        "strategy": "auto", "budget_minutes": 60,
        "partial": {"epochs": 4, "batch_size": 16},
        # The label is a faint brightness profile: every layer must move (no layer decay), and
        # crops or brightness jitter would blur it.
        "full": {"epochs": 24, "batch_size": 16, "workers": 0, "patience": 24, "lr": 0.001, "layer_decay": 1.0,
                 "crop_scale_min": 1.0, "jitter": 0.0},
    })
    result = run(cfg, BACKBONE, tmp_path / "features", dataset, tmp_path / "data" / "manifest.csv", tmp_path / "out",
                 tmp_path / "cache", tmp_path / "state")
    report = json.loads(result.artifacts["report"].read_text())
    trained = {c["strategy"]: c for c in report["candidates"]}
    # The frozen features cannot see the label: the guard fires on the probe ...
    assert trained["linear"]["negative_transfer"] is True
    assert trained["linear"]["val_accuracy"] <= report["reference"]["val_accuracy"]
    # ... and auto goes deeper, to a model that does beat the pixel reference.
    assert report["strategy"] != "linear" and result.info["negative_transfer"] == "no"
    assert result.metrics["val_accuracy"] > report["reference"]["val_accuracy"] + cfg.guard.margin
