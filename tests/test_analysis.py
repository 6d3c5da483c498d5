"""Lesion analysis (paper Sec. III-B): hand-made masks with known answers, and the cohort stage."""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

from deepsc.errors import InputError

SPACING = (2.0, 1.0, 1.0)   # (sz, sy, sx) mm


def block(shape=(10, 40, 40)) -> np.ndarray:
    return np.zeros(shape, dtype=bool)


def lung_slab(shape=(10, 40, 40), margin=2) -> np.ndarray:
    lung = block(shape)
    lung[:, margin:-margin, margin:-margin] = True
    return lung


# --- connected components -----------------------------------------------------------------

def test_two_cubes_are_two_lesions():
    from deepsc.data.analysis import lesion_components

    mask = block()
    mask[1:4, 5:10, 5:10] = True
    mask[5:8, 20:25, 20:25] = True
    labels, count = lesion_components(mask)
    assert count == 2 and set(np.unique(labels)) == {0, 1, 2}


def test_diagonal_neighbours_are_one_lesion_with_26_connectivity():
    from deepsc.data.analysis import lesion_components

    mask = block()
    mask[2:4, 2:4, 2:4] = True
    mask[4:6, 4:6, 4:6] = True          # touches the first cube only at a corner
    assert lesion_components(mask)[1] == 1


def test_specks_below_the_minimum_size_are_dropped():
    from deepsc.data.analysis import lesion_components

    mask = block()
    mask[2:5, 2:5, 2:5] = True
    mask[8, 30, 30] = True              # one voxel
    assert lesion_components(mask, min_voxels=5)[1] == 1
    assert lesion_components(mask, min_voxels=1)[1] == 2


# --- per-scan statistics ------------------------------------------------------------------

def test_known_lvr_volumes_and_boxes():
    from deepsc.data.analysis import case_lesion_stats

    lung = block()
    lung[:, 10:30, 10:30] = True                        # 10 * 20 * 20 = 4000 voxels
    lesion = block()
    lesion[2:4, 12:17, 12:22] = True                   # 2 * 5 * 10 = 100 voxels
    image = np.full(lung.shape, -850.0, np.float32)
    image[lesion] = -700.0
    stats = case_lesion_stats(image, lesion, lung, SPACING)
    assert stats.lesion_count == 1
    assert stats.lvr == pytest.approx(100 / 4000)
    assert stats.lung_ml == pytest.approx(4000 * 2.0 / 1000)
    assert stats.boxes_mm == [(10.0, 5.0, 4.0)]        # width x, length y, height z in mm
    assert stats.hu_fraction_ggo_band == 1.0 and stats.hu_fraction_consolidation_band == 0.0
    assert stats.centre_spread_mm == 0.0


def test_hu_bands_split_ground_glass_and_consolidation():
    from deepsc.data.analysis import case_lesion_stats

    lung = lung_slab()
    lesion = block()
    lesion[3:5, 10:20, 10:20] = True
    image = np.full(lung.shape, -850.0, np.float32)
    image[3] = -750.0                                   # half the lesion ground glass
    image[4] = 30.0                                     # half consolidation
    stats = case_lesion_stats(image, lesion, lung, SPACING)
    assert stats.hu_fraction_ggo_band == pytest.approx(0.5)
    assert stats.hu_fraction_consolidation_band == pytest.approx(0.5)
    assert stats.hu_fraction_cap_bands == pytest.approx(1.0)


def test_peripheral_and_central_lesions_give_known_plr():
    from deepsc.data.analysis import peripheral_lesion_ratio

    lung = lung_slab(margin=2)                          # lung x, y in [2, 38)
    peripheral = block()
    peripheral[4, 2:5, 15:25] = True                    # rows 2..4: 1..3 mm from the lung edge
    central = block()
    central[4, 18:22, 18:22] = True                     # about 16 mm from every edge
    plr_peripheral = peripheral_lesion_ratio(peripheral, lung, SPACING, (0.0, 3.0, 10.0))
    plr_central = peripheral_lesion_ratio(central, lung, SPACING, (0.0, 3.0, 10.0))
    assert plr_peripheral == {0.0: 0.0, 3.0: 1.0, 10.0: 1.0}
    assert plr_central == {0.0: 0.0, 3.0: 0.0, 10.0: 0.0}
    both = peripheral | central
    assert peripheral_lesion_ratio(both, lung, SPACING, (3.0,))[3.0] == pytest.approx(30 / 46)


def test_plr_uses_the_in_plane_spacing():
    from deepsc.data.analysis import peripheral_lesion_ratio

    lung = lung_slab(margin=2)
    lesion = block()
    lesion[4, 6, 15:25] = True                          # 5 pixels from the nearest non-lung row 1
    assert peripheral_lesion_ratio(lesion, lung, (2.0, 1.0, 1.0), (5.5,))[5.5] == 1.0   # 5 mm deep
    assert peripheral_lesion_ratio(lesion, lung, (2.0, 2.0, 2.0), (5.5,))[5.5] == 0.0   # 10 mm deep


def test_empty_lesion_mask_gives_zero_count_zero_lvr_and_nan_plr():
    from deepsc.data.analysis import case_lesion_stats

    lung = lung_slab()
    stats = case_lesion_stats(np.zeros(lung.shape, np.float32), block(), lung, SPACING)
    assert stats.lesion_count == 0 and stats.lvr == 0.0 and stats.boxes_mm == []
    assert all(math.isnan(v) for v in stats.plr.values())
    assert math.isnan(stats.hu_fraction_ggo_band) and math.isnan(stats.centre_spread_mm)


def test_empty_lung_and_shape_mismatch_are_input_errors():
    from deepsc.data.analysis import case_lesion_stats

    with pytest.raises(InputError, match="lung mask is empty"):
        case_lesion_stats(np.zeros((10, 40, 40), np.float32), block(), block(), SPACING, "ct_1")
    with pytest.raises(InputError, match="differ in shape"):
        case_lesion_stats(np.zeros((10, 40, 41), np.float32), block(), block(), SPACING, "ct_1")


def test_centre_spread_of_two_lesions():
    from deepsc.data.analysis import case_lesion_stats

    lung = lung_slab()
    lesion = block()
    lesion[4:6, 5:9, 5:9] = True                        # centre x = 6.5 mm
    lesion[4:6, 5:9, 25:29] = True                      # centre x = 26.5 mm
    stats = case_lesion_stats(np.zeros(lung.shape, np.float32), lesion, lung, SPACING)
    assert stats.centre_spread_mm == pytest.approx(10.0)


# --- cohort stage -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_manifest(tmp_path_factory) -> Path:
    from deepsc.data.synth import synthesize_cohort

    settings = {"seed": 11, "n_covid": 2, "n_cap": 1, "n_normal": 1, "inplane_size": 64,
                "inplane_spacing_mm": [5.0, 5.4], "slice_spacing_mm": [8.0, 9.0], "noise_hu": 18.0}
    return synthesize_cohort(tmp_path_factory.mktemp("analysis") / "data", {"synth": settings})


def absolute_rows(manifest: Path) -> list[dict[str, str]]:
    with manifest.open() as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        for key in ("image_path", "mask_path", "lung_path"):
            row[key] = str(manifest.parent / row[key]) if row[key] else ""
    return rows


def write_rows(rows: list[dict[str, str]], path: Path) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_analyze_cohort_writes_summary_table_and_figures(tiny_manifest, tmp_path):
    from deepsc.data.analysis import analyze_cohort

    out = tmp_path / "analysis"
    summary = analyze_cohort(tiny_manifest, out, {})
    assert set(summary["classes"]) == {"covid", "cap"}
    covid = summary["classes"]["covid"]
    assert covid["measured"]["scans"] == 2
    row = covid["vs_paper"]["lesion_count_mean"]
    assert row["paper"] == 4.4 and row["relative_error"] == pytest.approx(abs(row["measured"] - 4.4) / 4.4)
    assert json.loads((out / "summary.json").read_text())["plr_sigma_mm"] == 15.0
    with (out / "per_case.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["label"] for r in rows] == ["covid", "covid", "cap"] and "plr_15mm" in rows[0]
    for name in ("d_lesion_count", "e_lesion_size", "f_hu", "g_lvr", "h_spread", "i_plr"):
        assert (out / f"fig1_{name}.png").read_bytes()[:4] == b"\x89PNG"


def test_headline_sigma_comes_from_the_settings(tiny_manifest, tmp_path):
    from deepsc.data.analysis import analyze_cohort

    summary = analyze_cohort(tiny_manifest, tmp_path / "a", {"analysis": {"plr_sigma_mm": 12.0}})
    assert summary["plr_sigma_mm"] == 12.0
    assert "12" in summary["classes"]["covid"]["measured"]["plr_mean_by_sigma_mm"]


def test_missing_lung_path_falls_back_to_lung_segmentation(tiny_manifest, tmp_path, monkeypatch):
    from deepsc.data.analysis import analyze_cohort

    calls = []

    def segment_lungs_from_params(volume, settings):
        calls.append((volume.case_id, settings))
        return (volume.array < -400).astype(np.uint8)

    fake = types.SimpleNamespace(segment_lungs_from_params=segment_lungs_from_params)
    monkeypatch.setitem(sys.modules, "deepsc.data.lungseg", fake)
    rows = absolute_rows(tiny_manifest)
    for row in rows:
        row["lung_path"] = ""
    manifest = write_rows(rows, tmp_path / "manifest.csv")
    analyze_cohort(manifest, tmp_path / "out", {"lungseg": {"backend": "threshold"}})
    assert len(calls) == 3 and calls[0][1] == {"backend": "threshold"}


def test_bad_manifests_are_input_errors(tmp_path, tiny_manifest):
    from deepsc.data.analysis import analyze_cohort

    with pytest.raises(InputError, match="not found"):
        analyze_cohort(tmp_path / "nope.csv", tmp_path / "out", {})
    broken = tmp_path / "broken.csv"
    broken.write_text(tiny_manifest.read_text().replace("masks/synth_0000", "masks/missing"))
    with pytest.raises(InputError, match="mask_path not found"):
        analyze_cohort(broken, tmp_path / "out", {})
    normals_only = write_rows([r for r in absolute_rows(tiny_manifest) if r["label"] == "normal"], tmp_path / "normals.csv")
    with pytest.raises(InputError, match="no COVID-19 or CAP scan"):
        analyze_cohort(normals_only, tmp_path / "out", {})


def test_cli_prints_paper_vs_measured(tiny_manifest, tmp_path, capsys):
    from deepsc.data.analysis import add_cli, run_cli

    parser = argparse.ArgumentParser()
    add_cli(parser)
    args = parser.parse_args(["--manifest", str(tiny_manifest), "--out", str(tmp_path / "cli")])
    assert run_cli(args, {}) == 0
    assert "lesion_count_mean" in capsys.readouterr().out


# --- acceptance: the default synthetic cohort reproduces the paper's findings -------------

ACCEPTANCE = {
    "covid": ("lesion_count_mean", "fraction_4plus_lesions", "lvr_mean", "fraction_lvr_above_12pct", "plr_mean", "hu_fraction_ggo_band"),
    "cap": ("lesion_count_mean", "fraction_single_lesion", "lvr_mean", "plr_mean", "hu_fraction_cap_bands"),
}


@pytest.mark.slow
def test_default_cohort_reproduces_the_papers_lesion_findings(tmp_path, params):
    """Sec. III-B within 20 % relative on the default cohort (30 scans per class)."""
    from deepsc.data.analysis import analyze_cohort
    from deepsc.data.synth import synthesize_cohort

    started = time.process_time()
    manifest = synthesize_cohort(tmp_path / "data", {"synth": params["synth"]})
    print(f"default cohort generated in {time.process_time() - started:.1f} s of CPU")
    summary = analyze_cohort(manifest, tmp_path / "analysis", params)
    failures = []
    for label, keys in ACCEPTANCE.items():
        for key in keys:
            row = summary["classes"][label]["vs_paper"][key]
            print(f"{label} {key}: paper {row['paper']:.3f} measured {row['measured']:.3f}")
            if row["relative_error"] > 0.20:
                failures.append(f"{label} {key}: paper {row['paper']} measured {row['measured']:.3f}")
    # 5 % of 30 scans is 1.5 scans: hold CAP LVR > 12 % to one or two scans instead
    assert 1 <= round(summary["classes"]["cap"]["measured"]["fraction_lvr_above_12pct"] * 30) <= 2
    assert not failures, failures
    # Finding 4: COVID-19 lesions scatter more than CAP lesions
    covid = summary["classes"]["covid"]["measured"]["centre_spread_mm_by_lvr_bin"]
    cap = summary["classes"]["cap"]["measured"]["centre_spread_mm_by_lvr_bin"]
    assert np.mean(list(covid.values())) > 1.5 * np.mean(list(cap.values()))
