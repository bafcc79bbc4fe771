"""Serving on loopback: `tlops serve` against `mlflow models serve` and against ONNX Runtime called in-process.

For each input size (64 and 224 px by default), in one run:

- **throughput and latency**: `tlops serve` and `mlflow models serve` of the same registered model
  (pretrained EfficientNet-Lite0 + a seeded linear head, exported by the export stage, registered
  with `components.serving.pyfunc.log_model` in a temporary MLflow sqlite store) answer the same
  single-image requests (a real ELPV cell as base64 JSON, the format both accept) at each
  concurrency. Every answer is checked against ONNX Runtime run directly on the file. Two
  baselines run in this process with the same session settings and threads, at batch 1 and at
  `max_batch` (the better is the ceiling): ONNX Runtime on the same images already preprocessed,
  and, like for like, the server's own work without HTTP: the base64 text and PNG decoded and
  preprocessed by the server's functions on one thread per core, then ONNX Runtime. The three take
  turns in short rounds, order rotating, so a change in this shared machine's load hits all alike.
- **memory**: resident set size (RSS) of each server idle after start-up and after the load, then
  of `tlops serve` across `--reloads` alias moves and `POST /admin/reload`s made under load, and
  (last size only) of the same service after an in-process MLflow registry lookup (what a lazy
  `import mlflow` would cost, against the child process `tlops serve` uses).
- **variants** (`--variant NAME=serve.KEY=VALUE,...`): `tlops serve` with other settings joins the
  same rotation, for A/B comparisons of a setting on this machine.
- **robustness** (last size only): `--robustness` requests, 10% malformed in every way the service
  refuses, to `tlops serve`: the run counts 5xx answers and wrong answers to valid requests (both must be 0).

The same comparison for a text model, on BBC News articles: `benchmarks/text_serving.py`, which imports
the load generator, the server harness and the checks from here.

The load comes from one asyncio task per connection speaking plain HTTP/1.1 over keep-alive
sockets: a Python HTTP client library costs about a millisecond of CPU per request, which on a
2-core machine is taken from the server being measured.

    python benchmarks/serving.py [--image-sizes 64 224] [--concurrency 1 8 32] [--requests 320] [--rounds 4]
                                 [--reloads 10] [--robustness 2000] [--variant nice0=serve.decode_nice=0]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import io
import itertools
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
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Self

import httpx
import mlflow
import numpy as np
import onnxruntime as ort
import torch
from mlflow import MlflowClient
from PIL import Image
from torch import nn

from components.data.config import IngestConfig
from components.data.ingest import run as ingest
from components.data.manifest import Dataset, read_manifest
from components.data.preprocess import Preprocessing, load_batch, preprocess_image
from components.features import extract as features
from components.features.config import FeaturesConfig
from components.models.classifier import save_checkpoint
from components.models.onnx_io import model_labels, model_preprocessing, open_session, read_metadata, softmax
from components.models.registry import get_entry
from components.packaging.config import ExportConfig
from components.packaging.export import run as export_run
from components.serving.image_decoding import decode_base64, decode_image
from components.serving.pyfunc import log_model
from components.serving.served_model import session_options

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parents[1]
BACKBONE = "efficientnet_lite0"


@dataclass(frozen=True)
class Reference:
    """One benchmark input and what ONNX Runtime, run directly, says about it."""

    payload: bytes  # the input as a file: a PNG, or a text in UTF-8
    value: str  # the input as a JSON request carries it: the image in base64, or the text itself
    label: str
    probabilities: dict[str, float]
    tolerance: float = 1e-4  # how far a served probability may be from these and still be the same answer


@dataclass(frozen=True)
class Answer:
    status: int
    seconds: float
    correct: bool  # a valid request answered with the reference label and probabilities


@dataclass(frozen=True)
class Target:
    """A server under load: where it listens, how a request for an image looks, how to read its answer."""

    name: str
    port: int
    path: str
    body: Callable[[Reference], bytes]
    first_prediction: Callable[[dict], dict]


def cpu_description() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    wanted = sorted(f for f in flags if f in ("avx2", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16")
                    or f.startswith("amx"))
    return f"{name}, {os.cpu_count()} cores, flags {' '.join(wanted) or 'none of avx2/avx512/amx'}"


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def build_model(work: Path, dataset: Dataset, image_size: int) -> Path:
    """Pretrained Lite0 trunk + a seeded linear head, exported (checked) by the export stage."""
    entry = get_entry(BACKBONE)
    torch.manual_seed(0)
    checkpoint = save_checkpoint(
        work / "model.pt", nn.Linear(entry.feature_dim, len(dataset.labels)), None,
        backbone=entry.describe(), taps=["pooled"], labels=list(dataset.labels),
        preprocessing=entry.preprocessing(image_size).model_dump(mode="json"),
        config={"strategy": "linear", "benchmark": True}, data={"benchmark": "serving"}, strategy="linear",
    )
    # Export checks the served model against the head on the features stage's output: compute it.
    features.run(FeaturesConfig(image_size=image_size), (BACKBONE,), dataset, work / "cache", work / "features")
    exported = export_run(ExportConfig(parity_images=4), 0.0, checkpoint, dataset, work / "export",
                          features_dir=work / "features")
    return exported.artifacts["fp32"]


def references(model_path: Path, dataset: Dataset) -> tuple[list[Reference], np.ndarray]:
    """Each image with ONNX Runtime's answer, and the preprocessed batch those answers came from."""
    metadata = read_metadata(model_path)
    labels = model_labels(model_path, metadata)
    paths = [dataset.image_path(p) for p in dataset.manifest["path"]]
    session = open_session(model_path)
    batch = load_batch(paths, model_preprocessing(model_path, metadata))
    rows = softmax(session.run(None, {session.get_inputs()[0].name: batch})[0])
    refs = [Reference(path.read_bytes(), base64.b64encode(path.read_bytes()).decode(), labels[int(row.argmax())],
                      dict(zip(labels, map(float, row), strict=True)))
            for path, row in zip(paths, rows, strict=True)]
    return refs, batch


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(command: list[str], probe_url: str, env: dict[str, str], log_path: Path,
                 cwd: Path) -> subprocess.Popen:
    log = open(log_path, "wb")  # noqa: SIM115 - closed with the process
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=cwd)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{command[:4]} exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(probe_url, timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    process.kill()
    raise RuntimeError(f"{command[:4]} did not become ready within 300 s:\n{log_path.read_text()[-3000:]}")


def stop_server(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def rss_mb(pid: int, tree: bool = False) -> float:
    """Resident set size of `pid` (and, with `tree`, of all its descendants), in MB."""
    pids = [pid]
    if tree:
        for parent in pids:
            for task in Path(f"/proc/{parent}/task").iterdir():
                pids += [int(child) for child in (task / "children").read_text().split()]
    total = 0
    for one in pids:
        status = Path(f"/proc/{one}/status").read_text()
        total += next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    return round(total / 1024, 1)


def matches(reference: Reference, prediction: dict) -> bool:
    probabilities = prediction.get("probabilities", {})
    return prediction.get("label") == reference.label and probabilities.keys() == reference.probabilities.keys() and \
        all(abs(probabilities[k] - v) <= reference.tolerance for k, v in reference.probabilities.items())


def tlops_target(port: int, key: str = "images") -> Target:
    """`tlops serve`'s /predict with one input under `key` (`images` or `texts`)."""
    return Target("tlops", port, "/predict", lambda ref: json.dumps({key: [ref.value]}).encode(),
                  lambda answer: answer["predictions"][0])


def mlflow_target(port: int, column: str = "image") -> Target:
    """`mlflow models serve`'s /invocations with one input in the pyfunc's `column` (`image` or `text`)."""
    return Target("mlflow", port, "/invocations",
                  lambda ref: json.dumps({"dataframe_split": {"columns": [column], "data": [[ref.value]]}}).encode(),
                  lambda answer: answer["predictions"][0])


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> tuple[int, bytes, bool]:
    """One HTTP/1.1 request on a keep-alive connection: (status, body, whether the server closes it)."""
    writer.write(request)
    await writer.drain()
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    status = int(head[0].split(" ", 2)[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:] if line)}
    body = await reader.readexactly(int(headers["content-length"]))
    return status, body, headers.get("connection", "").lower() == "close"


async def drive(target: Target, refs: list[Reference], concurrency: int, total: int) -> tuple[list[Answer], float]:
    """`total` requests from `concurrency` keep-alive connections; every answer checked; (answers, wall seconds)."""
    requests = [(f"POST {target.path} HTTP/1.1\r\nHost: 127.0.0.1:{target.port}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n").encode() + body for body in map(target.body, refs)]
    connections = [await asyncio.open_connection("127.0.0.1", target.port) for _ in range(concurrency)]
    for reader, writer in connections:  # every connection warm before the clock starts
        await exchange(reader, writer, requests[0])
    counter = itertools.count()

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> list[Answer]:
        out = []
        while (i := next(counter)) < total:
            ref = refs[i % len(refs)]
            started = time.perf_counter()
            status, body, closing = await exchange(reader, writer, requests[i % len(refs)])
            seconds = time.perf_counter() - started
            correct = status == 200 and matches(ref, target.first_prediction(json.loads(body)))
            out.append(Answer(status, seconds, correct))
            if closing:
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", target.port)
        writer.close()
        return out

    started = time.perf_counter()
    parts = await asyncio.gather(*(client(reader, writer) for reader, writer in connections))
    return [answer for part in parts for answer in part], time.perf_counter() - started


def in_process(session: ort.InferenceSession, batch: np.ndarray, batch_size: int, total: int) -> float:
    """Seconds ONNX Runtime takes for `total` images of `batch`, `batch_size` per call (the ceiling)."""
    feed = {session.get_inputs()[0].name: np.ascontiguousarray(np.resize(batch, (batch_size, *batch.shape[1:])))}
    calls = max(1, total // batch_size)
    session.run(None, feed)
    started = time.perf_counter()
    for _ in range(calls):
        session.run(None, feed)
    return (time.perf_counter() - started) * total / (calls * batch_size)


def summarize(answers: list[Answer], wall: float) -> dict[str, float]:
    latencies = sorted(a.seconds for a in answers)
    return {
        "p50_ms": round(1000 * statistics.median(latencies), 2),
        "p99_ms": round(1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 2),
        "requests_per_s": round(len(answers) / wall, 1),
        "non_200": sum(a.status != 200 for a in answers),
        "wrong": sum(a.status == 200 and not a.correct for a in answers),
    }


# An in-process baseline: seconds it takes for `total` inputs.
Baseline = Callable[[int], float]


def in_process_decoding(session: ort.InferenceSession, refs: list[Reference], preprocessing: Preprocessing,
                        pool: ThreadPoolExecutor, batch_size: int, total: int) -> float:
    """Seconds this process takes for `total` requests' own work, like for like with the server's: each image's
    base64 text decoded, its PNG decoded and preprocessed by the server's functions on a pool of one thread per
    core, then ONNX Runtime on batches of `batch_size`. What it leaves out is HTTP, JSON and the queue."""
    texts = [base64.b64encode(ref.payload).decode() for ref in itertools.islice(itertools.cycle(refs), total)]
    input_name = session.get_inputs()[0].name

    def prepare(text: str) -> np.ndarray:
        return preprocess_image(decode_image(decode_base64(text, 0), 16_000_000), preprocessing)

    started = time.perf_counter()
    for start in range(0, total, batch_size):
        session.run(None, {input_name: np.stack(list(pool.map(prepare, texts[start : start + batch_size])))})
    return time.perf_counter() - started


def in_process_baselines(session: ort.InferenceSession, batch: np.ndarray, max_batch: int) -> dict[str, Baseline]:
    return {f"onnxruntime_batch{size}": functools.partial(in_process, session, batch, size) for size in (1, max_batch)}


def decoding_baselines(session: ort.InferenceSession, refs: list[Reference], preprocessing: Preprocessing,
                       pool: ThreadPoolExecutor, max_batch: int) -> dict[str, Baseline]:
    """The like-for-like ceilings of an image server: its decoding and preprocessing, then ONNX Runtime, in-process."""
    return {f"decoding_batch{size}": functools.partial(in_process_decoding, session, refs, preprocessing, pool, size)
            for size in (1, max_batch)}


def compare(targets: dict[str, Target], refs: list[Reference], baselines: dict[str, Baseline], concurrency: int,
            requests: int, rounds: int) -> dict[str, dict[str, float]]:
    """Rounds in rotating order of every server and the in-process ceilings at one concurrency."""
    answers: dict[str, list[Answer]] = {name: [] for name in targets}
    walls = dict.fromkeys([*targets, *baselines], 0.0)
    per_round = max(concurrency, requests // rounds)
    for round_ in range(rounds):
        order = list(walls)
        for name in order[round_ % len(order):] + order[: round_ % len(order)]:
            if name in targets:
                got, wall = asyncio.run(drive(targets[name], refs, concurrency, per_round))
                answers[name] += got
                walls[name] += wall
            else:
                walls[name] += baselines[name](per_round)
    row: dict[str, dict[str, float]] = {name: summarize(answers[name], walls[name]) for name in targets}
    for name in baselines:
        row[name] = {"inputs_per_s": round(per_round * rounds / walls[name], 1)}
    return row


class Background:
    """A steady load on a target from a thread, while something else happens (reloads)."""

    def __init__(self, target: Target, refs: list[Reference], concurrency: int) -> None:
        self.stop = threading.Event()
        self.answers: list[Answer] = []
        self.thread = threading.Thread(target=self._run, args=(target, refs, concurrency), daemon=True)

    def _run(self, target: Target, refs: list[Reference], concurrency: int) -> None:
        while not self.stop.is_set():
            self.answers += asyncio.run(drive(target, refs, concurrency, concurrency * 4))[0]

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join()


def reload_churn(url: str, pid: int, target: Target, refs: list[Reference], model_name: str,
                 reloads: int) -> dict[str, object]:
    """RSS of `tlops serve` across `reloads` alias moves + reloads under load (concurrency 8)."""
    registry = MlflowClient()
    before = rss_mb(pid)
    samples = []
    with Background(target, refs, 8) as load:
        time.sleep(2)
        under_load = rss_mb(pid)
        for i in range(reloads):
            registry.set_registered_model_alias(model_name, "champion", "2" if i % 2 == 0 else "1")
            answer = httpx.post(f"{url}/admin/reload", timeout=300).json()
            assert answer["changed"], answer
            time.sleep(1)
            samples.append(rss_mb(pid))
    registry.set_registered_model_alias(model_name, "champion", "1")
    return {
        "reloads": reloads, "rss_idle_before_mb": before, "rss_under_load_before_reloads_mb": under_load,
        "rss_after_each_reload_mb": samples, "rss_after_mb": rss_mb(pid),
        "rss_growth_ratio_over_reloads": round(samples[-1] / samples[0], 3),
        "answers_during_reloads": len(load.answers), "non_200": sum(a.status != 200 for a in load.answers),
        "wrong": sum(a.status == 200 and not a.correct for a in load.answers),
    }


# `tlops serve` is `tlops.cli.serve_model`; called directly here, because `tlops`'s argument parser
# imports the whole pipeline (tlops.stages) for every command, which is not serving's weight.
SERVE_MODEL = """
import argparse, logging, sys
from pathlib import Path
from tlops.cli import serve_model

logging.basicConfig(level=logging.INFO)
params, uri, port, *overrides = sys.argv[1:]
serve_model(argparse.Namespace(params=Path(params), overrides=overrides, model=uri, host=None, port=int(port)))
"""

IN_PROCESS_REGISTRY = """
import sys, time
from pathlib import Path
from components.serving import registry_fetch
from components.serving.app import running_service
from components.serving.config import ServeConfig

uri, port, into = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
version = registry_fetch.resolve_version(uri)  # what a lazy in-process `import mlflow` would do
path = registry_fetch.download_onnx(uri, uri.removeprefix("models:/").split("@")[0], version, into)
with running_service(ServeConfig(model_uri=str(path), port=port)) as (url, server):
    print("ready", flush=True)
    time.sleep(3600)
"""


def idle_rss(command: list[str], env: dict[str, str], work: Path, name: str) -> float:
    """RSS of a service started by `command` (listening on the port in it), idle once ready."""
    port = command[command.index("{port}")] = str(free_port())
    process = start_server(command, f"http://127.0.0.1:{port}/readyz", env, work / f"{name}.log", work)
    try:
        time.sleep(2)
        return rss_mb(process.pid)
    finally:
        stop_server(process)


def registry_memory(uri: str, env: dict[str, str], work: Path, tlops_idle_mb: float) -> dict[str, float]:
    """Idle RSS of the service after resolving and downloading `uri` in-process, against `tlops serve`'s
    (which asks a child process), and of `python -m tlops.cli serve` as its argument parser is today."""
    lazy = idle_rss([sys.executable, "-c", IN_PROCESS_REGISTRY, uri, "{port}", str(work / "in-process")], env, work,
                    "in-process")
    cli = idle_rss([sys.executable, "-m", "tlops.cli", "serve", "--params", str(REPO / "params.yaml"), "--model", uri,
                    "--port", "{port}"], env, work, "cli")
    return {"tlops_serve_child_process_mb": tlops_idle_mb, "lazy_in_process_mlflow_mb": lazy,
            "lazy_vs_child_ratio": round(lazy / tlops_idle_mb, 2), "tlops_cli_module_today_mb": cli}


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
                    response = client.post("/predict", json={"images": [refs[index].value]})
                    status = response.status_code
                    ok = status == 200 and matches(refs[index], response.json()["predictions"][0])
                    outcome = ("good_ok" if ok else "good_wrong") if status == 200 else f"good_status_{status}"
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
                    tally["5xx"] += 500 <= status < 600

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(chunk,)) for chunk in chunks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
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
        "ready_after": httpx.get(f"{url}/readyz").status_code == 200,
        "requests_per_s": round(total / wall, 1),
    }


def mean_batch_size(metrics_text: str) -> float:
    values = {line.split()[0]: float(line.split()[1]) for line in metrics_text.splitlines()
              if line.startswith("tlops_serve_batch_size_")}
    return round(values["tlops_serve_batch_size_sum"] / max(1.0, values["tlops_serve_batch_size_count"]), 2)


def register(model_path: Path, model_name: str, versions: int = 1) -> str:
    """`model_path` registered `versions` times as `model_name`, with version 1 as @champion; that URI."""
    for _ in range(versions):
        with mlflow.start_run():
            log_model(model_path, model_name)
    MlflowClient().set_registered_model_alias(model_name, "champion", "1")
    return f"models:/{model_name}@champion"


@dataclass(frozen=True)
class Servers:
    """The services one comparison runs: the command that starts each, the path that says it is ready, its load."""

    commands: dict[str, list[str]]
    probes: dict[str, str]
    targets: dict[str, Target]

    @property
    def urls(self) -> dict[str, str]:
        return {name: f"http://127.0.0.1:{target.port}" for name, target in self.targets.items()}


def servers(args: argparse.Namespace, uri: str, max_body_mb: float, modality: str) -> Servers:
    """`tlops serve` (and each `--variant` of it) and `mlflow models serve` of `uri`, each on a free port."""
    key, column = ("texts", "text") if modality == "text" else ("images", "image")
    ports = {"tlops": free_port(), "mlflow": free_port()}
    settings = [f"serve.max_batch={args.max_batch}", f"serve.max_wait_ms={args.max_wait_ms}",
                f"serve.max_body_mb={max_body_mb}", f"serve.num_threads={args.num_threads}",
                f"serve.measure_batch={str(args.measure_batch).lower()}"]
    commands = {
        "tlops": [sys.executable, "-c", SERVE_MODEL, str(REPO / "params.yaml"), uri, str(ports["tlops"]), *settings],
        "mlflow": [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local",
                   "-h", "127.0.0.1", "-p", str(ports["mlflow"])],
    }
    probes = {"tlops": "/readyz", "mlflow": "/ping"}
    targets = {"tlops": tlops_target(ports["tlops"], key), "mlflow": mlflow_target(ports["mlflow"], column)}
    for variant in args.variant:  # tlops with other settings, in the same rotation
        name, _, changes = variant.partition("=")
        port, probes[name] = free_port(), "/readyz"
        commands[name] = [*commands["tlops"][:5], str(port), *settings, *changes.split(",")]
        targets[name] = replace(tlops_target(port, key), name=name)
    return Servers(commands, probes, targets)


@contextmanager
def started(setup: Servers, env: dict[str, str], work: Path, tag: str) -> Iterator[dict[str, subprocess.Popen]]:
    """Every service of `setup` started and ready; those still in the dict are stopped on the way out."""
    processes: dict[str, subprocess.Popen] = {}
    try:
        for name, command in setup.commands.items():
            processes[name] = start_server(command, setup.urls[name] + setup.probes[name], env,
                                           work / f"{name}-{tag}.log", work)
        yield processes
    finally:
        for process in processes.values():
            stop_server(process)


def ratios(table: dict[str, dict[str, dict[str, float]]], variants: list[str]) -> dict[str, dict[str, float]]:
    """tlops against mlflow, both against the better in-process baseline, tlops against each variant."""
    out = {}
    for concurrency, row in table.items():
        ceiling = max(value["inputs_per_s"] for name, value in row.items() if name.startswith("onnxruntime_batch"))
        out[concurrency] = {
            "tlops_vs_mlflow_throughput": round(row["tlops"]["requests_per_s"] / row["mlflow"]["requests_per_s"], 2),
            "tlops_vs_mlflow_p50": round(row["tlops"]["p50_ms"] / row["mlflow"]["p50_ms"], 2),
            "tlops_vs_mlflow_p99": round(row["tlops"]["p99_ms"] / row["mlflow"]["p99_ms"], 2),
            "tlops_vs_onnxruntime_in_process": round(row["tlops"]["requests_per_s"] / ceiling, 2),
            "mlflow_vs_onnxruntime_in_process": round(row["mlflow"]["requests_per_s"] / ceiling, 2),
        } | {f"tlops_vs_{name}_throughput": round(row["tlops"]["requests_per_s"] / row[name]["requests_per_s"], 2)
             for name in variants}
        decoding = [value["inputs_per_s"] for name, value in row.items() if name.startswith("decoding_batch")]
        if decoding:  # like for like: the same decoding and preprocessing, in-process, without HTTP
            out[concurrency] |= {f"{server}_vs_in_process_with_decoding": round(
                row[server]["requests_per_s"] / max(decoding), 2) for server in ("tlops", "mlflow")}
    return out


def measure(args: argparse.Namespace, setup: Servers, processes: dict[str, subprocess.Popen], refs: list[Reference],
            baselines: dict[str, Baseline], tag: str) -> dict[str, object]:
    """The batch size tlops chose, each server's idle RSS, a comparison at each concurrency, RSS after the load."""
    urls = setup.urls
    described = httpx.get(urls["tlops"] + "/model").json()
    report: dict[str, object] = {"tlops_batching": {k: described[k] for k in ("batch_limit", "ms_per_image_by_batch")}}
    print(tag, "tlops batching", report["tlops_batching"], flush=True)
    time.sleep(2)
    memory: dict[str, float] = {"tlops_idle_mb": rss_mb(processes["tlops"].pid),
                                "mlflow_idle_mb": rss_mb(processes["mlflow"].pid, tree=True)}
    table = {}
    for concurrency in args.concurrency:
        table[str(concurrency)] = row = compare(setup.targets, refs, baselines, concurrency, args.requests, args.rounds)
        print(tag, concurrency, json.dumps(row), flush=True)
    memory |= {"tlops_after_load_mb": rss_mb(processes["tlops"].pid),
               "mlflow_after_load_mb": rss_mb(processes["mlflow"].pid, tree=True)}
    memory["idle_ratio_tlops_vs_mlflow"] = round(memory["tlops_idle_mb"] / memory["mlflow_idle_mb"], 2)
    return report | {"results": table, "memory": memory,
                     "mean_batch_size": mean_batch_size(httpx.get(f"{urls['tlops']}/metrics").text),
                     "ratios": ratios(table, [variant.partition("=")[0] for variant in args.variant])}


def bench_size(args: argparse.Namespace, work: Path, dataset: Dataset, size: int, env: dict[str, str],
               last: bool) -> dict[str, object]:
    folder = work / f"{size}px"
    model_path = build_model(folder, dataset, size)
    refs, batch = references(model_path, dataset)
    model_name = f"tlops-bench-{size}"
    uri = register(model_path, model_name, versions=2)  # two versions of one file: an alias move is a real reload
    max_body_mb = 1.0  # images are ~100 kB; a small limit keeps the oversized-body requests cheap
    setup = servers(args, uri, max_body_mb, "image")
    session = ort.InferenceSession(str(model_path), session_options(args.num_threads), providers=["CPUExecutionProvider"])
    preprocessing = model_preprocessing(model_path, read_metadata(model_path))
    pool = ThreadPoolExecutor(os.cpu_count() or 1)  # the server decodes on one thread per core (serve.decode_threads 0)
    baselines = in_process_baselines(session, batch, args.max_batch) | decoding_baselines(
        session, refs, preprocessing, pool, args.max_batch)
    with pool, started(setup, env, work, str(size)) as processes:
        report = {"size": size} | measure(args, setup, processes, refs, baselines, str(size))
        for name in [name for name in processes if name != "tlops"]:
            stop_server(processes.pop(name))
        url = setup.urls["tlops"]
        if args.reloads:
            report["reloads"] = reload_churn(url, processes["tlops"].pid, setup.targets["tlops"], refs, model_name,
                                             args.reloads)
            print(size, "reloads", json.dumps(report["reloads"]), flush=True)
        if last:
            report["registry_memory"] = registry_memory(uri, env, folder, report["memory"]["tlops_idle_mb"])
            print(size, "registry", json.dumps(report["registry_memory"]), flush=True)
        if last and args.robustness:
            report["robustness"] = robustness(url, refs, args.robustness, 0.10, int(max_body_mb * 2**20), 8)
            print(size, "robustness", json.dumps(report["robustness"]), flush=True)
    return report


def add_load_arguments(parser: argparse.ArgumentParser) -> None:
    """The load and the `tlops serve` settings, shared by the image and text benchmarks."""
    parser.add_argument("--requests", type=int, default=320, help="requests per server and concurrency level")
    parser.add_argument("--rounds", type=int, default=4, help="turns each server takes per concurrency level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--num-threads", type=int, default=0, help="serve.num_threads (0 = all cores)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=KEY=VALUE[,KEY=VALUE]",
                        help="also run tlops with these serve settings in the same rotation, e.g. "
                             "nice0=serve.decode_nice=0 (repeatable)")
    parser.add_argument("--no-measure-batch", dest="measure_batch", action="store_false",
                        help="serve.measure_batch=false: batch up to --max-batch whatever it costs")


def settings_report(args: argparse.Namespace) -> dict[str, object]:
    return {
        "requests_per_level": args.requests,
        "rounds": args.rounds,
        "tlops_settings": {"max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms,
                           "num_threads": args.num_threads, "measure_batch": args.measure_batch},
        "variants": args.variant,
        "mlflow_settings": {"workers": 1, "env_manager": "local"},
    }


@contextmanager
def mlflow_workdir(prefix: str) -> Iterator[tuple[Path, dict[str, str]]]:
    """A temporary folder holding a sqlite MLflow store, made the working directory; (it, the servers' environment)."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # so the servers started inside are stopped too
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        work = Path(tmp)
        os.chdir(work)  # MLflow writes ./mlruns
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
        # This repository first on the path; this interpreter's scripts first on PATH (`mlflow models serve` runs
        # `uvicorn` by name), as an activated virtual environment would have them.
        yield work, {**os.environ,
                     "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
                     "PATH": os.pathsep.join(filter(None, [str(Path(sys.executable).parent), os.environ.get("PATH")]))}


def write_results(report: dict[str, object], name: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / name
    tmp_out = out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(report, indent=2) + "\n")
    tmp_out.replace(out)
    print(json.dumps(report, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-sizes", type=int, nargs="+", default=[64, 224], help="model input sizes")
    parser.add_argument("--reloads", type=int, default=10, help="alias moves + reloads under load (0 = skip)")
    parser.add_argument("--robustness", type=int, default=2000, help="requests in the malformed-input run")
    parser.add_argument("--images", type=int, default=48, help="ELPV cells used as requests")
    add_load_arguments(parser)
    args = parser.parse_args()

    began = time.perf_counter()
    load_before = load_average()
    with mlflow_workdir("tlops-bench-serving-") as (work, env):
        ingest(IngestConfig(limit=args.images, seed=3), work / "data")
        dataset = read_manifest(work / "data" / "manifest.csv")
        mlflow.set_experiment("serving-benchmark")
        sizes = [bench_size(args, work, dataset, size, env, size == args.image_sizes[-1]) for size in args.image_sizes]

    write_results({
        "command": "python benchmarks/serving.py " + " ".join(sys.argv[1:]),
        "cpu": cpu_description(),
        "load_average_before_after": [load_before, load_average()],
        "minutes": round((time.perf_counter() - began) / 60, 1),
        "model": f"{BACKBONE} + linear head, FP32 ONNX, ELPV cells (300x300 PNG) as base64 JSON, one per request",
        **settings_report(args),
        "sizes": {str(report["size"]): report for report in sizes},
    }, "serving.json")


if __name__ == "__main__":
    main()
