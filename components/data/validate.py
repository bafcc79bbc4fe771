"""Validate: check a manifest and the images (or texts) it lists with a Great Expectations suite.

A text dataset's per-text rules (UTF-8, not blank, length, duplicates with conflicting labels or
across splits) are `components/data/text_rules.py`; the count rules below are shared.

Every file is re-opened, because the manifest records what ingest saw, not what is on disk now.
Two tables are validated: one row per image (per-image rules: the file decodes, within the
size and mode bounds, a non-blank label, a known split, unique content) and one row per
(label, split) with its image count (the minimum-count rule, and at least two labels: a
classifier of one class is refused). Images are decoded with ingest's decompression-bomb guard
(`components.ingest.MAX_PIXELS`), so an oversized file is reported, never decoded. With
`on_invalid="exclude"` the rows that broke a per-image rule are dropped from the output manifest
and the count rules are checked on what is left, since exclusion cannot add images. The dataset
folder and the input manifest are only read.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import great_expectations as gx
import great_expectations.expectations as gxe
import pandas as pd
from great_expectations.core import ExpectationSuiteValidationResult
from great_expectations.data_context import AbstractDataContext
from great_expectations.data_context.types.base import (
    DataContextConfig,
    InMemoryStoreBackendDefaults,
    ProgressBarsConfig,
)
from PIL import ImageMode

from components.core.errors import UserError
from components.core.result import RESULT_FILE, StageResult, write_json
from components.data import text_rules
from components.data.config import ValidateConfig
from components.data.ingest import read_image
from components.data.manifest import SPLITS, manifest_modality, read_manifest, write_manifest

log = logging.getLogger(__name__)

DOCS_SITE = "validate"
OUTPUTS = ("manifest.csv", "excluded.csv", "report.json", "report.md", RESULT_FILE, "data_docs")


# Why a mode that ingest leaves alone is refused, and what to do about it.
MODE_HINTS = {
    "I": "32-bit integer pixels have no fixed range; convert the source images to 8-bit yourself",
    "F": "floating-point pixels have no fixed range; convert the source images to 8-bit yourself",
}


class DataValidationError(UserError):
    """The dataset broke a rule; the message is the readable report."""


@dataclass(frozen=True)
class Failure:
    rule: str
    detail: str
    path: str | None = None  # None for a dataset-level rule such as the minimum count
    source: str | None = None  # the file the user gave (manifest `source_path`), when known

    def line(self) -> str:
        subject = f"`{self.path}`" if self.path is not None else "dataset"
        origin = f" (from `{self.source}`)" if self.source and self.source != self.path else ""
        return f"- {subject}{origin}: {self.rule}: {self.detail}"


@dataclass(frozen=True)
class Outcome:
    """One suite's run: whether it passed, and every rule with the failures it found."""

    success: bool
    rules: dict[str, list[Failure]]

    @property
    def failures(self) -> list[Failure]:
        """Every failure, one file's together (GX does not keep the suite's order of rules)."""
        return sorted((f for failures in self.rules.values() for f in failures), key=lambda f: (f.path or "", f.rule))


def inspect_image(root: Path, relative: str) -> dict[str, object]:
    """What the file decodes to; the header's size (when readable) and the error when it does not."""
    path = root / relative
    facts = read_image(path)
    channels = len(ImageMode.getmode(facts.mode).bands) if facts.mode and not facts.error else None
    return {
        "decodes": not facts.error,
        "error": facts.error.replace(str(path), relative),  # keeps this machine's folders out of reports
        "actual_mode": facts.mode if not facts.error else None,
        "channels": channels,
        "actual_width": facts.width,
        "actual_height": facts.height,
    }


def image_table(manifest: pd.DataFrame, root: Path) -> pd.DataFrame:
    """The manifest with ingest's size and mode replaced by the file's own; same index."""
    found = pd.DataFrame([inspect_image(root, str(p)) for p in manifest["path"]], index=manifest.index)
    return pd.concat([manifest.drop(columns=["width", "height", "mode"]), found], axis=1)


def image_expectations(cfg: ValidateConfig, tasks: Sequence[str] = ()) -> list[gxe.Expectation]:
    """The per-image rules; `meta["rule"]` is the name every report uses. Every column a model learns as a task
    (`finetune.tasks`) must hold a value in every row, like `label`."""
    side = {"min_value": cfg.min_side, "max_value": cfg.max_side}
    rules: list[gxe.Expectation] = [
        gxe.ExpectColumnValuesToNotBeNull(column=c, meta={"rule": f"{c}_present"})
        for c in dict.fromkeys(("path", "label", "split", "sha256", *tasks))
    ]
    rules += [
        gxe.ExpectColumnValuesToNotMatchRegex(column="label", regex=r"^\s*$", meta={"rule": "label_not_blank"}),
        gxe.ExpectColumnValuesToBeInSet(column="decodes", value_set=[True], meta={"rule": "decodes"}),
        gxe.ExpectColumnValuesToBeInSet(
            column="actual_mode", value_set=list(cfg.allowed_modes), meta={"rule": "mode_allowed"}
        ),
        gxe.ExpectColumnValuesToBeBetween(column="actual_width", **side, meta={"rule": "width_in_range"}),
        gxe.ExpectColumnValuesToBeBetween(column="actual_height", **side, meta={"rule": "height_in_range"}),
        gxe.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS), meta={"rule": "split_known"}),
        gxe.ExpectColumnValuesToBeUnique(column="sha256", meta={"rule": "sha256_unique"}),
    ]
    if cfg.labels is not None:
        rules.append(
            gxe.ExpectColumnValuesToBeInSet(column="label", value_set=list(cfg.labels), meta={"rule": "label_declared"})
        )
    return rules


def count_table(kept: pd.DataFrame, labels: tuple[str, ...], splits: list[str]) -> pd.DataFrame:
    """Images per (label, split), zeros included, so a class missing from a split shows up."""
    counts = kept.groupby(["label", "split"]).size()
    grid = pd.MultiIndex.from_product([labels, splits], names=["label", "split"])
    return counts.reindex(grid, fill_value=0).rename("n_images").reset_index()


def gx_context(docs_dir: Path) -> AbstractDataContext:
    """An in-memory context whose only Data Docs site is `docs_dir`; no analytics, no progress bars."""
    site = {
        "class_name": "SiteBuilder",
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
    }
    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(),
        data_docs_sites={DOCS_SITE: site},
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
    )
    context = gx.get_context(mode="ephemeral", project_config=config)
    context.data_sources.add_pandas(name="validate")
    return context


def run_suite(
    context: AbstractDataContext,
    name: str,
    frame: pd.DataFrame,
    expectations: list[gxe.Expectation],
    id_columns: list[str],
) -> ExpectationSuiteValidationResult:
    """Validate `frame`; the result is kept in the context's store for the Data Docs."""
    asset = context.data_sources.get("validate").add_dataframe_asset(name=name)
    suite = context.suites.add(gx.ExpectationSuite(name=name, expectations=expectations))
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name=name, data=asset.add_batch_definition_whole_dataframe("all"), suite=suite)
    )
    # COMPLETE lists every failing row, identified by `id_columns`, not only the first 20.
    result_format = {"result_format": "COMPLETE", "unexpected_index_column_names": id_columns}
    return definition.run(batch_parameters={"dataframe": frame}, result_format=result_format)


def failing_ids(result: ExpectationSuiteValidationResult) -> dict[str, list[dict[str, object]]]:
    """Rule name -> the id columns of each failing row (empty for a rule that passed)."""
    failing: dict[str, list[dict[str, object]]] = {}
    for outcome in result.results:
        rule = outcome.expectation_config.meta["rule"]
        # GX records a crashed expectation as merely unsuccessful; here that is a bug, not bad data.
        # Its exception_info is one record, or one record per metric that failed to compute.
        info = outcome.exception_info
        crashes = [r for r in ([info] if "raised_exception" in info else info.values()) if r["raised_exception"]]
        if crashes:
            raise RuntimeError(f"validate rule {rule} could not run: {crashes[0]['exception_message']}")
        # A table-level rule (two_labels) has no failing rows; one empty id stands for "failed".
        failing[rule] = [] if outcome.success else outcome.result.get("unexpected_index_list", [{}])
    return failing


def image_detail(rule: str, row: pd.Series, table: pd.DataFrame, cfg: ValidateConfig) -> str:
    if rule == "decodes":
        return f"does not decode ({row['error']})"
    if rule == "mode_allowed":
        hint = f"; {MODE_HINTS[row['actual_mode']]}" if row["actual_mode"] in MODE_HINTS else ""
        return f"mode {row['actual_mode']} is not one of {list(cfg.allowed_modes)}{hint}"
    if rule in ("width_in_range", "height_in_range"):
        side = rule.split("_")[0]
        return f"{side} {int(row[f'actual_{side}'])} is outside [{cfg.min_side}, {cfg.max_side}]"
    if rule == "sha256_unique":
        twins = table[(table["sha256"] == row["sha256"]) & (table.index != row.name)]
        leaks = (twins["split"] != row["split"]).any()
        kind = "leaks across splits" if leaks else f"duplicate within {row['split']}"
        return f"{kind}: same content as " + ", ".join(f"{p} ({s})" for p, s in zip(twins["path"], twins["split"]))
    if rule == "split_known":
        return f"split {row['split']!r} is not one of {list(SPLITS)}"
    if rule == "label_declared":
        return f"label {row['label']!r} is not one of {list(cfg.labels or ())}"
    if rule == "label_not_blank":
        return f"label {row['label']!r} is blank; give the image a class"
    return f"column {rule.removesuffix('_present')} is blank"


def source_of(row: pd.Series) -> str | None:
    source = row.get("source_path")
    return source if isinstance(source, str) else None


def check_images(context: AbstractDataContext, table: pd.DataFrame, cfg: ValidateConfig, tasks: Sequence[str] = (),
                 texts: bool = False) -> Outcome:
    # Texts: one task, `label` (finetune refuses several tasks for a text encoder).
    expectations = text_rules.text_expectations(cfg) if texts else image_expectations(cfg, tasks)
    result = run_suite(context, "texts" if texts else "images", table, expectations, ["path"])

    def detail(rule: str, row: pd.Series) -> str:
        said = text_rules.text_detail(rule, row, table, cfg) if texts else None
        return said if said is not None else image_detail(rule, row, table, cfg)

    rules: dict[str, list[Failure]] = {}
    for rule, ids in failing_ids(result).items():
        rows = table[table["path"].isin([i["path"] for i in ids])]
        rules[rule] = [Failure(rule, detail(rule, row), str(row["path"]), source_of(row)) for _, row in rows.iterrows()]
    return Outcome(bool(result.success), rules)


def check_counts(context: AbstractDataContext, counts: pd.DataFrame, cfg: ValidateConfig, items: str = "image") -> Outcome:
    minimum = gxe.ExpectColumnValuesToBeBetween(
        column="n_images", min_value=cfg.min_per_class_split, meta={"rule": "min_per_class_split"}
    )
    # With declared labels the grid holds them all (two or more), and min_per_class_split finds the absent ones.
    two_labels = gxe.ExpectColumnUniqueValueCountToBeBetween(column="label", min_value=2, meta={"rule": "two_labels"})
    result = run_suite(context, "class_counts", counts, [minimum, two_labels], ["label", "split"])
    failing = failing_ids(result)
    need = f"need at least {cfg.min_per_class_split}"
    too_few = [
        Failure("min_per_class_split", f"{i['n_images']} {items}(s) of label {i['label']!r} in split {i['split']!r}; "
                f"{need}")
        for i in failing["min_per_class_split"]
    ]
    found = sorted(counts["label"].unique())
    one_class = [
        Failure("two_labels", f"{len(found)} label(s) {found}; a classifier needs at least two: add {items}s of "
                "another class, or check the source's labels")
    ] if failing["two_labels"] else []
    return Outcome(bool(result.success), {"min_per_class_split": too_few, "two_labels": one_class})


def excluded_rows(table: pd.DataFrame, failures: list[Failure]) -> pd.Series:
    """Rows that broke a per-image rule. Of identical images the first copy stays (train, val,
    test, then path order), so a leaked test image is dropped rather than a training image."""
    broken = {f.path for f in failures if f.rule != "sha256_unique"}
    rank = table["split"].map({s: i for i, s in enumerate(SPLITS)})
    ordered = table.assign(_rank=rank).sort_values(["_rank", "path"])
    later_copy = ordered["sha256"].notna() & ordered.duplicated("sha256", keep="first")
    return table["path"].isin(broken) | later_copy.reindex(table.index)


def class_balance(counts: pd.DataFrame) -> dict[str, dict[str, dict[str, float]]]:
    """Per split: each label's count and share (reported, never a failure)."""
    balance: dict[str, dict[str, dict[str, float]]] = {}
    for split, group in counts.groupby("split", sort=False):
        total = int(group["n_images"].sum())
        balance[str(split)] = {
            label: {"count": int(n), "share": round(n / total, 4) if total else 0.0}
            for label, n in zip(group["label"], group["n_images"])
        }
    return balance


def balance_table(balance: dict[str, dict[str, dict[str, float]]]) -> str:
    rows = [
        f"| {split} | {label} | {c['count']} | {c['share']:.1%} |"
        for split, per_label in balance.items()
        for label, c in per_label.items()
    ]
    return "\n".join(["## Class balance", "", "| split | label | images | share |", "|---|---|---|---|", *rows, ""])


def readable_report(headline: str, broken: list[Failure], excluded: list[Failure]) -> str:
    lines = [f"# Data validation {headline}", ""]
    if broken:
        lines += ["## Rules broken", "", *[f.line() for f in broken], ""]
    if excluded:
        lines += ["## Excluded from the manifest (on_invalid=exclude)", "", *[f.line() for f in excluded], ""]
    return "\n".join(lines)


def clear_outputs(out_dir: Path, dataset_root: Path, manifest_csv: Path) -> None:
    """Remove a previous run's outputs, so that none of them can pass for this run's."""
    if out_dir.resolve().is_relative_to(dataset_root.resolve()) or manifest_csv.resolve().parent == out_dir.resolve():
        raise ValueError(
            f"validate out_dir {out_dir} must lie outside the dataset folder {dataset_root} and must not "
            f"hold the input manifest {manifest_csv}: give the validate stage its own folder."
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in OUTPUTS:
        path = out_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def write_reports(
    out_dir: Path,
    cfg: ValidateConfig,
    n_images: int,
    outcomes: list[Outcome],
    balance: dict[str, dict[str, dict[str, float]]],
    excluded: list[Failure],
    text: str,
) -> dict[str, Path]:
    rules = {
        rule: {"success": not failures, "failures": [asdict(f) for f in failures]}
        for outcome in outcomes
        for rule, failures in outcome.rules.items()
    }
    report = {
        "success": all(o.success for o in outcomes),
        "on_invalid": cfg.on_invalid,
        "n_images": n_images,
        "n_excluded": len({f.path for f in excluded}),
        "rules": rules,
        "class_balance": balance,
        "data_docs": "data_docs/index.html",
    }
    artifacts = {
        "report_json": write_json(out_dir / "report.json", report),
        "report_md": out_dir / "report.md",
        "data_docs": out_dir / "data_docs" / "index.html",
    }
    docs = "Great Expectations Data Docs: data_docs/index.html"
    artifacts["report_md"].write_text(f"{text}\n{balance_table(balance)}\n{docs}\n")
    if cfg.on_invalid == "exclude":
        artifacts["excluded"] = out_dir / "excluded.csv"
        frame = pd.DataFrame([asdict(f) for f in excluded], columns=["path", "rule", "detail", "source"])
        frame.to_csv(artifacts["excluded"], index=False)
    return artifacts


def run(cfg: ValidateConfig, manifest_csv: Path, dataset_root: Path, out_dir: Path,
        tasks: Sequence[str] = ("label",)) -> StageResult:
    """Validate, write the reports and `result.json`, then raise `DataValidationError` if a rule broke
    that `on_invalid` cannot fix. `info["success"]` says whether every rule passed as given; the
    validated `manifest.csv` is written (and listed in the artifacts) only when no rule is left broken.

    `tasks`: the manifest columns the model will learn (`finetune.tasks`); one the manifest lacks is refused
    before any work, and a row without a value in one breaks the `<task>_present` rule."""
    manifest_csv, dataset_root, out_dir = Path(manifest_csv), Path(dataset_root), Path(out_dir)
    clear_outputs(out_dir, dataset_root, manifest_csv)
    manifest = read_manifest(manifest_csv, dataset_root).manifest
    unknown = [task for task in tasks if task not in manifest.columns]
    if unknown:
        raise DataValidationError(f"finetune.tasks: {unknown} not among the columns of {manifest_csv} "
                                  f"({list(manifest.columns)}); name columns that hold a class for every image.")
    texts = manifest_modality(manifest.columns) == "text"
    table = text_rules.text_table(manifest, dataset_root) if texts else image_table(manifest, dataset_root)
    context = gx_context((out_dir / "data_docs").resolve())

    images = check_images(context, table, cfg, tasks, texts)
    exclude = cfg.on_invalid == "exclude"
    if exclude and texts:
        kept_copies = ("sha256_unique", "split_consistent")  # of these only the later copies go
        drop = text_rules.text_excluded(table, {f.path for f in images.failures if f.rule not in kept_copies})
    else:
        drop = excluded_rows(table, images.failures) if exclude else pd.Series(False, index=table.index)
    kept = manifest[~drop]
    excluded = [f for f in images.failures if f.path in set(table.loc[drop, "path"])]
    labels = cfg.labels or tuple(sorted(label for label in kept["label"].dropna().unique() if label.strip()))
    counts = count_table(kept, labels, [s for s in SPLITS if s in set(manifest["split"])])
    items = "text" if texts else "image"
    class_counts = check_counts(context, counts, cfg, items)
    context.build_data_docs(site_names=[DOCS_SITE])

    success = images.success and class_counts.success
    broken = class_counts.failures if exclude else images.failures + class_counts.failures
    headline = "passed" if success else "FAILED" if broken else f"passed after excluding {int(drop.sum())} {items}(s)"
    text = readable_report(headline, broken, excluded)
    balance = class_balance(counts)
    artifacts = write_reports(out_dir, cfg, len(manifest), [images, class_counts], balance, excluded, text)
    if not broken:
        artifacts["manifest"] = write_manifest(kept, out_dir / "manifest.csv")
    # Saved on failure too: it marks the folder as this stage's, so the next run may clear it.
    result = StageResult(
        stage="validate",
        out_dir=out_dir,
        metrics={
            "n_images": len(kept),
            "n_invalid": len({f.path for f in images.failures}),
            "n_excluded": int(drop.sum()),
            **({"n_duplicates": text_rules.duplicate_count(table[~drop])} if texts else {}),
            **{f"n_{s}_{label}": c["count"] for s, per_label in balance.items() for label, c in per_label.items()},
        },
        artifacts=artifacts,
        info={
            "success": success,
            "labels": list(labels),
            # Relative, so the record stays true when both folders move together (a DVC pull elsewhere).
            "dataset_root": os.path.relpath(dataset_root.resolve(), out_dir.resolve()),
        },
    )
    result.save()
    if broken:
        log.error("%s failed validation (%d failure(s)); see %s", manifest_csv, len(broken), artifacts["report_md"])
        raise DataValidationError(
            f"{text}\nManifest: {manifest_csv}\nReport: {artifacts['report_md']}\nData Docs: {artifacts['data_docs']}"
        )
    log.info("validated %d %s from %s: %s", len(manifest), "texts" if texts else "images", manifest_csv, headline)
    return result
