"""`tlops` command line: run the whole flow, run one stage (what dvc.yaml calls), list backbones.

Bad input (a `UserError`) is printed as one line, `tlops: error: ...`, exit 1 (2 for a params
error). Anything else is a bug and keeps its traceback.

Every command that reads params loads and checks them first, before it imports torch, MLflow,
ONNX Runtime, Great Expectations or Prefect: a typo is reported in a fraction of a second. So this
module imports nothing heavy at its top, and `tlops.stages` (read for the stage names) neither.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tlops.config import Params

DEFAULT_PARAMS = Path("params.yaml")
# Command-line flags that stand for a params key: `tlops serve --port 8080` is `--set serve.port=8080`.
FLAG_KEYS = {
    "serve": {"model": "serve.model_uri", "host": "serve.host", "port": "serve.port"},
    "tune": {"trials": "tune.trials", "minutes": "tune.minutes"},
    "fewshot": {"episodes": "fewshot.episodes"},
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tlops", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in [("run", "run the whole pipeline as a Prefect flow"),
                            ("stage", "run one stage (this is what dvc.yaml calls)"),
                            ("params", "print the resolved params after overrides")]:
        command = sub.add_parser(name, help=help_text)
        if name == "stage":
            from tlops.stages import ORDER

            command.add_argument("name", choices=ORDER)
        command.add_argument("--params", type=Path, default=DEFAULT_PARAMS, help="params file (default params.yaml)")
        command.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                             help="override a dotted params key, e.g. --set finetune.lr=0.01 (repeatable)")
    sub.add_parser("backbones", help="list the backbone registry")
    serve = sub.add_parser("serve", help="serve a model over HTTP (ONNX Runtime, micro-batched)")
    serve.add_argument("--params", type=Path, default=DEFAULT_PARAMS, help="params file (default params.yaml)")
    serve.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    serve.add_argument("--model", help="models:/<name>@<alias>, models:/<name>/<version> or an ONNX file")
    serve.add_argument("--host", help="address to listen on (default serve.host)")
    serve.add_argument("--port", type=int, help="port (default serve.port)")
    deploy = sub.add_parser("deploy", help="put retraining on a schedule: a Prefect deployment (params `schedule`)")
    deploy.add_argument("--params", type=Path, default=DEFAULT_PARAMS, help="params file (default params.yaml)")
    deploy.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    deploy.add_argument("--serve", action="store_true", help="serve the deployment in this process instead of a work pool")
    drift = sub.add_parser("drift", help="compare a batch of new images or texts with the training features; "
                                         "flag drift")
    drift.add_argument("new_data", nargs="?", metavar="NEW_DATA",
                       help="an image model: a folder of new images (searched recursively); a text model: a CSV "
                            "with a `text` column, or a folder of .txt files")
    drift.add_argument("--images", metavar="FOLDER", help="a folder of new images (the same as NEW_DATA)")
    drift.add_argument("--params", type=Path, default=DEFAULT_PARAMS, help="params file (default params.yaml)")
    drift.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    tune = sub.add_parser("tune", help="search finetune hyperparameters with Optuna (params `tune`)")
    tune.add_argument("--params", type=Path, default=DEFAULT_PARAMS, help="params file (default params.yaml)")
    tune.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    tune.add_argument("--trials", type=int, help="stop after N trials (default tune.trials)")
    tune.add_argument("--minutes", type=float, help="stop after M minutes (default tune.minutes)")
    fewshot = sub.add_parser("fewshot", help="episodic few-shot evaluation on cached features (params `fewshot`)")
    fewshot.add_argument("--params", type=Path, default=DEFAULT_PARAMS, help="params file (default params.yaml)")
    fewshot.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    fewshot.add_argument("--shots", help="support images per class, e.g. 1,5,10,20 (default fewshot.shots)")
    fewshot.add_argument("--episodes", type=int, help="episodes per K (default fewshot.episodes)")
    add_class = sub.add_parser("add-class", help="add a class to a prototypes model from a few images; register it")
    add_class.add_argument("name", help="the new class's label")
    add_class.add_argument("--images", required=True, type=Path, help="folder of images of the new class (1 or more)")
    add_class.add_argument("--model", help="models:/<name>@<alias>, models:/<name>/<version> or an ONNX file "
                                           "(default: the champion, models:/<register.model_name>@<promote.alias>)")
    add_class.add_argument("--params", type=Path, default=DEFAULT_PARAMS, help="params file (default params.yaml)")
    add_class.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    dvc_yaml = sub.add_parser("dvc-yaml", help="write dvc.yaml from the stage declaration (tlops/stages.py)")
    dvc_yaml.add_argument("--check", action="store_true", help="only check that dvc.yaml is current (exit 1 if not)")
    return parser.parse_args(argv)


def progress_bar():  # noqa: ANN201 - a tqdm factory
    from functools import partial

    from tqdm.auto import tqdm

    return partial(tqdm, dynamic_ncols=True, mininterval=1.0)


def run_stage(args: argparse.Namespace, params: Params) -> None:
    from tlops import tracking
    from tlops.run_state import RunLock
    from tlops.stages import StageContext, execute, get_stage, stage_dir, stage_params

    stage = get_stage(args.name)
    tracking.check_tracking_server()
    with RunLock(params, f"tlops stage {stage.name}") as lock, tracking.Recorder(params, "stage") as recorder:
        run_id = recorder.stage_started(stage)
        try:
            result = execute(stage, params, StageContext(progress=progress_bar(), run_id=run_id))
        except Exception:
            recorder.stage_failed(stage, stage_dir(params, stage), stage_params(params, stage))
            raise
        recorder.stage_done(stage, result, stage_params(params, stage), cached=False)
        lock.stage_done(stage.name)
    print(json.dumps({"stage": stage.name, "out_dir": str(result.out_dir), "metrics": result.metrics}, indent=2,
                     default=str))


def record_in_dvc() -> None:
    """After a flow run with params.yaml as is, record its outputs in dvc.lock and push them.

    The flow wrote exactly what `dvc repro` would, so `dvc commit` makes DVC agree without
    recomputing, and `dvc push` stores the data in the configured (local by default) remote.
    A failure here fails the command: the run's outputs are not versioned until it succeeds.
    """
    from components.core.errors import UserError

    if shutil.which("dvc") is None:
        raise UserError("dvc is not on PATH; install the project (`make setup`) or activate .venv, then `dvc commit`.")
    for command in (["dvc", "commit", "--force", "--quiet"], ["dvc", "push", "--quiet"]):
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            detail = (done.stderr or done.stdout).strip().splitlines()
            raise UserError(f"`{' '.join(command)}` failed after the run: {detail[-1] if detail else 'no output'}; "
                            f"fix it and run `{' '.join(command)}` again (the run's outputs are in place).")
    logging.getLogger("tlops").info("outputs recorded in dvc.lock and pushed to the DVC remote")


class HideUserErrorTracebacks(logging.Filter):
    """Prefect logs a failed task with its traceback; for bad input the message alone is the report."""

    def filter(self, record: logging.LogRecord) -> bool:
        from components.core.errors import UserError

        if record.exc_info and isinstance(record.exc_info[1], UserError):
            record.exc_info, record.exc_text = None, None
        return True


def params_as_dvc_sees_them(args: argparse.Namespace) -> bool:
    """Whether the run reads params.yaml of this folder as it is: what `dvc commit` would record."""
    return not args.overrides and args.params.resolve() == DEFAULT_PARAMS.resolve()


def flat_params(value: Any, prefix: str = "") -> dict[str, Any]:
    """`{"finetune": {"lr": 0.1}}` -> `{"finetune.lr": 0.1}`."""
    if isinstance(value, dict):
        return {k: v for key, child in value.items() for k, v in flat_params(child, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): value}


def dvc_exp_run(params: Params) -> str:
    """The `dvc exp run` that computes `params` from params.yaml: one `-S` for each key that differs."""
    import yaml

    from tlops.config import load_params

    base, wanted = flat_params(load_params(DEFAULT_PARAMS).to_dict()), flat_params(params.to_dict())
    settings = []
    for key, value in wanted.items():
        if base.get(key) != value:  # values as YAML, which is how DVC reads them (a string stays a string)
            text = value if isinstance(value, str) and yaml.safe_load(value) == value else json.dumps(value)
            settings.append(f"-S {shlex.quote(f'{key}={text}')}")
    return " ".join(["dvc exp run", *settings])


def not_recorded_note(args: argparse.Namespace, params: Params) -> str:
    """One line: why this run is not in dvc.lock, and the command whose run would be."""
    from tlops.config import ConfigError

    used = ([] if args.params.resolve() == DEFAULT_PARAMS.resolve() else [f"--params {args.params}"])
    used += [f"--set {override}" for override in args.overrides]
    try:
        how = f"for a recorded run of the same params: {dvc_exp_run(params)}"
    except ConfigError as error:  # no params.yaml here, or one that does not load: DVC could not run either
        how = f"for a recorded run, fix {DEFAULT_PARAMS} ({error}), then `dvc exp run -S KEY=VALUE ...`"
    return (f"tlops: note: this run used {' '.join(used)}, so it is not recorded in dvc.lock (which records "
            f"{DEFAULT_PARAMS} as it is); {how}")


def run_flow(args: argparse.Namespace, params: Params) -> None:
    from flows.train import train  # importing Prefect configures its loggers, so filter after
    from tlops import tracking
    from tlops.stages import METRICS_FILE

    tracking.check_tracking_server()  # fail on a tracking server that is not there before Prefect starts
    from flows.workers import check_runner

    check_runner(params)  # and on a Dask scheduler that does not answer, or more training processes than fit
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logging.getLogger(name).addFilter(HideUserErrorTracebacks())
    summary = train(params_file=str(args.params), overrides=list(args.overrides))
    note = None
    if Path("dvc.yaml").exists():  # a DVC project: a run of params.yaml as it is belongs in dvc.lock
        if params_as_dvc_sees_them(args):
            record_in_dvc()
        else:
            note = not_recorded_note(args, params)
    evaluate = json.loads((Path(summary["evaluate"]["out_dir"]) / METRICS_FILE).read_text())
    register = summary["register"]
    lines = [
        "",
        "tlops run finished",
        f"  backbone       {summary['select'].get('selected')}  (ranking: {summary['select']['out_dir']}/ranking.png)",
        f"  shipped model  {summary['compress']['out_dir']}/model.onnx  ({summary['compress'].get('shipped')})",
        f"  test accuracy  {evaluate['accuracy']:.4f}   macro-F1 {evaluate['macro_f1']:.4f}",
        f"  metrics/plots  {summary['evaluate']['out_dir']}/",
        f"  registered     {register.get('model_uri')}",
        f"  promotion      {summary['promote']['summary']}",
        f"  MLflow run     {summary['parent_run_id']}  (open with: make ui)",
    ]
    print("\n".join(lines))
    if note:
        print(note, file=sys.stderr)


def list_backbones() -> None:
    from components.models.registry import REGISTRY

    for entry in REGISTRY.values():
        # An image backbone's input size; a text encoder's tokens per text.
        size = f"{entry.max_length}tok" if entry.modality == "text" else f"{entry.input_size}px"
        print(f"{entry.name:22s} {entry.architecture:34s} {size}  dim={entry.feature_dim}  "
              f"top1={entry.imagenet_top1}  {entry.license}")


def write_dvc_yaml(args: argparse.Namespace) -> int:
    from tlops import dvc_pipeline

    if args.check:
        current = Path("dvc.yaml").exists() and Path("dvc.yaml").read_text() == dvc_pipeline.render()
        print("dvc.yaml is current" if current else "dvc.yaml differs from tlops/stages.py: run `tlops dvc-yaml`")
        return 0 if current else 1
    print("dvc.yaml written" if dvc_pipeline.write() else "dvc.yaml already current")
    return 0


def serve_model(args: argparse.Namespace) -> None:
    from components.serving.config import check_model_uri
    from tlops.config import load_params

    flags = {"model_uri": args.model, "host": args.host, "port": args.port}
    params = load_params(args.params, [*args.overrides, *(f"serve.{k}={v}" for k, v in flags.items() if v is not None)])
    check_model_uri(params.serve.model_uri)  # a missing file: one line before anything heavy is imported
    from components.serving.server import ModelServer

    server = ModelServer(params.serve)
    server.start(raise_on_error=True)  # not an ONNX model, an unknown registry URI: one line, before the web stack
    from components.serving.app import serve

    serve(server)


def check_drift(args: argparse.Namespace) -> None:
    from components.core.errors import UserError
    from components.models.registry import get_entry
    from components.monitoring.new_images import checked_images
    from components.monitoring.new_texts import checked_texts
    from tlops.config import load_params
    from tlops.stages import drift_config

    if (args.new_data is None) == (args.images is None):
        raise UserError("tlops drift takes the new data once: `tlops drift NEW_DATA` (or `--images FOLDER`).")
    new_data = Path(args.new_data or args.images)
    params = load_params(args.params, args.overrides)  # fail on a bad key before Prefect starts
    cfg = drift_config(params)
    # Every new input is read before Prefect starts: an empty batch, a file that is not an image (image model),
    # a blank or non-UTF-8 text or a CSV without `text` (text model), or the other modality, each in one line.
    (checked_texts if get_entry(cfg.backbone).modality == "text" else checked_images)(new_data, cfg)
    from flows.deploy import check_server
    from flows.workers import check_scheduler

    if params.runner.kind == "dask" and params.runner.address is not None:  # new images embed on its workers
        check_scheduler(params.runner.address, params.runner.connect_seconds)  # one line, before any work
    from flows.drift import DRIFT_EVENT, persistent_api_url
    from flows.drift import check_drift as drift_flow
    from tlops import tracking

    tracking.check_tracking_server()
    api = persistent_api_url()
    if api:
        check_server(api)  # one line now, rather than Prefect's traceback once the flow starts
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logging.getLogger(name).addFilter(HideUserErrorTracebacks())
    s = drift_flow(new_data=str(new_data), params_file=str(args.params), overrides=args.overrides)
    noun = f"{s['modality']}s"
    batch = f"{s['n_new']} {noun}" if s["n_new"] == s["n_found"] else \
        f"{s['n_new']} of {s['n_found']} {noun} (drift.max_new_{noun})"
    print(f"drift: MMD p={s['p_value']:.3g}, classifier AUC {s['auc']:.3f} p={s['auc_p_value']:.3g} on {batch} -> "
          f"{'FLAGGED' if s['flagged'] else 'no drift'} (each p below {s['per_test_threshold']:g} flags); "
          f"plot {s['plot']}")
    if not s["flagged"]:
        return
    if not api:
        print(f"  the event {DRIFT_EVENT} went to a temporary Prefect server that stopped with this command, so "
              f"nothing will retrain: set PREFECT_API_URL to the server `tlops deploy` used (e.g. `prefect config set "
              f"PREFECT_API_URL=http://127.0.0.1:4200/api`) and check again")
    elif s["listeners"]:
        print(f"  event {DRIFT_EVENT} sent to {api}: " + "; ".join(s["listeners"]))
    else:
        print(f"  event {DRIFT_EVENT} sent to {api}, but no automation there reacts to it: run `tlops deploy` "
              f"against that server to retrain on drift")


def tune_hyperparameters(params: Params) -> None:
    from tlops import tracking
    from tlops.tune import run_tune

    tracking.check_tracking_server()
    s = run_tune(params)
    print("\n".join([
        "", f"tlops tune finished: {s['n_trials']} trials ({s['counts']['COMPLETE']} completed, "
            f"{s['counts']['PRUNED']} pruned, {s['counts']['FAIL']} failed)",
        f"  best val accuracy  {s['best_value']:.4f}",
        f"  best params        {s['out_dir']}/best_params.yaml  (and best.json)",
        f"  MLflow run         {s['parent_run_id']}  (open with: make ui)",
        "  reproduce with:", f"    {s['tlops_run']}", f"    {s['dvc_exp_run']}"]))


def fewshot_evaluation(params: Params) -> None:
    from tlops import tracking
    from tlops.transfer import run_fewshot

    tracking.check_tracking_server()
    s = run_fewshot(params)
    report = json.loads((Path(s["out_dir"]) / "fewshot.json").read_text())
    lines = ["", f"tlops fewshot: {s['n_way']}-way, {s['episodes']} episodes per K, {s['n_test']} test images "
                 f"({s['backbone']} {s['tap']})", "  K     prototypes          linear probe"]
    lines += [f"  {k:<5} {r['prototypes']['mean']:.4f} ± {r['prototypes']['ci95']:.4f}   "
              f"{r['linear']['mean']:.4f} ± {r['linear']['ci95']:.4f}"
              for k, r in sorted(report.items(), key=lambda item: int(item[0]))]
    lines += [f"  report  {s['out_dir']}/fewshot.json  (plot fewshot.png)", f"  MLflow run  {s['run_id']}"]
    print("\n".join(lines))


def add_new_class(args: argparse.Namespace, params: Params) -> None:
    from tlops import tracking
    from tlops.transfer import run_add_class

    tracking.check_tracking_server()
    s = run_add_class(params, args.name, args.images, args.model)
    print("\n".join(["", f"tlops add-class {args.name!r}: labels {s['labels']}", f"  from      {s['parent']}",
                     f"  model     {s['model']}  ({100 * s['predicted_as_new']:.0f}% of its images predicted as it)",
                     f"  registered {s['model_uri']}", f"  promotion {s['promotion']}"]))


def configure_logging() -> None:
    """Libraries speak at WARNING (GX logs hundreds of INFO lines on import, ONNX Runtime's quantizer
    one per rescaled weight, httpx one per Prefect API call); the pipeline's own modules at INFO."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for name in ("components", "tlops", "flows", "prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).setLevel(logging.INFO)


def command_overrides(args: argparse.Namespace) -> list[str]:
    """`--set` overrides, then the command's own flags as the params keys they stand for."""
    flags = {key: getattr(args, flag) for flag, key in FLAG_KEYS.get(args.command, {}).items()}
    given = [f"{key}={value}" for key, value in flags.items() if value is not None]
    if args.command == "tune" and len(given) == 1:  # a budget given on the command line replaces the file's
        given.append(f"tune.{'minutes' if args.trials is not None else 'trials'}=null")
    if args.command == "fewshot" and args.shots:
        given.append(f"fewshot.shots=[{args.shots}]")
    return [*args.overrides, *given]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Prefect's temporary server phones home on start; offline that is an error traceback in the
    # middle of every run. Opt back in by setting the variable yourself.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Its default 20 s start-up limit is too short on a busy 2-core machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    # A tracking server that dies mid-run should cost seconds, not MLflow's default ~9 minutes of retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    # MLflow draws a progress bar per artifact download (register, promote, serve's lookup): in a run's log
    # that is a line of carriage returns per stage. The stages log what they fetched instead.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    configure_logging()
    from components.core.errors import UserError
    from tlops.config import ConfigError, load_params

    try:
        # Checked before any command imports a framework (and before Prefect or a server starts).
        params = load_params(args.params, command_overrides(args)) if hasattr(args, "params") else None
        if args.command == "run":
            run_flow(args, params)
        elif args.command == "stage":
            run_stage(args, params)
        elif args.command == "params":
            print(json.dumps(params.to_dict(), indent=2))
        elif args.command == "serve":
            serve_model(args)
        elif args.command == "deploy":
            from flows.deploy import deploy

            print(deploy(str(args.params), args.overrides, serve=args.serve))
        elif args.command == "drift":
            check_drift(args)
        elif args.command == "tune":
            tune_hyperparameters(params)
        elif args.command == "fewshot":
            fewshot_evaluation(params)
        elif args.command == "add-class":
            add_new_class(args, params)
        elif args.command == "dvc-yaml":
            return write_dvc_yaml(args)
        else:
            list_backbones()
    except UserError as error:
        print(f"tlops: error: {error}", file=sys.stderr)
        return 2 if isinstance(error, ConfigError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
