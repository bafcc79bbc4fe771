"""What every stage returns: where its files are and the numbers worth tracking."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RESULT_FILE = "result.json"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_json(value: Any) -> str:
    """A stable hash of a JSON-able value (sorted keys), for cache keys."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


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
        path = self.out_dir / RESULT_FILE
        path.write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
        return path

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
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")
    return path
