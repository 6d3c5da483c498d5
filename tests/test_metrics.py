"""deepsc.metrics against hand-computed cases (anisotropic spacing, empty masks, a tiny classifier)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from deepsc.errors import InputError
from deepsc.metrics import classification_metrics, format_mean_std, format_summary, segmentation_metrics, summarize

SPACING = (2.5, 1.5, 1.0)  # (sz, sy, sx) mm; the shift below is along x, the finest axis


def cube(shape: tuple[int, int, int], corner: tuple[int, int, int], side: int) -> np.ndarray:
    mask = np.zeros(shape, dtype=np.uint8)
    z, y, x = corner
    mask[z : z + side, y : y + side, x : x + side] = 1
    return mask


def marching_cube_areas(side: int, sz: float, sy: float, sx: float) -> tuple[float, float]:
    """Surface-element areas (mm^2) of a voxel cube of `side` voxels, by hand.

    The subvoxel surface passes through the midpoints between inside and outside voxel centres:
    flat face cells (side-1)^2 per face with area = product of the two in-face spacings; edge
    cells (side-1) per edge, a bevelled strip of length s_edge and width half the diagonal of the
    cross-section; corner cells a triangle of area sqrt((sy sx)^2 + (sz sx)^2 + (sz sy)^2) / 8.
    Returns (total area, area of the cells on the low-x face: its face, 4 edges and 4 corners).
    """
    k = side - 1
    corner = math.sqrt((sy * sx) ** 2 + (sz * sx) ** 2 + (sz * sy) ** 2) / 8
    edge_z, edge_y, edge_x = sz * math.hypot(sy, sx) / 2, sy * math.hypot(sz, sx) / 2, sx * math.hypot(sz, sy) / 2
    total = 2 * k * k * (sz * sy + sz * sx + sy * sx) + 4 * k * (edge_z + edge_y + edge_x) + 8 * corner
    low_x_face = k * k * sz * sy + 2 * k * (edge_z + edge_y) + 4 * corner
    return total, low_x_face


def test_cube_shifted_one_voxel_along_x_has_known_rmsd_and_nsd():
    side = 4
    sz, sy, sx = SPACING
    truth = cube((10, 10, 10), (3, 3, 3), side)
    pred = cube((10, 10, 10), (3, 3, 4), side)

    # Surface voxels: the 56 = 4^3 - 2^3 shell voxels of each cube. Of A's shell, the low-x face
    # (16 voxels) and the inner 2 x 2 of the high-x face (4) are sx away from B's shell; all others
    # lie on B's shell. Same from B to A by symmetry.
    expected_rmsd = sx * math.sqrt((16 + 4) / 56)
    # Subvoxel surface: with tolerance < sx the low-x face cells and the inner (side-1)^2 cells of
    # the high-x face miss; every other element coincides with the other cube's surface.
    total, low_x_face = marching_cube_areas(side, sz, sy, sx)
    expected_nsd = 1 - (low_x_face + (side - 1) ** 2 * sz * sy) / total

    m = segmentation_metrics(pred, truth, SPACING, nsd_tolerance_mm=0.5)
    assert m["rmsd_mm"] == pytest.approx(expected_rmsd, rel=1e-6)
    assert m["nsd"] == pytest.approx(expected_nsd, rel=1e-5)
    assert m["dsc"] == pytest.approx(0.75)  # overlap 3 of 4 slabs
    assert m["sensitivity"] == pytest.approx(0.75)
    assert m["specificity"] == pytest.approx(1 - 16 / (1000 - 64))
    assert m["pred_volume_ml"] == pytest.approx(64 * sz * sy * sx / 1000)
    # every surface element is exactly sx from the other surface: NSD 1 from tolerance sx on
    assert segmentation_metrics(pred, truth, SPACING, nsd_tolerance_mm=sx)["nsd"] == pytest.approx(1.0)


def test_two_voxel_cube_shifted_along_the_coarse_axis():
    # every voxel is a surface voxel; half of each cube is sz away from the other, half at 0
    sz = 5.0
    truth = cube((6, 6, 6), (2, 2, 2), 2)
    pred = cube((6, 6, 6), (3, 2, 2), 2)
    m = segmentation_metrics(pred, truth, (sz, 0.7, 0.8), nsd_tolerance_mm=3.0)
    assert m["rmsd_mm"] == pytest.approx(sz / math.sqrt(2), rel=1e-6)
    assert 0.0 < m["nsd"] < 1.0
    assert m["dsc"] == pytest.approx(0.5)


def test_perfect_prediction():
    truth = cube((8, 9, 10), (2, 2, 3), 4)
    m = segmentation_metrics(truth.copy(), truth, (3.0, 0.8, 0.8), nsd_tolerance_mm=0.0)
    assert m["dsc"] == 1.0 and m["nsd"] == pytest.approx(1.0) and m["rmsd_mm"] == 0.0
    assert m["sensitivity"] == 1.0 and m["specificity"] == 1.0


def test_distant_false_positive_blob_costs_a_third_of_the_surface():
    # the prediction has the true cube and a copy far beyond the tolerance: NSD = (S + S) / (S + 2S)
    truth = cube((12, 20, 20), (2, 2, 2), 4)
    pred = truth | cube((12, 20, 20), (2, 12, 12), 4)
    m = segmentation_metrics(pred, truth, SPACING, nsd_tolerance_mm=3.0)
    assert m["nsd"] == pytest.approx(2 / 3, rel=1e-5)
    assert m["dsc"] == pytest.approx(2 / 3)


def test_empty_masks():
    empty = np.zeros((5, 6, 7), dtype=np.uint8)
    lesion = cube((5, 6, 7), (1, 1, 1), 2)

    both = segmentation_metrics(empty, empty, SPACING)
    assert (both["dsc"], both["nsd"], both["rmsd_mm"], both["specificity"]) == (1.0, 1.0, 0.0, 1.0)
    assert math.isnan(both["sensitivity"]) and both["pred_volume_ml"] == 0.0

    missed = segmentation_metrics(empty, lesion, SPACING)
    assert (missed["dsc"], missed["nsd"], missed["sensitivity"]) == (0.0, 0.0, 0.0)
    assert math.isnan(missed["rmsd_mm"])

    hallucinated = segmentation_metrics(lesion, empty, SPACING)
    assert (hallucinated["dsc"], hallucinated["nsd"]) == (0.0, 0.0)
    assert math.isnan(hallucinated["rmsd_mm"]) and math.isnan(hallucinated["sensitivity"])


@pytest.mark.parametrize(
    "pred, truth, spacing, tolerance, problem",
    [
        (np.zeros((4, 4, 4)), np.zeros((4, 4, 5)), SPACING, 3.0, "differs"),
        (np.full((4, 4, 4), 0.5), np.zeros((4, 4, 4)), SPACING, 3.0, "not a binary mask"),
        (np.zeros((4, 4)), np.zeros((4, 4)), SPACING, 3.0, "3D"),
        (np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), (1.0, 0.0, 1.0), 3.0, "spacing"),
        (np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), (1.0, 1.0), 3.0, "spacing"),
        (np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), SPACING, -1.0, "tolerance"),
    ],
)
def test_segmentation_rejects_bad_input(pred, truth, spacing, tolerance, problem):
    with pytest.raises(InputError, match=problem) as info:
        segmentation_metrics(pred, truth, spacing, nsd_tolerance_mm=tolerance, case_id="ct_0007")
    assert info.value.case == "ct_0007"


# ----------------------------------------------------------------------------- classification

Y_TRUE = [0, 0, 1, 1, 2, 2]
PROBS = np.array(
    [
        [0.70, 0.20, 0.10],  # covid -> covid
        [0.30, 0.60, 0.10],  # covid -> cap
        [0.20, 0.50, 0.30],  # cap -> cap
        [0.40, 0.35, 0.25],  # cap -> covid
        [0.10, 0.20, 0.70],  # normal -> normal
        [0.20, 0.10, 0.70],  # normal -> normal
    ]
)


def test_classification_by_hand():
    m = classification_metrics(Y_TRUE, PROBS)
    assert m["confusion_matrix"] == [[1, 1, 0], [1, 1, 0], [0, 0, 2]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    # covid: TP 1, FN 1, FP 1, TN 3
    assert (m["sensitivity_covid"], m["specificity_covid"], m["f1_covid"]) == pytest.approx((0.5, 0.75, 0.5))
    assert (m["sensitivity_normal"], m["specificity_normal"], m["f1_normal"]) == (1.0, 1.0, 1.0)
    # AUC = fraction of (positive, negative) pairs ranked correctly:
    # covid scores 0.7 beats all 4 negatives, 0.3 beats 3 of {0.2, 0.4, 0.1, 0.2} -> 7/8
    # cap scores 0.5 and 0.35 each beat 3 of {0.2, 0.6, 0.2, 0.1} -> 6/8; normal separates -> 1
    assert (m["auc_covid"], m["auc_cap"], m["auc_normal"]) == pytest.approx((7 / 8, 6 / 8, 1.0))
    assert m["auc_macro"] == pytest.approx((7 / 8 + 6 / 8 + 1) / 3)
    assert m["sensitivity_macro"] == pytest.approx(2 / 3)
    assert m["f1_macro"] == pytest.approx(2 / 3)
    assert m["n_scans"] == 6
    assert m["roc"]["normal"]["tpr"][-1] == 1.0 and m["roc"]["normal"]["fpr"][0] == 0.0
    assert all(math.isfinite(t) for t in m["roc"]["covid"]["thresholds"])


def test_classification_accepts_class_names():
    names = [("covid", "cap", "normal")[i] for i in Y_TRUE]
    assert classification_metrics(names, PROBS)["confusion_matrix"] == classification_metrics(Y_TRUE, PROBS)["confusion_matrix"]


def test_class_absent_from_truth_gives_nan_not_zero():
    m = classification_metrics([0, 0, 1, 1], PROBS[:4])
    assert math.isnan(m["auc_normal"]) and m["roc"]["normal"] == {"fpr": [], "tpr": [], "thresholds": []}
    assert math.isnan(m["sensitivity_normal"]) and math.isnan(m["f1_normal"])  # never present, never predicted
    assert m["specificity_normal"] == 1.0
    assert m["auc_macro"] == pytest.approx((m["auc_covid"] + m["auc_cap"]) / 2)


@pytest.mark.parametrize(
    "y_true, probs, problem",
    [
        ([0, 1], np.ones((3, 3)) / 3, "shape"),
        ([0, 3], np.ones((2, 3)) / 3, "unknown class"),
        (["covid", "flu"], np.ones((2, 3)) / 3, "unknown class"),
        ([0, 1], np.array([[0.5, np.nan, 0.5], [1, 0, 0]]), "NaN"),
        ([], np.zeros((0, 3)), "non-empty"),
    ],
)
def test_classification_rejects_bad_input(y_true, probs, problem):
    with pytest.raises(InputError, match=problem):
        classification_metrics(y_true, probs)


# ----------------------------------------------------------------------------- summaries


def test_summarize_excludes_non_finite_and_counts_them():
    table = pd.DataFrame(
        {"case_id": ["a", "b", "c"], "dsc": [0.8, 0.6, 0.0], "rmsd_mm": [2.0, 4.0, math.nan], "flag": [True, False, True]}
    )
    s = summarize(table)
    assert set(s) == {f"{m}_{k}" for m in ("dsc", "rmsd_mm") for k in ("mean", "std", "n", "excluded")}
    assert s["dsc_mean"] == pytest.approx(1.4 / 3) and s["dsc_std"] == pytest.approx(np.std([0.8, 0.6, 0.0], ddof=1))
    assert (s["rmsd_mm_mean"], s["rmsd_mm_n"], s["rmsd_mm_excluded"]) == (3.0, 2, 1)
    assert s["rmsd_mm_std"] == pytest.approx(math.sqrt(2))
    one = summarize({"dsc": [0.5]})
    assert one["dsc_mean"] == 0.5 and math.isnan(one["dsc_std"])
    with pytest.raises(InputError, match="nsd"):
        summarize(table, metrics=["nsd"])


def test_table_formatting():
    assert format_mean_std(0.7331, 0.1214) == "73.3 (12.1)"
    assert format_mean_std(2.84, 1.05, scale=1, digits=2) == "2.84 (1.05)"
    assert format_mean_std(math.nan, math.nan) == "n/a (n/a)"
    assert format_summary({"dsc_mean": 0.5, "dsc_std": 0.25}, "dsc") == "50.0 (25.0)"


def test_masks_touching_the_scan_border_measure_like_embedded_ones():
    # the border acts as background: a lesion cut by the field of view still has a closed surface
    truth, pred = cube((6, 7, 8), (0, 0, 0), 4), cube((6, 7, 8), (0, 0, 1), 4)
    embedded_truth, embedded_pred = (np.pad(m, 3) for m in (truth, pred))
    at_border = segmentation_metrics(pred, truth, SPACING, nsd_tolerance_mm=0.5)
    embedded = segmentation_metrics(embedded_pred, embedded_truth, SPACING, nsd_tolerance_mm=0.5)
    for key in ("dsc", "nsd", "rmsd_mm", "sensitivity"):
        assert at_border[key] == pytest.approx(embedded[key], rel=1e-6), key
