"""Evaluation metrics of Table II: per-scan segmentation metrics, classification metrics, summaries.

Numpy in, plain Python numbers out. Segmentation metrics use the real voxel spacing in mm, in the
``(sz, sy, sx)`` order of :class:`deepsc.data.volume.CTVolume` (the same order as the array axes).

Segmentation (one scan, binary masks ``(Z, Y, X)``):

* ``dsc``: 2 |P n T| / (|P| + |T|).
* ``sensitivity`` TP / (TP + FN) and ``specificity`` TN / (TN + FP) over all voxels of the scan
  (the grid it is given: the original scan, or the lung crop box when evaluation falls back to
  the preprocessed grid). Lesions are ~1 % of a scan, so this sits near 99.8 %; the paper's
  88.7-95.6 % must be taken over a smaller region (not stated) and is not comparable.
* ``nsd``: normalised surface Dice at ``nsd_tolerance_mm`` with surface-element areas (MONAI
  ``compute_surface_dice(use_subvoxels=True)``, the DeepMind implementation used by the COVID-19
  CT benchmark of Ma et al.).
* ``rmsd_mm``: root mean square symmetric surface distance
  ``sqrt((sum_a d(a, B)^2 + sum_b d(b, A)^2) / (|A| + |B|))`` over the surface voxels A of the
  prediction and B of the reference (a voxel of the mask with a 6-neighbour outside it), with
  Euclidean distances in mm.
* ``pred_volume_ml`` and ``truth_volume_ml``.

Empty masks (a scan without lesions in the prediction and / or the reference):

==================  =====  =====  ========  ===========  ===========
case                dsc    nsd    rmsd_mm   sensitivity  specificity
==================  =====  =====  ========  ===========  ===========
both empty          1.0    1.0    0.0       NaN          1.0
only one empty      0.0    0.0    NaN       0 or NaN     from voxels
==================  =====  =====  ========  ===========  ===========

A surface distance to an empty surface does not exist, so RMSD is NaN (not inf) when exactly one
mask is empty; sensitivity is NaN whenever the reference has no lesion voxel. :func:`summarize`
leaves non-finite values out of the mean and counts them in ``<metric>_excluded``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Mapping, Sequence

import numpy as np

from deepsc import CLASSES
from deepsc.errors import InputError

SEGMENTATION_METRICS = ("dsc", "sensitivity", "specificity", "nsd", "rmsd_mm", "pred_volume_ml", "truth_volume_ml")


# ----------------------------------------------------------------------------- segmentation


def segmentation_metrics(
    pred: np.ndarray,
    truth: np.ndarray,
    spacing: Sequence[float],
    nsd_tolerance_mm: float = 3.0,
    case_id: str = "scan",
) -> dict[str, float]:
    """Table II segmentation metrics of one scan.

    Args:
        pred: predicted binary lesion mask ``(Z, Y, X)`` (bool or {0, 1}).
        truth: reference binary lesion mask, same shape.
        spacing: voxel size ``(sz, sy, sx)`` in mm, in the order of the array axes.
        nsd_tolerance_mm: NSD tolerance in mm (3 mm for lesions in Ma et al.).
        case_id: names the scan in error messages.

    Returns:
        ``{"dsc", "sensitivity", "specificity", "nsd", "rmsd_mm", "pred_volume_ml",
        "truth_volume_ml"}`` as floats; the module docstring lists the values on empty masks.

    Raises:
        InputError: shapes differ, masks are not 3D or not binary, bad spacing or tolerance.
    """
    pred_mask = _binary_mask(pred, "prediction", case_id)
    truth_mask = _binary_mask(truth, "reference", case_id)
    if pred_mask.shape != truth_mask.shape:
        raise InputError(case_id, f"prediction shape {pred_mask.shape} differs from the reference {truth_mask.shape}")
    spacing_zyx = _spacing(spacing, case_id)
    if not (math.isfinite(nsd_tolerance_mm) and nsd_tolerance_mm >= 0):
        raise InputError(case_id, f"NSD tolerance must be a finite number of mm >= 0, got {nsd_tolerance_mm}")

    voxel_ml = float(np.prod(spacing_zyx)) / 1000.0
    tp = int(np.count_nonzero(pred_mask & truth_mask))
    n_pred, n_truth = int(np.count_nonzero(pred_mask)), int(np.count_nonzero(truth_mask))
    fp, fn = n_pred - tp, n_truth - tp
    tn = pred_mask.size - tp - fp - fn
    result = {
        "dsc": 1.0 if n_pred + n_truth == 0 else 2.0 * tp / (n_pred + n_truth),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "pred_volume_ml": n_pred * voxel_ml,
        "truth_volume_ml": n_truth * voxel_ml,
    }
    if n_pred == 0 and n_truth == 0:
        result.update(nsd=1.0, rmsd_mm=0.0)
    elif n_pred == 0 or n_truth == 0:
        result.update(nsd=0.0, rmsd_mm=math.nan)
    else:
        pred_box, truth_box = _crop_to_union(pred_mask, truth_mask)
        result["nsd"] = normalized_surface_dice(pred_box, truth_box, spacing_zyx, nsd_tolerance_mm)
        result["rmsd_mm"] = rms_surface_distance(pred_box, truth_box, spacing_zyx)
    return {key: float(result[key]) for key in SEGMENTATION_METRICS}


def normalized_surface_dice(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float], tolerance_mm: float) -> float:
    """NSD of two non-empty boolean masks: the fraction of surface area within `tolerance_mm`.

    Surface elements and their areas come from the 2 x 2 x 2 neighbourhood codes of MONAI's
    ``use_subvoxels=True`` path (DeepMind's surface-distance library), so anisotropic spacing
    weighs each element by its true area in mm^2.
    """
    import torch
    from monai.metrics import compute_surface_dice

    def foreground(mask: np.ndarray) -> "torch.Tensor":
        return torch.from_numpy(np.ascontiguousarray(mask))[None, None].float()  # (1, 1, Z, Y, X)

    with warnings.catch_warnings():
        # MONAI 1.6 passes its own deprecated `always_return_as_numpy` internally: not ours to fix
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        nsd = compute_surface_dice(
            foreground(pred), foreground(truth), class_thresholds=[float(tolerance_mm)], include_background=True,
            spacing=[float(s) for s in spacing], use_subvoxels=True,
        )
    return float(nsd[0, 0])


def rms_surface_distance(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> float:
    """RMSD in mm of two non-empty boolean masks (definition in the module docstring).

    Surface voxels are MONAI's ``get_mask_edges`` (mask XOR its 6-connected erosion); distances
    are exact Euclidean distances in mm between surface voxel centres.
    """
    from monai.metrics.utils import get_mask_edges, get_surface_distance

    edges_pred, edges_truth = get_mask_edges(pred, truth, crop=True)
    spacing = [float(s) for s in spacing]
    pred_to_truth = np.asarray(get_surface_distance(edges_pred, edges_truth, "euclidean", spacing), dtype=np.float64)
    truth_to_pred = np.asarray(get_surface_distance(edges_truth, edges_pred, "euclidean", spacing), dtype=np.float64)
    squares = np.square(pred_to_truth).sum() + np.square(truth_to_pred).sum()
    return float(np.sqrt(squares / (pred_to_truth.size + truth_to_pred.size)))


def _crop_to_union(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both masks cut to the bounding box of their union (surfaces and distances are unchanged:
    MONAI pads the box again before finding edges). Keeps memory small on full-size scans."""
    union = pred | truth
    box = []
    for axis in range(union.ndim):
        present = np.flatnonzero(union.any(axis=tuple(a for a in range(union.ndim) if a != axis)))
        box.append(slice(int(present[0]), int(present[-1]) + 1))
    return pred[tuple(box)], truth[tuple(box)]


def _binary_mask(mask: np.ndarray, what: str, case_id: str) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise InputError(case_id, f"the {what} must be a 3D (Z, Y, X) mask, got shape {mask.shape}")
    if mask.dtype == bool:
        return mask
    binary = mask != 0
    if not np.array_equal(binary, mask == 1):
        raise InputError(case_id, f"the {what} is not a binary mask (values other than 0 and 1): threshold it first")
    return binary


def _spacing(spacing: Sequence[float], case_id: str) -> tuple[float, float, float]:
    values = tuple(float(s) for s in np.asarray(spacing, dtype=np.float64).ravel())
    if len(values) != 3 or not all(math.isfinite(s) and s > 0 for s in values):
        raise InputError(case_id, f"spacing must be three positive (sz, sy, sx) values in mm, got {tuple(spacing)}")
    return values  # type: ignore[return-value]


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator) / denominator if denominator else math.nan


# ----------------------------------------------------------------------------- classification


def classification_metrics(
    y_true: Sequence[int | str] | np.ndarray,
    probs: np.ndarray,
    classes: Sequence[str] = CLASSES,
) -> dict[str, Any]:
    """Accuracy, per-class and macro sensitivity / specificity / F1 / one-vs-rest AUC, ROC, confusion.

    Args:
        y_true: true class of each scan, ``(n,)`` class indices into `classes` or class names.
        probs: ``(n, C)`` class probabilities (or any scores); the prediction is the argmax.
        classes: class names in column order (default ``deepsc.CLASSES``).

    Returns:
        A dict with float scalars ``accuracy``, ``{sensitivity,specificity,f1,auc}_{class}`` and
        ``..._macro``, the int ``n_scans``, ``confusion_matrix`` (``C x C`` nested list of counts,
        rows = true class, columns = predicted class, in `classes` order) and ``roc``
        (``{class: {"fpr": [...], "tpr": [...], "thresholds": [...]}}``).

    Undefined values are NaN, never a silent 0: sensitivity of a class absent from `y_true`,
    specificity of a class that is every scan's label, F1 of a class neither present nor
    predicted, and one-vs-rest AUC (and an empty ROC curve) of a class that is absent or is the
    only class present. Macro values average the classes where the value is defined (NaN if none).
    """
    classes = tuple(classes)
    labels, scores = _validate_classification(y_true, probs, classes)
    n_classes = len(classes)
    predicted = scores.argmax(axis=1)
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)

    result: dict[str, Any] = {"n_scans": int(labels.size), "accuracy": float(np.trace(confusion) / labels.size)}
    per_metric: dict[str, list[float]] = {"sensitivity": [], "specificity": [], "f1": [], "auc": []}
    roc: dict[str, dict[str, list[float]]] = {}
    for index, name in enumerate(classes):
        tp = int(confusion[index, index])
        fn = int(confusion[index].sum()) - tp
        fp = int(confusion[:, index].sum()) - tp
        tn = int(labels.size) - tp - fn - fp
        auc, roc[name] = _one_vs_rest_roc(labels == index, scores[:, index])
        values = {
            "sensitivity": _ratio(tp, tp + fn),
            "specificity": _ratio(tn, tn + fp),
            "f1": _ratio(2 * tp, 2 * tp + fp + fn),
            "auc": auc,
        }
        for metric, value in values.items():
            result[f"{metric}_{name}"] = value
            per_metric[metric].append(value)
    for metric, values in per_metric.items():
        defined = [v for v in values if math.isfinite(v)]
        result[f"{metric}_macro"] = float(np.mean(defined)) if defined else math.nan
    result["confusion_matrix"] = confusion.tolist()
    result["roc"] = roc
    return result


def _validate_classification(
    y_true: Sequence[int | str] | np.ndarray, probs: np.ndarray, classes: tuple[str, ...]
) -> tuple[np.ndarray, np.ndarray]:
    if len(classes) < 2 or len(set(classes)) != len(classes):
        raise InputError("classification", f"need at least two distinct class names, got {classes}")
    scores = np.asarray(probs, dtype=np.float64)
    raw = np.asarray(y_true)
    if raw.ndim != 1 or raw.size == 0:
        raise InputError("classification", f"y_true must be a non-empty 1D sequence, got shape {raw.shape}")
    if scores.shape != (raw.size, len(classes)):
        raise InputError("classification", f"probs must have shape ({raw.size}, {len(classes)}), got {scores.shape}")
    if not np.all(np.isfinite(scores)):
        raise InputError("classification", "probs contains NaN or infinite values")
    if raw.dtype.kind in "iu":
        labels = raw.astype(np.int64)
        bad = sorted(set(labels[(labels < 0) | (labels >= len(classes))].tolist()))
    else:
        lookup = {name: i for i, name in enumerate(classes)}
        bad = sorted({str(v) for v in raw.tolist() if str(v) not in lookup})
        labels = np.array([lookup.get(str(v), -1) for v in raw.tolist()], dtype=np.int64)
    if bad:
        raise InputError("classification", f"unknown class labels {bad} (classes: {', '.join(classes)})")
    return labels, scores


def _one_vs_rest_roc(is_positive: np.ndarray, score: np.ndarray) -> tuple[float, dict[str, list[float]]]:
    """AUC and ROC points of one class against the rest; NaN and empty lists when undefined."""
    from sklearn.metrics import roc_auc_score, roc_curve

    if is_positive.all() or not is_positive.any():
        return math.nan, {"fpr": [], "tpr": [], "thresholds": []}
    fpr, tpr, thresholds = roc_curve(is_positive, score)
    # sklearn's first threshold is +inf (the empty-prediction corner); keep the point, make it JSON-safe
    thresholds = np.where(np.isfinite(thresholds), thresholds, np.nextafter(score.max(), np.inf))
    curve = {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "thresholds": thresholds.tolist()}
    return float(roc_auc_score(is_positive, score)), curve


# ----------------------------------------------------------------------------- summaries


def summarize(per_case: Any, metrics: Sequence[str] | None = None) -> dict[str, float | int]:
    """Mean and standard deviation over scans of each numeric metric column (Table II style).

    Args:
        per_case: a pandas DataFrame (or a mapping of column -> values) with one row per scan.
        metrics: columns to summarise; default every numeric column except booleans.

    Returns:
        Flat ``{"<m>_mean", "<m>_std", "<m>_n", "<m>_excluded"}`` per metric: the sample standard
        deviation (ddof=1; NaN with fewer than two values), ``_n`` scans with a finite value and
        ``_excluded`` scans left out because the value is NaN or infinite (for example RMSD when
        one mask is empty).
    """
    import pandas as pd

    frame = per_case if isinstance(per_case, pd.DataFrame) else pd.DataFrame(per_case)
    if metrics is None:
        metrics = [c for c in frame.columns if pd.api.types.is_numeric_dtype(frame[c]) and not pd.api.types.is_bool_dtype(frame[c])]
    missing = [m for m in metrics if m not in frame.columns]
    if missing:
        raise InputError("summary", f"no column(s) {missing} in the per-case table (columns: {list(frame.columns)})")
    summary: dict[str, float | int] = {}
    for metric in metrics:
        values = pd.to_numeric(frame[metric], errors="coerce").to_numpy(dtype=np.float64)
        finite = values[np.isfinite(values)]
        summary[f"{metric}_mean"] = float(finite.mean()) if finite.size else math.nan
        summary[f"{metric}_std"] = float(finite.std(ddof=1)) if finite.size > 1 else math.nan
        summary[f"{metric}_n"] = int(finite.size)
        summary[f"{metric}_excluded"] = int(values.size - finite.size)
    return summary


def format_mean_std(mean: float, std: float, scale: float = 100.0, digits: int = 1) -> str:
    """Table II cell: ``format_mean_std(0.7331, 0.1214) == "73.3 (12.1)"``; use scale=1 for mm.

    NaN parts print as ``n/a``.
    """

    def number(value: float) -> str:
        return "n/a" if value is None or not math.isfinite(value) else f"{value * scale:.{digits}f}"

    return f"{number(mean)} ({number(std)})"


def format_summary(summary: Mapping[str, float | int], metric: str, scale: float = 100.0, digits: int = 1) -> str:
    """`format_mean_std` of one metric of a :func:`summarize` result."""
    return format_mean_std(float(summary[f"{metric}_mean"]), float(summary[f"{metric}_std"]), scale, digits)
