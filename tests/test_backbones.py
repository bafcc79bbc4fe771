import pytest
import torch

from components.models.backbones import build_classifier, build_trunk, weights_path
from components.models.registry import REGISTRY, get_entry


def test_registry_holds_the_three_lite_models_with_verified_weights() -> None:
    assert {"efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"} <= set(REGISTRY)
    sizes = {name: REGISTRY[name].input_size for name in ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")}
    assert sizes == {"efficientnet_lite0": 224, "efficientnet_lite1": 240, "efficientnet_lite2": 260}
    assert get_entry("efficientnet_lite0").preprocessing(64).input_size == 64


def test_weight_mapping_matches_the_reference_implementation() -> None:
    """timm's architecture with remapped keys computes exactly what EfficientNet-Lite's own code does."""
    reference_lib = pytest.importorskip("efficientnet_lite_pytorch")
    entry = get_entry("efficientnet_lite0")
    reference = reference_lib.EfficientNet.from_name("efficientnet-lite0")
    reference.load_state_dict(torch.load(weights_path(entry), weights_only=True))
    images = torch.rand(2, 3, 96, 96) * 2 - 1
    with torch.no_grad():
        expected = reference.eval()(images)
        actual = build_classifier(entry)(images)
    assert torch.allclose(expected, actual, atol=1e-5)


def test_trunk_taps_have_the_declared_dimensions() -> None:
    trunk = build_trunk(get_entry("efficientnet_lite0"), ("stage3", "pooled"))
    with torch.no_grad():
        stage3, pooled = trunk(torch.zeros(1, 3, 64, 64))
    assert pooled.shape == (1, 1280) and stage3.shape == (1, 80)


def test_unknown_backbone_and_tap_suggest_a_fix() -> None:
    with pytest.raises(KeyError, match="Did you mean 'efficientnet_lite1'"):
        get_entry("efficientnet-lite1")
    with pytest.raises(KeyError, match="available"):
        build_trunk(get_entry("efficientnet_lite0"), ("block99",))


def test_tampered_weights_are_refused(tmp_path) -> None:
    from dataclasses import replace

    fake = tmp_path / "weights.pth"
    torch.save({}, fake)
    entry = replace(get_entry("efficientnet_lite0"), weights=f"file:{fake}")
    with pytest.raises(ValueError, match="sha256"):
        build_classifier(entry)
