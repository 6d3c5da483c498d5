"""Predictor: every kind of model folder rebuilds and covers the whole scan.

The helpers here (`tiny_settings`, `make_model_dir`) are imported by test_evaluate.py,
test_diagnose.py and test_serving.py: a randomly initialised tiny model folder in the layout of
``deepsc train`` (config.json + model.pt state dict).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from deepsc import CLASSES
from deepsc.errors import ConfigError, InputError

PATCH = (8, 32, 32)
CLS_SHAPE = (16, 32, 32)


def tiny_settings() -> dict:
    """The params sections a tiny model folder records (model, preprocess, baselines)."""
    return {
        "model": {"inception": True, "cross_stitch": True, "cross_stitch_init": [0.9, 0.1], "seg_widths": [8, 8, 8, 8],
                  "cls_widths": [8, 8, 8], "seg_eta": [0.25, 0.25, 0.5, 1.0], "norm_groups": 2},
        "preprocess": {"hu_window": [-1400, 200], "target_spacing_mm": [8.0, 6.0, 6.0], "cls_slices": CLS_SHAPE[0],
                       "cls_size": list(CLS_SHAPE[1:]), "patch_size": list(PATCH)},
        "baselines": {"unet_channels": [4, 8], "classifier": "resnet18", "batch_size": 2, "epochs": 1, "lr": 1e-3},
    }


def make_model_dir(folder: Path, kind: str = "deepsc", task: str = "joint", seed: int = 0, settings: dict | None = None,
                   run_id: str | None = None) -> Path:
    """A randomly initialised model folder as ``deepsc train`` / ``deepsc baseline`` write it."""
    import torch

    settings = settings or tiny_settings()
    torch.manual_seed(seed)
    if kind == "deepsc":
        from deepsc.model.network import DeepSC, ModelConfig

        model = DeepSC(ModelConfig.from_params(settings))
        stage = {"joint": "finetune", "seg": "pretrain-seg", "cls": "pretrain-cls"}[task]
    else:
        from deepsc.train.baselines import build_baseline

        model = build_baseline(kind, settings)
        task, stage = ("seg" if kind == "unet" else "cls"), f"baseline-{kind}"
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), folder / "model.pt")
    config = {"kind": kind, "stage": stage, "task": task, "classes": list(CLASSES), "params": settings}
    if kind == "classifier":
        config["architecture"] = settings["baselines"]["classifier"]
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "run.json").write_text(json.dumps({"run_id": run_id, "run_name": stage, "stage": stage}))
    return folder


def scan(shape=(20, 40, 36), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 1, shape).astype(np.float16), rng.uniform(0, 1, CLS_SHAPE).astype(np.float16)


@pytest.mark.parametrize(
    ("kind", "task", "has_mask", "has_class", "has_evidence"),
    [
        ("deepsc", "joint", True, True, True),
        ("deepsc", "seg", True, False, False),
        ("deepsc", "cls", False, True, True),
        ("unet", "seg", True, False, False),
        ("classifier", "cls", False, True, False),
    ],
)
def test_every_model_kind_predicts_the_whole_scan(tmp_path, kind, task, has_mask, has_class, has_evidence):
    from deepsc.inference import Predictor

    predictor = Predictor.from_dir(make_model_dir(tmp_path / "m", kind, task), device="cpu")
    assert not predictor.model.training
    image, cls = scan()  # 20 x 40 x 36 is no multiple of the 8 x 32 x 32 patch: edge patches are padded
    result = predictor.predict_case(image, cls)

    assert (result.lesion_prob is not None) == has_mask
    assert (result.class_prob is not None) == has_class
    assert (result.evidence is not None) == has_evidence
    if has_mask:
        assert result.lesion_prob.shape == image.shape and result.lesion_prob.dtype == np.float32
        assert 0.0 <= result.lesion_prob.min() and result.lesion_prob.max() <= 1.0
        assert result.seconds_seg > 0
    if has_class:
        assert result.class_prob.shape == (3,)
        assert result.class_prob.sum() == pytest.approx(1.0, abs=1e-5)
        assert result.predicted_class == int(np.argmax(result.class_prob))
        assert result.seconds_cls > 0
    else:
        assert result.predicted_class is None
    if has_evidence:
        assert len(result.evidence) == 3
        for vmap in result.evidence:
            assert vmap.shape == image.shape
            assert 0.0 <= vmap.min() and vmap.max() <= 1.0 + 1e-6


def test_patches_are_independent_and_all_of_them_are_used(tmp_path):
    """A seg-only model is local: on the plain grid, changing one patch changes the output only in that patch."""
    from deepsc.inference import Predictor

    predictor = Predictor.from_dir(make_model_dir(tmp_path / "m", "deepsc", "seg"), device="cpu", mirror=False, overlap=0.0)
    image, cls = scan((16, 64, 40))
    before = predictor.predict_case(image, cls).lesion_prob
    changed = image.copy()
    changed[8:, 32:, 32:] = 0.9  # the last (padded) patch along every axis
    after = predictor.predict_case(changed, cls).lesion_prob
    differs = np.abs(after - before) > 1e-6
    assert differs[8:, 32:, 32:].any()
    assert not differs[:8].any() and not differs[:, :32].any() and not differs[:, :, :32].any()


@pytest.mark.parametrize(("kind", "task"), [("deepsc", "joint"), ("unet", "seg"), ("classifier", "cls")])
def test_mirroring_averages_the_scan_and_its_mirror_image(tmp_path, kind, task):
    from deepsc.inference import Predictor

    folder = make_model_dir(tmp_path / "m", kind, task)
    once = Predictor.from_dir(folder, device="cpu", mirror=False)
    image, cls = scan()
    plain = once.predict_case(image, cls)
    flipped = once.predict_case(image[..., ::-1], cls[..., ::-1])
    both = Predictor.from_dir(folder, device="cpu").predict_case(image, cls)  # mirror is the default
    if plain.lesion_prob is not None:
        np.testing.assert_allclose(both.lesion_prob, (plain.lesion_prob + flipped.lesion_prob[..., ::-1]) / 2, atol=1e-6)
        assert not np.allclose(plain.lesion_prob, flipped.lesion_prob[..., ::-1], atol=1e-4)  # the mirror pass is real
    if plain.class_prob is not None:
        np.testing.assert_allclose(both.class_prob, (plain.class_prob + flipped.class_prob) / 2, atol=1e-6)
    if plain.evidence is not None:  # evidence of the pass that agrees with the averaged decision
        source = plain.evidence if plain.predicted_class == both.predicted_class else [v[..., ::-1] for v in flipped.evidence]
        for got, want in zip(both.evidence, source):
            np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.mark.parametrize(("kind", "task"), [("deepsc", "joint"), ("deepsc", "cls")])
def test_evidence_of_a_given_class(tmp_path, kind, task):
    """``evidence_class`` picks whose CAMs the maps show; the predicted class is the default."""
    from deepsc.inference import Predictor

    predictor = Predictor.from_dir(make_model_dir(tmp_path / "m", kind, task), device="cpu", mirror=False)
    image, cls = (a.astype(np.float32) for a in scan())  # as predict_case hands them on
    default = predictor._predict_once(image, cls, True)
    same = predictor._predict_once(image, cls, True, evidence_class=default.predicted_class)
    other = predictor._predict_once(image, cls, True, evidence_class=(default.predicted_class + 1) % len(CLASSES))
    for got, want in zip(same.evidence, default.evidence):
        np.testing.assert_array_equal(got, want)
    assert not all(np.allclose(a, b) for a, b in zip(other.evidence, default.evidence))
    np.testing.assert_array_equal(other.class_prob, default.class_prob)


def test_mirrored_evidence_explains_the_reported_class_when_neither_pass_chose_it(tmp_path, monkeypatch):
    """(.45, .15, .40) and (.15, .45, .40) average to class 2: the maps are made for class 2."""
    from deepsc.inference import CasePrediction, Predictor

    predictor = Predictor.from_dir(make_model_dir(tmp_path / "m"), device="cpu")
    passes = iter([[0.45, 0.15, 0.40], [0.15, 0.45, 0.40]])
    calls = []

    def one_pass(image, cls_arr, with_evidence, evidence_class=None):
        calls.append(evidence_class)
        probs = np.array(next(passes) if evidence_class is None else [0.45, 0.15, 0.40], np.float32)
        shown = int(np.argmax(probs)) if evidence_class is None else evidence_class
        evidence = [np.full(image.shape, float(shown), np.float32)] * 3
        return CasePrediction(np.zeros(image.shape, np.float32), probs, evidence, 1.0, 1.0)

    monkeypatch.setattr(predictor, "_predict_once", one_pass)
    image, cls = scan()
    result = predictor.predict_case(image, cls)
    assert result.predicted_class == 2 and calls == [None, None, 2]
    assert all(np.all(v == 2.0) for v in result.evidence)


def test_lesion_margin_setting_is_checked():
    from deepsc.errors import ConfigError
    from deepsc.inference import lesion_margin_setting

    assert lesion_margin_setting({}) == 0.0
    assert lesion_margin_setting({"inference": {"lesion_margin_mm": 7}}) == 7.0
    for bad in (-1.0, True, "5", 1000):
        with pytest.raises(ConfigError, match="lesion_margin_mm"):
            lesion_margin_setting({"inference": {"lesion_margin_mm": bad}})


def test_mirror_setting_is_checked():
    from deepsc.errors import ConfigError
    from deepsc.inference import mirror_setting

    assert mirror_setting({}) is True
    assert mirror_setting({"inference": {"mirror": False}}) is False
    with pytest.raises(ConfigError, match="inference.mirror"):
        mirror_setting({"inference": {"mirror": "yes"}})


def test_overlap_setting_is_checked(tmp_path):
    from deepsc.errors import ConfigError
    from deepsc.inference import Predictor, overlap_setting

    assert overlap_setting({}) == 0.5
    assert overlap_setting({"inference": {"overlap": 0}}) == 0.0
    for bad in (-0.1, 0.95, True, "half"):
        with pytest.raises(ConfigError, match="inference.overlap"):
            overlap_setting({"inference": {"overlap": bad}})
    with pytest.raises(ConfigError, match="inference.overlap"):
        Predictor.from_dir(make_model_dir(tmp_path / "m"), device="cpu", overlap=1.0)


def test_joint_prediction_is_deterministic_in_eval_mode(tmp_path):
    from deepsc.inference import Predictor

    predictor = Predictor.from_dir(make_model_dir(tmp_path / "m"), device="cpu")
    image, cls = scan()
    first, second = predictor.predict_case(image, cls), predictor.predict_case(image, cls)
    np.testing.assert_array_equal(first.lesion_prob, second.lesion_prob)
    np.testing.assert_array_equal(first.class_prob, second.class_prob)
    assert first.seconds_seg == first.seconds_cls  # one joint pass


def test_bad_inputs_and_folders_are_clear_errors(tmp_path):
    from deepsc.inference import Predictor

    with pytest.raises(InputError, match="not a trained model folder"):
        Predictor.from_dir(tmp_path)
    folder = make_model_dir(tmp_path / "m")
    predictor = Predictor.from_dir(folder, device="cpu")
    image, cls = scan()
    with pytest.raises(InputError, match="classification input has shape"):
        predictor.predict_case(image, cls[:8])
    with pytest.raises(InputError, match="3D"):
        predictor.predict_case(image[0], cls)
    bad = image.astype(np.float32)
    bad[0, 0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        predictor.predict_case(bad, cls)
    (folder / "model.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="cannot"):
        Predictor.from_dir(folder, device="cpu")


def test_a_stage_1_classifier_that_needs_lesion_maps_is_refused_alone(tmp_path):
    """pretrain-cls learnt from whole-scan lesion maps: alone it would read an empty map."""
    from deepsc.inference import Predictor

    folder = make_model_dir(tmp_path / "m", "deepsc", "cls")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "image_only": False}))
    with pytest.raises(ConfigError, match="needs a lesion map"):
        Predictor.from_dir(folder, device="cpu")
    (folder / "config.json").write_text(json.dumps({**config, "image_only": True}))  # w/o Seg: image only
    assert Predictor.from_dir(folder, device="cpu").task == "cls"


@pytest.mark.parametrize(("text", "problem"), [("{not json", "not valid JSON"), ('{"stage": "finetune"}', "no 'params'"),
                                                ("[1, 2]", "no 'params'")])
def test_a_broken_config_json_names_the_file_and_the_problem(tmp_path, text, problem):
    from deepsc.inference import Predictor
    from deepsc.train.stages import load_model

    folder = make_model_dir(tmp_path / "m")
    (folder / "config.json").write_text(text)
    for load in (load_model, Predictor.from_dir):
        with pytest.raises(InputError, match=problem) as caught:
            load(folder)
        assert "config.json" in str(caught.value)
