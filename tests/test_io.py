"""deepsc.data.io: every format to canonical LPS, broken inputs refused with clear messages."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import broken_inputs as bi
from deepsc.data import io
from deepsc.data.io import read_ct, read_mask, write_mask
from deepsc.data.volume import CTVolume, lps_affine, save_nifti
from deepsc.errors import InputError

EXPECTED_AFFINE = lps_affine(bi.SPACING, bi.ORIGIN)


@pytest.fixture(scope="module")
def broken(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bi.BrokenInput]:
    return bi.write_all(tmp_path_factory.mktemp("broken"))


# --------------------------------------------------------------------------- broken inputs


@pytest.mark.parametrize("name", bi.names())
def test_broken_input_is_refused_or_read_as_declared(name: str, broken: dict[str, bi.BrokenInput]) -> None:
    item = broken[name]
    if item.kind == "manifest":
        from deepsc.data.manifest import load_manifest

        read = lambda: load_manifest(item.path)  # noqa: E731
    elif item.kind == "mask":
        read = lambda: read_mask(item.path, read_ct(item.reference, name), name)  # noqa: E731
    else:
        read = lambda: read_ct(item.path, name)  # noqa: E731
    if item.expect == "error":
        with pytest.raises(InputError) as caught:
            read()
        message = str(caught.value)
        assert re.search(item.problem, message), message
        assert name in message or str(item.path) in message, message
        assert "Traceback" not in message
    else:
        result = read()
        if item.expect == "warning":
            assert any(re.search(item.problem, w) for w in result.meta["warnings"]), result.meta["warnings"]


def test_awkward_intensities_are_read_unchanged(broken: dict[str, bi.BrokenInput]) -> None:
    """0-255 and MR-like volumes load as they are: judging HU is the validation stage's job."""
    windowed = read_ct(broken["windowed_0_255"].path)
    assert windowed.array.min() >= 0 and windowed.array.max() == 255
    mr_like = read_ct(broken["mr_like"].path)
    assert 3900 < mr_like.array.max() <= 4000 and mr_like.array.min() >= 0


def test_absurd_header_is_refused_before_allocation(broken: dict[str, bi.BrokenInput], monkeypatch: pytest.MonkeyPatch) -> None:
    def no_allocation(*args, **kwargs):
        raise AssertionError("voxels were read")

    monkeypatch.setattr(io, "from_nibabel", no_allocation)
    with pytest.raises(InputError, match="over the limit"):
        read_ct(broken["absurd_shape"].path)


def test_max_voxels_is_configurable(broken: dict[str, bi.BrokenInput]) -> None:
    path = broken["image_4d_singleton"].path
    with pytest.raises(InputError, match=r"5,760 voxels, over the limit of 1,000"):
        read_ct(path, "small", max_voxels=1000)
    with pytest.raises(ValueError):
        read_ct(path, max_voxels=0)


def test_cli_prints_input_error_without_traceback(broken, monkeypatch, capsys, tmp_path) -> None:
    """A command that reads a broken scan exits 2 with one line on stderr, no traceback."""
    import types

    from deepsc import cli

    fake = types.SimpleNamespace(
        add_cli=lambda parser: parser.add_argument("scan"),
        run_cli=lambda args, params: read_ct(args.scan) and 0,
    )
    monkeypatch.setattr(cli, "COMMANDS", {"readscan": ("fake.module", "read one scan")})
    monkeypatch.setattr(cli, "_module", lambda name: fake)
    monkeypatch.chdir(tmp_path)  # no params.yaml here: the command runs without settings
    code = cli.main(["readscan", str(broken["truncated_nii_gz"].path)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("deepsc: error: truncated_gz: cannot read the NIfTI file"), err
    assert "truncated or corrupt" in err and "Traceback" not in err and err.count("\n") == 1


# --------------------------------------------------------------------------- synthetic formats


def test_nifti_in_any_axis_order_reads_to_canonical_lps(tmp_path: Path) -> None:
    hu = bi.ct_phantom()
    canonical = CTVolume(hu, EXPECTED_AFFINE, "c")
    ras_data = hu.transpose(2, 1, 0)[::-1, ::-1, :]  # (x, y, z) with x -> R, y -> A
    ras_affine = EXPECTED_AFFINE @ nib.orientations.inv_ornt_aff(np.array([[0, -1], [1, -1], [2, 1]]), ras_data.shape)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(ras_data), ras_affine), tmp_path / "ras.nii.gz")
    assert nib.aff2axcodes(ras_affine) == ("R", "A", "S")
    volume = read_ct(tmp_path / "ras.nii.gz")
    np.testing.assert_array_equal(volume.array, canonical.array)
    np.testing.assert_allclose(volume.affine, EXPECTED_AFFINE, atol=1e-4)
    assert volume.meta["format"] == "nifti" and volume.meta["modality"] is None
    assert volume.case_id == "ras"


def test_dicom_series_reads_to_canonical_lps(tmp_path: Path) -> None:
    hu = bi.ct_phantom()
    bi.write_dicom_series(tmp_path / "series", hu)
    volume = read_ct(tmp_path / "series")
    np.testing.assert_allclose(volume.array, np.round(hu + 1024) - 1024, atol=1e-3)
    np.testing.assert_allclose(volume.affine, EXPECTED_AFFINE, atol=1e-6)
    assert volume.meta["instance_numbers"] == list(range(bi.SHAPE[0], 0, -1))  # top slice is instance 1
    assert volume.meta["modality"] == "CT" and volume.meta["warnings"] == []
    assert volume.case_id == "series"


def test_one_dicom_file_reads_its_own_series(broken: dict[str, bi.BrokenInput]) -> None:
    folder = broken["dicom_two_series"].path
    small = read_ct(folder / "B0001.dcm")
    large = read_ct(folder / "IM0001.dcm")
    assert small.shape == (5, 24, 20) and large.shape == bi.SHAPE
    assert small.meta["series_uid"].endswith(".2")


def test_rescale_slope_and_intercept_give_hu(tmp_path: Path) -> None:
    hu = bi.ct_phantom()
    bi.write_dicom_series(tmp_path / "s", hu, rescale=(2.0, -1000.0))
    np.testing.assert_allclose(read_ct(tmp_path / "s").array, hu, atol=1.0 + 1e-3)


def test_simpleitk_decodes_what_pydicom_cannot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fallback must not apply the rescale twice (GDCM already returns HU)."""
    hu = bi.ct_phantom()
    bi.write_dicom_series(tmp_path / "s", hu, rescale=(2.0, -1000.0))
    expected = read_ct(tmp_path / "s").array

    def unsupported(path):
        raise NotImplementedError("no decoder for this transfer syntax")

    monkeypatch.setattr(io, "_decode_with_pydicom", unsupported)
    np.testing.assert_array_equal(read_ct(tmp_path / "s").array, expected)


def test_shuffled_dicom_names_give_the_same_volume(broken: dict[str, bi.BrokenInput], tmp_path: Path) -> None:
    bi.write_dicom_series(tmp_path / "ordered", bi.ct_phantom())
    ordered = read_ct(tmp_path / "ordered")
    shuffled = read_ct(broken["dicom_shuffled"].path)
    np.testing.assert_array_equal(shuffled.array, ordered.array)
    np.testing.assert_allclose(shuffled.affine, ordered.affine)


def _reposition_series(paths: list[Path], orientation: list[float], step_lps: list[float]) -> None:
    """Rewrite a written axial series with another Image Orientation and slice step."""
    import pydicom

    for path in paths:
        dataset = pydicom.dcmread(path)
        k = bi.SHAPE[0] - int(dataset.InstanceNumber)
        dataset.ImageOrientationPatient = orientation
        dataset.ImagePositionPatient = [float(v) for v in np.array(bi.ORIGIN) + k * np.array(step_lps)]
        dataset.save_as(path)


@pytest.mark.parametrize(
    "orientation, step",
    [([1, 0, 0, 0, 0, -1], [0, 2.5, 0]), ([0.8, 0.6, 0, -0.6, 0.8, 0], [0, 0, 2.5])],
    ids=["coronal", "oblique"],
)
def test_non_axial_series_match_simpleitk(tmp_path: Path, orientation: list[float], step: list[float]) -> None:
    """Our DICOM geometry agrees voxel for voxel with SimpleITK's series reader (via .mha)."""
    import SimpleITK as sitk

    _reposition_series(bi.write_dicom_series(tmp_path / "s", bi.ct_phantom()), orientation, step)
    volume = read_ct(tmp_path / "s")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "s")))
    sitk.WriteImage(reader.Execute(), str(tmp_path / "s.mha"))
    reference = read_ct(tmp_path / "s.mha")
    np.testing.assert_array_equal(volume.array, reference.array)
    np.testing.assert_allclose(volume.affine, reference.affine, atol=1e-5)
    assert nib.aff2axcodes(volume.affine) == ("L", "P", "S")
    if orientation[5] == -1:  # coronal: slices stack along y, so there is no per-z instance number
        assert volume.shape == (24, 12, 20) and volume.meta["instance_numbers"] is None


def test_dicom_padding_below_air_becomes_air(broken: dict[str, bi.BrokenInput], tmp_path: Path) -> None:
    """Pixel Padding Value (-3024 HU here) reads as -1024 HU; everything else is untouched."""
    volume = read_ct(broken["dicom_padding"].path)
    plain = read_ct(broken["dicom_shuffled"].path)  # the same phantom without padding
    outside = np.broadcast_to(bi.outside_field_of_view(), volume.shape)
    assert np.all(volume.array[outside] == -1024.0) and volume.array.min() > -1500
    np.testing.assert_array_equal(volume.array[~outside], plain.array[~outside])
    # padding that is a CT value already (here -1024 HU, stored 0) is left alone, with no warning
    bi.write_dicom_series(tmp_path / "s", bi.ct_phantom(), extra={"PixelPaddingValue": 0})
    assert not any("Padding" in w for w in read_ct(tmp_path / "s").meta["warnings"])


def test_default_case_id_of_dot_folders_is_the_folder_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from deepsc.data.io import default_case_id

    (tmp_path / "P002").mkdir()
    monkeypatch.chdir(tmp_path / "P002")
    assert default_case_id(Path(".")) == "P002"
    assert default_case_id(Path("..")) == tmp_path.name


def test_gantry_tilt_keeps_the_shear_and_warns(tmp_path: Path) -> None:
    _reposition_series(bi.write_dicom_series(tmp_path / "s", bi.ct_phantom()), [1, 0, 0, 0, 1, 0], [0, 0.5, 2.5])
    volume = read_ct(tmp_path / "s")
    assert any("sheared by 11.3 degrees" in w and "read 2.0 % high" in w for w in volume.meta["warnings"])
    np.testing.assert_allclose(volume.affine[:3, 2], [0, -0.5, 2.5])  # RAS column of the slice step


@pytest.mark.parametrize("suffix", [".mha", ".nrrd"])
def test_itk_formats_read_to_canonical_lps(tmp_path: Path, suffix: str) -> None:
    """An ITK image stored with flipped x and y axes (RAS-like) lands on the same LPS grid."""
    import SimpleITK as sitk

    hu = bi.ct_phantom()
    flipped = np.ascontiguousarray(hu[:, ::-1, ::-1])
    image = sitk.GetImageFromArray(flipped)
    sz, sy, sx = bi.SPACING
    image.SetSpacing((sx, sy, sz))
    last_corner = (bi.ORIGIN[0] + (bi.SHAPE[2] - 1) * sx, bi.ORIGIN[1] + (bi.SHAPE[1] - 1) * sy, bi.ORIGIN[2])
    image.SetOrigin(last_corner)
    image.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    sitk.WriteImage(image, str(tmp_path / f"scan{suffix}"))
    volume = read_ct(tmp_path / f"scan{suffix}")
    np.testing.assert_array_equal(volume.array, hu)
    np.testing.assert_allclose(volume.affine, EXPECTED_AFFINE, atol=1e-5)
    assert volume.meta["format"] == ("metaimage" if suffix == ".mha" else "nrrd")


# --------------------------------------------------------------------------- masks


def test_write_mask_overlays_the_reference(tmp_path: Path) -> None:
    reference = CTVolume(bi.ct_phantom(), EXPECTED_AFFINE, "ref")
    mask = np.zeros(bi.SHAPE, np.uint8)
    mask[3, 7, 11] = 1
    path = write_mask(mask, reference, tmp_path / "mask.nii.gz")
    written = nib.load(path)
    assert nib.aff2axcodes(written.affine) == ("L", "P", "S")
    assert written.get_data_dtype() == np.uint8
    (i, j, k), = np.argwhere(np.asarray(written.dataobj) == 1)
    ras = written.affine @ [i, j, k, 1]
    expected_lps = np.array(bi.ORIGIN) + np.array([11 * bi.SPACING[2], 7 * bi.SPACING[1], 3 * bi.SPACING[0]])
    np.testing.assert_allclose([-ras[0], -ras[1], ras[2]], expected_lps, atol=1e-4)
    np.testing.assert_array_equal(read_mask(path, reference), mask)


def test_read_mask_accepts_another_axis_order_on_the_same_grid(tmp_path: Path) -> None:
    reference = CTVolume(bi.ct_phantom(), EXPECTED_AFFINE, "ref")
    mask = np.zeros(bi.SHAPE, np.uint8)
    mask[2:5, 3:9, 4:6] = 1
    flip = np.array([[0, -1], [1, -1], [2, 1]])
    data = nib.orientations.apply_orientation(mask.transpose(2, 1, 0), flip)
    affine = EXPECTED_AFFINE @ nib.orientations.inv_ornt_aff(flip, data.shape)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data), affine), tmp_path / "ras_mask.nii.gz")
    np.testing.assert_array_equal(read_mask(tmp_path / "ras_mask.nii.gz", reference), mask)


def test_read_mask_binarize_merges_labels(broken: dict[str, bi.BrokenInput]) -> None:
    item = broken["mask_non_binary"]
    mask = read_mask(item.path, read_ct(item.reference), binarize=True)
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1} and int(mask.sum()) == 79


def test_write_mask_rejects_programming_errors(tmp_path: Path) -> None:
    reference = CTVolume(bi.ct_phantom(), EXPECTED_AFFINE, "ref")
    with pytest.raises(ValueError, match="shape"):
        write_mask(np.zeros((2, 2, 2), np.uint8), reference, tmp_path / "m.nii.gz")
    with pytest.raises(ValueError, match="binary"):
        write_mask(np.full(bi.SHAPE, 3, np.uint8), reference, tmp_path / "m.nii.gz")
    with pytest.raises(ValueError, match="NIfTI"):
        write_mask(np.zeros(bi.SHAPE, np.uint8), reference, tmp_path / "m.png")
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- the real scan


@functools.lru_cache(maxsize=1)
def _real(folder: str) -> CTVolume:
    return read_ct(folder, "P002")


@pytest.mark.realct
def test_real_scan_geometry_and_slice_order(real_ct_dir: Path) -> None:
    volume = _real(str(real_ct_dir))
    assert volume.shape == (133, 512, 512)
    sz, sy, sx = volume.spacing
    assert sz == pytest.approx(2.0) and sy == pytest.approx(0.603515625) and sx == pytest.approx(0.603515625)
    assert nib.aff2axcodes(volume.affine) == ("L", "P", "S")
    # z = 0 is the most inferior slice: InstanceNumber 133 at z = -437.7 mm; the top is -173.7 mm.
    assert (volume.affine @ [0, 0, 0, 1])[2] == pytest.approx(-437.7)
    assert (volume.affine @ [0, 0, 132, 1])[2] == pytest.approx(-173.7)
    numbers = volume.meta["instance_numbers"]
    assert numbers == list(range(133, 0, -1))
    # radiologists' slice label i (InstanceNumber order, top first) is array index 132 - i
    assert all(numbers[132 - i] == i + 1 for i in range(133))
    assert volume.meta["modality"] == "CT" and volume.meta["warnings"] == []


@pytest.mark.realct
def test_real_scan_hounsfield_units(real_ct_dir: Path) -> None:
    volume = _real(str(real_ct_dir))
    air_in_front = float(np.median(volume.array[66, 10:40, 236:276]))  # anterior, outside the body
    assert -1030 < air_in_front < -970
    assert volume.array.dtype == np.float32 and volume.array.min() >= -1100


@pytest.mark.realct
def test_real_scan_pixel_matches_dicom_header(real_ct_dir: Path) -> None:
    """Voxel [z, y, x] is the DICOM pixel (row y, column x) of instance 133 - z, rescaled."""
    import pydicom

    volume = _real(str(real_ct_dir))
    dataset = pydicom.dcmread(real_ct_dir / "IM0020.dcm")  # instance 20 -> z = 113
    assert int(dataset.InstanceNumber) == 20
    expected = dataset.pixel_array.astype(np.float32) * float(dataset.RescaleSlope) + float(dataset.RescaleIntercept)
    np.testing.assert_array_equal(volume.array[113], expected)
    position = np.array([float(v) for v in dataset.ImagePositionPatient])
    ras = volume.affine @ [0, 0, 113, 1]
    np.testing.assert_allclose([-ras[0], -ras[1], ras[2]], position, atol=1e-4)


@pytest.mark.realct
def test_real_scan_mask_written_and_read_back(real_ct_dir: Path, tmp_path: Path) -> None:
    volume = _real(str(real_ct_dir))
    mask = np.zeros(volume.shape, np.uint8)
    z, y, x = 10, 100, 200
    mask[z, y, x] = 1
    path = write_mask(mask, volume, tmp_path / "P002_mask.nii.gz")
    written = nib.load(path)
    assert nib.aff2axcodes(written.affine) == ("L", "P", "S")
    (i, j, k), = np.argwhere(np.asarray(written.dataobj) == 1)
    ras = written.affine @ [i, j, k, 1]
    # LPS world of that voxel from the header of instance 133 - 10 = 123 alone
    import pydicom

    header = pydicom.dcmread(real_ct_dir / "IM0123.dcm", stop_before_pixels=True)
    origin = np.array([float(v) for v in header.ImagePositionPatient])
    row_spacing, col_spacing = (float(v) for v in header.PixelSpacing)
    expected = origin + x * col_spacing * np.array([1.0, 0, 0]) + y * row_spacing * np.array([0, 1.0, 0])
    np.testing.assert_allclose([-ras[0], -ras[1], ras[2]], expected, atol=1e-3)
    reread = read_ct(path)
    np.testing.assert_allclose(reread.affine, volume.affine, atol=1e-4)
    np.testing.assert_array_equal(read_mask(path, volume), mask)


@pytest.mark.realct
def test_real_scan_shuffled_file_names_and_simpleitk_agree(real_ct_dir: Path, tmp_path: Path) -> None:
    """20 slices linked under shuffled names read like the originals, and like SimpleITK's reader."""
    import SimpleITK as sitk

    files = sorted(real_ct_dir.glob("*.dcm"))[40:60]
    order = np.random.default_rng(0).permutation(len(files))
    for new_index, old_index in enumerate(order):
        (tmp_path / f"x{new_index:03d}.dcm").symlink_to(files[old_index])
    volume = read_ct(tmp_path, "P002-part")
    assert any("file names do not follow" in w for w in volume.meta["warnings"])
    np.testing.assert_array_equal(volume.array, _real(str(real_ct_dir)).array[133 - 60 : 133 - 40])

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path)))
    sitk.WriteImage(reader.Execute(), str(tmp_path / "part.mha"))
    from_itk = read_ct(tmp_path / "part.mha")
    np.testing.assert_array_equal(from_itk.array, volume.array)
    np.testing.assert_allclose(from_itk.affine, volume.affine, atol=1e-3)


def test_input_errors_cross_process_boundaries():
    """Raised in a DataLoader worker or a process pool, an InputError must unpickle intact."""
    import pickle

    error = pickle.loads(pickle.dumps(InputError("ct_0007", "slice positions have a gap of 10 mm")))
    assert isinstance(error, InputError) and (error.case, error.problem) == ("ct_0007", "slice positions have a gap of 10 mm")
    assert str(error) == "ct_0007: slice positions have a gap of 10 mm"


def test_atomic_write_syncs_the_file_before_the_rename_and_the_folder_after(tmp_path: Path, monkeypatch) -> None:
    """A power cut must not leave an empty or truncated file under the final name."""
    import os

    from deepsc.data import volume

    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst) -> None:
        events.append(("replace", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "out" / "case.bin"
    volume.atomic_write_bytes(target, b"payload")
    assert target.read_bytes() == b"payload"
    kinds = [kind for kind, _ in events]
    assert kinds == ["fsync", "replace", "fsync"], events
    assert Path(events[0][1]).parent == target.parent and Path(events[0][1]).name.endswith(".tmp")
    assert events[2][1] == str(target.parent)
    assert list(target.parent.iterdir()) == [target]
