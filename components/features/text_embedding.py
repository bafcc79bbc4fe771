"""Text features: a frozen sentence encoder run in ONNX Runtime, one vector per text, cached by content.

The text counterpart of `components/features/extract.py`, writing the same stores and outputs
(`FeatureStore` entries per text sha256, `features.npz`, `backbone.json`), so select, the linear
probe, export's checks and drift read text features exactly as they read image features.

The key covers everything that changes a vector besides the text: the weights, the tokenizer file
and its settings (`Tokenization`: changing `features.max_length` misses), the taps (pooling and layer),
the ONNX opset, the versions of the libraries that compute it and the source of the code that does.
The encoder is exported under that key and checked against torch on real texts before it computes
anything. Texts are batched by length (sorted by token count), so a batch pads little.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from components.core.code_version import package_versions, source_sha256
from components.core.errors import UserError
from components.core.progress import Progress, no_progress
from components.core.result import atomic_path
from components.data import tokenization
from components.data.manifest import Dataset
from components.data.tokenization import Tokenization, encode, load_tokenizer, read_texts
from components.features import cache
from components.features.cache import FeatureStore, cache_key
from components.models import text_encoders
from components.models.onnx_io import open_session
from components.models.registry import TextEncoderEntry
from components.models.text_encoders import TextTrunk, build_text_trunk, export_text_onnx, tokenizer_json

log = logging.getLogger(__name__)

# Libraries whose arithmetic or tokenizing ends up in a cached vector.
KEYED_PACKAGES = ("numpy", "onnx", "onnxruntime", "tokenizers", "torch", "transformers")


class TextEncoderParityError(UserError):
    """An exported text encoder that does not compute what the torch encoder computes."""


def feature_code() -> tuple[Any, ...]:
    """The code between a text file and a cached vector, hashed whole into every key."""
    return (tokenization, text_encoders, sys.modules[__name__], cache)


def key_inputs(entry: TextEncoderEntry, tokens: Tokenization, taps: Sequence[str], opset: int) -> dict[str, Any]:
    """Everything that changes a text's vector except the text itself."""
    return {
        "modality": "text",
        "architecture": entry.architecture,
        "weights_sha256": entry.weights_sha256,
        "tokenization": tokens.model_dump(mode="json"),
        "taps": {tap: entry.taps[tap] for tap in taps},
        "normalize": entry.normalize,
        "opset": opset,
        "versions": package_versions(KEYED_PACKAGES),
        "code_sha256": source_sha256(feature_code()),
    }


def batches_by_length(lengths: Sequence[int], batch_size: int) -> list[np.ndarray]:
    """Row indices in batches of similar length (longest first), so padding costs little."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def verify(entry: TextEncoderEntry, trunk: TextTrunk, path: Path, feeds: dict[str, np.ndarray], atol: float,
           num_threads: int, fix: str) -> float:
    """Full onnx.checker, then max |ONNX Runtime - torch| over taps on real texts; raises beyond `atol`."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        raise TextEncoderParityError(f"text encoder {entry.name!r}: {path} fails onnx.checker "
                                     f"({str(error).strip().splitlines()[0]}); {fix}.") from None
    actual = open_session(path, num_threads).run(list(trunk.tap_names), feeds)
    with torch.no_grad():
        expected = [t.numpy() for t in trunk(*(torch.from_numpy(feeds[name]) for name in tokenization.INPUT_NAMES))]
    diff = max(float(np.max(np.abs(a - e))) if a.shape == e.shape else float("inf") for a, e in zip(actual, expected))
    if not diff <= atol:
        raise TextEncoderParityError(f"text encoder {entry.name!r}: {path} differs from the torch encoder by max |diff| "
                                     f"{diff:.3g} on {len(feeds['input_ids'])} texts, above features.parity_atol={atol:g}; "
                                     f"{fix}.")
    return diff


def extract(entry: TextEncoderEntry, tokens: Tokenization, taps: tuple[str, ...], opset: int, batch_size: int,
            num_threads: int, parity_texts: int, parity_atol: float, dataset: Dataset, cache_dir: Path,
            progress: Progress = no_progress) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Vectors of every manifest text for one encoder, computing only what the cache lacks."""
    inputs = key_inputs(entry, tokens, taps, opset)
    store = FeatureStore(cache_dir / entry.name, cache_key(inputs))
    store.describe(inputs)
    tokenizer = load_tokenizer(tokenizer_json(entry), tokens)
    frame = dataset.manifest.drop_duplicates("sha256").sort_values("sha256")
    stats: dict[str, float] = {}
    shapes = {tap: (entry.feature_dim,) for tap in taps}
    cached = {sha: store.get(sha, shapes) for sha in frame["sha256"]}
    missing = frame[[cached[sha] is None for sha in frame["sha256"]]].reset_index(drop=True)
    invalid = sum(store.has(sha) for sha in missing["sha256"])
    seconds, n_tokens = 0.0, 0
    if len(missing):
        texts = read_texts([dataset.image_path(p) for p in missing["path"]])
        counts = tokenization.token_counts(tokenizer, texts)
        trunk = build_text_trunk(entry, taps)
        sample = encode(tokenizer, texts[:parity_texts])
        if not store.trunk_path.exists():
            with atomic_path(store.trunk_path) as partial:
                export_text_onnx(trunk, partial, {k: torch.from_numpy(v) for k, v in sample.items()}, list(taps), opset)
                stats["trunk_parity_max_diff"] = verify(entry, trunk, partial, sample, parity_atol, num_threads,
                                                        "try another features.opset")
            log.info("exported %s encoder to %s (parity max diff %.2g)", entry.name, store.trunk_path,
                     stats["trunk_parity_max_diff"])
        else:  # an encoder exported earlier is checked again before it computes anything new
            stats["trunk_parity_max_diff"] = verify(entry, trunk, store.trunk_path, sample, parity_atol, num_threads,
                                                    f"delete {store.trunk_path} to re-export it")
        runner = open_session(store.trunk_path, num_threads)
        started = time.perf_counter()
        with progress(total=len(missing), desc=f"features {entry.name}", unit="text") as bar:
            for rows in batches_by_length(counts, batch_size):
                feeds = encode(tokenizer, [texts[i] for i in rows])
                outputs = runner.run(list(taps), feeds)
                for position, row in enumerate(rows):
                    arrays = {tap: out[position] for tap, out in zip(taps, outputs)}
                    store.put(missing["sha256"][row], arrays)  # written as computed: a killed run resumes here
                    cached[missing["sha256"][row]] = arrays
                bar.update(len(rows))
        seconds, n_tokens = time.perf_counter() - started, int(sum(counts))
    rows_out = [cached[s] for s in dataset.manifest["sha256"]]
    features = {"sha256": dataset.manifest["sha256"].to_numpy(dtype=str)}
    for tap in taps:
        features[tap] = np.stack([r[tap] for r in rows_out]).astype(np.float32)
    stats |= {
        "n_computed": float(len(missing)),
        "n_cached": float(len(frame) - len(missing)),
        "n_invalid_recomputed": float(invalid),
        "texts_per_s": len(missing) / seconds if len(missing) and seconds > 0 else 0.0,
        "tokens_per_text": n_tokens / len(missing) if len(missing) else 0.0,
    }
    log.info("%s: %d computed (%d replacing invalid entries), %d from cache %s", entry.name, len(missing), invalid,
             len(frame) - len(missing), store.dir)
    return features, stats


def stale_inputs(record: Mapping[str, Any], entry: TextEncoderEntry) -> list[str]:
    """What differs between the key inputs recorded with cached text features and today's code, versions, entry."""
    recorded = record["cache_key_inputs"]
    current = key_inputs(entry, Tokenization.of(record["preprocessing"]), record["taps"], recorded["opset"])
    return cache.key_differences(recorded, current)
