"""Text tokenization as one typed value: the text counterpart of `components/data/preprocess.py`.

A `Tokenization` says how a text becomes a text encoder's input ids: which tokenizer (the sha256 of
its `tokenizer.json`), how many tokens are kept (`max_length`, longest texts cut at the end) and how
a batch is padded (to its longest text; the attention mask hides the padding). It is derived from
a registry entry, travels as JSON in `backbone.json` and checkpoints, and as strings in ONNX
`metadata_props`, beside the tokenizer file itself (`tokenizer_json`), so a served model tokenizes
with exactly what it was trained with and needs nothing else.

Tokenizing is the `tokenizers` library (Rust, no torch), at training time and in the server alike:
the same file and settings give the same ids. Why not the tokenizer inside the ONNX graph
(onnxruntime-extensions' BertTokenizer op): it gave the same ids on every BBC News text but takes one
text per call, so a batch of 32 was 32 calls and no batched encoder (docs/text.md, measured by
`benchmarks/text_tokenizers.py`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from components.core.errors import UserError
from components.data.preprocess import Preprocessing

if TYPE_CHECKING:
    from tokenizers import Tokenizer

MODALITY_KEY = "modality"  # metadata_props / manifest key saying which modality a model or dataset is
TOKENIZER_KEY = "tokenizer_json"  # metadata_props key holding the tokenizer file itself
INPUT_NAMES = ("input_ids", "attention_mask")  # what a text model's ONNX graph takes


class TokenizationError(UserError):
    """A tokenization that cannot be read back, or a tokenizer file that is not the one it names."""


class Tokenization(BaseModel):
    """How a text becomes input ids. Part of every feature cache key and of the model's metadata."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tokenizer_sha256: str = Field(min_length=64, max_length=64)
    max_length: int = Field(ge=2, le=8192)  # tokens kept, [CLS] and [SEP] included
    truncation: Literal["end"] = "end"  # a longer text loses its end (a headline and lead survive)
    padding: Literal["longest"] = "longest"  # a batch is padded to its longest text

    def to_metadata(self) -> dict[str, str]:
        return {MODALITY_KEY: "text", **{name: str(value) for name, value in self.model_dump().items()}}

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str]) -> Tokenization:
        missing = [name for name, field in cls.model_fields.items() if field.is_required() and name not in metadata]
        if missing:
            raise TokenizationError(f"metadata lacks tokenization key(s) {missing}")
        try:
            return cls.model_validate({name: metadata[name] for name in cls.model_fields if name in metadata})
        except ValidationError as error:
            first = error.errors()[0]
            raise TokenizationError(f"metadata tokenization is malformed: {'.'.join(map(str, first['loc']))}: "
                                    f"{first['msg']}") from None

    @classmethod
    def of(cls, value: Tokenization | Mapping[str, object]) -> Tokenization:
        if isinstance(value, cls):
            return value
        try:
            return cls.model_validate(dict(value))
        except ValidationError as error:
            raise TokenizationError(f"tokenization is malformed: {error.errors()[0]['msg']}") from None

    def differences(self, other: Tokenization) -> dict[str, tuple[object, object]]:
        mine, theirs = self.model_dump(), other.model_dump()
        return {name: (mine[name], theirs[name]) for name in mine if mine[name] != theirs[name]}


def preprocessing_for(entry: Mapping[str, object], value: object) -> Preprocessing | Tokenization:
    """The typed preparation a checkpoint or `backbone.json` stored beside `entry` (the registry entry's description):
    a text encoder's `Tokenization`, an image backbone's `Preprocessing`."""
    if entry.get("modality") == "text":
        return Tokenization.of(value)  # type: ignore[arg-type]
    return Preprocessing.of(value)  # type: ignore[arg-type]


def is_text_metadata(metadata: Mapping[str, str]) -> bool:
    """Whether an ONNX model's metadata_props describe a text model (images say nothing: they came first)."""
    return metadata.get(MODALITY_KEY) == "text"


def load_tokenizer(tokenizer_json: str, tokenization: Tokenization) -> Tokenizer:
    """The tokenizer `tokenizer_json` defines, set to `tokenization`; refused if it is not the file the
    tokenization names (a model must never tokenize with a tokenizer it was not trained with)."""
    from tokenizers import Tokenizer

    actual = hashlib.sha256(tokenizer_json.encode("utf-8")).hexdigest()
    if actual != tokenization.tokenizer_sha256:
        raise TokenizationError(f"the tokenizer file has sha256 {actual[:12]}, the tokenization names "
                                f"{tokenization.tokenizer_sha256[:12]}; re-export the model.")
    tokenizer = Tokenizer.from_str(tokenizer_json)
    tokenizer.enable_truncation(tokenization.max_length, strategy="longest_first", direction="right")
    pad = tokenizer.padding or {}
    tokenizer.enable_padding(pad_id=pad.get("pad_id", 0), pad_token=pad.get("pad_token", "[PAD]"), length=None)
    return tokenizer


def tokenizer_from_metadata(metadata: Mapping[str, str]) -> tuple[Tokenization, Tokenizer]:
    """The tokenization a text model's metadata_props declare, and the tokenizer file they carry, set to it."""
    tokenization = Tokenization.from_metadata(metadata)
    if TOKENIZER_KEY not in metadata:
        raise TokenizationError(f"metadata lacks `{TOKENIZER_KEY}`")
    return tokenization, load_tokenizer(metadata[TOKENIZER_KEY], tokenization)


def encode(tokenizer: Tokenizer, texts: Sequence[str]) -> dict[str, np.ndarray]:
    """`input_ids` and `attention_mask`, int64 (batch, longest text in tokens)."""
    encodings = tokenizer.encode_batch(list(texts))
    return {"input_ids": np.asarray([e.ids for e in encodings], dtype=np.int64).reshape(len(texts), -1),
            "attention_mask": np.asarray([e.attention_mask for e in encodings], dtype=np.int64).reshape(len(texts), -1)}


def token_counts(tokenizer: Tokenizer, texts: Sequence[str]) -> list[int]:
    """Tokens per text after truncation (what one row of the encoder's input costs)."""
    return [sum(e.attention_mask) for e in tokenizer.encode_batch(list(texts))]


def read_text(path: Path) -> str:
    """A stored text: UTF-8, strictly (validation refuses files that are not)."""
    return Path(path).read_bytes().decode("utf-8")


def read_texts(paths: Sequence[Path]) -> list[str]:
    return [read_text(path) for path in paths]
