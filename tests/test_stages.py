"""The stage declaration: one source for dvc.yaml and the cache keys; staged, locked writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from components.core.errors import UserError
from components.core.result import StageResult
from tests.conftest import REPO, small_params, venv_env
from tlops import dvc_pipeline, fingerprints
from tlops.config import load_params
from tlops.run_state import STATE_FILE, RunInProgressError, RunLock, killed_run
from tlops.stages import BY_NAME, STAGES, Output, Stage, cache_inputs, execute


def test_committed_dvc_yaml_is_generated_from_the_declaration() -> None:
    assert (REPO / "dvc.yaml").read_text() == dvc_pipeline.render(), "run `tlops dvc-yaml` and commit dvc.yaml"


def test_every_params_key_dvc_tracks_is_written_in_params_yaml() -> None:
    # DVC reads params.yaml itself, so a key the config fills by default is "missing" to `dvc commit`.
    written = yaml.safe_load((REPO / "params.yaml").read_text())
    for stage in STAGES:
        for key in stage.params:
            node = written
            for part in key.split("."):
                assert isinstance(node, dict) and part in node, f"params.yaml lacks {key} (stage {stage.name})"
                node = node[part]


def test_dvc_yaml_deps_cover_every_project_module_a_stage_imports() -> None:
    # Import each stage's component for real, in a clean interpreter, and list the project modules loaded.
    for stage in STAGES:
        code = (f"import sys, {stage.component}; print('\\n'.join(sorted(m.__file__ for n, m in sys.modules.items() "
                f"if n.split('.')[0] in ('components', 'tlops', 'flows') and getattr(m, '__file__', None))))")
        done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=venv_env(), capture_output=True, text=True,
                              check=True)
        loaded = {str(Path(f).resolve().relative_to(REPO)) for f in done.stdout.split()}
        loaded = {f for f in loaded if not f.endswith("__init__.py")}
        deps = set(dvc_pipeline.stage_entry(stage)["deps"])
        assert loaded <= deps, f"{stage.name}: dvc.yaml misses {sorted(loaded - deps)}"


def test_finetune_code_covers_the_declarations_of_the_source_it_is_handed() -> None:
    # The stage passes ELPV's declared class orders and value columns (components/data/ingest.py) to finetune,
    # which never imports ingest itself: a change to them must still rerun finetune.
    finetune = next(stage for stage in STAGES if stage.name == "finetune")
    assert "components/data/ingest.py" in finetune.modules()
    assert "components/data/ingest.py" in dvc_pipeline.stage_entry(finetune)["deps"]
    assert "components/data/ingest.py" not in fingerprints.project_modules(finetune.component)


def test_cache_key_changes_with_code_libraries_params_and_upstream(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    params = load_params(REPO / "params.yaml")
    features = BY_NAME["features"]
    base = cache_inputs(params, features, {"validate": "abc"})
    assert cache_inputs(params, features, {"validate": "abc"}) == base
    # A param the stage does not read leaves its key alone; one it reads changes it.
    assert cache_inputs(load_params(REPO / "params.yaml", ["finetune.partial.lr=0.5"]), features, {"validate": "abc"}) == base
    assert cache_inputs(load_params(REPO / "params.yaml", ["features.opset=18"]), features, {"validate": "abc"}) != base
    assert cache_inputs(params, features, {"validate": "abd"}) != base
    # Editing the preprocessing code (a module features imports) changes the key; the code is hashed, not versioned.
    copy = tmp_path / "repo"
    for name in features.modules() + ("flows/train.py",):
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        (copy / name).write_bytes((REPO / name).read_bytes())
    monkeypatch.setattr(fingerprints, "ROOT", copy)
    assert cache_inputs(params, features, {"validate": "abc"})["code"] == base["code"]
    (copy / "components/data/preprocess.py").write_text((REPO / "components/data/preprocess.py").read_text() + "\n# edit\n")
    assert cache_inputs(params, features, {"validate": "abc"})["code"] != base["code"]
    monkeypatch.setattr(fingerprints, "ROOT", REPO)
    # A library upgrade changes it too.
    fingerprints.library_versions.cache_clear()
    monkeypatch.setattr(fingerprints, "library_versions", lambda: (("onnxruntime", "9.9.9"),))
    import tlops.stages

    monkeypatch.setattr(tlops.stages, "library_versions", fingerprints.library_versions)
    assert cache_inputs(params, features, {"validate": "abc"}) != base


def test_a_teacher_retrained_in_place_changes_the_finetune_key(tmp_path: Path) -> None:
    # The teacher is named by a path in params; the key must follow its content, not the path.
    teacher = tmp_path / "teacher.pt"
    teacher.write_bytes(b"teacher, first training")
    params = load_params(REPO / "params.yaml", [f"finetune.distill.teacher={teacher}"])
    finetune = BY_NAME["finetune"]
    first = cache_inputs(params, finetune, {"select": "abc"})
    assert cache_inputs(params, finetune, {"select": "abc"}) == first
    teacher.write_bytes(b"teacher, retrained")
    assert cache_inputs(params, finetune, {"select": "abc"}) != first
    assert cache_inputs(load_params(REPO / "params.yaml"), finetune, {"select": "abc"})["files"] == {}


def writer(content: str, fail: bool = False) -> Stage:
    def compute(params, ctx, out: Path) -> StageResult:
        (out / "model.bin").write_text(content)
        if fail:
            raise RuntimeError("stage broke halfway")
        result = StageResult(stage="demo", out_dir=out, artifacts={"model": out / "model.bin"})
        result.save()
        return result

    return Stage("demo", "components.core.result", compute, (), (), "export", (Output(),))


def test_a_stage_publishes_whole_or_not_at_all(tmp_path: Path) -> None:
    params = load_params(small_params(tmp_path))
    first = execute(writer("v1"), params)
    assert first.out_dir == params.path("export") and (first.out_dir / "model.bin").read_text() == "v1"
    with pytest.raises(RuntimeError, match="halfway"):
        execute(writer("v2", fail=True), params)
    assert (params.path("export") / "model.bin").read_text() == "v1"  # the failed run left the last good result
    assert not list(params.path("export").parent.glob(".export.partial-*"))
    assert StageResult.load(params.path("export")).is_intact()


def test_a_stage_never_replaces_a_folder_it_did_not_write(tmp_path: Path) -> None:
    params = load_params(small_params(tmp_path))
    precious = params.path("export")
    precious.mkdir(parents=True)
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(UserError, match="did not write"):
        execute(writer("v1"), params)
    assert (precious / "thesis.tex").read_text() == "years of work"


def test_a_second_run_in_the_same_outputs_fails_fast_naming_the_holder(tmp_path: Path) -> None:
    params_file = small_params(tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from tlops.config import load_params; from tlops.run_state import RunLock\n"
         f"with RunLock(load_params({str(params_file)!r}), 'tlops run'):\n    print('held', flush=True); time.sleep(60)"],
        cwd=REPO, env=venv_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunInProgressError, match=f"pid {holder.pid}"):
            with RunLock(load_params(params_file), "tlops run"):
                pass
    finally:
        holder.kill()
        holder.wait()
    # The kernel released the dead holder's lock; its record says it was running, so it was killed.
    with RunLock(load_params(params_file), "tlops run") as lock:
        assert killed_run(lock) is not None and killed_run(lock)["status"] == "killed"
    state = json.loads((tmp_path / "outputs" / STATE_FILE).read_text())
    assert state["status"] == "completed" and state["previous"]["status"] == "killed"
    with RunLock(load_params(params_file), "tlops run") as lock:
        assert killed_run(lock) is None  # a run that finished is not taken for a killed one


def test_cache_keys_follow_the_libraries_tlops_runs_on_not_every_installed_one() -> None:
    # Installing a tool beside tlops (pytest is, in this environment; so are import-linter and ipython for many)
    # must not rerun every stage; upgrading a library a result is computed with must.
    import importlib.metadata

    versions = dict(fingerprints.library_versions())
    installed = {d.metadata["Name"].lower() for d in importlib.metadata.distributions()}
    assert {"pytest", "import-linter"} <= installed
    assert "pytest" not in versions and "import-linter" not in versions
    for library in ("torch", "onnxruntime", "mlflow", "numpy", "prefect", "great-expectations"):
        assert versions[library] == importlib.metadata.version(library)


def test_finetune_calibrates_its_int8_part_on_the_views_export_will_average(elpv_small) -> None:
    # Compress calibrates the exported graph, whose test-time averaging feeds the trunk every view of an image;
    # partial's INT8 frozen part must be calibrated on the same views, so its ranges are the shipped model's.
    from components.data.views import dihedral
    from components.models.quantization import calibration_images
    from components.models.registry import get_entry
    from tlops.stages import served_views

    params = load_params(REPO / "params.yaml")
    assert served_views(params) == min(params.export.tta_views, params.finetune.partial.views) == 4
    assert params.compress.planned_recipe(served_views(params)).calibration_views == 4
    assert "export.tta_views" in BY_NAME["finetune"].params  # so a change of views retrains (DVC and Prefect)
    preprocessing = get_entry("efficientnet_lite0").preprocessing(32)
    plain = calibration_images(elpv_small, 6, preprocessing)
    turned = calibration_images(elpv_small, 6, preprocessing, views=4)
    assert turned.shape == (4 * len(plain), *plain.shape[1:])
    for view in range(4):
        assert np.array_equal(turned[view * len(plain):(view + 1) * len(plain)], dihedral(plain, view))
