"""Per-case measurements for the validation gate: one row of numbers per scan, no verdicts.

:func:`measure_case` reads one scan (and its lesion / lung masks) and returns a flat mapping of
measurements (shape, spacing in mm, HU statistics, mask geometry, lesion voxels outside the
lung). Judging those numbers is the job of the great-expectations suites in
:mod:`deepsc.data.validate`; keeping the two apart lets the expectations see every case, even
unreadable ones, as a row of a table.

Reading failures never escape: they become ``read_error`` text in the row (``readable=False``),
and the columns that could not be measured stay missing (``None`` / NaN), which great-expectations
ignores for every other check. Files are only ever opened for reading.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from deepsc.data.volume import CTVolume
from deepsc.errors import InputError

LungSegmenter = Callable[[CTVolume], np.ndarray]
"""Maps a CT volume to a boolean ``(Z, Y, X)`` lung mask on the same grid."""

MAX_PERCENTILE_SAMPLES = 2_000_000
"""Percentiles are taken on a regular subsample of at most this many voxels (speed on 512^2 scans)."""

WINDOWED_RANGE = (0.0, 255.0)
"""An image whose values all lie here is an 8-bit display rendering, not HU."""

# read_ct wraps every library error in InputError; OSError covers a file that vanishes meanwhile.
READ_ERRORS: tuple[type[BaseException], ...] = (InputError, OSError)

# Column order of the per-case table (checks.csv); missing values are None / NaN.
VOLUME_COLUMNS: tuple[str, ...] = (
    "line", "case_id", "label", "image_exists", "has_mask", "has_lung",
    "readable", "read_error", "ndim", "shape", "n_slices", "spacing_mm", "spacing_min_mm", "spacing_max_mm",
    "hu_min", "hu_p01", "hu_p99", "hu_max", "intensity_kind",
    "mask_error", "mask_shape", "mask_grid_offset_mm", "mask_grid_offset_voxels",
    "mask_nonbinary_voxels", "mask_nonbinary_values", "lesion_voxels", "lesion_volume_ml",
    "lung_source", "lung_error", "lung_shape", "lung_grid_offset_mm", "lung_grid_offset_voxels",
    "lesion_outside_lung_fraction",
    "seconds",
)


@dataclass(frozen=True)
class CaseFiles:
    """One manifest row, resolved to files.

    Args:
        line: line number in the manifest (header = line 1); identifies rows with duplicate ids.
        case_id: the case's name (may be None in a broken manifest).
        label: class label as written in the manifest.
        image: the scan, or None when the manifest names no existing file.
        mask: the lesion mask, or None when absent / missing.
        lung: the reference lung mask, or None when absent / missing.
    """

    line: int
    case_id: str | None
    label: str | None
    image: Path | None
    mask: Path | None = None
    lung: Path | None = None

    @property
    def name(self) -> str:
        return self.case_id or f"line {self.line}"


def measure_case(
    case: CaseFiles,
    *,
    max_voxels: int,
    lung_segmenter: LungSegmenter | None = None,
) -> dict[str, Any]:
    """Measure one case; one volume is in memory at a time (plus its masks).

    Args:
        case: the resolved manifest row.
        max_voxels: refuse files whose header claims more voxels (memory safety).
        lung_segmenter: used when the case has lesions but no lung mask file; None leaves
            ``lesion_outside_lung_fraction`` missing (the check is skipped for the case).

    Returns:
        A mapping with every key of :data:`VOLUME_COLUMNS`. ``lesion_outside_lung_fraction`` is
        0.0 for an empty lesion mask; grid offsets are the largest world distance (mm, and in
        units of the image's smallest voxel size) between the same corner voxel of mask and image.
    """
    import time

    start = time.perf_counter()
    row: dict[str, Any] = dict.fromkeys(VOLUME_COLUMNS)
    row.update(line=case.line, case_id=case.case_id, label=case.label, image_exists=case.image is not None,
               has_mask=case.mask is not None, has_lung=case.lung is not None, readable=False)
    if case.image is not None:
        _measure_image_and_masks(case, row, max_voxels, lung_segmenter)
    row["seconds"] = round(time.perf_counter() - start, 4)
    return row


def _measure_image_and_masks(case: CaseFiles, row: dict[str, Any], max_voxels: int,
                             lung_segmenter: LungSegmenter | None) -> None:
    from deepsc.data.io import read_ct

    row.update(probe_header(case.image))
    try:
        image = read_ct(case.image, case.name, max_voxels=max_voxels)
    except READ_ERRORS as exc:
        row["read_error"] = describe_error(exc)
        return
    row["readable"] = True
    row.update(geometry_stats(image))
    row.update(intensity_stats(image.array))
    lung = None
    if case.lung is not None:  # checked whenever given: later stages may use it
        row["lung_source"] = "manifest"
        lung = _read_overlay(case.lung, case.name, image, row, "lung", max_voxels)
    lesion = _read_overlay(case.mask, case.name, image, row, "mask", max_voxels) if case.mask is not None else None
    if lesion is None:
        return
    nonbinary = (lesion != 0) & (lesion != 1)
    row["mask_nonbinary_voxels"] = int(np.count_nonzero(nonbinary))
    row["mask_nonbinary_values"] = _value_sample(lesion[nonbinary])
    lesion_bool = lesion > 0.5
    del lesion, nonbinary
    row["lesion_voxels"] = int(np.count_nonzero(lesion_bool))
    row["lesion_volume_ml"] = round(row["lesion_voxels"] * image.voxel_volume_ml, 3)
    if case.lung is not None:
        if lung is not None:
            row["lesion_outside_lung_fraction"] = lesion_outside_fraction(lesion_bool, lung > 0.5)
    else:
        row.update(_lesion_outside_segmented_lung(image, lesion_bool, lung_segmenter))


def probe_header(path: Path) -> dict[str, Any]:
    """Dimensionality and spacing as a NIfTI header states them, without reading voxels.

    Fills ``ndim`` / ``shape`` / spacing for files the reader refuses (a 2D or 4D image, a zero
    or negative spacing), so the report can name the precise problem. The raw ``pixdim`` is used
    because nibabel silently "fixes" zero and negative values on load. Trailing singleton axes
    beyond the third are not counted. Returns {} for anything that is not a parsable NIfTI.
    """
    import nibabel as nib
    from nibabel.imageglobals import LoggingOutputSuppressor
    from nibabel.openers import ImageOpener

    if not path.name.lower().endswith((".nii", ".nii.gz")):
        return {}
    try:
        with LoggingOutputSuppressor():  # nibabel logs the pixdim it "fixes"
            header_class = type(nib.load(str(path)).header)
        with ImageOpener(str(path)) as handle:
            header = header_class.from_fileobj(handle, check=False)
        shape = tuple(int(s) for s in header.get_data_shape())
        pixdim = np.asarray(header["pixdim"][1:4], dtype=np.float64)
    except Exception:  # noqa: BLE001 - a header nibabel cannot parse: read_ct's message says why
        return {}
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    spatial = pixdim[: min(len(shape), 3)]
    return {
        "ndim": len(shape),
        "shape": shape_text(shape[:3][::-1] + shape[3:]),  # (Z, Y, X, ...) like CTVolume, if axis-aligned
        "spacing_mm": ",".join(f"{s:.4g}" for s in spatial[::-1]),
        "spacing_min_mm": float(spatial.min()) if spatial.size else float("nan"),
        "spacing_max_mm": float(spatial.max()) if spatial.size else float("nan"),
    }


def geometry_stats(volume: CTVolume) -> dict[str, Any]:
    """Shape, slice count and spacing (mm) of a canonical volume."""
    spacing = volume.spacing
    return {
        "ndim": volume.array.ndim,
        "shape": shape_text(volume.shape),
        "n_slices": volume.shape[0],
        "spacing_mm": ",".join(f"{s:.4g}" for s in spacing),
        "spacing_min_mm": float(min(spacing)),
        "spacing_max_mm": float(max(spacing)),
    }


def intensity_stats(array: np.ndarray) -> dict[str, Any]:
    """HU statistics and a coarse intensity kind of a finite volume (read_ct refuses NaN / inf).

    ``intensity_kind`` is ``"hu"`` unless the values look like another modality or encoding:
    ``"windowed_0_255"`` (all values in [0, 255]: an 8-bit display rendering) or
    ``"no_negative_values"`` (no value below 0, so no air: MR-like intensities, or CT stored
    without its rescale intercept).
    """
    values = array.ravel()
    sample = values[:: max(1, values.size // MAX_PERCENTILE_SAMPLES)]
    p01, p99 = np.percentile(sample, [1.0, 99.0])
    hu_min, hu_max = float(values.min()), float(values.max())
    return {
        "hu_min": hu_min,
        "hu_p01": float(p01),
        "hu_p99": float(p99),
        "hu_max": hu_max,
        "intensity_kind": classify_intensity(hu_min, hu_max),
    }


def classify_intensity(hu_min: float, hu_max: float) -> str:
    """``hu`` | ``windowed_0_255`` | ``no_negative_values`` (see :func:`intensity_stats`)."""
    low, high = WINDOWED_RANGE
    if hu_min >= low and hu_max <= high:
        return "windowed_0_255"
    if hu_min >= 0.0:
        return "no_negative_values"
    return "hu"


def lesion_outside_fraction(lesion: np.ndarray, lung: np.ndarray) -> float:
    """Fraction of lesion voxels outside the lung (boolean ``(Z, Y, X)`` arrays); 0.0 when no lesion."""
    if lesion.shape != lung.shape:
        raise ValueError(f"lesion shape {lesion.shape} differs from lung shape {lung.shape}")
    n_lesion = int(np.count_nonzero(lesion))
    if n_lesion == 0:
        return 0.0
    return int(np.count_nonzero(lesion & ~lung)) / n_lesion


def shape_text(shape: tuple[int, ...]) -> str:
    return "x".join(str(int(s)) for s in shape)


def describe_error(exc: BaseException) -> str:
    """The user-facing reason of a read failure (InputError's problem, else type + message)."""
    if isinstance(exc, InputError):
        return exc.problem
    return f"{type(exc).__name__}: {exc}".strip()


def _read_overlay(path: Path, name: str, image: CTVolume, row: dict[str, Any], prefix: str,
                  max_voxels: int) -> np.ndarray | None:
    """Read a mask into ``row[prefix_*]``; its values only when it has the image's shape."""
    from deepsc.data.io import grid_mismatch_mm, read_ct

    try:
        mask = read_ct(path, f"{name} ({prefix})", max_voxels=max_voxels)
    except READ_ERRORS as exc:
        row[f"{prefix}_error"] = describe_error(exc)
        return None
    row[f"{prefix}_shape"] = shape_text(mask.shape)
    if mask.shape != image.shape:
        return None
    offset_mm = grid_mismatch_mm(mask.affine, image.affine, image.shape)
    row[f"{prefix}_grid_offset_mm"] = offset_mm
    row[f"{prefix}_grid_offset_voxels"] = offset_mm / min(image.spacing)
    return mask.array


def _lesion_outside_segmented_lung(image: CTVolume, lesion: np.ndarray,
                                   lung_segmenter: LungSegmenter | None) -> dict[str, Any]:
    """Lesion fraction outside an automatic lung mask (only segmented when there is a lesion)."""
    if not lesion.any():
        return {"lung_source": "not needed (empty lesion mask)", "lesion_outside_lung_fraction": 0.0}
    if lung_segmenter is None:
        return {"lung_source": "unavailable"}
    try:
        lung = np.asarray(lung_segmenter(image)) > 0
    except InputError as exc:  # e.g. no lung found: a finding for this case, not a crash
        return {"lung_source": "lungseg", "lung_error": f"lung segmentation failed: {exc.problem}"}
    return {"lung_source": "lungseg", "lesion_outside_lung_fraction": lesion_outside_fraction(lesion, lung)}


def _value_sample(values: np.ndarray, limit: int = 5) -> str | None:
    """A few distinct offending values, for the report (None when there are none)."""
    if values.size == 0:
        return None
    distinct = np.unique(values[:: max(1, values.size // 100_000)])
    shown = ", ".join(f"{v:.4g}" for v in distinct[:limit])
    return shown + (", ..." if distinct.size > limit else "")
