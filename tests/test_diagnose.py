"""deepsc diagnose: one scan in, an overlaying mask, evidence, JSON and a report out."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from deepsc import CLASSES
from deepsc.errors import InputError
from test_inference import make_model_dir


def synthetic_ct(case_index: int = 0, label: str = "covid"):
    """A small synthetic chest CT (64 x 64 in-plane at 5 mm, 8 mm slices) with lesions."""
    from deepsc.data.synth import SynthConfig, cohort_burdens, synthesize_case

    config = SynthConfig(n_covid=1, n_cap=1, n_normal=1, inplane_size=64, inplane_spacing_mm=(5.0, 5.0),
                         slice_spacing_mm=(8.0, 8.0))
    return synthesize_case(config, case_index, label, cohort_burdens(config).get(case_index))


def save_in_ras_order(volume, path: Path) -> Path:
    """Write a canonical (LPS) volume as a NIfTI whose voxel axes run R, A, S (as dcm2niix often does)."""
    import nibabel as nib
    from nibabel import orientations

    data = volume.array.transpose(2, 1, 0)
    transform = orientations.ornt_transform(orientations.axcodes2ornt("LPS"), orientations.axcodes2ornt("RAS"))
    ras = orientations.apply_orientation(data, transform)
    affine = volume.affine @ orientations.inv_ornt_aff(transform, data.shape)
    nib.save(nib.Nifti1Image(ras.astype(np.int16), affine), path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("model") / "finetune")


@pytest.fixture(scope="module")
def diagnosed(tmp_path_factory, model_dir):
    """(input path, out_dir, summary) of one diagnosis of a RAS-ordered NIfTI."""
    from deepsc.diagnose import diagnose

    root = tmp_path_factory.mktemp("diagnose")
    scan = save_in_ras_order(synthetic_ct().image, root / "scan.nii.gz")
    summary = diagnose(scan, model_dir, root / "out", None, device="cpu", progress=False)
    return scan, root / "out", summary


def test_outputs_overlay_the_input_file_exactly(diagnosed):
    import nibabel as nib

    scan, out, _ = diagnosed
    original = nib.load(scan)
    for name in ("lesion_mask.nii.gz", "evidence_1.nii.gz", "evidence_2.nii.gz", "evidence_3.nii.gz"):
        written = nib.load(out / name)
        assert written.shape == original.shape, name
        np.testing.assert_allclose(written.affine, original.affine, atol=1e-5)
    mask = np.asarray(nib.load(out / "lesion_mask.nii.gz").dataobj)
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    evidence = np.asarray(nib.load(out / "evidence_3.nii.gz").dataobj)
    assert evidence.dtype.kind == "f" and -1e-6 <= evidence.min() and evidence.max() <= 1.0 + 1e-6  # scaled uint8 on disk


def test_summary_is_complete_and_consistent_with_the_mask(diagnosed):
    import nibabel as nib

    scan, out, summary = diagnosed
    stored = json.loads((out / "diagnosis.json").read_text())
    assert stored["disclaimer"] == "research use, not for clinical diagnosis"
    assert stored["model"]["version"].startswith("sha256:") and stored["model"]["task"] == "joint"
    probs = stored["classification"]["probabilities"]
    assert list(probs) == list(CLASSES) and sum(probs.values()) == pytest.approx(1.0, abs=1e-4)
    assert stored["classification"]["decision"] == max(probs, key=probs.get)

    mask = np.asarray(nib.load(out / "lesion_mask.nii.gz").dataobj)
    voxel_ml = float(np.prod(nib.load(scan).header.get_zooms()[:3])) / 1000.0
    lesions = stored["lesions"]
    assert lesions["total_volume_ml"] == pytest.approx(mask.sum() * voxel_ml, rel=1e-3)
    assert lesions["count"] == len(lesions["components"])
    assert sum(c["volume_ml"] for c in lesions["components"]) == pytest.approx(lesions["total_volume_ml"], rel=1e-3)
    assert 0.0 <= lesions["lvr"] <= 1.0
    assert stored["severity"]["grade"] in {"CT-0", "CT-1", "CT-2", "CT-3", "CT-4"}

    slices = stored["slices"]
    per_slice = mask.sum(axis=(0, 1))  # RAS file: the third axis runs inferior -> superior, like z
    assert slices["count"] == mask.shape[2] == len(slices["calls"])
    assert [c["lesion"] for c in slices["calls"]] == [bool(v) for v in per_slice]
    assert slices["with_lesion"] == int((per_slice > 0).sum())
    timing = stored["timing"]
    assert timing["seconds_end_to_end"] > 0 and timing["peak_rss_mb"] > 0
    assert timing["peak_rss_scope"] in {"call", "process"}


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc/self/clear_refs")
def test_peak_rss_restarts_so_each_diagnosis_reports_its_own_peak():
    from deepsc.diagnose import peak_rss_mb, reset_peak_rss

    big = np.ones(400 * 2**20 // 8)  # 400 MB touched
    big_peak = peak_rss_mb()
    del big
    assert reset_peak_rss()
    assert peak_rss_mb() < big_peak - 300  # the freed 400 MB no longer count


def test_report_is_self_contained_html(diagnosed):
    _, out, _ = diagnosed
    html = (out / "report.html").read_text()
    assert html.startswith("<!doctype html>") and "research use, not for clinical diagnosis" in html.lower()
    images = re.findall(r"src='data:image/png;base64,", html)
    assert len(images) == 3  # axial, coronal, 3D
    assert "http://" not in html and "https://" not in html
    assert not list(out.glob(".staging-*"))


@pytest.mark.parametrize(
    ("lvr", "grade"),
    [(0.0, "CT-0"), (1e-6, "CT-1"), (0.2499, "CT-1"), (0.25, "CT-2"), (0.4999, "CT-2"), (0.5, "CT-3"), (0.7499, "CT-3"),
     (0.75, "CT-4"), (1.0, "CT-4")],
)
def test_severity_follows_the_mosmeddata_bands(lvr, grade):
    from deepsc.diagnose import severity_grade

    result = severity_grade(lvr)
    assert result["grade"] == grade
    assert result["lung_involvement_percent"] == pytest.approx(100 * lvr, abs=1e-3)


def test_severity_refuses_impossible_shares():
    from deepsc.diagnose import severity_grade

    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError):
            severity_grade(bad)


def test_slice_calls_name_each_slice_and_its_instance_number():
    from deepsc.diagnose import slice_calls

    mask = np.zeros((6, 4, 4), dtype=np.uint8)
    mask[1, 0, 0] = mask[2, 1:3, 1:3] = mask[4, 0, 0] = 1
    result = slice_calls(mask, voxel_ml=0.5, instance_numbers=[60, 50, 40, 30, 20, 10])
    assert [c["lesion"] for c in result["calls"]] == [False, True, True, False, True, False]
    assert [c["instance_number"] for c in result["calls"]] == [60, 50, 40, 30, 20, 10]
    assert result["calls"][2]["lesion_ml"] == 2.0
    assert result["ranges"] == [[1, 2], [4, 4]] and result["ranges_text"] == "z 1-2, z 4"
    assert result["with_lesion"] == 3 and result["count"] == 6
    named = slice_calls(mask, 0.5, [60, 50, 40, 30, 20, 10], ("image", [60, 50, 40, 30, 20, 10]))
    assert named["ranges_text"] == "z 1-2 (images 50-40), z 4 (image 20)"
    stored_upside_down = slice_calls(mask, 0.5, None, ("file slice", [5, 4, 3, 2, 1, 0]))
    assert stored_upside_down["ranges_text"] == "z 1-2 (file slices 4-3), z 4 (file slice 1)"
    assert [c["file_slice"] for c in stored_upside_down["calls"]] == [5, 4, 3, 2, 1, 0]


def test_report_names_slices_and_lesion_centres_as_a_viewer_of_the_file_does(tmp_path):
    """A NIfTI stored head first (A, R, I axes): the report's slice numbers and lesion centres
    are the file's and the scanner's, not deepsc's internal z and array corner."""
    import nibabel as nib
    from nibabel import orientations

    from deepsc.data.io import read_ct
    from deepsc.diagnose import lesion_summary, slice_calls, slice_names

    case = synthetic_ct()
    data = case.image.array.transpose(2, 1, 0)
    transform = orientations.ornt_transform(orientations.axcodes2ornt("LPS"), orientations.axcodes2ornt("ARI"))
    affine = case.image.affine @ orientations.inv_ornt_aff(transform, data.shape)
    path = tmp_path / "ari.nii.gz"
    nib.save(nib.Nifti1Image(orientations.apply_orientation(data, transform).astype(np.int16), affine), path)
    volume = read_ct(path)
    lesion = (np.asarray(case.lesion.array) > 0).astype(np.uint8)
    names = slice_names(volume)
    assert names[0] == "file slice" and names[1] == list(range(volume.shape[0] - 1, -1, -1))  # I is the file's 3rd axis
    file_lesion = orientations.apply_orientation(lesion.transpose(2, 1, 0), transform)  # as stored in the file
    calls = slice_calls(lesion, volume.voxel_volume_ml, None, names)["calls"]
    assert {c["file_slice"] for c in calls if c["lesion"]} == set(np.flatnonzero(file_lesion.sum(axis=(0, 1))).tolist())

    summary = lesion_summary(volume.array, lesion, np.ones_like(lesion), volume.spacing, "ari", volume.affine)
    from scipy import ndimage

    largest = summary["components"][0]
    labels, _ = ndimage.label(file_lesion)
    sizes = np.bincount(labels.ravel())[1:]
    centre_ijk = ndimage.center_of_mass(file_lesion, labels, int(np.argmax(sizes)) + 1)
    ras = affine[:3, :3] @ np.asarray(centre_ijk) + affine[:3, 3]
    np.testing.assert_allclose(largest["centroid_lps_mm"], [-ras[0], -ras[1], ras[2]], atol=0.1)


def test_lesion_outline_lies_on_the_lesion_fill():
    """The red outline and the red fill of a figure panel mark the same pixels (axial and coronal)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from deepsc.report import _overlay

    mask = np.zeros((40, 30), dtype=np.uint8)
    mask[3:10, 5:12] = 1
    for origin in ("upper", "lower"):
        fig, ax = plt.subplots()
        _overlay(ax, np.full(mask.shape, -800.0), mask, None, 1.0, "t", origin=origin)
        vertices = np.concatenate([path.vertices for path in ax.collections[-1].get_paths()])
        plt.close(fig)
        rows, cols = vertices[:, 1], vertices[:, 0]
        assert 2.5 - 1e-6 <= rows.min() and rows.max() <= 9.5 + 1e-6, origin
        assert 4.5 - 1e-6 <= cols.min() and cols.max() <= 11.5 + 1e-6, origin


def test_scores_are_shown_in_whole_percent_and_never_as_certainty():
    from deepsc.report import score_text

    assert [score_text(v) for v in (0.99996, 0.993, 0.5049, 0.0123, 0.004, 0.0)] == [
        "> 99 %", "> 99 %", "50 %", "1 %", "< 1 %", "< 1 %"]


@pytest.mark.parametrize(
    ("transform", "message"),
    [(lambda hu: np.clip((hu + 1000) / 8, 0, 255), "0..255"),  # an 8-bit rendering
     (lambda hu: hu + 1024 + 500, "no negative values"),  # MR-like / CT without its intercept
     (lambda hu: np.maximum(hu, -200) + 0.0, "air")],  # negative values but no air: not a chest CT
)
def test_non_ct_input_is_refused_without_a_traceback(tmp_path, model_dir, capsys, transform, message):
    from deepsc.cli import main
    from deepsc.data.volume import save_nifti

    ct = synthetic_ct().image
    fake = ct.like(transform(ct.array.astype(np.float32)).astype(np.float32))
    path = save_nifti(fake, tmp_path / "fake.nii.gz")
    code = main(["diagnose", str(path), "--model", str(model_dir), "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code != 0 and message in err and "Traceback" not in err
    assert not (tmp_path / "out" / "diagnosis.json").exists()


def test_unreadable_input_and_model_are_clear_errors(tmp_path, model_dir):
    from deepsc.diagnose import diagnose

    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(InputError):
        diagnose(broken, model_dir, tmp_path / "out", device="cpu", progress=False)
    with pytest.raises(InputError, match="not a trained model folder"):
        diagnose(broken, tmp_path, tmp_path / "out", device="cpu", progress=False)
    with pytest.raises(InputError, match="registry URI"):
        diagnose(broken, "models:/deepsc-covid", tmp_path / "out", device="cpu", progress=False)


def test_cli_writes_the_files_and_prints_one_line(tmp_path, model_dir, capsys):
    from deepsc.cli import main
    from deepsc.data.volume import save_nifti

    scan = save_nifti(synthetic_ct(1, "cap").image, tmp_path / "cap.nii.gz")
    code = main(["diagnose", str(scan), "--model", str(model_dir), "--out", str(tmp_path / "out"), "--no-progress",
                 "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0 and "cap" in out and "lesion(s)" in out
    assert {p.name for p in (tmp_path / "out").iterdir()} == {
        "diagnosis.json", "report.html", "lesion_mask.nii.gz", "evidence_1.nii.gz", "evidence_2.nii.gz", "evidence_3.nii.gz"}


def test_single_task_models_fall_back_cleanly(tmp_path):
    from deepsc.diagnose import diagnose_volume, write_outputs
    from deepsc.inference import Predictor

    volume = synthetic_ct(2, "normal").image
    volume = volume.like(volume.array.astype(np.float32))
    seg = diagnose_volume(volume, Predictor.from_dir(make_model_dir(tmp_path / "s", "deepsc", "seg"), "cpu"))
    assert seg.summary["classification"] is None and seg.summary["lesions"] is not None and seg.evidence is None
    cls = diagnose_volume(volume, Predictor.from_dir(make_model_dir(tmp_path / "c", "classifier"), "cpu"))
    assert cls.summary["lesions"] is None and cls.summary["severity"] is None and cls.lesion_mask is None
    assert cls.summary["classification"]["decision"] in CLASSES
    assert len(cls.evidence or []) == 0  # a MONAI classifier has no evidence maps

    write_outputs(volume, seg, tmp_path / "out")
    assert (tmp_path / "out" / "lesion_mask.nii.gz").is_file() and not list((tmp_path / "out").glob("evidence_*"))
    write_outputs(volume, cls, tmp_path / "out")  # the earlier mask must not linger beside a cls-only report
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"report.html"}
    assert "no segmentation output" in (tmp_path / "out" / "report.html").read_text()


@pytest.mark.slow
@pytest.mark.realct
def test_real_dicom_scan_is_diagnosed_at_full_size(real_ct_dir, tmp_path):
    """The real COVID-CT-MD scan P002 (133 DICOM slices of 512 x 512) with a default-size model."""
    from deepsc.config import load_params
    from deepsc.diagnose import diagnose

    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml", "default")
    settings = {key: params[key] for key in ("model", "preprocess", "baselines")}
    model = make_model_dir(tmp_path / "model", settings=settings)
    summary = diagnose(real_ct_dir, model, tmp_path / "out", params, device="cpu", progress=False)

    import nibabel as nib

    mask = nib.load(tmp_path / "out" / "lesion_mask.nii.gz")
    assert mask.shape == (512, 512, 133)  # canonical LPS (x, y, z) of the DICOM series
    assert summary["input"]["shape_zyx"] == [133, 512, 512]
    calls = summary["slices"]["calls"]
    assert len(calls) == 133 and calls[0]["instance_number"] == 133 and calls[-1]["instance_number"] == 1
    assert summary["lesions"]["lung_volume_ml"] > 1000  # both lungs of an adult
    print(f"P002: {summary['timing']}")


def test_mask_of_a_nifti_without_orientation_overlays_it_in_itk_viewers_too(tmp_path):
    """Codes 0 stay 0: ITK (ITK-SNAP, Slicer) then places mask and scan by the same rule."""
    import gzip

    import nibabel as nib
    import SimpleITK as sitk

    from deepsc.data.io import read_ct
    from deepsc.diagnose import nifti_like_input

    image = nib.Nifti1Image(synthetic_ct().image.array.transpose(2, 1, 0).astype(np.int16), None)
    image.header.set_zooms((5.0, 5.0, 8.0))
    scan = tmp_path / "no_orientation.nii"
    nib.save(image, scan)
    assert (int(nib.load(scan).header["qform_code"]), int(nib.load(scan).header["sform_code"])) == (0, 0)
    volume = read_ct(scan)
    mask_path = tmp_path / "mask.nii"
    mask_path.write_bytes(gzip.decompress(nifti_like_input(np.zeros(volume.shape, np.uint8), volume, np.uint8)))
    written = nib.load(mask_path)
    assert (int(written.header["qform_code"]), int(written.header["sform_code"])) == (0, 0)
    np.testing.assert_allclose(written.affine, nib.load(scan).affine)
    itk_scan, itk_mask = sitk.ReadImage(str(scan)), sitk.ReadImage(str(mask_path))
    np.testing.assert_allclose(itk_mask.GetOrigin(), itk_scan.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(itk_mask.GetDirection(), itk_scan.GetDirection(), atol=1e-6)


@pytest.mark.parametrize(("decision", "lesion_voxels", "warned"), [
    ("covid", 0, "found no lesion"), ("normal", 30, "found lesions"), ("covid", 30, None), ("normal", 0, None)])
def test_a_decision_the_segmentation_contradicts_is_flagged(decision, lesion_voxels, warned):
    from types import SimpleNamespace

    from deepsc.diagnose import _summary

    volume = synthetic_ct().image
    lesion = np.zeros(volume.shape, np.uint8)
    lesion.reshape(-1)[np.flatnonzero(volume.array.reshape(-1) < -500)[:lesion_voxels]] = 1
    prob = np.array([0.05, 0.05, 0.05])
    prob[CLASSES.index(decision)] = 0.9
    prediction = SimpleNamespace(class_prob=prob)
    predictor = SimpleNamespace(name="m", source="m", kind="deepsc", task="joint")
    warnings = _summary(volume, lesion, (volume.array < -500).astype(np.uint8), prediction, predictor, None)["warnings"]
    contradictions = [w for w in warnings if "the classifier says" in w]
    if warned is None:
        assert contradictions == []
    else:
        assert len(contradictions) == 1 and warned in contradictions[0]
