"""`dvc repro` runs every stage for real on a fresh copy; a second run is a no-op; one changed
param re-runs only what depends on it. Tiny profile, so it takes minutes, not the full job."""

from __future__ import annotations

import json
import time

import pytest

from tests.e2e_helpers import copy_checkout, environment, run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e_dvc")
    repo = copy_checkout(tmp / "repo")
    env = environment(tmp)
    run(["deepsc", "synth"], repo, env)
    first = run(["dvc", "repro"], repo, env)
    return repo, env, first


def test_repro_runs_every_stage_and_promotes_a_model(pipeline_run):
    repo, env, first = pipeline_run
    for stage in ("validate", "split", "analyze", "preprocess", "pretrain_seg", "pretrain_cls", "finetune",
                  "ablation", "baselines", "evaluate", "register"):
        assert f"Running stage '{stage}'" in first.stdout, stage
    metrics = json.loads((repo / "outputs/evaluation/metrics.json").read_text())
    assert 0.0 <= metrics["accuracy"] <= 1.0 and 0.0 <= metrics["dsc_mean"] <= 1.0
    decision = json.loads((repo / "outputs/registry/decision.json").read_text())
    assert decision["alias"] == "champion"

    import mlflow

    uri = env["MLFLOW_TRACKING_URI"]
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)  # other tests may set a global registry
    champion = client.get_model_version_by_alias("deepsc-covid", "champion")
    assert champion.tags["model_sha256"]
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000)
    stages = {r.data.tags.get("stage") for r in runs}
    assert {"pretrain-seg", "pretrain-cls", "finetune"} <= stages
    parents = {r.data.tags["mlflow.parentRunId"] for r in runs if "mlflow.parentRunId" in r.data.tags}
    variants = [r for r in runs if r.data.tags.get("mlflow.parentRunId") in parents]
    assert len(parents) == 1 and len(variants) >= 9, "the ablation grid runs as nested runs under one parent run"
    shown = run(["dvc", "metrics", "show"], repo, env).stdout
    assert "accuracy" in shown and "dsc_mean" in shown


def test_second_repro_is_a_fast_no_op(pipeline_run):
    repo, env, _ = pipeline_run
    start = time.monotonic()
    second = run(["dvc", "repro"], repo, env)
    assert "Running stage" not in second.stdout
    assert time.monotonic() - start < 60


def test_changing_one_param_reruns_only_its_dependents(pipeline_run):
    repo, env, _ = pipeline_run
    params = repo / "params.yaml"
    params.write_text(params.read_text().replace("nsd_tolerance_mm: 3.0", "nsd_tolerance_mm: 2.0", 1))
    dry = run(["dvc", "repro", "--dry"], repo, env).stdout
    assert "Running stage 'evaluate'" in dry
    for untouched in ("preprocess", "pretrain_seg", "pretrain_cls", "finetune", "ablation", "baselines"):
        assert f"Running stage '{untouched}'" not in dry, untouched
