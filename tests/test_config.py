"""params.yaml profiles and overrides are checked; the CLI finds its command and its settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from deepsc.config import apply_overrides, load_params
from deepsc.errors import ConfigError

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def with_profile(tmp_path: Path, profile) -> Path:
    raw = yaml.safe_load(PARAMS.read_text())
    raw["profiles"]["mine"] = profile
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("name", ["default", "paper", "long", "tiny"])
def test_every_shipped_profile_loads(name):
    assert load_params(PARAMS, name)["profile"] == name


@pytest.mark.parametrize(
    ("profile", "message"),
    [
        ({"trian": {"seed": 1}}, "'trian', which is no setting"),
        ({"train": {"pretrain_seg": {"epoch": 1}}}, "'train.pretrain_seg.epoch', which is no setting"),
        ({"loss": 5}, "setting 'loss' is a section, got a number"),
        ({"train": {"seed": "1234"}}, "setting 'train.seed' is a number"),
        (["x"], "must map settings to values"),
    ],
)
def test_a_profile_with_a_typo_or_a_wrong_kind_is_refused(tmp_path, profile, message):
    with pytest.raises(ConfigError, match=message):
        load_params(with_profile(tmp_path, profile), "mine")


def test_a_profile_may_add_ablation_variants_and_unset_a_list(tmp_path):
    profile = {"ablation": {"variants": {"lambda_ta_3": {"loss.lambda_ta": 3.0}}}, "preprocess": {"target_spacing_mm": None}}
    params = load_params(with_profile(tmp_path, profile), "mine")
    assert params["ablation"]["variants"]["lambda_ta_3"] == {"loss.lambda_ta": 3.0}
    assert params["preprocess"]["target_spacing_mm"] is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"train.pretrain_seg.epochs": "ten"}, "is a number \\(30\\), got text"),
        ({"loss.lambda_ta": [1, 2]}, "got a list"),
        ({"analysis": None}, "is a section, got null"),
        ({"model.inception": 0}, "is true/false"),
        ({"profile": "paper"}, "cannot be overridden"),
        ({"loss.lambda_tas": 1.0}, "unknown setting"),
    ],
)
def test_overrides_of_another_kind_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(load_params(PARAMS, "default"), overrides)


def test_overrides_of_the_same_kind_apply():
    params = apply_overrides(load_params(PARAMS, "default"), {
        "loss.lambda_ta": 1,  # an int for a float setting
        "train.cpu_threads": 1,  # a null (unset) setting takes a value
        "lungseg.lungmask_weights": "/models/r231.pth",
        "preprocess.target_spacing_mm": None,  # null unsets a list
    })
    assert params["loss"]["lambda_ta"] == 1 and params["train"]["cpu_threads"] == 1


def test_the_command_is_not_taken_from_a_profile_name(tmp_path, monkeypatch, capsys):
    from deepsc.cli import _command_in, main

    assert _command_in(["--profile", "split", "analyze", "--manifest", "m.csv"]) == "analyze"
    assert _command_in(["--params", "p.yaml", "--debug", "split"]) == "split"
    assert _command_in(["--profile", "tiny"]) is None
    monkeypatch.chdir(tmp_path)  # no params.yaml here: a profile cannot be chosen
    assert main(["--profile", "tiny", "analyze", "--manifest", "m.csv"]) == 2
    assert "--profile tiny needs a settings file" in capsys.readouterr().err


def test_bad_analysis_settings_are_settings_errors():
    from deepsc.data.analysis import analysis_settings

    assert analysis_settings({}) == (15.0, 5)
    with pytest.raises(ConfigError, match="min_component_voxels"):
        analysis_settings({"analysis": {"min_component_voxels": "five"}})
    with pytest.raises(ConfigError, match="plr_sigma_mm"):
        analysis_settings({"analysis": {"plr_sigma_mm": -1}})


def test_submit_checks_the_overrides_before_sending_them(capsys):
    from deepsc.cli import main

    cluster = ["--repo-url", "https://git.example.org/deepsc.git", "--mlflow-uri", "http://mlflow.deepsc:5000"]
    code = main(["pipeline", "submit", "--dry-run", "--host", "http://127.0.0.1:9", "--set", "train.pretrain_seg.epochs=1O",
                 *cluster])
    assert code == 2 and "train.pretrain_seg.epochs" in capsys.readouterr().err
    assert main(["pipeline", "submit", "--dry-run", "--host", "http://127.0.0.1:9", "--set", "trian.epochs=1", *cluster]) == 2
