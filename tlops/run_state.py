"""One run at a time per outputs folder, and a record of which run wrote what.

`RunLock` holds an exclusive `flock` on `<outputs>/.tlops.lock` for the whole run (the kernel
drops it when the process dies, even on `kill -9`), so two runs in one checkout never interleave
writes: the second fails at once naming the holder. `<outputs>/run.json` records the current run
(MLflow run, Prefect flow run, status, and the run that wrote each stage's folder). A run that
finds a previous record still marked `running` knows that run was killed: it marks it killed in
MLflow and Prefect, and when a run fails, `run.json` says which stage folders are older.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from components.core.errors import UserError
from components.core.result import atomic_path
from tlops.config import Params

log = logging.getLogger(__name__)

LOCK_FILE = ".tlops.lock"
STATE_FILE = "run.json"


class RunInProgressError(UserError):
    """Another tlops run holds this outputs folder."""


def outputs_root(params: Params) -> Path:
    """The folder holding every stage's outputs (the caches live apart: features are safe to share, resume files are keyed by their inputs)."""
    folders = [Path(v).resolve() for k, v in params.paths.model_dump().items() if k not in ("feature_cache", "train_state")]
    return Path(os.path.commonpath(folders))


def read_state(root: Path) -> dict[str, Any]:
    try:
        return json.loads((root / STATE_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def write_state(root: Path, state: dict[str, Any]) -> None:
    with atomic_path(root / STATE_FILE) as partial:
        partial.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")


class RunLock:
    """`with RunLock(params, "tlops run") as run:` — exclusive use of the outputs folder."""

    def __init__(self, params: Params, command: str):
        self.root = outputs_root(params)
        self.command = command
        self.run_id = uuid.uuid4().hex[:12]
        self.previous: dict[str, Any] = {}
        self._handle: Any = None

    def __enter__(self) -> RunLock:
        self.root.mkdir(parents=True, exist_ok=True)
        self._handle = open(self.root / LOCK_FILE, "a+")
        try:
            fcntl.flock(self._handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._handle.seek(0)
            holder = self._handle.read().strip() or "another process"
            self._handle.close()
            raise RunInProgressError(
                f"{self.root} is in use by {holder}; wait for that run to finish or stop it, "
                f"or point params `paths.*` at another folder to run beside it."
            ) from None
        self._handle.seek(0)
        self._handle.truncate()
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        self._handle.write(f"`{self.command}` (pid {os.getpid()} on {socket.gethostname()}, since {started})\n")
        self._handle.flush()
        self.previous = read_state(self.root)
        stages = dict(self.previous.get("stages", {}))
        if self.previous.get("status") == "running":  # we hold the lock, so that run's process is gone
            self.previous["status"] = "killed"
        write_state(self.root, {"run_id": self.run_id, "command": self.command, "pid": os.getpid(),
                                "started": started, "status": "running", "stages": stages,
                                "previous": {k: self.previous.get(k) for k in
                                             ("run_id", "status", "mlflow_run_id", "prefect_flow_run_id")}})
        return self

    def update(self, **fields: Any) -> None:
        state = read_state(self.root)
        state.update(fields)
        write_state(self.root, state)

    def stage_done(self, stage: str) -> None:
        """Record that `stage`'s folder now holds this run's result (or was confirmed from cache)."""
        state = read_state(self.root)
        state.setdefault("stages", {})[stage] = self.run_id
        write_state(self.root, state)

    def older_stages(self) -> list[str]:
        """Stage folders left from earlier runs (after a failure: what this run did not reach)."""
        return [name for name, run in read_state(self.root).get("stages", {}).items() if run != self.run_id]

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: Any) -> None:
        status = "completed" if kind is None else "interrupted" if kind is KeyboardInterrupt else "failed"
        fields: dict[str, Any] = {"status": status, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        if kind is not None:
            older = self.older_stages()
            fields["error"] = str(error).splitlines()[0][:300] if str(error) else kind.__name__
            fields["older_stages"] = older
            if older:
                print(f"tlops: note: this run stopped early; {self.root} still holds {', '.join(older)} from "
                      f"earlier runs (see {self.root / STATE_FILE}).", file=sys.stderr)
        self.update(**fields)
        fcntl.flock(self._handle, fcntl.LOCK_UN)
        self._handle.close()


def killed_run(lock: RunLock) -> dict[str, Any] | None:
    """The previous run's record when it was killed (its process died while marked running)."""
    return lock.previous if lock.previous.get("status") == "killed" else None
