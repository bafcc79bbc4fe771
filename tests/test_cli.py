import json
import shutil
import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO, venv_env
from tlops.cli import not_recorded_note, params_as_dvc_sees_them, parse_args
from tlops.config import load_params

# What a params error must not wait for: each takes seconds to import on a busy 2-core machine.
HEAVY = ("torch", "mlflow", "onnxruntime", "great_expectations", "prefect", "sklearn")


def tlops(*args: str, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tlops.cli", *args], cwd=cwd, env=venv_env(),
                          capture_output=True, text=True, timeout=300)


def test_unknown_key_fails_before_any_work_naming_the_key() -> None:
    done = tlops("run", "--set", "finetune.learnig_rate=0.1")
    assert done.returncode == 2
    assert "finetune.learnig_rate" in done.stderr and "Traceback" not in done.stderr
    assert "Beginning flow run" not in done.stdout + done.stderr


def tlops_then_loaded(*args: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run `tlops ARGS` in a fresh interpreter; also the heavy libraries loaded when it returned."""
    code = ("import json, sys\nfrom tlops.cli import main\ncode = main(sys.argv[1:])\n"
            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\nsys.exit(code)")
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=venv_env(), capture_output=True, text=True,
                          timeout=300, check=False)
    return done, json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("command", [["run"], ["stage", "finetune"], ["params"], ["serve"], ["deploy"],
                                     ["drift", "--images", "new_cells"], ["tune"]], ids=lambda command: command[0])
def test_every_command_reports_a_typo_in_one_line_before_loading_any_framework(command: list[str]) -> None:
    done, loaded = tlops_then_loaded(*command, "--set", "finetune.learnig_rate=0.1")
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tlops: error: params.yaml: finetune.learnig_rate: unknown key")
    assert loaded == []  # the cause of a fast answer, asserted instead of a time


@pytest.mark.parametrize(("args", "named"), [(["serve", "--port", "0"], "serve.port"),
                                             (["tune", "--minutes", "-1"], "tune.minutes"),
                                             (["params", "--set", "ingest.path=/nonexistent"], "ingest.path")])
def test_a_bad_flag_or_a_key_the_source_ignores_is_refused_up_front(args: list[str], named: str) -> None:
    done, loaded = tlops_then_loaded(*args)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert done.stderr.startswith(f"tlops: error: params.yaml: {named}: ")
    assert loaded == []


def test_a_run_not_recorded_in_dvc_says_how_to_get_a_recorded_one(tmp_path, monkeypatch) -> None:
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    assert params_as_dvc_sees_them(parse_args(["run"]))
    assert params_as_dvc_sees_them(parse_args(["run", "--params", str(tmp_path / "params.yaml")]))

    args = parse_args(["run", "--set", "finetune.partial.lr=0.5", "--set", "select.candidates=[efficientnet_lite0]"])
    assert not params_as_dvc_sees_them(args)
    assert not_recorded_note(args, load_params(args.params, args.overrides)) == (
        "tlops: note: this run used --set finetune.partial.lr=0.5 --set select.candidates=[efficientnet_lite0], so it "
        "is not recorded in dvc.lock (which records params.yaml as it is); for a recorded run of the same params: "
        """dvc exp run -S 'select.candidates=["efficientnet_lite0"]' -S finetune.partial.lr=0.5""")  # params.yaml's order

    mine = yaml.safe_load((tmp_path / "params.yaml").read_text())
    mine["ingest"]["limit"], mine["finetune"]["strategy"] = 80, "linear"
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(mine))
    args = parse_args(["run", "--params", "mine.yaml"])
    assert not params_as_dvc_sees_them(args)
    assert not_recorded_note(args, load_params(args.params)).endswith(
        "this run used --params mine.yaml, so it is not recorded in dvc.lock (which records params.yaml as it is); "
        "for a recorded run of the same params: dvc exp run -S ingest.limit=80 -S finetune.strategy=linear")


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
