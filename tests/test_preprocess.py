"""Preprocessing: window, crop, resampling, the inverse mapping, eq. 12, the incremental cohort."""

from __future__ import annotations

import os

import copy
import json

import numpy as np
import pandas as pd
import pytest
from test_lungseg import chest_phantom  # the chest phantom with known lungs and lesion

from deepsc.data.lungseg import dice
from deepsc.data.preprocess import (
    PreprocessSettings,
    cls_slice_indices,
    grow_mask,
    load_case,
    preprocess_case,
    preprocess_cohort,
    preprocess_volume_for_inference,
    resize,
    to_original_grid,
    window_hu,
)
from deepsc.data.volume import save_nifti
from deepsc.errors import ConfigError, InputError


@pytest.fixture(scope="module")
def phantom():
    return chest_phantom(spacing=(4.0, 2.5, 2.5))


@pytest.fixture(scope="module")
def case(phantom):
    from conftest import REPO_ROOT

    from deepsc.config import load_params

    params = load_params(REPO_ROOT / "params.yaml")
    return preprocess_case(phantom.volume, phantom.lesion, phantom.lung, params, true_lung=phantom.lung)


def with_preprocess(params, **changes):
    changed = copy.deepcopy(params)
    changed["preprocess"].update(changes)
    return changed


def test_window_maps_the_paper_range_to_unit_interval():
    hu = np.array([-3000.0, -1400.0, -600.0, 200.0, 1000.0])
    np.testing.assert_allclose(window_hu(hu, (-1400.0, 200.0)), [0.0, 0.0, 0.5, 1.0, 1.0])


def test_case_arrays_follow_the_contract(case, phantom, params):
    settings = PreprocessSettings.from_params(params)
    shape = tuple(case.meta["shape"])
    assert case.image.shape == case.lung.shape == case.lesion.shape == shape
    assert case.cls.shape == (settings.cls_slices, *settings.cls_size)
    assert 0.0 <= case.image.min() and case.image.max() <= 1.0
    # masked by the lung grown by mask_margin_mm: back on the scan grid, zero beyond the margin
    # (plus one output voxel of resampling blur), body tissue kept within it
    image = to_original_grid(case.image, case.meta, order=0)
    step = max(case.meta["spacing_mm"])
    beyond = ~grow_mask(phantom.lung, phantom.volume.spacing, settings.mask_margin_mm + step)
    assert beyond.any() and (image[beyond] == 0).all()
    near = grow_mask(phantom.lung, phantom.volume.spacing, settings.mask_margin_mm - step) & (phantom.lung == 0)
    assert (image[near] > 0).mean() > 0.5
    np.testing.assert_allclose(case.meta["spacing_mm"], settings.target_spacing_mm, rtol=0.1)
    assert case.meta["lung_dice"] == 1.0
    json.dumps(case.meta)  # serialisable


def test_patch_lesion_counts_add_up(case):
    counts = case.meta["patch_lesion_voxels"]
    assert len(counts) == len(case.meta["patch_starts"])
    assert sum(counts) == int(case.lesion.sum()) > 0


@pytest.mark.parametrize("order", [0, 1])
def test_masks_round_trip_to_the_original_grid(case, phantom, order):
    """2.5 mm -> 3 mm -> 2.5 mm in-plane and 4 -> 5 -> 4 mm slices: the lungs come back, and a
    29 mL lesion (about 1100 voxels, 12 slices of 5 mm) nearly so."""
    lung = to_original_grid(case.lung, case.meta, order=order)
    assert lung.shape == phantom.volume.shape
    assert lung.dtype == (np.float32 if order else np.uint8)
    assert dice(lung > 0.5, phantom.lung) > 0.95
    lesion = to_original_grid(case.lesion, case.meta, order=order)
    assert dice(lesion > 0.5, phantom.lesion) > 0.9
    shift = np.array(np.nonzero(lesion > 0.5)).mean(axis=1) - np.array(np.nonzero(phantom.lesion)).mean(axis=1)
    assert np.abs(shift).max() < 0.5  # voxels: no systematic offset


def test_native_spacing_only_crops(phantom, params):
    native = preprocess_case(phantom.volume, phantom.lesion, phantom.lung, with_preprocess(params, target_spacing_mm=None))
    start, stop = native.meta["crop_start"], native.meta["crop_stop"]
    assert native.meta["shape"] == [b - a for a, b in zip(start, stop)]
    np.testing.assert_array_equal(to_original_grid(native.lesion, native.meta), phantom.lesion)


def test_preprocessed_affine_locates_voxels_in_the_world(case, phantom):
    """meta["affine"] maps an output voxel to the same world point as the original voxel it samples."""
    start = np.array(case.meta["crop_start"], dtype=float)
    scale = (np.array(case.meta["crop_stop"]) - start) / np.array(case.meta["shape"])
    out_voxel = np.array([3.0, 5.0, 7.0])  # (z, y, x)
    original_voxel = start + (out_voxel + 0.5) * scale - 0.5
    world_out = np.array(case.meta["affine"]) @ np.r_[out_voxel[::-1], 1.0]
    world_in = phantom.volume.affine @ np.r_[original_voxel[::-1], 1.0]
    np.testing.assert_allclose(world_out, world_in, atol=1e-6)


def test_cls_slices_follow_eq_12():
    indices = cls_slice_indices(100, 16)  # step S / N = 6.25 slices, one per block centre
    assert len(indices) == 16 and set(np.diff(indices)) <= {6, 7}
    assert indices[0] == 3 and indices[-1] == 96
    # cell k of the classification grid covers slices [k S/N, (k+1) S/N): the centre falls inside
    assert all(k * 100 / 16 <= idx < (k + 1) * 100 / 16 for k, idx in enumerate(indices))
    few = cls_slice_indices(5, 8)
    assert len(few) == 8 and few[0] == 0 and few[-1] == 4


def test_resize_keeps_the_extent():
    ramp = np.broadcast_to(np.arange(10, dtype=np.float32)[:, None, None], (10, 4, 4))
    half = resize(ramp, (5, 4, 4), order=1)
    np.testing.assert_allclose(half[:, 0, 0], [0.5, 2.5, 4.5, 6.5, 8.5])  # centres of voxel pairs


def test_inference_needs_no_lesion(phantom, params):
    result = preprocess_volume_for_inference(phantom.volume, params)
    assert result.lesion is None and result.meta["patch_lesion_voxels"] is None
    assert dice(to_original_grid(result.lung, result.meta), phantom.lung) > 0.95


def test_bad_inputs_and_settings(phantom, params):
    with pytest.raises(InputError, match="phantom: lesion mask shape"):
        preprocess_case(phantom.volume, phantom.lesion[1:], phantom.lung, params)
    with pytest.raises(InputError, match="lung mask is empty"):
        preprocess_case(phantom.volume, None, np.zeros_like(phantom.lung), params)
    with pytest.raises(ConfigError, match="hu_window"):
        PreprocessSettings.from_params(with_preprocess(params, hu_window=[200, -1400]))
    with pytest.raises(ConfigError, match="unknown preprocess setting"):
        PreprocessSettings.from_params(with_preprocess(params, patch=[1, 2, 3]))
    with pytest.raises(ConfigError, match="patch_size"):
        PreprocessSettings.from_params(with_preprocess(params, patch_size=[16, 0, 64]))


# ----------------------------------------------------------------------------- cohort


def _write_cohort(folder, seeds=(0, 1, 2)):
    """A manifest of small phantoms: covid (lesion mask), cap (no mask), normal (no mask)."""
    rows = []
    for seed, label in zip(seeds, ("covid", "cap", "normal")):
        item = chest_phantom(spacing=(6.0, 4.0, 4.0), seed=seed, case_id=f"case{seed}")
        image = save_nifti(item.volume, folder / f"case{seed}.nii.gz")
        lung = save_nifti(item.volume.like(item.lung), folder / f"case{seed}_lung.nii.gz", dtype=np.uint8)
        mask = ""
        if label == "covid":
            mask = save_nifti(item.volume.like(item.lesion.astype(np.uint8)), folder / f"case{seed}_les.nii.gz", dtype=np.uint8).name
        rows.append({"case_id": f"case{seed}", "label": label, "image_path": image.name, "mask_path": mask, "lung_path": lung.name, "source": "phantom"})
    manifest = folder / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest


def _mtimes(out):
    return {p.parent.name: p.stat().st_mtime_ns for p in (out / "cases").glob("*/meta.json")}


def test_cohort_is_incremental_and_atomic(tmp_path, params):
    data, out = tmp_path / "data", tmp_path / "pre"
    data.mkdir()
    manifest = _write_cohort(data)
    index = pd.read_csv(preprocess_cohort(manifest, out, params))
    assert list(index.columns) == ["case_id", "label", "label_index", "has_mask", "case_dir", "content_hash"]
    assert index["has_mask"].tolist() == [True, False, True]  # cap without a mask is unknown; normal is all zeros
    assert index["label_index"].tolist() == [0, 1, 2]
    assert not (out / "cases/case1/lesion.npy").exists() and not load_case(out / "cases/case2").lesion.any()
    assert load_case(out / "cases/case0").meta["lung_dice"] > 0.9
    umask = os.umask(0o022)
    os.umask(umask)
    for path in (out / "index.csv", out / "cases/case0", *(out / "cases/case0").iterdir()):  # not mkstemp's 0600 / 0700
        assert path.stat().st_mode & 0o777 == (0o777 if path.is_dir() else 0o666) & ~umask, path
    before = _mtimes(out)

    preprocess_cohort(manifest, out, params)  # nothing changed: nothing rewritten
    assert _mtimes(out) == before

    item = chest_phantom(spacing=(6.0, 4.0, 4.0), seed=7, case_id="case1")  # change one case
    save_nifti(item.volume, data / "case1.nii.gz")
    preprocess_cohort(manifest, out, params)
    after = _mtimes(out)
    assert after["case0"] == before["case0"] and after["case2"] == before["case2"] and after["case1"] != before["case1"]

    table = pd.read_csv(manifest)  # drop a case: its output goes
    table[table.case_id != "case2"].to_csv(manifest, index=False)
    index = pd.read_csv(preprocess_cohort(manifest, out, params))
    assert index["case_id"].tolist() == ["case0", "case1"] and not (out / "cases/case2").exists()

    table = pd.read_csv(manifest, keep_default_na=False)  # relabel the maskless cap case normal: it gets
    table.loc[table.case_id == "case1", "label"] = "normal"  # a lesion map (all zeros) though its files are the same
    table.to_csv(manifest, index=False)
    index = pd.read_csv(preprocess_cohort(manifest, out, params))
    assert index["has_mask"].tolist() == [True, True] and not load_case(out / "cases/case1").lesion.any()
    table.loc[table.case_id == "case1", "label"] = "cap"  # and back: the lesion map goes again
    table.to_csv(manifest, index=False)
    preprocess_cohort(manifest, out, params)
    assert not (out / "cases/case1/lesion.npy").exists()

    changed = with_preprocess(params, cls_slices=8)  # a setting change redoes every case
    preprocess_cohort(manifest, out, changed)
    assert load_case(out / "cases/case0").cls.shape[0] == 8

    (data / "case0.nii.gz").write_bytes(b"not a nifti")  # a broken case: named, nothing half-written
    index_before = (out / "index.csv").read_bytes()
    with pytest.raises(InputError, match="case0"):
        preprocess_cohort(manifest, out, params)
    assert not list((out / "cases").glob(".tmp-*"))
    assert (out / "index.csv").read_bytes() == index_before


def test_a_dicom_file_row_is_redone_when_its_series_changes(tmp_path):
    """A manifest row may name one file of a DICOM series; the whole series is read, so the whole
    folder is what the cache key covers."""
    from broken_inputs import ct_phantom, write_dicom_series

    from deepsc.data.preprocess import _content_hash

    paths = write_dicom_series(tmp_path / "series", ct_phantom())
    row = pd.Series({"case_id": "d", "label": "normal", "image_path": str(paths[0]), "mask_path": "", "lung_path": ""})
    row = next(pd.DataFrame([row]).itertuples(index=False))
    before = _content_hash(row, "settings")
    paths[-1].write_bytes(paths[-1].read_bytes()[:-2] + b"\x00\x01")  # another slice's pixels change
    assert _content_hash(row, "settings") != before


def test_cli_preprocess(tmp_path, params):
    import yaml

    from deepsc.cli import main

    data = tmp_path / "data"
    data.mkdir()
    manifest = _write_cohort(data, seeds=(3,))
    settings = tmp_path / "params.yaml"
    settings.write_text(yaml.safe_dump({k: v for k, v in params.items() if k != "profile"}))
    out = tmp_path / "pre"
    assert main(["--params", str(settings), "preprocess", "--manifest", str(manifest), "--out", str(out)]) == 0
    assert pd.read_csv(out / "index.csv")["case_id"].tolist() == ["case3"]


@pytest.mark.realct
@pytest.mark.slow
def test_real_scan_round_trip(real_ct_dir, params):
    from deepsc.data.io import read_ct

    volume = read_ct(real_ct_dir, "P002")
    result = preprocess_volume_for_inference(volume, params)
    lung = to_original_grid(result.lung, result.meta)
    assert lung.shape == volume.shape
    assert 3.0 <= lung.sum() * volume.voxel_volume_ml / 1000.0 <= 7.0
    assert 3000.0 <= result.meta["lung_volume_ml"] <= 7000.0


def test_the_cache_key_follows_what_shapes_a_case(tmp_path):
    """A refusal threshold redoes no case; new lungmask weights at the same path redo them all."""
    from deepsc.data.preprocess import PreprocessSettings, _settings_key

    settings = PreprocessSettings()
    threshold = {"backend": "threshold", "lungmask_weights": None}
    assert _settings_key(settings, threshold) == _settings_key(settings, {**threshold, "min_lung_volume_ml": 100})
    weights = tmp_path / "r231.pth"
    weights.write_bytes(b"old weights")
    lungmask = {"backend": "lungmask", "lungmask_weights": str(weights)}
    before = _settings_key(settings, lungmask)
    weights.write_bytes(b"new weights")
    assert _settings_key(settings, lungmask) != before
