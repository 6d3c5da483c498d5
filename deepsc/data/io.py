"""Reading CT scans and masks into the canonical :class:`~deepsc.data.volume.CTVolume`.

Formats (chosen from what the path is, see :func:`detect_format`):

* **NIfTI** ``.nii`` / ``.nii.gz`` (NIfTI-1 and NIfTI-2), read with nibabel;
* **DICOM**: a folder holding one CT series, or one ``.dcm`` file (its series is read from
  the file's folder), read with pydicom; JPEG-Lossless pixel data is decoded by pylibjpeg,
  and SimpleITK decodes what pydicom cannot;
* **MetaImage** ``.mha`` / ``.mhd`` and **NRRD** ``.nrrd`` / ``.nhdr``, read with SimpleITK.

Every reader returns the canonical orientation of :mod:`deepsc.data.volume`: ``array`` is
``(Z, Y, X)`` float32 HU, LPS (``z = 0`` is the most inferior slice), ``affine`` the NIfTI RAS
affine. DICOM and ITK geometry is LPS (origin, direction cosines, spacing); it is turned into a
RAS affine by negating the first two world axes, then reoriented by
:func:`~deepsc.data.volume.from_nibabel`.

Memory safety: the shape a header claims is checked against ``max_voxels`` and the file size
against the bytes the header promises *before* any voxel buffer is allocated.

Every problem with the input raises :class:`~deepsc.errors.InputError` naming the case, the
file and the problem; exceptions of nibabel, pydicom, SimpleITK, gzip and zlib are wrapped the
same way. No judgement about HU plausibility is made here (``deepsc validate`` does that).

``volume.meta`` holds ``source`` (the path read), ``format`` (nifti | dicom | metaimage | nrrd),
``modality`` (the DICOM Modality, ``None`` for formats without one), ``series_uid`` (DICOM) and
``warnings`` (awkward but readable input, also logged). DICOM volumes add
``instance_numbers``: the InstanceNumber of each ``array`` slice, ``z = 0`` first; NIfTI,
MetaImage and NRRD volumes add ``file_axis_of_z``: ``[axis, reversed]`` of the file's voxel axis
that became ``z`` (:func:`~deepsc.data.volume.file_axis_of_z`).
"""

from __future__ import annotations

import contextlib
import gzip
import io
import logging
import math
import re
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from deepsc.data.volume import CTVolume, file_axis_of_z, from_nibabel, save_nifti
from deepsc.errors import DeepSCError, InputError

logger = logging.getLogger(__name__)

DEFAULT_MAX_VOXELS = 400_000_000
NIFTI_SUFFIXES = (".nii", ".nii.gz")
METAIMAGE_SUFFIXES = (".mha", ".mhd")
NRRD_SUFFIXES = (".nrrd", ".nhdr")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
AIR_HU = -1024.0  # what DICOM pixel padding below air becomes (the usual CT value of air)

# DICOM geometry tolerances (mm unless stated).
_DUPLICATE_MM = 0.01          # two slices closer than this share a position
_JITTER_FRACTION = 0.1        # slice steps within +-10 % of the median step are jitter
_GAP_FRACTION = 1.5           # a step over 1.5 x the median step is a missing slice
_ORIENTATION_TOL = 1e-4       # direction cosines that differ more are another orientation
_PIXEL_SPACING_TOL_MM = 1e-3
_TILT_WARN_DEGREES = 0.5
# A mask's voxel grid may sit this fraction of the smallest voxel size off the image's.
_MASK_GRID_TOL_VOXELS = 0.1


def read_ct(path: str | Path, case_id: str | None = None, *, max_voxels: int = DEFAULT_MAX_VOXELS) -> CTVolume:
    """Read a CT scan in any supported format into the canonical LPS orientation.

    Args:
        path: a NIfTI / MetaImage / NRRD file, a DICOM series folder or one file of it.
        case_id: name used in messages (default: derived from the file or folder name).
        max_voxels: refuse headers claiming more voxels than this (memory safety).

    Returns:
        ``CTVolume`` with ``array`` ``(Z, Y, X)`` float32 (HU for CT) and its RAS affine.

    Raises:
        InputError: unreadable, truncated, not 3D, bad spacing, non-finite voxels, a DICOM
            folder that is not exactly one consistent CT series, ... (names case and file).
    """
    path = Path(path)
    case_id = case_id or default_case_id(path)
    if not isinstance(max_voxels, int) or max_voxels <= 0:
        raise ValueError(f"max_voxels must be a positive integer, got {max_voxels!r}")
    fmt = detect_format(path, case_id)
    readers = {"nifti": _read_nifti, "dicom": _read_dicom, "metaimage": _read_itk_file, "nrrd": _read_itk_file}
    volume = readers[fmt](path, case_id, max_voxels)
    _require_finite(volume.array, case_id, path)
    volume.meta = {"source": str(path), "format": fmt, "modality": None, "series_uid": None, **volume.meta}
    volume.meta.setdefault("warnings", [])
    for message in volume.meta["warnings"]:
        logger.warning("%s: %s", case_id, message)
    return volume


def read_mask(
    path: str | Path,
    reference: CTVolume,
    case_id: str | None = None,
    *,
    binarize: bool = False,
    max_voxels: int = DEFAULT_MAX_VOXELS,
) -> np.ndarray:
    """Read a binary mask that overlays `reference` and return it as uint8 ``(Z, Y, X)``.

    The mask is reoriented to LPS like every scan, so a mask stored in another axis order is
    accepted as long as it covers the same voxel grid in the world.

    Args:
        path: mask file (any format :func:`read_ct` reads).
        reference: the image the mask belongs to.
        case_id: name used in messages (default: the reference's).
        binarize: map every non-zero label to 1 (label maps such as left/right lung = 1/2)
            instead of refusing values other than 0 and 1.

    Raises:
        InputError: the mask's shape or voxel grid differs from the image's, or it holds values
            other than 0 and 1 (the message lists them).
    """
    case_id = case_id or reference.case_id
    path = Path(path)
    mask = read_ct(path, case_id, max_voxels=max_voxels)
    if mask.shape != reference.shape:
        raise InputError(case_id, f"mask {path} has shape {mask.shape} (Z, Y, X) but the image has {reference.shape}")
    offset_mm = grid_mismatch_mm(mask.affine, reference.affine, reference.shape)
    tolerance_mm = _MASK_GRID_TOL_VOXELS * min(reference.spacing)
    if offset_mm > tolerance_mm:
        raise InputError(
            case_id,
            f"mask {path} does not overlay the image: its voxel grid (affine) is up to {offset_mm:.2f} mm "
            f"away from the image's (tolerance {tolerance_mm:.2f} mm)",
        )
    values = mask.array
    if binarize:
        return (values != 0).astype(np.uint8)
    not_binary = (values != 0) & (values != 1)
    if np.any(not_binary):
        found = np.unique(values[not_binary])
        shown = ", ".join(f"{v:g}" for v in found[:10]) + (", ..." if found.size > 10 else "")
        raise InputError(
            case_id,
            f"mask {path} is not binary: besides 0 and 1 it holds {found.size} other value(s) ({shown}) "
            f"in {int(np.count_nonzero(not_binary))} voxels",
        )
    return values.astype(np.uint8)


def write_mask(mask: np.ndarray, reference: CTVolume, path: str | Path) -> Path:
    """Write a binary ``(Z, Y, X)`` mask as a uint8 NIfTI that overlays `reference`.

    The file is written atomically and byte-deterministically (``save_nifti``), in the canonical
    LPS axis order with the reference's affine, so any viewer overlays it on the image.

    Raises:
        ValueError: the shape differs from the reference's, values are not 0/1, or the file
            name does not end in .nii / .nii.gz (programming errors, not bad input).
    """
    path = Path(path)
    if not path.name.lower().endswith(NIFTI_SUFFIXES):
        raise ValueError(f"write_mask writes NIfTI: the file name must end in .nii or .nii.gz, got {path.name}")
    array = np.asarray(mask)
    if array.shape != reference.shape:
        raise ValueError(f"mask shape {array.shape} differs from the reference {reference.shape}")
    if array.dtype != np.bool_ and np.any((array != 0) & (array != 1)):
        raise ValueError("write_mask expects a binary mask (values 0 and 1)")
    return save_nifti(reference.like(array.astype(np.uint8)), path, dtype=np.uint8)


def detect_format(path: Path, case_id: str) -> str:
    """``nifti`` | ``dicom`` | ``metaimage`` | ``nrrd`` from what `path` is (InputError if none)."""
    if path.is_dir():
        return "dicom"
    if not path.exists():
        raise InputError(case_id, f"no such file or folder: {path}")
    name = path.name.lower()
    for suffixes, fmt in ((NIFTI_SUFFIXES, "nifti"), (METAIMAGE_SUFFIXES, "metaimage"), (NRRD_SUFFIXES, "nrrd")):
        if name.endswith(suffixes):
            return fmt
    if name.endswith(DICOM_SUFFIXES) or _has_dicom_preamble(path):
        return "dicom"
    raise InputError(
        case_id,
        f"{path} is not a supported image: expected NIfTI (.nii, .nii.gz), MetaImage (.mha, .mhd), "
        "NRRD (.nrrd, .nhdr) or a DICOM series (a folder or one of its files)",
    )


def default_case_id(path: Path) -> str:
    """The file name without its image suffix; the folder name for DICOM."""
    path = Path(path)
    if path.name in ("", ".", ".."):  # "." or "..": the folder's own name
        path = path.resolve()
    name = path.name
    if path.is_file() and (name.lower().endswith(DICOM_SUFFIXES) or _has_dicom_preamble(path)):
        return path.parent.name or name
    for suffix in sorted(NIFTI_SUFFIXES + METAIMAGE_SUFFIXES + NRRD_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)] or name
    return name or str(path)


def grid_mismatch_mm(affine_a: np.ndarray, affine_b: np.ndarray, shape_zyx: Sequence[int]) -> float:
    """Largest world distance (mm) between the same corner voxel of two voxel grids."""
    z, y, x = (int(s) - 1 for s in shape_zyx)
    corners = np.array([[i, j, k, 1.0] for i in (0, x) for j in (0, y) for k in (0, z)]).T
    return float(np.max(np.linalg.norm((np.asarray(affine_a) @ corners - np.asarray(affine_b) @ corners)[:3], axis=0)))


# --------------------------------------------------------------------------- shared checks


@contextlib.contextmanager
def _library_errors(case_id: str, path: Path, action: str) -> Iterator[None]:
    """Turn any exception of a reading library into an InputError naming case, file, action."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom / nibabel complain about harmless header quirks
            yield
    except DeepSCError:
        raise
    except MemoryError:
        raise InputError(case_id, f"not enough memory to {action} {path}") from None
    except (EOFError, gzip.BadGzipFile) as exc:
        raise InputError(case_id, f"cannot {action} {path}: the file is truncated or corrupt ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - every library error becomes a message for the user
        detail = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise InputError(case_id, f"cannot {action} {path}: {detail}") from None


def _check_shape(shape: Sequence[int], case_id: str, path: Path, max_voxels: int) -> tuple[int, int, int]:
    """The 3D shape of a header's dims (a singleton 4th axis is dropped); refuse the rest."""
    dims = [int(s) for s in shape]
    if len(dims) < 3:
        raise InputError(case_id, f"{path} is a {len(dims)}D image of shape {tuple(dims)}: a 3D CT volume is needed")
    if 1 in dims[:3]:
        raise InputError(case_id, f"{path} holds a single slice, shape {tuple(dims)}: a 2D image, a 3D CT volume is needed")
    if len(dims) > 3 and any(d != 1 for d in dims[3:]):
        raise InputError(
            case_id,
            f"{path} is a {len(dims)}D image of shape {tuple(dims)} (several volumes or channels): a single 3D CT volume is needed",
        )
    if any(d <= 0 for d in dims):
        raise InputError(case_id, f"{path} claims an empty shape {tuple(dims)}")
    n_voxels = math.prod(dims[:3])
    if n_voxels > max_voxels:
        raise InputError(
            case_id,
            f"{path} claims shape {tuple(dims[:3])} = {n_voxels:,} voxels, over the limit of {max_voxels:,} "
            "(validate.max_voxels): refused before reading to protect memory",
        )
    return dims[0], dims[1], dims[2]


def _check_spacing(spacing: Sequence[float], case_id: str, path: Path) -> None:
    values = [float(s) for s in spacing]
    if not all(math.isfinite(s) and s > 0 for s in values):
        raise InputError(case_id, f"{path} has invalid voxel spacing {tuple(values)} mm: every spacing must be finite and positive")


def _check_payload_size(data_file: Path, offset: int, expected: int, case_id: str, path: Path) -> None:
    """Refuse a file that holds fewer bytes of voxel data than its header promises."""
    if not data_file.is_file():
        raise InputError(case_id, f"{path}: the voxel data file {data_file} named by the header is missing")
    available = data_file.stat().st_size - offset
    if available < expected:
        raise InputError(
            case_id,
            f"{path} is truncated: it holds {max(available, 0):,} bytes of voxel data but the header needs {expected:,}",
        )


def _require_finite(array: np.ndarray, case_id: str, path: Path) -> None:
    if np.issubdtype(array.dtype, np.floating):
        n_bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        if n_bad:
            raise InputError(case_id, f"{path} has {n_bad:,} NaN or infinite voxel values")


def _has_dicom_preamble(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def _lps_to_ras(affine_lps: np.ndarray) -> np.ndarray:
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_lps


def _canonical(array_kji: np.ndarray, affine_ijk_ras: np.ndarray, case_id: str) -> CTVolume:
    """Wrap a ``(k, j, i)`` array whose ``(i, j, k)`` -> RAS affine is known, then reorient to LPS."""
    import nibabel as nib

    image = nib.Nifti1Image(array_kji.transpose(2, 1, 0), affine_ijk_ras)
    return from_nibabel(image, case_id)


# --------------------------------------------------------------------------- NIfTI


def _read_nifti(path: Path, case_id: str, max_voxels: int) -> CTVolume:
    import nibabel as nib
    from nibabel.imageglobals import LoggingOutputSuppressor

    header = _nifti_header(path, case_id)
    dims = header["dim"]
    n_dims = int(dims[0])
    if not 1 <= n_dims <= 7:
        raise InputError(case_id, f"{path} has an invalid NIfTI header (dim[0] = {n_dims})")
    shape = [int(d) for d in dims[1 : n_dims + 1]]
    _check_shape(shape, case_id, path, max_voxels)
    _check_spacing(header["pixdim"][1:4], case_id, path)
    if not path.name.lower().endswith(".gz"):
        with _library_errors(case_id, path, "read the data type in the NIfTI header of"):
            expected = math.prod(shape) * header.get_data_dtype().itemsize
        _check_payload_size(path, _vox_offset(header, case_id, path), expected, case_id, path)
    notes = []
    if int(header["qform_code"]) == 0 and int(header["sform_code"]) == 0:
        notes.append("the NIfTI header records no orientation (qform and sform codes are 0): left and right are "
                     "unknown; read with nibabel's fallback axes (LAS, the Analyze convention)")
    with _library_errors(case_id, path, "read the NIfTI file"), LoggingOutputSuppressor():
        image = nib.load(path)
        volume = from_nibabel(image, case_id)
    _check_spacing(volume.spacing, case_id, path)
    volume.meta = {"warnings": notes, "file_axis_of_z": list(file_axis_of_z(image.affine))}
    return volume


def _vox_offset(header: Any, case_id: str, path: Path) -> int:
    """Byte offset of the voxel data: a whole number no smaller than the header itself."""
    offset = float(header["vox_offset"])
    if not math.isfinite(offset) or offset < header.sizeof_hdr or offset != int(offset):
        raise InputError(case_id, f"{path} has an invalid NIfTI header (vox_offset = {offset}; the voxel data "
                                  f"must start at a whole byte offset of at least {header.sizeof_hdr})")
    return int(offset)


def _nifti_header(path: Path, case_id: str) -> Any:
    """The raw header as written (nibabel's loader silently 'fixes' zero or negative pixdim)."""
    import nibabel as nib

    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with _library_errors(case_id, path, "read the NIfTI header of"):
        with opener(path, "rb") as handle:
            block = handle.read(540)
        if len(block) < 348:
            raise InputError(case_id, f"{path} is too short ({len(block)} bytes) to hold a NIfTI header")
        sizes = {struct.unpack(order + "i", block[:4])[0] for order in "<>"}
        if 540 in sizes and len(block) >= 540:
            return nib.Nifti2Header(block[:540], check=False)
        if 348 in sizes:
            return nib.Nifti1Header(block[:348], check=False)
        raise InputError(case_id, f"{path} is not a NIfTI file (header size field is not 348 or 540)")


# --------------------------------------------------------------------------- MetaImage / NRRD

_MET_SIZES = {
    "MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
    "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8,
}  # fmt: skip
_NRRD_SIZES = {
    **dict.fromkeys(("signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8", "uint8_t"), 1),
    **dict.fromkeys(("short", "short int", "signed short", "signed short int", "int16", "int16_t", "ushort",
                     "unsigned short", "unsigned short int", "uint16", "uint16_t"), 2),
    **dict.fromkeys(("int", "signed int", "int32", "int32_t", "uint", "unsigned int", "uint32", "uint32_t", "float"), 4),
    **dict.fromkeys(("longlong", "long long", "long long int", "signed long long", "signed long long int", "int64",
                     "int64_t", "ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t",
                     "double"), 8),
}  # fmt: skip
_HEADER_READ_LIMIT = 1 << 16


@dataclass(frozen=True)
class _Payload:
    """Where an uncompressed ITK file keeps its voxels and how many bytes they need."""

    data_file: Path
    offset: int
    expected: int


def _read_itk_file(path: Path, case_id: str, max_voxels: int) -> CTVolume:
    """MetaImage or NRRD through SimpleITK; header checks first, voxels last."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    with _library_errors(case_id, path, "read the image header of"):
        reader.ReadImageInformation()
        size, spacing = list(reader.GetSize()), list(reader.GetSpacing())
        origin, direction = list(reader.GetOrigin()), list(reader.GetDirection())
        components = reader.GetNumberOfComponents()
    _check_shape(size, case_id, path, max_voxels)
    if components != 1:
        raise InputError(case_id, f"{path} has {components} values per voxel (vector or colour image): CT needs one")
    _check_spacing(spacing[:3], case_id, path)
    payload = _itk_payload(path, case_id)
    if payload is not None:
        _check_payload_size(payload.data_file, payload.offset, payload.expected, case_id, path)
    with _library_errors(case_id, path, "read the voxels of"):
        array = sitk.GetArrayFromImage(reader.Execute())
    array = array.reshape(array.shape[-3:]).astype(np.float32, copy=False)  # drops a singleton 4th axis
    n_dims = len(size)
    rotation = np.asarray(direction, dtype=np.float64).reshape(n_dims, n_dims)[:3, :3]
    affine_lps = np.eye(4)
    affine_lps[:3, :3] = rotation * np.asarray(spacing[:3])
    affine_lps[:3, 3] = origin[:3]
    volume = _canonical(array, _lps_to_ras(affine_lps), case_id)
    volume.meta = {"warnings": [], "file_axis_of_z": list(file_axis_of_z(_lps_to_ras(affine_lps)))}
    return volume


def _itk_payload(path: Path, case_id: str) -> _Payload | None:
    """Expected voxel bytes of an uncompressed MetaImage / NRRD (None when not checkable)."""
    with _library_errors(case_id, path, "read the header of"):
        with open(path, "rb") as handle:
            head = handle.read(_HEADER_READ_LIMIT)
    if path.name.lower().endswith(METAIMAGE_SUFFIXES):
        return _metaimage_payload(path, head)
    return _nrrd_payload(path, head)


def _metaimage_payload(path: Path, head: bytes) -> _Payload | None:
    fields: dict[str, str] = {}
    end = 0
    for line in io.BytesIO(head):
        end += len(line)
        key, sep, value = line.decode("latin-1").partition("=")
        if not sep:
            return None
        fields[key.strip().lower()] = value.strip()
        if key.strip().lower() == "elementdatafile":
            break
    else:
        return None
    item = _MET_SIZES.get(fields.get("elementtype", "").upper())
    data = fields.get("elementdatafile", "")
    if item is None or fields.get("compresseddata", "false").lower() == "true" or data.upper() == "LIST" or "%" in data:
        return None
    try:
        dims = [int(v) for v in fields.get("dimsize", "").split()]
        channels = int(fields.get("elementnumberofchannels", "1"))
        header_size = int(fields.get("headersize", "0"))
    except ValueError:
        return None
    if not dims or header_size < 0:
        return None
    expected = math.prod(dims) * channels * item
    if data.upper() == "LOCAL":
        return _Payload(path, end, expected)
    return _Payload(path.parent / data, header_size, expected)


def _nrrd_payload(path: Path, head: bytes) -> _Payload | None:
    fields: dict[str, str] = {}
    end = 0
    for number, line in enumerate(io.BytesIO(head)):
        end += len(line)
        text = line.decode("latin-1").rstrip("\r\n")
        if number == 0 or text.startswith("#") or ":=" in text:
            continue
        if not text:
            break
        key, sep, value = text.partition(":")
        if sep:
            fields[key.strip().lower()] = value.strip()
    else:
        return None
    item = _NRRD_SIZES.get(fields.get("type", "").lower())
    data = fields.get("data file", fields.get("datafile", ""))
    if item is None or fields.get("encoding", "").lower() != "raw":
        return None
    try:
        dims = [int(v) for v in fields.get("sizes", "").split()]
        byte_skip = int(fields.get("byte skip", "0"))
        line_skip = int(fields.get("line skip", "0"))
    except ValueError:
        return None
    if not dims or byte_skip < 0 or line_skip != 0 or data.upper().startswith("LIST") or " " in data:
        return None
    expected = math.prod(dims) * item
    if not data:
        return _Payload(path, end + byte_skip, expected)
    return _Payload(path.parent / data, byte_skip, expected)


# --------------------------------------------------------------------------- DICOM


@dataclass(frozen=True)
class _DicomSlice:
    path: Path
    header: Any  # pydicom Dataset without pixel data


def _read_dicom(path: Path, case_id: str, max_voxels: int) -> CTVolume:
    """One CT series from a folder (or from the folder of one of its files)."""
    # Malformed header values surface as assorted exceptions deep inside pydicom: all are input errors.
    with _quiet_pydicom(), _library_errors(case_id, path, "read the DICOM series"):
        return _read_dicom_series(path, case_id, max_voxels)


@contextlib.contextmanager
def _quiet_pydicom() -> Iterator[None]:
    """Silence pydicom's value-validation warnings and logs (e.g. non-numeric UIDs)."""
    from pydicom import config

    previous = config.settings.reading_validation_mode
    config.settings.reading_validation_mode = config.IGNORE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        config.settings.reading_validation_mode = previous


def _read_dicom_series(path: Path, case_id: str, max_voxels: int) -> CTVolume:
    folder, chosen = (path, None) if path.is_dir() else (path.parent, path)
    slices, notes = _dicom_image_headers(folder, case_id)
    series_uid, slices = _one_series(slices, chosen, folder, case_id)
    _check_modality(slices, folder, case_id, notes)
    geometry = _series_geometry(slices, folder, case_id)
    notes += geometry.notes
    rows, cols = geometry.rows, geometry.cols
    _check_shape((cols, rows, len(slices)), case_id, folder, max_voxels)
    ordered = [slices[k] for k in geometry.order]
    if _names_out_of_order(ordered):
        notes.append("file names do not follow the slice order: slices were sorted by Image Position (Patient)")
    array = np.empty((len(ordered), rows, cols), dtype=np.float32)
    padded = 0
    for k, item in enumerate(ordered):
        array[k] = _slice_hu(item, rows, cols, case_id)
        padded += _pad_to_air(array[k], item.header)
    if padded:
        notes.append(f"{padded:,} voxels hold the Pixel Padding Value (outside the reconstructed field of view, "
                     f"below air): set to {AIR_HU:g} HU")
    volume = _canonical(array, _lps_to_ras(geometry.affine_lps), case_id)
    volume.meta = {
        "modality": str(ordered[0].header.get("Modality", "")) or None,
        "series_uid": series_uid or None,
        "warnings": notes,
        "n_files": len(ordered),
        "instance_numbers": _instance_numbers_in_z_order(ordered, geometry.affine_lps),
    }
    return volume


def _dicom_image_headers(folder: Path, case_id: str) -> tuple[list[_DicomSlice], list[str]]:
    """Headers of the image files of a folder; other files are skipped with a note."""
    import pydicom

    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    files = [p for p in entries if p.is_file()]
    if not files:
        subfolders = [p.name for p in entries if p.is_dir()]
        where = f"holds only sub-folders ({', '.join(subfolders[:5])}): point to one series folder" if subfolders else "is empty"
        raise InputError(case_id, f"folder {folder} {where}; expected the DICOM files of one CT series")
    slices: list[_DicomSlice] = []
    skipped: list[str] = []
    for file in files:
        try:
            with _library_errors(case_id, file, "read the DICOM header of"):
                header = pydicom.dcmread(file, stop_before_pixels=True)
        except InputError:
            if file.name.lower().endswith(DICOM_SUFFIXES) or _has_dicom_preamble(file):
                raise
            skipped.append(file.name)
            continue
        if "Rows" not in header or "Columns" not in header:
            skipped.append(file.name)  # DICOMDIR, structured reports, presentation states
            continue
        slices.append(_DicomSlice(file, header))
    if not slices:
        shown = ", ".join(skipped[:5]) + (", ..." if len(skipped) > 5 else "")
        raise InputError(case_id, f"folder {folder} holds no DICOM image: {len(files)} file(s) ({shown})")
    notes = [f"ignored {len(skipped)} file(s) that are not DICOM images: {', '.join(skipped[:5])}"] if skipped else []
    return slices, notes


def _one_series(
    slices: list[_DicomSlice], chosen: Path | None, folder: Path, case_id: str
) -> tuple[str, list[_DicomSlice]]:
    """The slices of the one series in the folder (or of the chosen file's series)."""
    groups: dict[str, list[_DicomSlice]] = {}
    for item in slices:
        groups.setdefault(str(item.header.get("SeriesInstanceUID", "")), []).append(item)
    if chosen is not None:
        uid = next((u for u, group in groups.items() if any(s.path == chosen for s in group)), None)
        if uid is None:
            raise InputError(case_id, f"{chosen} is not a DICOM image")
        return uid, groups[uid]
    if len(groups) > 1:
        largest_first = sorted(groups.items(), key=lambda item: (-len(item[1]), item[0]))
        listing = "; ".join(f"{uid or '<no SeriesInstanceUID>'} ({len(group)} slices)" for uid, group in largest_first)
        raise InputError(
            case_id,
            f"folder {folder} mixes {len(groups)} DICOM series: {listing}. Put each series in its own folder "
            "or pass one file of the wanted series",
        )
    (uid, group), = groups.items()
    return uid, group


def _check_modality(slices: list[_DicomSlice], folder: Path, case_id: str, notes: list[str]) -> None:
    modalities = sorted({str(s.header.get("Modality", "")).strip() for s in slices})
    if modalities == [""]:
        notes.append("the DICOM files record no Modality: assumed CT")
        return
    if modalities != ["CT"]:
        raise InputError(case_id, f"series in {folder} has modality {', '.join(m or '<none>' for m in modalities)}, not CT")


@dataclass(frozen=True)
class _Geometry:
    order: list[int]            # slice indices sorted along the slice normal (ascending)
    affine_lps: np.ndarray      # (i, j, k) -> LPS mm, k in `order`
    rows: int
    cols: int
    notes: list[str]


def _series_geometry(slices: list[_DicomSlice], folder: Path, case_id: str) -> _Geometry:
    """Sort slices along the normal of Image Orientation (Patient) and check the spacing."""
    _refuse_multiframe(slices, folder, case_id)
    if len(slices) < 2:
        raise InputError(case_id, f"series in {folder} has a single slice: a 2D image, a 3D CT volume is needed")
    rows, cols = (int(v) for v in _consistent(slices, _size, "image size (rows, columns)", 0.0, folder, case_id))
    orientation = np.asarray(_consistent(slices, _orientation, "Image Orientation (Patient)", _ORIENTATION_TOL, folder, case_id))
    pixel = np.asarray(_consistent(slices, _pixel_spacing, "Pixel Spacing", _PIXEL_SPACING_TOL_MM, folder, case_id))
    _check_spacing(pixel, case_id, folder)
    row_dir, col_dir = orientation[:3], orientation[3:]
    if abs(np.linalg.norm(row_dir) - 1) > 1e-3 or abs(np.linalg.norm(col_dir) - 1) > 1e-3 or abs(row_dir @ col_dir) > 1e-3:
        raise InputError(case_id, f"series in {folder} has invalid Image Orientation (Patient) {orientation.tolist()}")
    normal = np.cross(row_dir, col_dir)
    positions = np.array([_position(s, case_id) for s in slices])
    along = positions @ normal
    order = [int(i) for i in np.argsort(along, kind="stable")]
    along, positions = along[order], positions[order]
    names = [slices[i].path.name for i in order]
    step_mm, notes = _check_slice_steps(along, names, folder, case_id)
    step = (positions[-1] - positions[0]) / (len(order) - 1)
    residual = positions - positions[0] - np.outer(np.arange(len(order)), step)
    if np.max(np.linalg.norm(residual, axis=1)) > _JITTER_FRACTION * step_mm:
        raise InputError(case_id, f"slice positions in {folder} do not lie on one line (slices shifted sideways)")
    tilt = math.degrees(math.acos(min(1.0, float(step @ normal) / float(np.linalg.norm(step)))))
    if tilt > _TILT_WARN_DEGREES:
        excess = 100.0 * (1.0 / math.cos(math.radians(tilt)) - 1.0)
        notes.append(f"slices are sheared by {tilt:.1f} degrees (gantry tilt): the affine keeps the shear, but "
                     f"volumes (mL) and mm distances treat the voxel grid as orthogonal and read {excess:.1f} % "
                     "high along the slice axis")
    affine = np.eye(4)
    # Pixel Spacing is (between rows, between columns): i runs along a row (column spacing).
    affine[:3, 0] = row_dir * pixel[1]
    affine[:3, 1] = col_dir * pixel[0]
    affine[:3, 2] = step
    affine[:3, 3] = positions[0]
    return _Geometry(order, affine, rows, cols, notes)


def _refuse_multiframe(slices: list[_DicomSlice], folder: Path, case_id: str) -> None:
    """InputError naming the first multi-frame (enhanced) file of the series, and how many there are."""
    multiframe = [(s.path, frames) for s in slices if (frames := _n_frames(s.header)) > 1]
    if not multiframe:
        return
    (path, frames), more = multiframe[0], len(multiframe) - 1
    others = f" (and {more} more of the {len(slices)} files in {folder})" if more else ""
    raise InputError(
        case_id,
        f"{path} is a multi-frame (enhanced) DICOM of {frames} frames{others}: only one-slice-per-file "
        "series are read (convert the series, e.g. with dcm2niix, and give the NIfTI)",
    )


def _n_frames(header: Any) -> int:
    """Number of Frames (0028,0008) of a header; 1 when absent or unreadable."""
    try:
        return int(header.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        return 1


def _check_slice_steps(along: np.ndarray, names: list[str], folder: Path, case_id: str) -> tuple[float, list[str]]:
    """Refuse duplicate positions, gaps and non-uniform spacing; return the median step (mm)."""
    steps = np.diff(along)
    duplicates = np.flatnonzero(steps < _DUPLICATE_MM)
    if duplicates.size:
        pairs = ", ".join(f"{names[i]} and {names[i + 1]} at {along[i]:.2f} mm" for i in duplicates[:5])
        raise InputError(
            case_id,
            f"series in {folder} has {duplicates.size} duplicate slice position(s): {pairs} "
            "(duplicated files or several acquisitions in one series)",
        )
    step = float(np.median(steps))
    gaps = np.flatnonzero(steps > _GAP_FRACTION * step)
    if gaps.size:
        missing = [along[i] + m * step for i in gaps for m in range(1, max(2, round(steps[i] / step)))]
        shown = ", ".join(f"{p:.2f}" for p in missing[:10]) + (", ..." if len(missing) > 10 else "")
        raise InputError(
            case_id,
            f"series in {folder} has a gap: {len(missing)} missing slice(s) at position(s) {shown} mm along the "
            f"slice normal (slices every {step:.2f} mm; gap after {names[gaps[0]]})",
        )
    deviation = np.abs(steps - step)
    if np.max(deviation) > _JITTER_FRACTION * step:
        raise InputError(
            case_id,
            f"series in {folder} has non-uniform slice spacing: steps from {steps.min():.2f} to {steps.max():.2f} mm "
            f"(median {step:.2f} mm)",
        )
    notes = []
    if np.max(deviation) > 0.01 * step:
        notes.append(f"slice spacing jitters by up to {np.max(deviation):.3f} mm around {step:.3f} mm: the mean step is used")
    return step, notes


def _consistent(slices: list[_DicomSlice], value: Any, what: str, tolerance: float, folder: Path, case_id: str) -> tuple:
    """The one value of a per-slice attribute; InputError naming the files that differ."""
    found = []
    for item in slices:
        try:
            found.append(tuple(float(v) for v in value(item.header)))
        except (AttributeError, KeyError, TypeError, ValueError):
            raise InputError(case_id, f"{item.path} has no valid {what}") from None
    reference = np.asarray(found[0])
    differing = [i for i, v in enumerate(found) if np.max(np.abs(np.asarray(v) - reference)) > tolerance]
    if differing:
        other = differing[0]
        raise InputError(
            case_id,
            f"slices of the series in {folder} differ in {what}: {len(differing)} of {len(slices)} file(s) have another "
            f"value, e.g. {slices[other].path.name} has {list(found[other])}, {slices[0].path.name} has {list(found[0])}",
        )
    return found[0]


def _size(header: Any) -> tuple[int, int]:
    return int(header.Rows), int(header.Columns)


def _orientation(header: Any) -> list[float]:
    values = [float(v) for v in header.ImageOrientationPatient]
    if len(values) != 6:
        raise ValueError("need 6 direction cosines")
    return values


def _pixel_spacing(header: Any) -> list[float]:
    values = [float(v) for v in header.PixelSpacing]
    if len(values) != 2:
        raise ValueError("need 2 values")
    return values


def _position(item: _DicomSlice, case_id: str) -> list[float]:
    try:
        values = [float(v) for v in item.header.ImagePositionPatient]
    except (AttributeError, TypeError, ValueError):
        values = []
    if len(values) != 3 or not all(math.isfinite(v) for v in values):
        raise InputError(case_id, f"{item.path} has no valid Image Position (Patient)")
    return values


def _pad_to_air(hu: np.ndarray, header: Any) -> int:
    """Set a slice's padding voxels to air, in place; return how many there were.

    Pixel Padding Value (0028,0120), up to Pixel Padding Range Limit (0028,0121) when given, is a
    stored value that marks pixels outside the reconstructed field of view (often -2000 stored,
    -3024 HU). Only padding below air is replaced: it would otherwise fail the HU-range check and
    skew intensity statistics. Padding inside the CT range (e.g. -1024 HU) is left as it is.
    """
    value = header.get("PixelPaddingValue")
    if value is None:
        return 0
    try:
        slope = np.float32(float(header.get("RescaleSlope", 1) or 1))
        intercept = np.float32(float(header.get("RescaleIntercept", 0) or 0))
        ends = [np.float32(float(v)) * slope + intercept for v in (value, header.get("PixelPaddingRangeLimit", value))]
    except (TypeError, ValueError):  # an unreadable padding tag: nothing is known to be padding
        return 0
    low, high = min(ends), max(ends)
    if high >= AIR_HU:
        return 0
    padding = (hu >= low) & (hu <= high)
    hu[padding] = AIR_HU
    return int(np.count_nonzero(padding))


def _slice_hu(item: _DicomSlice, rows: int, cols: int, case_id: str) -> np.ndarray:
    """One slice in HU: pydicom (pylibjpeg decodes JPEG) with SimpleITK as the fallback decoder."""
    samples = int(item.header.get("SamplesPerPixel", 1) or 1)
    if samples != 1:  # SimpleITK would decode the colours; say what is wrong instead
        raise InputError(case_id, f"{item.path} is a colour image ({samples} samples per pixel), not a CT slice")
    try:
        pixels = _decode_with_pydicom(item.path)
    except Exception as pydicom_error:  # noqa: BLE001 - any decoder failure: try SimpleITK
        try:
            pixels = _decode_with_simpleitk(item.path)
        except Exception as sitk_error:  # noqa: BLE001
            reasons = [" ".join(str(e).split())[:200] for e in (pydicom_error, sitk_error)]
            raise InputError(
                case_id, f"cannot decode the pixels of {item.path}: pydicom: {reasons[0]}; SimpleITK: {reasons[1]}"
            ) from None
    if pixels.shape != (rows, cols):
        raise InputError(case_id, f"{item.path} decodes to shape {pixels.shape}, its header says {(rows, cols)}")
    return pixels


def _decode_with_pydicom(path: Path) -> np.ndarray:
    """Raw pixels with Rescale Slope / Intercept applied (HU), float32 ``(rows, cols)``."""
    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dataset = pydicom.dcmread(path)  # colour images are refused from the header (_slice_hu)
        pixels = dataset.pixel_array
    slope = float(dataset.get("RescaleSlope", 1) or 1)
    intercept = float(dataset.get("RescaleIntercept", 0) or 0)
    return pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)


def _decode_with_simpleitk(path: Path) -> np.ndarray:
    """SimpleITK (GDCM) applies Rescale Slope / Intercept itself: the result is already HU."""
    import SimpleITK as sitk

    array = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    return np.squeeze(array).astype(np.float32)


def _names_out_of_order(ordered: list[_DicomSlice]) -> bool:
    keys = [_natural_key(s.path.name) for s in ordered]
    return keys != sorted(keys) and keys != sorted(keys, reverse=True)


def _natural_key(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def _instance_numbers_in_z_order(ordered: list[_DicomSlice], affine_lps: np.ndarray) -> list[int | None] | None:
    """InstanceNumber of each canonical slice, ``z = 0`` first; None unless the series is axial.

    `ordered` runs along the slice normal; the canonical z axis is that direction only when the
    slice axis is closest to the patient's head-foot axis.
    """
    slice_axis = affine_lps[:3, 2]
    if int(np.argmax(np.abs(slice_axis))) != 2:
        return None
    numbers = []
    for item in ordered:
        value = item.header.get("InstanceNumber")
        numbers.append(int(value) if value not in (None, "") else None)
    return numbers if slice_axis[2] > 0 else numbers[::-1]
