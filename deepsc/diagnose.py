"""`deepsc diagnose`: explainable diagnosis of ONE chest CT (NIfTI file or DICOM folder).

Steps (:func:`diagnose_volume`, the one core shared with the MLflow pyfunc of
:mod:`deepsc.serving`):

1. plausibility: the volume must look like CT in HU (air below ``validate.air_p01_max_hu`` at
   the 1st percentile, negative values, not an 8-bit rendering, DICOM modality CT) -> else
   :class:`~deepsc.errors.InputError`;
2. lung segmentation (``lungseg`` settings) and preprocessing with the settings the MODEL was
   trained with (``config.json`` ``params.preprocess``; a different ``preprocess`` section in
   params.yaml is ignored with a log line, the model cannot read other inputs);
3. segmentation by Gaussian-blended sliding windows over the scan (``inference.overlap``; with
   ``inference.mirror`` also over its mirror image) and classification
   (:class:`deepsc.inference.Predictor`);
4. the lesion probability and the evidence maps are mapped back onto the ORIGINAL voxel grid
   (:func:`deepsc.data.preprocess.to_original_grid`, linear interpolation), the probability
   thresholded at 0.5 and restricted to the lung mask (the model sees only the lungs), lesion
   components under ``MIN_COMPONENT_VOXELS`` voxels dropped;
5. statistics with :mod:`deepsc.data.analysis` (3D connected components, volumes in mL, LVR,
   PLR at 15 mm, HU bands), the MosMedData severity grade and per-slice lesion calls.

``diagnosis.json`` (the summary dict) holds: ``case_id``, ``disclaimer``, ``model`` (name,
version, source), ``input`` (source, shape, spacing), ``classification`` (the softmax score
of each class under ``probabilities``: not calibrated, and the report shows them in whole
percent; ``decision``; None for a segmentation-only model), ``lesions`` (count, total and
per-lesion volumes in mL, per-lesion centre in the scanner's LPS patient coordinates, LVR, PLR,
HU band fractions; None for a classification-only model), ``severity`` (grade CT-0..CT-4),
``slices`` (one call per original axial slice, ``z = 0`` the most inferior, with the DICOM
InstanceNumber or the file's own slice index, as a viewer of the input numbers it), ``timing``
(seconds per step; peak RSS in MB of the process, over its whole life in a server) and
``warnings`` (e.g. a class decision the segmentation contradicts, either way).

Severity (MosMedData bands of the share of the lungs involved, ``p = 100 * LVR``): CT-0 no
lesion, CT-1 ``0 < p < 25``, CT-2 ``25 <= p < 50``, CT-3 ``50 <= p < 75``, CT-4 ``p >= 75``.

Files written into ``out_dir``: ``lesion_mask.nii.gz`` (uint8; for a NIfTI input the same shape,
axis order, affine and orientation codes as the input file, otherwise the canonical LPS grid of the scan: it overlays
the scan in any viewer, see :func:`nifti_like_input`), ``evidence_1.nii.gz`` ..
``evidence_3.nii.gz`` (values in [0, 1] stored as scaled uint8, same grid), ``report.html``
(self-contained) and ``diagnosis.json`` (written last). The NIfTIs and the report are staged and
moved into place together, only when all of them succeeded.

Research use, not for clinical diagnosis.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deepsc import CLASSES
from deepsc.data.volume import CTVolume
from deepsc.errors import InputError
from deepsc.report import DISCLAIMER

log = logging.getLogger(__name__)

DEFAULT_MODEL = "outputs/models/finetune"
LESION_THRESHOLD = 0.5
OUTPUT_FILES = ("lesion_mask.nii.gz", "evidence_1.nii.gz", "evidence_2.nii.gz", "evidence_3.nii.gz", "report.html")
SEVERITY_BANDS = (  # (grade, lower bound of the lung share in %, description)
    ("CT-1", 0.0, "under 25 % of the lungs involved (mild)"),
    ("CT-2", 25.0, "25 to 50 % of the lungs involved (moderate)"),
    ("CT-3", 50.0, "50 to 75 % of the lungs involved (severe)"),
    ("CT-4", 75.0, "75 % or more of the lungs involved (critical)"),
)
CLASS_LABELS = {"covid": "COVID-19 pneumonia", "cap": "community-acquired pneumonia (CAP)", "normal": "no pneumonia"}
_DEFAULT_AIR_P01_MAX_HU = -900.0


@dataclasses.dataclass
class Diagnosis:
    """Result of :func:`diagnose_volume`.

    Attributes:
        summary: the JSON-ready dict of ``diagnosis.json``.
        lesion_mask: uint8 ``(Z, Y, X)`` on the input's grid, or None (classification-only model).
        evidence: three float32 ``(Z, Y, X)`` maps in [0, 1] on the input's grid, or None.
        lung_mask: uint8 ``(Z, Y, X)`` on the input's grid.
    """

    summary: dict[str, Any]
    lesion_mask: np.ndarray | None
    evidence: list[np.ndarray] | None
    lung_mask: np.ndarray


# ----------------------------------------------------------------------------- checks


def check_is_ct(volume: CTVolume, params: Mapping[str, Any] | None = None) -> None:
    """Refuse volumes that are not CT in Hounsfield units (clear InputError, no guessing).

    Uses :func:`deepsc.data.volume_checks.intensity_stats` (the validation gate's measurements).
    """
    from deepsc.data.volume_checks import intensity_stats

    modality = volume.meta.get("modality")
    if modality and str(modality).upper() != "CT":
        raise InputError(volume.case_id, f"the DICOM series is modality {modality}, not CT")
    stats = intensity_stats(volume.array)
    kind = stats["intensity_kind"]
    if kind == "windowed_0_255":
        raise InputError(volume.case_id, "all values lie in 0..255: an 8-bit image rendering, not CT in Hounsfield units")
    if kind == "no_negative_values":
        raise InputError(volume.case_id, f"no negative values (range {stats['hu_min']:g}..{stats['hu_max']:g}): "
                                          "MR-like intensities or CT without its rescale intercept, not HU")
    limit = float((params or {}).get("validate", {}).get("air_p01_max_hu", _DEFAULT_AIR_P01_MAX_HU))
    if stats["hu_p01"] > limit:
        raise InputError(volume.case_id, f"the 1st intensity percentile is {stats['hu_p01']:.0f}, above {limit:.0f} HU: "
                                          "a chest CT in HU holds air near -1000 HU")


# ----------------------------------------------------------------------------- statistics


def severity_grade(lvr: float) -> dict[str, Any]:
    """MosMedData grade of the share of the lungs involved (``lvr`` = lesion / lung volume)."""
    if not (isinstance(lvr, (int, float)) and math.isfinite(lvr) and 0.0 <= lvr <= 1.0):
        raise ValueError(f"lvr must be a fraction in [0, 1], got {lvr!r}")
    percent = 100.0 * float(lvr)
    if percent == 0.0:
        return {"grade": "CT-0", "lung_involvement_percent": 0.0, "description": "no lesion found"}
    grade, _, description = [band for band in SEVERITY_BANDS if percent >= band[1]][-1]
    return {"grade": grade, "lung_involvement_percent": round(percent, 3), "description": description}


def slice_names(volume: CTVolume) -> tuple[str, list[int] | None]:
    """How a viewer of the INPUT finds each canonical slice ``z``: ``("image", InstanceNumbers)``
    for DICOM, ``("file slice", indices)`` along the file's own slice axis for NIfTI / MHA / NRRD
    (``z = 0`` is the most inferior slice, which need not be the file's first), else ``("z", None)``."""
    count = volume.shape[0]
    numbers = volume.meta.get("instance_numbers")
    if numbers and len(numbers) == count and all(isinstance(v, int) for v in numbers):
        return "image", [int(v) for v in numbers]
    axis_of_z = volume.meta.get("file_axis_of_z")
    if axis_of_z:
        axis, reversed_ = int(axis_of_z[0]), bool(axis_of_z[1])
        name = "file slice" if axis == 2 else f"file index on axis {axis}"
        return name, [count - 1 - z if reversed_ else z for z in range(count)]
    return "z", None


def slice_calls(lesion: np.ndarray, voxel_ml: float, instance_numbers: list[int | None] | None = None,
                file_slices: tuple[str, list[int] | None] | None = None) -> dict[str, Any]:
    """Per axial slice of the ORIGINAL scan: does the predicted mask hold lesion voxels?

    Args:
        lesion: uint8 ``(Z, Y, X)`` on the input's grid (``z = 0`` the most inferior slice).
        voxel_ml: volume of one voxel in mL.
        instance_numbers: DICOM InstanceNumber of each z (``volume.meta``), if known.
        file_slices: :func:`slice_names` of the input: how its viewer numbers each z.

    Returns:
        ``count``, ``with_lesion``, ``ranges`` (inclusive z runs with lesions), ``ranges_text``
        (each run also named as the input's viewer numbers it) and ``calls``: one ``{"z",
        "instance_number", "file_slice", "lesion", "lesion_ml"}`` per slice.
    """
    voxels = lesion.reshape(lesion.shape[0], -1).sum(axis=1, dtype=np.int64)
    numbers = instance_numbers if instance_numbers and len(instance_numbers) == lesion.shape[0] else [None] * lesion.shape[0]
    kind, names = file_slices if file_slices else ("z", None)
    indices = names if kind.startswith("file") and names else [None] * lesion.shape[0]
    calls = [{"z": z, "instance_number": numbers[z], "file_slice": indices[z], "lesion": bool(v > 0),
              "lesion_ml": round(float(v) * voxel_ml, 4)} for z, v in enumerate(voxels)]
    positive = np.flatnonzero(voxels > 0)
    ranges: list[list[int]] = []
    for z in positive.tolist():
        if ranges and z == ranges[-1][1] + 1:
            ranges[-1][1] = z
        else:
            ranges.append([z, z])

    same_as_z = names == list(range(len(voxels)))  # the file counts like z: naming it twice says nothing

    def run_text(a: int, b: int) -> str:
        text = f"z {a}" if a == b else f"z {a}-{b}"
        if names and not same_as_z:
            text += f" ({kind} {names[a]})" if a == b else f" ({kind}s {names[a]}-{names[b]})"
        return text

    return {"count": int(lesion.shape[0]), "with_lesion": int(positive.size), "ranges": ranges,
            "ranges_text": ", ".join(run_text(a, b) for a, b in ranges), "calls": calls}


def lesion_summary(image_hu: np.ndarray, lesion: np.ndarray, lung: np.ndarray, spacing: tuple[float, float, float],
                   case_id: str, affine: np.ndarray | None = None) -> dict[str, Any]:
    """Statistics of a cleaned lesion mask with :mod:`deepsc.data.analysis` (same definitions as
    ``deepsc analyze``): count, volumes (mL), LVR, PLR at the headline sigma, HU band fractions,
    and one entry per lesion (largest first: volume, extent in mm, centre as ``centroid_mm_zyx``
    from the array's first voxel and, given the scan's RAS ``affine``, ``centroid_lps_mm``: the
    scanner's patient coordinates (x to the left, y posterior, z superior, as DICOM viewers show))."""
    from scipy import ndimage

    from deepsc.data.analysis import HEADLINE_PLR_SIGMA_MM, case_lesion_stats, lesion_components

    # lesions are lung: dense ones that the classical lung mask leaves out still count in its
    # volume, so the LVR stays a fraction of the diseased lung
    lung = np.maximum(np.asarray(lung, dtype=np.uint8), np.asarray(lesion, dtype=np.uint8))
    stats = case_lesion_stats(image_hu, lesion, lung, spacing, case_id, sigmas_mm=(HEADLINE_PLR_SIGMA_MM,))
    labels, count = lesion_components(lesion, 1)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    components = []
    if count:
        sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
        centres = ndimage.center_of_mass(lesion, labels, range(1, count + 1))
        boxes = ndimage.find_objects(labels)
        for index in np.argsort(-sizes, kind="stable"):
            box = boxes[index]
            component = {
                "id": len(components) + 1,
                "volume_ml": round(float(sizes[index]) * voxel_ml, 4),
                "centroid_mm_zyx": [round(c * s, 1) for c, s in zip(centres[index], spacing)],
                "extent_mm_zyx": [round((b.stop - b.start) * s, 1) for b, s in zip(box, spacing)],
            }
            if affine is not None:
                ras = np.asarray(affine)[:3, :3] @ np.asarray(centres[index][::-1]) + np.asarray(affine)[:3, 3]
                component["centroid_lps_mm"] = [round(float(v), 1) for v in (-ras[0], -ras[1], ras[2])]
            components.append(component)
    plr = stats.plr.get(HEADLINE_PLR_SIGMA_MM, math.nan)
    return {
        "count": int(stats.lesion_count),
        "total_volume_ml": round(stats.lesion_ml, 4),
        "lung_volume_ml": round(stats.lung_ml, 2),
        "lvr": float(stats.lvr),
        "plr": None if not math.isfinite(plr) else float(plr),
        "plr_sigma_mm": HEADLINE_PLR_SIGMA_MM,
        "hu_fraction_ggo_band": _finite_or_none(stats.hu_fraction_ggo_band),
        "hu_fraction_consolidation_band": _finite_or_none(stats.hu_fraction_consolidation_band),
        "probability_threshold": LESION_THRESHOLD,
        "components": components,
    }


def _finite_or_none(value: float) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


# ----------------------------------------------------------------------------- the core


class _Steps:
    """Runs named steps with a tqdm bar (stderr) and records each step's seconds."""

    def __init__(self, names: list[str], progress: bool, case_id: str) -> None:
        from tqdm import tqdm

        self.seconds: dict[str, float] = {}
        self._bar = tqdm(total=len(names), desc=f"diagnose {case_id}", unit="step", disable=not progress, file=sys.stderr,
                         leave=False)

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        self._bar.set_postfix_str(name)
        started = time.perf_counter()
        result = fn()
        self.seconds[name] = round(time.perf_counter() - started, 3)
        self._bar.update(1)
        return result

    def close(self) -> None:
        self._bar.close()


def diagnose_volume(volume: CTVolume, predictor: Any, params: Mapping[str, Any] | None = None, *,
                    model_info: Mapping[str, Any] | None = None, progress: bool = False,
                    with_evidence: bool = True) -> Diagnosis:
    """Turn one CT volume into the diagnosis (the ONE core of ``deepsc diagnose`` and the pyfunc).

    Args:
        volume: the scan in HU, canonical LPS ``(Z, Y, X)`` (:func:`deepsc.data.io.read_ct`).
        predictor: a :class:`deepsc.inference.Predictor`.
        params: merged settings (``lungseg``, ``validate``); None uses the defaults.
        model_info: ``name``, ``version``, ``source`` shown in the summary (default: the predictor's).
        progress: show a tqdm bar over the steps.
        with_evidence: also compute the evidence maps (three float volumes of the scan's size).

    Raises:
        InputError: not a CT in HU, or no lung found.
    """
    from deepsc.data.lungseg import segment_lungs_from_params
    from deepsc.inference import lesion_margin_setting

    started = time.perf_counter()
    settings = inference_params(params, predictor)
    steps = _Steps(["checks", "lungs", "preprocess", "model", "map back", "statistics"], progress, volume.case_id)
    try:
        steps.run("checks", lambda: check_is_ct(volume, settings))
        lung = steps.run("lungs", lambda: segment_lungs_from_params(volume, settings.get("lungseg", {})).astype(np.uint8))
        prepared = steps.run("preprocess", lambda: prepare_for_model(volume, lung, settings))
        prediction = steps.run("model", lambda: predictor.predict_case(prepared.image, prepared.cls, with_evidence=with_evidence,
                                                                        case_id=volume.case_id))
        margin = lesion_margin_setting(settings)
        lesion, evidence = steps.run("map back", lambda: _to_scan(prediction, prepared.meta, lung, margin))
        summary = steps.run("statistics", lambda: _summary(volume, lesion, lung, prediction, predictor, model_info))
    finally:
        steps.close()
    summary["timing"] = {**{f"seconds_{k.replace(' ', '_')}": v for k, v in steps.seconds.items()},
                         "seconds_total": round(time.perf_counter() - started, 3), "peak_rss_mb": peak_rss_mb()}
    return Diagnosis(summary, lesion, evidence, lung)


def inference_params(params: Mapping[str, Any] | None, predictor: Any) -> dict[str, Any]:
    """The settings of a diagnosis: ``params`` with ``preprocess`` taken from the model's training."""
    settings = dict(params or {})
    trained = predictor.preprocess_params
    given = settings.get("preprocess")
    if isinstance(given, Mapping) and any(given.get(k) != v for k, v in trained.items()):
        log.info("using the model's preprocessing settings (params.yaml preprocess differs from the model's training)")
    settings["preprocess"] = trained
    return settings


def prepare_for_model(volume: CTVolume, lung: np.ndarray, params: Mapping[str, Any]) -> Any:
    """The model's inputs, made exactly as the preprocessed cohort was made.

    Returns :class:`deepsc.data.preprocess.PreprocessedCase` (``image``, ``cls``, ``meta``). The
    lung mask computed here is passed in, so it is segmented once and reused for the statistics
    (``preprocess_volume_for_inference`` would segment it again and keep only the resampled one).
    """
    from deepsc.data.preprocess import preprocess_case

    return preprocess_case(volume, None, lung, params)


def lesion_mask_from_probability(prob: np.ndarray, lung: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0),
                                 margin_mm: float = 0.0) -> np.ndarray:
    """The reported lesion mask: ``prob >= 0.5`` inside the lungs grown by ``margin_mm``
    (``inference.lesion_margin_mm``, see :func:`deepsc.inference.lesion_margin_setting`),
    components under ``deepsc.data.analysis.MIN_COMPONENT_VOXELS`` voxels dropped (uint8
    ``(Z, Y, X)``; all zeros when nothing is left).

    ``deepsc evaluate`` applies the same rule, so the reported metrics describe exactly the
    masks ``deepsc diagnose`` writes.
    """
    from deepsc.data.analysis import MIN_COMPONENT_VOXELS, lesion_components
    from deepsc.data.preprocess import grow_mask

    if prob.shape != lung.shape:
        raise ValueError(f"probability {prob.shape} and lung {lung.shape} differ in shape")
    region = grow_mask(lung > 0, spacing, margin_mm)
    labels, _ = lesion_components((prob >= LESION_THRESHOLD) & region, MIN_COMPONENT_VOXELS)
    return (labels > 0).astype(np.uint8)


def _to_scan(prediction: Any, meta: Mapping[str, Any], lung: np.ndarray,
             margin_mm: float = 0.0) -> tuple[np.ndarray | None, list[np.ndarray] | None]:
    """Lesion mask and evidence maps on the input's grid (linear interpolation back)."""
    from deepsc.data.preprocess import to_original_grid

    lesion = None
    if prediction.lesion_prob is not None:
        lesion = lesion_mask_from_probability(to_original_grid(prediction.lesion_prob, meta, order=1), lung,
                                              meta["original_spacing_mm"], margin_mm)
    evidence = None
    if prediction.evidence is not None:
        evidence = [np.clip(to_original_grid(v, meta, order=1), 0.0, 1.0).astype(np.float32) for v in prediction.evidence]
    return lesion, evidence


def _summary(volume: CTVolume, lesion: np.ndarray | None, lung: np.ndarray, prediction: Any, predictor: Any,
             model_info: Mapping[str, Any] | None) -> dict[str, Any]:
    warnings_ = list(volume.meta.get("warnings", []))
    classification = None
    if prediction.class_prob is not None:
        probs = {name: round(float(p), 6) for name, p in zip(CLASSES, prediction.class_prob)}
        decision = CLASSES[int(np.argmax(prediction.class_prob))]
        classification = {"probabilities": probs, "decision": decision, "decision_label": CLASS_LABELS[decision]}
    lesions = severity = slices = None
    if lesion is not None:
        lesions = lesion_summary(volume.array, lesion, lung, volume.spacing, volume.case_id, volume.affine)
        severity = severity_grade(lesions["lvr"])
        slices = slice_calls(lesion, volume.voxel_volume_ml, volume.meta.get("instance_numbers"), slice_names(volume))
        if classification and classification["decision"] == "normal" and lesions["count"]:
            warnings_.append("the classifier says no pneumonia but the segmentation found lesions: review the images")
        if classification and classification["decision"] != "normal" and not lesions["count"]:
            warnings_.append(f"the classifier says {classification['decision_label']} but the segmentation found no lesion: "
                             "review the images")
    info = dict(model_info or {"name": predictor.name, "version": None, "source": predictor.source})
    return {
        "case_id": volume.case_id,
        "disclaimer": DISCLAIMER,
        "model": {**info, "kind": predictor.kind, "task": predictor.task},
        "input": {"source": volume.meta.get("source"), "format": volume.meta.get("format"), "shape_zyx": list(volume.shape),
                  "spacing_mm": [round(s, 4) for s in volume.spacing]},
        "classification": classification,
        "lesions": lesions,
        "severity": severity,
        "slices": slices,
        "warnings": warnings_,
    }


def peak_rss_mb() -> float:
    """Peak resident memory of this process since :func:`reset_peak_rss` (or since it started),
    in MB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024, 1)


def reset_peak_rss() -> bool:
    """Restart the peak of :func:`peak_rss_mb` at the current resident size, so that a long-lived
    server reports each request's peak instead of its lifetime's (Linux ``/proc/self/clear_refs``
    value 5). False where the system does not allow it: the peak then covers the process's life."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    return True


# ----------------------------------------------------------------------------- models


def load_predictor(model: str | os.PathLike, params: Mapping[str, Any] | None = None,
                   device: str = "auto") -> tuple[Any, dict[str, Any]]:
    """A :class:`~deepsc.inference.Predictor` and its description from a model folder or a
    registry URI (``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``, resolved through MLflow
    with ``mlflow.tracking_uri`` / ``$MLFLOW_TRACKING_URI``)."""
    from deepsc.inference import Predictor, mirror_setting, overlap_setting
    from deepsc.registry import file_sha256

    text = os.fspath(model)
    if text.startswith("models:/"):
        predictor, info = _registry_predictor(text, params or {}, device)
        predictor.mirror = mirror_setting(params or {})
        predictor.overlap = overlap_setting(params or {})
        return predictor, info
    folder = Path(text)
    predictor = Predictor.from_dir(folder, device, mirror=mirror_setting(params or {}), overlap=overlap_setting(params or {}))
    info = {"name": predictor.name, "version": f"sha256:{file_sha256(folder / 'model.pt')[:12]}", "source": str(folder)}
    return predictor, info


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/NAME@ALIAS`` -> (NAME, ALIAS, None); ``models:/NAME/VERSION`` -> (NAME, None, VERSION)."""
    body = uri[len("models:/"):] if uri.startswith("models:/") else ""
    name, alias, version = (*body.split("@", 1), None) if "@" in body else (body.partition("/")[0], None, body.partition("/")[2])
    if not name or not (alias or version) or "/" in (alias or ""):
        raise InputError(uri, "expected a registry URI models:/NAME@ALIAS or models:/NAME/VERSION")
    return name, alias, version


def _registry_predictor(uri: str, params: Mapping[str, Any], device: str) -> tuple[Any, dict[str, Any]]:
    from deepsc import tracking

    tracking.quiet_mlflow()
    import mlflow
    from mlflow.exceptions import MlflowException

    if os.environ.get("MLFLOW_TRACKING_URI") or (params.get("mlflow") or {}).get("tracking_uri"):
        tracking.configure(params)
    name, alias, number = parse_model_uri(uri)
    try:
        client = mlflow.MlflowClient()
        version = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, number)
        # the version just resolved, not the alias again: a promotion in between would load other weights
        loaded = mlflow.pyfunc.load_model(f"models:/{version.name}/{version.version}")
    except MlflowException as exc:
        raise InputError(uri, f"cannot resolve the registered model: {exc.message}") from None
    python_model = loaded.unwrap_python_model()
    predictor = getattr(python_model, "predictor", None)
    if predictor is None:
        raise InputError(uri, f"is not a DeepSC model (its pyfunc is {type(python_model).__name__})")
    if device != "auto" and device != predictor.device:
        from deepsc.inference import Predictor

        predictor = Predictor.from_dir(python_model.model_dir, device)
    info = {"name": version.name, "version": str(version.version), "source": uri, "run_id": version.run_id}
    return predictor, info


# ----------------------------------------------------------------------------- the stage


def diagnose(scan: str | os.PathLike, model: str | os.PathLike = DEFAULT_MODEL, out_dir: str | os.PathLike = "outputs/diagnosis",
             params: Mapping[str, Any] | None = None, *, device: str = "auto", progress: bool = True) -> dict[str, Any]:
    """Diagnose one scan and write the files listed in the module docstring into ``out_dir``.

    Args:
        scan: NIfTI file, DICOM folder (or one of its files), MHA or NRRD.
        model: a model folder or ``models:/NAME@ALIAS``.
        out_dir: output folder (created; files of an earlier diagnosis there are replaced).
        params: merged settings (``lungseg``, ``validate``, ``mlflow``); None for the defaults.
        device: auto | cpu | cuda.
        progress: tqdm bar over the steps.

    Returns:
        The summary dict (as in ``diagnosis.json``).
    """
    from deepsc.data.io import read_ct

    started = time.perf_counter()
    scope = "call" if reset_peak_rss() else "process"
    max_voxels = int((params or {}).get("validate", {}).get("max_voxels", 400_000_000))
    predictor, info = load_predictor(model, params, device)
    volume = read_ct(Path(scan), max_voxels=max_voxels)
    seconds_read = time.perf_counter() - started
    result = diagnose_volume(volume, predictor, params, model_info=info, progress=progress)
    report_started = time.perf_counter()
    write_outputs(volume, result, Path(out_dir))
    result.summary["timing"].update({"seconds_load_and_read": round(seconds_read, 3),
                                     "seconds_report": round(time.perf_counter() - report_started, 3),
                                     "seconds_end_to_end": round(time.perf_counter() - started, 3),
                                     "peak_rss_mb": peak_rss_mb(), "peak_rss_scope": scope})
    _write_json(result.summary, Path(out_dir) / "diagnosis.json")
    return result.summary


def write_outputs(volume: CTVolume, result: Diagnosis, out_dir: Path) -> list[Path]:
    """Mask, evidence NIfTIs and report.html, staged and moved into ``out_dir`` together."""
    from deepsc.data.volume import atomic_write_bytes, fsync_folder
    from deepsc.report import diagnosis_figures, diagnosis_html

    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir, prefix=".staging-"))
    try:
        if result.lesion_mask is not None:
            atomic_write_bytes(staging / "lesion_mask.nii.gz", nifti_like_input(result.lesion_mask, volume, np.uint8))
        for index, vmap in enumerate(result.evidence or [], start=1):
            atomic_write_bytes(staging / f"evidence_{index}.nii.gz", nifti_like_input(vmap, volume, np.float32, np.uint8))
        figures = diagnosis_figures(volume.array, volume.spacing, result.lesion_mask, result.lung_mask, result.evidence,
                                    slice_names(volume))
        atomic_write_bytes(staging / "report.html", diagnosis_html(result.summary, figures).encode("utf-8"))
        # no diagnosis.json while files change; outputs of an earlier run this one lacks would mislead
        for name in ("diagnosis.json", *OUTPUT_FILES):
            if not (staging / name).exists():
                (out_dir / name).unlink(missing_ok=True)
        written = []
        for path in sorted(staging.iterdir()):
            os.replace(path, out_dir / path.name)
            written.append(out_dir / path.name)
        fsync_folder(out_dir)
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def nifti_like_input(array_zyx: np.ndarray, volume: CTVolume, dtype: Any, stored_dtype: Any | None = None) -> bytes:
    """gzip NIfTI bytes of a canonical ``(Z, Y, X)`` array that overlays the INPUT voxel for voxel.

    For a NIfTI input the array is put back into the input file's own axis order and written
    with its affine (same shape and affine as the input, whatever its orientation); for other
    formats (DICOM, MHA, NRRD) it is written in the canonical LPS order with the scan's affine,
    which is what :func:`deepsc.data.volume.save_nifti` writes for the scan itself. The gzip
    stream has mtime 0, so equal arrays give equal bytes.

    Args:
        dtype: dtype of the values (uint8 for masks, float32 for maps).
        stored_dtype: on-disk dtype when it differs (e.g. uint8 with ``scl_slope`` / ``scl_inter``
            for [0, 1] evidence maps: a quarter of the float32 size, steps of 1/255 of the range;
            readers that honour the NIfTI scaling get floats back).
    """
    import gzip

    import nibabel as nib
    from nibabel import orientations

    if array_zyx.shape != volume.shape:
        raise ValueError(f"array shape {array_zyx.shape} differs from the scan's {volume.shape}")
    data, affine, codes = np.asarray(array_zyx).transpose(2, 1, 0), volume.affine, (1, 1)
    source = volume.meta.get("source")
    if volume.meta.get("format") == "nifti" and source and Path(source).is_file():
        original = nib.load(source)  # the header only; voxels are not read
        transform = orientations.ornt_transform(orientations.axcodes2ornt(("L", "P", "S")),
                                                orientations.io_orientation(original.affine))
        data, affine = orientations.apply_orientation(data, transform), original.affine
        # the input's codes, 0 included: a file without orientation is then read like the input
        # (ITK-based viewers would otherwise place the mask by the fallback affine, flipped)
        codes = (int(original.header["qform_code"]), int(original.header["sform_code"]))
        if data.shape != tuple(original.shape[:3]):
            raise ValueError(f"{source}: reoriented shape {data.shape} differs from the file's {original.shape[:3]}")
    if codes == (0, 0):  # no affine: nibabel would add one (sform code 2); readers use the voxel sizes alone
        image = nib.Nifti1Image(np.ascontiguousarray(data.astype(dtype)), None)
        image.header.set_zooms(original.header.get_zooms()[:3])
        image.header.set_xyzt_units("mm", "sec")
    else:
        image = nib.Nifti1Image(np.ascontiguousarray(data.astype(dtype)), affine)
        image.header.set_xyzt_units("mm", "sec")
        image.set_qform(affine, code=codes[0])
        image.set_sform(affine, code=codes[1])
    if stored_dtype is not None:
        image.set_data_dtype(stored_dtype)
    return gzip.compress(image.to_bytes(), compresslevel=6, mtime=0)


def _write_json(payload: Mapping[str, Any], path: Path) -> None:
    from deepsc.data.volume import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(payload, indent=2, allow_nan=False) + "\n").encode())


# ----------------------------------------------------------------------------- CLI


def add_cli(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("scan", type=Path, help="NIfTI file (.nii, .nii.gz), DICOM folder, MHA or NRRD")
    parser.add_argument("--model", default=None,
                        help=f"model folder or models:/NAME@ALIAS (default: <outputs>/models/finetune, i.e. {DEFAULT_MODEL})")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: <outputs>/diagnosis/<scan name>)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_cli(args: argparse.Namespace, params: Mapping[str, Any]) -> int:
    from deepsc.config import outputs_dir
    from deepsc.data.io import default_case_id

    outputs = outputs_dir(params)
    model = args.model or str(outputs / "models" / "finetune")
    out_dir = args.out or outputs / "diagnosis" / default_case_id(args.scan)
    summary = diagnose(args.scan, model, out_dir, params, device=args.device, progress=not args.no_progress)
    print(one_line(summary))
    print(f"written to {out_dir} (diagnosis.json, report.html, lesion_mask.nii.gz); {DISCLAIMER}")
    return 0


def one_line(summary: Mapping[str, Any]) -> str:
    """``case: decision (score) | n lesions, x mL, LVR y %, CT-k`` for the terminal."""
    from deepsc.report import score_text

    parts = [str(summary["case_id"])]
    cls = summary.get("classification")
    if cls:
        parts.append(f"{cls['decision_label']} (score {score_text(cls['probabilities'][cls['decision']])})")
    lesions, severity = summary.get("lesions"), summary.get("severity")
    if lesions:
        parts.append(f"{lesions['count']} lesion(s), {lesions['total_volume_ml']:.1f} mL, LVR {100 * lesions['lvr']:.1f} %, "
                     f"{severity['grade']}")
    timing = summary.get("timing", {})
    seconds = timing.get("seconds_end_to_end", timing.get("seconds_total", 0.0))
    parts.append(f"{seconds:.1f} s, peak RSS {timing.get('peak_rss_mb', 0.0):.0f} MB")
    return " | ".join(parts)
