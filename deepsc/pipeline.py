"""`deepsc pipeline compile | submit | run-local`: the Kubeflow front door.

* compile: the IR YAML that the Kubeflow UI uploads (`pipelines/deepsc_pipeline.yaml`, checked
  against the committed golden file by the tests).
* submit: a run, or a recurring run (`--cron`), on a Kubeflow host given by `--host` or
  `KFP_HOST`; `--dry-run` prints what would be sent and contacts nothing.
* run-local: the whole pipeline with kfp's local SubprocessRunner in this environment.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from deepsc.errors import ConfigError, DeepSCError

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PACKAGE = REPO_ROOT / "pipelines" / "deepsc_pipeline.yaml"


def load_pipeline():
    """The @dsl.pipeline function (components/ and pipelines/ live at the repository root)."""
    if not (REPO_ROOT / "pipelines" / "deepsc_pipeline.py").is_file():
        raise DeepSCError(f"pipelines/ not found next to the deepsc package ({REPO_ROOT}): run from a checkout")
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from pipelines.deepsc_pipeline import deepsc_pipeline

    return deepsc_pipeline


def compile_pipeline(package_path: Path = DEFAULT_PACKAGE) -> Path:
    """Compile the pipeline to KFP IR YAML at `package_path`."""
    from kfp import compiler

    package_path = Path(package_path)
    package_path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(load_pipeline(), package_path=str(package_path))
    return package_path


def pipeline_arguments(repo_url: str, data_version: str, profile: str, overrides: dict[str, Any], mlflow_uri: str) -> dict[str, str]:
    return {
        "repo_url": repo_url,
        "data_version": data_version,
        "profile": profile,
        "overrides_json": json.dumps(overrides, sort_keys=True),
        "mlflow_tracking_uri": mlflow_uri,
    }


def kfp_cron(expression: str) -> str:
    """KFP's six-field cron (seconds first) from a standard five-field one (or a six-field one as is).

    ``"0 3 * * 1"`` (03:00 on Mondays) becomes ``"0 0 3 * * 1"``; passed to KFP unchanged it would
    mean minute 3 of every hour in January.
    """
    fields = str(expression).split()
    if len(fields) == 5:
        return " ".join(["0", *fields])
    if len(fields) == 6:
        return " ".join(fields)
    raise ConfigError(f"--cron expects a cron expression of 5 fields (minute hour day month weekday), got {expression!r}")


def check_cluster_arguments(arguments: dict[str, str]) -> None:
    """What a cluster's pods need and this machine's defaults do not give: a repository URL they
    can clone and an MLflow server they can reach (a local path or sqlite file is neither)."""
    repo = arguments["repo_url"]
    if ("://" not in repo and not repo.startswith("git@")) or repo.startswith("file://"):
        raise ConfigError(f"--repo-url {repo!r} is a local path: the Kubeflow pods clone the repository, "
                          "pass its URL (or set DEEPSC_REPO_URL)")
    uri = arguments["mlflow_tracking_uri"]
    if not uri.startswith(("http://", "https://", "databricks")):
        raise ConfigError(f"a Kubeflow run needs a tracking server its pods can reach, got {uri or 'none'!r}: "
                          "pass --mlflow-uri http://... (or set MLFLOW_TRACKING_URI)")


def submit_pipeline(
    host: str | None,
    arguments: dict[str, str],
    package_path: Path = DEFAULT_PACKAGE,
    experiment: str = "deepsc-covid",
    run_name: str | None = None,
    cron: str | None = None,
    dry_run: bool = False,
) -> dict[str, Any]:
    """Submit one run (or a recurring run when `cron` is set) to the Kubeflow host.

    A recurring run re-reads ``data_version`` (a branch) at every start: fetch_data is never
    cached, and its new artifacts miss the cache of the later steps, so every start retrains.
    """
    check_cluster_arguments(arguments)
    cron = kfp_cron(cron) if cron else None
    host = host or os.environ.get("KFP_HOST")
    run_name = run_name or f"deepsc-{arguments['data_version'][:12]}"
    request = {"host": host, "package": str(package_path), "experiment": experiment, "run_name": run_name,
               "cron": cron, "arguments": arguments}
    if dry_run:
        return request | {"submitted": False}
    if not host:
        raise ConfigError("no Kubeflow host: pass --host or set KFP_HOST")
    if not Path(package_path).is_file():
        compile_pipeline(Path(package_path))
    import kfp

    client = kfp.Client(host=host)
    exp = client.create_experiment(name=experiment)
    if cron:
        job = client.create_recurring_run(experiment_id=exp.experiment_id, job_name=run_name, cron_expression=cron,
                                          pipeline_package_path=str(package_path), params=arguments)
        return request | {"submitted": True, "recurring_run_id": job.recurring_run_id}
    run = client.create_run_from_pipeline_package(str(package_path), arguments=arguments, run_name=run_name,
                                                  experiment_name=experiment)
    return request | {"submitted": True, "run_id": run.run_id}


def run_local(arguments: dict[str, str], pipeline_root: Path) -> Any:
    """Run the whole pipeline in this environment with kfp.local's SubprocessRunner."""
    from kfp import local

    pipeline_root = Path(pipeline_root).resolve()
    pipeline_root.mkdir(parents=True, exist_ok=True)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root))
    pipeline = load_pipeline()
    cwd = os.getcwd()
    os.chdir(REPO_ROOT)  # components import `components` from the repository root
    try:
        return pipeline(**arguments)
    finally:
        os.chdir(cwd)


def add_cli(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["compile", "submit", "run-local"])
    parser.add_argument("--package", type=Path, default=DEFAULT_PACKAGE, help="compiled IR YAML")
    parser.add_argument("--host", default=None, help="Kubeflow Pipelines host (default: $KFP_HOST)")
    parser.add_argument("--repo-url", default=os.environ.get("DEEPSC_REPO_URL", str(REPO_ROOT)),
                        help="git repository whose data.dvc / params.yaml pin the run")
    parser.add_argument("--data-version", default="HEAD", help="git revision of data.dvc")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=JSON",
                        help="dotted override, e.g. loss.lambda_ta=0 (repeatable)")
    parser.add_argument("--mlflow-uri", default=os.environ.get("MLFLOW_TRACKING_URI", ""))
    parser.add_argument("--experiment", default="deepsc-covid")
    parser.add_argument("--run-name", default=None)
    parser.add_argument("--cron", default=None,
                        help="submit a recurring run with this 5-field cron expression (e.g. '0 3 * * 1'; a 6-field "
                             "one with seconds first is passed as it is)")
    parser.add_argument("--pipeline-root", type=Path, default=Path(".kfp_local"), help="run-local artifact folder")
    parser.add_argument("--dry-run", action="store_true", help="print what submit would send")


def _parse_overrides(items: list[str]) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects KEY=VALUE, got '{item}'")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


def run_cli(args: argparse.Namespace, params: dict) -> int:
    if args.action == "compile":
        print(compile_pipeline(args.package))
        return 0
    overrides = _parse_overrides(args.overrides)
    if params:  # the cluster applies them to params.yaml at --data-version: a typo or a wrong kind fails here first
        from deepsc.config import apply_overrides

        apply_overrides(params, overrides)
    arguments = pipeline_arguments(args.repo_url, args.data_version, args.profile or params.get("profile", "default"),
                                   overrides, args.mlflow_uri)
    if args.action == "submit":
        print(json.dumps(submit_pipeline(args.host, arguments, args.package, args.experiment, args.run_name,
                                         args.cron, args.dry_run), indent=2))
        return 0
    run_local(arguments, args.pipeline_root)
    return 0
