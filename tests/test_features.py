import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from pydantic import ValidationError

from components.data import preprocess
from components.data.manifest import Dataset
from components.data.preprocess import load_batch
from components.features import extract as features_module
from components.features.cache import FeatureCacheError, FeatureStore, load_features
from components.features.config import FeaturesConfig
from components.features.extract import TrunkParityError, config_key_inputs, run, space_key
from components.models.backbones import build_trunk
from components.models.registry import get_entry

CFG = FeaturesConfig(image_size=64, taps=("stage3", "pooled"), batch_size=8)
LITE0 = "efficientnet_lite0"


def subset(dataset: Dataset, n: int) -> Dataset:
    return Dataset(dataset.manifest.iloc[:n].reset_index(drop=True), dataset.root, dataset.labels)


def store_of(cache: Path, cfg: FeaturesConfig = CFG) -> FeatureStore:
    return FeatureStore(cache / LITE0, space_key(get_entry(LITE0), cfg))


def test_onnx_features_match_the_torch_trunk(elpv_small: Dataset, tmp_path: Path) -> None:
    result = run(CFG, (LITE0,), elpv_small, tmp_path / "cache", tmp_path / "out")
    with np.load(result.artifacts[f"{LITE0}.features"]) as data:
        assert list(data["sha256"]) == list(elpv_small.manifest["sha256"])
        pooled, stage3 = data["pooled"][:4], data["stage3"][:4]
    entry = get_entry(LITE0)
    images = load_batch([elpv_small.image_path(p) for p in elpv_small.manifest["path"][:4]], entry.preprocessing(64))
    with torch.no_grad():
        expected_stage3, expected_pooled = build_trunk(entry, ("stage3", "pooled"))(torch.from_numpy(images))
    assert pooled.shape == (4, 1280) and stage3.shape == (4, 80)
    np.testing.assert_allclose(pooled, expected_pooled.numpy(), atol=1e-4)
    np.testing.assert_allclose(stage3, expected_stage3.numpy(), atol=1e-4)
    # The trunk was checked against torch before it computed anything.
    assert result.metrics[f"{LITE0}.trunk_parity_max_diff"] <= CFG.parity_atol

    # The cache explains itself: cache_key.json lists what the key covers, and backbone.json repeats it.
    store = store_of(tmp_path / "cache")
    described = json.loads((store.dir / "cache_key.json").read_text())
    record = json.loads((result.out_dir / LITE0 / "backbone.json").read_text())
    assert described["key"] == store.dir.name == record["cache_key"]
    assert described["inputs"] == record["cache_key_inputs"] == json.loads(json.dumps(config_key_inputs(entry, CFG)))
    assert described["inputs"]["versions"]["onnxruntime"] == __import__("onnxruntime").__version__
    assert set(described["inputs"]["code_sha256"]) == {"components.data.preprocess", "components.features.extract",
                                                       "components.features.cache", "components.models.backbones"}
    assert record["preprocessing"] == entry.preprocessing(64).model_dump(mode="json")


def test_rerun_computes_only_missing_images(elpv_small: Dataset, tmp_path: Path) -> None:
    first = run(CFG, (LITE0,), elpv_small, tmp_path / "cache", tmp_path / "a")
    assert first.metrics[f"{LITE0}.n_computed"] == len(elpv_small.manifest)
    store = store_of(tmp_path / "cache")
    dropped = elpv_small.manifest["sha256"].iloc[:3]
    for sha in dropped:  # as if these three images were new
        store.path(sha).unlink()
    second = run(CFG, (LITE0,), elpv_small, tmp_path / "cache", tmp_path / "b")
    assert second.metrics[f"{LITE0}.n_computed"] == 3
    assert second.metrics[f"{LITE0}.n_cached"] == len(elpv_small.manifest) - 3
    with np.load(first.artifacts[f"{LITE0}.features"]) as a, np.load(second.artifacts[f"{LITE0}.features"]) as b:
        np.testing.assert_allclose(a["pooled"], b["pooled"], atol=1e-5)


def test_an_interrupted_extraction_resumes(elpv_small: Dataset, tmp_path: Path) -> None:
    cfg = FeaturesConfig(image_size=64, batch_size=4)
    full_set = subset(elpv_small, 16)
    partial = run(cfg, (LITE0,), subset(elpv_small, 6), tmp_path / "cache", tmp_path / "a")
    assert partial.metrics[f"{LITE0}.n_computed"] == 6
    # What a kill mid-write leaves behind: a temporary file, never a half entry under the real name.
    store = store_of(tmp_path / "cache", cfg)
    sha = full_set.manifest["sha256"].iloc[10]
    store.path(sha).parent.mkdir(parents=True, exist_ok=True)
    store.path(sha).with_name(f".{sha}.npz.999.tmp").write_bytes(b"PK\x03\x04 cut off")
    full = run(cfg, (LITE0,), full_set, tmp_path / "cache", tmp_path / "b")
    assert full.metrics[f"{LITE0}.n_cached"] == 6
    assert full.metrics[f"{LITE0}.n_computed"] == 10
    assert full.metrics[f"{LITE0}.n_invalid_recomputed"] == 0


def test_corrupted_entries_are_recomputed_not_read(elpv_small: Dataset, tmp_path: Path) -> None:
    small = subset(elpv_small, 8)
    first = run(CFG, (LITE0,), small, tmp_path / "cache", tmp_path / "a")
    store = store_of(tmp_path / "cache")
    truncated, misshapen, tapless = small.manifest["sha256"].iloc[:3]
    content = store.path(truncated).read_bytes()
    store.path(truncated).write_bytes(content[: len(content) // 2])
    with open(store.path(misshapen), "wb") as f:
        np.savez(f, pooled=np.zeros(7, np.float32), stage3=np.zeros(80, np.float32))
    with open(store.path(tapless), "wb") as f:
        np.savez(f, pooled=np.zeros(1280, np.float32))
    second = run(CFG, (LITE0,), small, tmp_path / "cache", tmp_path / "b")
    assert second.metrics[f"{LITE0}.n_invalid_recomputed"] == 3
    assert second.metrics[f"{LITE0}.n_computed"] == 3 and second.metrics[f"{LITE0}.n_cached"] == 5
    with np.load(first.artifacts[f"{LITE0}.features"]) as a, np.load(second.artifacts[f"{LITE0}.features"]) as b:
        np.testing.assert_allclose(a["pooled"], b["pooled"], atol=1e-5)
        np.testing.assert_allclose(a["stage3"], b["stage3"], atol=1e-5)
    with np.load(store.path(misshapen)) as repaired:
        assert repaired["pooled"].shape == (1280,)


def test_truncated_stage_output_fails_naming_the_file(elpv_small: Dataset, tmp_path: Path) -> None:
    folder = tmp_path / "features" / LITE0
    folder.mkdir(parents=True)
    np.savez(folder / "features.npz", sha256=np.array(["a" * 64]), pooled=np.zeros((1, 1280), np.float32))
    assert load_features(tmp_path / "features", LITE0)[1].shape == (1, 1280)
    content = (folder / "features.npz").read_bytes()
    (folder / "features.npz").write_bytes(content[:200])
    with pytest.raises(FeatureCacheError, match=r"features\.npz: unreadable.*rerun the features stage"):
        load_features(tmp_path / "features", LITE0)


def test_cache_key_changes_with_what_determines_a_vector() -> None:
    entry = get_entry(LITE0)
    base = space_key(entry, CFG)
    assert space_key(entry, FeaturesConfig(image_size=96, taps=CFG.taps)) != base
    assert space_key(entry, FeaturesConfig(image_size=64, taps=("pooled",))) != base
    assert space_key(entry, CFG.model_copy(update={"opset": 18})) != base
    assert space_key(get_entry("efficientnet_lite1"), CFG) != base
    # Extraction settings that do not change a vector share the key.
    assert space_key(entry, CFG.model_copy(update={"batch_size": 2, "num_threads": 1, "parity_images": 9})) == base


def load_module_copy(source: str, tmp_path: Path, name: str) -> object:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / f"{name.rpartition('.')[2]}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_editing_the_preprocessing_code_misses_the_cache(
    elpv_small: Dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry = get_entry(LITE0)
    base = space_key(entry, CFG)
    code = features_module.feature_code()
    original = Path(preprocess.__file__).read_text()
    edited = original.replace("np.float32(255)", "np.float32(256)")
    assert edited != original

    def hash_sees(folder: str, source: str) -> None:
        """The key computed as if components/data/preprocess.py held `source`."""
        copy = load_module_copy(source, tmp_path / folder, preprocess.__name__)
        monkeypatch.setattr(features_module, "feature_code", lambda: tuple(copy if o is preprocess else o for o in code))

    hash_sees("same", original)
    assert space_key(entry, CFG) == base  # an identical copy is the same code
    hash_sees("edited", edited)
    assert space_key(entry, CFG) != base

    # End to end: features cached under the original code are not reused once the code is edited.
    monkeypatch.undo()
    small = subset(elpv_small, 4)
    assert run(CFG, (LITE0,), small, tmp_path / "cache", tmp_path / "a").metrics[f"{LITE0}.n_computed"] == 4
    assert run(CFG, (LITE0,), small, tmp_path / "cache", tmp_path / "b").metrics[f"{LITE0}.n_computed"] == 0
    hash_sees("edited_again", edited)
    assert run(CFG, (LITE0,), small, tmp_path / "cache", tmp_path / "c").metrics[f"{LITE0}.n_computed"] == 4


def test_opset_change_exports_a_new_trunk(elpv_small: Dataset, tmp_path: Path) -> None:
    small = subset(elpv_small, 4)
    cfg17 = FeaturesConfig(image_size=64, opset=17)
    cfg18 = cfg17.model_copy(update={"opset": 18})
    run(cfg17, (LITE0,), small, tmp_path / "cache", tmp_path / "a")
    second = run(cfg18, (LITE0,), small, tmp_path / "cache", tmp_path / "b")
    assert second.metrics[f"{LITE0}.n_computed"] == 4
    for cfg in (cfg17, cfg18):
        trunk = onnx.load(str(store_of(tmp_path / "cache", cfg).trunk_path), load_external_data=False)
        assert {o.domain: o.version for o in trunk.opset_import}[""] == cfg.opset


def test_a_trunk_that_differs_from_torch_is_refused(elpv_small: Dataset, tmp_path: Path) -> None:
    cfg = FeaturesConfig(image_size=64)
    run(cfg, (LITE0,), subset(elpv_small, 4), tmp_path / "cache", tmp_path / "a")
    trunk_path = store_of(tmp_path / "cache", cfg).trunk_path
    trunk = onnx.load(str(trunk_path))
    stem = next(t for t in trunk.graph.initializer if list(t.dims) == [32, 3, 3, 3])  # the stem convolution
    stem.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(stem) * 1.5, stem.name))
    onnx.save(trunk, str(trunk_path))
    with pytest.raises(TrunkParityError, match=rf"backbone '{LITE0}'.*trunk\.onnx differs .* max \|diff\| \d"):
        run(cfg, (LITE0,), subset(elpv_small, 8), tmp_path / "cache", tmp_path / "b")


def test_unknown_backbone_or_tap_fails_before_work(elpv_small: Dataset, tmp_path: Path) -> None:
    with pytest.raises(KeyError, match="efficientnet_b0"):
        run(CFG, ("efficientnet_b0",), elpv_small, tmp_path / "cache", tmp_path / "out")
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    ("field", "value"),
    [("taps", ("nope",)), ("taps", ()), ("taps", ("pooled", "pooled")), ("batch_size", 0), ("num_threads", -1),
     ("opset", 9), ("opset", 99), ("parity_images", 0), ("parity_atol", -1e-3), ("image_size", 8)],
)
def test_config_ranges_fail_at_load(field: str, value: object) -> None:
    with pytest.raises(ValidationError, match=field):
        FeaturesConfig(**{field: value})
    assert FeaturesConfig(taps=("stage5", "pooled"), opset=20, batch_size=1).opset == 20


def test_a_bad_value_is_named_by_its_dotted_key() -> None:
    from tlops.config import ConfigError, build

    with pytest.raises(ConfigError, match=r"features\.taps: unknown tap\(s\) \['nope'\]"):
        build({"features": {"taps": ["nope"]}})
    with pytest.raises(ConfigError, match=r"features\.opset"):
        build({"features": {"opset": 30}})
