"""deepsc.registry: promotion by aliases and idempotent registration, on a throw-away sqlite registry."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest

from deepsc.errors import ConfigError, InputError
from deepsc.registry import (
    CHALLENGER,
    CHAMPION,
    TAG_DECISION,
    TAG_FORCED_BY,
    TAG_REASON,
    TAG_SHA256,
    file_sha256,
    pinned_requirements,
    promote,
    register_model,
)

TOLERANCE = {"dsc": 0.01, "accuracy": 0.01}
GOOD = {"dsc_mean": 0.80, "accuracy": 0.90}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("registry") / "mlflow.db"


@pytest.fixture
def client(store, monkeypatch):
    import mlflow

    uri = f"sqlite:///{store}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    yield mlflow.MlflowClient(uri, registry_uri=uri)
    while mlflow.active_run() is not None:
        mlflow.end_run()


@pytest.fixture
def model_name(request) -> str:
    return f"test-{request.node.name}".replace("[", "-").replace("]", "")


def new_version(client, name: str, tmp_path: Path, run_id: str | None = None) -> str:
    """A registered version made directly in the registry (promote never loads the model)."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException:
        pass  # exists already
    return str(client.create_model_version(name, source=str(tmp_path / "model"), run_id=run_id).version)


def snapshot(client, name: str) -> tuple:
    """Everything promote may change: the versions, their tags, and the aliases."""
    versions = sorted((mv.version, tuple(sorted(mv.tags.items()))) for mv in client.search_model_versions(f"name = '{name}'"))
    return tuple(versions), tuple(sorted(client.get_registered_model(name).aliases.items()))


def alias_of(client, name: str, alias: str) -> str:
    return str(client.get_model_version_by_alias(name, alias).version)


def test_first_version_becomes_champion(client, model_name, tmp_path):
    v1 = new_version(client, model_name, tmp_path)
    decision = promote(client, model_name, v1, GOOD, TOLERANCE)
    assert (decision.alias, decision.previous_champion, decision.changed) == (CHAMPION, None, True)
    assert alias_of(client, model_name, CHAMPION) == v1
    tags = client.get_model_version(model_name, v1).tags
    assert tags[TAG_DECISION] == CHAMPION and "first version" in tags[TAG_REASON]
    assert float(tags["metric.dsc_mean"]) == 0.80 and float(tags["metric.accuracy"]) == 0.90


def test_worse_dsc_is_challenger_and_champion_stays(client, model_name, tmp_path):
    v1 = new_version(client, model_name, tmp_path)
    promote(client, model_name, v1, GOOD, TOLERANCE)
    v2 = new_version(client, model_name, tmp_path)
    decision = promote(client, model_name, v2, {"dsc_mean": 0.70, "accuracy": 0.95}, TOLERANCE)
    assert (decision.alias, decision.previous_champion) == (CHALLENGER, v1)
    assert alias_of(client, model_name, CHAMPION) == v1 and alias_of(client, model_name, CHALLENGER) == v2
    tags = client.get_model_version(model_name, v2).tags
    assert tags[TAG_DECISION] == CHALLENGER
    assert "dsc_mean 0.7000 < 0.8000 - 0.0100" in tags[TAG_REASON] and f"champion v{v1}" in tags[TAG_REASON]


def test_accuracy_regression_alone_blocks_promotion(client, model_name, tmp_path):
    v1 = new_version(client, model_name, tmp_path)
    promote(client, model_name, v1, GOOD, TOLERANCE)
    v2 = new_version(client, model_name, tmp_path)
    decision = promote(client, model_name, v2, {"dsc_mean": 0.90, "accuracy": 0.85}, TOLERANCE)
    assert decision.alias == CHALLENGER and "accuracy 0.8500 < 0.9000" in decision.reason


def test_equal_within_tolerance_becomes_champion(client, model_name, tmp_path):
    v1 = new_version(client, model_name, tmp_path)
    promote(client, model_name, v1, GOOD, TOLERANCE)
    v2 = new_version(client, model_name, tmp_path)
    promote(client, model_name, v2, {"dsc_mean": 0.50, "accuracy": 0.90}, TOLERANCE)  # challenger first
    v3 = new_version(client, model_name, tmp_path)
    decision = promote(client, model_name, v3, {"dsc_mean": 0.795, "accuracy": 0.89}, TOLERANCE)
    assert (decision.alias, decision.previous_champion) == (CHAMPION, v1)
    assert alias_of(client, model_name, CHAMPION) == v3
    assert "no regression beyond tolerance" in decision.reason
    # the next candidate is compared with v3's recorded numbers, not v1's
    v4 = new_version(client, model_name, tmp_path)
    assert promote(client, model_name, v4, {"dsc_mean": 0.786, "accuracy": 0.89}, TOLERANCE).alias == CHAMPION


@pytest.mark.parametrize("second_metrics", [GOOD, {"dsc_mean": 0.60, "accuracy": 0.60}], ids=["champion", "challenger"])
def test_promote_twice_changes_nothing(client, model_name, tmp_path, second_metrics):
    v1 = new_version(client, model_name, tmp_path)
    promote(client, model_name, v1, {"dsc_mean": 0.78, "accuracy": 0.88}, TOLERANCE)
    v2 = new_version(client, model_name, tmp_path)
    first = promote(client, model_name, v2, second_metrics, TOLERANCE)
    before = snapshot(client, model_name)
    again = promote(client, model_name, v2, second_metrics, TOLERANCE)
    assert snapshot(client, model_name) == before
    assert (again.alias, again.reason, again.changed) == (first.alias, first.reason, False)


def test_reevaluated_champion_is_gated_with_its_new_numbers(client, model_name, tmp_path):
    v1 = new_version(client, model_name, tmp_path)
    promote(client, model_name, v1, GOOD, TOLERANCE)
    reevaluated = {"dsc_mean": 0.85, "accuracy": 0.90}  # same weights, a new evaluation
    again = promote(client, model_name, v1, reevaluated, TOLERANCE)
    assert (again.alias, again.changed) == (CHAMPION, True)
    assert "first version" in again.reason and "re-evaluated since: dsc_mean 0.8500" in again.reason
    tags = client.get_model_version(model_name, v1).tags
    assert float(tags["metric.dsc_mean"]) == 0.85 and tags[TAG_DECISION] == CHAMPION
    assert promote(client, model_name, v1, reevaluated, TOLERANCE).changed is False
    # 0.83 passes against the stale 0.80, not against the champion's current 0.85
    v2 = new_version(client, model_name, tmp_path)
    decision = promote(client, model_name, v2, {"dsc_mean": 0.83, "accuracy": 0.90}, TOLERANCE)
    assert decision.alias == CHALLENGER and "dsc_mean 0.8300 < 0.8500 - 0.0100" in decision.reason


def test_force_records_who_and_why(client, model_name, tmp_path, monkeypatch):
    monkeypatch.setenv("USER", "dr-test")
    v1 = new_version(client, model_name, tmp_path)
    promote(client, model_name, v1, GOOD, TOLERANCE)
    v2 = new_version(client, model_name, tmp_path)
    promote(client, model_name, v2, {"dsc_mean": 0.1, "accuracy": 0.1}, TOLERANCE)  # challenger
    with pytest.raises(ConfigError, match="reason"):
        promote(client, model_name, v2, {"dsc_mean": 0.1, "accuracy": 0.1}, TOLERANCE, force=True)
    decision = promote(client, model_name, v2, {"dsc_mean": 0.1, "accuracy": 0.1}, TOLERANCE, force=True, reason="hotfix for scanner X")
    assert decision.alias == CHAMPION and decision.forced
    assert alias_of(client, model_name, CHAMPION) == v2
    assert "challenger" not in client.get_registered_model(model_name).aliases  # no version is both
    tags = client.get_model_version(model_name, v2).tags
    assert tags[TAG_FORCED_BY] == "dr-test" and tags[TAG_REASON] == "forced: hotfix for scanner X"
    before = snapshot(client, model_name)
    assert not promote(client, model_name, v2, {"dsc_mean": 0.1, "accuracy": 0.1}, TOLERANCE, force=True, reason="again").changed
    assert snapshot(client, model_name) == before


def test_champion_without_metric_tags_is_read_from_its_run(client, model_name, tmp_path):
    experiment = client.create_experiment(model_name, artifact_location=(tmp_path / "art").as_uri())
    run = client.create_run(experiment)
    client.log_metric(run.info.run_id, "dsc_mean", 0.8)
    client.log_metric(run.info.run_id, "accuracy", 0.9)
    v1 = new_version(client, model_name, tmp_path, run_id=run.info.run_id)
    client.set_registered_model_alias(model_name, CHAMPION, v1)  # made champion by hand, no tags
    v2 = new_version(client, model_name, tmp_path)
    assert promote(client, model_name, v2, {"dsc_mean": 0.7, "accuracy": 0.9}, TOLERANCE).alias == CHALLENGER
    v3 = new_version(client, model_name, tmp_path)  # a champion with nothing recorded cannot be beaten
    client.set_registered_model_alias(model_name, CHAMPION, v3)
    v4 = new_version(client, model_name, tmp_path)
    decision = promote(client, model_name, v4, {"dsc_mean": 0.99, "accuracy": 0.99}, TOLERANCE)
    assert decision.alias == CHALLENGER and "no recorded dsc_mean" in decision.reason


def test_promote_rejects_bad_arguments(client, model_name, tmp_path):
    v1 = new_version(client, model_name, tmp_path)
    with pytest.raises(InputError, match="accuracy"):
        promote(client, model_name, v1, {"dsc_mean": 0.8}, TOLERANCE)
    with pytest.raises(InputError, match="no such"):
        promote(client, model_name, "99", GOOD, TOLERANCE)
    with pytest.raises(ConfigError, match="tolerance.dsc"):
        promote(client, model_name, v1, GOOD, {"dsc": -0.1, "accuracy": 0.0})
    with pytest.raises(ConfigError, match="tolerance.dsc"):  # YAML `yes` must not switch the gate off
        promote(client, model_name, v1, GOOD, {"dsc": True, "accuracy": 0.0})
    for bad in (float("nan"), float("inf"), True, "0.8"):  # a NaN champion would block every later candidate
        with pytest.raises(InputError, match="dsc_mean"):
            promote(client, model_name, v1, {**GOOD, "dsc_mean": bad}, TOLERANCE)
    assert client.get_registered_model(model_name).aliases == {}


def test_pinned_requirements_have_no_local_labels():
    pins = dict(p.split("==") for p in pinned_requirements())
    assert {"torch", "monai", "mlflow", "numpy", "simpleitk"} <= set(pins)
    assert all("+" not in v for v in pins.values())


# ----------------------------------------------------------------------------- registration


def _model_and_eval(tmp_path: Path, weights: bytes = b"weights-1", dsc: float = 0.8) -> tuple[Path, Path]:
    model_dir, eval_dir = tmp_path / "model", tmp_path / "evaluation"
    model_dir.mkdir(parents=True, exist_ok=True)
    eval_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "model.pt").write_bytes(weights)
    (model_dir / "config.json").write_text(json.dumps({"stage": "finetune", "class_counts": [3, 3, 3]}))
    (eval_dir / "metrics.json").write_text(json.dumps({"dsc_mean": dsc, "accuracy": 0.9, "nsd_mean": 0.7, "roc": {}}))
    return model_dir, eval_dir


def _settings(params: dict, model_name: str) -> dict:
    settings = copy.deepcopy(params)
    settings["register"]["model_name"] = model_name
    settings["mlflow"]["experiment"] = model_name
    return settings


def _check_registration(client, settings, model_name, tmp_path, python_model):
    model_dir, eval_dir = _model_and_eval(tmp_path)
    first = register_model(model_dir, eval_dir, settings, python_model=python_model)
    assert (first.created, first.alias) == (True, CHAMPION)
    mv = client.get_model_version(model_name, first.version)
    assert mv.tags[TAG_SHA256] == file_sha256(model_dir / "model.pt") == first.sha256
    assert "not for clinical diagnosis" in mv.description and "| dsc_mean | 0.8000 |" in mv.description
    assert mv.tags["data_version"] and mv.tags["git_commit"]
    import mlflow

    requirements = Path(mlflow.artifacts.download_artifacts(f"{first.model_uri}/requirements.txt", dst_path=str(tmp_path / "dl")))
    assert "torch==2.13.0" in requirements.read_text().split()
    card = mlflow.artifacts.load_text(f"runs:/{first.run_id}/model_card.md")
    assert f"v{first.version}" in card and first.sha256 in card

    before = snapshot(client, model_name)
    again = register_model(model_dir, eval_dir, settings, python_model=python_model)
    assert (again.created, again.version, again.run_id, again.alias) == (False, first.version, first.run_id, CHAMPION)
    assert snapshot(client, model_name) == before
    return first


class StandInPyfunc:
    """Placeholder for deepsc.serving.DeepSCPyfunc: registration never calls predict."""

    def __new__(cls):
        import mlflow.pyfunc

        class _Model(mlflow.pyfunc.PythonModel):
            def predict(self, context, model_input: list[str], params=None) -> list[str]:  # hints keep mlflow quiet
                return model_input

        return _Model()


@pytest.mark.filterwarnings("ignore:.*Any type hint")  # emitted by `import mlflow.pyfunc` itself
def test_register_model_is_idempotent_and_documents_the_version(client, params, model_name, tmp_path, capsys):
    settings = _settings(params, model_name)
    _check_registration(client, settings, model_name, tmp_path, StandInPyfunc())
    # a worse model.pt: a new version, challenger; then the CLI's decision file for it
    model_dir, eval_dir = _model_and_eval(tmp_path / "worse", weights=b"weights-2", dsc=0.5)
    worse = register_model(model_dir, eval_dir, settings, python_model=StandInPyfunc())
    assert (worse.created, worse.alias) == (True, CHALLENGER)
    from deepsc.registry import write_decision

    decision = json.loads(write_decision(worse, tmp_path / "registry").read_text())
    assert decision["alias"] == CHALLENGER and decision["version"] == worse.version


@pytest.mark.filterwarnings("ignore:.*Any type hint")
def test_same_weights_served_with_other_settings_are_a_new_version(client, params, model_name, tmp_path):
    """The pyfunc carries the inference settings: the weights alone do not identify what is served."""
    from deepsc.registry import TAG_SERVING, served_settings

    settings = _settings(params, model_name)
    first = _check_registration(client, settings, model_name, tmp_path, StandInPyfunc())
    assert served_settings(settings)["inference"] == params["inference"]
    changed = copy.deepcopy(settings)
    changed["inference"]["mirror"] = not settings["inference"]["mirror"]
    model_dir, eval_dir = tmp_path / "model", tmp_path / "evaluation"
    second = register_model(model_dir, eval_dir, changed, python_model=StandInPyfunc())
    assert second.created and second.version != first.version and second.sha256 == first.sha256
    tags = [client.get_model_version(model_name, v).tags for v in (first.version, second.version)]
    assert tags[0][TAG_SHA256] == tags[1][TAG_SHA256] and tags[0][TAG_SERVING] != tags[1][TAG_SERVING]


def test_cli_refuses_missing_metrics_without_writing(tmp_path, monkeypatch, capsys, store):
    from deepsc.cli import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    model_dir, eval_dir = _model_and_eval(tmp_path)
    (eval_dir / "metrics.json").unlink()
    params_file = Path(__file__).resolve().parents[1] / "params.yaml"
    code = main(["--params", str(params_file), "register", "--model", str(model_dir), "--eval", str(eval_dir), "--out", str(tmp_path / "registry")])
    assert code == 2 and "metrics.json" in capsys.readouterr().err
    assert not (tmp_path / "registry").exists()


@pytest.mark.filterwarnings("ignore:.*Any type hint")
@pytest.mark.skipif(importlib.util.find_spec("deepsc.serving") is None, reason="deepsc.serving is not written yet")
def test_register_model_end_to_end_with_the_serving_pyfunc(client, params, model_name, tmp_path, capsys):
    from deepsc.cli import main

    settings = _settings(params, model_name)
    first = _check_registration(client, settings, model_name, tmp_path, None)
    import cloudpickle
    import mlflow

    pickled = mlflow.artifacts.download_artifacts(f"{first.model_uri}/python_model.pkl", dst_path=str(tmp_path / "pkl"))
    served = cloudpickle.loads(Path(pickled).read_bytes())
    assert {k: served.params[k] for k in ("inference", "lungseg", "validate")} == {
        k: settings[k] for k in ("inference", "lungseg", "validate")}  # evaluated and served alike
    params_file = tmp_path / "params.yaml"
    from deepsc.config import dump_resolved

    dump_resolved(settings, params_file)
    model_dir, eval_dir = tmp_path / "model", tmp_path / "evaluation"
    code = main(["--params", str(params_file), "register", "--model", str(model_dir), "--eval", str(eval_dir), "--out", str(tmp_path / "registry")])
    assert code == 0
    out = capsys.readouterr().out
    assert f"already registered as {model_name} v{first.version} -> champion" in out
    decision = json.loads((tmp_path / "registry" / "decision.json").read_text())
    assert (decision["version"], decision["alias"], decision["created"]) == (first.version, CHAMPION, False)
