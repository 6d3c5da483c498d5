"""`deepsc analyze`: lesion statistics of a cohort with lesion masks (the paper's Sec. III-B, Fig. 1).

Per scan (every statistic uses the real voxel spacing):

* **count** - 3D connected components of the lesion mask (26-connectivity). Components smaller
  than ``min_component_voxels`` (default 5) are dropped as annotation specks; every other
  statistic uses the same cleaned mask.
* **LVR** - lesion volume / lung volume.
* **bounding boxes** - width (x, left-right), length (y, antero-posterior) and height (z,
  cranio-caudal) of each component, in mm.
* **HU** - histogram of the image inside the lesions; fractions in the ground-glass band
  [-960, -600] HU, the consolidation band [-70, 140] HU and the paper's CAP bands
  [-970, -580] or [-70, 140] HU.
* **PLR** (eq. 1) - per slice, the lung mask minus its erosion by a disk of radius sigma mm is
  the peripheral band; PLR = lesion voxels in the band / all lesion voxels, for sigma 0..35 mm.
  Erosion by sigma keeps the lung pixels whose nearest non-lung pixel (2D Euclidean distance,
  in mm) is farther than sigma, so sigma = 0 gives an empty band and PLR 0.
* **centre spread** - standard deviation of the lesion centres (bounding-box centres, mm):
  the root-mean-square distance of the centres from their mean; 0 for one lesion.

A scan without lesions has count 0, LVR 0, and PLR / HU fractions / spread NaN (undefined: no
lesion voxel); class means skip NaN. The lung mask comes from the manifest's ``lung_path``, or
from :func:`deepsc.data.lungseg.segment_lungs_from_params` (the ``lungseg`` settings) when that
column is empty. Scans are read with :mod:`deepsc.data.io` and the manifest with
:func:`deepsc.data.manifest.load_manifest` (masks must overlay their image).

The paper does not say at which peripheral thickness its headline PLR (62.4 % COVID-19 vs
24.5 % CAP) is measured; Fig. 1 (i) spans 0 to 35 mm. We report sigma = 15 mm
(``HEADLINE_PLR_SIGMA_MM``): about the 1 to 2 cm subpleural rim radiologists call peripheral,
and the middle of the figure's range. Every other sigma is in ``per_case.csv`` and the figure.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from deepsc.errors import ConfigError, InputError

log = logging.getLogger(__name__)

HEADLINE_PLR_SIGMA_MM = 15.0
PLR_SIGMAS_MM = tuple(float(s) for s in range(0, 36, 5))
MIN_COMPONENT_VOXELS = 5
GGO_BAND_HU = (-960.0, -600.0)
CONSOLIDATION_BAND_HU = (-70.0, 140.0)
CAP_GGO_BAND_HU = (-970.0, -580.0)
LVR_BIN_EDGES = (0.0, 0.02, 0.04, 0.06, 0.08, 0.10, 0.12, 0.16, 0.20, 0.30, 1.0)
HU_HISTOGRAM_EDGES = np.arange(-1100.0, 301.0, 20.0)
LESION_CLASSES = ("covid", "cap")

# The paper's Sec. III-B numbers (fractions, not percent), compared side by side in summary.json.
PAPER_REFERENCE: dict[str, dict[str, float]] = {
    "covid": {
        "lesion_count_mean": 4.4,
        "fraction_4plus_lesions": 0.552,
        "lvr_mean": 0.143,
        "fraction_lvr_above_12pct": 0.50,
        "plr_mean": 0.624,
        "hu_fraction_ggo_band": 0.70,
    },
    "cap": {
        "lesion_count_mean": 1.7,
        "fraction_single_lesion": 0.548,
        "lvr_mean": 0.044,
        "fraction_lvr_above_12pct": 0.05,
        "plr_mean": 0.245,
        "hu_fraction_cap_bands": 0.75,
    },
}


@dataclass
class CaseLesionStats:
    """Lesion statistics of one scan (see the module docstring for definitions)."""

    case_id: str
    label: str
    lesion_count: int
    lvr: float
    lung_ml: float
    lesion_ml: float
    plr: dict[float, float]
    hu_fraction_ggo_band: float
    hu_fraction_consolidation_band: float
    hu_fraction_cap_bands: float
    centre_spread_mm: float
    boxes_mm: list[tuple[float, float, float]] = field(default_factory=list)
    hu_histogram: np.ndarray | None = None

    def row(self) -> dict[str, Any]:
        row = {
            "case_id": self.case_id,
            "label": self.label,
            "lesion_count": self.lesion_count,
            "lvr": self.lvr,
            "lung_ml": self.lung_ml,
            "lesion_ml": self.lesion_ml,
            "hu_fraction_ggo_band": self.hu_fraction_ggo_band,
            "hu_fraction_consolidation_band": self.hu_fraction_consolidation_band,
            "hu_fraction_cap_bands": self.hu_fraction_cap_bands,
            "centre_spread_mm": self.centre_spread_mm,
        }
        row.update({f"plr_{sigma:g}mm": value for sigma, value in sorted(self.plr.items())})
        return row


def lesion_components(lesion: np.ndarray, min_voxels: int = MIN_COMPONENT_VOXELS) -> tuple[np.ndarray, int]:
    """26-connected components of a ``(Z, Y, X)`` mask, those under `min_voxels` dropped.

    Returns ``(labels, n)``: int32 labels 1..n (0 background), numbered in scan order.
    An empty mask gives all zeros and n = 0.
    """
    from scipy import ndimage

    if lesion.ndim != 3:
        raise ValueError(f"expected a (Z, Y, X) mask, got shape {lesion.shape}")
    labels, n = ndimage.label(lesion > 0, structure=np.ones((3, 3, 3), dtype=bool))
    if n == 0:
        return labels.astype(np.int32), 0
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = np.flatnonzero(sizes >= max(1, min_voxels))
    keep = keep[keep > 0]
    relabel = np.zeros(n + 1, dtype=np.int32)
    relabel[keep] = np.arange(1, len(keep) + 1, dtype=np.int32)
    return relabel[labels], int(len(keep))


def peripheral_lesion_ratio(lesion: np.ndarray, lung: np.ndarray, spacing: tuple[float, float, float], sigmas_mm=PLR_SIGMAS_MM) -> dict[float, float]:
    """Eq. (1): share of lesion voxels in the per-slice peripheral lung band of thickness sigma.

    Args:
        lesion, lung: ``(Z, Y, X)`` masks on the same grid.
        spacing: ``(sz, sy, sx)`` mm; only the in-plane part matters (the erosion is 2D).
    Returns:
        ``{sigma_mm: PLR in [0, 1]}``; NaN for every sigma when the lesion mask is empty.
    """
    from scipy import ndimage

    if lesion.shape != lung.shape:
        raise ValueError(f"lesion {lesion.shape} and lung {lung.shape} masks differ in shape")
    lesion, lung = lesion > 0, lung > 0
    total = int(lesion.sum())
    if total == 0:
        return {float(s): math.nan for s in sigmas_mm}
    inside = {float(s): 0 for s in sigmas_mm}
    for z in np.flatnonzero(lesion.any(axis=(1, 2))):
        padded = np.pad(lung[z], 1)                     # the image border counts as non-lung
        depth = ndimage.distance_transform_edt(padded, sampling=spacing[1:])[1:-1, 1:-1]
        lesion_depth = depth[lesion[z]]                 # 0 for lesion voxels outside the lung
        for sigma in inside:
            inside[sigma] += int(np.count_nonzero((lesion_depth > 0) & (lesion_depth <= sigma)))
    return {sigma: count / total for sigma, count in inside.items()}


def centre_spread_mm(boxes_lo_hi: list[tuple[np.ndarray, np.ndarray]], spacing: tuple[float, float, float]) -> float:
    """RMS distance (mm) of the lesion bounding-box centres from their mean; NaN if no lesion."""
    if not boxes_lo_hi:
        return math.nan
    centres = np.array([(lo + hi) / 2.0 * np.asarray(spacing) for lo, hi in boxes_lo_hi])
    return float(np.sqrt(((centres - centres.mean(axis=0)) ** 2).sum(axis=1).mean()))


def case_lesion_stats(
    image_hu: np.ndarray,
    lesion: np.ndarray,
    lung: np.ndarray,
    spacing: tuple[float, float, float],
    case_id: str = "scan",
    label: str = "",
    min_component_voxels: int = MIN_COMPONENT_VOXELS,
    sigmas_mm=PLR_SIGMAS_MM,
) -> CaseLesionStats:
    """All statistics of one scan. Arrays are ``(Z, Y, X)`` on one grid; spacing in mm."""
    from scipy import ndimage

    if not (image_hu.shape == lesion.shape == lung.shape):
        raise InputError(case_id, f"image {image_hu.shape}, lesion {lesion.shape} and lung {lung.shape} differ in shape")
    voxel_ml = float(np.prod(spacing)) / 1000.0
    labels, count = lesion_components(lesion, min_component_voxels)
    cleaned = labels > 0
    lung_voxels = int(np.count_nonzero(lung))
    if lung_voxels == 0:
        raise InputError(case_id, "the lung mask is empty; the lesion volume ratio is undefined")
    lesion_voxels = int(cleaned.sum())
    objects = ndimage.find_objects(labels) if count else []
    boxes = [(np.array([s.start for s in box], float), np.array([s.stop - 1 for s in box], float)) for box in objects]
    sizes_mm = [tuple(float(v) for v in ((hi - lo + 1) * np.asarray(spacing))[::-1]) for lo, hi in boxes]  # (x, y, z)
    values = image_hu[cleaned]
    return CaseLesionStats(
        case_id=case_id,
        label=label,
        lesion_count=count,
        lvr=lesion_voxels / lung_voxels,
        lung_ml=lung_voxels * voxel_ml,
        lesion_ml=lesion_voxels * voxel_ml,
        plr=peripheral_lesion_ratio(cleaned, lung, spacing, sigmas_mm),
        hu_fraction_ggo_band=_fraction_in(values, [GGO_BAND_HU]),
        hu_fraction_consolidation_band=_fraction_in(values, [CONSOLIDATION_BAND_HU]),
        hu_fraction_cap_bands=_fraction_in(values, [CAP_GGO_BAND_HU, CONSOLIDATION_BAND_HU]),
        centre_spread_mm=centre_spread_mm(boxes, spacing),
        boxes_mm=sizes_mm,
        hu_histogram=np.histogram(values, bins=HU_HISTOGRAM_EDGES)[0],
    )


def _fraction_in(values: np.ndarray, bands: list[tuple[float, float]]) -> float:
    if values.size == 0:
        return math.nan
    inside = np.zeros(values.shape, dtype=bool)
    for low, high in bands:
        inside |= (values >= low) & (values <= high)
    return float(inside.mean())


# --- cohort -------------------------------------------------------------------------------

def analysis_settings(params: Mapping[str, Any]) -> tuple[float, int]:
    """``(analysis.plr_sigma_mm >= 0, analysis.min_component_voxels >= 0)``, checked."""
    settings = dict(params.get("analysis", {}) or {})
    sigma = settings.get("plr_sigma_mm", HEADLINE_PLR_SIGMA_MM)
    min_voxels = settings.get("min_component_voxels", MIN_COMPONENT_VOXELS)
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not 0 <= sigma < float("inf"):
        raise ConfigError(f"analysis.plr_sigma_mm must be a number of mm >= 0, got {sigma!r}")
    if isinstance(min_voxels, bool) or not isinstance(min_voxels, int) or min_voxels < 0:
        raise ConfigError(f"analysis.min_component_voxels must be an integer >= 0, got {min_voxels!r}")
    return float(sigma), int(min_voxels)


def analyze_cohort(manifest: Path, out_dir: Path, params: Mapping[str, Any]) -> dict[str, Any]:
    """Lesion statistics of every COVID-19 and CAP scan of `manifest` that has a lesion mask.

    Writes ``summary.json`` (per class means and fractions next to the paper's numbers with the
    relative error), ``per_case.csv`` and ``fig1_*.png`` (Fig. 1 d-i) into `out_dir`; returns
    the summary. Settings (optional ``analysis`` section): ``plr_sigma_mm`` (headline sigma),
    ``min_component_voxels``.
    """
    sigma, min_voxels = analysis_settings(params)
    sigmas = tuple(sorted(set(PLR_SIGMAS_MM) | {sigma}))
    from deepsc.data.manifest import load_manifest

    rows = load_manifest(manifest).to_dict("records")
    stats: list[CaseLesionStats] = []
    for row in rows:
        if row["label"] not in LESION_CLASSES:
            continue
        if not row["mask_path"]:
            log.warning("%s: %s scan without a lesion mask, left out of the analysis", row["case_id"], row["label"])
            continue
        stats.append(_analyze_row(row, params, min_voxels, sigmas))
    if not stats:
        raise InputError(str(manifest), "no COVID-19 or CAP scan with a lesion mask to analyse")
    summary = summarize(stats, sigma) | {"manifest": str(manifest), "min_component_voxels": min_voxels}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_per_case(stats, out_dir / "per_case.csv")
    _write_json(summary, out_dir / "summary.json")
    plot_fig1(stats, sigma, out_dir)
    return summary


def _analyze_row(row: Mapping[str, str], params: Mapping[str, Any], min_voxels: int, sigmas) -> CaseLesionStats:
    from deepsc.data.io import read_ct, read_mask

    case_id = row["case_id"]
    image = read_ct(row["image_path"], case_id)
    lesion = read_mask(row["mask_path"], image, case_id, binarize=True)
    if row["lung_path"]:
        lung = read_mask(row["lung_path"], image, case_id, binarize=True)
    else:
        from deepsc.data.lungseg import segment_lungs_from_params

        lung = segment_lungs_from_params(image, dict(params.get("lungseg", {}) or {}))
    return case_lesion_stats(image.array, lesion > 0, lung > 0, image.spacing, case_id, row["label"], min_voxels, sigmas)


def summarize(stats: list[CaseLesionStats], sigma_mm: float) -> dict[str, Any]:
    """Per class means and fractions, next to the paper's numbers (fractions, not percent)."""
    classes: dict[str, Any] = {}
    for label in LESION_CLASSES:
        group = [s for s in stats if s.label == label]
        if not group:
            continue
        counts = np.array([s.lesion_count for s in group])
        lvr = np.array([s.lvr for s in group])
        measured = {
            "scans": len(group),
            "lesion_count_mean": float(counts.mean()),
            "fraction_single_lesion": float(np.mean(counts == 1)),
            "fraction_4plus_lesions": float(np.mean(counts >= 4)),
            "lvr_mean": float(lvr.mean()),
            "fraction_lvr_above_12pct": float(np.mean(lvr > 0.12)),
            "plr_mean": _nanmean([s.plr[sigma_mm] for s in group]),
            "hu_fraction_ggo_band": _pooled_fraction(group, "hu_fraction_ggo_band"),
            "hu_fraction_consolidation_band": _pooled_fraction(group, "hu_fraction_consolidation_band"),
            "hu_fraction_cap_bands": _pooled_fraction(group, "hu_fraction_cap_bands"),
            "plr_mean_by_sigma_mm": {f"{k:g}": _nanmean([s.plr[k] for s in group]) for k in sorted(group[0].plr)},
            "centre_spread_mm_by_lvr_bin": _spread_by_lvr_bin(group),
            "box_mm_p5_p95": _box_percentiles(group),
        }
        reference = PAPER_REFERENCE[label]
        comparison = {
            key: {"paper": ref, "measured": measured[key], "relative_error": abs(measured[key] - ref) / ref}
            for key, ref in reference.items()
        }
        classes[label] = {"measured": measured, "vs_paper": comparison}
    return {"plr_sigma_mm": sigma_mm, "classes": classes}


def _nanmean(values) -> float:
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else math.nan


def _pooled_fraction(group: list[CaseLesionStats], attribute: str) -> float:
    """Share of the class's whole lesion volume in a HU band: per-scan fractions weighted by
    lesion volume (scans without lesions carry no weight)."""
    pairs = [(getattr(s, attribute), s.lesion_ml) for s in group if s.lesion_ml > 0]
    if not pairs:
        return math.nan
    fractions, weights = zip(*pairs)
    return float(np.average(fractions, weights=weights))


def _lvr_bin_names() -> list[str]:
    return [f"{100 * low:g}-{100 * high:g}%" for low, high in zip(LVR_BIN_EDGES[:-1], LVR_BIN_EDGES[1:])]


def _spread_by_lvr_bin(group: list[CaseLesionStats]) -> dict[str, float]:
    """Mean centre spread (mm) of the scans with >= 2 lesions in each LVR group (Fig. 1 h)."""
    result = {}
    for name, low, high in zip(_lvr_bin_names(), LVR_BIN_EDGES[:-1], LVR_BIN_EDGES[1:]):
        spreads = [s.centre_spread_mm for s in group if low <= s.lvr < high and s.lesion_count >= 2]
        if spreads:
            result[name] = float(np.mean(spreads))
    return result


def _box_percentiles(group: list[CaseLesionStats]) -> dict[str, list[float]]:
    boxes = np.array([b for s in group for b in s.boxes_mm])
    if boxes.size == 0:
        return {}
    return {name: [float(np.percentile(boxes[:, i], 5)), float(np.percentile(boxes[:, i], 95))] for i, name in enumerate(("width", "length", "height"))}


def _write_per_case(stats: list[CaseLesionStats], path: Path) -> None:
    from deepsc.data.volume import atomic_write_bytes

    rows = [s.row() for s in stats]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(path, buffer.getvalue().encode())


def _write_json(payload: Mapping[str, Any], path: Path) -> None:
    from deepsc.data.volume import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(payload, indent=2, sort_keys=True, allow_nan=True) + "\n").encode())


# --- figures (Fig. 1 d-i) -----------------------------------------------------------------

def plot_fig1(stats: list[CaseLesionStats], sigma_mm: float, out_dir: Path) -> list[Path]:
    """Fig. 1 (d) lesion counts, (e) lesion box sizes, (f) HU curves, (g) LVR histogram,
    (h) centre spread by LVR group, (i) PLR vs peripheral thickness; one PNG each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"covid": "tab:red", "cap": "tab:blue"}
    groups = {label: [s for s in stats if s.label == label] for label in LESION_CLASSES}
    groups = {k: v for k, v in groups.items() if v}
    written = []

    def save(fig, name: str) -> None:
        path = out_dir / name
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
        plt.close(fig)
        from deepsc.data.volume import atomic_write_bytes

        atomic_write_bytes(path, buffer.getvalue())
        written.append(path)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    top = max(s.lesion_count for s in stats) + 1
    for i, (label, group) in enumerate(groups.items()):
        counts = np.bincount([s.lesion_count for s in group], minlength=top + 1)[1:]
        ax.bar(np.arange(1, top + 1) + (i - 0.5) * 0.4, counts / len(group), width=0.4, color=colours[label], label=label)
    ax.set(xlabel="lesions per scan", ylabel="fraction of scans", title="(d) lesion count")
    ax.legend()
    save(fig, "fig1_d_lesion_count.png")

    fig = plt.figure(figsize=(5, 4.5))
    ax3 = fig.add_subplot(projection="3d")
    for label, group in groups.items():
        boxes = np.array([b for s in group for b in s.boxes_mm])
        if boxes.size:
            ax3.scatter(boxes[:, 0], boxes[:, 1], boxes[:, 2], s=6, color=colours[label], label=label)
    ax3.set(xlabel="width (mm)", ylabel="length (mm)", zlabel="height (mm)", title="(e) lesion bounding boxes")
    ax3.legend()
    save(fig, "fig1_e_lesion_size.png")

    fig, ax = plt.subplots(figsize=(5, 3.5))
    centres = (HU_HISTOGRAM_EDGES[:-1] + HU_HISTOGRAM_EDGES[1:]) / 2
    for label, group in groups.items():
        histogram = np.sum([s.hu_histogram for s in group], axis=0).astype(float)
        ax.plot(centres, histogram / max(histogram.sum(), 1), color=colours[label], label=label)
    ax.set(xlabel="CT value (HU)", ylabel="fraction of lesion voxels", title="(f) CT values in lesions")
    ax.legend()
    save(fig, "fig1_f_hu.png")

    fig, ax = plt.subplots(figsize=(5, 3.5))
    edges = np.arange(0.0, 42.0, 2.0)                  # 2 % groups, the last one open-ended
    for label, group in groups.items():
        ax.hist(np.clip([100 * s.lvr for s in group], 0, 39.9), bins=edges, alpha=0.5, color=colours[label], label=label)
    ax.set(xlabel="lesion volume ratio (%)", ylabel="scans", title="(g) lesion volume ratio")
    ax.legend()
    save(fig, "fig1_g_lvr.png")

    fig, ax = plt.subplots(figsize=(5, 3.5))
    spreads = {label: _spread_by_lvr_bin(group) for label, group in groups.items()}
    bins = [b for b in _lvr_bin_names() if any(b in spread for spread in spreads.values())]
    for i, (label, spread) in enumerate(spreads.items()):
        heights = [spread.get(b, 0.0) for b in bins]
        ax.bar(np.arange(len(bins)) + (i - 0.5) * 0.4, heights, width=0.4, color=colours[label], label=label)
    ax.set_xticks(np.arange(len(bins)), bins, rotation=45)
    ax.set(xlabel="LVR group (scans with >= 2 lesions)", ylabel="std of lesion centres (mm)", title="(h) spatial spread")
    ax.legend()
    save(fig, "fig1_h_spread.png")

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, group in groups.items():
        sigmas = sorted(group[0].plr)
        ax.plot(sigmas, [100 * _nanmean([s.plr[k] for s in group]) for k in sigmas], "o-", color=colours[label], label=label)
    ax.axvline(sigma_mm, color="grey", linestyle=":", label=f"headline sigma {sigma_mm:g} mm")
    ax.set(xlabel="peripheral thickness sigma (mm)", ylabel="PLR (%)", title="(i) peripheral lesion ratio")
    ax.legend()
    save(fig, "fig1_i_plr.png")
    return written


# --- CLI ----------------------------------------------------------------------------------

def add_cli(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", type=Path, default=None, help="cohort manifest (default: params paths.manifest)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: <outputs>/analysis)")


def run_cli(args: argparse.Namespace, params: Mapping[str, Any]) -> int:
    from deepsc.config import outputs_dir

    manifest = args.manifest or Path(params.get("paths", {}).get("manifest", "data/manifest.csv"))
    out = args.out or outputs_dir(params) / "analysis"
    summary = analyze_cohort(manifest, out, params)
    for label, block in summary["classes"].items():
        for key, row in block["vs_paper"].items():
            print(f"{label:6s} {key:28s} paper {row['paper']:.3f}  measured {row['measured']:.3f}  rel. err {row['relative_error']:.0%}")
    return 0
