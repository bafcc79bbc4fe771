"""`tlops serve` end to end: the real service (uvicorn on 127.0.0.1) on a real exported Lite0 at 64 px.

Requests are real HTTP; the registry is the session's temporary MLflow sqlite store; the
reference answers come straight from ONNX Runtime on the same file.
"""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from components.core.errors import UserError
from components.data.preprocess import load_batch
from components.models.onnx_io import model_labels, model_preprocessing, open_session, read_metadata, softmax
from components.packaging.config import ExportConfig
from components.packaging.export import run as export_run
from components.serving.app import running_service
from components.serving.config import ServeConfig
from components.serving.pyfunc import log_model
from components.serving.served_model import sha256_of
from components.serving.server import ModelServer
from tests.tiny_features import make_features
from tests.tiny_model import make_checkpoint, make_dataset

MODEL_NAME = "tiny-serve"


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("serve_model")
    dataset = make_dataset(root / "data")
    checkpoint = make_checkpoint(root / "model.pt", dataset)
    return export_run(ExportConfig(parity_images=2), 0.0, checkpoint, dataset, root / "export",
                      features_dir=make_features(dataset, root)).artifacts["fp32"]


@pytest.fixture(scope="module")
def images(tiny_onnx: Path) -> list[Path]:
    return sorted((tiny_onnx.parents[1] / "data" / "images").rglob("*.png"))


@pytest.fixture(scope="module")
def expected(tiny_onnx: Path, images: list[Path]) -> tuple[tuple[str, ...], np.ndarray]:
    """Labels and class probabilities straight from ONNX Runtime, the reference every answer must match."""
    metadata = read_metadata(tiny_onnx)
    session = open_session(tiny_onnx)
    batch = load_batch(images, model_preprocessing(tiny_onnx, metadata))
    return model_labels(tiny_onnx, metadata), softmax(session.run(None, {session.get_inputs()[0].name: batch})[0])


@pytest.fixture(scope="module")
def registered(tiny_onnx: Path) -> str:
    """Two versions of the tiny model in the session's MLflow registry, logged as the register stage will."""
    mlflow.set_experiment("serve-tests")
    for _ in range(2):
        with mlflow.start_run():
            log_model(tiny_onnx, MODEL_NAME)
    return MODEL_NAME


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def service(**settings: object) -> Iterator[tuple[httpx.Client, ModelServer]]:
    """The real service in a thread, once it is ready (or once it gave up loading)."""
    with running_service(ServeConfig(port=free_port(), **settings)) as (url, server):
        with httpx.Client(base_url=url, timeout=60) as client:
            deadline = time.monotonic() + 60
            while not server.ready and server.load_error is None and time.monotonic() < deadline:
                time.sleep(0.05)
            yield client, server


def metric(client: httpx.Client, name: str, **labels: str) -> float:
    """One sample from /metrics (0 when the labelled series does not exist yet)."""
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def wait_for(condition: Callable[[], bool], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def check_answers(answer: dict, expected: tuple[tuple[str, ...], np.ndarray], rows: list[int], version: str) -> None:
    labels, probabilities = expected
    assert [p["label"] for p in answer["predictions"]] == [labels[int(probabilities[i].argmax())] for i in rows]
    got = np.array([[p["probabilities"][label] for label in labels] for p in answer["predictions"]])
    np.testing.assert_allclose(got, probabilities[rows], atol=1e-5)
    assert answer["model_version"] == version
    assert {p["model_version"] for p in answer["predictions"]} == {version}


def test_config_ranges_are_checked_at_load() -> None:
    assert ServeConfig().model_uri == "models:/tlops-elpv@champion"
    with pytest.raises(ValidationError, match="max_batch"):
        ServeConfig(max_batch=0)
    with pytest.raises(ValidationError, match="queue_size"):
        ServeConfig(max_batch=32, queue_size=8)
    with pytest.raises(ValidationError, match="port"):
        ServeConfig(port=70_000)
    with pytest.raises(ValidationError, match="model_uri"):
        ServeConfig(model_uri="models:/tlops-elpv")  # neither @alias nor /version
    with pytest.raises(ValidationError, match="max_batchsize"):
        ServeConfig(max_batchsize=8)


def test_predictions_match_onnx_runtime_in_every_request_format(tiny_onnx: Path, images: list[Path], expected) -> None:
    version = f"sha256:{sha256_of(tiny_onnx)[:12]}"
    with service(model_uri=str(tiny_onnx)) as (client, _):
        assert client.get("/healthz").json() == {"status": "alive"}
        assert client.get("/readyz").json() == {"ready": True, "model_version": version}
        described = client.get("/model").json()
        assert (described["version"], described["labels"]) == (version, list(expected[0]))
        assert described["metadata"]["backbone"] == "efficientnet_lite0"

        for i, path in enumerate(images):  # raw bytes, one image per request
            answer = client.post("/predict", content=path.read_bytes(), headers={"content-type": "image/png"})
            assert answer.status_code == 200, answer.text
            check_answers(answer.json(), expected, [i], version)

        files = [("files", (p.name, p.read_bytes(), "image/png")) for p in images]
        answer = client.post("/predict", files=files)  # multipart, all at once
        assert answer.status_code == 200, answer.text
        check_answers(answer.json(), expected, list(range(len(images))), version)

        encoded = [base64.b64encode(p.read_bytes()).decode() for p in images[:5]]
        answer = client.post("/predict", json={"images": encoded})
        check_answers(answer.json(), expected, list(range(5)), version)
        wrapped = "\n".join(encoded[3][i : i + 76] for i in range(0, len(encoded[3]), 76))  # as `base64` prints it
        answer = client.post("/predict", json={"image": f"data:image/png;base64,{wrapped}"})
        check_answers(answer.json(), expected, [3], version)

        labels, probabilities = expected
        predicted = [labels[int(row.argmax())] for row in probabilities]
        for label in labels:  # 12 single + 12 multipart + 5 + 1 JSON predictions
            count = predicted.count(label) * 2 + predicted[:5].count(label) + (predicted[3] == label)
            assert metric(client, "tlops_serve_predictions_total", label=label) == count
        assert metric(client, "tlops_serve_requests_total", endpoint="/predict", status="200") == len(images) + 3


def test_concurrent_requests_share_batches(tiny_onnx: Path, images: list[Path], expected) -> None:
    with service(model_uri=str(tiny_onnx), max_batch=8, max_wait_ms=1000) as (client, _):
        start = threading.Barrier(8)
        answers: dict[int, httpx.Response] = {}

        def send(i: int) -> None:
            start.wait()
            answers[i] = client.post("/predict", content=images[i].read_bytes(), headers={"content-type": "image/png"})

        threads = [threading.Thread(target=send, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for i, answer in answers.items():
            assert answer.status_code == 200, answer.text
            check_answers(answer.json(), expected, [i], answer.json()["model_version"])
        assert metric(client, "tlops_serve_batch_size_sum") == 8
        assert metric(client, "tlops_serve_batch_size_count") < 8  # at least one ONNX Runtime call served several


def test_malformed_input_gets_4xx_json_and_the_service_stays_ready(tiny_onnx: Path, images: list[Path]) -> None:
    good = images[0].read_bytes()
    bomb = png(np.zeros((1500, 1500), dtype=np.uint8))  # 2.25 megapixels in a few kB; the limit here is 1
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"  # Pillow could open it via Ghostscript
    image_png = {"content-type": "image/png"}
    multipart = {"content-type": "multipart/form-data; boundary=tlops"}
    fields_only = b'--tlops\r\nContent-Disposition: form-data; name="note"\r\n\r\nno file here\r\n--tlops--\r\n'
    cases = [
        ("not_an_image", 422, dict(content=b"definitely not an image", headers=image_png)),
        ("not_an_image", 422, dict(content=eps, headers={"content-type": "image/eps"})),
        ("corrupt_image", 422, dict(content=good[: len(good) // 2], headers=image_png)),
        ("empty_image", 422, dict(content=b"", headers=image_png)),
        ("too_many_pixels", 422, dict(content=bomb, headers=image_png)),
        ("unsupported_media_type", 415, dict(content=good, headers={"content-type": "text/plain"})),
        ("unsupported_media_type", 415, dict(content=good)),
        ("body_too_large", 413, dict(content=b"\x89PNG" + bytes(300_000), headers=image_png)),
        ("body_too_large", 413, dict(content=iter([bytes(100_000)] * 3), headers=image_png)),  # chunked, no length
        ("bad_json", 400, dict(content=b"{not json", headers={"content-type": "application/json"})),
        ("bad_json", 400, dict(json={"pictures": []})),
        ("bad_base64", 400, dict(json={"images": ["%%% not base64 %%%"]})),
        ("bad_base64", 400, dict(json={"images": [42]})),
        ("no_images", 400, dict(json={"images": []})),
        ("no_images", 400, dict(content=fields_only, headers=multipart)),
        ("bad_multipart", 400, dict(content=b"garbage without boundaries", headers=multipart)),
        ("bad_multipart", 400, dict(content=fields_only, headers={"content-type": "multipart/form-data"})),
        ("corrupt_image", 422, dict(files=[("f", ("a.png", good, "image/png")), ("f", ("b.png", good[:300], "image/png"))])),
    ]
    with service(model_uri=str(tiny_onnx), max_body_mb=0.25, max_image_megapixels=1.0) as (client, _):
        for kind, status, request in cases:
            answer = client.post("/predict", **request)
            assert (answer.status_code, answer.json()["error"]) == (status, kind), answer.text
            assert answer.json()["detail"]
        assert client.get("/readyz").status_code == 200
        assert client.post("/predict", content=good, headers=image_png).status_code == 200
        for kind in {kind for kind, _, _ in cases}:
            assert metric(client, "tlops_serve_errors_total", kind=kind) == sum(k == kind for k, _, _ in cases)
        assert metric(client, "tlops_serve_predictions_total", label="defective") + metric(
            client, "tlops_serve_predictions_total", label="functional") == 1  # the half-good multipart counted nothing
        assert metric(client, "tlops_serve_requests_total", endpoint="/predict", status="500") == 0


def test_full_queue_answers_503_with_retry_after(tiny_onnx: Path, images: list[Path]) -> None:
    # A client still uploading makes the batcher hold a part-full batch (up to max_wait), so the
    # queue's state is known: three images wait while the slow upload is under way.
    with service(model_uri=str(tiny_onnx), max_batch=4, queue_size=4, max_wait_ms=10_000) as (client, server):
        slow_image = images[5].read_bytes()
        host, port = client.base_url.host, client.base_url.port
        with socket.create_connection((host, port)) as slow:
            slow.sendall(f"POST /predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/png\r\n"
                         f"Content-Length: {len(slow_image)}\r\n\r\n".encode() + slow_image[:10])
            wait_for(lambda: server.batcher.arriving_requests == 1)

            files = [("f", (p.name, p.read_bytes(), "image/png")) for p in images[:3]]
            first: list[httpx.Response] = []
            waiting = threading.Thread(target=lambda: first.append(client.post("/predict", files=files)))
            waiting.start()
            wait_for(lambda: server.batcher.depth == 3)

            refused = client.post("/predict", files=[("f", (p.name, p.read_bytes(), "image/png")) for p in images[3:5]])
            assert (refused.status_code, refused.json()["error"]) == (503, "queue_full")
            assert int(refused.headers["retry-after"]) >= 1
            assert server.batcher.depth == 3  # the refused request queued nothing

            fits = client.post("/predict", content=images[3].read_bytes(), headers={"content-type": "image/png"})
            waiting.join()
            assert fits.status_code == 200 and first[0].status_code == 200
            assert len(first[0].json()["predictions"]) == 3
            assert metric(client, "tlops_serve_batch_size_count") == 1  # the fourth image completed the waiting batch

            slow.sendall(slow_image[10:])
            assert slow.recv(65536).startswith(b"HTTP/1.1 200")
        assert metric(client, "tlops_serve_errors_total", kind="queue_full") == 1
        assert metric(client, "tlops_serve_batch_size_sum") == 5
        assert client.get("/readyz").status_code == 200


def test_not_ready_until_the_model_loads(tiny_onnx: Path, tmp_path: Path, images: list[Path]) -> None:
    later = tmp_path / "later.onnx"
    with pytest.raises(UserError, match="no such file"):
        ModelServer(ServeConfig(model_uri=str(later))).start(raise_on_error=True)
    with service(model_uri=str(later)) as (client, _):
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 503
        refused = client.post("/predict", content=images[0].read_bytes(), headers={"content-type": "image/png"})
        assert (refused.status_code, refused.json()["error"]) == (503, "not_ready")
        later.write_bytes(tiny_onnx.read_bytes())
        reloaded = client.post("/admin/reload").json()
        assert reloaded == {"changed": True, "previous_version": None, "version": f"sha256:{sha256_of(later)[:12]}"}
        assert client.get("/readyz").status_code == 200
        assert client.post("/predict", content=images[0].read_bytes(), headers={"content-type": "image/png"}).status_code == 200


def test_reload_follows_the_alias_without_failing_requests_in_flight(registered: str, images: list[Path], expected) -> None:
    registry = MlflowClient()
    registry.set_registered_model_alias(registered, "champion", "1")
    with service(model_uri=f"models:/{registered}@champion", max_wait_ms=2) as (client, _):
        described = client.get("/model").json()
        assert (described["name"], described["alias"], described["version"]) == (registered, "champion", "1")

        answers: list[tuple[float, int, str | None]] = []  # (sent at, status, version)
        stop = threading.Event()

        def keep_asking(i: int) -> None:
            while not stop.is_set():
                sent = time.monotonic()
                answer = client.post("/predict", content=images[i].read_bytes(), headers={"content-type": "image/png"})
                answers.append((sent, answer.status_code, answer.json().get("model_version")))

        threads = [threading.Thread(target=keep_asking, args=(i,)) for i in range(3)]
        for thread in threads:
            thread.start()
        try:
            wait_for(lambda: len(answers) >= 6)
            registry.set_registered_model_alias(registered, "champion", "2")
            assert client.post("/admin/reload").json() == {"changed": True, "previous_version": "1", "version": "2"}
            reloaded_at = time.monotonic()
            wait_for(lambda: sum(sent > reloaded_at for sent, _, _ in answers) >= 6)
        finally:
            stop.set()
            for thread in threads:
                thread.join()

        assert {status for _, status, _ in answers} == {200}
        assert {version for sent, _, version in answers if sent > reloaded_at} == {"2"}
        assert "1" in {version for _, _, version in answers}
        assert client.get("/model").json()["version"] == "2"
        assert client.post("/admin/reload").json()["changed"] is False

        registry.delete_registered_model_alias(registered, "champion")
        failed = client.post("/admin/reload")
        assert (failed.status_code, failed.json()["error"]) == (409, "reload_failed")
        assert client.get("/readyz").json() == {"ready": True, "model_version": "2"}
    registry.set_registered_model_alias(registered, "champion", "1")


def test_polling_picks_up_a_moved_alias(registered: str) -> None:
    registry = MlflowClient()
    registry.set_registered_model_alias(registered, "champion", "1")
    with service(model_uri=f"models:/{registered}@champion", poll_seconds=0.2) as (client, _):
        assert client.get("/model").json()["version"] == "1"
        registry.set_registered_model_alias(registered, "champion", "2")
        wait_for(lambda: client.get("/model").json()["version"] == "2", timeout_s=60)
    registry.set_registered_model_alias(registered, "champion", "1")


def test_pyfunc_round_trip_predicts_like_the_service(registered: str, tiny_onnx: Path, images: list[Path],
                                                     tmp_path: Path) -> None:
    stored = Path(mlflow.artifacts.download_artifacts(f"models:/{registered}/1", dst_path=str(tmp_path)))
    onnx_files = list(stored.rglob("*.onnx"))
    assert len(onnx_files) == 1 and sha256_of(onnx_files[0]) == sha256_of(tiny_onnx)  # byte for byte

    model = mlflow.pyfunc.load_model(f"models:/{registered}/1")
    frame = pd.DataFrame({"image": [base64.b64encode(p.read_bytes()).decode() for p in images]})
    predicted = model.predict(frame)
    with service(model_uri=f"models:/{registered}/1") as (client, _):
        served = client.post("/predict", files=[("f", (p.name, p.read_bytes(), "image/png")) for p in images]).json()
    assert list(predicted["label"]) == [p["label"] for p in served["predictions"]]
    for row, answer in zip(predicted["probabilities"], served["predictions"], strict=True):
        assert row.keys() == answer["probabilities"].keys()
        np.testing.assert_allclose(list(row.values()), list(answer["probabilities"].values()), atol=1e-6)

    with pytest.raises(MlflowException, match="not_an_image"):
        model.predict(pd.DataFrame({"image": [base64.b64encode(b"not an image").decode()]}))
    with pytest.raises(RuntimeError, match="active MLflow run"):
        log_model(tiny_onnx, registered)
