"""Serving on loopback: `tlops serve` vs `mlflow models serve` of the same registered model, and a robustness run.

Both servers run as subprocesses of this script, one at a time, on the same machine and in the
same run, and answer the same single-image requests (a real ELPV cell as base64 JSON, the
format both accept). The model is pretrained EfficientNet-Lite0 with a linear head, exported
by the export stage and registered with `components.pyfunc_model.log_model` in a temporary
MLflow sqlite store; every answer is checked against ONNX Runtime run directly on the file.
Then ~10,000 requests, 10% of them malformed in every way the service refuses, go to
`tlops serve`: the run counts 5xx answers and wrong answers to valid requests (both must be 0).

    python benchmarks/serving.py [--image-size 224] [--requests 400] [--robustness 10000]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import mlflow
import torch
from mlflow import MlflowClient
from PIL import Image
from torch import nn

from components.data.config import IngestConfig
from components.data.ingest import run as ingest
from components.data.manifest import Dataset, read_manifest
from components.data.preprocess import load_batch
from components.features import extract as features
from components.features.config import FeaturesConfig
from components.models.classifier import save_checkpoint
from components.models.onnx_io import model_labels, model_preprocessing, open_session, read_metadata, softmax
from components.models.registry import get_entry
from components.packaging.config import ExportConfig
from components.packaging.export import run as export_run
from components.serving.pyfunc import log_model

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parents[1]
MODEL_NAME = "tlops-bench"
BACKBONE = "efficientnet_lite0"


@dataclass(frozen=True)
class Reference:
    """One benchmark image and what ONNX Runtime, run directly, says about it."""

    payload: bytes
    label: str
    probabilities: dict[str, float]


@dataclass(frozen=True)
class Answer:
    status: int
    seconds: float
    correct: bool  # a valid request answered with the reference label and probabilities


def cpu_description() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    wanted = sorted(f for f in flags if f == "avx2" or f.startswith(("avx512", "amx")))
    return f"{name}, {os.cpu_count()} cores, flags {' '.join(wanted) or 'none of avx2/avx512/amx'}"


def build_model(work: Path, image_size: int) -> tuple[Path, Dataset]:
    """Pretrained Lite0 trunk + a seeded linear head, exported (checked) by the export stage."""
    ingest(IngestConfig(limit=120, seed=3), work / "data")
    dataset = read_manifest(work / "data" / "manifest.csv")
    entry = get_entry(BACKBONE)
    torch.manual_seed(0)
    checkpoint = save_checkpoint(
        work / "model.pt", nn.Linear(entry.feature_dim, len(dataset.labels)), None,
        backbone=entry.describe(), taps=["pooled"], labels=list(dataset.labels),
        preprocessing=entry.preprocessing(image_size).model_dump(mode="json"), config={"strategy": "linear", "benchmark": True},
        data={"benchmark": "serving"}, strategy="linear",
    )
    # Export checks the served model against the head on the features stage's output: compute it.
    features.run(FeaturesConfig(image_size=image_size), (BACKBONE,), dataset, work / "cache", work / "features")
    exported = export_run(ExportConfig(parity_images=4), 0.0, checkpoint, dataset, work / "export",
                          features_dir=work / "features")
    return exported.artifacts["fp32"], dataset


def references(model_path: Path, dataset: Dataset) -> list[Reference]:
    metadata = read_metadata(model_path)
    labels = model_labels(model_path, metadata)
    paths = [dataset.image_path(p) for p in dataset.manifest["path"]]
    session = open_session(model_path)
    batch = load_batch(paths, model_preprocessing(model_path, metadata))
    rows = softmax(session.run(None, {session.get_inputs()[0].name: batch})[0])
    return [Reference(path.read_bytes(), labels[int(row.argmax())], dict(zip(labels, map(float, row), strict=True)))
            for path, row in zip(paths, rows, strict=True)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(command: list[str], probe_url: str, env: dict[str, str], log_path: Path) -> subprocess.Popen:
    log = open(log_path, "wb")  # noqa: SIM115 - closed with the process
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=os.getcwd())
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{command[:3]} exited with {process.returncode}; see {log_path}")
        try:
            if httpx.get(probe_url, timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    process.kill()
    raise RuntimeError(f"{command[:3]} did not become ready within 300 s; see {log_path}")


def stop_server(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def matches(reference: Reference, label: str, probabilities: dict[str, float]) -> bool:
    return label == reference.label and probabilities.keys() == reference.probabilities.keys() and all(
        abs(probabilities[k] - v) <= 1e-4 for k, v in reference.probabilities.items())


def tlops_request(client: httpx.Client, reference: Reference) -> Answer:
    started = time.perf_counter()
    response = client.post("/predict", json={"images": [base64.b64encode(reference.payload).decode()]})
    seconds = time.perf_counter() - started
    correct = response.status_code == 200 and matches(reference, **{
        k: response.json()["predictions"][0][k] for k in ("label", "probabilities")})
    return Answer(response.status_code, seconds, correct)


def mlflow_request(client: httpx.Client, reference: Reference) -> Answer:
    body = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(reference.payload).decode()]]}}
    started = time.perf_counter()
    response = client.post("/invocations", json=body)
    seconds = time.perf_counter() - started
    correct = response.status_code == 200 and matches(reference, **response.json()["predictions"][0])
    return Answer(response.status_code, seconds, correct)


def load(url: str, send: Callable[[httpx.Client, Reference], Answer], refs: list[Reference], concurrency: int,
         requests: int) -> tuple[list[Answer], float]:
    """`requests` requests from `concurrency` clients (one keep-alive connection each); answers and wall time."""
    clients = [httpx.Client(base_url=url, timeout=120) for _ in range(concurrency)]
    for client in clients:  # connect and warm every connection before the clock starts
        send(client, refs[0])
    counter = iter(range(requests))
    lock = threading.Lock()

    def worker(client: httpx.Client) -> list[Answer]:
        out = []
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return out
            out.append(send(client, refs[i % len(refs)]))

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        answers = [a for part in pool.map(worker, clients) for a in part]
    wall = time.perf_counter() - started
    for client in clients:
        client.close()
    return answers, wall


def summarize(answers: list[Answer], wall: float) -> dict[str, float]:
    latencies = sorted(a.seconds for a in answers)
    return {
        "p50_ms": round(1000 * statistics.median(latencies), 2),
        "p99_ms": round(1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 2),
        "requests_per_s": round(len(answers) / wall, 1),
        "non_200": sum(a.status != 200 for a in answers),
        "wrong": sum(a.status == 200 and not a.correct for a in answers),
    }


def malformed_requests(reference: Reference, max_body: int) -> list[tuple[str, dict]]:
    """Every kind of bad request the service refuses, as httpx keyword arguments."""
    good = reference.payload
    bomb = io.BytesIO()
    Image.new("L", (6000, 6000)).save(bomb, format="PNG")  # 36 megapixels in ~35 kB
    return [
        ("not_an_image", dict(content=b"GIF89a? no, just text", headers={"content-type": "image/png"})),
        ("truncated", dict(content=good[: len(good) // 3], headers={"content-type": "image/png"})),
        ("empty", dict(content=b"", headers={"content-type": "image/png"})),
        ("bomb", dict(content=bomb.getvalue(), headers={"content-type": "image/png"})),
        ("wrong_content_type", dict(content=good, headers={"content-type": "text/plain"})),
        ("oversized_body", dict(content=b"\x89PNG" + bytes(max_body), headers={"content-type": "image/png"})),
        ("bad_json", dict(content=b'{"images": [', headers={"content-type": "application/json"})),
        ("bad_base64", dict(json={"images": ["not*base64"]})),
        ("bad_multipart", dict(content=b"--x\r\nbroken", headers={"content-type": "multipart/form-data; boundary=x"})),
    ]


def robustness(url: str, refs: list[Reference], total: int, malformed_share: float, max_body: int,
               concurrency: int) -> dict[str, object]:
    """`total` requests, a seeded `malformed_share` of them bad; counts 5xx and wrong answers on the good ones."""
    rng = random.Random(0)
    bad = malformed_requests(refs[0], max_body)
    plan = [("bad", rng.randrange(len(bad))) if rng.random() < malformed_share else ("good", rng.randrange(len(refs)))
            for _ in range(total)]
    tally: Counter[str] = Counter()
    lock = threading.Lock()
    chunks = [plan[i::concurrency] for i in range(concurrency)]

    def worker(chunk: list[tuple[str, int]]) -> None:
        with httpx.Client(base_url=url, timeout=120) as client:
            for kind, index in chunk:
                if kind == "good":
                    answer = tlops_request(client, refs[index])
                    outcome = ("good_ok" if answer.correct else "good_wrong") if answer.status == 200 else \
                        f"good_status_{answer.status}"
                else:
                    name, request = bad[index]
                    try:
                        status = client.post("/predict", **request).status_code
                    except httpx.TransportError:
                        status = -1  # connection dropped instead of answered
                    outcome = f"bad_{'4xx' if 400 <= status < 500 else status}"
                    with lock:
                        tally[f"sent_{name}"] += 1
                with lock:
                    tally[outcome] += 1
                    tally["5xx"] += 500 <= (answer.status if kind == "good" else status) < 600

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(worker, chunks))
    wall = time.perf_counter() - started
    ready = httpx.get(f"{url}/readyz").status_code
    return {
        "requests": total,
        "malformed": sum(kind == "bad" for kind, _ in plan),
        "concurrency": concurrency,
        "5xx": tally["5xx"],
        "wrong_answers_on_valid": tally["good_wrong"],
        "valid_not_200": sum(v for k, v in tally.items() if k.startswith("good_status_")),
        "malformed_answered_4xx": tally["bad_4xx"],
        "malformed_not_4xx": sum(v for k, v in tally.items() if k.startswith("bad_") and k != "bad_4xx"),
        "malformed_kinds_sent": {k.removeprefix("sent_"): v for k, v in sorted(tally.items()) if k.startswith("sent_")},
        "ready_after": ready == 200,
        "requests_per_s": round(total / wall, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=224, help="model input size (Lite0 native: 224)")
    parser.add_argument("--requests", type=int, default=400, help="requests per server and concurrency level")
    parser.add_argument("--rounds", type=int, default=4, help="turns each server takes per concurrency level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--robustness", type=int, default=10_000, help="requests in the malformed-input run")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # so the servers started below are stopped too

    with tempfile.TemporaryDirectory(prefix="tlops-bench-serving-") as tmp:
        work = Path(tmp)
        os.chdir(work)  # MLflow writes ./mlruns
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
        env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        model_path, dataset = build_model(work, args.image_size)
        refs = references(model_path, dataset)
        mlflow.set_experiment("serving-benchmark")
        with mlflow.start_run():
            version = log_model(model_path, MODEL_NAME).registered_model_version
        MlflowClient().set_registered_model_alias(MODEL_NAME, "champion", str(version))
        model_uri = f"models:/{MODEL_NAME}@champion"
        max_body_mb = 1.0  # images are ~100 kB; a small limit keeps the oversized-body requests cheap

        servers = {
            "tlops": ([sys.executable, "-c",
                       "import logging, sys; logging.basicConfig(level=logging.WARNING)\n"
                       "from components.serving.server import ServeConfig; from components.serving.app import serve\n"
                       "serve(ServeConfig(model_uri=sys.argv[1], port=int(sys.argv[2]), max_batch=int(sys.argv[3]), "
                       "max_wait_ms=float(sys.argv[4]), max_body_mb=float(sys.argv[5])))",
                       model_uri, "{port}", str(args.max_batch), str(args.max_wait_ms), str(max_body_mb)],
                      "/readyz", tlops_request),
            "mlflow": ([sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
                        "-h", "127.0.0.1", "-p", "{port}"], "/ping", mlflow_request),
        }
        urls: dict[str, str] = {}
        processes: dict[str, subprocess.Popen] = {}
        try:
            for name, (command, probe, _) in servers.items():
                port = free_port()
                urls[name] = f"http://127.0.0.1:{port}"
                processes[name] = start_server([part.replace("{port}", str(port)) for part in command],
                                               urls[name] + probe, env, work / f"{name}.log")
            # Both servers stay up and take turns in short rounds (order alternating), so a change in
            # the load of this shared machine hits both alike instead of skewing one side's figures.
            table: dict[str, dict[int, dict[str, float]]] = {name: {} for name in servers}
            for concurrency in args.concurrency:
                answers: dict[str, list[Answer]] = {name: [] for name in servers}
                walls = dict.fromkeys(servers, 0.0)
                for round_ in range(args.rounds):
                    for name in list(servers)[:: 1 if round_ % 2 == 0 else -1]:
                        got, wall = load(urls[name], servers[name][2], refs, concurrency, args.requests // args.rounds)
                        answers[name] += got
                        walls[name] += wall
                for name in servers:
                    table[name][concurrency] = summarize(answers[name], walls[name])
                    print(name, concurrency, table[name][concurrency], flush=True)
            stop_server(processes.pop("mlflow"))
            robust: dict[str, object] = {}
            if args.robustness:
                robust = robustness(urls["tlops"], refs, args.robustness, 0.10, int(max_body_mb * 2**20), 8)
                robust["mean_batch_size_whole_run"] = mean_batch_size(httpx.get(f"{urls['tlops']}/metrics").text)
                print("robustness", robust, flush=True)
        finally:
            for process in processes.values():
                stop_server(process)

    report = {
        "cpu": cpu_description(),
        "model": f"{BACKBONE} + linear head, FP32 ONNX, {args.image_size} px, ELPV cells (300x300 PNG) as base64 JSON",
        "requests_per_level": args.requests,
        "rounds": args.rounds,
        "tlops_settings": {"max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms, "onnxruntime_threads": "all"},
        "mlflow_settings": {"workers": 1, "env_manager": "local"},
        "results": {name: {str(c): row for c, row in rows.items()} for name, rows in table.items()},
        "tlops_vs_mlflow": {
            str(c): {
                "throughput_ratio": round(table["tlops"][c]["requests_per_s"] / table["mlflow"][c]["requests_per_s"], 2),
                "p50_ratio": round(table["tlops"][c]["p50_ms"] / table["mlflow"][c]["p50_ms"], 2),
                "p99_ratio": round(table["tlops"][c]["p99_ms"] / table["mlflow"][c]["p99_ms"], 2),
            }
            for c in args.concurrency
        },
        "robustness": robust,
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"serving_{args.image_size}px.json"
    tmp_out = out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(report, indent=2) + "\n")
    tmp_out.replace(out)
    print(json.dumps(report, indent=2))


def mean_batch_size(metrics_text: str) -> float:
    values = {line.split()[0]: float(line.split()[1]) for line in metrics_text.splitlines()
              if line.startswith("tlops_serve_batch_size_")}
    return round(values["tlops_serve_batch_size_sum"] / values["tlops_serve_batch_size_count"], 2)


if __name__ == "__main__":
    main()
