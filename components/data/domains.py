"""Domains: where an image comes from (ELPV's cell type, a production line), and the labelled view of a dataset.

The manifest's `domain` column says which domain each image belongs to (ingest writes it: ELPV's
`cell_type`, a CSV's own `domain` column, `ingest.domain` for an ImageFolder). Evaluate reports every
metric per domain.

Domain adaptation (`finetune.adapt.target_domain`) must never use the target domain's labels. That
is made true in one place, `labelled_view`: every stage after validate reads the dataset through it,
and in it the target domain's train and val rows become the unlabelled splits `unlabelled` and
`unlabelled_val`, their labels blanked. So select's LogME, finetune's training, model selection and
early stopping, the negative-transfer reference, compress's accuracy budget and calibration images
and export's parity images, which read `train` and `val`, see the source domain only, while the
target's test rows stay as they are and are scored like any other.
"""

from __future__ import annotations

from dataclasses import replace

import pandas as pd

from components.core.errors import UserError
from components.data.manifest import Dataset

DOMAIN_COLUMN = "domain"
UNLABELLED = "unlabelled"  # the target domain's train rows, labels blanked: what adaptation trains on
UNLABELLED_VAL = "unlabelled_val"  # its val rows, labels blanked: held out for the domain discriminator's accuracy
TARGET_SPLITS = {"train": UNLABELLED, "val": UNLABELLED_VAL}


class DomainError(UserError):
    """A target domain the dataset cannot provide; the message names the key and what to do."""


def domains(dataset: Dataset) -> tuple[str, ...]:
    """The dataset's domains, sorted; () when its manifest has no domain column (or an empty one)."""
    if DOMAIN_COLUMN not in dataset.manifest.columns:
        return ()
    return tuple(sorted(str(d) for d in dataset.manifest[DOMAIN_COLUMN].dropna().unique()))


def check_target(dataset: Dataset, target_domain: str) -> None:
    """One clear line when `target_domain` cannot be adapted to on this dataset."""
    known = domains(dataset)
    key = "finetune.adapt.target_domain"
    if not known:
        raise DomainError(f"{key}={target_domain!r}, but the dataset has no domains (no `domain` column in its "
                          f"manifest): ELPV has mono/poly; give a CSV source a `domain` column, or an ImageFolder "
                          f"ingest.domain; or set {key}=null.")
    if target_domain not in known:
        raise DomainError(f"{key}={target_domain!r} is not a domain of this dataset; its domains are {list(known)}.")
    if len(known) < 2:
        raise DomainError(f"{key}={target_domain!r} is the dataset's only domain: there is no labelled source "
                          f"domain to adapt from; add images of another domain or set {key}=null.")
    rows = dataset.manifest[dataset.manifest[DOMAIN_COLUMN] == target_domain]
    for split in ("train", "test"):
        if not (rows["split"] == split).any():
            role = "unlabelled target images to adapt on" if split == "train" else "target images to score"
            raise DomainError(f"{key}={target_domain!r}: the domain has no images in the {split} split, so there "
                              f"are no {role}; choose another domain or re-split (ingest.test_fraction).")


def labelled_view(dataset: Dataset, target_domain: str | None) -> Dataset:
    """The dataset as every stage after validate sees it: unchanged when `target_domain` is None; otherwise
    the target's train/val rows moved to the unlabelled splits with their labels blanked.

    The label set (class names) stays the full dataset's, so the target's test rows keep their class indices.
    """
    if target_domain is None:
        return dataset
    check_target(dataset, target_domain)
    manifest = dataset.manifest.copy()
    hidden = (manifest[DOMAIN_COLUMN] == target_domain) & manifest["split"].isin(list(TARGET_SPLITS))
    manifest.loc[hidden, "split"] = manifest.loc[hidden, "split"].map(TARGET_SPLITS)
    manifest.loc[hidden, "label"] = None
    return replace(dataset, manifest=manifest)


def domain_of(frame: pd.DataFrame) -> pd.Series | None:
    """The domain column of `frame` as text, or None when there is none."""
    if DOMAIN_COLUMN not in frame.columns or frame[DOMAIN_COLUMN].isna().all():
        return None
    return frame[DOMAIN_COLUMN].fillna("unknown").astype(str)
