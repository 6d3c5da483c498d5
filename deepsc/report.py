"""Figures and self-contained HTML for people: the diagnosis report and the evaluation report.

Every figure is rendered with matplotlib's Agg backend into PNG bytes; the HTML pages embed them
as base64 ``data:`` URIs, so one file can be mailed or archived without its folder.

Display conventions (volumes are canonical LPS ``(Z, Y, X)``, see :mod:`deepsc.data.volume`):

* axial slice ``array[z]`` is shown as stored: anterior at the top, the patient's right on the
  left of the image (radiological convention);
* coronal slice ``array[:, y, :]`` is shown with superior at the top, patient's right on the left;
* pixels keep their physical aspect ratio (``spacing`` in mm);
* CT is shown in a lung window (level -600 HU, width 1500 HU).
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

LUNG_WINDOW_HU = (-1350.0, 150.0)
LESION_RGBA = (1.0, 0.15, 0.1, 0.45)
DISCLAIMER = "research use, not for clinical diagnosis"


# ----------------------------------------------------------------------------- primitives


def figure_png(fig: Any, dpi: int = 110) -> bytes:
    """PNG bytes of a matplotlib figure (closed afterwards)."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _window(hu: np.ndarray) -> np.ndarray:
    low, high = LUNG_WINDOW_HU
    return np.clip((hu.astype(np.float32) - low) / (high - low), 0.0, 1.0)


def score_text(score: float) -> str:
    """A class score as people should read it: whole percent, never "100 %" or "0 %".

    The scores are the network's softmax outputs, not calibrated probabilities: more digits
    would claim a precision they do not have."""
    percent = 100.0 * float(score)
    if percent > 99.0:
        return "> 99 %"
    if percent < 1.0:
        return "< 1 %"
    return f"{percent:.0f} %"


def _overlay(ax: Any, background_hu: np.ndarray, mask: np.ndarray | None, heat: np.ndarray | None, aspect: float,
             title: str, origin: str = "upper") -> None:
    """CT in the lung window, optional heat map (evidence) and lesion mask outline/fill.

    The outline is drawn in the pixel coordinates imshow uses for either ``origin`` (contour's
    own ``origin`` argument would mirror it top to bottom against the fill)."""
    ax.imshow(_window(background_hu), cmap="gray", vmin=0, vmax=1, aspect=aspect, origin=origin, interpolation="nearest")
    if heat is not None:
        ax.imshow(np.ma.masked_less(heat, 0.05), cmap="jet", vmin=0, vmax=1, alpha=0.45, aspect=aspect, origin=origin,
                  interpolation="bilinear")
    if mask is not None and mask.any():
        rgba = np.zeros((*mask.shape, 4), dtype=np.float32)
        rgba[mask > 0] = LESION_RGBA
        ax.imshow(rgba, aspect=aspect, origin=origin, interpolation="nearest")
        ax.contour(mask > 0, levels=[0.5], colors=["red"], linewidths=0.8)
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()


# ----------------------------------------------------------------------------- diagnosis


def representative_slices(lesion: np.ndarray | None, lung: np.ndarray, count: int = 3) -> list[int]:
    """Axial slices to show: those with the largest lesion area (spread out), else through the lungs.

    Args:
        lesion: ``(Z, Y, X)`` mask or None; lung: ``(Z, Y, X)`` mask.
    """
    source = lesion if lesion is not None and lesion.any() else lung
    area = source.reshape(source.shape[0], -1).sum(axis=1, dtype=np.int64)
    occupied = np.flatnonzero(area)
    if occupied.size == 0:
        return [source.shape[0] // 2]
    if source is lung:
        return sorted({int(v) for v in np.linspace(occupied[0], occupied[-1], count + 2)[1:-1].round()})
    chosen: list[int] = []
    min_gap = max(1, (occupied[-1] - occupied[0]) // (2 * count))
    for z in np.argsort(-area, kind="stable"):
        if area[z] == 0 or len(chosen) == count:
            break
        if all(abs(int(z) - c) >= min_gap for c in chosen):
            chosen.append(int(z))
    return sorted(chosen)


def slice_label(z: int, names: tuple[str, Sequence[int] | None] | None) -> str:
    """``"image 57"`` / ``"file slice 40"`` (:func:`deepsc.diagnose.slice_names`), else ``"slice z"``."""
    if names and names[1] is not None:
        return f"{names[0]} {names[1][z]}"
    return f"slice {z}"


def axial_figure(hu: np.ndarray, spacing: Sequence[float], lesion: np.ndarray | None, lung: np.ndarray,
                 evidence: Sequence[np.ndarray] | None, names: tuple[str, Sequence[int] | None] | None = None) -> bytes:
    """Axial views of the representative slices: lesions, and each evidence map (shown inside the
    lungs, the only region the model sees) when given. Slices are titled as the input's viewer
    numbers them (`names`)."""
    plt = _pyplot()
    slices = representative_slices(lesion, lung)
    rows = 1 + (len(evidence) if evidence else 0)
    fig, axes = plt.subplots(rows, len(slices), figsize=(3.2 * len(slices), 3.3 * rows), squeeze=False)
    aspect = spacing[1] / spacing[2]
    for col, z in enumerate(slices):
        label = slice_label(z, names)
        _overlay(axes[0, col], hu[z], None if lesion is None else lesion[z], None, aspect, f"{label}: lesions")
        for row, vmap in enumerate(evidence or [], start=1):
            _overlay(axes[row, col], hu[z], None, vmap[z] * (lung[z] > 0), aspect, f"{label}: evidence V{row}")
    fig.suptitle("Axial (anterior up, patient right on the left)", fontsize=10)
    return figure_png(fig)


def coronal_figure(hu: np.ndarray, spacing: Sequence[float], lesion: np.ndarray | None, lung: np.ndarray,
                   evidence: Sequence[np.ndarray] | None) -> bytes:
    """Coronal view through the row with the most lesion voxels (without lesions, the middle of
    the lungs): lesions, and the finest evidence map. (A mean row could fall between two lesions.)"""
    plt = _pyplot()
    if lesion is not None and lesion.any():
        y = int(np.argmax(lesion.sum(axis=(0, 2), dtype=np.int64)))
    elif lung.any():
        y = int(round(float(np.argwhere(lung).mean(axis=0)[1])))
    else:
        y = hu.shape[1] // 2
    panels = [("lesions", None if lesion is None else lesion[:, y, :], None)]
    if evidence:
        panels.append((f"evidence V{len(evidence)}", None, evidence[-1][:, y, :] * (lung[:, y, :] > 0)))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
    aspect = spacing[0] / spacing[2]
    for ax, (label, mask, heat) in zip(axes[0], panels):
        _overlay(ax, hu[:, y, :], mask, heat, aspect, f"coronal row {y}: {label}", origin="lower")
    fig.suptitle("Coronal (superior up, patient right on the left)", fontsize=10)
    return figure_png(fig)


def surface_figure(lung: np.ndarray, lesion: np.ndarray | None, spacing: Sequence[float], target_mm: float = 5.0) -> bytes:
    """3D view of the lungs (translucent) and the lesions (red), like Fig. 1a of the paper.

    Masks are reduced to about ``target_mm`` voxels (block maximum for lesions so small ones
    survive) and meshed with marching cubes; axes are in mm (x to the patient's left, y
    posterior, z superior).
    """
    from mpl_toolkits.mplot3d.art3d import Poly3DCollection

    plt = _pyplot()
    factors = tuple(max(1, int(round(target_mm / s))) for s in spacing)
    fig = plt.figure(figsize=(6.0, 5.5))
    ax = fig.add_subplot(111, projection="3d")
    coarse_spacing = [s * f for s, f in zip(spacing, factors)]
    meshes = [(_block_reduce(lung, factors, np.mean) >= 0.5, (0.45, 0.6, 0.9, 0.14), "lungs")]
    if lesion is not None and lesion.any():
        meshes.append((_block_reduce(lesion, factors, np.max) > 0, (0.9, 0.1, 0.1, 0.85), "lesions"))
    for mask, colour, _ in meshes:
        for verts, faces in _meshes(mask, coarse_spacing):
            ax.add_collection3d(Poly3DCollection(verts[faces][:, :, ::-1], facecolor=colour, edgecolor="none"))
    extent = np.array(lung.shape[::-1]) * np.array(spacing[::-1])
    ax.set_xlim(0, extent[0]); ax.set_ylim(extent[1], 0); ax.set_zlim(0, extent[2])  # noqa: E702
    ax.set_box_aspect(tuple(extent))
    ax.set_xlabel("x (mm, to patient left)", fontsize=7)
    ax.set_ylabel("y (mm, posterior)", fontsize=7)
    ax.set_zlabel("z (mm, superior)", fontsize=7)
    ax.tick_params(labelsize=6)
    ax.view_init(elev=15, azim=-60)
    ax.set_title("Lungs (blue) and lesions (red), 3D", fontsize=10)
    return figure_png(fig)


def _block_reduce(mask: np.ndarray, factors: Sequence[int], reducer: Any) -> np.ndarray:
    from skimage.measure import block_reduce

    return block_reduce(mask.astype(np.float32), tuple(factors), reducer)


def _meshes(mask: np.ndarray, spacing: Sequence[float]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Marching-cubes mesh of a binary mask, vertices in mm ``(z, y, x)``; [] when too thin."""
    from skimage.measure import marching_cubes

    if not mask.any():
        return []
    padded = np.pad(mask.astype(np.float32), 1)
    try:
        verts, faces, _, _ = marching_cubes(padded, 0.5, spacing=tuple(spacing))
    except (ValueError, RuntimeError):  # no surface at this level
        return []
    return [(verts - np.asarray(spacing), faces)]


def diagnosis_figures(hu: np.ndarray, spacing: Sequence[float], lesion: np.ndarray | None, lung: np.ndarray,
                      evidence: Sequence[np.ndarray] | None,
                      names: tuple[str, Sequence[int] | None] | None = None) -> dict[str, bytes]:
    """All figures of the diagnosis report (PNG bytes), keyed axial / coronal / surface."""
    return {
        "axial": axial_figure(hu, spacing, lesion, lung, evidence, names),
        "coronal": coronal_figure(hu, spacing, lesion, lung, evidence),
        "surface": surface_figure(lung, lesion, spacing),
    }


_STYLE = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1100px;margin:2em auto;color:#222;line-height:1.4}
h1{font-size:1.5em;margin-bottom:.2em} h2{font-size:1.15em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
.warn{background:#fff3cd;border:1px solid #e0c060;padding:.6em 1em;border-radius:4px}
table{border-collapse:collapse;margin:.5em 0} td,th{border:1px solid #ccc;padding:.25em .7em;text-align:left}
th{background:#f3f3f3} .num{text-align:right;font-variant-numeric:tabular-nums} img{max-width:100%}
.decision{font-size:1.3em;font-weight:600} .small{color:#666;font-size:.85em}
"""


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str] | None = None) -> str:
    def cell(value: Any, tag: str) -> str:
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        return f"<{tag}{' class=num' if numeric and tag == 'td' else ''}>{html.escape(_fmt(value))}</{tag}>"

    head = "<tr>" + "".join(cell(h, "th") for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(cell(v, "td") for v in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return "n/a" if not math.isfinite(value) else f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def diagnosis_html(summary: Mapping[str, Any], figures: Mapping[str, bytes]) -> str:
    """The clinician-readable report of one diagnosis (``diagnosis.json`` + figures) as HTML."""
    esc = html.escape
    case = esc(str(summary.get("case_id")))
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>DeepSC diagnosis: {case}</title>",
             f"<style>{_STYLE}</style></head><body>",
             f"<h1>DeepSC-COVID diagnosis: {case}</h1>",
             f"<p class=warn><b>{esc(DISCLAIMER.capitalize())}.</b> Automatic analysis by a research model; it has not been "
             "validated for patient care and must not guide it.</p>"]
    cls = summary.get("classification")
    parts.append("<h2>Classification</h2>")
    if cls:
        parts.append(f"<p class=decision>Model decision: {esc(cls['decision_label'])} "
                     f"(score {esc(score_text(cls['probabilities'][cls['decision']]))})</p>")
        parts.append(_table([(name, score_text(p)) for name, p in cls["probabilities"].items()], ("class", "model score")))
        parts.append("<p class=small>Scores are the network's outputs for the three classes (they add up to 100 %); "
                     "they are not calibrated probabilities of disease.</p>")
    else:
        parts.append("<p>This model has no classification output (segmentation-only model).</p>")
    lesions, severity = summary.get("lesions"), summary.get("severity")
    parts.append("<h2>Lesions</h2>")
    if lesions:
        rows = [("lesions (3D connected components)", lesions["count"]),
                ("total lesion volume (mL)", lesions["total_volume_ml"]),
                ("lung volume (mL)", lesions["lung_volume_ml"]),
                ("lesion volume ratio, LVR (%)", 100 * lesions["lvr"]),
                (f"peripheral lesion ratio, PLR at {lesions['plr_sigma_mm']:g} mm (%)",
                 None if lesions["plr"] is None else 100 * lesions["plr"]),
                ("severity (MosMedData CT-0..CT-4)", f"{severity['grade']}: {severity['description']}")]
        parts.append(_table(rows))
        if lesions["components"]:
            centre = "centroid_lps_mm" if all("centroid_lps_mm" in c for c in lesions["components"]) else "centroid_mm_zyx"
            centre_header = ("centre x, y, z (mm, scanner LPS as DICOM viewers show it)" if centre == "centroid_lps_mm"
                             else "centre z, y, x (mm from the first voxel)")
            comp = [(c["id"], c["volume_ml"], ", ".join(f"{v:.0f}" for v in c[centre]),
                     " x ".join(f"{v:.0f}" for v in c["extent_mm_zyx"])) for c in lesions["components"][:20]]
            parts.append(_table(comp, ("lesion", "volume (mL)", centre_header, "extent z x y x x (mm)")))
        slices = summary["slices"]
        parts.append(f"<p>{slices['with_lesion']} of {slices['count']} axial slices hold predicted lesion voxels"
                     f"{': ' + esc(slices['ranges_text']) if slices['ranges_text'] else ''}.</p>")
    else:
        parts.append("<p>This model has no segmentation output (classification-only model).</p>")
    found = bool(lesions and lesions["count"])
    decision = f"'{cls['decision_label']}'" if cls else "the decision"
    captions = {"axial": ("Axial slices with the largest lesion area: lesions (red)" if found else
                          "Axial slices through the lungs (no lesion found)")
                         + (f"; evidence maps V1 (coarse) to V3 (fine): where the classifier's features weighed most "
                            f"for {decision}, inside the lungs. Each map is scaled to its own maximum in this scan: "
                            "relative, not a measure of disease." if summary.get("classification") else "."),
                "coronal": "Coronal slice through the row with the most lesion voxels." if found else
                           "Coronal slice through the middle of the lungs (no lesion found).",
                "surface": "3D view of the segmented lungs and the predicted lesions."}
    parts.append("<h2>Images</h2>")
    for key, caption in captions.items():
        if key in figures:
            parts.append(f"<figure><img alt='{key}' src='{data_uri(figures[key])}'><figcaption class=small>{esc(caption)}"
                         "</figcaption></figure>")
    model, scan = summary.get("model", {}), summary.get("input", {})
    parts.append("<h2>Scan and model</h2>")
    parts.append(_table([("scan", scan.get("source")), ("voxels (z, y, x)", " x ".join(map(str, scan.get("shape_zyx", [])))),
                         ("spacing (mm)", " x ".join(f"{v:.3g}" for v in scan.get("spacing_mm", []))),
                         ("model", model.get("name")), ("model version", model.get("version")),
                         ("run time (s)", summary.get("timing", {}).get("seconds_total"))]))
    for warning in summary.get("warnings", []):
        parts.append(f"<p class=warn>{esc(warning)}</p>")
    parts.append(f"<p class=small>{esc(DISCLAIMER.capitalize())}. Generated by deepsc.</p></body></html>")
    return "\n".join(parts)


# ----------------------------------------------------------------------------- evaluation


def roc_figure(class_name: str, fpr: Sequence[float], tpr: Sequence[float], auc: float) -> bytes:
    """One-vs-rest ROC curve of one class."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.0, 4.0))
    ax.plot([0, 1], [0, 1], color="#999", linestyle="--", linewidth=0.8)
    if len(fpr):
        ax.plot(fpr, tpr, linewidth=1.8, label=f"AUC {auc:.3f}" if math.isfinite(auc) else "AUC n/a")
        ax.legend(loc="lower right")
    else:
        ax.text(0.5, 0.5, "undefined: the test set lacks\npositives or negatives", ha="center", va="center")
    ax.set_xlabel("1 - specificity (FPR)")
    ax.set_ylabel("sensitivity (TPR)")
    ax.set_title(f"ROC: {class_name} vs rest")
    ax.set_xlim(0, 1); ax.set_ylim(0, 1.02)  # noqa: E702
    return figure_png(fig)


def confusion_figure(matrix: Sequence[Sequence[int]], classes: Sequence[str]) -> bytes:
    """Confusion matrix (rows = actual, columns = predicted) with counts."""
    plt = _pyplot()
    counts = np.asarray(matrix, dtype=np.int64)
    fig, ax = plt.subplots(figsize=(4.2, 3.8))
    ax.imshow(counts, cmap="Blues")
    for (i, j), value in np.ndenumerate(counts):
        ax.text(j, i, str(value), ha="center", va="center", color="white" if value > counts.max() / 2 else "black")
    ax.set_xticks(range(len(classes)), classes)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title("Confusion matrix (test set)")
    return figure_png(fig)


def markdown_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def evaluation_html(title: str, sections: Sequence[tuple[str, str]],
                    tables: Mapping[str, tuple[Sequence[Sequence[Any]], Sequence[str]]], figures: Mapping[str, bytes]) -> str:
    """A self-contained evaluation page: text sections, tables, then figures.

    Args:
        sections: ``(heading, paragraph text)`` pairs.
        tables: heading -> ``(rows, header)``.
        figures: caption -> PNG bytes.
    """
    esc = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>{_STYLE}</style></head><body>",
             f"<h1>{esc(title)}</h1>"]
    for heading, text in sections:
        parts.append(f"<h2>{esc(heading)}</h2><p>{esc(text)}</p>")
    for heading, (rows, header) in tables.items():
        parts.append(f"<h2>{esc(heading)}</h2>{_table(rows, header)}")
    if figures:
        parts.append("<h2>Figures</h2>")
        for caption, png in figures.items():
            parts.append(f"<figure><img alt='{esc(caption)}' src='{data_uri(png)}'><figcaption class=small>{esc(caption)}"
                         "</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)
