"""Ablation grid: variants are params.yaml keys (so DVC experiments can run them too), stage-1
models are shared when the variant does not touch them, one parent MLflow run holds them all."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deepsc.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("profile", ["default", "paper", "long"])
def test_every_variant_key_exists_in_params_yaml(profile):
    """`dvc exp run -S key=value` needs every override key in params.yaml (apply_overrides refuses unknown ones)."""
    from deepsc.config import load_params
    from deepsc.train.ablation import ablation_variants, variant_params

    params = load_params(REPO / "params.yaml", profile)
    variants = ablation_variants(params)
    assert {"no_inception", "no_cross_stitch", "lambda_ta_0", "seg_only", "cls_only"} <= set(variants)
    for name, overrides in variants.items():
        changed = variant_params(params, overrides)
        for key, value in overrides.items():
            section, leaf = key.split(".")
            assert changed[section][leaf] == value, name


def test_dvc_queue_commands_set_params_keys(params):
    from deepsc.train.ablation import dvc_queue_commands

    lines = dvc_queue_commands(params)
    assert len(lines) == len(params["ablation"]["variants"])
    assert "dvc exp run --queue -n lambda_ta_0 -S loss.lambda_ta=0.0" in lines
    assert "dvc exp run --queue -n no_inception -S model.inception=false" in lines
    assert "dvc exp run --queue -n seg_only -S train.task=seg" in lines


def test_stage1_settings_key_follows_what_stage1_depends_on(params):
    from deepsc.config import apply_overrides
    from deepsc.train.stages import settings_key

    def same(stage, overrides):
        return settings_key(stage, params) == settings_key(stage, apply_overrides(params, overrides))

    for stage in ("pretrain-seg", "pretrain-cls"):
        assert same(stage, {"loss.lambda_ta": 0.0}) and same(stage, {"model.cross_stitch": False})
        assert same(stage, {"train.task": "seg"}) and same(stage, {"loss.ta_scales": "single"})
        assert not same(stage, {"model.inception": False})
    assert not same("pretrain-seg", {"loss.focal_gamma": 1.0}) and same("pretrain-cls", {"loss.focal_gamma": 1.0})
    # w/o Seg pre-trains its own, image-only classifier; its segmentation path is DeepSC's
    assert not same("pretrain-cls", {"train.task": "cls"}) and same("pretrain-seg", {"train.task": "cls"})
    assert not same("finetune", {"loss.lambda_ta": 0.0}) and not same("finetune", {"train.task": "cls"})


def test_unknown_variant_is_refused(tmp_path, params):
    from deepsc.train.ablation import run_ablation_grid

    with pytest.raises(ConfigError, match="no_such_variant"):
        run_ablation_grid(tmp_path, tmp_path / "split.csv", tmp_path / "out", params, ["no_such_variant"])


def test_epochs_scale_applies_to_finetuning(params):
    from deepsc.config import apply_overrides
    from deepsc.train.ablation import variant_params

    scaled = variant_params(apply_overrides(params, {"ablation.epochs_scale": 0.5}), {"loss.lambda_ta": 1.0})
    assert scaled["train"]["finetune"]["epochs"] == max(1, round(params["train"]["finetune"]["epochs"] * 0.5))
    assert scaled["train"]["pretrain_seg"] == params["train"]["pretrain_seg"]


@pytest.mark.slow  # six short trainings on the tiny cohort
def test_grid_shares_stage1_models_and_nests_runs(tmp_path):
    import mlflow
    from test_train import tiny_params, write_tiny_cohort

    from deepsc.tracking import tracking_uri
    from deepsc.train.ablation import PRETRAIN_CACHE, run_ablation_grid
    from deepsc.train.stages import train_stage

    pre, split = write_tiny_cohort(tmp_path)
    params = tiny_params(tmp_path)
    init = {task: train_stage(f"pretrain-{task}", pre, split, tmp_path / task, params, progress=False) for task in ("seg", "cls")}

    stale = tmp_path / "ablation" / PRETRAIN_CACHE / "pretrain-cls-0123456789ab"
    stale.mkdir(parents=True)
    summary = run_ablation_grid(pre, split, tmp_path / "ablation", params, ["lambda_ta_0", "no_inception"], init, progress=False)
    assert not stale.exists()
    rows = summary.set_index("variant")
    assert rows.loc["lambda_ta_0", "seg_init"] == str(init["seg"]) and rows.loc["lambda_ta_0", "cls_init"] == str(init["cls"])
    assert PRETRAIN_CACHE in rows.loc["no_inception", "seg_init"] and PRETRAIN_CACHE in rows.loc["no_inception", "cls_init"]
    for variant in ("lambda_ta_0", "no_inception"):
        assert (tmp_path / "ablation" / variant / "model.pt").is_file()
    assert (tmp_path / "ablation" / "summary.csv").is_file() and "final_loss" in summary.columns

    client = mlflow.MlflowClient(tracking_uri(params))
    parents = {client.get_run(run_id).data.tags.get("mlflow.parentRunId") for run_id in summary["run_id"]}
    assert len(parents) == 1 and None not in parents
    cache_run = json.loads((Path(rows.loc["no_inception", "seg_init"]) / "run.json").read_text())["run_id"]
    assert client.get_run(cache_run).data.tags["mlflow.parentRunId"] in parents

    again = run_ablation_grid(pre, split, tmp_path / "ablation", params, ["lambda_ta_0", "no_inception"], init, progress=False)
    assert list(again["run_id"]) == list(summary["run_id"])  # finished variants are not trained again


def test_grid_pretrains_a_classifier_on_each_variants_own_segmentation(tmp_path):
    """train.pretrain_cls.lesion_context: predicted: the given stage-1 classifier serves the
    variants that share its segmentation; a variant with its own stage-1 segmentation (plain
    conv) gets a classifier pre-trained on that one's maps, cached under its weights' hash."""
    from test_train import _cls_context, tiny_params, write_tiny_cohort

    from deepsc.train.ablation import PRETRAIN_CACHE, run_ablation_grid, stale_pretrain_folders
    from deepsc.train.stages import read_config, train_stage, weights_sha256

    pre, split = write_tiny_cohort(tmp_path)
    params = _cls_context(tiny_params(tmp_path), "predicted")
    seg = train_stage("pretrain-seg", pre, split, tmp_path / "seg", params, progress=False)
    init = {"seg": seg, "cls": train_stage("pretrain-cls", pre, split, tmp_path / "cls", params, {"seg": seg}, progress=False)}
    rows = run_ablation_grid(pre, split, tmp_path / "ablation", params, ["lambda_ta_0", "no_inception"], init,
                             progress=False).set_index("variant")
    assert rows.loc["lambda_ta_0", "cls_init"] == str(init["cls"])
    own_seg, own_cls = Path(rows.loc["no_inception", "seg_init"]), Path(rows.loc["no_inception", "cls_init"])
    assert PRETRAIN_CACHE in str(own_seg) and own_cls.name.endswith(f"-from-{weights_sha256({'s': own_seg})['s'][:12]}")
    assert read_config(own_cls)["init_sha256"] == weights_sha256({"seg": own_seg})
    assert stale_pretrain_folders(tmp_path / "ablation", params) == []


def test_grid_trains_a_variant_again_when_its_stage1_weights_or_code_change(tmp_path, monkeypatch):
    """The grid folder persists between `dvc repro` runs: a finished variant is re-used only
    while the stage-1 weights it started from and the training code are the same."""
    import torch
    from test_train import tiny_params, write_tiny_cohort

    from deepsc.train import stages
    from deepsc.train.ablation import run_ablation_grid

    pre, split = write_tiny_cohort(tmp_path)
    params = tiny_params(tmp_path)
    init = {task: stages.train_stage(f"pretrain-{task}", pre, split, tmp_path / task, params, progress=False) for task in ("seg", "cls")}
    run_id = lambda: run_ablation_grid(pre, split, tmp_path / "ablation", params, ["lambda_ta_0"], init,  # noqa: E731
                                       progress=False)["run_id"].iloc[0]
    first = run_id()
    assert run_id() == first
    weights = init["seg"] / "model.pt"  # stage 1 re-trained (e.g. after a fix): same settings, new weights
    torch.save({k: v + 0.01 if v.is_floating_point() else v for k, v in torch.load(weights, weights_only=True).items()}, weights)
    second = run_id()
    assert second != first
    monkeypatch.setattr(stages, "code_key", lambda stage: "edited")
    assert run_id() != second


def test_stage1_caches_of_settings_no_variant_uses_are_pruned(tmp_path, params):
    from deepsc.train.ablation import PRETRAIN_CACHE, stale_pretrain_folders, variant_params
    from deepsc.train.stages import settings_key

    cache = tmp_path / PRETRAIN_CACHE
    no_inception = variant_params(params, {"model.inception": False})
    used = cache / f"pretrain-seg-{settings_key('pretrain-seg', no_inception)[:12]}"
    stale = cache / "pretrain-seg-0123456789ab"  # an older setting's stage 1
    other = cache / "notes"  # not a cache folder: left alone
    for folder in (used, stale, other):
        folder.mkdir(parents=True)
    assert stale_pretrain_folders(tmp_path, params) == [stale]
    assert stale_pretrain_folders(tmp_path / "empty", params) == []


def test_speed_only_settings_do_not_invalidate_cached_models(params):
    from deepsc.config import apply_overrides
    from deepsc.train.stages import STAGES, settings_key

    faster = apply_overrides(params, {"train.cpu_threads": 1, "train.num_workers": 2})
    assert all(settings_key(stage, params) == settings_key(stage, faster) for stage in STAGES)
