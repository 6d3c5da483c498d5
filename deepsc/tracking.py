"""MLflow tracking: where runs go, and one run per stage with every setting and provenance tag.

* :func:`tracking_uri`: ``MLFLOW_TRACKING_URI`` in the environment wins, else
  ``mlflow.tracking_uri`` of params.yaml. A relative sqlite path (``sqlite:///mlflow.db``) or a
  relative file-store folder is resolved against :func:`project_root`, never the working
  directory of the moment, so every stage of a checkout writes to the same database.
* :func:`start_run`: sets the experiment (``mlflow.experiment``), logs ALL settings flattened
  (``deepsc.config.flatten``) in batches, the full settings as ``params.json``, and the tags
  ``git_commit``, ``git_dirty``, ``data_version`` (the md5 in ``data.dvc``), ``stage``, ``profile``.
* Local backends (sqlite, file store) keep their artifacts in ``mlartifacts/`` beside the database;
  an MLflow server decides its own artifact store.

mlflow is imported inside the functions (it costs about a second).
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import re
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

from deepsc.errors import ConfigError

log = logging.getLogger(__name__)

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
PARAM_VALUE_LIMIT = 500  # the value limit of MLflow servers before 2.x and of the UI; newer ones take 6000
PARAM_KEY_LIMIT = 250
PARAMS_PER_BATCH = 100  # MLflow's log_batch limit for params
ARTIFACTS_DIR = "mlartifacts"
_NOISY_LOGGERS = ("alembic", "mlflow.store.db.utils", "mlflow.tracking._tracking_service.client", "mlflow.models.model")


def project_root() -> Path:
    """Base of relative MLflow paths and of ``data.dvc``.

    The source checkout holding the ``deepsc`` package when there is one (it has ``params.yaml``
    or ``pyproject.toml``); otherwise (an installed wheel, a container) the working directory.
    """
    if (PACKAGE_ROOT / "params.yaml").is_file() or (PACKAGE_ROOT / "pyproject.toml").is_file():
        return PACKAGE_ROOT
    return Path.cwd().resolve()


def tracking_uri(params: Mapping[str, Any]) -> str:
    """The MLflow tracking URI: ``$MLFLOW_TRACKING_URI``, else ``params['mlflow']['tracking_uri']``.

    Relative local paths are made absolute against :func:`project_root`.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI") or (params.get("mlflow") or {}).get("tracking_uri")
    if not uri:
        raise ConfigError("no MLflow tracking URI: set mlflow.tracking_uri in params.yaml or MLFLOW_TRACKING_URI")
    return resolve_uri(str(uri), project_root())


def resolve_uri(uri: str, root: Path) -> str:
    """Make a relative sqlite database path or file-store folder absolute against `root`.

    >>> resolve_uri("sqlite:///mlflow.db", Path("/repo"))
    'sqlite:////repo/mlflow.db'
    >>> resolve_uri("http://mlflow:5000", Path("/repo"))
    'http://mlflow:5000'
    """
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///") :]
        if path.startswith("/") or path.startswith(":memory:") or not path:
            return uri
        return "sqlite:///" + str((root / path).resolve())
    if "://" not in uri and not uri.startswith("file:"):  # a bare folder: MLflow's file store
        return str((root / uri).resolve())
    return uri


def artifact_location(uri: str) -> str | None:
    """``mlartifacts/`` beside a local sqlite database or file store; None for servers."""
    if uri.startswith("sqlite:////"):
        return (Path(uri[len("sqlite:///") :]).parent / ARTIFACTS_DIR).as_uri()
    if "://" not in uri and not uri.startswith("file:"):
        return (Path(uri).parent / ARTIFACTS_DIR).as_uri()
    return None


def quiet_mlflow() -> None:
    """Silence MLflow's chatter: database migrations, "View run at" links, download progress bars.

    Also turns MLflow's usage telemetry off unless ``MLFLOW_DISABLE_TELEMETRY`` is set already:
    this project runs offline and near patient data, so nothing phones home by default. The
    environment settings take effect when called before the first ``import mlflow``.
    """
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def configure(params: Mapping[str, Any]) -> str:
    """Point the mlflow client (tracking and registry) at :func:`tracking_uri`; returns the URI."""
    quiet_mlflow()
    import mlflow

    uri = tracking_uri(params)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def ensure_experiment(params: Mapping[str, Any]) -> str:
    """Id of the experiment ``mlflow.experiment`` (created with a local artifact folder if new)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = configure(params)
    name = str((params.get("mlflow") or {}).get("experiment") or "deepsc-covid")
    client = mlflow.MlflowClient(uri)
    try:
        _probe_http_store(uri, name)
        experiment = client.get_experiment_by_name(name)
    except (MlflowException, OSError) as exc:  # no server there, or a store it cannot open
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise ConfigError(f"cannot reach the MLflow tracking store {uri} (MLFLOW_TRACKING_URI or mlflow.tracking_uri): "
                          f"{first_line}") from None
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location(uri))
        except MlflowException:  # created meanwhile by a concurrent stage
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage != "active":
        raise ConfigError(f"MLflow experiment '{name}' is deleted: restore it or set mlflow.experiment to another name")
    return experiment.experiment_id


PROBE_RETRIES = 2
PROBE_TIMEOUT_S = 15


def _probe_http_store(uri: str, experiment: str) -> None:
    """One quick request to an HTTP tracking server before the real calls, so that nothing
    listening fails in seconds: mlflow's own 7 retries with backoff 2 take about 4 minutes to
    report a refused connection. Any HTTP answer, even an error status, counts as reachable
    (the real call then reports it, with mlflow's retries for transient errors). Auth, TLS and
    proxy settings are mlflow's own (its host credentials and ``requests``)."""
    if not uri.startswith(("http://", "https://")):
        return
    from mlflow.utils import rest_utils
    from mlflow.utils.credentials import get_default_host_creds

    rest_utils.http_request(get_default_host_creds(uri), "/api/2.0/mlflow/experiments/get-by-name", "GET",
                            max_retries=PROBE_RETRIES, backoff_factor=1, timeout=PROBE_TIMEOUT_S,
                            raise_on_status=False, params={"experiment_name": experiment})


@contextmanager
def start_run(
    params: Mapping[str, Any],
    run_name: str,
    stage: str,
    nested: bool = False,
    parent_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> Iterator[Any]:
    """One MLflow run of a stage, with all settings and provenance tags; yields ``mlflow.ActiveRun``.

    Args:
        params: the merged settings (``deepsc.config.load_params``); all of them are logged.
        run_name: the run's display name.
        stage: pipeline stage (``pretrain-seg``, ``evaluate``, ``register``, ...), tag ``stage``.
        nested: nest under the active run of this process.
        parent_run_id: nest under this (active) run, possibly of another process.
        tags: extra tags; they override the provenance tags of the same name.

    The run ends FINISHED, or FAILED when the block raises.
    """
    quiet_mlflow()
    import mlflow

    experiment_id = ensure_experiment(params)
    run_tags = {**provenance_tags(params, stage), **dict(tags or {})}
    with mlflow.start_run(
        run_name=run_name, experiment_id=experiment_id, nested=nested, parent_run_id=parent_run_id, tags=run_tags
    ) as run:
        log_params(run.info.run_id, params)
        yield run


def provenance_tags(params: Mapping[str, Any], stage: str) -> dict[str, str]:
    """``git_commit``, ``git_dirty``, ``data_version``, ``code_version``, ``stage`` and ``profile``.

    From this checkout, unless ``params`` carries a ``provenance`` section: a Kubeflow run's
    first step pins the revision it fetched (:func:`deepsc.data.fetch.resolve_provenance`), and
    its steps run in a container with neither ``.git`` nor ``data.dvc``. That revision is a
    commit (``git_dirty`` false: its settings and data are committed ones); the code that ran is
    the container's installed package, ``code_version``.
    """
    from deepsc import __version__

    root = project_root()
    pinned = params.get("provenance") or {}
    if pinned.get("git_commit") and pinned.get("data_version"):
        commit, dirty, data = str(pinned["git_commit"]), "false", str(pinned["data_version"])
    else:
        (commit, dirty), data = git_state(root), data_version(root)
    return {
        "git_commit": commit,
        "git_dirty": dirty,
        "data_version": data,
        "code_version": str(__version__),
        "stage": str(stage),
        "profile": str(params.get("profile", "default")),
    }


# What the pipeline itself rewrites while `dvc repro` runs: not an uncommitted change of the
# code, settings or data a run was made from (git pathspec magic, relative to the root).
PIPELINE_WRITTEN = (":(exclude)dvc.lock", ":(exclude)outputs")


def git_state(root: Path) -> tuple[str, str]:
    """(commit of HEAD, "true"/"false" for uncommitted changes); ("unknown", "unknown") outside git."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=20, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit:
        return "unknown", "unknown"
    status = git("status", "--porcelain", "--", ".", *PIPELINE_WRITTEN)
    return commit, "unknown" if status is None else str(bool(status)).lower()


def data_version(root: Path) -> str:
    """The md5 DVC records for the data folder in ``<root>/data.dvc``; 'unversioned' without it."""
    import yaml

    path = root / "data.dvc"
    if not path.is_file():
        return "unversioned"
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        text = ""
    return data_version_of(text, str(path))


def data_version_of(text: str, where: str) -> str:
    """The md5 of the first output of a ``.dvc`` file's text; 'unversioned' (logged) without one."""
    import yaml

    try:
        outs = (yaml.safe_load(text) or {}).get("outs") or []
        md5 = outs[0].get("md5") if isinstance(outs, list) else None
    except (yaml.YAMLError, AttributeError, IndexError, KeyError, TypeError):
        md5 = None
    if not md5:
        log.warning("%s has no md5 of its output; data version recorded as 'unversioned'", where)
        return "unversioned"
    return str(md5)


def log_params(run_id: str, params: Mapping[str, Any]) -> None:
    """Log every setting flattened to dotted keys, within MLflow's limits, plus ``params.json``.

    Values longer than :data:`PARAM_VALUE_LIMIT` are cut (ending in "..."); the untruncated
    settings are always in the run's ``params.json`` artifact.
    """
    import mlflow
    from mlflow.entities import Param

    from deepsc.config import flatten

    flat = {key: value for key, value in flatten(params).items() if not key.startswith("profiles.")}
    entries = [Param(_param_key(key), _param_value(value)) for key, value in sorted(flat.items())]
    client = mlflow.MlflowClient()
    for start in range(0, len(entries), PARAMS_PER_BATCH):
        client.log_batch(run_id, params=entries[start : start + PARAMS_PER_BATCH])
    client.log_dict(run_id, _jsonable(params), "params.json")


def _param_key(key: str) -> str:
    # MLflow accepts letters, digits, "_", "-", ".", " ", "/" in keys
    return re.sub(r"[^\w\-. /]", "_", key)[:PARAM_KEY_LIMIT]


def _param_value(value: str) -> str:
    return value if len(value) <= PARAM_VALUE_LIMIT else value[: PARAM_VALUE_LIMIT - 3] + "..."


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def log_metrics_per_epoch(record: Mapping[str, Any], epoch: int) -> None:
    """Log one epoch's numeric values to the active run at step `epoch`.

    Non-numeric entries and the ``epoch`` key itself (it is the step) are skipped; NaN and inf
    are logged as they are (MLflow stores them) so that a diverging loss stays visible.
    """
    import mlflow

    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
    metrics = {
        _param_key(str(key)): float(value)
        for key, value in record.items()
        if key != "epoch" and _is_number(value)
    }
    if not metrics:
        return
    from mlflow.exceptions import MlflowException

    try:
        mlflow.log_metrics(metrics, step=epoch)
    except (MlflowException, OSError) as exc:  # the epoch is in last.pt and history.csv; a resume re-logs it
        log.warning("epoch %d not logged to MLflow (training goes on): %s", epoch, (str(exc).splitlines() or [""])[0][:300])


def log_metrics(metrics: Mapping[str, Any]) -> None:
    """Log the numeric entries of a summary (for example metrics.json) to the active run.

    NaN (an undefined metric, null in metrics.json) is logged too: skipping it would leave an
    earlier evaluation's value as the run's latest."""
    import mlflow

    numeric = {_param_key(str(k)): float(v) for k, v in metrics.items() if _is_number(v)}
    if numeric:
        mlflow.log_metrics(numeric)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def log_artifacts(*paths: str | os.PathLike, artifact_path: str | None = None) -> None:
    """Log files and folders (a folder's contents go under `artifact_path`) to the active run.

    Raises:
        FileNotFoundError: a path does not exist (a stage output went missing: say so, loudly).
    """
    import mlflow

    for path in map(Path, paths):
        if path.is_dir():
            mlflow.log_artifacts(str(path), artifact_path=artifact_path)
        elif path.is_file():
            mlflow.log_artifact(str(path), artifact_path=artifact_path)
        else:
            raise FileNotFoundError(f"cannot log {path} to MLflow: it does not exist")
