"""`deepsc evaluate`: Table II metrics of a trained model on the held-out test scans.

Every test scan of the split runs through :class:`deepsc.inference.Predictor` at full scan size
with the pipeline's inference settings (``inference.mirror``, ``inference.overlap``: sliding
windows over the whole scan). Then, per scan:

* **segmentation** (Table II: COVID-19 and CAP scans with a known lesion mask; on normal scans,
  whose mask is all zeros, only the false-positive rate and volume are reported): the
  probability is mapped back onto the ORIGINAL scan grid (:func:`deepsc.data.preprocess.
  to_original_grid`, linear) and turned into a mask by the rule of ``deepsc diagnose``
  (:func:`deepsc.diagnose.lesion_mask_from_probability`: >= 0.5, inside the segmented lungs
  grown by ``inference.lesion_margin_mm``, specks dropped). The lungs are the preprocessed lung
  mask mapped back to the original grid, not ``deepsc diagnose``'s segmentation on that grid
  (on synth_0007 1.5 % of the lung voxels differ, 5 mm vs 4.4 mm slices; more on
  thin-slice scans). The mask is compared with the original
  lesion mask of the manifest (``paths.manifest``; read with :func:`deepsc.data.io.read_mask`
  against the scan geometry in meta.json) using the scan's real voxel spacing
  (:func:`deepsc.metrics.segmentation_metrics`: DSC, sensitivity, specificity, NSD at
  ``evaluate.nsd_tolerance_mm``, RMSD in mm). When the manifest or a mask is not available,
  every scan is measured on the preprocessed grid (``lesion.npy``, the resampled spacing)
  instead; ``report.md`` and the return value say which (``seg_geometry``: ``original`` |
  ``preprocessed``).
* **classification**: the class probabilities (:func:`deepsc.metrics.classification_metrics`).
* **faithfulness of the explanation** (correctly classified COVID-19 and CAP scans with a
  non-empty lesion mask; preprocessed grid, inside the lung mask): the evidence map
  ``E = mean(V_1, V_2, V_3)``; ``evidence_peak_in_lesion`` = share of those scans whose maximum of
  E lies in a lesion; ``evidence_lesion_overlap`` = mean share of the evidence mass
  ``sum(E * lesion) / sum(E * lung)`` (to compare with ``evidence_chance_overlap``, the mean
  lesion share of the lungs: what a uniform map would get); ``evidence_lesion_dice`` = mean Dice
  of ``E >= 0.5`` with the lesion mask.
* **time**: seconds of the model per scan for each task (a joint model does both in one pass).

Outputs in ``out_dir``: ``metrics.json`` (flat, for ``dvc metrics show``; undefined values are
null), ``per_case.csv``, ``roc.csv`` (class, fpr, tpr, threshold), ``confusion.csv`` (actual,
predicted per scan, for DVC's confusion template), ``confusion_matrix.csv`` (rows actual, columns
predicted), ``report.md``, ``report.html``, ``figures/roc_<class>.png``, ``figures/confusion.png``.
With ``compare`` folders, every model folder found in them (the folder itself or its direct
sub-folders; names starting with ``_`` or ``.`` such as the ablation's ``_pretrain`` cache are
skipped) is evaluated the same way into ``compare/<folder>__<model>/`` and the side-by-side
``comparison.csv`` / ``comparison.md`` are written (the paper's Table II, Fig. 8 and Fig. 9).

The files an earlier evaluation left in ``out_dir`` (a comparison it had and this one lacks
included) are removed first, so the folder never mixes two evaluations.

A model whose ``config.json`` records other training data (``data_key``: the preprocessed index
and the split) than the cohort evaluated is refused for the held-out metrics (prefix ``test``,
which the registry's promotion gate reads): its test scans may have been its training scans.
Under another prefix (another cohort) it is scored with a warning, also in ``report.md``.

Metrics and files are logged to the evaluated model's MLflow run (``run.json``), metrics
prefixed ``test_`` so they never mix with the training curves; a model without a run (or an
unreachable tracking server) only gets a warning.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deepsc import CLASSES
from deepsc.errors import ConfigError, InputError

log = logging.getLogger(__name__)

# the files one evaluation writes into its folder (besides figures/ and compare/)
OUTPUT_FILES = ("metrics.json", "per_case.csv", "roc.csv", "confusion.csv", "confusion_matrix.csv", "report.md",
                "report.html", "comparison.csv", "comparison.md")

SEG_METRICS = ("dsc", "sensitivity", "specificity", "nsd", "rmsd_mm")
CLS_METRICS = ("sensitivity", "specificity", "f1", "auc")
EVIDENCE_KEYS = ("evidence_peak_in_lesion", "evidence_lesion_overlap", "evidence_lesion_dice", "evidence_chance_overlap")
LESION_CLASSES = ("covid", "cap")


@dataclasses.dataclass(frozen=True)
class TestCase:
    """One held-out scan of the preprocessed cohort."""

    case_id: str
    label: str
    has_mask: bool
    case_dir: Path

    @property
    def label_index(self) -> int:
        return CLASSES.index(self.label)


@dataclasses.dataclass
class ModelEvaluation:
    """Everything measured for one model: per-scan rows, flat metrics, ROC and confusion."""

    name: str
    model_dir: Path
    predictor_name: str
    per_case: Any  # pandas.DataFrame
    metrics: dict[str, float | int | None]
    roc: dict[str, dict[str, list[float]]]
    confusion: list[list[int]] | None
    seg_geometry: str
    other_training_data: bool = False  # config.json names other training data than this cohort and split


# ----------------------------------------------------------------------------- the cohort


def test_cases(preprocessed: Path, split: Path) -> list[TestCase]:
    """The ``test`` scans of the split, located in the preprocessed cohort (``index.csv``).

    Raises:
        InputError: missing files or columns, a test scan absent from the index, label mismatch.
    """
    index = _read_csv(Path(preprocessed) / "index.csv", ("case_id", "label", "has_mask", "case_dir"))
    table = _read_csv(Path(split), ("case_id", "label", "subset"))
    chosen = table[table["subset"] == "test"]
    if chosen.empty:
        raise InputError(str(split), "has no test scans (subset == test)")
    rows = index.set_index("case_id", drop=False)
    cases = []
    for case_id, label in zip(chosen["case_id"], chosen["label"]):
        if case_id not in rows.index:
            raise InputError(case_id, f"is a test scan in {split} but not in {preprocessed}/index.csv; re-run preprocess")
        row = rows.loc[case_id]
        if str(row["label"]) != str(label) or label not in CLASSES:
            raise InputError(case_id, f"label {label!r} in the split but {row['label']!r} in the preprocessed index")
        case_dir = Path(str(row["case_dir"]))
        case_dir = case_dir if case_dir.is_absolute() else Path(preprocessed) / case_dir
        cases.append(TestCase(case_id, label, str(row["has_mask"]).strip().lower() in ("1", "true", "yes"), case_dir))
    return cases


def _read_csv(path: Path, columns: Sequence[str]) -> Any:
    import pandas as pd

    if not path.is_file():
        raise InputError(path.name, f"{path} does not exist")
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    absent = [c for c in columns if c not in frame.columns]
    if absent:
        raise InputError(str(path), f"lacks the column(s) {', '.join(absent)}")
    return frame


class OriginalMasks:
    """Reference lesion masks on the ORIGINAL scan grids, from the cohort manifest.

    Args:
        manifest: ``data/manifest.csv`` (paths resolved by :func:`deepsc.data.manifest.load_manifest`).
        cases: the test scans; every one with a known mask must be resolvable.

    Raises:
        InputError: the manifest cannot be read, or a test scan with a known lesion mask has no
            mask file in it (the caller falls back to the preprocessed grid).
    """

    def __init__(self, manifest: Path, cases: Sequence[TestCase]) -> None:
        from deepsc.data.manifest import load_manifest

        table = load_manifest(manifest, check_files=False).set_index("case_id", drop=False)
        self.mask_paths: dict[str, str] = {}
        for case in (c for c in cases if c.has_mask):
            if case.case_id not in table.index:
                raise InputError(case.case_id, f"not in the manifest {manifest}")
            if table.loc[case.case_id, "label"] != case.label:  # synthetic ids repeat across cohorts
                raise InputError(case.case_id, f"is {table.loc[case.case_id, 'label']} in the manifest {manifest} but "
                                               f"{case.label} in the preprocessed cohort: not the cohort that was preprocessed")
            path = str(table.loc[case.case_id, "mask_path"] or "")
            if not path and case.label != "normal":
                raise InputError(case.case_id, "has no lesion mask file in the manifest")
            if path and not Path(path).exists():
                raise InputError(case.case_id, f"lesion mask {path} does not exist")
            self.mask_paths[case.case_id] = path

    def mask(self, case: TestCase, meta: Mapping[str, Any]) -> np.ndarray:
        """uint8 ``(Z, Y, X)`` on the original grid (all zeros for a normal scan without a file)."""
        from deepsc.data.io import read_mask
        from deepsc.data.volume import CTVolume

        shape = tuple(int(v) for v in meta["original_shape"])
        path = self.mask_paths[case.case_id]
        if not path:
            return np.zeros(shape, dtype=np.uint8)
        # a zero-strided stand-in: read_mask only needs the reference's shape and affine
        reference = CTVolume(np.broadcast_to(np.zeros((), np.uint8), shape), np.asarray(meta["original_affine"]), case.case_id)
        return read_mask(path, reference, case.case_id, binarize=True)


# ----------------------------------------------------------------------------- one model


def _percent(value: Any) -> str:
    return f"{100 * value:.0f} %" if _finite(value) else "n/a"


def _number(value: Any) -> str:
    return f"{value:.2f}" if _finite(value) else "n/a"


def evaluate_predictor(predictor: Any, cases: Sequence[TestCase], params: Mapping[str, Any], masks: OriginalMasks | None,
                       name: str, model_dir: Path, progress: bool = True) -> ModelEvaluation:
    """Run one model over the test scans and compute every metric (see the module docstring)."""
    import pandas as pd
    from tqdm import tqdm

    from deepsc.inference import lesion_margin_setting

    tolerance = float(params.get("evaluate", {}).get("nsd_tolerance_mm", 3.0))
    margin = lesion_margin_setting(params)
    rows = [_evaluate_case(predictor, case, masks, tolerance, margin)
            for case in tqdm(cases, desc=f"evaluate {name}", unit="scan", disable=not progress, leave=False)]
    per_case = pd.DataFrame(rows)
    metrics, roc, confusion = _aggregate(per_case, predictor)
    return ModelEvaluation(name, Path(model_dir), predictor.name, per_case, metrics, roc, confusion,
                           "original" if masks is not None else "preprocessed")


def _evaluate_case(predictor: Any, case: TestCase, masks: OriginalMasks | None, tolerance_mm: float,
                   margin_mm: float = 0.0) -> dict[str, Any]:
    from deepsc.data.preprocess import load_case

    data = load_case(case.case_dir, mmap=False)
    prediction = predictor.predict_case(data.image, data.cls, with_evidence=predictor.has_evidence, case_id=case.case_id)
    row: dict[str, Any] = {"case_id": case.case_id, "label": case.label, "has_mask": case.has_mask,
                           "seconds_seg": prediction.seconds_seg, "seconds_cls": prediction.seconds_cls}
    if prediction.class_prob is not None:
        row.update({f"prob_{c}": float(p) for c, p in zip(CLASSES, prediction.class_prob)})
        row["predicted"] = CLASSES[prediction.predicted_class]
        row["correct"] = row["predicted"] == case.label
    if prediction.lesion_prob is not None and case.has_mask:
        row.update(_segmentation_row(prediction.lesion_prob, data, case, masks, tolerance_mm, margin_mm))
    if prediction.evidence is not None and row.get("correct") and case.label in LESION_CLASSES and case.has_mask:
        row.update(evidence_faithfulness(prediction.evidence, np.asarray(data.lesion), np.asarray(data.lung)))
    return row


def _segmentation_row(prob: np.ndarray, data: Any, case: TestCase, masks: OriginalMasks | None,
                      tolerance_mm: float, margin_mm: float = 0.0) -> dict[str, float]:
    from deepsc.data.preprocess import to_original_grid
    from deepsc.diagnose import lesion_mask_from_probability
    from deepsc.metrics import segmentation_metrics

    lung = np.asarray(data.lung)
    if masks is None:
        pred = lesion_mask_from_probability(prob, lung, data.meta["spacing_mm"], margin_mm)
        return segmentation_metrics(pred, np.asarray(data.lesion), data.meta["spacing_mm"], tolerance_mm, case.case_id)
    lung_original = to_original_grid(lung.astype(np.float32), data.meta, order=1) >= 0.5
    pred = lesion_mask_from_probability(to_original_grid(prob, data.meta, order=1), lung_original,
                                        data.meta["original_spacing_mm"], margin_mm)
    truth = masks.mask(case, data.meta)
    return segmentation_metrics(pred, truth, data.meta["original_spacing_mm"], tolerance_mm, case.case_id)


def evidence_faithfulness(evidence: Sequence[np.ndarray], lesion: np.ndarray, lung: np.ndarray) -> dict[str, float]:
    """How well the evidence of one scan points at its lesions (all arrays ``(Z, Y, X)``).

    ``E`` is the mean of the maps, restricted to the lung (the only region the model sees).
    Returns NaN everywhere when the lesion mask is empty or E is zero in the lungs.
    """
    lesion, lung = lesion > 0, (lung > 0) | (lesion > 0)
    combined = np.mean(np.stack([np.asarray(v, dtype=np.float32) for v in evidence]), axis=0) * lung
    mass = float(combined.sum())
    if not lesion.any() or mass <= 0.0:
        return {key: math.nan for key in EVIDENCE_KEYS}
    peak = np.unravel_index(int(np.argmax(combined)), combined.shape)
    hot = combined >= 0.5
    overlap = 2.0 * float(np.logical_and(hot, lesion).sum()) / (float(hot.sum()) + float(lesion.sum()))
    return {
        "evidence_peak_in_lesion": float(lesion[peak]),
        "evidence_lesion_overlap": float(combined[lesion].sum()) / mass,
        "evidence_lesion_dice": overlap,
        "evidence_chance_overlap": float(lesion.sum()) / float(lung.sum()),
    }


def _aggregate(per_case: Any, predictor: Any) -> tuple[dict[str, Any], dict[str, Any], list[list[int]] | None]:
    """Flat metrics.json values, ROC curves and the confusion matrix of one model."""
    from deepsc.metrics import classification_metrics, summarize

    metrics: dict[str, Any] = {"n_test": int(len(per_case))}
    roc: dict[str, Any] = {}
    confusion = None
    if predictor.has_segmentation:
        # Table II segmentation: scans with lesions (COVID-19, CAP), as in the paper and the
        # benchmark of Ma et al.; on normal scans the only question is false positives.
        seg = per_case[per_case["has_mask"] & per_case["label"].isin(LESION_CLASSES)]
        # an empty reference on a COVID-19 / CAP scan: Dice, NSD and RMSD are undefined (MONAI,
        # DeepMind: NaN), not a perfect score for predicting nothing; left out and counted
        empty_reference = seg["truth_volume_ml"] <= 0 if len(seg) else seg["has_mask"]
        metrics["n_seg_empty_reference"] = int(empty_reference.sum())
        seg = seg[~empty_reference]
        normal = per_case[per_case["has_mask"] & (per_case["label"] == "normal")]
        metrics["normal_false_positive_rate"] = float((normal["pred_volume_ml"] > 0).mean()) if len(normal) else math.nan
        metrics["normal_false_positive_ml_mean"] = float(normal["pred_volume_ml"].mean()) if len(normal) else math.nan
        metrics["n_seg"] = int(len(seg))
        summary = summarize(seg, list(SEG_METRICS)) if len(seg) else {}
        for metric in SEG_METRICS:
            metrics[f"{metric}_mean"] = summary.get(f"{metric}_mean", math.nan)
            metrics[f"{metric}_std"] = summary.get(f"{metric}_std", math.nan)
        metrics["rmsd_mm_excluded"] = summary.get("rmsd_mm_excluded", 0)
        metrics["seconds_per_scan_seg"] = float(per_case["seconds_seg"].mean())
    if predictor.has_classification:
        probs = per_case[[f"prob_{c}" for c in CLASSES]].to_numpy()
        result = classification_metrics(per_case["label"].tolist(), probs)
        metrics["accuracy"] = result["accuracy"]
        for metric in CLS_METRICS:
            metrics[f"{metric}_macro"] = result[f"{metric}_macro"]
            values = [result[f"{metric}_{c}"] for c in CLASSES]
            finite = [v for v in values if math.isfinite(v)]
            metrics[f"{metric}_macro_std"] = float(np.std(finite, ddof=1)) if len(finite) > 1 else math.nan
            metrics.update({f"{metric}_{c}": v for c, v in zip(CLASSES, values)})
        metrics["f1_macro"] = result["f1_macro"]
        metrics["auc_macro"] = result["auc_macro"]
        metrics["seconds_per_scan_cls"] = float(per_case["seconds_cls"].mean())
        roc, confusion = result["roc"], result["confusion_matrix"]
    if predictor.has_evidence:
        judged = per_case.dropna(subset=[EVIDENCE_KEYS[0]]) if EVIDENCE_KEYS[0] in per_case else per_case.iloc[:0]
        metrics["evidence_n"] = int(len(judged))
        for key in EVIDENCE_KEYS:
            metrics[key] = float(judged[key].mean()) if len(judged) else math.nan
    return metrics, roc, confusion


# ----------------------------------------------------------------------------- the stage


def evaluate_model(model_dir: Path, preprocessed: Path, split: Path, out_dir: Path, params: Mapping[str, Any],
                   compare: Sequence[Path] = (), *, manifest: Path | None = None, progress: bool = True,
                   mlflow_prefix: str = "test") -> dict[str, Any]:
    """Evaluate a model folder on the held-out scans and write the outputs listed above.

    Args:
        model_dir: trained model folder (``config.json`` + ``model.pt``).
        preprocessed: the preprocessed cohort (``index.csv``, ``cases/``).
        split: ``split.csv``; its ``test`` rows are evaluated.
        out_dir: output folder (created).
        params: merged settings (``evaluate``, ``inference``, ``paths.manifest``, ``mlflow``).
        compare: folders holding more model folders (ablations, baselines) to compare with.
        manifest: the cohort manifest whose original lesion masks are the reference (default:
            ``paths.manifest``); it must be the cohort that was preprocessed.
        progress: tqdm bars.
        mlflow_prefix: the metrics are logged to each model's run as ``<prefix>_<metric>`` and the
            files as the artifact folder ``evaluation`` (prefix ``test``) or
            ``evaluation_<prefix>``: another cohort gets its own prefix instead of overwriting
            the held-out numbers (which the registry's promotion gate reads). Empty: not logged.

    Returns:
        The flat metrics of ``model_dir`` (as in metrics.json) plus ``seg_geometry``.
    """
    from deepsc.inference import Predictor, mirror_setting, overlap_setting

    out_dir = Path(out_dir)
    cases = test_cases(Path(preprocessed), Path(split))
    models = [(Path(model_dir).name, Path(model_dir)), *discover_models(compare, exclude=Path(model_dir))]
    other_data = trained_elsewhere(models, Path(preprocessed), Path(split), held_out=mlflow_prefix == "test")
    masks = original_masks(manifest or Path((params.get("paths") or {}).get("manifest", "data/manifest.csv")), cases)
    chunk = int(params.get("evaluate", {}).get("sw_batch_size", 4))
    mirror, overlap = mirror_setting(params), overlap_setting(params)
    remove_previous_outputs(out_dir)
    evaluations = []
    for name, folder in models:
        predictor = Predictor.from_dir(folder, chunk_size=chunk, mirror=mirror, overlap=overlap)
        evaluation = evaluate_predictor(predictor, cases, params, masks, name, folder, progress)
        evaluations.append(dataclasses.replace(evaluation, other_training_data=name in other_data))
        if len(evaluations) == 1:
            write_evaluation(evaluations[0], out_dir)
    main, others = evaluations[0], evaluations[1:]
    for other in others:
        write_evaluation(other, out_dir / "compare" / other.name.replace("/", "__"), figures=False)
    if others:
        write_comparison([main, *others], out_dir)
    logged = [main, *others] if mlflow_prefix else []
    for evaluation in logged:
        log_to_mlflow(evaluation, out_dir if evaluation is main else out_dir / "compare" / evaluation.name.replace("/", "__"),
                      params, mlflow_prefix)
    return {**main.metrics, "seg_geometry": main.seg_geometry}


def trained_elsewhere(models: Sequence[tuple[str, Path]], preprocessed: Path, split: Path, held_out: bool) -> set[str]:
    """Names of the models whose ``config.json`` records other training data than ``preprocessed``
    + ``split`` (a model without ``data_key`` is not judged).

    Raises:
        InputError: such a model while ``held_out`` (its "held-out" scans may be training scans).
    """
    from deepsc.train.stages import data_key

    cohort = data_key(preprocessed, split)
    other = set()
    for name, folder in models:
        try:
            trained_on = json.loads((Path(folder) / "config.json").read_text()).get("data_key")
        except (OSError, ValueError, AttributeError):
            trained_on = None  # Predictor.from_dir reports an unreadable config
        if not trained_on or trained_on == cohort:
            continue
        problem = (f"was trained on other data (data key {str(trained_on)[:12]}) than the preprocessed cohort and split "
                   f"evaluated ({cohort[:12]})")
        if held_out:
            raise InputError(name, f"{problem}: its test scans may be its training scans, so these are no held-out "
                                   "metrics. Score another cohort with --mlflow-prefix NAME --out DIR")
        log.warning("%s %s: if they share scans, its metrics are optimistic", name, problem)
        other.add(name)
    return other


def remove_previous_outputs(out_dir: Path) -> None:
    """Delete the files of an earlier evaluation in ``out_dir`` (only the names it writes)."""
    import shutil

    for name in OUTPUT_FILES:
        (out_dir / name).unlink(missing_ok=True)
    for name in ("figures", "compare"):
        shutil.rmtree(out_dir / name, ignore_errors=True)


def original_masks(manifest: Path, cases: Sequence[TestCase]) -> OriginalMasks | None:
    """Original-grid reference masks when the manifest has them all, else None (with a warning)."""
    try:
        return OriginalMasks(manifest, cases)
    except InputError as exc:
        log.warning("segmentation metrics fall back to the preprocessed grid: %s", exc)
        return None


def discover_models(folders: Sequence[Path], exclude: Path | None = None) -> list[tuple[str, Path]]:
    """``(name, folder)`` of every model folder in ``folders`` (itself or direct sub-folders).

    Raises:
        InputError: a compare folder that does not exist or holds no model folder.
    """
    found: list[tuple[str, Path]] = []
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise InputError(str(folder), "compare folder does not exist")
        candidates = [folder] if _is_model_dir(folder) else sorted(
            child for child in folder.iterdir() if not child.name.startswith(("_", ".")) and _is_model_dir(child))
        if not candidates:
            raise InputError(str(folder), "holds no model folder (config.json + model.pt)")
        for candidate in candidates:
            if exclude is not None and candidate.resolve() == Path(exclude).resolve():
                continue
            found.append((f"{folder.name}/{candidate.name}" if candidate != folder else candidate.name, candidate))
    return found


def _is_model_dir(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.pt").is_file()


# ----------------------------------------------------------------------------- outputs


def write_evaluation(evaluation: ModelEvaluation, out_dir: Path, figures: bool = True) -> None:
    """metrics.json, per_case.csv and (with classification) roc/confusion files, report, figures."""
    import pandas as pd

    from deepsc import report

    out_dir.mkdir(parents=True, exist_ok=True)
    _write_text(out_dir / "metrics.json", json.dumps(_json_safe(evaluation.metrics), indent=2, sort_keys=True) + "\n")
    _write_text(out_dir / "per_case.csv", evaluation.per_case.to_csv(index=False))
    pngs: dict[str, bytes] = {}
    if evaluation.confusion is not None:
        roc_rows = [{"class": c, "fpr": f, "tpr": t, "threshold": th} for c, curve in evaluation.roc.items()
                    for f, t, th in zip(curve["fpr"], curve["tpr"], curve["thresholds"])]
        _write_text(out_dir / "roc.csv", pd.DataFrame(roc_rows, columns=["class", "fpr", "tpr", "threshold"]).to_csv(index=False))
        pairs = evaluation.per_case[["label", "predicted"]].rename(columns={"label": "actual"})
        _write_text(out_dir / "confusion.csv", pairs.to_csv(index=False))
        matrix = pd.DataFrame(evaluation.confusion, index=pd.Index(CLASSES, name="actual"), columns=list(CLASSES))
        _write_text(out_dir / "confusion_matrix.csv", matrix.to_csv())
        if figures:
            for c, curve in evaluation.roc.items():
                auc = evaluation.metrics.get(f"auc_{c}", math.nan)
                pngs[f"ROC {c} vs rest"] = report.roc_figure(c, curve["fpr"], curve["tpr"], auc)
                _write_bytes(out_dir / "figures" / f"roc_{c}.png", pngs[f"ROC {c} vs rest"])
            pngs["Confusion matrix"] = report.confusion_figure(evaluation.confusion, CLASSES)
            _write_bytes(out_dir / "figures" / "confusion.png", pngs["Confusion matrix"])
    markdown, html = evaluation_report(evaluation, pngs)
    _write_text(out_dir / "report.md", markdown)
    _write_text(out_dir / "report.html", html)


def table_ii_rows(evaluations: Sequence[ModelEvaluation]) -> tuple[list[list[Any]], list[str]]:
    """Table II: one row per model, mean (std) in percent (RMSD in mm), n/a where not produced."""
    from deepsc.metrics import format_mean_std

    header = ["model", "DSC", "Sens. (seg)", "Spec. (seg)", "NSD", "RMSD (mm)", "s/scan seg",
              "Accuracy", "Sens. (cls)", "Spec. (cls)", "F1", "AUC", "s/scan cls", "evidence peak in lesion"]
    rows = []
    for ev in evaluations:
        m = ev.metrics
        seg = [format_mean_std(m.get(f"{k}_mean", math.nan), m.get(f"{k}_std", math.nan), 1.0 if k == "rmsd_mm" else 100.0,
                               2 if k == "rmsd_mm" else 1) if f"{k}_mean" in m else "n/a" for k in SEG_METRICS]
        excluded = int(m.get("rmsd_mm_excluded") or 0)
        if excluded and "n_seg" in m:  # RMSD is a mean over fewer scans than the other columns: say so
            seg[SEG_METRICS.index("rmsd_mm")] += f" [{int(m['n_seg']) - excluded} of {int(m['n_seg'])}]"
        cls = [f"{100 * m['accuracy']:.1f}" if "accuracy" in m else "n/a"]
        cls += [format_mean_std(m[f"{k}_macro"], m.get(f"{k}_macro_std", math.nan)) if f"{k}_macro" in m else "n/a"
                for k in ("sensitivity", "specificity", "f1", "auc")]
        rows.append([ev.name, *seg, _seconds(m.get("seconds_per_scan_seg")), *cls, _seconds(m.get("seconds_per_scan_cls")),
                     f"{100 * m['evidence_peak_in_lesion']:.0f} %" if _finite(m.get("evidence_peak_in_lesion")) else "n/a"])
    return rows, header


def evaluation_report(evaluation: ModelEvaluation, pngs: Mapping[str, bytes]) -> tuple[str, str]:
    """(report.md, report.html) of one model."""
    from deepsc import report

    rows, header = table_ii_rows([evaluation])
    geometry = ("original scan grid, real voxel spacing (masks from the manifest)" if evaluation.seg_geometry == "original"
                else "preprocessed grid and its resampled spacing (the manifest's original masks were not available)")
    m = evaluation.metrics
    notes = [
        ("Model", f"{evaluation.predictor_name} from {evaluation.model_dir}; {m['n_test']} test scans of the split."
                  + (" It was trained on other data than this cohort and split: if they share scans, these metrics are "
                     "optimistic." if evaluation.other_training_data else "")),
        ("Segmentation", f"Computed on the {geometry}; {m.get('n_seg', 0)} COVID-19 / CAP scans with a lesion mask"
                         + (f" ({m['n_seg_empty_reference']} more whose mask is empty are left out: Dice, NSD and RMSD "
                            "are undefined there)" if m.get("n_seg_empty_reference") else "") + ". "
                         "Metrics are mean (standard deviation) over scans in percent, RMSD in mm; RMSD is undefined (left "
                         f"out) when exactly one mask is empty ({m.get('rmsd_mm_excluded', 0)} scans). Normal scans: "
                         f"{_percent(m.get('normal_false_positive_rate'))} with any predicted lesion, "
                         f"{_number(m.get('normal_false_positive_ml_mean'))} mL on average."),
        ("Classification", "Accuracy over scans; sensitivity, specificity, F1 and one-vs-rest AUC are macro means over the "
                           "three classes (standard deviation over the classes)."),
        ("Explanation", _evidence_text(m)),
    ]
    markdown = [f"# Evaluation: {evaluation.name}", ""]
    for heading, text in notes:
        markdown += [f"**{heading}.** {text}", ""]
    markdown += ["## Table II", "", report.markdown_table(rows, header), ""]
    per_class, class_header = _per_class_rows(m), ["class", "sensitivity", "specificity", "F1", "AUC"]
    if per_class:
        markdown += ["## Per class", "", report.markdown_table(per_class, class_header), ""]
    tables = {"Table II": (rows, header)}
    if per_class:
        tables["Per class"] = (per_class, class_header)
    html = report.evaluation_html(f"Evaluation: {evaluation.name}", notes, tables, pngs)
    return "\n".join(markdown), html


def write_comparison(evaluations: Sequence[ModelEvaluation], out_dir: Path) -> None:
    """comparison.csv (raw numbers) and comparison.md (Table II layout) of several models."""
    import pandas as pd

    from deepsc import report

    records = [{"model": ev.name, "folder": str(ev.model_dir), "description": ev.predictor_name,
                **{k: v for k, v in ev.metrics.items()}} for ev in evaluations]
    _write_text(out_dir / "comparison.csv", pd.DataFrame(records).to_csv(index=False))
    rows, header = table_ii_rows(evaluations)
    text = ["# DeepSC vs ablations and baselines (the split's test scans)", "",
            f"Segmentation on the {evaluations[0].seg_geometry} grid, over the COVID-19 / CAP scans with a lesion mask; "
            "mean (std) in percent, RMSD in mm; Spec. (seg) counts every voxel of that grid, air included. RMSD is "
            "undefined when exactly one mask is empty: [k of n] after it means it averages only k of the n scans. n/a: "
            "the model does not produce that output (single-task models and baselines).", "",
            report.markdown_table(rows, header), ""]
    _write_text(out_dir / "comparison.md", "\n".join(text))


def _evidence_text(m: Mapping[str, Any]) -> str:
    if "evidence_n" not in m:
        return "This model has no evidence maps."
    if not m["evidence_n"]:
        return "No correctly classified COVID-19 / CAP test scan with a lesion mask: faithfulness not measured."
    return (f"On {m['evidence_n']} correctly classified COVID-19 / CAP scans the evidence peak lies inside a lesion in "
            f"{100 * m['evidence_peak_in_lesion']:.0f} % of them; {100 * m['evidence_lesion_overlap']:.1f} % of the evidence "
            f"mass in the lungs falls on lesions (a uniform map: {100 * m['evidence_chance_overlap']:.1f} %); Dice of the "
            f"thresholded evidence with the lesions {100 * m['evidence_lesion_dice']:.1f} %.")


def _per_class_rows(m: Mapping[str, Any]) -> list[list[Any]]:
    if "accuracy" not in m:
        return []
    return [[c, *(f"{100 * m[f'{k}_{c}']:.1f}" if _finite(m[f"{k}_{c}"]) else "n/a" for k in CLS_METRICS)] for c in CLASSES]


def _seconds(value: Any) -> str:
    return f"{value:.2f}" if _finite(value) else "n/a"


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _json_safe(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """NaN / inf -> null (strict JSON; ``dvc metrics show`` prints them as '-')."""
    return {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in metrics.items()}


def _write_text(path: Path, text: str) -> None:
    _write_bytes(path, text.encode("utf-8"))


def _write_bytes(path: Path, payload: bytes) -> None:
    from deepsc.data.volume import atomic_write_bytes

    atomic_write_bytes(path, payload)


# ----------------------------------------------------------------------------- MLflow


def log_to_mlflow(evaluation: ModelEvaluation, folder: Path, params: Mapping[str, Any], prefix: str = "test") -> bool:
    """Log the metrics (as ``<prefix>_<metric>``) and ``folder`` to the model's training run.

    Returns False (with a warning) when the model has no run or MLflow cannot be reached.
    """
    run_file = evaluation.model_dir / "run.json"
    try:
        run_id = json.loads(run_file.read_text()).get("run_id") if run_file.is_file() else None
    except (OSError, json.JSONDecodeError):
        run_id = None
    if not run_id:
        log.warning("%s has no MLflow run (run.json): evaluation not logged to MLflow", evaluation.model_dir)
        return False
    from deepsc import tracking

    try:
        tracking.configure(params)
        import mlflow

        with mlflow.start_run(run_id=run_id):
            tracking.log_metrics({f"{prefix}_{k}": v for k, v in evaluation.metrics.items()})
            mlflow.set_tag(f"{prefix}_seg_geometry", evaluation.seg_geometry)
            tracking.log_artifacts(folder, artifact_path="evaluation" if prefix == "test" else f"evaluation_{prefix}")
    except Exception as exc:  # tracking is best effort: the files are the record
        log.warning("could not log the evaluation of %s to MLflow run %s: %s", evaluation.name, run_id, exc)
        return False
    return True


# ----------------------------------------------------------------------------- CLI


def add_cli(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=Path("outputs/models/finetune"), help="trained model folder")
    parser.add_argument("--preprocessed", type=Path, default=Path("outputs/preprocessed"))
    parser.add_argument("--split", type=Path, default=Path("outputs/split.csv"))
    parser.add_argument("--out", type=Path, default=Path("outputs/evaluation"))
    parser.add_argument("--manifest", type=Path, default=None,
                        help="cohort manifest with the original lesion masks (default: paths.manifest)")
    parser.add_argument("--compare", type=Path, nargs="*", default=[],
                        help="folders of more model folders to compare with (e.g. outputs/ablation outputs/baselines)")
    parser.add_argument("--mlflow-prefix", default="test",
                        help="metric prefix in each model's MLflow run (default test: the held-out split); give an "
                             "external cohort its own, e.g. hospital_b; '' = do not log")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run_cli(args: argparse.Namespace, params: Mapping[str, Any]) -> int:
    if not params:
        raise ConfigError("evaluate needs params.yaml (sections evaluate, paths, mlflow)")
    metrics = evaluate_model(args.model, args.preprocessed, args.split, args.out, params, args.compare,
                             manifest=args.manifest, progress=not args.no_progress, mlflow_prefix=args.mlflow_prefix)
    shown = {k: metrics.get(k) for k in ("dsc_mean", "nsd_mean", "rmsd_mm_mean", "accuracy", "f1_macro", "auc_macro")}
    print(" ".join(f"{k}={v:.4f}" if _finite(v) else f"{k}=n/a" for k, v in shown.items()))
    print(f"segmentation measured on the {metrics['seg_geometry']} grid; outputs in {args.out}")
    return 0
