"""deepsc.tracking on a throw-away sqlite store."""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path

import pytest

from deepsc import tracking
from deepsc.config import flatten
from deepsc.errors import ConfigError


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """One sqlite database for the module (creating its tables costs about a second)."""
    return tmp_path_factory.mktemp("mlflow") / "mlflow.db"


@pytest.fixture
def tracked(store, monkeypatch, params, request) -> dict:
    """Settings whose runs go to the module's store, in an experiment of this test's own."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    settings = copy.deepcopy(params)
    settings["mlflow"]["experiment"] = f"test-{request.node.name}"
    yield settings
    while mlflow.active_run() is not None:  # never leak an open run into the next test
        mlflow.end_run()


def _client():
    import mlflow

    return mlflow.MlflowClient()


def test_tracking_uri_env_wins_and_relative_sqlite_is_pinned_to_the_project(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # the working directory must not matter
    root = tracking.project_root()
    assert tracking.tracking_uri({"mlflow": {"tracking_uri": "sqlite:///mlflow.db"}}) == f"sqlite:///{root / 'mlflow.db'}"
    assert tracking.tracking_uri({"mlflow": {"tracking_uri": "sqlite:////abs/m.db"}}) == "sqlite:////abs/m.db"
    assert tracking.tracking_uri({"mlflow": {"tracking_uri": "mlruns"}}) == str(root / "mlruns")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert tracking.tracking_uri({"mlflow": {"tracking_uri": "sqlite:///mlflow.db"}}) == "http://mlflow.example:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///other.db")
    assert tracking.tracking_uri({}) == f"sqlite:///{root / 'other.db'}"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with pytest.raises(ConfigError, match="tracking"):
        tracking.tracking_uri({"mlflow": {}})


def test_artifacts_live_beside_a_local_database():
    assert tracking.artifact_location("sqlite:////srv/db/mlflow.db") == "file:///srv/db/mlartifacts"
    assert tracking.artifact_location("http://mlflow:5000") is None


def test_start_run_logs_all_settings_and_provenance(tracked, store):
    tracked["extra"] = {"long": "x" * 700, **{f"k{i:03d}": i for i in range(150)}}  # > 1 batch, > 500 chars
    with tracking.start_run(tracked, "unit", "pretrain-seg") as run:
        run_id = run.info.run_id
    stored = _client().get_run(run_id)
    flat = flatten(tracked)
    assert set(stored.data.params) == set(flat)
    assert stored.data.params["loss.lambda_ta"] == flat["loss.lambda_ta"]
    assert stored.data.params["extra.long"] == "x" * 497 + "..."
    tags = stored.data.tags
    assert tags["stage"] == "pretrain-seg" and tags["profile"] == "default"
    commit, dirty = tracking.git_state(tracking.project_root())
    assert (tags["git_commit"], tags["git_dirty"]) == (commit, dirty)
    assert tags["data_version"] == tracking.data_version(tracking.project_root())
    assert stored.info.status == "FINISHED"
    assert stored.info.artifact_uri.startswith((store.parent / "mlartifacts").as_uri())
    import mlflow

    full = mlflow.artifacts.load_dict(f"{stored.info.artifact_uri}/params.json")
    assert full["extra"]["long"] == "x" * 700


def test_nested_run_and_failed_run(tracked):
    with tracking.start_run(tracked, "parent", "ablation") as parent:
        with tracking.start_run(tracked, "child", "finetune", nested=True, parent_run_id=parent.info.run_id) as child:
            child_id = child.info.run_id
    assert _client().get_run(child_id).data.tags["mlflow.parentRunId"] == parent.info.run_id
    with pytest.raises(RuntimeError):
        with tracking.start_run(tracked, "broken", "finetune") as run:
            raise RuntimeError("boom")
    assert _client().get_run(run.info.run_id).info.status == "FAILED"


def test_metrics_per_epoch_and_artifacts(tracked, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.json").write_text("{}")
    (tmp_path / "summary.csv").write_text("a\n1\n")
    with tracking.start_run(tracked, "epochs", "finetune") as run:
        for epoch in (1, 2):
            tracking.log_metrics_per_epoch({"epoch": epoch, "loss": 1.0 / epoch, "phase": "train", "ok": True}, epoch)
        tracking.log_artifacts(tmp_path / "out", tmp_path / "summary.csv")
        with pytest.raises(FileNotFoundError):
            tracking.log_artifacts(tmp_path / "missing")
        with pytest.raises(ValueError):
            tracking.log_metrics_per_epoch({"loss": 1.0}, -1)
    client = _client()
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 0.5)]
    assert set(client.get_run(run.info.run_id).data.metrics) == {"loss"}
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"config.json", "summary.csv", "params.json"}


def test_git_and_data_version_outside_a_checkout(tmp_path):
    assert tracking.git_state(tmp_path) == ("unknown", "unknown")
    assert tracking.data_version(tmp_path) == "unversioned"
    (tmp_path / "data.dvc").write_text("outs:\n- md5: 0123456789abcdef0123456789abcdef.dir\n  size: 10\n  nfiles: 2\n  path: data\n")
    assert tracking.data_version(tmp_path) == "0123456789abcdef0123456789abcdef.dir"
    for malformed in ("outs: {md5: abc}\n", "outs: [1, 2]\n", "outs: ][\n", "just text\n"):
        (tmp_path / "data.dvc").write_text(malformed)
        assert tracking.data_version(tmp_path) == "unversioned", malformed
    (tmp_path / "data.dvc").write_bytes(b"\xff\xfe not utf-8")
    assert tracking.data_version(tmp_path) == "unversioned"


def test_git_dirty_follows_the_working_tree(tmp_path):
    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "a.txt").write_text("a")
    git("add", "a.txt")
    git("-c", "user.name=t", "-c", "user.email=t@example.org", "commit", "-qm", "init")
    commit, dirty = tracking.git_state(tmp_path)
    assert len(commit) == 40 and dirty == "false"
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\n")  # what `dvc repro` rewrites is no uncommitted change
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "metrics.json").write_text("{}")
    assert tracking.git_state(tmp_path) == (commit, "false")
    (tmp_path / "a.txt").write_text("b")
    assert tracking.git_state(tmp_path) == (commit, "true")


def test_a_pinned_revision_names_the_runs_of_a_container_without_git(tmp_path, monkeypatch):
    """Kubeflow steps run where there is no .git nor data.dvc: fetch_data's pinned revision
    (resolved here from this checkout) tags their runs instead of 'unknown' / 'unversioned'."""
    from deepsc.data.fetch import resolve_provenance

    root = tracking.project_root()
    if not (root / ".git").exists() or not (root / "data.dvc").is_file():
        pytest.skip("needs the git checkout with data.dvc")
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    committed = subprocess.run(["git", "-C", str(root), "show", "HEAD:data.dvc"], capture_output=True, text=True, check=True).stdout
    pinned = resolve_provenance(str(root), "HEAD")
    assert (pinned["git_commit"], pinned["data_version"]) == (head, tracking.data_version_of(committed, "HEAD:data.dvc"))

    monkeypatch.setattr(tracking, "project_root", lambda: tmp_path)  # as in the container
    assert tracking.provenance_tags({}, "finetune")["data_version"] == "unversioned"
    tags = tracking.provenance_tags({"provenance": pinned}, "finetune")
    assert (tags["git_commit"], tags["data_version"], tags["git_dirty"]) == (head, pinned["data_version"], "false")
    from deepsc import __version__

    assert tags["code_version"] == __version__  # the container's code, which the revision does not pin


def test_an_unreachable_tracking_server_is_a_settings_error_in_seconds(params, monkeypatch):
    """With mlflow's default retries (7, backoff 2) a refused connection took about 4 minutes
    to report; one bounded probe reports it before any call with those retries is made."""
    from mlflow.utils import rest_utils

    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # discard port: nothing listens
    calls, real = [], rest_utils.http_request

    def spy(*args, **kwargs):
        calls.append(kwargs.get("max_retries"))
        return real(*args, **kwargs)

    monkeypatch.setattr(rest_utils, "http_request", spy)
    with pytest.raises(ConfigError, match="cannot reach the MLflow tracking store http://127.0.0.1:9"):
        tracking.ensure_experiment(params)
    assert calls == [tracking.PROBE_RETRIES]


def test_an_epoch_that_cannot_be_logged_does_not_stop_training(tracked, monkeypatch, caplog):
    import mlflow
    from mlflow.exceptions import MlflowException

    def down(*args, **kwargs):
        raise MlflowException("API request to http://mlflow/api/2.0/mlflow/runs/log-batch failed")

    with tracking.start_run(tracked, "outage", "finetune"):
        monkeypatch.setattr(mlflow, "log_metrics", down)
        tracking.log_metrics_per_epoch({"loss": 1.0}, 3)  # no exception: last.pt and history.csv hold the epoch
    assert "epoch 3 not logged to MLflow" in caplog.text


def test_an_undefined_metric_replaces_an_earlier_value(tracked):
    with tracking.start_run(tracked, "nan", "evaluate") as run:
        tracking.log_metrics({"test_rmsd_mm_mean": 4.0})
        tracking.log_metrics({"test_rmsd_mm_mean": float("nan"), "label": "x"})
    value = _client().get_run(run.info.run_id).data.metrics["test_rmsd_mm_mean"]
    assert value != value  # NaN: the earlier 4.0 is not left standing


@pytest.mark.slow
def test_a_live_tracking_server_passes_the_probe_and_records_the_run(params, monkeypatch, tmp_path):
    """The HTTP path end to end: a real ``mlflow server`` on 127.0.0.1, as in the k8s set-up."""
    import shutil
    import sys
    import time
    import urllib.request

    from tests.e2e_helpers import free_port, stop_process

    port = free_port()
    mlflow_cli = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
    server = subprocess.Popen(
        [mlflow_cli, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination", str(tmp_path / "art")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        uri = f"http://127.0.0.1:{port}"
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not start")
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        settings = copy.deepcopy(params)
        settings["mlflow"]["experiment"] = "live"
        with tracking.start_run(settings, "live-run", "evaluate") as run:
            tracking.log_metrics({"test_accuracy": 0.5})
        assert _client().get_run(run.info.run_id).data.metrics["test_accuracy"] == 0.5
    finally:
        stop_process(server, timeout=30)
