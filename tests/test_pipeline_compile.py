"""The compiled Kubeflow pipeline matches the committed golden file, and submit's dry run."""

from __future__ import annotations

import json

import pytest
import yaml

from deepsc.cli import main
from deepsc.pipeline import DEFAULT_PACKAGE, compile_pipeline


def test_compiled_pipeline_matches_golden_file(tmp_path, monkeypatch):
    monkeypatch.delenv("DEEPSC_IMAGE", raising=False)
    monkeypatch.delenv("DEEPSC_GPU_IMAGE", raising=False)
    fresh = compile_pipeline(tmp_path / "pipeline.yaml")
    assert list(yaml.safe_load_all(fresh.read_text())) == list(yaml.safe_load_all(DEFAULT_PACKAGE.read_text())), (
        "pipelines/deepsc_pipeline.yaml is stale: run `deepsc pipeline compile` and commit it"
    )


def test_training_steps_ask_for_gpu_nodes_and_every_step_has_requests():
    docs = list(yaml.safe_load_all(DEFAULT_PACKAGE.read_text()))
    spec, platform = docs[0], docs[1]
    executors = spec["deploymentSpec"]["executors"]
    for name, executor in executors.items():
        resources = executor["container"]["resources"]
        assert resources.get("cpuRequest") and resources.get("memoryRequest"), name
    gpu_steps = {name for name, ex in executors.items() if "accelerator" in ex["container"]["resources"]}
    assert {"exec-pretrain-seg", "exec-pretrain-cls", "exec-finetune"} <= gpu_steps
    for name in ("exec-pretrain-seg", "exec-pretrain-cls", "exec-finetune", "exec-evaluate"):
        assert executors[name]["container"]["image"].endswith("-cu128"), f"{name} would train on the CPU build"
    assert not executors["exec-fetch-data"]["container"]["image"].endswith("-cu128")
    for name in ("exec-pretrain-seg", "exec-pretrain-cls", "exec-finetune"):
        accelerator = executors[name]["container"]["resources"]["accelerator"]
        assert accelerator["resourceType"] == "nvidia.com/gpu" and int(accelerator["resourceCount"]) >= 1
        k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"][name]
        assert k8s["nodeSelector"] and k8s["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_artifacts_not_parameters_carry_data():
    spec = next(yaml.safe_load_all(DEFAULT_PACKAGE.read_text()))
    finetune = spec["components"]["comp-finetune"]["inputDefinitions"]
    assert set(finetune["artifacts"]) == {"preprocessed", "split_table", "params", "seg_init", "cls_init"}
    assert "parameters" not in finetune
    root = spec["root"]["inputDefinitions"]["parameters"]
    assert set(root) == {"repo_url", "data_version", "profile", "overrides_json", "mlflow_tracking_uri"}


CLUSTER = ["--repo-url", "https://git.example.org/deepsc.git", "--mlflow-uri", "http://mlflow.deepsc:5000"]


def test_submit_dry_run_prints_request_and_contacts_nothing(capsys, monkeypatch):
    monkeypatch.delenv("KFP_HOST", raising=False)
    code = main(["pipeline", "submit", "--dry-run", "--host", "http://127.0.0.1:9", "--data-version", "abc123",
                 "--set", "loss.lambda_ta=0", "--cron", "0 3 * * 1", *CLUSTER])
    assert code == 0
    request = json.loads(capsys.readouterr().out)
    assert request["submitted"] is False and request["cron"] == "0 0 3 * * 1"  # KFP: seconds first
    assert request["arguments"]["data_version"] == "abc123"
    assert json.loads(request["arguments"]["overrides_json"]) == {"loss.lambda_ta": 0}


def test_fetch_data_is_never_cached_and_reads_the_s3_secret():
    """A recurring run must re-read the branch; the DVC remote's keys come from a Secret."""
    from pipelines.deepsc_pipeline import S3_SECRET

    spec, platform = list(yaml.safe_load_all(DEFAULT_PACKAGE.read_text()))
    tasks = spec["root"]["dag"]["tasks"]
    assert not tasks["fetch-data"]["cachingOptions"].get("enableCache")
    assert tasks["finetune"]["cachingOptions"]["enableCache"]
    secret = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-fetch-data"]["secretAsEnv"][0]
    assert secret["secretName"] == S3_SECRET and secret["optional"] is True
    assert {k["envVar"] for k in secret["keyToEnv"]} >= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3"}


def test_submit_without_host_is_a_clear_error(capsys, monkeypatch):
    monkeypatch.delenv("KFP_HOST", raising=False)
    assert main(["pipeline", "submit", *CLUSTER]) == 2
    assert "no Kubeflow host" in capsys.readouterr().err


@pytest.mark.parametrize(("extra", "message"), [
    (["--repo-url", "/home/me/deepsc", "--mlflow-uri", "http://mlflow:5000"], "local path"),
    (["--repo-url", "https://git.example.org/d.git", "--mlflow-uri", "sqlite:///mlflow.db"], "tracking server"),
    (["--repo-url", "https://git.example.org/d.git", "--mlflow-uri", ""], "tracking server"),
    ([*CLUSTER, "--cron", "every monday"], "5 fields"),
])
def test_submit_refuses_what_the_cluster_cannot_use(capsys, monkeypatch, extra, message):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["pipeline", "submit", "--dry-run", "--host", "http://127.0.0.1:9", *extra]) == 2
    assert message in capsys.readouterr().err
