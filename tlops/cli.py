"""`tlops` command line: run the whole flow, run one stage (what dvc.yaml calls), list backbones.

Bad input (a `UserError`) is printed as one line, `tlops: error: ...`, exit 1 (2 for a params
error). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

DEFAULT_PARAMS = Path("params.yaml")


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
    drift = sub.add_parser("drift", help="compare a folder of new images with the training features; flag drift")
    drift.add_argument("--images", required=True, help="folder of new images (searched recursively)")
    drift.add_argument("--params", type=Path, default=DEFAULT_PARAMS, help="params file (default params.yaml)")
    drift.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    tune = sub.add_parser("tune", help="search finetune hyperparameters with Optuna (params `tune`)")
    tune.add_argument("--params", type=Path, default=DEFAULT_PARAMS, help="params file (default params.yaml)")
    tune.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    tune.add_argument("--trials", type=int, help="stop after N trials (default tune.trials)")
    tune.add_argument("--minutes", type=float, help="stop after M minutes (default tune.minutes)")
    dvc_yaml = sub.add_parser("dvc-yaml", help="write dvc.yaml from the stage declaration (tlops/stages.py)")
    dvc_yaml.add_argument("--check", action="store_true", help="only check that dvc.yaml is current (exit 1 if not)")
    return parser.parse_args(argv)


def progress_bar():  # noqa: ANN201 - a tqdm factory
    from functools import partial

    from tqdm.auto import tqdm

    return partial(tqdm, dynamic_ncols=True, mininterval=1.0)


def run_stage(args: argparse.Namespace) -> None:
    from tlops import tracking
    from tlops.config import load_params
    from tlops.run_state import RunLock
    from tlops.stages import StageContext, execute, get_stage, stage_dir, stage_params

    params = load_params(args.params, args.overrides)
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

    if not Path("dvc.yaml").exists():
        return
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


def run_flow(args: argparse.Namespace) -> None:
    from flows.train import train  # importing Prefect configures its loggers, so filter after
    from tlops import tracking
    from tlops.config import load_params
    from tlops.stages import METRICS_FILE

    params = load_params(args.params, args.overrides)  # fail on a bad key before Prefect starts
    tracking.check_tracking_server()  # and on a tracking server that is not there
    from flows.workers import check_runner

    check_runner(params)  # and on a Dask scheduler that does not answer, or more training processes than fit
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logging.getLogger(name).addFilter(HideUserErrorTracebacks())
    summary = train(params_file=str(args.params), overrides=list(args.overrides))
    if not args.overrides and args.params == DEFAULT_PARAMS:
        record_in_dvc()
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


def list_backbones() -> None:
    from components.models.registry import REGISTRY

    for entry in REGISTRY.values():
        print(f"{entry.name:22s} {entry.architecture:34s} {entry.input_size}px  dim={entry.feature_dim}  "
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
    from components.serving.app import serve
    from tlops.config import load_params

    flags = {"model_uri": args.model, "host": args.host, "port": args.port}
    params = load_params(args.params, [*args.overrides, *(f"serve.{k}={v}" for k, v in flags.items() if v is not None)])
    serve(params.serve)


def check_drift(args: argparse.Namespace) -> None:
    from flows.drift import check_drift as drift_flow
    from tlops import tracking
    from tlops.config import load_params

    load_params(args.params, args.overrides)  # fail on a bad key before Prefect starts
    tracking.check_tracking_server()
    s = drift_flow(images=args.images, params_file=str(args.params), overrides=args.overrides)
    verdict = "FLAGGED (event tlops.drift.detected)" if s["flagged"] else "no drift"
    auc = "off" if s["auc"] is None else f"{s['auc']:.3f}"
    print(f"drift: MMD p={s['p_value']:.3g}, AUC {auc} on {s['n_new']} images -> {verdict}; plot {s['plot']}")


def tune_hyperparameters(args: argparse.Namespace) -> None:
    from tlops import tracking
    from tlops.config import load_params
    from tlops.tune import run_tune

    budget = [f"tune.{k}={v}" for k, v in (("trials", args.trials), ("minutes", args.minutes)) if v is not None]
    if len(budget) == 1:  # a budget given on the command line replaces the file's, not adds to it
        budget.append(f"tune.{'minutes' if args.trials is not None else 'trials'}=null")
    params = load_params(args.params, [*args.overrides, *budget])
    tracking.check_tracking_server()
    s = run_tune(params)
    print("\n".join([
        "", f"tlops tune finished: {s['n_trials']} trials ({s['counts']['COMPLETE']} completed, "
            f"{s['counts']['PRUNED']} pruned, {s['counts']['FAIL']} failed)",
        f"  best val accuracy  {s['best_value']:.4f}",
        f"  best params        {s['out_dir']}/best_params.yaml  (and best.json)",
        f"  MLflow run         {s['parent_run_id']}  (open with: make ui)",
        "  reproduce with:", f"    {s['tlops_run']}", f"    {s['dvc_exp_run']}"]))


def configure_logging() -> None:
    """Libraries speak at WARNING (GX logs hundreds of INFO lines on import, ONNX Runtime's quantizer
    one per rescaled weight, httpx one per Prefect API call); the pipeline's own modules at INFO."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for name in ("components", "tlops", "flows", "prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).setLevel(logging.INFO)


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
    configure_logging()
    from components.core.errors import UserError
    from tlops.config import ConfigError

    try:
        if args.command == "run":
            run_flow(args)
        elif args.command == "stage":
            run_stage(args)
        elif args.command == "params":
            from tlops.config import load_params

            print(json.dumps(load_params(args.params, args.overrides).to_dict(), indent=2))
        elif args.command == "serve":
            serve_model(args)
        elif args.command == "deploy":
            from flows.deploy import deploy

            print(deploy(str(args.params), args.overrides, serve=args.serve))
        elif args.command == "drift":
            check_drift(args)
        elif args.command == "tune":
            tune_hyperparameters(args)
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
