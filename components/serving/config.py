"""Params of `tlops serve` (`serve:` in params.yaml), and what a model URI may look like; no framework imported."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator, model_validator

from components.core.config import StageConfig
from components.core.errors import UserError

DEFAULT_MODEL_URI = "models:/tlops-elpv@champion"


def parse_registry_uri(uri: str) -> tuple[str, str | None, str | None]:
    """`models:/<name>@<alias>` -> (name, alias, None); `models:/<name>/<version>` -> (name, None, version)."""
    rest = uri.removeprefix("models:/")
    if "@" in rest:
        name, alias = rest.rsplit("@", 1)
        if name and alias:
            return name, alias, None
    elif "/" in rest:
        name, version = rest.rsplit("/", 1)
        if name and version.isdigit():
            return name, None, version
    raise UserError(f"model_uri {uri!r}: expected models:/<name>@<alias>, models:/<name>/<version> or a file path.")


def check_model_uri(uri: str) -> None:
    """A `model_uri` that is a well-formed registry URI or names an existing file; the error says what to pass.

    Whether the file is an ONNX model, or the registry knows the URI, is for loading to tell.
    """
    if uri.startswith("models:/"):
        parse_registry_uri(uri)
        return
    path = Path(uri)
    if not path.is_file():
        what = "a folder, not a file" if path.is_dir() else "no such file"
        raise UserError(f"model_uri {uri!r}: {what}; pass an ONNX file exported by tlops, "
                        f"models:/<name>@<alias> or models:/<name>/<version>.")


class ServeConfig(StageConfig):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    model_uri: str = Field(DEFAULT_MODEL_URI, min_length=1)  # models:/<name>@<alias>, models:/<name>/<version> or a path
    max_batch: int = Field(16, ge=1, le=512)  # images per ONNX Runtime call, at most
    measure_batch: bool = True  # at load, time batch sizes up to max_batch and batch at most the fastest per image
    max_wait_ms: float = Field(5.0, ge=0, le=10_000)  # how long the first queued image waits for company
    queue_size: int = Field(256, ge=1, le=100_000)  # images waiting; beyond it requests get 503 + Retry-After
    max_body_mb: float = Field(10.0, gt=0, le=1024)
    max_image_megapixels: float = Field(16.0, gt=0, le=1000)  # decoded size; above it is a decompression bomb
    max_text_chars: int = Field(100_000, ge=1, le=10_000_000)  # a text model: longer texts get 413 (tokens past max_length are cut anyway)
    poll_seconds: float = Field(0.0, ge=0, le=86_400)  # 0 = reload only on POST /admin/reload
    num_threads: int = Field(0, ge=0, le=256)  # ONNX Runtime intra-op threads, 0 = all cores
    request_timeout_ms: float = Field(10_000, ge=10, le=600_000)  # past it a /predict gets 504, its images dropped
    decode_threads: int = Field(0, ge=0, le=256)  # images decoded at once, 0 = one per core
    decode_nice: int = Field(10, ge=0, le=19)  # decoding threads' niceness: they yield the cores to ONNX Runtime
    limit_concurrency: int = Field(256, ge=1, le=100_000)  # uvicorn: open connections beyond it get 503

    @field_validator("model_uri")
    @classmethod
    def _registry_uri_is_well_formed(cls, uri: str) -> str:
        if uri.startswith("models:/"):
            try:
                parse_registry_uri(uri)
            except UserError as error:
                raise ValueError(str(error)) from None
        return uri

    @model_validator(mode="after")
    def _queue_holds_a_batch(self) -> ServeConfig:
        if self.queue_size < self.max_batch:
            raise ValueError(
                f"queue_size ({self.queue_size}) is smaller than max_batch ({self.max_batch}); a batch could "
                f"never fill. Raise queue_size or lower max_batch."
            )
        return self

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)

    @property
    def max_pixels(self) -> int:
        return int(self.max_image_megapixels * 1e6)

    @property
    def request_timeout_s(self) -> float:
        return self.request_timeout_ms / 1000


