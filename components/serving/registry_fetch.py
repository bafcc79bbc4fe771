"""The MLflow side of a `models:/` URI, run as a short-lived child process by components/serving/registry_client.py.

    python -m components.serving.registry_fetch models:/<name>@<alias> --answer FILE [--unless-version V] [--into DIR]

writes its answer to FILE as JSON: `{"version": "3", "onnx": "DIR/.../model.onnx"}` (`onnx` is null
without `--into`, or when the version is `V`), or `{"error": "..."}` with exit status 1 when the
registry does not resolve the URI. A file rather than stdout, so nothing MLflow or its
dependencies print can be taken for the answer.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from components.core.errors import UserError
from components.core.result import write_json
from components.serving.config import parse_registry_uri


def resolve_version(uri: str) -> str:
    """The registry version `uri` names now (`models:/<name>@<alias>` or `models:/<name>/<version>`)."""
    name, alias, version = parse_registry_uri(uri)
    try:
        found = MlflowClient().get_model_version_by_alias(name, alias) if alias else \
            MlflowClient().get_model_version(name, str(version))
    except MlflowException as error:
        raise UserError(
            f"model_uri {uri!r}: the registry at {mlflow.get_tracking_uri()} does not resolve it "
            f"({error.message.splitlines()[0]}); check MLFLOW_TRACKING_URI and the model's aliases."
        ) from None
    return str(found.version)


def download_onnx(uri: str, name: str, version: str, into: Path) -> Path:
    """The one ONNX file of registry version `version` of `name`, downloaded under `into`."""
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(into)))
    except MlflowException as error:
        raise UserError(f"model_uri {uri!r}: version {version} cannot be downloaded "
                        f"({error.message.splitlines()[0]}).") from None
    files = sorted(local.rglob("*.onnx")) if local.is_dir() else [local]
    if len(files) != 1:
        raise UserError(
            f"model_uri {uri!r}: version {version} holds {len(files)} ONNX files ({[f.name for f in files]}); "
            f"register exactly one (components.serving.pyfunc.log_model)."
        )
    return files[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("uri")
    parser.add_argument("--answer", type=Path, required=True, help="write the answer here, as JSON")
    parser.add_argument("--unless-version", help="do not download when the URI still names this version")
    parser.add_argument("--into", type=Path, help="download the version's ONNX file under this folder")
    args = parser.parse_args(argv)
    try:
        version = resolve_version(args.uri)
        onnx = None
        if args.into is not None and version != args.unless_version:
            name = parse_registry_uri(args.uri)[0]
            onnx = str(download_onnx(args.uri, name, version, args.into))
    except UserError as error:
        write_json(args.answer, {"error": str(error)})
        return 1
    write_json(args.answer, {"version": version, "onnx": onnx})
    return 0


if __name__ == "__main__":
    sys.exit(main())
