"""Ingest: materialise a labelled image dataset as image files plus `manifest.csv`.

Sources: the `elpv-dataset` package (default), an ImageFolder tree (`root/<class>/<image>`),
or a CSV manifest with `path` and `label` columns (and optionally `split`). Source files are
only read; the dataset is copied into the stage's output folder, which DVC tracks.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Literal

import pandas as pd
from PIL import Image, UnidentifiedImageError

from components.config import StageConfig
from components.errors import UserError
from components.manifest import SPLITS, assign_split, stratified_subset, write_manifest
from components.result import StageResult, sha256_file, sha256_json

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
ELPV_BINARY = {0.0: "functional", 1 / 3: "functional", 2 / 3: "defective", 1.0: "defective"}
ELPV_FOUR_CLASS = {0.0: "p000", 1 / 3: "p033", 2 / 3: "p067", 1.0: "p100"}


class IngestConfig(StageConfig):
    source: Literal["elpv", "imagefolder", "csv"] = "elpv"
    path: str | None = None
    label_mode: Literal["binary", "four_class"] = "binary"
    test_fraction: float = 0.25
    val_fraction: float = 0.2
    seed: int = 42
    limit: int | None = None


class IngestError(UserError):
    """A source that cannot be ingested; the message names the file or key to fix."""


def elpv_rows(label_mode: str) -> tuple[Path, pd.DataFrame]:
    import elpv_dataset

    root = Path(elpv_dataset.__file__).parent / "data"
    frame = pd.read_csv(
        root / "labels.csv", sep=r"\s+", header=None, names=["source_path", "defect_probability", "cell_type"]
    )
    mapping = ELPV_BINARY if label_mode == "binary" else ELPV_FOUR_CLASS
    # Probabilities are written as 0.333..., so match them to the nearest known level.
    levels = list(mapping)
    frame["label"] = [mapping[min(levels, key=lambda v: abs(v - p))] for p in frame["defect_probability"]]
    return root, frame


def imagefolder_rows(root: Path) -> tuple[Path, pd.DataFrame]:
    if not root.is_dir():
        raise IngestError(f"ingest.path={root}: not a folder; an ImageFolder is root/<class>/<image>.")
    rows = [
        {"source_path": str(p.relative_to(root)), "label": p.parent.name}
        for p in sorted(root.glob("*/*"))
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not rows:
        raise IngestError(
            f"ingest.path={root}: no images found in class sub-folders; expected root/<class>/<image> "
            f"with suffixes {sorted(IMAGE_SUFFIXES)}."
        )
    return root, pd.DataFrame(rows)


def csv_rows(csv_path: Path) -> tuple[Path, pd.DataFrame]:
    if not csv_path.is_file():
        raise IngestError(f"ingest.path={csv_path}: CSV manifest not found.")
    frame = pd.read_csv(csv_path, dtype=str)
    missing = {"path", "label"} - set(frame.columns)
    if missing:
        raise IngestError(f"{csv_path}: missing column(s) {sorted(missing)}; a CSV source needs `path` and `label`.")
    if "split" in frame.columns:
        bad = sorted(set(frame["split"].dropna()) - set(SPLITS))
        if bad:
            raise IngestError(f"{csv_path}: column `split` has {bad}; allowed values are {list(SPLITS)}.")
    return csv_path.parent, frame.rename(columns={"path": "source_path", "split": "source_split"})


def describe_image(path: Path) -> dict[str, object]:
    """Size and mode, or blanks when the file does not decode (validate reports those)."""
    try:
        with Image.open(path) as image:
            image.load()
            return {"width": image.width, "height": image.height, "mode": image.mode}
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        log.warning("%s does not decode: %s", path, error)
        return {"width": None, "height": None, "mode": None}


def destination(label: str, source_path: str, taken: set[str], sha256: str) -> str:
    name = Path(source_path).name
    relative = f"images/{label}/{name}"
    if relative in taken:
        relative = f"images/{label}/{Path(name).stem}-{sha256[:8]}{Path(name).suffix}"
    taken.add(relative)
    return relative


def source_fingerprint(cfg: IngestConfig) -> str:
    """Cheap identity of the source (names, sizes, mtimes), for orchestrator cache keys."""
    if cfg.source == "elpv":
        from importlib.metadata import version

        root = elpv_rows(cfg.label_mode)[0]
        return sha256_json({"elpv": version("elpv-dataset"), "labels": sha256_file(root / "labels.csv")})
    source = Path(cfg.path or ".")
    files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
    if source.is_file():  # a CSV manifest: the listed images count too
        files += sorted(p for p in source.parent.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    return sha256_json([(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files])


def run(cfg: IngestConfig, out_dir: Path) -> StageResult:
    if not 0 < cfg.test_fraction < 1 or not 0 <= cfg.val_fraction < 1:
        raise IngestError("ingest.test_fraction must be in (0, 1) and ingest.val_fraction in [0, 1).")
    if cfg.source == "elpv":
        source_root, frame = elpv_rows(cfg.label_mode)
    elif cfg.path is None:
        raise IngestError(f"ingest.source={cfg.source} needs ingest.path (the folder or CSV to read).")
    elif cfg.source == "imagefolder":
        source_root, frame = imagefolder_rows(Path(cfg.path))
    else:
        source_root, frame = csv_rows(Path(cfg.path))

    missing = [p for p in frame["source_path"] if not (source_root / p).is_file()]
    if missing:
        raise IngestError(f"{len(missing)} listed image(s) not found under {source_root}, e.g. {missing[:3]}.")

    frame = frame.assign(sha256=[sha256_file(source_root / p) for p in frame["source_path"]])
    strata = ["label", "cell_type"] if "cell_type" in frame.columns else ["label"]
    if cfg.limit is not None:
        frame = stratified_subset(frame, cfg.limit, cfg.seed, strata)

    splits = [assign_split(s, cfg.seed, cfg.test_fraction, cfg.val_fraction) for s in frame["sha256"]]
    if "source_split" in frame.columns:
        splits = [given if isinstance(given, str) else s for given, s in zip(frame["source_split"], splits)]
        frame = frame.drop(columns="source_split")
    frame = frame.assign(split=splits)

    out_dir.mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()
    rows = []
    for record in frame.to_dict("records"):
        relative = destination(record["label"], record["source_path"], taken, record["sha256"])
        target = out_dir / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source_root / record["source_path"], target)
        rows.append({**record, "path": relative, **describe_image(target)})
    manifest = pd.DataFrame(rows)
    manifest_path = write_manifest(manifest, out_dir / "manifest.csv")

    counts = manifest.groupby(["split", "label"]).size()
    log.info("ingested %d images from %s into %s", len(manifest), cfg.source, out_dir)
    result = StageResult(
        stage="ingest",
        out_dir=out_dir,
        metrics={"n_images": len(manifest), **{f"n_{s}_{l}": int(n) for (s, l), n in counts.items()}},
        artifacts={"manifest": manifest_path},
        info={"source": cfg.source, "labels": sorted(manifest["label"].unique()), "strata": strata},
    )
    result.save()
    return result
