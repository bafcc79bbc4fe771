"""Export of a text classifier: ONNX taking `input_ids` and `attention_mask`, the tokenizer carried in the file.

The file's metadata_props hold what serving needs to tokenize exactly as training did: the
tokenizer file itself (`tokenizer_json`) and its settings (`Tokenization`: its sha256, max length,
truncation, padding), beside the labels, encoder, data version and strategy every tlops model
carries, and `modality: text`. Every consumer tokenizes raw texts from those
(`components.models.onnx_io.model_feeds`) with the `tokenizers` library, so the server needs no torch.

Checked before it leaves: `onnx.checker`, PyTorch vs ONNX Runtime on real held-out texts, and the
served path (raw texts -> the file's own tokenizer -> ONNX Runtime) against the PyTorch model on the
same raw texts; for a linear probe also against the trained head on the cached features it was
trained on (a stale cache, another tokenizer or max length fail with a message that says which).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pandas as pd
import torch

from components.core.result import StageResult
from components.data.manifest import Dataset
from components.data.tokenization import TOKENIZER_KEY, Tokenization, encode, load_tokenizer, read_texts
from components.features.cache import FEATURES_FILE, load_features, read_record, rows_by_sha256
from components.features.text_embedding import stale_inputs
from components.models.classifier import build_model, checkpoint_head
from components.models.onnx_io import model_tokenizer, open_session, predict_frame, read_metadata, stamp_metadata
from components.models.registry import get_entry
from components.models.text_encoders import export_text_onnx, tokenizer_json
from components.packaging.config import ExportConfig
from components.packaging.errors import ExportParityError, TrainServeSkewError

log = logging.getLogger(__name__)

FP32_FILE = "model_fp32.onnx"


def torch_logits(model: torch.nn.Module, feeds: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"])).numpy()


def check_served(model: torch.nn.Module, path: Path, texts: list[str], tokenizer: Any, atol: float) -> float:
    """Max |logit| difference between the file as served (its own tokenizer, ONNX Runtime) and PyTorch."""
    served_tokenizer = model_tokenizer(path, read_metadata(path))
    actual = open_session(path).run(None, encode(served_tokenizer, texts))[0]
    expected = torch_logits(model, encode(tokenizer, texts))
    diff = float(np.max(np.abs(actual - expected))) if actual.shape == expected.shape else float("inf")
    if not diff <= atol:
        raise ExportParityError(f"{path}: on {len(texts)} held-out texts, tokenized by the file's own tokenizer, ONNX "
                                f"Runtime differs from PyTorch by max |logit| {diff:.3g}, above export.parity_atol={atol:g}; "
                                f"the exported graph does not compute what the model does.")
    return diff


def check_train_serve(checkpoint: dict[str, Any], path: Path, dataset: Dataset, features_dir: Path,
                      frame: pd.DataFrame, atol: float) -> float:
    """Max |served logit - trained head on cached features| on held-out texts; raises naming the cause."""
    encoder, taps = str(checkpoint["backbone"]["name"]), list(checkpoint["taps"])
    record = read_record(features_dir, encoder)
    record_path = Path(features_dir) / encoder / "backbone.json"
    rerun = "rerun the features stage, then finetune"
    trained = Tokenization.of(checkpoint["preprocessing"])
    cached = Tokenization.of(record["preprocessing"])
    if cached != trained:
        differences = "; ".join(f"{k}: features {a!r}, checkpoint {b!r}" for k, (a, b) in cached.differences(trained).items())
        raise TrainServeSkewError(f"stale feature cache: {record_path} describes texts tokenized otherwise than the "
                                  f"checkpoint was trained with ({differences}); {rerun}.")
    if checkpoint.get("features_cache_key", record["cache_key"]) != record["cache_key"]:
        raise TrainServeSkewError(f"stale feature cache: {record_path} has cache_key {record['cache_key']}, the checkpoint "
                                  f"was trained on features with cache_key {checkpoint['features_cache_key']}; {rerun}.")
    drift = stale_inputs(record, get_entry(encoder))
    if drift:
        raise TrainServeSkewError(f"stale feature cache: {record_path} was computed by other code or library versions "
                                  f"than this export uses ({'; '.join(drift[:3])}); {rerun}.")
    features = []
    for tap in taps:
        sha256, tap_features = load_features(features_dir, encoder, tap)
        features.append(rows_by_sha256(sha256, tap_features, frame["sha256"], encoder, "val"))
    with torch.no_grad():
        trained_logits = checkpoint_head(checkpoint)(torch.from_numpy(np.concatenate(features, axis=1))).numpy()
    served_logits = predict_frame(path, dataset, frame, batch_size=len(frame))
    diff = float(np.abs(served_logits - trained_logits).max())
    if not diff <= atol:
        worst = int(np.abs(served_logits - trained_logits).max(axis=1).argmax())
        raise TrainServeSkewError(f"train/serve skew: {path.name} on the raw texts differs by {diff:.3g} (max |logit|, "
                                  f"e.g. {frame['path'][worst]}) from the trained head on "
                                  f"{record_path.parent / FEATURES_FILE}, above export.train_serve_atol={atol:g}; "
                                  f"tokenization and provenance agree, so the cached features are stale or altered; {rerun}.")
    return diff


def run(cfg: ExportConfig, checkpoint: dict[str, Any], checkpoint_path: Path, dataset: Dataset, out_dir: Path,
        features_dir: Path, metadata: dict[str, str], held_out: pd.DataFrame) -> StageResult:
    """Write `model_fp32.onnx` for a text checkpoint and check it; `held_out` are the val texts it is checked on."""
    model = build_model(checkpoint)
    entry = get_entry(checkpoint["backbone"]["name"])
    tokens = Tokenization.of(checkpoint["preprocessing"])
    vocabulary = tokenizer_json(entry)
    tokenizer = load_tokenizer(vocabulary, tokens)  # refuses a tokenizer file other than the one trained with
    texts = read_texts([dataset.image_path(p) for p in held_out["path"]])
    example = {k: torch.from_numpy(v) for k, v in encode(tokenizer, texts[:2]).items()}
    path = out_dir / FP32_FILE
    export_text_onnx(model, path, example, ["logits"], cfg.opset)
    stamp_metadata(path, metadata | {TOKENIZER_KEY: vocabulary, "tta_views": "1"})
    onnx.checker.check_model(str(path), full_check=True)
    metrics = {"n_params": float(sum(p.numel() for p in model.parameters())),
               "parity_max_diff_fp32": check_served(model, path, texts, tokenizer, cfg.parity_atol),
               "size_mb_fp32": path.stat().st_size / 1e6}
    if checkpoint.get("trunk") is None:  # a probe on cached features: the served file must give its logits
        metrics["train_serve_max_diff"] = check_train_serve(checkpoint, path, dataset, features_dir, held_out,
                                                            cfg.train_serve_atol)
    log.info("exported %s (%.1f MB), served-path parity max diff %.2e on %d texts", path, metrics["size_mb_fp32"],
             metrics["parity_max_diff_fp32"], len(texts))
    result = StageResult(
        stage="export", out_dir=out_dir, metrics=metrics, artifacts={"fp32": path},
        info={"files": {"fp32": path.name}, "parity_atol": cfg.parity_atol, "train_serve_atol": cfg.train_serve_atol,
              "features_cache_key": metadata["features_cache_key"], "parity_texts": len(texts), "opset": cfg.opset,
              "tta_views": 1, "tta_views_requested": cfg.tta_views, "sparsity": 0.0, "pruning": None,
              "backbone": entry.name, "labels": list(checkpoint["labels"]), "modality": "text",
              "max_length": tokens.max_length},
    )
    result.save()
    return result
