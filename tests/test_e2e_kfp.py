"""The compiled components run end to end with kfp's local runner on a tiny DVC-versioned cohort.

The first step pulls the cohort that `data.dvc` pins at a git revision from the repository's DVC
remote (a local folder remote stands in for S3 here; S3 itself is tested against moto in
test_dvc_remote.py) and the run ends with a registered, promoted model.
"""

from __future__ import annotations

import pytest

from tests.e2e_helpers import copy_checkout, environment, git, run

pytestmark = pytest.mark.slow


def test_pipeline_runs_locally_and_registers_a_champion(tmp_path, monkeypatch):
    repo = copy_checkout(tmp_path / "repo")
    env = environment(tmp_path)
    run(["deepsc", "synth"], repo, env)
    run(["dvc", "add", "data"], repo, env)
    run(["dvc", "remote", "add", "-f", "-d", "storage", str(tmp_path / "dvc-remote")], repo, env)
    run(["dvc", "push"], repo, env)
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=test", "-c", "user.email=test@example.org", "commit", "-qm", "tiny cohort")
    revision = git(repo, "rev-parse", "HEAD").strip()

    for key in ("MLFLOW_TRACKING_URI", "PATH", "DVC_NO_ANALYTICS"):
        monkeypatch.setenv(key, env[key])
    from deepsc.pipeline import pipeline_arguments, run_local

    arguments = pipeline_arguments(str(repo), revision, "tiny", {}, env["MLFLOW_TRACKING_URI"])
    task = run_local(arguments, tmp_path / "kfp-root")
    assert task is not None

    import mlflow

    uri = env["MLFLOW_TRACKING_URI"]
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)  # other tests may set a global registry
    champion = client.get_model_version_by_alias("deepsc-covid", "champion")
    assert str(champion.version) == "1"
    # every step's run names the fetched commit and its data.dvc md5, not this checkout's
    import yaml

    md5 = yaml.safe_load((repo / "data.dvc").read_text())["outs"][0]["md5"]
    runs = client.search_runs([client.get_run(champion.run_id).info.experiment_id])
    stages = {r.data.tags.get("stage") for r in runs}
    assert {"pretrain-seg", "pretrain-cls", "finetune", "register"} <= stages
    for tracked in runs:
        assert (tracked.data.tags["git_commit"], tracked.data.tags["data_version"]) == (revision, md5), tracked.info.run_name
