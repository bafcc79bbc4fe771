import subprocess
import sys

from tests.conftest import REPO, venv_env


def tlops(*args: str, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tlops.cli", *args], cwd=cwd, env=venv_env(),
                          capture_output=True, text=True, timeout=300)


def test_unknown_key_fails_before_any_work_naming_the_key() -> None:
    done = tlops("run", "--set", "finetune.learnig_rate=0.1")
    assert done.returncode == 2
    assert "finetune.learnig_rate" in done.stderr and "Traceback" not in done.stderr
    assert "Beginning flow run" not in done.stdout + done.stderr


def test_wrong_type_is_named() -> None:
    done = tlops("params", "--set", "finetune.partial.epochs=many")
    assert done.returncode == 2 and "finetune.partial.epochs" in done.stderr


def test_params_shows_the_override() -> None:
    done = tlops("params", "--set", "finetune.partial.lr=0.5")
    assert done.returncode == 0 and '"lr": 0.5' in done.stdout


def test_backbones_lists_the_registry() -> None:
    done = tlops("backbones")
    assert done.returncode == 0 and "efficientnet_lite2" in done.stdout


def test_bad_data_stops_the_flow_with_a_report_naming_the_file(tmp_path) -> None:
    from tests.conftest import small_params, write_imagefolder

    source = write_imagefolder(tmp_path / "images", per_class=8)
    (source / "dark" / "dark_999.png").write_bytes(b"\x89PNG truncated")
    params = small_params(tmp_path, ingest={"source": "imagefolder", "path": str(source), "limit": None},
                          validate={"min_per_class_split": 1})
    before = sorted(p.name for p in source.rglob("*"))
    done = tlops("run", "--params", str(params), cwd=tmp_path)
    assert done.returncode == 1
    assert "dark_999.png" in done.stderr and "decodes" in done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert (tmp_path / "outputs/validate/report.md").is_file()
    assert not (tmp_path / "outputs/features").exists()
    assert sorted(p.name for p in source.rglob("*")) == before


def test_a_data_error_in_a_retried_stage_fails_once_at_once(tmp_path) -> None:
    from tests.conftest import small_params

    (tmp_path / "labels.csv").write_text("file,label\na.png,x\n")  # no `path` column
    params = small_params(tmp_path, ingest={"source": "csv", "path": str(tmp_path / "labels.csv"), "limit": None})
    done = tlops("run", "--params", str(params), cwd=tmp_path)
    assert done.returncode == 1
    assert "labels.csv" in done.stderr and "path" in done.stderr
    assert "Retrying" not in done.stdout + done.stderr and "Traceback" not in done.stdout + done.stderr
