import re
from pathlib import Path

import pytest

from tests.conftest import REPO
from tlops.config import ConfigError, load_params


def test_repo_params_load_with_every_block() -> None:
    params = load_params(REPO / "params.yaml")
    assert params.select.candidates == ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
    assert params.finetune.partial.lr == pytest.approx(0.003) and params.export.tta_views == 4
    assert params.validate.allowed_modes == ("L", "RGB")


def test_override_parses_yaml_values() -> None:
    params = load_params(REPO / "params.yaml", ["finetune.partial.lr=0.05", "select.candidates=[efficientnet_lite0]",
                                                  "ingest.limit=80", "features.image_size=null"])
    assert params.finetune.partial.lr == 0.05
    assert params.select.candidates == ("efficientnet_lite0",)
    assert params.ingest.limit == 80 and params.features.image_size is None


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("finetune.learning_rate=0.1", "finetune.learning_rate"),
        ("finetune.partial.lr=fast", "finetune.partial.lr"),
        ("finetune.full.epochs=1.5", "finetune.full.epochs"),
        ("validate.on_invalid=ignore", "validate.on_invalid"),
        ("nonsense.key=1", "nonsense"),
        ("compress.quantize=maybe", "compress.quantize"),
        # Ranges are checked when params load, before any stage runs.
        ("compress.sparsity=2", "compress.sparsity"),
        ("ingest.test_fraction=1.5", "ingest.test_fraction"),
        ("finetune.partial.epochs=0", "finetune.partial.epochs"),
        ("finetune.strategy=deep", "finetune.strategy"),
        ("finetune.partial.views=9", "finetune.partial.views"),
        ("finetune.linear.taps=[pooled,stage9]", "finetune.linear.taps"),
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


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        # ELPV is bundled: a path given with it would be ignored while the user believes their images were read.
        (["ingest.path=/nonexistent"], "ingest.path"),
        (["ingest.allow_outside_root=true"], "ingest.allow_outside_root"),
        # Labels of an ImageFolder or CSV come from the source; four_class is ELPV's own labelling.
        (["ingest.source=imagefolder", "ingest.path=cells", "ingest.label_mode=four_class"], "ingest.label_mode"),
        (["ingest.source=csv", "ingest.path=cells.csv", "ingest.label_mode=four_class"], "ingest.label_mode"),
    ],
)
def test_a_key_the_chosen_source_does_not_read_is_refused(overrides: list[str], named: str) -> None:
    with pytest.raises(ConfigError, match=rf"params\.yaml: {re.escape(named)}: .*ingest\.source"):
        load_params(REPO / "params.yaml", overrides)


def test_params_yaml_label_mode_works_with_your_own_images() -> None:
    # The README's own-images command: params.yaml says `label_mode: binary`, which every source accepts.
    params = load_params(REPO / "params.yaml", ["ingest.source=imagefolder", "ingest.path=cells"])
    assert (params.ingest.source, params.ingest.path, params.ingest.label_mode) == ("imagefolder", "cells", "binary")
    assert load_params(REPO / "params.yaml", ["ingest.label_mode=four_class"]).ingest.label_mode == "four_class"
