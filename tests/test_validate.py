"""The validation gate: a clean tiny cohort passes; each kind of broken input fails, naming case and check."""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import struct
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pytest

from deepsc.data.volume import CTVolume, lps_affine, save_nifti
from deepsc.errors import ConfigError, ValidationFailed

SHAPE = (20, 32, 32)  # (Z, Y, X)
SPACING = (5.0, 3.0, 3.0)  # mm: lungs large enough for the threshold lung segmentation
LABELS = ("covid", "covid", "cap", "cap", "normal", "normal")


def _ellipsoid(center: tuple[float, float, float], radii: tuple[float, float, float]) -> np.ndarray:
    z, y, x = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    return ((z - center[0]) / radii[0]) ** 2 + ((y - center[1]) / radii[1]) ** 2 + ((x - center[2]) / radii[2]) ** 2 <= 1


def _anatomy() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HU image (air, soft-tissue body, two lungs), lung mask and a lesion inside the right lung."""
    body = _ellipsoid((10, 16, 16), (30, 12, 14))
    lung = _ellipsoid((10, 16, 10), (8, 7, 4)) | _ellipsoid((10, 16, 22), (8, 7, 4))
    lesion = _ellipsoid((10, 16, 10), (2, 2, 2))
    image = np.full(SHAPE, -1000.0, dtype=np.float32)
    image[body] = 40.0
    image[lung] = -850.0
    image[lesion] = -300.0
    return image, lung.astype(np.uint8), lesion.astype(np.uint8)


def _save(array: np.ndarray, path: Path, dtype: type = np.float32) -> str:
    save_nifti(CTVolume(array, lps_affine(SPACING)), path, dtype)
    return path.name


def _write_manifest(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["case_id", "label", "image_path", "mask_path", "lung_path", "source"])
        writer.writeheader()
        writer.writerows(rows)


def _read_manifest(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def write_cohort(data: Path) -> Path:
    """Six clean cases (2 per class) in `data`: covid/cap with lesion + lung masks, normal with none."""
    data.mkdir(parents=True, exist_ok=True)
    image, lung, lesion = _anatomy()
    rows = []
    for index, label in enumerate(LABELS):
        case = f"case_{index}"
        noisy = image + np.random.default_rng(index).normal(0, 10, SHAPE).astype(np.float32)
        row = {"case_id": case, "label": label, "image_path": _save(noisy, data / f"{case}.nii.gz"),
               "mask_path": "", "lung_path": "", "source": "unit test"}
        if label != "normal":
            row["mask_path"] = _save(lesion, data / f"{case}_lesion.nii.gz", np.uint8)
            row["lung_path"] = _save(lung, data / f"{case}_lung.nii.gz", np.uint8)
        rows.append(row)
    _write_manifest(data / "manifest.csv", rows)
    return data / "manifest.csv"


@pytest.fixture
def cohort(tmp_path: Path) -> Path:
    return write_cohort(tmp_path / "data")


@pytest.fixture
def vparams(params: dict) -> dict:
    params = dict(params)
    params["validate"] = dict(params["validate"], min_cases_per_class=2)
    return params


def _validate(manifest: Path, out: Path, params: dict):
    from deepsc.data.validate import validate_cohort

    return validate_cohort(manifest, out, params)


def _fail(manifest: Path, out: Path, params: dict) -> tuple[str, list[dict]]:
    with pytest.raises(ValidationFailed) as caught:
        _validate(manifest, out, params)
    report = json.loads((out / "validation.json").read_text())
    assert report["status"] == "failed"
    return str(caught.value), report["failures"]


def _names(failures: list[dict], case: str) -> set[str]:
    return {f["check"] for f in failures if f["case_id"] == case}


# ---------------------------------------------------------------------------- the clean cohort
def test_clean_cohort_passes_and_writes_reports(cohort: Path, tmp_path: Path, vparams: dict) -> None:
    out = tmp_path / "report"
    report = _validate(cohort, out, vparams)
    assert report.passed and report.status == "passed", report.summary()
    assert report.class_counts == {"covid": 2, "cap": 2, "normal": 2}
    written = json.loads((out / "validation.json").read_text())
    assert written["status"] == "passed" and written["failures"] == []
    assert {c["name"] for c in written["checks"]} >= {"case_id_unique", "readable", "hu_air", "mask_binary", "lesion_inside_lung"}
    table = (out / "checks.csv").read_text().splitlines()
    assert len(table) == 1 + len(LABELS) and table[0].startswith("line,case_id,label")
    html = (out / "validation.html").read_text()
    assert "PASSED" in html and "case_5" in html
    assert report.cases["lesion_outside_lung_fraction"].iloc[0] == 0.0
    assert report.cases["hu_p01"].max() < -900


def test_a_rerun_on_the_same_cohort_writes_the_same_bytes(cohort: Path, tmp_path: Path, vparams: dict) -> None:
    """dvc hashes the report folder that gates split, analyze and preprocess: no timings in it."""
    first, second = tmp_path / "first", tmp_path / "second"
    _validate(cohort, first, vparams)
    _validate(cohort, second, vparams)
    names = sorted(p.name for p in first.iterdir())
    assert names == ["checks.csv", "validation.html", "validation.json"]
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_small_class_is_a_warning_not_a_failure(cohort: Path, tmp_path: Path, params: dict) -> None:
    report = _validate(cohort, tmp_path / "report", params)  # min_cases_per_class: 5 > 2
    assert report.passed and report.status == "passed_with_warnings"
    assert {(w.check, w.observed) for w in report.warnings} >= {("class_size", "covid: 2 case(s)")}


def test_missing_lesion_mask_for_covid_is_a_warning(cohort: Path, tmp_path: Path, vparams: dict) -> None:
    rows = _read_manifest(cohort)
    rows[0]["mask_path"] = ""
    _write_manifest(cohort, rows)
    report = _validate(cohort, tmp_path / "report", vparams)
    assert report.passed
    assert [(w.case_id, w.check) for w in report.warnings] == [("case_0", "mask_available")]


def test_data_folder_is_unchanged(cohort: Path, tmp_path: Path, vparams: dict) -> None:
    rows = _read_manifest(cohort)
    rows[1]["case_id"] = "case_0"  # make it fail too: failing runs must not touch data either
    _write_manifest(cohort, rows)

    def digest() -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(cohort.parent.rglob("*"))}

    before = digest()
    with pytest.raises(ValidationFailed):
        _validate(cohort, tmp_path / "report", vparams)
    assert digest() == before


# ------------------------------------------------------------------------- each broken input
def _duplicate_id(manifest: Path) -> str:
    rows = _read_manifest(manifest)
    rows[1]["case_id"] = "case_0"
    _write_manifest(manifest, rows)
    return "case_0"


def _unknown_label(manifest: Path) -> str:
    rows = _read_manifest(manifest)
    rows[4]["label"] = "influenza"
    _write_manifest(manifest, rows)
    return "case_4"


def _missing_file(manifest: Path) -> str:
    rows = _read_manifest(manifest)
    rows[2]["image_path"] = "nowhere.nii.gz"
    _write_manifest(manifest, rows)
    return "case_2"


def _replace_image(case: str, array: np.ndarray, affine: np.ndarray | None = None) -> Callable[[Path], str]:
    def mutate(manifest: Path) -> str:
        nib.save(nib.Nifti1Image(array, _GOOD_AFFINE if affine is None else affine),
                 manifest.parent / f"{case}.nii.gz")
        return case
    return mutate


def _image_xyz(transform: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    return np.ascontiguousarray(transform(_anatomy()[0]).transpose(2, 1, 0))


def _nan_voxels(image: np.ndarray) -> np.ndarray:
    image = image.copy()
    image[10, 5:8, 5:8] = np.nan
    return image


def _windowed(image: np.ndarray) -> np.ndarray:
    return np.clip((image + 1000.0) / 1400.0 * 255.0, 0, 255).round()


def _mr_like(image: np.ndarray) -> np.ndarray:
    return np.where(image < -900, 0.0, np.where(image < -500, 80.0, 900.0)).astype(np.float32)


def _replace_mask(case: str, array: np.ndarray, affine: np.ndarray, name: str = "lesion") -> Callable[[Path], str]:
    def mutate(manifest: Path) -> str:
        nib.save(nib.Nifti1Image(np.ascontiguousarray(array.transpose(2, 1, 0)), affine),
                 manifest.parent / f"{case}_{name}.nii.gz")
        return case
    return mutate


def _zero_slice_spacing(manifest: Path) -> str:
    """Header pixdim[3] = 0 without orientation codes (nibabel refuses to write it: patch the bytes)."""
    image = nib.Nifti1Image(_image_xyz(lambda a: a), None)
    image.header.set_qform(None, code=0)
    image.header.set_sform(None, code=0)
    raw = bytearray(image.to_bytes())
    struct.pack_into("<3f", raw, 80, 3.0, 3.0, 0.0)  # pixdim[1:4]
    (manifest.parent / "case_4.nii.gz").write_bytes(gzip.compress(bytes(raw)))
    return "case_4"


def _truncated(manifest: Path) -> str:
    path = manifest.parent / "case_3.nii.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    return "case_3"


_LESION = _anatomy()[2]
_GOOD_AFFINE = lps_affine(SPACING)
_SHIFTED = _GOOD_AFFINE.copy()
_SHIFTED[:3, 3] += (5.0, 0.0, 0.0)
_OUTSIDE = np.zeros(SHAPE, np.uint8)
_OUTSIDE[8:12, 2:5, 14:18] = 1  # anterior body wall, far from both lungs

BROKEN = {
    "duplicate id": (_duplicate_id, "case_id_unique"),
    "unknown label": (_unknown_label, "label_known"),
    "missing file": (_missing_file, "image_exists"),
    "NaN voxels": (_replace_image("case_0", _image_xyz(_nan_voxels)), "readable"),  # read_ct refuses them
    "0-255 windowed": (_replace_image("case_1", _image_xyz(_windowed)), "intensity_is_hu"),
    "MR-like": (_replace_image("case_2", _image_xyz(_mr_like)), "intensity_is_hu"),
    "2D image": (_replace_image("case_4", np.full((32, 32), -1000.0, np.float32)), "is_3d"),
    "4D image": (_replace_image("case_5", np.full((32, 32, 20, 3), -1000.0, np.float32)), "is_3d"),
    "zero spacing": (_zero_slice_spacing, "spacing_min_mm"),
    "mask shape mismatch": (_replace_mask("case_0", _LESION[:, :, :30], _GOOD_AFFINE), "mask_shape"),
    "mask affine mismatch": (_replace_mask("case_1", _LESION, _SHIFTED), "mask_affine"),
    "non-binary mask": (_replace_mask("case_2", _LESION * 2, _GOOD_AFFINE), "mask_binary"),
    "lesion outside lung": (_replace_mask("case_3", _OUTSIDE, _GOOD_AFFINE), "lesion_inside_lung"),
    "truncated file": (_truncated, "readable"),
    "lung mask shape mismatch": (_replace_mask("case_2", _anatomy()[1][:, :, :30], _GOOD_AFFINE, "lung"), "lung_shape"),
}


@pytest.mark.parametrize("kind", list(BROKEN))
def test_broken_input_fails_naming_case_and_check(kind: str, cohort: Path, tmp_path: Path, vparams: dict) -> None:
    mutate, check = BROKEN[kind]
    case = mutate(cohort)
    message, failures = _fail(cohort, tmp_path / "report", vparams)
    assert check in _names(failures, case), failures
    assert case in message and check in message
    assert {f["case_id"] for f in failures} == {case}, f"only the broken case should fail: {failures}"


def test_observed_values_explain_the_failure(cohort: Path, tmp_path: Path, vparams: dict) -> None:
    _replace_image("case_1", _image_xyz(_windowed))(cohort)
    _replace_image("case_2", _image_xyz(_mr_like))(cohort)
    _replace_mask("case_0", _LESION * 2, _GOOD_AFFINE)(cohort)
    _replace_image("case_3", _image_xyz(_nan_voxels))(cohort)
    _, failures = _fail(cohort, tmp_path / "report", vparams)
    observed = {(f["case_id"], f["check"]): (f["observed"], f["detail"]) for f in failures}
    assert observed[("case_1", "intensity_is_hu")][0] == "windowed_0_255"
    assert observed[("case_2", "intensity_is_hu")][0] == "no_negative_values"
    assert observed[("case_0", "mask_binary")] == (str(int(_LESION.sum())), "mask_nonbinary_values=2")
    assert "9 NaN" in observed[("case_3", "readable")][0]
    html = (tmp_path / "report" / "validation.html").read_text()
    assert "FAILED" in html and "windowed_0_255" in html


def test_missing_required_column_and_missing_class(cohort: Path, tmp_path: Path, vparams: dict) -> None:
    rows = [r for r in _read_manifest(cohort) if r["label"] != "cap"]
    _write_manifest(cohort, rows)
    _, failures = _fail(cohort, tmp_path / "a", vparams)
    assert ("(cohort)", "class_present", "cap: 0 case(s)") in {(f["case_id"], f["check"], f["observed"]) for f in failures}

    cohort.write_text("case_id,image_path\ncase_0,case_0.nii.gz\n")
    message, failures = _fail(cohort, tmp_path / "b", vparams)
    assert [(f["check"], f["observed"]) for f in failures] == [("required_column", "column 'label' is missing")]
    assert not (tmp_path / "b" / "checks.csv").exists()


def test_findings_name_the_manifest_line_past_blank_lines(cohort: Path, tmp_path: Path, vparams: dict) -> None:
    rows = _read_manifest(cohort)
    rows[1]["label"] = "flu"
    rows[2]["image_path"] = "~deepsc-no-such-user/scan.nii.gz"  # no such home here: a missing file, not a crash
    _write_manifest(cohort, rows)
    lines = cohort.read_text().splitlines()
    cohort.write_text("\n".join(lines[:2] + [""] + lines[2:]) + "\n")  # a blank line 3 (header is line 1)
    _, failures = _fail(cohort, tmp_path / "report", vparams)
    where = {f["check"]: (f["case_id"], f["line"]) for f in failures if f["check"] in ("label_known", "image_exists")}
    assert where == {"label_known": (rows[1]["case_id"], 4), "image_exists": (rows[2]["case_id"], 5)}


def test_unparseable_manifest_gives_a_report(tmp_path: Path, vparams: dict) -> None:
    manifest = tmp_path / "manifest.csv"
    manifest.write_bytes(b"case_id,label\n\xff\xfe\x00bad,\"unterminated\n")
    message, failures = _fail(manifest, tmp_path / "report", vparams)
    assert failures[0]["check"] == "manifest_parses" and "manifest" in message
    assert "cannot be parsed" in (tmp_path / "report" / "validation.html").read_text()


def test_bad_settings_are_rejected(params: dict) -> None:
    from deepsc.data.validate import ValidateConfig

    with pytest.raises(ConfigError, match="min_slices"):
        ValidateConfig.from_params({"validate": dict(params["validate"], min_slices=50, max_slices=10)})
    with pytest.raises(ConfigError, match="unknown"):
        ValidateConfig.from_params({"validate": {"min_slice": 3}})


def _without_lung_paths(manifest: Path) -> None:
    rows = _read_manifest(manifest)
    for row in rows:
        row["lung_path"] = ""
    _write_manifest(manifest, rows)


def test_lungseg_fallback_when_no_lung_path(cohort: Path, tmp_path: Path, vparams: dict) -> None:
    pytest.importorskip("deepsc.data.lungseg")
    _without_lung_paths(cohort)
    _replace_mask("case_3", _OUTSIDE, _GOOD_AFFINE)(cohort)
    toy = dict(vparams, lungseg=dict(vparams["lungseg"], min_lung_volume_ml=50))  # this toy chest's lungs: 85 mL
    report = _validate(cohort, tmp_path / "report", toy)
    lesion_rows = report.cases[report.cases["has_mask"]].set_index("case_id")
    assert set(lesion_rows["lung_source"]) == {"lungseg"}
    assert lesion_rows.loc[["case_0", "case_1", "case_2"], "lesion_outside_lung_fraction"].max() <= 0.05
    assert lesion_rows.loc["case_3", "lesion_outside_lung_fraction"] == 1.0
    # an automatic lung mask is no proof: a warning, the gate passes
    assert report.passed and [(w.case_id, w.check) for w in report.warnings] == [("case_3", "lesion_inside_segmented_lung")]


def test_lungs_below_the_volume_floor_fail_the_gate(cohort: Path, tmp_path: Path, vparams: dict) -> None:
    """The gate segments with the ``lungseg`` settings, floor included: 85 mL of "lungs" is no adult chest."""
    _without_lung_paths(cohort)
    message, failures = _fail(cohort, tmp_path / "report", vparams)
    lung = {f["case_id"]: f["observed"] for f in failures if f["check"] == "lung_available"}
    assert set(lung) == {"case_0", "case_1", "case_2", "case_3"}  # the cases with a lesion mask
    assert "only 85 mL, below lungseg.min_lung_volume_ml = 400 mL" in lung["case_0"]


def test_labels_are_accepted_in_any_letter_case(cohort: Path, tmp_path: Path, vparams: dict) -> None:
    """As load_manifest (which lower-cases them): ``NORMAL`` passes the gate and counts as normal."""
    from deepsc.data.manifest import load_manifest

    rows = _read_manifest(cohort)
    for row, label in zip(rows, ("COVID", "Covid", "CAP", "cap", "NORMAL", "Normal")):
        row["label"] = label
    _write_manifest(cohort, rows)
    report = _validate(cohort, tmp_path / "report", vparams)
    assert report.passed, report.summary()
    assert report.class_counts == {"covid": 2, "cap": 2, "normal": 2}
    assert list(load_manifest(cohort)["label"]) == list(LABELS)


def test_two_rows_naming_one_image_fail(cohort: Path, tmp_path: Path, vparams: dict) -> None:
    """The same scan twice (here through ``..``) could land in train and test; load_manifest refuses it too."""
    from deepsc.data.manifest import load_manifest
    from deepsc.errors import InputError

    rows = _read_manifest(cohort)
    rows[5]["image_path"] = "../data/case_4.nii.gz"
    _write_manifest(cohort, rows)
    message, failures = _fail(cohort, tmp_path / "report", vparams)
    assert {(f["case_id"], f["check"]) for f in failures} == {("case_4", "image_unique"), ("case_5", "image_unique")}
    assert "image_unique" in message
    with pytest.raises(InputError, match=r"rows 5, 6 \(cases 'case_4', 'case_5'\) name the same image"):
        load_manifest(cohort)


def test_case_ids_differing_only_in_letter_case_fail(cohort: Path, tmp_path: Path, vparams: dict) -> None:
    """``case_0`` and ``CASE_0`` would share one output folder on a case-insensitive file system;
    an exact duplicate stays case_id_unique's finding alone."""
    rows = _read_manifest(cohort)
    rows[1]["case_id"] = "CASE_0"
    rows[3]["case_id"] = "case_2"
    _write_manifest(cohort, rows)
    message, failures = _fail(cohort, tmp_path / "report", vparams)
    found = {(f["case_id"], f["check"]) for f in failures}
    assert found == {("case_0", "case_id_unique_ignoring_case"), ("CASE_0", "case_id_unique_ignoring_case"),
                     ("case_2", "case_id_unique")}, failures
    assert "CASE_0: case_id_unique_ignoring_case failed" in message and "case_0: case_id_unique_ignoring_case" in message
    checks = {c["name"]: c for c in json.loads((tmp_path / "report" / "validation.json").read_text())["checks"]}
    assert checks["case_id_unique_ignoring_case"]["level"] == "blocking"
    assert checks["case_id_unique_ignoring_case"]["n_findings"] == 2


def test_a_dicom_file_and_its_series_folder_fail_image_unique(cohort: Path, tmp_path: Path, vparams: dict) -> None:
    """read_ct reads the series of a DICOM file's folder: a row naming the folder and one naming a
    file in it are the same scan, for the gate as for load_manifest."""
    import broken_inputs as bi
    from deepsc.data.manifest import load_manifest
    from deepsc.errors import InputError

    bi.write_dicom_series(cohort.parent / "series", bi.ct_phantom())
    rows = _read_manifest(cohort)
    rows[4]["image_path"] = "series"
    rows[5]["image_path"] = "series/IM0003.dcm"
    _write_manifest(cohort, rows)
    _, failures = _fail(cohort, tmp_path / "report", vparams)
    unique = {f["case_id"]: f for f in failures if f["check"] == "image_unique"}
    assert set(unique) == {"case_4", "case_5"}, failures
    assert unique["case_5"]["observed"] == str(cohort.parent / "series")
    assert unique["case_5"]["detail"] == "image_path=series/IM0003.dcm"
    with pytest.raises(InputError, match=r"rows 5, 6 \(cases 'case_4', 'case_5'\) name the same image"):
        load_manifest(cohort)


def test_the_gate_reads_the_file_the_pipeline_reads(cohort: Path, tmp_path: Path, vparams: dict) -> None:
    """``link/..`` with ``link`` a symbolic link: the manifest's resolver (``..`` collapsed first)
    names data/case_0.nii.gz, the operating system the link target's parent. Both read the former."""
    from deepsc.data.manifest import load_manifest

    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "deep").mkdir(parents=True)
    (cohort.parent / "link").symlink_to(elsewhere / "deep")
    nib.save(nib.Nifti1Image(_image_xyz(_windowed), _GOOD_AFFINE), elsewhere / "case_0.nii.gz")  # a decoy, not CT
    rows = _read_manifest(cohort)
    rows[0]["image_path"] = "link/../case_0.nii.gz"
    _write_manifest(cohort, rows)
    assert load_manifest(cohort).loc[0, "image_path"] == str(cohort.parent / "case_0.nii.gz")
    report = _validate(cohort, tmp_path / "report", vparams)
    assert report.passed, report.summary()
    assert report.cases.set_index("case_id").loc["case_0", "intensity_kind"] == "hu"


def test_ge_outside_field_of_view_padding_passes(cohort: Path, tmp_path: Path, vparams: dict, params: dict) -> None:
    """A NIfTI converted from GE DICOM (dcm2niix) keeps -3024 HU outside the reconstructed circle."""
    from deepsc.data.io import read_ct
    from deepsc.data.validate import ValidateConfig
    from deepsc.diagnose import check_is_ct

    assert ValidateConfig.from_params(params).hu_min_floor == ValidateConfig().hu_min_floor == -3100.0
    image = _anatomy()[0] + np.random.default_rng(0).normal(0, 10, SHAPE).astype(np.float32)
    _, yy, xx = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    image[np.broadcast_to((yy - 15.5) ** 2 + (xx - 15.5) ** 2 > 16.0**2, SHAPE)] = -3024.0  # the corners
    _save(image.astype(np.int16), cohort.parent / "case_0.nii.gz", np.int16)
    report = _validate(cohort, tmp_path / "report", vparams)
    assert report.passed, report.summary()
    assert report.cases.set_index("case_id").loc["case_0", "hu_min"] == -3024.0
    check_is_ct(read_ct(cohort.parent / "case_0.nii.gz", "case_0"), params)  # diagnose accepts it too


# ------------------------------------------------------------------------------------------- CLI
def test_cli_exit_codes_without_traceback(cohort: Path, tmp_path: Path, vparams: dict, monkeypatch, capsys) -> None:
    import yaml

    from deepsc import cli

    settings = tmp_path / "params.yaml"
    settings.write_text(yaml.safe_dump(vparams))
    args = ["--params", str(settings), "validate", "--manifest", str(cohort), "--out", str(tmp_path / "out")]
    assert cli.main(args) == 0
    assert "validation passed" in capsys.readouterr().out

    _duplicate_id(cohort)
    assert cli.main(args) == ValidationFailed.exit_code
    err = capsys.readouterr().err
    assert "Traceback" not in err and "case_id_unique" in err and "case_0" in err


# ------------------------------------------------------------------------------ measurements
def test_intensity_kind_and_lesion_fraction() -> None:
    from deepsc.data.volume_checks import classify_intensity, lesion_outside_fraction

    assert classify_intensity(-1024.0, 3000.0) == "hu"
    assert classify_intensity(0.0, 255.0) == "windowed_0_255"
    assert classify_intensity(0.0, 4000.0) == "no_negative_values"
    lesion = np.zeros((2, 2, 2), bool)
    assert lesion_outside_fraction(lesion, lesion) == 0.0  # empty lesion mask: nothing outside
    lesion[0, 0, :] = True
    lung = np.zeros_like(lesion)
    lung[0, 0, 0] = True
    assert lesion_outside_fraction(lesion, lung) == 0.5
    with pytest.raises(ValueError, match="shape"):
        lesion_outside_fraction(lesion, lung[:1])


@pytest.mark.realct
def test_real_dicom_series_passes_the_volume_checks(real_ct_dir: Path) -> None:
    from deepsc.data.volume_checks import CaseFiles, measure_case

    row = measure_case(CaseFiles(2, "P002", "covid", real_ct_dir), max_voxels=400_000_000)
    assert row["readable"] and row["read_error"] is None
    assert row["intensity_kind"] == "hu" and row["hu_p01"] < -900 and row["hu_min"] >= -3100
    assert row["n_slices"] == 133 and 0.1 <= row["spacing_min_mm"] <= row["spacing_max_mm"] <= 12
