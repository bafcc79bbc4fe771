"""`tlops serve` end to end: the real service (uvicorn on 127.0.0.1) on a real exported Lite0 at 64 px.

Requests are real HTTP; the registry is the session's temporary MLflow sqlite store; the
reference answers come straight from ONNX Runtime on the same file. Two more real ONNX models
serve the failure cases: the export with its head negated (a model whose answers really differ,
for reloads) and a small graph that fails on an all-white image (a batch that raises inside ONNX
Runtime).
"""

from __future__ import annotations

import base64
import ctypes
import io
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import mlflow
import numpy as np
import onnx
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from components.core.errors import UserError
from components.data.preprocess import Preprocessing, load_batch
from components.models.onnx_io import model_labels, model_preprocessing, open_session, read_metadata, softmax
from components.packaging.config import ExportConfig
from components.packaging.export import run as export_run
from components.serving.app import running_service
from components.serving.config import ServeConfig
from components.serving.pyfunc import log_model
from components.serving.served_model import fastest_batch, sha256_of
from components.serving.server import ModelServer
from tests.conftest import REPO, venv_env
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


def reference(model_path: Path, images: list[Path]) -> tuple[tuple[str, ...], np.ndarray]:
    """Labels and class probabilities straight from ONNX Runtime, what every answer of the service must match."""
    metadata = read_metadata(model_path)
    session = open_session(model_path)
    batch = load_batch(images, model_preprocessing(model_path, metadata))
    return model_labels(model_path, metadata), softmax(session.run(None, {session.get_inputs()[0].name: batch})[0])


@pytest.fixture(scope="module")
def expected(tiny_onnx: Path, images: list[Path]) -> tuple[tuple[str, ...], np.ndarray]:
    return reference(tiny_onnx, images)


@pytest.fixture(scope="module")
def flipped_onnx(tiny_onnx: Path) -> Path:
    """The tiny export with its linear head negated: same metadata and trunk, every logit's sign swapped."""
    model = onnx.load(str(tiny_onnx))
    head = [tensor for tensor in model.graph.initializer
            if tensor.data_type == onnx.TensorProto.FLOAT and sorted(tensor.dims) in ([2], [2, 1280])]
    assert len(head) == 2, [(t.name, list(t.dims)) for t in head]  # the head's weight and bias
    for tensor in head:
        tensor.CopyFrom(onnx.numpy_helper.from_array(-onnx.numpy_helper.to_array(tensor), tensor.name))
    path = tiny_onnx.with_name("flipped.onnx")
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def fragile_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real ONNX model that labels an image by its mean brightness and fails inside ONNX Runtime on a white one.

    An all-white image in a batch turns a Gather index out of bounds, which ONNX Runtime refuses
    at run time: a batch that raises, for any batch size, caused by one request's data.
    """
    helper, f32, i64 = onnx.helper, onnx.TensorProto.FLOAT, onnx.TensorProto.INT64
    constants = {
        "axes_hw": np.array([2, 3], np.int64), "axes_chw": np.array([1, 2, 3], np.int64),
        "weights": np.array([[1, -1]] * 3, np.float32), "almost_white": np.array(0.99, np.float32),
        "far": np.array(1000, np.int64), "table": np.zeros(1, np.float32),
    }
    nodes = [
        helper.make_node("ReduceMean", ["image", "axes_hw"], ["colour"], keepdims=0),
        helper.make_node("MatMul", ["colour", "weights"], ["scores"]),  # bright -> defective, dark -> functional
        helper.make_node("ReduceMin", ["image", "axes_chw"], ["darkest"], keepdims=0),
        helper.make_node("ReduceMax", ["darkest"], ["whitest"], keepdims=0),
        helper.make_node("Greater", ["whitest", "almost_white"], ["white"]),
        helper.make_node("Cast", ["white"], ["white_index"], to=i64),
        helper.make_node("Mul", ["white_index", "far"], ["index"]),
        helper.make_node("Gather", ["table", "index"], ["nothing"]),  # index 1000 of a 1-element table: error
        helper.make_node("Add", ["scores", "nothing"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "fragile", [helper.make_tensor_value_info("image", f32, ["batch", 3, 16, 16])],
        [helper.make_tensor_value_info("logits", f32, ["batch", 2])],
        [onnx.numpy_helper.from_array(value, name) for name, value in constants.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    preprocessing = Preprocessing(input_size=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bilinear")
    for key, value in {"labels": json.dumps(["defective", "functional"]), **preprocessing.to_metadata()}.items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    path = tmp_path_factory.mktemp("fragile") / "fragile.onnx"
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def registered(tiny_onnx: Path, flipped_onnx: Path) -> str:
    """Version 1 (the tiny export) and version 2 (its head negated) in the session's MLflow registry."""
    mlflow.set_experiment("serve-tests")
    for model in (tiny_onnx, flipped_onnx):
        with mlflow.start_run():
            log_model(model, MODEL_NAME)
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


def post_image(client: httpx.Client, image: Path | bytes) -> httpx.Response:
    content = image.read_bytes() if isinstance(image, Path) else image
    return client.post("/predict", content=content, headers={"content-type": "image/png"})


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
    with pytest.raises(ValidationError, match="request_timeout_ms"):
        ServeConfig(request_timeout_ms=0)
    with pytest.raises(ValidationError, match="limit_concurrency"):
        ServeConfig(limit_concurrency=0)
    with pytest.raises(ValidationError, match="decode_threads"):
        ServeConfig(decode_threads=-1)
    with pytest.raises(ValidationError, match="decode_nice"):
        ServeConfig(decode_nice=20)


def test_batches_are_as_large_as_is_fastest_per_image_here(tiny_onnx: Path) -> None:
    # As measured at 224 px on a 2-core EPYC: batch 1 within 10% of the best, 16 far slower per image.
    assert fastest_batch({1: 0.0120, 2: 0.0115, 4: 0.0130, 8: 0.0170, 16: 0.0210}) == 1
    assert fastest_batch({1: 0.0031, 2: 0.0033, 4: 0.0033, 8: 0.0016, 16: 0.0025}) == 8  # 64 px
    with service(model_uri=str(tiny_onnx), max_batch=8) as (client, _):
        described = client.get("/model").json()
    timings = {int(size): ms for size, ms in described["ms_per_image_by_batch"].items()}
    assert sorted(timings) == [1, 2, 4, 8]  # every size up to max_batch timed at load
    assert described["batch_limit"] == fastest_batch(timings)


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
    with service(model_uri=str(tiny_onnx), max_batch=8, max_wait_ms=1000, measure_batch=False) as (client, _):
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
        ("wrong_modality", 415, dict(content=good, headers={"content-type": "text/plain"})),  # texts, to an image model
        ("wrong_modality", 415, dict(json={"texts": ["a defective cell"]})),
        ("bad_json", 400, dict(json=["not", "an", "object"])),
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
    with service(model_uri=str(tiny_onnx), max_batch=4, queue_size=4, max_wait_ms=10_000, measure_batch=False) as (client, server):
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

            # Refused before its images are decoded: corrupt images would otherwise have been a 422.
            corrupt = [("f", (f"{i}.png", b"\x89PNG not really", "image/png")) for i in range(2)]
            refused = client.post("/predict", files=corrupt)
            assert (refused.status_code, refused.json()["error"]) == (503, "queue_full"), refused.text
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


def test_reload_follows_the_alias_without_failing_requests_in_flight(registered: str, images: list[Path], expected,
                                                                    flipped_onnx: Path) -> None:
    by_version = {"1": expected, "2": reference(flipped_onnx, images)}
    assert [row.argmax() for row in by_version["1"][1]] != [row.argmax() for row in by_version["2"][1]]
    registry = MlflowClient()
    registry.set_registered_model_alias(registered, "champion", "1")
    with service(model_uri=f"models:/{registered}@champion", max_wait_ms=2) as (client, _):
        described = client.get("/model").json()
        assert (described["name"], described["alias"], described["version"]) == (registered, "champion", "1")

        answers: list[tuple[float, int, int, dict]] = []  # (sent at, image, status, body)
        stop = threading.Event()

        def keep_asking(i: int) -> None:
            while not stop.is_set():
                sent = time.monotonic()
                answer = post_image(client, images[i])
                answers.append((sent, i, answer.status_code, answer.json()))

        threads = [threading.Thread(target=keep_asking, args=(i,)) for i in range(3)]
        for thread in threads:
            thread.start()
        try:
            wait_for(lambda: len(answers) >= 6)
            registry.set_registered_model_alias(registered, "champion", "2")
            assert client.post("/admin/reload").json() == {"changed": True, "previous_version": "1", "version": "2"}
            reloaded_at = time.monotonic()
            wait_for(lambda: sum(sent > reloaded_at for sent, *_ in answers) >= 6)
        finally:
            stop.set()
            for thread in threads:
                thread.join()

        assert {status for _, _, status, _ in answers} == {200}
        for _, i, _, body in answers:  # each answer is its version's own, to the last digit
            check_answers(body, by_version[body["model_version"]], [i], body["model_version"])
        assert {body["model_version"] for sent, _, _, body in answers if sent > reloaded_at} == {"2"}
        assert "1" in {body["model_version"] for *_, body in answers}
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


def test_a_cancelled_request_is_skipped_and_its_batch_mates_answered(tiny_onnx: Path, images: list[Path],
                                                                     expected) -> None:
    version = f"sha256:{sha256_of(tiny_onnx)[:12]}"
    with service(model_uri=str(tiny_onnx), max_batch=4, max_wait_ms=10_000, measure_batch=False) as (client, server):
        with server.batcher.arriving():  # one more request on its way: the batcher holds part-full batches for it
            ticket, model = server.admit(1, time.monotonic() + 60)
            cancelled = server.batcher.submit(ticket, model, server.prepare(model, [images[0].read_bytes()]))
            assert cancelled.cancel()  # what a request's deadline does to its future while the image is queued
            answers: list[httpx.Response] = []
            sender = threading.Thread(target=lambda: answers.append(post_image(client, images[1])))
            sender.start()
            wait_for(lambda: server.batcher.depth == 2)  # both images wait in the same batch
        sender.join()
        assert answers[0].status_code == 200, answers[0].text
        check_answers(answers[0].json(), expected, [1], version)
        assert metric(client, "tlops_serve_batch_size_sum") == 1  # the cancelled image never reached ONNX Runtime
        for i in (2, 3, 4):  # the worker lives on
            check_answers(post_image(client, images[i]).json(), expected, [i], version)
        assert client.get("/readyz").status_code == 200


def test_a_failing_batch_fails_only_the_request_that_broke_it(fragile_onnx: Path, images: list[Path]) -> None:
    version = f"sha256:{sha256_of(fragile_onnx)[:12]}"
    expected = reference(fragile_onnx, images)
    white = png(np.full((40, 40), 255, dtype=np.uint8))
    with service(model_uri=str(fragile_onnx), max_batch=8, max_wait_ms=10_000, measure_batch=False) as (client, server):
        answers: dict[str, httpx.Response] = {}
        with server.batcher.arriving():
            senders = [threading.Thread(target=lambda k=key, c=content: answers.__setitem__(k, post_image(client, c)))
                       for key, content in [("white", white), ("0", images[0]), ("1", images[1])]]
            for sender in senders:
                sender.start()
            wait_for(lambda: server.batcher.depth == 3)  # one batch: the white image and two good ones
        for sender in senders:
            sender.join()
        assert (answers["white"].status_code, answers["white"].json()["error"]) == (500, "internal")
        assert "Gather" in answers["white"].json()["detail"]  # ONNX Runtime's own error, handed to the request
        for i in (0, 1):
            assert answers[str(i)].status_code == 200, answers[str(i)].text
            check_answers(answers[str(i)].json(), expected, [i], version)
        assert metric(client, "tlops_serve_batch_size_count") == 4  # the failed batch of 3, then each request alone
        for i in range(2, 6):
            check_answers(post_image(client, images[i]).json(), expected, [i], version)
        assert client.get("/readyz").status_code == 200


def test_a_request_past_its_deadline_gets_504_and_the_service_still_answers(tiny_onnx: Path, images: list[Path],
                                                                          expected) -> None:
    version = f"sha256:{sha256_of(tiny_onnx)[:12]}"
    with service(model_uri=str(tiny_onnx), max_batch=4, max_wait_ms=10_000, request_timeout_ms=2000, measure_batch=False) as (client, server):
        with server.batcher.arriving():  # the batcher holds part-full batches: as good as stuck for this request
            late = post_image(client, images[0])
            assert (late.status_code, late.json()["error"]) == (504, "deadline_exceeded"), late.text
            assert "request_timeout_ms" in late.json()["detail"]
            assert server.batcher.depth == 0  # its image was dropped, not left to run for nobody

        host, port = client.base_url.host, client.base_url.port
        body = images[1].read_bytes()
        with socket.create_connection((host, port)) as stalled:  # stops uploading halfway: answered, not hung
            stalled.sendall(f"POST /predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/png\r\n"
                            f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:10])
            stalled.settimeout(30)
            assert stalled.recv(65536).startswith(b"HTTP/1.1 504")

        check_answers(post_image(client, images[2]).json(), expected, [2], version)
        assert metric(client, "tlops_serve_errors_total", kind="deadline_exceeded") == 2
        assert metric(client, "tlops_serve_batch_size_sum") == 1  # only the last request ran
        assert client.get("/readyz").status_code == 200


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread is killed on purpose
def test_readyz_fails_when_the_batching_thread_is_dead(tiny_onnx: Path, images: list[Path]) -> None:
    with service(model_uri=str(tiny_onnx)) as (client, server):
        assert client.get("/readyz").status_code == 200
        worker = next(thread for thread in threading.enumerate() if thread.name == "tlops-batcher")
        # Kill it for real: an exception raised inside the thread, which nothing in the loop catches.
        assert ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(worker.ident), ctypes.py_object(SystemExit)) == 1
        with server.batcher.arriving():  # wakes the waiting worker, which then meets the exception
            pass
        worker.join(timeout=30)
        assert not worker.is_alive()

        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert "batching thread is not running (SystemExit" in ready.json()["error"]
        refused = post_image(client, images[0])  # refused at once, not queued for a worker that is gone
        assert (refused.status_code, refused.json()["error"]) == (503, "not_ready")
        assert refused.headers["retry-after"] == "1"
        assert client.get("/healthz").status_code == 200


SERVE_AND_LIST_MODULES = """
import json, sys, time
import httpx
from components.serving.app import running_service
from components.serving.config import ServeConfig

with running_service(ServeConfig(model_uri=sys.argv[1], port=int(sys.argv[2]))) as (url, server):
    deadline = time.monotonic() + 120
    while not server.ready and server.load_error is None and time.monotonic() < deadline:
        time.sleep(0.05)
    with open(sys.argv[3], "rb") as image:
        answer = httpx.post(url + "/predict", content=image.read(), headers={"content-type": "image/png"})
    assert answer.status_code == 200, answer.text
    server.reload()
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
"""


def test_the_serving_process_imports_no_training_stack_nor_mlflow(registered: str, images: list[Path]) -> None:
    """Started on a registry alias, answering and reloading, the process holds only what serving needs."""
    MlflowClient().set_registered_model_alias(registered, "champion", "1")
    env = {**venv_env(), "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", SERVE_AND_LIST_MODULES, f"models:/{registered}@champion",
                           str(free_port()), str(images[0])], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    modules = set(json.loads(done.stdout.strip().splitlines()[-1]))
    assert {"onnxruntime", "uvicorn", "fastapi"} <= modules  # it did serve
    assert not modules & {"torch", "torchvision", "sklearn", "scipy", "pandas", "onnx", "mlflow"}


SERVE_MODEL_AND_LIST_MODULES = """
import argparse, json, sys
from pathlib import Path
from components.core.errors import UserError
from tlops.cli import serve_model

try:
    serve_model(argparse.Namespace(params=Path("params.yaml"), overrides=[], model=sys.argv[1], host=None, port=None))
except UserError:
    pass
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
"""


@pytest.mark.parametrize(("model", "says", "not_imported"), [
    ("params.yaml", "params.yaml is not an ONNX model", {"fastapi", "uvicorn", "mlflow", "torch"}),
    ("missing.onnx", "'missing.onnx': no such file", {"onnxruntime", "fastapi", "mlflow", "torch"}),
    ("models:/no-such-model@champion", "does not resolve it", {"fastapi", "uvicorn", "mlflow", "torch"}),
    ("models:/no-such-model", "expected models:/<name>@<alias>", {"onnxruntime", "fastapi", "mlflow", "torch"}),
])
def test_a_bad_model_argument_is_one_line(model: str, says: str, not_imported: set[str], tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    env = {**venv_env(), "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "tlops.cli", "serve", "--model", model], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    lines = done.stderr.strip().splitlines()
    assert done.returncode in (1, 2) and len(lines) == 1, done.stderr[-3000:]
    assert lines[0].startswith("tlops: error:") and says in lines[0], lines[0]
    assert done.stdout == ""
    # The check comes before anything heavy: `serve_model` imports neither the web stack nor MLflow first.
    done = subprocess.run([sys.executable, "-c", SERVE_MODEL_AND_LIST_MODULES, model], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300, check=True)
    assert not set(json.loads(done.stdout.strip().splitlines()[-1])) & not_imported
