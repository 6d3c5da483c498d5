"""Writers of small synthetic CT inputs, good and broken, for tests of every stage that reads scans.

Each ``write_*`` function of :data:`BROKEN_INPUTS` writes one awkward or broken input into a
folder and returns a :class:`BrokenInput` that says what a reader must do with it: refuse it with
an ``InputError`` whose message matches ``problem`` (``expect="error"``), or read it
(``expect="ok"``), with a warning matching ``problem`` when ``expect="warning"``.

Reusable building blocks: :func:`ct_phantom` (a tiny chest-like HU volume),
:func:`write_nifti`, :func:`write_dicom_series` (uncompressed, one file per slice, like a
scanner: InstanceNumber 1 is the top slice) and :func:`write_all` (every input at once).
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from deepsc.data.volume import CTVolume, lps_affine, save_nifti

SHAPE = (12, 24, 20)                 # (Z, Y, X) voxels: small on purpose
SPACING = (2.5, 1.5, 1.25)           # (sz, sy, sx) mm
ORIGIN = (-12.0, -20.0, -100.0)      # LPS mm of voxel [0, 0, 0]


@dataclass(frozen=True)
class BrokenInput:
    """One written input and the reader behaviour it demands.

    Attributes:
        name: also the case id tests pass to the reader (messages must name it).
        path: file or folder written.
        kind: ``image`` (read_ct), ``mask`` (read_mask against ``reference``) or ``manifest``.
        expect: ``error`` | ``ok`` | ``warning``.
        problem: regular expression the error (or warning) message must match.
        reference: the image a mask belongs to.
    """

    name: str
    path: Path
    kind: str
    expect: str
    problem: str
    reference: Path | None = None


# --------------------------------------------------------------------------- building blocks


def ct_phantom(shape: Sequence[int] = SHAPE, seed: int = 0) -> np.ndarray:
    """A chest-like float32 HU volume ``(Z, Y, X)``: air -1000, body 40, two lungs -850, noise."""
    z, y, x = shape
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:y, 0:x]
    cy, cx = (y - 1) / 2, (x - 1) / 2
    body = ((yy - cy) / (0.45 * y)) ** 2 + ((xx - cx) / (0.45 * x)) ** 2 <= 1
    lungs = np.zeros((y, x), bool)
    for side in (-1, 1):
        lungs |= ((yy - cy) / (0.3 * y)) ** 2 + ((xx - cx - side * 0.2 * x) / (0.14 * x)) ** 2 <= 1
    slab = np.where(lungs, -850.0, np.where(body, 40.0, -1000.0))
    volume = np.broadcast_to(slab, (z, y, x)) + rng.normal(0.0, 15.0, (z, y, x))
    return volume.astype(np.float32)


def write_nifti(path: Path, array: np.ndarray, spacing: Sequence[float] = SPACING, origin: Sequence[float] = ORIGIN) -> Path:
    """A canonical LPS NIfTI of a ``(Z, Y, X)`` array (dtype kept)."""
    volume = CTVolume(np.asarray(array), lps_affine(tuple(spacing), tuple(origin)), path.name)
    return save_nifti(volume, path)


def write_dicom_series(
    folder: Path,
    hu: np.ndarray,
    spacing: Sequence[float] = SPACING,
    origin: Sequence[float] = ORIGIN,
    *,
    modality: str = "CT",
    series_uid: str | None = None,
    file_names: Sequence[str] | None = None,
    z_positions: Sequence[float] | None = None,
    rescale: tuple[float, float] = (1.0, -1024.0),
    patient_id: str = "SYNTH",
    extra: dict | None = None,
) -> list[Path]:
    """Write a ``(Z, Y, X)`` LPS HU volume as an axial, uncompressed DICOM series.

    Slices are written top first (InstanceNumber 1 = the most superior slice, ``hu[-1]``), as
    scanners do. ``z_positions`` overrides each slice's z (LPS mm, in ``hu`` order) to build
    gaps or duplicates; ``file_names`` (in InstanceNumber order) overrides ``IM0001.dcm`` ...
    ``rescale`` is (slope, intercept): stored values are ``(HU - intercept) / slope`` as int16.
    ``extra`` sets further header elements on every slice (keyword: value).
    """
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    sop_class = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4"}.get(modality, "1.2.840.10008.5.1.4.1.1.7")
    series_uid = series_uid or generate_uid(entropy_srcs=[str(folder), modality])
    study_uid = generate_uid(entropy_srcs=[patient_id])
    n_slices, rows, cols = hu.shape
    sz, sy, sx = spacing
    zs = list(z_positions) if z_positions is not None else [origin[2] + k * sz for k in range(n_slices)]
    slope, intercept = rescale
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for instance, k in enumerate(reversed(range(n_slices)), start=1):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[series_uid, str(instance)])
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientID = modality, patient_id
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.InstanceNumber = instance
        ds.ImagePositionPatient = [float(origin[0]), float(origin[1]), float(zs[k])]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [float(sy), float(sx)]  # (between rows, between columns)
        ds.SliceThickness = float(sz)
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        stored = np.round((hu[k] - intercept) / slope).astype(np.int16)
        ds.PixelData = stored.tobytes()
        for keyword, value in (extra or {}).items():
            setattr(ds, keyword, value)
        name = file_names[instance - 1] if file_names is not None else f"IM{instance:04d}.dcm"
        ds.save_as(folder / name, enforce_file_format=True)
        paths.append(folder / name)
    return paths


def _patch_nifti_header(path: Path, offset: int, fmt: str, values: Sequence[float]) -> None:
    """Overwrite raw header fields of an uncompressed .nii (nibabel refuses to write them)."""
    payload = bytearray(path.read_bytes())
    struct.pack_into(fmt, payload, offset, *values)
    path.write_bytes(bytes(payload))


_PIXDIM_OFFSET = 76  # NIfTI-1: float32 pixdim[8]
_DIM_OFFSET = 40     # NIfTI-1: int16 dim[8]
_VOX_OFFSET_OFFSET = 108  # NIfTI-1: float32 vox_offset
_QFORM_CODE_OFFSET = 252  # NIfTI-1: int16 qform_code, then int16 sform_code


# --------------------------------------------------------------------------- the broken inputs


def write_truncated_nii_gz(folder: Path) -> BrokenInput:
    path = write_nifti(folder / "truncated_gz.nii.gz", ct_phantom())
    payload = path.read_bytes()
    path.write_bytes(payload[: len(payload) // 2])
    return BrokenInput("truncated_nii_gz", path, "image", "error", r"truncated|corrupt")


def write_truncated_nii(folder: Path) -> BrokenInput:
    path = write_nifti(folder / "truncated_nii.nii", ct_phantom())
    payload = path.read_bytes()
    path.write_bytes(payload[: len(payload) - 1000])
    return BrokenInput("truncated_nii", path, "image", "error", r"truncated.*bytes")


def write_not_gzip(folder: Path) -> BrokenInput:
    path = folder / "not_gzip.nii.gz"
    path.write_bytes(b"this is not a gzip stream" * 40)
    return BrokenInput("not_gzip", path, "image", "error", r"not_gzip\.nii\.gz")


def write_nan_voxels(folder: Path) -> BrokenInput:
    hu = ct_phantom()
    hu[3, 5:8, 5:9] = np.nan
    hu[4, 0, 0] = np.inf
    return BrokenInput("nan_voxels", write_nifti(folder / "nan_voxels.nii.gz", hu), "image", "error", r"13 NaN or infinite")


def write_windowed_0_255(folder: Path) -> BrokenInput:
    """A screenshot-like volume already windowed to 0..255: readable; validation must flag it."""
    hu = np.clip((ct_phantom() + 1000.0) / 1040.0 * 255.0, 0, 255).astype(np.uint8)  # window [-1000, 40]
    return BrokenInput("windowed_0_255", write_nifti(folder / "windowed_0_255.nii.gz", hu), "image", "ok", "")


def write_nan_vox_offset(folder: Path) -> BrokenInput:
    path = write_nifti(folder / "nan_vox_offset.nii", ct_phantom())
    _patch_nifti_header(path, _VOX_OFFSET_OFFSET, "<f", [float("nan")])
    return BrokenInput("nan_vox_offset", path, "image", "error", r"invalid NIfTI header \(vox_offset = nan")


def write_nifti_without_orientation(folder: Path) -> BrokenInput:
    path = write_nifti(folder / "no_orientation.nii", ct_phantom())
    _patch_nifti_header(path, _QFORM_CODE_OFFSET, "<hh", [0, 0])  # qform_code, sform_code
    return BrokenInput("nifti_without_orientation", path, "image", "warning", r"left and right are unknown.*LAS")


def write_mr_like(folder: Path) -> BrokenInput:
    """MR-like intensities 0..4000 in a NIfTI (no modality tag): readable; validation flags it."""
    values = np.random.default_rng(1).uniform(0, 4000, SHAPE).astype(np.float32)
    return BrokenInput("mr_like", write_nifti(folder / "mr_like.nii.gz", values), "image", "ok", "")


def write_image_2d(folder: Path) -> BrokenInput:
    import nibabel as nib

    path = folder / "image_2d.nii.gz"
    nib.save(nib.Nifti1Image(ct_phantom()[0].T.copy(), np.eye(4)), path)
    return BrokenInput("image_2d", path, "image", "error", r"2D")


def write_single_slice(folder: Path) -> BrokenInput:
    path = write_nifti(folder / "single_slice.nii.gz", ct_phantom((1, 24, 20)))
    return BrokenInput("single_slice", path, "image", "error", r"single slice")


def write_image_4d(folder: Path) -> BrokenInput:
    import nibabel as nib

    path = folder / "image_4d.nii.gz"
    data = np.stack([ct_phantom().transpose(2, 1, 0)] * 3, axis=-1)
    nib.save(nib.Nifti1Image(data, lps_affine(SPACING, ORIGIN)), path)
    return BrokenInput("image_4d", path, "image", "error", r"4D .*\(20, 24, 12, 3\)")


def write_image_4d_singleton(folder: Path) -> BrokenInput:
    import nibabel as nib

    path = folder / "image_4d_singleton.nii.gz"
    data = ct_phantom().transpose(2, 1, 0)[..., None]
    nib.save(nib.Nifti1Image(data, lps_affine(SPACING, ORIGIN)), path)
    return BrokenInput("image_4d_singleton", path, "image", "ok", "")


def _nifti_with_pixdim(folder: Path, name: str, pixdim: Sequence[float]) -> Path:
    """An uncompressed NIfTI without orientation codes whose raw pixdim[1:4] is `pixdim`."""
    import nibabel as nib

    path = folder / f"{name}.nii"
    image = nib.Nifti1Image(ct_phantom().transpose(2, 1, 0), None)
    image.header.set_qform(None, code=0)
    image.header.set_sform(None, code=0)
    nib.save(image, path)
    _patch_nifti_header(path, _PIXDIM_OFFSET + 4, "<3f", pixdim)
    return path


def write_zero_spacing(folder: Path) -> BrokenInput:
    path = _nifti_with_pixdim(folder, "zero_spacing", (1.0, 0.0, 2.5))
    return BrokenInput("zero_spacing", path, "image", "error", r"spacing .*0\.0")


def write_negative_spacing(folder: Path) -> BrokenInput:
    path = _nifti_with_pixdim(folder, "negative_spacing", (1.0, 1.0, -2.5))
    return BrokenInput("negative_spacing", path, "image", "error", r"spacing .*-2\.5")


def write_nan_spacing(folder: Path) -> BrokenInput:
    path = _nifti_with_pixdim(folder, "nan_spacing", (float("nan"), 1.0, 2.5))
    return BrokenInput("nan_spacing", path, "image", "error", r"spacing .*nan")


def write_absurd_shape(folder: Path) -> BrokenInput:
    """A small file whose header claims 30000^3 voxels: refused before any allocation."""
    path = write_nifti(folder / "absurd_shape.nii", ct_phantom())
    _patch_nifti_header(path, _DIM_OFFSET, "<4h", (3, 30000, 30000, 30000))
    return BrokenInput("absurd_shape", path, "image", "error", r"27,000,000,000,000 voxels")


def write_mha_absurd_shape(folder: Path) -> BrokenInput:
    path = folder / "mha_absurd.mha"
    header = (
        "ObjectType = Image\nNDims = 3\nBinaryData = True\nCompressedData = False\n"
        "ElementSpacing = 1 1 1\nDimSize = 40000 40000 40000\nElementType = MET_SHORT\nElementDataFile = LOCAL\n"
    )
    path.write_bytes(header.encode() + b"\0" * 64)
    return BrokenInput("mha_absurd_shape", path, "image", "error", r"voxels, over the limit")


def write_truncated_mha(folder: Path) -> BrokenInput:
    import SimpleITK as sitk

    path = folder / "truncated_mha.mha"
    sitk.WriteImage(sitk.GetImageFromArray(ct_phantom()), str(path))
    payload = path.read_bytes()
    path.write_bytes(payload[: len(payload) - 500])
    return BrokenInput("truncated_mha", path, "image", "error", r"truncated.*bytes")


def write_truncated_nrrd(folder: Path) -> BrokenInput:
    import SimpleITK as sitk

    path = folder / "truncated_nrrd.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(ct_phantom()), str(path))
    payload = path.read_bytes()
    path.write_bytes(payload[: len(payload) - 500])
    return BrokenInput("truncated_nrrd", path, "image", "error", r"truncated.*bytes")


def _reference_image(folder: Path) -> Path:
    path = folder / "mask_reference.nii.gz"
    if not path.exists():
        write_nifti(path, ct_phantom())
    return path


def write_mask_other_shape(folder: Path) -> BrokenInput:
    path = write_nifti(folder / "mask_other_shape.nii.gz", np.zeros((12, 24, 18), np.uint8))
    return BrokenInput("mask_other_shape", path, "mask", "error", r"shape \(12, 24, 18\).*\(12, 24, 20\)", _reference_image(folder))


def write_mask_other_affine(folder: Path) -> BrokenInput:
    shifted = (ORIGIN[0], ORIGIN[1] + 7.5, ORIGIN[2])
    path = write_nifti(folder / "mask_other_affine.nii.gz", np.zeros(SHAPE, np.uint8), SPACING, shifted)
    return BrokenInput("mask_other_affine", path, "mask", "error", r"does not overlay.*7\.50 mm", _reference_image(folder))


def write_mask_non_binary(folder: Path) -> BrokenInput:
    labels = np.zeros(SHAPE, np.uint8)
    labels[2:4, 5:10, 5:10] = 1
    labels[5, 5:10, 5:10] = 2
    labels[6, 5:7, 5:7] = 255
    path = write_nifti(folder / "mask_non_binary.nii.gz", labels)
    return BrokenInput("mask_non_binary", path, "mask", "error", r"2 other value\(s\) \(2, 255\)", _reference_image(folder))


def write_dicom_shuffled(folder: Path) -> BrokenInput:
    names = [f"IM{n:04d}.dcm" for n in np.random.default_rng(3).permutation(SHAPE[0]) + 1]
    write_dicom_series(folder / "dicom_shuffled", ct_phantom(), file_names=names)
    return BrokenInput("dicom_shuffled", folder / "dicom_shuffled", "image", "warning", r"file names do not follow")


def write_dicom_gap(folder: Path) -> BrokenInput:
    hu = ct_phantom()
    zs = [ORIGIN[2] + k * SPACING[0] for k in range(SHAPE[0])]
    keep = [k for k in range(SHAPE[0]) if k != 5]  # z = -100 + 5 * 2.5 = -87.5 mm is missing
    write_dicom_series(folder / "dicom_gap", hu[keep], z_positions=[zs[k] for k in keep])
    return BrokenInput("dicom_gap", folder / "dicom_gap", "image", "error", r"1 missing slice\(s\) at position\(s\) -87\.50 mm")


def write_dicom_duplicate(folder: Path) -> BrokenInput:
    zs = [ORIGIN[2] + k * SPACING[0] for k in range(SHAPE[0])]
    zs[6] = zs[5]
    write_dicom_series(folder / "dicom_duplicate", ct_phantom(), z_positions=zs)
    return BrokenInput("dicom_duplicate", folder / "dicom_duplicate", "image", "error", r"duplicate slice position")


def write_dicom_nonuniform(folder: Path) -> BrokenInput:
    zs = [ORIGIN[2] + k * SPACING[0] + (0.6 if k >= 6 else 0.0) for k in range(SHAPE[0])]
    write_dicom_series(folder / "dicom_nonuniform", ct_phantom(), z_positions=zs)
    return BrokenInput("dicom_nonuniform", folder / "dicom_nonuniform", "image", "error", r"non-uniform slice spacing")


def write_dicom_mixed_size(folder: Path) -> BrokenInput:
    """Two slices of one series replaced by 24 x 18 images at the same positions."""
    target, uid = folder / "dicom_mixed_size", "1.2.826.0.1.3680043.8.498.3"
    zs = [ORIGIN[2] + k * SPACING[0] for k in range(SHAPE[0])]
    write_dicom_series(target, ct_phantom(), series_uid=uid)
    write_dicom_series(target, ct_phantom((2, 24, 18)), series_uid=uid, z_positions=zs[5:7], file_names=["IM0006.dcm", "IM0007.dcm"])
    return BrokenInput("dicom_mixed_size", target, "image", "error", r"differ in image size.*2 of 12 file\(s\)")


def write_dicom_two_series(folder: Path) -> BrokenInput:
    target = folder / "dicom_two_series"
    write_dicom_series(target, ct_phantom(), series_uid="1.2.826.0.1.3680043.8.498.1")
    names = [f"B{n:04d}.dcm" for n in range(1, 6)]
    write_dicom_series(target, ct_phantom((5, 24, 20)), series_uid="1.2.826.0.1.3680043.8.498.2", file_names=names)
    return BrokenInput("dicom_two_series", target, "image", "error", r"mixes 2 DICOM series.*\(12 slices\).*\(5 slices\)")


def write_dicom_mr(folder: Path) -> BrokenInput:
    write_dicom_series(folder / "dicom_mr", ct_phantom(), modality="MR")
    return BrokenInput("dicom_mr", folder / "dicom_mr", "image", "error", r"modality MR, not CT")


def outside_field_of_view() -> np.ndarray:
    """``(Y, X)`` pixels outside the circle a scanner reconstructs (the corners of the phantom)."""
    yy, xx = np.mgrid[0 : SHAPE[1], 0 : SHAPE[2]]
    return (yy - (SHAPE[1] - 1) / 2) ** 2 + (xx - (SHAPE[2] - 1) / 2) ** 2 > (SHAPE[2] / 2) ** 2


def write_dicom_padding(folder: Path) -> BrokenInput:
    """Pixel Padding Value -2000 (-3024 HU) outside a circular field of view, as scanners write it."""
    hu = ct_phantom()
    outside = outside_field_of_view()
    hu[:, outside] = -3024.0
    write_dicom_series(folder / "dicom_padding", hu, extra={"PixelPaddingValue": -2000})
    return BrokenInput("dicom_padding", folder / "dicom_padding", "image", "warning",
                       rf"{SHAPE[0] * int(outside.sum()):,} voxels hold the Pixel Padding Value")


def write_dicom_colour(folder: Path) -> BrokenInput:
    write_dicom_series(folder / "dicom_colour", ct_phantom(), extra={"SamplesPerPixel": 3, "PhotometricInterpretation": "RGB"})
    return BrokenInput("dicom_colour", folder / "dicom_colour", "image", "error", r"colour image \(3 samples per pixel\)")


def write_dicom_multiframe_series(folder: Path) -> BrokenInput:
    """A series of three multi-frame (enhanced) files, two frames each: refused naming a file, not
    with a decoding or geometry error."""
    rows, cols = SHAPE[1:]
    frames = np.zeros((2, rows, cols), np.int16).tobytes()
    target = folder / "dicom_multiframe_series"
    write_dicom_series(target, ct_phantom((3, rows, cols)), extra={"NumberOfFrames": 2, "PixelData": frames})
    return BrokenInput("dicom_multiframe_series", target, "image", "error",
                       r"IM0001\.dcm is a multi-frame \(enhanced\) DICOM of 2 frames \(and 2 more of the 3 files")


def write_dicom_truncated_slice(folder: Path) -> BrokenInput:
    paths = write_dicom_series(folder / "dicom_truncated", ct_phantom())
    payload = paths[4].read_bytes()
    paths[4].write_bytes(payload[: len(payload) - 200])
    return BrokenInput("dicom_truncated_slice", folder / "dicom_truncated", "image", "error", r"IM0005\.dcm")


def write_empty_folder(folder: Path) -> BrokenInput:
    (folder / "empty_folder").mkdir(parents=True, exist_ok=True)
    return BrokenInput("empty_folder", folder / "empty_folder", "image", "error", r"empty")


def write_folder_without_dicom(folder: Path) -> BrokenInput:
    target = folder / "no_dicom"
    target.mkdir(parents=True, exist_ok=True)
    (target / "notes.txt").write_text("radiology report\n")
    return BrokenInput("folder_without_dicom", target, "image", "error", r"no DICOM image.*notes\.txt")


def write_non_image_file(folder: Path) -> BrokenInput:
    path = folder / "report.pdf"
    path.write_bytes(b"%PDF-1.4 not an image")
    return BrokenInput("non_image_file", path, "image", "error", r"not a supported image")


def write_missing_file(folder: Path) -> BrokenInput:
    return BrokenInput("missing_file", folder / "does_not_exist.nii.gz", "image", "error", r"no such file")


def write_manifest_bad_rows(folder: Path) -> BrokenInput:
    """A manifest with a duplicate id, an unknown label, a missing file, bad ids and one image
    named by five rows."""
    target = folder / "manifest_bad"
    target.mkdir(parents=True, exist_ok=True)
    write_nifti(target / "good.nii.gz", ct_phantom())
    rows = [
        "case_id,label,image_path,mask_path,lung_path,source",
        "case_a,covid,good.nii.gz,,,synthetic",
        "case_a,cap,good.nii.gz,,,synthetic",
        "case_b,flu,good.nii.gz,,,synthetic",
        "case_c,normal,missing.nii.gz,,,synthetic",
        "case d,normal,good.nii.gz,,,synthetic",
        "..,normal,good.nii.gz,,,synthetic",
    ]
    path = target / "manifest.csv"
    path.write_text("\n".join(rows) + "\n")
    problem = (r"(?s)^(?=.*6 problem)(?=.*'case_a' appears in rows 1, 2)(?=.*'flu')(?=.*missing\.nii\.gz)(?=.*'case d')"
               r"(?=.*'\.\.'\): case_id .* may not start with '\.')(?=.*rows 1, 2, 3, 5, 6 .* name the same image .*good\.nii\.gz)")
    return BrokenInput("manifest_bad_rows", path, "manifest", "error", problem)


def write_manifest_missing_column(folder: Path) -> BrokenInput:
    target = folder / "manifest_missing_column"
    target.mkdir(parents=True, exist_ok=True)
    path = target / "manifest.csv"
    path.write_text("case_id,image_path\ncase_a,a.nii.gz\n")
    return BrokenInput("manifest_missing_column", path, "manifest", "error", r"missing column.*label")


BROKEN_INPUTS: tuple[Callable[[Path], BrokenInput], ...] = (
    write_truncated_nii_gz, write_truncated_nii, write_not_gzip, write_nan_voxels, write_nan_vox_offset,
    write_nifti_without_orientation, write_windowed_0_255,
    write_mr_like, write_image_2d, write_single_slice, write_image_4d, write_image_4d_singleton,
    write_zero_spacing, write_negative_spacing, write_nan_spacing, write_absurd_shape, write_mha_absurd_shape,
    write_truncated_mha, write_truncated_nrrd, write_mask_other_shape, write_mask_other_affine,
    write_mask_non_binary, write_dicom_shuffled, write_dicom_gap, write_dicom_duplicate, write_dicom_nonuniform,
    write_dicom_mixed_size, write_dicom_two_series, write_dicom_mr, write_dicom_padding, write_dicom_colour,
    write_dicom_multiframe_series, write_dicom_truncated_slice, write_empty_folder,
    write_folder_without_dicom, write_non_image_file, write_missing_file, write_manifest_bad_rows,
    write_manifest_missing_column,
)  # fmt: skip


def write_all(folder: Path) -> dict[str, BrokenInput]:
    """Write every input of :data:`BROKEN_INPUTS` into `folder`; returns them by name."""
    folder.mkdir(parents=True, exist_ok=True)
    written = [writer(folder) for writer in BROKEN_INPUTS]
    return {item.name: item for item in written}


def names() -> list[str]:
    """Names of the inputs (stable order, for pytest parametrisation)."""
    return [writer.__name__.removeprefix("write_") for writer in BROKEN_INPUTS]
