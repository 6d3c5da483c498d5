"""The one canonical in-memory CT volume, and NIfTI writing that keeps it overlaid.

Orientation convention (used by every module of deepsc):

* ``array`` has shape ``(Z, Y, X)`` = (slices, rows, columns), indexed ``array[z, y, x]``.
* The voxel axes point to patient **L**eft (x), **P**osterior (y) and **S**uperior (z):
  "LPS", the DICOM / ITK patient convention. A slice ``array[z]`` therefore displays in the
  radiological convention (anterior at the top, patient's right on the left of the image),
  and ``z = 0`` is the most inferior slice.
* ``affine`` is the 4 x 4 NIfTI (RAS+ world, mm) affine of the *transposed* array
  ``array.transpose(2, 1, 0)`` (x, y, z), i.e. exactly what a NIfTI file of the volume holds.
  Oblique scans keep their rotation in the affine; the axes are only permuted/flipped to the
  closest LPS order.
* ``spacing`` is ``(sz, sy, sx)`` in mm, in the same order as ``array``'s axes.
* Intensities are Hounsfield units (float32) for images; masks are uint8 {0, 1}.
"""

from __future__ import annotations

import functools
import gzip
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

CANONICAL_AXCODES = ("L", "P", "S")


@dataclass
class CTVolume:
    """A CT scan (or a mask) in the canonical orientation described in the module docstring.

    Args:
        array: ``(Z, Y, X)`` voxel values, HU for images.
        affine: 4 x 4 RAS+ NIfTI affine of ``array.transpose(2, 1, 0)``.
        case_id: name used in messages.
        meta: free-form provenance (source path, series UID, warnings, ...).
    """

    array: np.ndarray
    affine: np.ndarray
    case_id: str = "scan"
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from deepsc.errors import InputError

        if self.array.ndim != 3:
            raise InputError(self.case_id, f"expected a 3D volume, got {self.array.ndim}D shape {self.array.shape}")
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.affine.shape != (4, 4) or not np.all(np.isfinite(self.affine)):
            raise InputError(self.case_id, "affine must be a finite 4 x 4 matrix")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size ``(sz, sy, sx)`` in mm."""
        return spacing_from_affine(self.affine)

    @property
    def voxel_volume_ml(self) -> float:
        sz, sy, sx = self.spacing
        return sz * sy * sx / 1000.0

    def like(self, array: np.ndarray, case_id: str | None = None) -> "CTVolume":
        """A volume with the same geometry holding other voxels (a mask, a probability map)."""
        if array.shape != self.array.shape:
            raise ValueError(f"shape {array.shape} differs from the reference {self.array.shape}")
        return CTVolume(array, self.affine.copy(), case_id or self.case_id, dict(self.meta))


def spacing_from_affine(affine: np.ndarray) -> tuple[float, float, float]:
    """``(sz, sy, sx)`` in mm from a NIfTI affine of an (x, y, z) array."""
    zooms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    return float(zooms[2]), float(zooms[1]), float(zooms[0])


def lps_affine(spacing_zyx: tuple[float, float, float], origin_lps: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """NIfTI (RAS) affine of an axis-aligned canonical LPS volume.

    Args:
        spacing_zyx: voxel size (sz, sy, sx) in mm.
        origin_lps: DICOM-style LPS position (mm) of voxel [0, 0, 0].
    """
    sz, sy, sx = spacing_zyx
    affine = np.diag([-sx, -sy, sz, 1.0])
    affine[:3, 3] = (-origin_lps[0], -origin_lps[1], origin_lps[2])
    return affine


def from_nibabel(img: Any, case_id: str, dtype: type = np.float32) -> CTVolume:
    """Reorient a nibabel image to canonical LPS and return it as a CTVolume (3D only)."""
    from nibabel import orientations as ornt

    from deepsc.errors import InputError

    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise InputError(case_id, f"expected a 3D volume, got {len(img.shape)}D shape {tuple(img.shape)}")
    affine = img.affine
    if affine is None or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise InputError(case_id, "the header's affine is missing or singular (zero or non-finite spacing)")
    data = np.asarray(img.dataobj, dtype=dtype).reshape(shape)
    current = ornt.io_orientation(affine)
    transform = ornt.ornt_transform(current, ornt.axcodes2ornt(CANONICAL_AXCODES))
    data = ornt.apply_orientation(data, transform)
    new_affine = affine @ ornt.inv_ornt_aff(transform, shape)
    return CTVolume(np.ascontiguousarray(data.transpose(2, 1, 0)), new_affine, case_id)


def file_axis_of_z(affine_ras: np.ndarray) -> tuple[int, bool]:
    """``(axis, reversed)``: which voxel axis of a file with this RAS affine becomes canonical z
    (inferior -> superior), and whether its index runs the other way (then canonical ``z`` is the
    file's index ``n - 1 - z``). Reports use it to name slices as a viewer of the file counts them."""
    from nibabel import orientations as ornt

    transform = ornt.ornt_transform(ornt.io_orientation(affine_ras), ornt.axcodes2ornt(CANONICAL_AXCODES))
    axis = int(np.flatnonzero(transform[:, 0] == 2)[0])
    return axis, bool(transform[axis, 1] < 0)


def to_nibabel(volume: CTVolume, dtype: Any | None = None) -> Any:
    """The volume as a nibabel Nifti1Image (scanner-anatomical qform and sform, mm units)."""
    import nibabel as nib

    data = volume.array if dtype is None else volume.array.astype(dtype)
    img = nib.Nifti1Image(np.ascontiguousarray(data.transpose(2, 1, 0)), volume.affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(volume.affine, code=1)
    img.set_sform(volume.affine, code=1)
    return img


@functools.cache
def _process_umask() -> int:
    mask = os.umask(0o022)  # the only portable way to read it: set, then restore at once
    os.umask(mask)
    return mask


def shareable_mode(directory: bool = False) -> int:
    """The mode ``open`` / ``mkdir`` would give under the process umask (0644 / 0755 under 022).

    ``tempfile.mkstemp`` / ``mkdtemp`` create 0600 / 0700; a file or folder renamed into place
    from them would stay unreadable to the other users of a shared volume (the MLflow server,
    a pipeline step running as another uid)."""
    return (0o777 if directory else 0o666) & ~_process_umask()


def atomic_write_bytes(path: str | os.PathLike, payload: bytes) -> None:
    """Write a file so that readers see either the old or the complete new content.

    The file gets the umask's mode, as a plain ``open`` would give it. Its bytes reach the disk
    before the rename, and the rename before this returns (``fsync`` of the file, then of the
    folder), so a power cut cannot leave an empty or truncated file under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, shareable_mode())
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def fsync_folder(folder: str | os.PathLike) -> None:
    """Make a rename inside ``folder`` durable. Best effort: some file systems (and Windows)
    cannot open or sync a folder, and the rename itself has already happened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_nifti(volume: CTVolume, path: str | os.PathLike, dtype: Any | None = None) -> Path:
    """Write `volume` as NIfTI (.nii or .nii.gz), atomically and byte-deterministically.

    The gzip stream is written with mtime 0, so the same volume always gives the same bytes
    (the synthetic cohort is pinned by data.dvc).
    """
    path = Path(path)
    payload = to_nibabel(volume, dtype).to_bytes()
    if path.name.endswith(".gz"):
        payload = gzip.compress(payload, compresslevel=6, mtime=0)
    atomic_write_bytes(path, payload)
    return path
