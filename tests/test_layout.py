"""The architecture as written down: import-linter's contracts in pyproject.toml hold, and they can fail."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, venv_env
from tlops import dvc_pipeline
from tlops.stages import BY_NAME

PACKAGES = ("components", "tlops", "flows")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """`lint-imports` on the tree at `root` (it analyses the packages found from its working folder)."""
    return subprocess.run([str(Path(sys.executable).parent / "lint-imports"), "--no-cache"], cwd=root, env=venv_env(),
                          capture_output=True, text=True, timeout=300)


def test_the_layers_hold() -> None:
    done = lint_imports(REPO)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "Contracts: 4 kept, 0 broken." in done.stdout


def test_a_lower_layer_importing_a_higher_one_breaks_the_contract(tmp_path: Path) -> None:
    for name in PACKAGES:
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    with open(tmp_path / "components/core/errors.py", "a") as module:
        module.write("\nfrom components.registry import promote  # the lowest layer reaching for the highest\n")
    done = lint_imports(tmp_path)
    assert done.returncode != 0
    assert "components.core.errors -> components.registry.promote" in done.stdout


def test_training_does_not_depend_on_packaging_code() -> None:
    # Editing the INT8 shipping rule (compress) must not retrain the model: finetune's DVC deps leave packaging out.
    finetune = dvc_pipeline.stage_entry(BY_NAME["finetune"])["deps"]
    assert not [dep for dep in finetune if dep.startswith("components/packaging/")]
    assert "components/packaging/compress.py" in dvc_pipeline.stage_entry(BY_NAME["compress"])["deps"]
