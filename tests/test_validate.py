"""Validate stage on tiny generated datasets: a clean one passes, each broken rule is named."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from components.core.result import StageResult, sha256_file
from components.data.config import ValidateConfig
from components.data.manifest import write_manifest
from components.data.validate import DataValidationError, run

LABELS = ("defective", "functional")
PER_CLASS_SPLIT = 2
CONFIG = ValidateConfig(labels=LABELS, min_per_class_split=PER_CLASS_SPLIT)


def add_image(root: Path, relative: str, shade: int, mode: str = "L", size: int = 40) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (size, size), shade if mode == "L" else (shade, 0, 0, 255)[: len(mode)]).save(path)


def manifest_row(root: Path, relative: str, label: str, split: str) -> dict[str, object]:
    """A row as ingest would write it (ingest's size and mode are what validate re-checks)."""
    return {
        "path": relative,
        "label": label,
        "split": split,
        "sha256": sha256_file(root / relative),
        "width": 40,
        "height": 40,
        "mode": "L",
    }


@pytest.fixture
def dataset(tmp_path: Path) -> tuple[Path, list[dict[str, object]]]:
    """Two labels x three splits x two distinct grey PNGs; returns the root and its manifest rows."""
    root = tmp_path / "ingest"
    rows, shade = [], 0
    for label in LABELS:
        for split in ("train", "val", "test"):
            for i in range(PER_CLASS_SPLIT):
                relative = f"images/{label}/{split}-{i}.png"
                add_image(root, relative, shade := shade + 10)
                rows.append(manifest_row(root, relative, label, split))
    return root, rows


def write(root: Path, rows: list[dict[str, object]]) -> Path:
    return write_manifest(pd.DataFrame(rows), root / "manifest.csv")


def failures(out_dir: Path) -> dict[str, set[str]]:
    """Rule -> failing paths (or details, for dataset-level rules), read back from report.json."""
    rules = json.loads((out_dir / "report.json").read_text())["rules"]
    return {rule: {f["path"] or f["detail"] for f in r["failures"]} for rule, r in rules.items() if not r["success"]}


def test_clean_dataset_passes_and_writes_data_docs(dataset, tmp_path):
    root, rows = dataset
    out = tmp_path / "validate"
    manifest_csv = write(root, rows)
    result = run(CONFIG, manifest_csv, root, out)

    assert result.info["success"] is True
    assert result.metrics["n_images"] == len(rows) and result.metrics["n_excluded"] == 0
    assert result.metrics["n_test_defective"] == PER_CLASS_SPLIT
    assert failures(out) == {}
    index = result.artifacts["data_docs"]
    assert index == out / "data_docs" / "index.html" and index.exists()
    pages = {page.parent.parent.parent.name for page in (out / "data_docs" / "validations").rglob("*.html")}
    assert pages == {"images", "class_counts"}
    assert (out / "manifest.csv").read_bytes() == manifest_csv.read_bytes()
    balance = json.loads((out / "report.json").read_text())["class_balance"]
    assert balance["train"]["functional"] == {"count": PER_CLASS_SPLIT, "share": 0.5}
    assert StageResult.load(out).is_intact()


def test_corrupt_image_fails_naming_file_and_rule(dataset, tmp_path):
    root, rows = dataset
    broken = rows[0]["path"]
    (root / broken).write_bytes(b"this is not a png")
    out = tmp_path / "validate"

    with pytest.raises(DataValidationError) as error:
        run(CONFIG, write(root, rows), root, out)

    assert f"`{broken}`: decodes" in str(error.value)
    assert failures(out) == {"decodes": {broken}}
    assert f"`{broken}`: decodes: does not decode" in (out / "report.md").read_text()
    assert (out / "data_docs" / "index.html").exists()
    assert not (out / "manifest.csv").exists()
    saved = StageResult.load(out)
    assert saved.info["success"] is False and "manifest" not in saved.artifacts and saved.is_intact()


def test_leaked_duplicate_fails_naming_both_files(dataset, tmp_path):
    root, rows = dataset
    train = next(r for r in rows if r["split"] == "train")
    leaked = "images/functional/copy-in-test.png"
    (root / leaked).write_bytes((root / str(train["path"])).read_bytes())
    rows.append(manifest_row(root, leaked, str(train["label"]), "test"))

    with pytest.raises(DataValidationError) as error:
        run(CONFIG, write(root, rows), root, tmp_path / "validate")

    message = str(error.value)
    assert f"`{train['path']}`: sha256_unique: leaks across splits" in message
    assert f"`{leaked}`: sha256_unique: leaks across splits" in message
    assert failures(tmp_path / "validate") == {"sha256_unique": {train["path"], leaked}}


def test_duplicate_within_split_is_reported_as_such(dataset, tmp_path):
    root, rows = dataset
    first = rows[0]
    copy = "images/defective/copy-in-train.png"
    (root / copy).write_bytes((root / str(first["path"])).read_bytes())
    rows.append(manifest_row(root, copy, str(first["label"]), str(first["split"])))

    with pytest.raises(DataValidationError, match="duplicate within train"):
        run(CONFIG, write(root, rows), root, tmp_path / "validate")


def test_too_few_images_per_class_and_split_fails(dataset, tmp_path):
    root, rows = dataset
    rows = [r for r in rows if not (r["label"] == "defective" and r["split"] == "val")][:-1]

    with pytest.raises(DataValidationError) as error:
        run(CONFIG, write(root, rows), root, tmp_path / "validate")

    assert "min_per_class_split" in str(error.value)
    details = failures(tmp_path / "validate")["min_per_class_split"]
    assert any("'defective' in split 'val'" in d and d.startswith("0 image") for d in details)
    assert any("'functional' in split 'test'" in d and d.startswith("1 image") for d in details)
    assert len(details) == 2


def test_wrong_mode_and_size_fail(dataset, tmp_path):
    root, rows = dataset
    rgba, tiny = str(rows[1]["path"]), str(rows[2]["path"])
    add_image(root, rgba, 200, mode="RGBA")
    add_image(root, tiny, 200, size=8)
    rows[1]["sha256"], rows[2]["sha256"] = sha256_file(root / rgba), sha256_file(root / tiny)

    with pytest.raises(DataValidationError) as error:
        run(CONFIG, write(root, rows), root, tmp_path / "validate")

    assert f"`{rgba}`: mode_allowed: mode RGBA" in str(error.value)
    assert failures(tmp_path / "validate") == {
        "mode_allowed": {rgba},
        "width_in_range": {tiny},
        "height_in_range": {tiny},
    }


def test_undeclared_label_fails(dataset, tmp_path):
    root, rows = dataset
    with pytest.raises(DataValidationError, match="label_declared"):
        run(
            ValidateConfig(labels=("functional", "cracked"), min_per_class_split=1),
            write(root, rows),
            root,
            tmp_path / "validate",
        )
    assert failures(tmp_path / "validate")["label_declared"] == {r["path"] for r in rows if r["label"] == "defective"}


def test_exclude_drops_broken_images_and_leaves_the_input_alone(dataset, tmp_path):
    root, rows = dataset
    broken = "images/defective/extra-broken.png"
    (root / broken).write_bytes(b"\x89PNG truncated")
    rows.append({**manifest_row(root, broken, "defective", "train"), "width": None, "height": None, "mode": None})
    train = next(r for r in rows if r["split"] == "train")
    leaked = "images/functional/copy-in-test.png"
    (root / leaked).write_bytes((root / str(train["path"])).read_bytes())
    rows.append(manifest_row(root, leaked, str(train["label"]), "test"))
    manifest_csv = write(root, rows)
    before = manifest_csv.read_bytes()
    files_before = sorted(p.relative_to(root) for p in root.rglob("*"))
    out = tmp_path / "validate"

    result = run(
        ValidateConfig(on_invalid="exclude", labels=LABELS, min_per_class_split=PER_CLASS_SPLIT),
        manifest_csv,
        root,
        out,
    )

    assert result.info["success"] is False
    assert result.metrics["n_excluded"] == 2 and result.metrics["n_images"] == len(rows) - 2
    kept = set(pd.read_csv(out / "manifest.csv")["path"])
    assert broken not in kept and leaked not in kept and train["path"] in kept  # the training copy stays
    excluded = pd.read_csv(out / "excluded.csv")
    assert excluded[["path", "rule"]].values.tolist() == [[broken, "decodes"], [leaked, "sha256_unique"]]
    assert manifest_csv.read_bytes() == before
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == files_before


def test_exclude_still_fails_when_too_few_images_remain(dataset, tmp_path):
    root, rows = dataset
    (root / str(rows[0]["path"])).write_bytes(b"not an image")  # defective/train drops to 1 < 2

    with pytest.raises(DataValidationError, match="1 image\\(s\\) of label 'defective' in split 'train'"):
        run(
            ValidateConfig(on_invalid="exclude", labels=LABELS, min_per_class_split=PER_CLASS_SPLIT),
            write(root, rows),
            root,
            tmp_path / "validate",
        )
    assert pd.read_csv(tmp_path / "validate" / "excluded.csv")["path"].tolist() == [rows[0]["path"]]


def test_out_dir_inside_the_dataset_is_refused(dataset):
    root, rows = dataset
    with pytest.raises(ValueError, match="outside the dataset folder"):
        run(CONFIG, write(root, rows), root, root / "validate")
