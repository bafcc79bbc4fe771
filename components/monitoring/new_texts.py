"""What a drift check of a text model is given: a CSV with a `text` column, or a folder of .txt files.

The text counterpart of `new_images.py`, and light for the same reason (pandas, no torch or
tokenizer): `tlops drift` reads and checks every text before Prefect or the encoder loads. A text
is identified as the features stage identifies it, by the sha256 of its UTF-8 bytes, so a text the
training set holds (or an earlier check embedded) has the same key in the feature cache.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from components.data.ingest import IMAGE_SUFFIXES, examples
from components.data.text_ingest import TEXT_SUFFIX
from components.monitoring.config import DriftConfig
from components.monitoring.new_images import DriftInputError

TEXT_COLUMN = "text"
CSV_SUFFIX = ".csv"
WHAT_TO_PASS = "pass a CSV with a `text` column or a folder of .txt files"


@dataclass(frozen=True)
class NewTexts:
    """The texts of one batch, each with where it came from (`news.csv row 3`, `a/b.txt`) and its sha256."""

    texts: tuple[str, ...]
    names: tuple[str, ...]

    @property
    def sha256(self) -> tuple[str, ...]:
        return tuple(text_sha256(text) for text in self.texts)

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, rows: Sequence[int]) -> NewTexts:
        return NewTexts(tuple(self.texts[i] for i in rows), tuple(self.names[i] for i in rows))


def text_sha256(text: str) -> str:
    """The key ingest gives a text: the sha256 of its UTF-8 bytes."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def utf8(path: Path, shown: str) -> str:
    """The file's text, decoded strictly; otherwise one line naming the first byte that is not UTF-8 and its line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise DriftInputError(f"{shown}: not UTF-8 text (byte 0x{data[error.start]:02x} on line {line}); save it as "
                              f"UTF-8.") from None


def csv_texts(csv_path: Path) -> NewTexts:
    """The `text` column of a CSV, read as ingest reads a CSV source (every cell a string, none turned into NaN),
    except that a line of spaces is a row: pandas would skip it, and a whitespace-only text must be named. Line
    breaks closing the file are not rows (no field ends there: a quoted one ends at its quote)."""
    content = utf8(csv_path, str(csv_path)).rstrip("\r\n")
    try:
        frame = pd.read_csv(io.StringIO(content), dtype=str, keep_default_na=False, na_values=[""],
                            skip_blank_lines=False)
    except pd.errors.EmptyDataError:
        raise DriftInputError(f"{csv_path}: empty file; a batch of new texts is a CSV with a `text` column, one text "
                              f"per row.") from None
    except pd.errors.ParserError as error:
        raise DriftInputError(f"{csv_path}: not a readable CSV ({str(error).strip().splitlines()[0]}).") from None
    if TEXT_COLUMN not in frame.columns:
        raise DriftInputError(f"{csv_path}: no `text` column (it has {list(frame.columns)}); a batch of new texts is "
                              f"a CSV with a `text` column, one text per row.")
    texts = tuple(text if isinstance(text, str) else "" for text in frame[TEXT_COLUMN])
    # Row numbers as ingest counts them: the first row under the header is row 1.
    return NewTexts(texts, tuple(f"row {n}" for n in range(1, len(texts) + 1)))


def folder_texts(folder: Path, backbone: str) -> NewTexts:
    """Every .txt file under `folder` (recursively, sorted, hidden ones left out); any other file is refused."""
    files = sorted(p for p in folder.rglob("*")
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    names = [str(p.relative_to(folder)) for p in files]
    images = [name for p, name in zip(files, names) if p.suffix.lower() in IMAGE_SUFFIXES]
    if images:
        raise DriftInputError(f"{folder}: holds images ({examples(images)}), but drift.backbone {backbone!r} is a text "
                              f"encoder; {WHAT_TO_PASS}.")
    others = [name for p, name in zip(files, names) if p.suffix.lower() != TEXT_SUFFIX]
    if others:
        raise DriftInputError(f"{folder}: {len(others)} of {len(files)} files are not .txt files: {examples(others)}; "
                              f"remove them, or {WHAT_TO_PASS}.")
    return NewTexts(tuple(utf8(p, f"{folder}: {name}") for p, name in zip(files, names)), tuple(names))


def checked_texts(new_texts: Path | Sequence[Path], cfg: DriftConfig) -> NewTexts:
    """The texts of `new_texts`, none blank, at least `min_new_texts` of them; otherwise one line saying what to fix.

    Everything is read and checked here, before any embedding: a file that is not UTF-8, an empty or
    whitespace-only text (named by row or file), images, or a batch too small to test.
    """
    if not isinstance(new_texts, (str, Path)):
        raise DriftInputError(f"{len(new_texts)} paths given, but drift.backbone {cfg.backbone!r} is a text encoder; "
                              f"{WHAT_TO_PASS}.")
    source = Path(new_texts)
    if source.is_file() and source.suffix.lower() == CSV_SUFFIX:
        found = csv_texts(source)
    elif source.is_dir():
        found = folder_texts(source, cfg.backbone)
    elif source.is_file():
        kind = "an image" if source.suffix.lower() in IMAGE_SUFFIXES else "not a .csv file"
        raise DriftInputError(f"{source}: {kind}, but drift.backbone {cfg.backbone!r} is a text encoder; "
                              f"{WHAT_TO_PASS}.")
    else:
        raise DriftInputError(f"{source}: not found; {WHAT_TO_PASS}.")
    if not len(found):
        raise DriftInputError(f"{source}: holds no texts; {WHAT_TO_PASS}, with at least drift.min_new_texts="
                              f"{cfg.min_new_texts} of them.")
    blank = [name for text, name in zip(found.texts, found.names) if not text.strip()]
    if blank:
        raise DriftInputError(f"{source}: {len(blank)} of {len(found)} texts are empty or whitespace only: "
                              f"{examples(blank)}; remove them.")
    if len(found) < cfg.min_new_texts:
        raise DriftInputError(f"{source}: {len(found)} new text(s); drift.min_new_texts is {cfg.min_new_texts}: "
                              f"check a larger batch.")
    return found


def capped_texts(found: NewTexts, cfg: DriftConfig) -> NewTexts:
    """At most `max_new_texts` of `found`: a seeded subsample, so the same batch gives the same texts."""
    if len(found) <= cfg.max_new_texts:
        return found
    return found.subset(np.sort(np.random.default_rng(cfg.seed).choice(len(found), cfg.max_new_texts, replace=False)))
