"""Inputs that must not get through: hostile labels and paths, odd images, one-class datasets, bad config.

Each test drives the real ingest and validate stages (real files, real Great Expectations) on a
handful of generated images.
"""

from __future__ import annotations

import csv
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from components.core.errors import UserError
from components.data.config import IngestConfig, ValidateConfig
from components.data.ingest import MAX_PIXELS, IngestError, source_fingerprint
from components.data.ingest import run as ingest
from components.data.manifest import ManifestError, read_manifest, stratified_subset, write_manifest
from components.data.validate import DataValidationError
from components.data.validate import run as validate
from tests.conftest import write_imagefolder
from tlops.config import ConfigError, load_params

HOSTILE_LABELS = (
    "../../../../escaped",
    "/etc/absolute",
    "..",
    "a/b",
    "a_b",  # what a naive slug of "a/b" would collide with
    "comma, and space",
    'say "hi"',
    "it's",
    "line\nbreak",
    "carriage\rreturn",
    " padded ",
    "NA",
    "None",
    "007",
    "Dark",
    "dark",  # differs from "Dark" only in case
    "caf\u00e9",  # NFC
    "cafe\u0301",  # NFD: a different string that looks the same
    "défaut-β 🐱",
    "مرحبا",
    "tab\there",
)


def add_image(path: Path, seed: int, size: int = 40, mode: str = "RGB") -> Path:
    """A distinct small image (its content depends on `seed`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(path)
    return path


def files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


def png_bomb(path: Path, width: int, height: int, rows: int | None = None) -> Path:
    """A 1-bit grayscale PNG claiming `width` x `height`, with `rows` rows of zeros actually
    compressed (all of them by default): a few kilobytes on disk, a huge image once decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed pixels
    data = b"".join(compressor.compress(row) for _ in range(height if rows is None else rows)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


def write_csv(path: Path, rows: list[dict[str, object]]) -> Path:
    # Quoted, as a spreadsheet writes it: pandas' default leaves a carriage return bare.
    pd.DataFrame(rows).to_csv(path, index=False, quoting=csv.QUOTE_ALL)
    return path


def failures(out_dir: Path) -> dict[str, set[str]]:
    """Rule -> failing paths (or details, for dataset-level rules), read back from report.json."""
    rules = json.loads((out_dir / "report.json").read_text())["rules"]
    return {rule: {f["path"] or f["detail"] for f in r["failures"]} for rule, r in rules.items() if not r["success"]}


# --- labels are data ---------------------------------------------------------------------------


def test_hostile_labels_stay_inside_and_survive_ingest_validate_and_read_back(tmp_path: Path) -> None:
    source = tmp_path / "source"
    rows = []
    for i, label in enumerate(HOSTILE_LABELS):
        for split in ("train", "val", "test"):
            name = f"img_{i:02d}_{split}.png"
            add_image(source / name, seed=3 * i + len(split))
            rows.append({"path": name, "label": label, "split": split})
    csv_path = write_csv(source / "labels.csv", rows)
    out = tmp_path / "deep" / "er" / "than" / "four" / "ingest"  # an escape would land inside tmp_path
    before = files_under(tmp_path)

    result = ingest(IngestConfig(source="csv", path=str(csv_path)), out)

    written = files_under(tmp_path) - before
    assert written and all(p.is_relative_to(out) for p in written)
    assert all(p.is_relative_to(out / "images") for p in written if p.suffix == ".png")
    folders = {p.parent.relative_to(out / "images").as_posix() for p in written if p.suffix == ".png"}
    assert all("/" not in f and not f.startswith(".") for f in folders)
    assert len({f.casefold() for f in folders}) == len(HOSTILE_LABELS)  # one folder per label, even ignoring case

    ingested = read_manifest(result.artifacts["manifest"])
    assert set(ingested.labels) == set(HOSTILE_LABELS)
    by_source = dict(zip(ingested.manifest["source_path"], ingested.manifest["label"]))
    assert by_source == {r["path"]: r["label"] for r in rows}
    assert result.info["labels"] == sorted(HOSTILE_LABELS)

    validated = validate(ValidateConfig(min_per_class_split=1), out / "manifest.csv", out, tmp_path / "validate")
    assert validated.info["labels"] == sorted(HOSTILE_LABELS)
    kept = read_manifest(tmp_path / "validate" / "manifest.csv", root=out)
    assert kept.labels == ingested.labels
    assert dict(zip(kept.manifest["source_path"], kept.manifest["label"])) == by_source


def test_manifest_round_trips_labels_that_look_like_missing_or_numbers(tmp_path: Path) -> None:
    labels = ["NA", "null", "nan", "None", "N/A", "1.0", "007", "#", "=1+1", "x\r\ny", "\ufeffbom"]
    frame = pd.DataFrame(
        {"path": [f"images/{i}.png" for i in range(len(labels))], "label": labels, "split": "train",
         "sha256": [f"{i:064x}" for i in range(len(labels))], "width": 40, "height": 40, "mode": "L"}
    )
    back = read_manifest(write_manifest(frame, tmp_path / "manifest.csv")).manifest.set_index("path")
    assert back.loc[frame["path"], "label"].tolist() == labels
    assert back.loc[frame["path"], "sha256"].tolist() == frame["sha256"].tolist()
    assert back["width"].tolist() == [40] * len(labels)


def test_manifest_reader_refuses_missing_columns_and_non_utf8(tmp_path: Path) -> None:
    (tmp_path / "partial.csv").write_text("path,label\nimages/a.png,cat\n")
    with pytest.raises(ManifestError, match=r"partial\.csv: missing column\(s\) \['split', 'sha256', 'width'"):
        read_manifest(tmp_path / "partial.csv")
    (tmp_path / "latin1.csv").write_bytes("path,label,split,sha256,width,height,mode\na.png,caf\xe9,train,0,1,1,L\n".encode("latin-1"))
    with pytest.raises(ManifestError, match=r"latin1\.csv: not a readable UTF-8"):
        read_manifest(tmp_path / "latin1.csv")
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(tmp_path / "absent.csv")


# --- CSV sources -------------------------------------------------------------------------------


@pytest.fixture
def csv_source(tmp_path: Path) -> tuple[Path, Path]:
    """A CSV folder with six good rows, and an image outside it; returns (csv folder, outside image)."""
    folder = write_imagefolder(tmp_path / "data", per_class=3)
    outside = add_image(tmp_path / "elsewhere" / "secret.png", seed=99)
    return folder, outside


def good_rows(folder: Path) -> list[dict[str, object]]:
    return [{"path": str(p.relative_to(folder)), "label": p.parent.name} for p in sorted(folder.rglob("*.png"))]


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_csv_row_outside_its_folder_is_refused_unless_allowed(csv_source, tmp_path: Path, kind: str) -> None:
    folder, outside = csv_source
    if kind == "symlink":
        (folder / "dark" / "link.png").symlink_to(outside)
    escaping = {"dotdot": "../elsewhere/secret.png", "absolute": str(outside), "symlink": "dark/link.png"}[kind]
    rows = good_rows(folder)
    rows.insert(2, {"path": escaping, "label": "dark"})  # row 3
    csv_path = write_csv(folder / "list.csv", rows)

    with pytest.raises(IngestError) as error:
        ingest(IngestConfig(source="csv", path=str(csv_path)), tmp_path / "refused")
    message = str(error.value)
    assert "list.csv" in message and f"row 3 {escaping!r}" in message and "ingest.allow_outside_root" in message
    assert "\n" not in message
    assert not (tmp_path / "refused" / "manifest.csv").exists()

    allowed = ingest(IngestConfig(source="csv", path=str(csv_path), allow_outside_root=True), tmp_path / "allowed")
    manifest = read_manifest(allowed.artifacts["manifest"]).manifest
    assert len(manifest) == len(rows) and escaping in set(manifest["source_path"])


def test_csv_rows_with_blank_or_absent_paths_are_named(csv_source, tmp_path: Path) -> None:
    folder, _ = csv_source
    rows = good_rows(folder) + [{"path": "dark/nope.png", "label": "dark"}]
    with pytest.raises(IngestError, match=r"list\.csv: 1 row\(s\) with a path to no file: row 7 'dark/nope\.png'"):
        ingest(IngestConfig(source="csv", path=str(write_csv(folder / "list.csv", rows))), tmp_path / "out")
    rows[-1] = {"path": "", "label": "dark"}
    with pytest.raises(IngestError, match=r"list\.csv: 1 row\(s\) with an empty path: row 7"):
        ingest(IngestConfig(source="csv", path=str(write_csv(folder / "list.csv", rows))), tmp_path / "out")


def test_non_utf8_csv_fails_in_one_line_naming_the_file(csv_source, tmp_path: Path) -> None:
    folder, _ = csv_source
    text = "path,label\n" + "".join(f"{r['path']},caf\xe9\n" for r in good_rows(folder))
    (folder / "latin1.csv").write_bytes(text.encode("latin-1"))
    with pytest.raises(IngestError) as error:
        ingest(IngestConfig(source="csv", path=str(folder / "latin1.csv")), tmp_path / "out")
    assert isinstance(error.value, UserError)
    assert "latin1.csv: not UTF-8 text (byte 0xe9 on line 2); save it as UTF-8." in str(error.value)
    assert "\n" not in str(error.value)
    # The same rows in UTF-8 (with a byte-order mark, as spreadsheets write it) are read.
    (folder / "utf8.csv").write_bytes(text.encode("utf-8-sig"))
    result = ingest(IngestConfig(source="csv", path=str(folder / "utf8.csv")), tmp_path / "ok")
    assert read_manifest(result.artifacts["manifest"]).labels == ("caf\u00e9",)


def test_csv_column_that_ingest_writes_is_refused(csv_source, tmp_path: Path) -> None:
    folder, _ = csv_source
    rows = [{**r, "sha256": "mine"} for r in good_rows(folder)]
    with pytest.raises(IngestError, match=r"list\.csv: column\(s\) \['sha256'\] are written by ingest"):
        ingest(IngestConfig(source="csv", path=str(write_csv(folder / "list.csv", rows))), tmp_path / "out")


# --- ImageFolder -------------------------------------------------------------------------------


def test_imagefolder_symlink_out_of_the_root_is_refused_unless_allowed(tmp_path: Path) -> None:
    root = write_imagefolder(tmp_path / "root", per_class=2)
    secret = add_image(tmp_path / "elsewhere" / "secret.png", seed=5)
    (root / "dark" / "link.png").symlink_to(secret)
    (root / "bright" / "inside.png").symlink_to(root / "bright" / "bright_000.png")  # stays inside: fine
    (root / ".ipynb_checkpoints").mkdir()
    add_image(root / ".ipynb_checkpoints" / "scratch.png", seed=6)  # hidden: not a class

    with pytest.raises(IngestError) as error:
        ingest(IngestConfig(source="imagefolder", path=str(root)), tmp_path / "refused")
    assert "dark/link.png" in str(error.value) and "ingest.allow_outside_root" in str(error.value)

    allowed = ingest(IngestConfig(source="imagefolder", path=str(root), allow_outside_root=True), tmp_path / "ok")
    manifest = read_manifest(allowed.artifacts["manifest"]).manifest
    assert set(manifest["source_path"]) >= {"dark/link.png", "bright/inside.png"}
    assert set(manifest["label"]) == {"dark", "bright"} and len(manifest) == 6


def test_imagefolder_class_folder_linked_from_outside_is_refused(tmp_path: Path) -> None:
    root = write_imagefolder(tmp_path / "root", per_class=2)
    write_imagefolder(tmp_path / "other", per_class=1, seed=3)
    (root / "linked").symlink_to(tmp_path / "other" / "dark", target_is_directory=True)
    with pytest.raises(IngestError, match=r"linked/dark_000\.png"):
        ingest(IngestConfig(source="imagefolder", path=str(root)), tmp_path / "out")


# --- images ------------------------------------------------------------------------------------


@pytest.fixture
def odd_images(tmp_path: Path) -> Path:
    """A CSV source: per class and split one good RGB image, plus one of each odd kind in train."""
    root = tmp_path / "odd"
    rows = []
    for i, (label, split) in enumerate((label, split) for label in ("dark", "bright") for split in ("train", "val", "test")):
        rows.append({"path": str(add_image(root / label / f"good_{split}.png", seed=i).relative_to(root)), "label": label, "split": split})
    sixteen = np.array([[0, 257, 32896, 65535] * 10] * 40, dtype=np.uint16)
    Image.fromarray(sixteen).save(root / "dark" / "gray16.png")
    Image.new("CMYK", (40, 40), (0, 255, 0, 0)).save(root / "dark" / "cmyk.jpg")
    palette = Image.new("P", (40, 40), 1)
    palette.putpalette([0, 0, 0, 200, 30, 10] + [0, 0, 0] * 254)
    palette.save(root / "bright" / "palette.png")
    palette.save(root / "bright" / "palette_transparent.png", transparency=0)
    Image.fromarray(np.full((40, 40), 70000, dtype=np.int32), mode="I").save(root / "bright" / "int32.tif")
    Image.new("RGB", (1, 1), (9, 9, 9)).save(root / "bright" / "one_pixel.png")
    (root / "dark" / "empty.png").write_bytes(b"")
    png_bomb(root / "dark" / "bomb_guard.png", 8200, 8200)  # over MAX_PIXELS, under Pillow's default limit
    png_bomb(root / "dark" / "bomb_warn.png", 10_000, 10_000)  # Pillow only warns: refused here all the same
    png_bomb(root / "bright" / "bomb_error.png", 100_000, 100_000, rows=4)  # Pillow's DecompressionBombError
    odd = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("good_"))
    rows += [{"path": str(p.relative_to(root)), "label": p.parent.name, "split": "train"} for p in odd]
    return write_csv(root / "list.csv", rows)


def test_odd_images_are_converted_or_named_never_a_crash(odd_images: Path, tmp_path: Path) -> None:
    assert 8200 * 8200 > MAX_PIXELS > 40 * 40
    out = tmp_path / "ingest"
    result = ingest(IngestConfig(source="csv", path=str(odd_images)), out)
    manifest = read_manifest(result.artifacts["manifest"]).manifest.set_index("source_path")

    def stored(name: str) -> Image.Image:
        return Image.open(out / manifest.loc[name, "path"])

    # Converted by the stated rule, recorded in the manifest, and stored as PNG.
    conversions = {
        "dark/gray16.png": ("I;16", "L"),
        "dark/cmyk.jpg": ("CMYK", "RGB"),
        "bright/palette.png": ("P", "RGB"),
        "bright/palette_transparent.png": ("P", "RGB"),
    }
    for name, (source_mode, mode) in conversions.items():
        assert (manifest.loc[name, "source_mode"], manifest.loc[name, "mode"]) == (source_mode, mode), name
        assert manifest.loc[name, "path"].endswith(".png") and stored(name).mode == mode
        assert manifest.loc[name, "sha256"] != manifest.loc[name, "source_sha256"]
    assert list(np.asarray(stored("dark/gray16.png"))[0, :4]) == [0, 1, 128, 255]  # scaled, not clipped
    assert stored("bright/palette.png").getpixel((0, 0)) == (200, 30, 10)
    assert result.metrics["n_converted"] == 4
    # Copied as they are: good images byte for byte, the rest for validation to refuse.
    assert manifest.loc["dark/good_train.png", "sha256"] == manifest.loc["dark/good_train.png", "source_sha256"]
    assert manifest.loc["bright/int32.tif", "mode"] == "I"
    assert manifest.loc["dark/bomb_guard.png", "width"] == 8200 and pd.isna(manifest.loc["dark/bomb_guard.png", "mode"])
    assert pd.isna(manifest.loc["dark/empty.png", "mode"])

    with pytest.raises(DataValidationError) as error:
        validate(ValidateConfig(min_per_class_split=1), out / "manifest.csv", out, tmp_path / "validate")
    path = {name: manifest.loc[name, "path"] for name in manifest.index}
    found = failures(tmp_path / "validate")
    bad_decode = ("dark/empty.png", "dark/bomb_guard.png", "dark/bomb_warn.png", "bright/bomb_error.png")
    assert found["decodes"] == {path[n] for n in bad_decode}
    assert found["mode_allowed"] == {path["bright/int32.tif"]}
    assert found["width_in_range"] == {path["bright/one_pixel.png"], path["dark/bomb_guard.png"]}
    assert set(found) == {"decodes", "mode_allowed", "width_in_range", "height_in_range"}
    report = str(error.value)
    assert f"`{path['dark/empty.png']}` (from `dark/empty.png`): decodes: does not decode (empty file (0 bytes))" in report
    assert "8200x8200 is over the 67,108,864-pixel limit (decompression-bomb guard)" in report
    assert report.count("could be decompression bomb") == 2  # Pillow's own words, for the two larger ones
    assert "mode I is not one of ['L', 'RGB']; 32-bit integer pixels have no fixed range" in report
    assert f"`{path['bright/one_pixel.png']}` (from `bright/one_pixel.png`): width_in_range: width 1" in report

    kept = validate(
        ValidateConfig(on_invalid="exclude", min_per_class_split=1), out / "manifest.csv", out, tmp_path / "exclude"
    )
    assert kept.metrics["n_excluded"] == 6 and kept.metrics["n_images"] == 10
    excluded = set(pd.read_csv(tmp_path / "exclude" / "excluded.csv")["source"])
    assert excluded == {*bad_decode, "bright/int32.tif", "bright/one_pixel.png"}


# --- classes and labels ------------------------------------------------------------------------


def test_a_single_class_is_refused_by_validation(tmp_path: Path) -> None:
    root = write_imagefolder(tmp_path / "one", per_class=6)
    for image in (root / "bright").iterdir():
        image.rename(root / "dark" / image.name)
    (root / "bright").rmdir()
    out = tmp_path / "ingest"
    ingest(IngestConfig(source="imagefolder", path=str(root), test_fraction=0.3, val_fraction=0.3), out)
    with pytest.raises(DataValidationError, match=r"dataset: two_labels: 1 label\(s\) \['dark'\]; a classifier needs"):
        validate(ValidateConfig(min_per_class_split=1), out / "manifest.csv", out, tmp_path / "validate")
    # The same images with a second class pass (the rule is what failed, not the images).
    write_imagefolder(tmp_path / "one", per_class=6, seed=1)
    ingest(IngestConfig(source="imagefolder", path=str(root), test_fraction=0.3, val_fraction=0.3), tmp_path / "two")
    passed = validate(ValidateConfig(min_per_class_split=1), tmp_path / "two" / "manifest.csv", tmp_path / "two", tmp_path / "v2")
    assert passed.info["labels"] == ["bright", "dark"]


def test_empty_and_blank_labels_are_refused_naming_the_files(csv_source, tmp_path: Path) -> None:
    folder, _ = csv_source
    rows = good_rows(folder)
    rows[0]["label"], rows[3]["label"] = "", "   "
    out = tmp_path / "ingest"
    result = ingest(IngestConfig(source="csv", path=str(write_csv(folder / "list.csv", rows))), out)
    assert result.info["labels"] == ["   ", "bright", "dark"]
    manifest = read_manifest(result.artifacts["manifest"]).manifest.set_index("source_path")
    with pytest.raises(DataValidationError) as error:
        validate(ValidateConfig(min_per_class_split=1), out / "manifest.csv", out, tmp_path / "validate")
    found = failures(tmp_path / "validate")
    assert found["label_present"] == {manifest.loc[rows[0]["path"], "path"]}
    assert found["label_not_blank"] == {manifest.loc[rows[3]["path"], "path"]}
    assert f"(from `{rows[0]['path']}`): label_present" in str(error.value)


# --- config ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("ingest.test_fraction=1.5", "ingest.test_fraction"),
        ("ingest.test_fraction=0", "ingest.test_fraction"),
        ("ingest.val_fraction=1", "ingest.val_fraction"),
        ("ingest.val_fraction=-0.1", "ingest.val_fraction"),
        ("ingest.limit=0", "ingest.limit"),
        ("ingest.source=csv", "ingest.path"),
        ("ingest.allow_outside_root=perhaps", "ingest.allow_outside_root"),
        ("validate.min_per_class_split=0", "validate.min_per_class_split"),
        ("validate.min_side=0", "validate.min_side"),
        ("validate.max_side=16", "validate.max_side"),
        ("validate.allowed_modes=[rgb]", "validate.allowed_modes"),
        ("validate.allowed_modes=[]", "validate.allowed_modes"),
        ("validate.labels=[only]", "validate.labels"),
        ("validate.labels=[a, a]", "validate.labels"),
        ("validate.labels=[a, '']", "validate.labels"),
    ],
)
def test_out_of_range_ingest_and_validate_keys_fail_at_load(override: str, named: str) -> None:
    with pytest.raises(ConfigError, match="^" + named.replace(".", r"\.") + ":"):
        load_params(None, [override])


def test_boundary_values_load() -> None:
    params = load_params(None, ["ingest.val_fraction=0", "ingest.limit=1", "ingest.test_fraction=0.99",
                                "validate.min_side=64", "validate.max_side=64", "validate.allowed_modes=[L, I;16]",
                                "ingest.source=csv", "ingest.path=labels.csv", "ingest.allow_outside_root=true"])
    assert (params.ingest.val_fraction, params.ingest.limit, params.ingest.allow_outside_root) == (0, 1, True)
    assert params.validate.min_side == params.validate.max_side == 64
    assert params.validate.allowed_modes == ("L", "I;16")



def test_a_subset_keeps_rows_without_a_label_so_validation_can_name_them() -> None:
    frame = pd.DataFrame(
        {"label": ["a"] * 10 + ["b"] * 10 + [np.nan] * 4, "sha256": [f"{i:064x}" for i in range(24)]}
    )
    subset = stratified_subset(frame, 12, seed=0, strata=["label"])
    assert subset["label"].isna().sum() == 2 and (subset["label"] == "a").sum() == 5


def test_source_fingerprint_follows_every_listed_file_even_outside(csv_source, tmp_path: Path) -> None:
    folder, outside = csv_source
    rows = good_rows(folder) + [{"path": str(outside), "label": "dark"}]
    cfg = IngestConfig(source="csv", path=str(write_csv(folder / "list.csv", rows)), allow_outside_root=True)
    before = source_fingerprint(cfg)
    assert source_fingerprint(cfg) == before
    add_image(outside, seed=1234)  # the same name, new pixels
    assert source_fingerprint(cfg) != before
    with pytest.raises(IngestError, match="allow_outside_root"):
        source_fingerprint(cfg.model_copy(update={"allow_outside_root": False}))
