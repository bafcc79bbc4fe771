"""What every stage returns: where its files are and the numbers worth tracking."""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

RESULT_FILE = "result.json"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _json_default(value: Any) -> Any:
    # Typed values (Preprocessing, configs) serialise as their JSON form, not as their repr.
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else str(value)


def to_json(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, indent=indent, sort_keys=True, default=_json_default)


def sha256_json(value: Any) -> str:
    """A stable hash of a JSON-able value (sorted keys), for cache keys."""
    return hashlib.sha256(to_json(value).encode()).hexdigest()


def metric_key(name: str) -> str:
    """A metric name every tracking store accepts whatever the labels are (commas, spaces, any script):
    unsafe characters become `_`, plus a short hash of the original so two labels never collide."""
    clean = re.sub(r"[^A-Za-z0-9_.\- ]", "_", name)
    return clean if clean == name else f"{clean}-{hashlib.sha256(name.encode()).hexdigest()[:6]}"


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary sibling of `path` to write; it replaces `path` only if the block completes.

    A reader therefore sees the old file or the whole new one, never a half-written file, and
    an interrupted write leaves `path` as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        yield partial
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)


@dataclass(frozen=True)
class StageResult:
    """A stage's outcome. `artifacts` are files inside `out_dir`; `info` is small JSON."""

    stage: str
    out_dir: Path
    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: dict[str, Path] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def artifact_hashes(self) -> dict[str, str]:
        return {name: sha256_file(path) for name, path in sorted(self.artifacts.items())}

    def fingerprint(self) -> str:
        """Content hash of what the stage produced; downstream cache keys build on it."""
        return sha256_json({"artifacts": self.artifact_hashes(), "info": self.info})

    def save(self) -> Path:
        record = {
            "stage": self.stage,
            "metrics": self.metrics,
            "artifacts": {k: str(v.relative_to(self.out_dir)) for k, v in self.artifacts.items()},
            "info": self.info,
            "artifact_sha256": self.artifact_hashes(),
        }
        return write_json(self.out_dir / RESULT_FILE, record)

    @classmethod
    def load(cls, out_dir: Path) -> StageResult:
        path = Path(out_dir) / RESULT_FILE
        if not path.exists():
            raise FileNotFoundError(
                f"{path} does not exist: run the stage that writes {out_dir} first "
                f"(`tlops stage NAME` or `dvc repro`)."
            )
        record = json.loads(path.read_text())
        return cls(
            stage=record["stage"],
            out_dir=Path(out_dir),
            metrics=record["metrics"],
            artifacts={k: Path(out_dir) / v for k, v in record["artifacts"].items()},
            info=record["info"],
        )

    def is_intact(self) -> bool:
        """True when every artifact still exists with the content recorded at save time."""
        path = self.out_dir / RESULT_FILE
        if not path.exists():
            return False
        recorded = json.loads(path.read_text()).get("artifact_sha256", {})
        try:
            return recorded == self.artifact_hashes()
        except FileNotFoundError:
            return False


def write_json(path: Path, value: Any) -> Path:
    """`value` as indented JSON with sorted keys, written atomically."""
    with atomic_path(path) as partial:
        partial.write_text(to_json(value, indent=2) + "\n")
    return Path(path)
