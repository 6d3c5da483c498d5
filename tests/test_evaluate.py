"""deepsc evaluate on a tiny synthetic cohort preprocessed here in the documented format."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from deepsc import CLASSES
from deepsc.errors import InputError
from test_inference import make_model_dir, tiny_settings

N_PER_CLASS = 2


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """(params, preprocessed, split): 2 scans per class, all held out, original masks in a manifest."""
    from deepsc.config import apply_overrides, load_params
    from deepsc.data.preprocess import preprocess_cohort
    from deepsc.data.synth import synthesize_cohort

    root = tmp_path_factory.mktemp("cohort")
    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml", "default")
    params = apply_overrides(params, {
        "synth.n_covid": N_PER_CLASS, "synth.n_cap": N_PER_CLASS, "synth.n_normal": N_PER_CLASS,
        "synth.inplane_size": 64, "synth.inplane_spacing_mm": [5.0, 5.0], "synth.slice_spacing_mm": [8.0, 8.0],
        "paths.manifest": str(root / "data" / "manifest.csv"),
        "mlflow.tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
    })
    params["preprocess"] = tiny_settings()["preprocess"]
    manifest = synthesize_cohort(root / "data", params)
    preprocess_cohort(manifest, root / "preprocessed", params)
    frame = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    split = root / "split.csv"
    pd.DataFrame({"case_id": frame["case_id"], "label": frame["label"], "subset": "test", "fold": -1}).to_csv(split, index=False)
    return params, root / "preprocessed", split


class PerfectPredictor:
    """Returns each scan's own preprocessed lesion mask as probability and evidence, and its label."""

    name, source, kind, task = "oracle", "test", "deepsc", "joint"
    has_segmentation = has_classification = has_evidence = True

    def __init__(self, preprocessed: Path):
        self.preprocessed = preprocessed
        index = pd.read_csv(preprocessed / "index.csv", dtype=str)
        self.labels = dict(zip(index["case_id"], index["label"]))

    def predict_case(self, image, cls, with_evidence=True, case_id="scan"):
        from deepsc.inference import CasePrediction

        lesion = np.load(self.preprocessed / "cases" / case_id / "lesion.npy").astype(np.float32)
        probs = np.full(3, 0.1, dtype=np.float32)
        probs[CLASSES.index(self.labels[case_id])] = 0.8
        return CasePrediction(lesion, probs, [lesion, lesion, lesion], 0.01, 0.01)


def test_evaluate_writes_every_output_with_sane_values(cohort, tmp_path):
    from deepsc.evaluate import evaluate_model

    params, preprocessed, split = cohort
    out = tmp_path / "evaluation"
    metrics = evaluate_model(make_model_dir(tmp_path / "finetune"), preprocessed, split, out, params, progress=False)

    assert metrics["seg_geometry"] == "original"
    for name in ("metrics.json", "per_case.csv", "roc.csv", "confusion.csv", "confusion_matrix.csv", "report.md", "report.html",
                 "figures/confusion.png", *(f"figures/roc_{c}.png" for c in CLASSES)):
        assert (out / name).is_file(), name
    stored = json.loads((out / "metrics.json").read_text())
    n = 3 * N_PER_CLASS
    assert stored["n_test"] == n and stored["n_seg"] == 2 * N_PER_CLASS, "Table II segmentation: COVID-19 and CAP scans"
    assert 0.0 <= stored["normal_false_positive_rate"] <= 1.0 and stored["normal_false_positive_ml_mean"] >= 0.0
    for key in ("dsc_mean", "dsc_std", "sensitivity_mean", "specificity_mean", "nsd_mean", "rmsd_mm_mean", "accuracy",
                "f1_macro", "auc_macro", "sensitivity_macro", "specificity_macro", "seconds_per_scan_seg",
                "seconds_per_scan_cls", "evidence_peak_in_lesion", "evidence_lesion_overlap", "n_test"):
        assert key in stored, key
    for key in ("dsc_mean", "specificity_mean", "nsd_mean", "accuracy", "f1_macro", "auc_macro"):
        assert stored[key] is not None and 0.0 <= stored[key] <= 1.0, key
    assert stored["seconds_per_scan_seg"] > 0 and stored["seconds_per_scan_cls"] == pytest.approx(stored["seconds_per_scan_seg"])

    confusion = pd.read_csv(out / "confusion.csv")
    assert list(confusion.columns) == ["actual", "predicted"] and len(confusion) == n
    assert set(confusion["actual"]) == set(CLASSES) and set(confusion["predicted"]) <= set(CLASSES)
    matrix = pd.read_csv(out / "confusion_matrix.csv", index_col=0)
    assert list(matrix.index) == list(CLASSES) and list(matrix.columns) == list(CLASSES)
    assert matrix.to_numpy().sum() == n and (matrix.sum(axis=1) == N_PER_CLASS).all()
    roc = pd.read_csv(out / "roc.csv")
    assert list(roc.columns) == ["class", "fpr", "tpr", "threshold"] and set(roc["class"]) == set(CLASSES)
    assert roc["fpr"].between(0, 1).all() and roc["tpr"].between(0, 1).all()
    per_case = pd.read_csv(out / "per_case.csv")
    assert len(per_case) == n and per_case["dsc"].between(0, 1).all()
    report = (out / "report.md").read_text()
    assert "Table II" in report and "original scan grid" in report
    assert (out / "figures" / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "data:image/png;base64," in (out / "report.html").read_text()


def test_a_perfect_model_scores_perfectly(cohort, tmp_path, monkeypatch):
    """Wiring check: the true masks fed back score DSC 1 on the preprocessed grid and nearly 1 on
    the original one (the resampling there and back costs a little at the edges)."""
    from deepsc import evaluate

    params, preprocessed, split = cohort
    cases = evaluate.test_cases(preprocessed, split)
    oracle = PerfectPredictor(preprocessed)
    on_preprocessed = evaluate.evaluate_predictor(oracle, cases, params, None, "oracle", tmp_path, progress=False)
    assert on_preprocessed.metrics["dsc_mean"] > 0.95  # lung restriction and speck removal of the postprocessing
    # sub-voxel (the grid's smallest spacing is several mm): only the postprocessing's edges differ
    assert on_preprocessed.metrics["rmsd_mm_mean"] < 0.5 * min(params["preprocess"]["target_spacing_mm"])
    assert on_preprocessed.metrics["accuracy"] == 1.0 and on_preprocessed.metrics["auc_macro"] == 1.0
    assert on_preprocessed.metrics["evidence_n"] == 2 * N_PER_CLASS
    assert on_preprocessed.metrics["evidence_peak_in_lesion"] == 1.0
    assert on_preprocessed.metrics["evidence_lesion_overlap"] == pytest.approx(1.0)
    assert on_preprocessed.metrics["evidence_chance_overlap"] < 0.5

    on_original = evaluate.evaluate_predictor(oracle, cases, params, evaluate.OriginalMasks(Path(params["paths"]["manifest"]), cases),
                                              "oracle", tmp_path, progress=False)
    assert 0.7 < on_original.metrics["dsc_mean"] < 1.0
    assert on_original.metrics["specificity_mean"] > 0.99


class ShellPredictor(PerfectPredictor):
    """Calls lesion everything within 12 mm outside each scan's segmented lungs, nothing inside."""

    def predict_case(self, image, cls, with_evidence=True, case_id="scan"):
        from deepsc.data.preprocess import grow_mask, load_case
        from deepsc.inference import CasePrediction

        case = load_case(self.preprocessed / "cases" / case_id)
        lung = np.asarray(case.lung) > 0
        shell = (grow_mask(lung, case.meta["spacing_mm"], 12.0) & ~lung).astype(np.float32)
        return CasePrediction(shell, np.array([0.1, 0.1, 0.8], np.float32), None, 0.01, 0.01)


def test_reported_lesions_stay_within_the_lesion_margin_of_the_lungs(cohort, tmp_path):
    """inference.lesion_margin_mm: 0 (default) keeps nothing outside the segmented lungs; a
    wider margin lets the shell through (false positives on the normal scans)."""
    from deepsc import evaluate
    from deepsc.config import apply_overrides

    params, preprocessed, split = cohort
    cases = evaluate.test_cases(preprocessed, split)
    shell = ShellPredictor(preprocessed)
    inside = evaluate.evaluate_predictor(shell, cases, params, None, "shell", tmp_path, progress=False)
    assert inside.metrics["normal_false_positive_rate"] == 0.0 and inside.metrics["normal_false_positive_ml_mean"] == 0.0
    wide = apply_overrides(params, {"inference.lesion_margin_mm": 15.0})
    outside = evaluate.evaluate_predictor(shell, cases, wide, None, "shell", tmp_path, progress=False)
    assert outside.metrics["normal_false_positive_rate"] == 1.0 and outside.metrics["normal_false_positive_ml_mean"] > 1.0


def test_compare_puts_deepsc_ablations_and_baselines_side_by_side(cohort, tmp_path):
    from deepsc.evaluate import evaluate_model

    params, preprocessed, split = cohort
    ablation, baselines = tmp_path / "ablation", tmp_path / "baselines"
    make_model_dir(ablation / "seg_only", "deepsc", "seg")
    make_model_dir(ablation / "_pretrain" / "pretrain-seg-abc", "deepsc", "seg")  # cache: skipped
    make_model_dir(baselines / "unet", "unet")
    make_model_dir(baselines / "classifier", "classifier")
    out = tmp_path / "evaluation"
    evaluate_model(make_model_dir(tmp_path / "finetune"), preprocessed, split, out, params, [ablation, baselines], progress=False)

    table = pd.read_csv(out / "comparison.csv")
    assert list(table["model"]) == ["finetune", "ablation/seg_only", "baselines/classifier", "baselines/unet"]
    by_model = table.set_index("model")
    assert np.isnan(by_model.loc["baselines/unet", "accuracy"]) and np.isfinite(by_model.loc["baselines/unet", "dsc_mean"])
    assert np.isnan(by_model.loc["baselines/classifier", "dsc_mean"]) and np.isfinite(by_model.loc["baselines/classifier", "accuracy"])
    markdown = (out / "comparison.md").read_text()
    assert "ablation/seg_only" in markdown and "n/a" in markdown
    assert (out / "compare" / "baselines__unet" / "metrics.json").is_file()


def test_missing_manifest_falls_back_to_the_preprocessed_grid(cohort, tmp_path):
    from deepsc.config import apply_overrides
    from deepsc.evaluate import evaluate_model

    params, preprocessed, split = cohort
    params = apply_overrides(params, {"paths.manifest": str(tmp_path / "absent.csv")})
    metrics = evaluate_model(make_model_dir(tmp_path / "m", "deepsc", "seg"), preprocessed, split, tmp_path / "out", params,
                             progress=False)
    assert metrics["seg_geometry"] == "preprocessed" and "accuracy" not in metrics
    assert "preprocessed grid" in (tmp_path / "out" / "report.md").read_text()
    assert not (tmp_path / "out" / "confusion.csv").exists()  # no classification output


@pytest.mark.slow  # MLflow's sqlite store takes seconds to create
def test_evaluation_is_logged_to_the_models_run(cohort, tmp_path, monkeypatch):
    import mlflow

    from deepsc import tracking
    from deepsc.evaluate import evaluate_model

    params, preprocessed, split = cohort
    monkeypatch.setenv("MLFLOW_TRACKING_URI", params["mlflow"]["tracking_uri"])  # the environment wins in deepsc.tracking
    with tracking.start_run(params, "finetune", "finetune") as run:
        pass
    model = make_model_dir(tmp_path / "m", run_id=run.info.run_id)
    evaluate_model(model, preprocessed, split, tmp_path / "out", params, progress=False)
    logged = mlflow.MlflowClient().get_run(run.info.run_id)
    assert "test_dsc_mean" in logged.data.metrics and "test_accuracy" in logged.data.metrics
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "evaluation")}
    assert "evaluation/metrics.json" in artifacts

    # another cohort under its own prefix leaves the held-out numbers alone
    held_out = logged.data.metrics["test_accuracy"]
    evaluate_model(model, preprocessed, split, tmp_path / "other", params, progress=False, mlflow_prefix="hospital_b")
    logged = mlflow.MlflowClient().get_run(run.info.run_id)
    assert "hospital_b_accuracy" in logged.data.metrics and logged.data.metrics["test_accuracy"] == held_out
    assert {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)} >= {"evaluation", "evaluation_hospital_b"}


def test_bad_cohorts_are_clear_errors(cohort, tmp_path):
    from deepsc.evaluate import discover_models, test_cases

    _, preprocessed, split = cohort
    bad_split = tmp_path / "split.csv"
    bad_split.write_text("case_id,label,subset,fold\nghost,covid,test,-1\n")
    with pytest.raises(InputError, match="not in"):
        test_cases(preprocessed, bad_split)
    with pytest.raises(InputError, match="no model folder"):
        discover_models([tmp_path])


def test_cli_evaluates_and_prints_the_headline(cohort, tmp_path, capsys):
    from deepsc.cli import main
    from deepsc.config import dump_resolved

    params, preprocessed, split = cohort
    settings = dump_resolved(params, tmp_path / "params.yaml")
    model = make_model_dir(tmp_path / "m", "classifier")
    code = main(["--params", str(settings), "evaluate", "--model", str(model), "--preprocessed", str(preprocessed),
                 "--split", str(split), "--out", str(tmp_path / "out"), "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0 and "accuracy=" in out and "dsc_mean=n/a" in out
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["n_test"] == 3 * N_PER_CLASS


def test_table_ii_says_when_rmsd_averages_fewer_scans():
    """RMSD is undefined when exactly one mask is empty: the table says over how many scans it is a mean."""
    from deepsc.evaluate import ModelEvaluation, table_ii_rows

    seg = {f"{k}_{s}": 0.5 for k in ("dsc", "sensitivity", "specificity", "nsd") for s in ("mean", "std")}

    def rmsd_cell(excluded: int) -> str:
        metrics = {**seg, "rmsd_mm_mean": 12.0, "rmsd_mm_std": 3.0, "rmsd_mm_excluded": excluded, "n_seg": 16}
        rows, header = table_ii_rows([ModelEvaluation("m", Path("m"), "deepsc", None, metrics, {}, None, "original")])
        return rows[0][header.index("RMSD (mm)")]

    assert rmsd_cell(0) == "12.00 (3.00)"
    assert rmsd_cell(3) == "12.00 (3.00) [13 of 16]"


def test_an_empty_reference_is_left_out_not_a_perfect_score():
    """A COVID-19 / CAP scan whose lesion mask is empty has no Dice, NSD or RMSD (MONAI: NaN)."""
    from deepsc.evaluate import _aggregate

    class SegOnly:
        has_segmentation, has_classification, has_evidence = True, False, False

    seg = {"dsc": 0.5, "sensitivity": 0.5, "specificity": 0.9, "nsd": 0.5, "rmsd_mm": 4.0, "seconds_seg": 1.0}
    empty = {**seg, "dsc": 1.0, "nsd": 1.0, "rmsd_mm": 0.0, "pred_volume_ml": 0.0, "truth_volume_ml": 0.0}
    per_case = pd.DataFrame([
        {"case_id": "a", "label": "covid", "has_mask": True, **seg, "pred_volume_ml": 2.0, "truth_volume_ml": 3.0},
        {"case_id": "b", "label": "cap", "has_mask": True, **empty},  # predicted nothing on an empty mask
    ])
    metrics, _, _ = _aggregate(per_case, SegOnly())
    assert metrics["n_seg"] == 1 and metrics["n_seg_empty_reference"] == 1
    assert metrics["dsc_mean"] == 0.5 and metrics["rmsd_mm_mean"] == 4.0


def test_a_second_evaluation_leaves_nothing_of_the_first(cohort, tmp_path):
    from deepsc.evaluate import evaluate_model

    params, preprocessed, split = cohort
    ablation, out = tmp_path / "ablation", tmp_path / "evaluation"
    make_model_dir(ablation / "seg_only", "deepsc", "seg")
    model = make_model_dir(tmp_path / "finetune")
    evaluate_model(model, preprocessed, split, out, params, [ablation], progress=False)
    assert (out / "comparison.md").is_file() and (out / "compare").is_dir()
    (out / "notes.txt").write_text("mine")
    evaluate_model(model, preprocessed, split, out, params, progress=False)  # no compare this time
    assert not (out / "comparison.md").exists() and not (out / "comparison.csv").exists() and not (out / "compare").exists()
    assert (out / "metrics.json").is_file() and (out / "notes.txt").read_text() == "mine"  # only its own files go


def test_a_model_trained_on_other_data_gets_no_held_out_metrics(cohort, tmp_path, caplog):
    from deepsc.evaluate import evaluate_model
    from deepsc.train.stages import data_key

    params, preprocessed, split = cohort

    def model_with(key: str, folder: str) -> Path:
        model = make_model_dir(tmp_path / folder)
        config = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps({**config, "data_key": key}))
        return model

    evaluate_model(model_with(data_key(preprocessed, split), "same"), preprocessed, split, tmp_path / "ok", params, progress=False)
    assert "trained on other data" not in (tmp_path / "ok" / "report.md").read_text()
    other = model_with("0123456789abcdef", "other")
    with pytest.raises(InputError, match="trained on other data"):
        evaluate_model(other, preprocessed, split, tmp_path / "held_out", params, progress=False)
    assert not (tmp_path / "held_out" / "metrics.json").exists()
    evaluate_model(other, preprocessed, split, tmp_path / "elsewhere", params, progress=False, mlflow_prefix="")
    assert "trained on other data" in (tmp_path / "elsewhere" / "report.md").read_text()
    assert "trained on other data" in caplog.text


def test_a_manifest_of_another_cohort_is_not_used_for_the_reference(cohort, tmp_path, caplog):
    from deepsc.evaluate import original_masks, test_cases

    params, preprocessed, split = cohort
    table = pd.read_csv(params["paths"]["manifest"], dtype=str, keep_default_na=False)
    table["image_path"] = [str(Path(params["paths"]["manifest"]).parent / p) for p in table["image_path"]]
    table["mask_path"] = [str(Path(params["paths"]["manifest"]).parent / p) if p else "" for p in table["mask_path"]]
    assert original_masks(Path(params["paths"]["manifest"]), test_cases(preprocessed, split)) is not None
    covid = table["label"] == "covid"
    table.loc[covid, "label"] = "cap"  # same ids (synthetic ids repeat across cohorts), other cohort
    table.to_csv(tmp_path / "manifest.csv", index=False)
    assert original_masks(tmp_path / "manifest.csv", test_cases(preprocessed, split)) is None
    assert "not the cohort that was preprocessed" in caplog.text
