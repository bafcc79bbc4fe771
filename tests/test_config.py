from pathlib import Path

import pytest

from tests.conftest import REPO
from tlops.config import ConfigError, load_params


def test_repo_params_load_with_every_block() -> None:
    params = load_params(REPO / "params.yaml")
    assert params.select.candidates == ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
    assert params.finetune.lr == pytest.approx(0.001)
    assert params.validate.allowed_modes == ("L", "RGB")


def test_override_parses_yaml_values() -> None:
    params = load_params(REPO / "params.yaml", ["finetune.lr=0.05", "select.candidates=[efficientnet_lite0]",
                                                  "ingest.limit=80", "features.image_size=null"])
    assert params.finetune.lr == 0.05
    assert params.select.candidates == ("efficientnet_lite0",)
    assert params.ingest.limit == 80 and params.features.image_size is None


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("finetune.learning_rate=0.1", "finetune.learning_rate"),
        ("finetune.lr=fast", "finetune.lr"),
        ("finetune.epochs=1.5", "finetune.epochs"),
        ("validate.on_invalid=ignore", "validate.on_invalid"),
        ("nonsense.key=1", "nonsense"),
        ("compress.quantize=maybe", "compress.quantize"),
        # Ranges are checked when params load, before any stage runs.
        ("compress.sparsity=2", "compress.sparsity"),
        ("ingest.test_fraction=1.5", "ingest.test_fraction"),
        ("finetune.epochs=0", "finetune.epochs"),
        ("evaluate.batch_size=0", "evaluate.batch_size"),
        ("export.parity_atol=-1", "export.parity_atol"),
        ("register.alias=v3", "register.alias"),
        ("select.backbone=resnet_50", "select"),
    ],
)
def test_bad_keys_and_types_fail_naming_the_key(override: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_params(REPO / "params.yaml", [override])


def test_missing_params_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_params(tmp_path / "nope.yaml")
