"""What a drift check of an image model is given: files that all decode as images, enough of them, at most
`max_new_images` (texts: `new_texts.py`).

Light on purpose (PIL and numpy, no torch or scikit-learn), so `tlops drift` refuses an empty
folder or a stray file in a second, before Prefect or any model is loaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from components.core.errors import UserError
from components.data.ingest import examples, read_image
from components.data.text_ingest import TEXT_SUFFIX
from components.monitoring.config import DriftConfig

TEXT_FILE_SUFFIXES = (TEXT_SUFFIX, ".csv")  # what a text model's drift check reads


class DriftInputError(UserError):
    """New images or reference embeddings that cannot be compared; the message says what to fix."""


def image_paths(new_images: Path | Sequence[Path]) -> list[Path]:
    """The files to check: every file under a folder (recursively, sorted, hidden ones left out), or the list."""
    if isinstance(new_images, (str, Path)):
        folder = Path(new_images)
        if not folder.is_dir():
            raise DriftInputError(f"{folder}: not a folder of images; pass a folder or a list of image paths.")
        paths = sorted(p for p in folder.rglob("*")
                       if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))
        if not paths:
            raise DriftInputError(f"{folder}: holds no files; point --images at a folder of new images.")
        return paths
    paths = [Path(p) for p in new_images]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DriftInputError(f"{missing[0]}: image not found ({len(missing)} of {len(paths)} missing).")
    return paths


def decode_problem(path: Path) -> str | None:
    """Why `path` is not an image Pillow decodes in full (ingest's check), or None."""
    try:
        return read_image(path).error or None
    except OSError as error:  # unreadable (permissions, I/O): an error with an errno
        return error.strerror or str(error)


def checked_images(new_images: Path | Sequence[Path], cfg: DriftConfig) -> list[Path]:
    """`new_images` as files that all decode, at least `min_new_images` of them; otherwise one line naming the rest.

    Every file is decoded here, before any embedding, so a folder with one stray file fails in
    seconds and the message lists what to remove.
    """
    source = Path(new_images) if isinstance(new_images, (str, Path)) else None
    if source is not None and source.is_file() and source.suffix.lower() in TEXT_FILE_SUFFIXES:
        raise DriftInputError(f"{source}: a file of texts, but drift.backbone {cfg.backbone!r} is an image backbone; "
                              f"pass a folder of new images.")
    paths = image_paths(new_images)
    problems = [(p, why) for p in paths if (why := decode_problem(p))]
    where = f"{source}: " if source is not None else ""
    if len(problems) == len(paths) and all(p.suffix.lower() in TEXT_FILE_SUFFIXES for p in paths):
        raise DriftInputError(f"{where}holds texts ({examples([p.name for p in paths])}), but drift.backbone "
                              f"{cfg.backbone!r} is an image backbone; pass a folder of new images.")
    if problems:
        named = [f"{p.name} ({why})" for p, why in problems]
        raise DriftInputError(f"{where}{len(problems)} of {len(paths)} files are not images: {examples(named)}; "
                              f"remove them or pass a folder of images only.")
    if len(paths) < cfg.min_new_images:
        raise DriftInputError(
            f"{len(paths)} new image(s); drift.min_new_images is {cfg.min_new_images}: check a larger batch."
        )
    return paths


def capped(paths: list[Path], cfg: DriftConfig) -> list[Path]:
    """At most `max_new_images` of `paths`: a seeded subsample, so the same folder gives the same batch."""
    if len(paths) <= cfg.max_new_images:
        return paths
    keep = np.sort(np.random.default_rng(cfg.seed).choice(len(paths), cfg.max_new_images, replace=False))
    return [paths[i] for i in keep]
