"""Validate's rules for texts: the text counterpart of the per-image rules in `components/data/validate.py`.

Each file is read again (the manifest records what ingest saw, not what is on disk now) and the table
Great Expectations checks gets one row per text: whether it is UTF-8, whether anything but whitespace
is in it, its length in characters, and whether an identical text elsewhere carries another label
(which label is right cannot be known, so every copy is named) or sits in another split (a leak).
Identical texts with the same label in the same split are allowed: they are counted in the report.
"""

from __future__ import annotations

from pathlib import Path

import great_expectations.expectations as gxe
import pandas as pd

from components.data.config import ValidateConfig
from components.data.manifest import SPLITS


def inspect_text(root: Path, relative: str) -> dict[str, object]:
    data = (root / relative).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        return {"utf8": False, "error": f"byte 0x{data[error.start]:02x} at offset {error.start} is not UTF-8",
                "blank": False, "actual_chars": None}
    return {"utf8": True, "error": "", "blank": not text.strip(), "actual_chars": len(text)}


def text_table(manifest: pd.DataFrame, root: Path) -> pd.DataFrame:
    """The manifest with the file's own facts (UTF-8, blank, length) and its duplicates' conflicts; same index."""
    found = pd.DataFrame([inspect_text(root, str(p)) for p in manifest["path"]], index=manifest.index)
    table = pd.concat([manifest.drop(columns=["chars"]), found], axis=1)
    copies = table.groupby("sha256")
    table["conflicting_label"] = copies["label"].transform(lambda labels: labels.nunique(dropna=False) > 1)
    table["crosses_splits"] = copies["split"].transform(lambda splits: splits.nunique(dropna=False) > 1)
    return table


def text_expectations(cfg: ValidateConfig) -> list[gxe.Expectation]:
    """The per-text rules; `meta["rule"]` is the name every report uses."""
    rules: list[gxe.Expectation] = [
        gxe.ExpectColumnValuesToNotBeNull(column=c, meta={"rule": f"{c}_present"})
        for c in ("path", "label", "split", "sha256")
    ]
    rules += [
        gxe.ExpectColumnValuesToNotMatchRegex(column="label", regex=r"^\s*$", meta={"rule": "label_not_blank"}),
        gxe.ExpectColumnValuesToBeInSet(column="utf8", value_set=[True], meta={"rule": "utf8"}),
        gxe.ExpectColumnValuesToBeInSet(column="blank", value_set=[False], meta={"rule": "text_not_blank"}),
        gxe.ExpectColumnValuesToBeBetween(column="actual_chars", max_value=cfg.max_chars, meta={"rule": "length_in_range"}),
        gxe.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS), meta={"rule": "split_known"}),
        gxe.ExpectColumnValuesToBeInSet(column="conflicting_label", value_set=[False], meta={"rule": "label_consistent"}),
        gxe.ExpectColumnValuesToBeInSet(column="crosses_splits", value_set=[False], meta={"rule": "split_consistent"}),
    ]
    if cfg.labels is not None:
        rules.append(
            gxe.ExpectColumnValuesToBeInSet(column="label", value_set=list(cfg.labels), meta={"rule": "label_declared"})
        )
    return rules


def twins(row: pd.Series, table: pd.DataFrame) -> str:
    same = table[(table["sha256"] == row["sha256"]) & (table.index != row.name)]
    return ", ".join(f"{p} ({label!r}, {split})" for p, label, split in zip(same["path"], same["label"], same["split"]))


def text_detail(rule: str, row: pd.Series, table: pd.DataFrame, cfg: ValidateConfig) -> str | None:
    """The report's words for a text that broke `rule`; None for the rules texts share with images."""
    if rule == "utf8":
        return f"not UTF-8 text ({row['error']}); save it as UTF-8"
    if rule == "text_not_blank":
        return "the text is empty or whitespace only; give it words or drop it"
    if rule == "length_in_range":
        return f"{int(row['actual_chars']):,} characters, over validate.max_chars={cfg.max_chars:,}"
    if rule == "label_consistent":
        return f"label {row['label']!r}, but the same text is labelled otherwise: {twins(row, table)}"
    if rule == "split_consistent":
        return f"in {row['split']}, but the same text is also in another split (a leak): {twins(row, table)}"
    return None


def text_excluded(table: pd.DataFrame, broken: set[str]) -> pd.Series:
    """Rows `on_invalid=exclude` drops: the broken ones, every copy of a text whose labels conflict, and of a text
    in several splits every copy after the first (train, val, test order) so a leaked test copy goes."""
    rank = table["split"].map({s: i for i, s in enumerate(SPLITS)})
    ordered = table.assign(_rank=rank).sort_values(["_rank", "path"])
    later_copy = (ordered["crosses_splits"] & ordered.duplicated("sha256", keep="first")).reindex(table.index)
    return table["path"].isin(broken) | table["conflicting_label"] | later_copy


def duplicate_count(table: pd.DataFrame) -> int:
    """Texts that repeat another with the same label in the same split (allowed, reported)."""
    return int(table.duplicated(["sha256", "label", "split"]).sum())
