"""What a user waits for before any work: a params error, and `dvc repro` with nothing to do.

    python -m benchmarks.startup config-errors [--repeats 5]
    python -m benchmarks.startup noop-repro [--repeats 3] [--project DIR]

`config-errors` times `tlops COMMAND --set finetune.learnig_rate=0.1` (a typo, exit 2) for every
command that reads params, against two baselines in the same run: a bare interpreter (`python -c
pass`, the floor) and importing the libraries the CLI used to load before it looked at params
(torch, MLflow, ONNX Runtime, Great Expectations, Prefect, scikit-learn).

`noop-repro` builds a temporary git + DVC project from this checkout with the small params the
tests use (~80 ELPV cells, Lite0 at 64 px, linear probe), runs `dvc repro` once in full, then times
`dvc repro` with nothing changed (only `promote` runs: the champion lives in the registry) and
`tlops stage promote` alone against two floors in the same project: `dvc status` (what DVC alone
spends deciding that nothing changed) and importing MLflow and asking its registry one question
(what any promote that talks to the registry pays).

Wall times are medians of the repeats, rounds interleaved so a busy machine slows all alike; beside
each, the CPU time (user + system) of the command and its children, which a busy machine does not
stretch the way it stretches wall time: on an idle one, these single-threaded commands take about
their CPU time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.compression import RESULTS, cpu_description

REPO = Path(__file__).resolve().parents[1]
TYPO = ["--set", "finetune.learnig_rate=0.1"]
COMMANDS = {"run": ["run"], "stage": ["stage", "finetune"], "params": ["params"], "serve": ["serve"],
            "deploy": ["deploy"], "drift": ["drift", "--images", "new_cells"], "tune": ["tune"]}
HEAVY = "import torch, mlflow, onnxruntime, great_expectations, prefect, sklearn"
MLFLOW_FLOOR = "from mlflow import MlflowClient; MlflowClient().search_registered_models(max_results=1)"


def wall(command: list[str], cwd: Path, env: dict[str, str], expect: int = 0) -> tuple[float, float]:
    """Wall and CPU seconds (user + system, the command and everything it started) of one run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != expect:
        raise RuntimeError(f"{' '.join(command)} exited {done.returncode}, expected {expect}:\n{done.stderr[-2000:]}")
    return seconds, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def medians(cases: dict[str, Callable[[], tuple[float, float]]], repeats: int) -> dict[str, dict[str, float]]:
    """Median wall and CPU seconds per case; each round runs every case once, in turn."""
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, case in cases.items():
            samples[name].append(case())
    return {name: {"wall_s": round(statistics.median(w for w, _ in runs), 3),
                   "cpu_s": round(statistics.median(c for _, c in runs), 3)} for name, runs in samples.items()}


def ratios(seconds: dict[str, dict[str, float]], baseline: str) -> dict[str, dict[str, float]]:
    return {name: {kind: round(value / seconds[baseline][kind], 3) for kind, value in times.items()}
            for name, times in seconds.items()}


def environment(**extra: str) -> dict[str, str]:
    env = dict(os.environ) | extra
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["PYTHONPATH"] = str(REPO)
    return env


def config_errors(repeats: int) -> dict[str, object]:
    env = environment()
    python = [sys.executable]
    cases: dict[str, Callable[[], tuple[float, float]]] = {
        "python -c pass": lambda: wall([*python, "-c", "pass"], REPO, env),
        "import the heavy libraries": lambda: wall([*python, "-c", HEAVY], REPO, env),
    }
    for name, args in COMMANDS.items():
        cases[f"tlops {name} (typo)"] = lambda args=args: wall([*python, "-m", "tlops.cli", *args, *TYPO], REPO, env, 2)
    seconds = medians(cases, repeats)
    return {"seconds": seconds, "ratio_to_heavy_imports": ratios(seconds, "import the heavy libraries")}


def build_project(root: Path) -> Path:
    """A git + DVC project at `root/project`: this checkout's tracked files and the tests' small params."""
    from tests.conftest import small_params  # the params the pipeline tests run with

    project = root / "project"
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for name in tracked:
        if (REPO / name).is_file():
            (project / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, project / name)
    params = small_params(root)
    (project / "params.yaml").write_text(params.read_text().replace(str(root) + "/", ""))
    for command in (["init", "-q"], ["add", "-A"],
                    ["-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm", "init"]):
        subprocess.run(["git", *command], cwd=project, check=True)
    return project


def noop_repro(repeats: int, project: Path | None = None) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="tlops-noop-") as scratch:
        first = None
        if project is None:
            project = build_project(Path(scratch))
        env = environment(MLFLOW_TRACKING_URI=f"sqlite:///{project.resolve() / 'mlflow.db'}",
                          PREFECT_HOME=str(Path(scratch) / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
        if not (project / "dvc.lock").exists():
            first, _ = wall(["dvc", "repro"], project, env)
        seconds = medians({
            "dvc status (DVC alone)": lambda: wall(["dvc", "status"], project, env),
            "dvc repro, nothing changed": lambda: wall(["dvc", "repro"], project, env),
            "tlops stage promote, champion unchanged": lambda: wall(["tlops", "stage", "promote"], project, env),
            "MLflow import + one registry query": lambda: wall([sys.executable, "-c", MLFLOW_FLOOR], project, env),
        }, repeats)
        decision = json.loads((project / "outputs/promote/promotion.json").read_text())
    return {"first_full_repro_s": round(first, 1) if first else None, "seconds": seconds,
            "ratio_to_dvc_status": ratios(seconds, "dvc status (DVC alone)"),
            "ratio_to_mlflow_floor": ratios(seconds, "MLflow import + one registry query"),
            "promote_reason": decision["reason"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["config-errors", "noop-repro"])
    parser.add_argument("--repeats", type=int, default=None, help="rounds (default 5 for config-errors, 3 for noop-repro)")
    parser.add_argument("--project", type=Path, help="noop-repro: time this DVC project (already run in full) as it is")
    args = parser.parse_args()
    if args.what == "config-errors":
        report = config_errors(args.repeats or 5)
    else:
        report = noop_repro(args.repeats or 3, args.project)
    report |= {"cpu": cpu_description(), "cores": os.cpu_count(), "load_average": os.getloadavg()}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"startup-{args.what}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
