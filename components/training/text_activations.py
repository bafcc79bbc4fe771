"""Cached hidden states of a text encoder's frozen layers, per text, for the text `partial` strategy.

The text twin of `components/training/activations.py`: the embeddings and all but the last N
transformer layers are exported to ONNX, checked against torch on real texts, and run once per text
in ONNX Runtime; each text's float16 hidden states (its own tokens x hidden size, no padding) are
cached by content under `<cache>/<encoder>/partial-<key>/<sha[:2]>/<sha>.npy`. The key covers
everything the text features key covers (weights, tokenizer and its settings, opset, versions, code),
the cut, and the source of this module, so a second seed or a new learning rate trains on stored
tensors and any change that alters a hidden state misses.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

from components.core.code_version import source_sha256
from components.core.progress import Progress, no_progress
from components.core.result import atomic_path, sha256_json, write_json
from components.data.manifest import Dataset
from components.data.tokenization import Tokenization, encode, load_tokenizer, read_texts, token_counts
from components.features import text_embedding
from components.features.text_embedding import TextEncoderParityError, batches_by_length
from components.models.onnx_io import open_session
from components.models.registry import TextEncoderEntry
from components.models.text_encoders import FrozenLayers, build_encoder, export_text_onnx, tokenizer_json

log = logging.getLogger(__name__)

FROZEN_FILE = "frozen.onnx"
KEY_FILE = "cache_key.json"


def key_inputs(entry: TextEncoderEntry, tokens: Tokenization, trainable: int, opset: int) -> dict:
    inputs = text_embedding.key_inputs(entry, tokens, ("pooled",), opset)
    return inputs | {"trainable_layers": trainable, "dtype": "float16",
                     "code_sha256": inputs["code_sha256"] | source_sha256((sys.modules[__name__],))}


class HiddenStore:
    """One float16 `.npy` (tokens, hidden) per text under `root/<sha[:2]>/<sha>.npy`, written atomically."""

    def __init__(self, root: Path, hidden: int):
        self.dir, self.hidden = root, hidden

    def path(self, sha256: str) -> Path:
        return self.dir / sha256[:2] / f"{sha256}.npy"

    def get(self, sha256: str, tokens: int) -> np.ndarray | None:
        """The entry, or None when absent, unreadable, misshapen or not finite (then it is recomputed)."""
        path = self.path(sha256)
        if not path.exists():
            return None
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as error:
            log.warning("%s: unreadable cached hidden states (%s); recomputing them", path, error)
            return None
        if array.dtype != np.float16 or array.shape != (tokens, self.hidden) or not np.isfinite(array).all():
            log.warning("%s: cached hidden states are %s%s, expected finite float16%s; recomputing them", path,
                        array.dtype, list(array.shape), [tokens, self.hidden])
            return None
        return array

    def put(self, sha256: str, array: np.ndarray) -> None:
        with atomic_path(self.path(sha256)) as partial, open(partial, "wb") as f:
            np.save(f, array.astype(np.float16))


def cache_hidden_states(entry: TextEncoderEntry, tokens: Tokenization, trainable: int, dataset: Dataset,
                        cache_dir: Path, opset: int, atol: float, splits: tuple[str, ...] = ("train", "val"),
                        batch_size: int = 32, progress: Progress = no_progress) -> dict[str, list[np.ndarray]]:
    """Per split, each text's hidden states after the frozen layers (float16, its own tokens x hidden)."""
    inputs = key_inputs(entry, tokens, trainable, opset)
    store = HiddenStore(cache_dir / entry.name / f"partial-{sha256_json(inputs)[:20]}", entry.feature_dim)
    if not (store.dir / KEY_FILE).exists():
        write_json(store.dir / KEY_FILE, {"inputs": inputs})
    tokenizer = load_tokenizer(tokenizer_json(entry), tokens)
    frames = {split: dataset.split(split) for split in splits}
    texts = {split: read_texts([dataset.image_path(p) for p in frame["path"]]) for split, frame in frames.items()}
    counts = {split: token_counts(tokenizer, texts[split]) for split in splits}
    found = {split: [store.get(sha, n) for sha, n in zip(frames[split]["sha256"], counts[split])] for split in splits}
    todo = [(split, i) for split in splits for i, array in enumerate(found[split]) if array is None]
    if todo:
        model_path = store.dir / FROZEN_FILE
        frozen = FrozenLayers(build_encoder(entry), entry, trainable).eval()
        sample = encode(tokenizer, [texts[split][i] for split, i in todo[:4]])
        if not model_path.exists():
            with atomic_path(model_path) as partial:
                export_text_onnx(frozen, partial, {k: torch.from_numpy(v) for k, v in sample.items()}, ["hidden"], opset,
                                 per_token=("hidden",))
                check(frozen, partial, sample, atol, entry)
        session = open_session(model_path)
        began = time.perf_counter()
        with progress(total=len(todo), desc=f"hidden states {entry.name}", unit="text") as bar:
            for rows in batches_by_length([counts[split][i] for split, i in todo], batch_size):
                chosen = [todo[r] for r in rows]
                feeds = encode(tokenizer, [texts[split][i] for split, i in chosen])
                hidden = session.run(["hidden"], feeds)[0]
                for position, (split, i) in enumerate(chosen):
                    array = hidden[position, : counts[split][i]].astype(np.float16)
                    store.put(frames[split]["sha256"].iloc[i], array)
                    found[split][i] = array
                bar.update(len(rows))
        log.info("hidden states of %d texts computed (%.1f texts/s) into %s", len(todo),
                 len(todo) / (time.perf_counter() - began), store.dir)
    return found  # type: ignore[return-value]


def check(frozen: FrozenLayers, path: Path, sample: dict[str, np.ndarray], atol: float, entry: TextEncoderEntry) -> None:
    got = open_session(path).run(["hidden"], sample)[0]
    with torch.no_grad():
        want = frozen(torch.from_numpy(sample["input_ids"]), torch.from_numpy(sample["attention_mask"])).numpy()
    diff = float(np.max(np.abs(got - want)))
    if not diff <= atol:
        raise TextEncoderParityError(f"text encoder {entry.name!r}: its frozen layers in ONNX Runtime differ from torch "
                                     f"by {diff:.3g} (> features.parity_atol={atol:g}) on hidden states up to "
                                     f"{float(np.max(np.abs(want))):.3g}; try another features.opset, or raise "
                                     f"features.parity_atol if that difference is float rounding at this scale.")


def padded(arrays: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of per-text hidden states padded to the longest: (hidden float32, attention mask int64)."""
    longest = max(a.shape[0] for a in arrays)
    hidden = np.zeros((len(arrays), longest, arrays[0].shape[1]), dtype=np.float32)
    mask = np.zeros((len(arrays), longest), dtype=np.int64)
    for row, array in enumerate(arrays):
        hidden[row, : array.shape[0]] = array
        mask[row, : array.shape[0]] = 1
    return torch.from_numpy(hidden), torch.from_numpy(mask)
