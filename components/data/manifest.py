"""The dataset manifest: one row per image, the contract between ingest and every later stage.

Paths in the manifest are relative to the dataset root (the folder holding the images), so
the dataset can move, be pushed and pulled by DVC, and still resolve.

Labels are data: any string (commas, quotes, slashes, line breaks, any Unicode) is written and
read back exactly. Every text field is quoted, and only an empty field reads as missing, so a
label such as `NA`, `None` or `007` stays that string. An empty label is a missing label.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from components.core.errors import UserError
from components.core.result import atomic_path

REQUIRED_COLUMNS = ("path", "label", "split", "sha256", "width", "height", "mode")
# A text dataset's manifest: `chars` (the text's length in characters) where an image's has its size and mode.
TEXT_REQUIRED_COLUMNS = ("path", "label", "split", "sha256", "chars")
# Read as text whatever they look like: a label `1.0` or `007` is not a number.
TEXT_COLUMNS = ("path", "label", "split", "sha256", "mode", "source_path", "source_sha256", "source_mode", "domain")
SPLITS = ("train", "val", "test")


class ManifestError(UserError):
    """A manifest that cannot be used; the message names the file and what to fix."""


def manifest_modality(columns: object) -> str:
    """`text` for a manifest of texts (it has `chars`), else `image`: the manifest says what it lists."""
    return "text" if "chars" in columns and "width" not in columns else "image"  # type: ignore[operator]


def required_columns(modality: str) -> tuple[str, ...]:
    return TEXT_REQUIRED_COLUMNS if modality == "text" else REQUIRED_COLUMNS


@dataclass(frozen=True)
class Dataset:
    """A manifest plus the folder its relative paths resolve against."""

    manifest: pd.DataFrame
    root: Path
    labels: tuple[str, ...]
    target: str = "label"  # the column `labels` and `label_index` describe (`for_task` picks another)

    def for_task(self, column: str) -> Dataset:
        """The same images seen through another manifest column (a task): its values, as text, are the labels.

        Numbers (ELPV's `defect_probability`) become their text (`0.0`, `1.0`); a missing value stays missing.
        """
        if column == self.target:
            return self
        if column not in self.manifest.columns:
            raise ManifestError(f"the manifest has no column {column!r}; it has {list(self.manifest.columns)}.")
        values = self.manifest[column].map(lambda value: value if isinstance(value, str) or pd.isna(value) else str(value))
        return Dataset(manifest=self.manifest.assign(**{column: values}), root=self.root,
                       labels=tuple(sorted(values.dropna().unique())), target=column)

    @property
    def modality(self) -> str:
        return manifest_modality(self.manifest.columns)

    def split(self, name: str) -> pd.DataFrame:
        return self.manifest[self.manifest["split"] == name].reset_index(drop=True)

    def image_path(self, relative: str) -> Path:
        return self.root / relative

    def label_index(self, frame: pd.DataFrame) -> list[int]:
        index = {label: i for i, label in enumerate(self.labels)}
        return [index[label] for label in frame[self.target]]


def read_manifest(csv_path: Path, root: Path | None = None) -> Dataset:
    """Load a manifest written by ingest (or validate) and check its columns."""
    csv_path = Path(csv_path)
    if not csv_path.exists():
        raise ManifestError(f"{csv_path}: manifest not found; run the ingest stage first.")
    try:
        frame = pd.read_csv(
            csv_path,
            dtype={c: str for c in TEXT_COLUMNS},
            encoding="utf-8",
            keep_default_na=False,  # `NA`, `null`, `None` are labels like any other
            na_values=[""],
        )
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        message = f"{csv_path}: not a readable UTF-8 CSV manifest ({reason}); rerun the ingest stage."
        raise ManifestError(message) from None
    required = required_columns(manifest_modality(frame.columns))
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise ManifestError(
            f"{csv_path}: missing column(s) {missing}; a manifest needs {list(required)}."
        )
    labels = tuple(sorted(frame["label"].dropna().unique()))
    return Dataset(manifest=frame, root=Path(root) if root else csv_path.parent, labels=labels)


def write_manifest(frame: pd.DataFrame, csv_path: Path) -> Path:
    """Write atomically (a temporary name, then a rename), sorted by path, required columns first."""
    required = required_columns(manifest_modality(frame.columns))
    ordered = list(required) + [c for c in frame.columns if c not in required]
    with atomic_path(csv_path) as partial:
        # Quoting every text field keeps a carriage return inside a label from ending the row.
        frame[ordered].sort_values("path").to_csv(
            partial, index=False, encoding="utf-8", quoting=csv.QUOTE_NONNUMERIC, lineterminator="\n"
        )
    return Path(csv_path)


def unit_hash(*parts: object) -> float:
    """A uniform number in [0, 1) determined only by `parts`."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_split(sha256: str, seed: int, test_fraction: float, val_fraction: float) -> str:
    """Split of one image, a pure function of its content hash and the seed.

    Because no image's split depends on any other image, adding images never moves existing
    ones, and exact duplicates always land together (no leakage by construction). Each
    stratum (label, source group) therefore receives `test_fraction` of its images in
    expectation rather than by exact quota; exact quotas would reshuffle on every addition.
    `val_fraction` is the share of the non-test part held out for validation.
    """
    u = unit_hash("split", seed, sha256)
    if u < test_fraction:
        return "test"
    if (u - test_fraction) / (1.0 - test_fraction) < val_fraction:
        return "val"
    return "train"


def stratified_subset(frame: pd.DataFrame, limit: int, seed: int, strata: list[str]) -> pd.DataFrame:
    """A deterministic subset of about `limit` rows keeping each stratum's share (a missing label is a
    stratum too, so validation still sees and names those rows)."""
    if limit >= len(frame):
        return frame
    order = frame["sha256"].map(lambda s: unit_hash("subset", seed, s))
    ranked = frame.assign(_order=order).sort_values("_order")
    share = limit / len(frame)
    parts = [
        group.head(max(1, round(len(group) * share)))
        for _, group in ranked.groupby(strata, sort=True, dropna=False)
    ]
    return pd.concat(parts).drop(columns="_order").sort_index()
