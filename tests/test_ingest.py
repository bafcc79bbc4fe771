import shutil
from pathlib import Path

import pandas as pd
import pytest
from pydantic import ValidationError

from components.data.config import IngestConfig
from components.data.ingest import IngestError, run
from components.data.manifest import REQUIRED_COLUMNS, assign_split, read_manifest
from tests.conftest import write_imagefolder


def test_elpv_subset_manifest_is_complete(elpv_small) -> None:
    frame = elpv_small.manifest
    assert set(REQUIRED_COLUMNS) <= set(frame.columns)
    assert {"cell_type", "defect_probability"} <= set(frame.columns)
    assert set(frame["label"]) == {"defective", "functional"}
    assert set(frame["split"]) == {"train", "val", "test"}
    assert (frame["mode"] == "L").all() and (frame["width"] == 300).all()
    assert all(elpv_small.image_path(p).is_file() for p in frame["path"])
    # binary label = defect probability >= 0.5
    assert ((frame["defect_probability"] >= 0.5) == (frame["label"] == "defective")).all()


def test_split_is_a_pure_function_of_content_and_seed(tmp_path: Path) -> None:
    source = write_imagefolder(tmp_path / "src", per_class=10)
    first = read_manifest(run(IngestConfig(source="imagefolder", path=str(source)), tmp_path / "a").artifacts["manifest"]).manifest
    write_imagefolder(tmp_path / "more", per_class=10, seed=99)
    for image in (tmp_path / "more").rglob("*.png"):
        shutil.copy(image, source / image.parent.name / f"new_{image.name}")
    second = read_manifest(run(IngestConfig(source="imagefolder", path=str(source)), tmp_path / "b").artifacts["manifest"]).manifest
    assert len(second) == 40
    merged = first.merge(second, on="sha256", suffixes=("_before", "_after"))
    assert len(merged) == 20 and (merged["split_before"] == merged["split_after"]).all()
    other_seed = {assign_split(s, 1, 0.25, 0.2) for s in second["sha256"]}
    assert other_seed == {"train", "val", "test"}


def test_imagefolder_source_is_copied_not_touched(tmp_path: Path) -> None:
    source = write_imagefolder(tmp_path / "src", per_class=4)
    before = {p: p.stat().st_mtime_ns for p in source.rglob("*")}
    result = run(IngestConfig(source="imagefolder", path=str(source)), tmp_path / "out")
    dataset = read_manifest(result.artifacts["manifest"])
    assert dataset.labels == ("bright", "dark")
    assert {p: p.stat().st_mtime_ns for p in source.rglob("*")} == before
    assert all((tmp_path / "out" / p).is_file() for p in dataset.manifest["path"])


def test_csv_source_honours_given_split_and_flags_undecodable(tmp_path: Path) -> None:
    source = write_imagefolder(tmp_path / "src", per_class=3)
    (source / "dark" / "broken.png").write_bytes(b"not an image")
    rows = [{"path": str(p.relative_to(source)), "label": p.parent.name, "split": "test"} for p in sorted(source.rglob("*.png"))]
    pd.DataFrame(rows).to_csv(source / "list.csv", index=False)
    manifest = read_manifest(run(IngestConfig(source="csv", path=str(source / "list.csv")), tmp_path / "out").artifacts["manifest"]).manifest
    assert (manifest["split"] == "test").all()
    broken = manifest[manifest["path"].str.endswith("broken.png")]
    assert broken["mode"].isna().all()


def test_bad_sources_fail_with_the_file_named(tmp_path: Path) -> None:
    pd.DataFrame({"file": ["a.png"]}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(IngestError, match=r"bad\.csv.*path"):
        run(IngestConfig(source="csv", path=str(tmp_path / "bad.csv")), tmp_path / "out")
    with pytest.raises(IngestError, match="ingest.path"):
        run(IngestConfig(source="imagefolder", path=str(tmp_path / "missing")), tmp_path / "out")
    with pytest.raises(ValidationError, match="needed when ingest.source=imagefolder"):
        IngestConfig(source="imagefolder")
