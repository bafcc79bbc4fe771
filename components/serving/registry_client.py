"""What the serving process asks the MLflow registry, asked through a short-lived child process.

Resolving `models:/<name>@<alias>` and downloading a version need MLflow, and importing MLflow
costs far more memory than serving does: it brings pandas, SQLAlchemy, alembic and the
tracing SDK, and nothing can be unloaded once imported. Measured on the ELPV Lite0 model
(benchmarks/serving.py, `registry` section; figures in docs/serving.md): the service idles at
about 180 MB RSS with the registry asked in a child, and stays about 160 MB higher for the rest
of its life once one lazy in-process lookup has imported MLflow. A child costs its start-up
(about 2-4 s of one core on a 2-core machine) per lookup, which a reload can afford and a
`poll_seconds` of minutes too; it must not be polled every second.

The child is `python -m components.serving.registry_fetch` with this interpreter and this
process's environment (MLFLOW_TRACKING_URI and friends); it writes its answer to a JSON file named here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from components.core.errors import UserError

# The folder that holds `components/`, so the child imports the same code whatever sys.path tricks
# (pytest's `pythonpath`, a script's own insert) made it importable here.
CODE_ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 300  # MLflow retries an unreachable server for a while; past this the lookup is reported as failed


def _ask(uri: str, *flags: str) -> dict[str, str | None]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(CODE_ROOT), os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory(prefix="tlops-registry-") as scratch:
        answer_file = Path(scratch) / "answer.json"
        command = [sys.executable, "-m", "components.serving.registry_fetch", uri, "--answer", str(answer_file), *flags]
        try:
            done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            raise UserError(f"model_uri {uri!r}: the registry did not answer within {TIMEOUT_S} s; "
                            f"check that MLFLOW_TRACKING_URI points to a running server.") from None
        try:
            answer = json.loads(answer_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):  # the child crashed: a bug, shown with its own traceback
            raise RuntimeError(f"registry lookup for {uri!r} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    if "error" in answer:
        raise UserError(answer["error"])
    return answer


def fetch(uri: str, unless_version: str | None, into: Path) -> tuple[str, Path | None]:
    """(the version `uri` names now, its ONNX file downloaded under `into`, or None when that is `unless_version`)."""
    flags = ["--into", str(into)] + (["--unless-version", unless_version] if unless_version is not None else [])
    answer = _ask(uri, *flags)
    return str(answer["version"]), None if answer["onnx"] is None else Path(str(answer["onnx"]))
