"""Preprocessing: HU window, lung masking, crop, resampling, classification input, patches.

One scan becomes a :class:`PreprocessedCase` (format: docs/architecture.md, "Preprocessed
cohort"):

1. crop the scan to the bounding box of its lung mask plus ``crop_margin_mm``;
2. clip HU to ``hu_window`` and map it to [0, 1] (the paper's fixed (x + 1400) / 1600);
3. resample to ``target_spacing_mm`` (trilinear with anti-aliasing for the image, linear then
   > 0.5 for masks; ``null`` keeps the native spacing) and multiply the image by the lung
   mask grown by ``mask_margin_mm`` (a classical lung mask cuts off dense consolidation that
   touches the mediastinum or diaphragm; the margin keeps those lesions visible to the model);
4. the classification input: N equidistant slices (the paper's eq. 12) resized in-plane;
5. the non-overlapping patch grid and its per-patch lesion voxel counts.

The lung mask comes from :func:`deepsc.data.lungseg.segment_lungs` -- also for training, so
the model sees what ``deepsc diagnose`` sees on a new scan; the true lung mask, when the
cohort has one, only yields the Dice recorded in meta.json. :func:`to_original_grid` undoes
steps 1 and 3, so a prediction can be written overlaying the input scan.

:func:`preprocess_cohort` is incremental: each case directory carries a content hash of its
input files and settings, so only new or changed cases are recomputed; every case is written
into a temporary directory and renamed into place.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from deepsc import CLASSES
from deepsc.data.patches import extract_patch, patch_grid
from deepsc.data.volume import CTVolume, atomic_write_bytes, shareable_mode
from deepsc.errors import ConfigError, DeepSCError, InputError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Bumped whenever the preprocessing code changes its output: part of every content hash."""

INDEX_COLUMNS = ("case_id", "label", "label_index", "has_mask", "case_dir", "content_hash")


@dataclass(frozen=True)
class PreprocessSettings:
    """The ``preprocess`` section of params.yaml, checked.

    Attributes:
        hu_window: ``(low, high)`` HU, mapped linearly to [0, 1].
        target_spacing_mm: ``(sz, sy, sx)`` of the output grid, or None for native spacing.
        cls_slices: N, the slice count of the classification input.
        cls_size: ``(Hc, Wc)`` in-plane size of the classification input.
        patch_size: ``(pd, ph, pw)`` segmentation patch.
        crop_margin_mm: margin kept around the lung bounding box.
        mask_margin_mm: the image is multiplied by the lung mask grown by this distance (mm).
    """

    hu_window: tuple[float, float] = (-1400.0, 200.0)
    target_spacing_mm: tuple[float, float, float] | None = (5.0, 3.0, 3.0)
    cls_slices: int = 16
    cls_size: tuple[int, int] = (64, 64)
    patch_size: tuple[int, int, int] = (16, 64, 64)
    crop_margin_mm: float = 10.0
    mask_margin_mm: float = 15.0

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "PreprocessSettings":
        """From the whole params mapping (its ``preprocess`` section)."""
        from deepsc.config import section

        raw = section(params, "preprocess")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"unknown preprocess setting(s): {', '.join(unknown)}")
        try:
            values = {
                "hu_window": tuple(float(v) for v in raw.get("hu_window", cls.hu_window)),
                "target_spacing_mm": None
                if raw.get("target_spacing_mm", cls.target_spacing_mm) is None
                else tuple(float(v) for v in raw.get("target_spacing_mm", cls.target_spacing_mm)),
                "cls_slices": raw.get("cls_slices", cls.cls_slices),
                "cls_size": tuple(raw.get("cls_size", cls.cls_size)),
                "patch_size": tuple(raw.get("patch_size", cls.patch_size)),
                "crop_margin_mm": float(raw.get("crop_margin_mm", cls.crop_margin_mm)),
                "mask_margin_mm": float(raw.get("mask_margin_mm", cls.mask_margin_mm)),
            }
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"bad preprocess setting: {exc}") from None
        return cls(**values)  # type: ignore[arg-type]

    def __post_init__(self) -> None:
        low, high = self.hu_window if len(self.hu_window) == 2 else (0.0, 0.0)
        if len(self.hu_window) != 2 or not low < high:
            raise ConfigError(f"preprocess.hu_window must be [low, high] with low < high, got {list(self.hu_window)}")
        spacing = self.target_spacing_mm
        if spacing is not None and (len(spacing) != 3 or min(spacing) <= 0):
            raise ConfigError(f"preprocess.target_spacing_mm must be null or three positive mm values, got {spacing}")
        if not _positive_ints([self.cls_slices]):
            raise ConfigError(f"preprocess.cls_slices must be a positive integer, got {self.cls_slices}")
        if len(self.cls_size) != 2 or not _positive_ints(self.cls_size):
            raise ConfigError(f"preprocess.cls_size must be two positive integers, got {list(self.cls_size)}")
        if len(self.patch_size) != 3 or not _positive_ints(self.patch_size):
            raise ConfigError(f"preprocess.patch_size must be three positive integers, got {list(self.patch_size)}")
        if self.crop_margin_mm < 0:
            raise ConfigError(f"preprocess.crop_margin_mm must be >= 0, got {self.crop_margin_mm}")
        if self.mask_margin_mm < 0:
            raise ConfigError(f"preprocess.mask_margin_mm must be >= 0, got {self.mask_margin_mm}")


def _positive_ints(values: Sequence[Any]) -> bool:
    return all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in values)


@dataclass
class PreprocessedCase:
    """One preprocessed scan (arrays ``(Z, Y, X)`` on the output grid, see the module docstring).

    Attributes:
        image: float32 in [0, 1], zero outside the lung.
        lung: uint8 {0, 1}.
        lesion: uint8 {0, 1}, or None when the lesion mask is unknown.
        cls: float32 ``(N, Hc, Wc)`` classification input.
        meta: JSON-serialisable geometry, patch grid and statistics.
    """

    image: np.ndarray
    lung: np.ndarray
    lesion: np.ndarray | None
    cls: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def save(self, case_dir: Path) -> None:
        """Write ``image.npy`` (float16), ``lung.npy``, ``lesion.npy``, ``cls.npy``, ``meta.json``."""
        case_dir.mkdir(parents=True, exist_ok=True)
        np.save(case_dir / "image.npy", self.image.astype(np.float16))
        np.save(case_dir / "lung.npy", self.lung.astype(np.uint8))
        if self.lesion is not None:
            np.save(case_dir / "lesion.npy", self.lesion.astype(np.uint8))
        np.save(case_dir / "cls.npy", self.cls.astype(np.float16))
        (case_dir / "meta.json").write_text(json.dumps(self.meta, indent=1, sort_keys=True) + "\n")


def load_case(case_dir: str | os.PathLike, mmap: bool = True) -> PreprocessedCase:
    """Read a case directory written by :meth:`PreprocessedCase.save` (arrays as stored)."""
    case_dir = Path(case_dir)
    mode = "r" if mmap else None
    lesion_path = case_dir / "lesion.npy"
    return PreprocessedCase(
        image=np.load(case_dir / "image.npy", mmap_mode=mode),
        lung=np.load(case_dir / "lung.npy", mmap_mode=mode),
        lesion=np.load(lesion_path, mmap_mode=mode) if lesion_path.is_file() else None,
        cls=np.load(case_dir / "cls.npy", mmap_mode=mode),
        meta=json.loads((case_dir / "meta.json").read_text()),
    )


# ----------------------------------------------------------------------------- one case


def preprocess_case(
    volume: CTVolume,
    lesion: np.ndarray | None,
    lung: np.ndarray,
    params: Mapping[str, Any],
    true_lung: np.ndarray | None = None,
) -> PreprocessedCase:
    """Preprocess one scan.

    Args:
        volume: the scan in HU, canonical ``(Z, Y, X)``.
        lesion: lesion mask on the scan's grid, or None (unknown / inference).
        lung: lung mask on the scan's grid (from :func:`deepsc.data.lungseg.segment_lungs`).
        params: the settings (its ``preprocess`` section is used).
        true_lung: the true lung mask, only to record its Dice against ``lung`` in meta.

    Raises:
        InputError: a mask does not match the scan's shape, or the lung mask is empty.
    """
    settings = PreprocessSettings.from_params(params)
    case_id = volume.case_id
    for name, mask in (("lesion", lesion), ("lung", lung), ("true lung", true_lung)):
        if mask is not None and mask.shape != volume.shape:
            raise InputError(case_id, f"{name} mask shape {mask.shape} differs from the scan's {volume.shape}")
    lung = np.asarray(lung).astype(bool)
    if not lung.any():
        raise InputError(case_id, "the lung mask is empty: nothing to preprocess")

    crop = lung_crop(lung, volume.spacing, settings.crop_margin_mm)
    crop_shape = tuple(s.stop - s.start for s in crop)
    out_shape, out_spacing = output_grid(crop_shape, volume.spacing, settings.target_spacing_mm)

    lung_out = resize(lung[crop], out_shape, order=1) > 0.5
    envelope = grow_mask(lung[crop], volume.spacing, settings.mask_margin_mm)
    windowed = window_hu(volume.array[crop], settings.hu_window) * envelope
    image = resize(windowed, out_shape, order=1, anti_alias=True) * (resize(envelope, out_shape, order=1) > 0.5)
    lesion_out = None if lesion is None else resize(np.asarray(lesion)[crop] > 0, out_shape, order=1) > 0.5
    cls_input = classification_input(image, settings.cls_slices, settings.cls_size)

    meta = _geometry_meta(volume, crop, out_shape, out_spacing)
    meta.update(_patch_meta(lesion_out, out_shape, settings.patch_size))
    meta.update(
        {
            "case_id": case_id,
            "format_version": FORMAT_VERSION,
            "hu_window": list(settings.hu_window),
            "cls_slices": [int(i) for i in cls_slice_indices(out_shape[0], settings.cls_slices)],
            "cls_size": list(settings.cls_size),
            "lung_volume_ml": float(lung.sum()) * volume.voxel_volume_ml,
            "lung_dice": None if true_lung is None else _dice(lung, np.asarray(true_lung) > 0),
            "lesion_voxels": None if lesion is None else int(np.count_nonzero(lesion)),
            "lesion_voxels_outside_crop": None if lesion is None else int(np.count_nonzero(lesion) - np.count_nonzero(np.asarray(lesion)[crop])),
        }
    )
    _warn_about_lost_lesion(meta)
    return PreprocessedCase(
        image=image.astype(np.float32),
        lung=lung_out.astype(np.uint8),
        lesion=None if lesion_out is None else lesion_out.astype(np.uint8),
        cls=cls_input,
        meta=meta,
    )


def grow_mask(mask: np.ndarray, spacing: Sequence[float], margin_mm: float) -> np.ndarray:
    """``mask`` grown by ``margin_mm`` (Euclidean, real spacing); 0 mm returns it unchanged."""
    from scipy import ndimage

    mask = np.asarray(mask, dtype=bool)
    if margin_mm <= 0:
        return mask
    return ndimage.distance_transform_edt(~mask, sampling=spacing) <= margin_mm


def preprocess_volume_for_inference(volume: CTVolume, params: Mapping[str, Any]) -> PreprocessedCase:
    """Segment the lungs (``lungseg`` settings) and preprocess a new scan without a lesion mask."""
    from deepsc.config import section
    from deepsc.data.lungseg import segment_lungs_from_params

    lung = segment_lungs_from_params(volume, section(params, "lungseg"))
    return preprocess_case(volume, None, lung, params)


def window_hu(hu: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """HU clipped to ``window`` and mapped linearly to [0, 1] (float32)."""
    low, high = window
    return ((np.clip(hu, low, high) - low) / (high - low)).astype(np.float32)


def lung_crop(lung: np.ndarray, spacing: tuple[float, float, float], margin_mm: float) -> tuple[slice, slice, slice]:
    """Bounding box of the lung mask plus ``margin_mm`` on every side, clipped to the scan."""
    crop = []
    for axis, (n, s) in enumerate(zip(lung.shape, spacing)):
        present = np.flatnonzero(lung.any(axis=tuple(a for a in range(3) if a != axis)))
        pad = int(math.ceil(margin_mm / s))
        crop.append(slice(max(int(present[0]) - pad, 0), min(int(present[-1]) + 1 + pad, n)))
    return tuple(crop)  # type: ignore[return-value]


def output_grid(
    shape: Sequence[int], spacing: Sequence[float], target_mm: Sequence[float] | None
) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """Shape and actual spacing (mm) of the resampled grid covering the same extent."""
    if target_mm is None:
        return tuple(int(n) for n in shape), tuple(float(s) for s in spacing)  # type: ignore[return-value]
    out_shape = tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target_mm))
    out_spacing = tuple(n * s / o for n, s, o in zip(shape, spacing, out_shape))
    return out_shape, out_spacing  # type: ignore[return-value]


def resize(array: np.ndarray, shape: Sequence[int], order: int = 1, anti_alias: bool = False) -> np.ndarray:
    """Resample a ``(Z, Y, X)`` array so that both grids cover the same extent.

    Output voxel ``o`` along an axis samples input coordinate ``(o + 0.5) * n_in / n_out - 0.5``
    (voxel centres of two grids over the same box). ``order`` 0 keeps the dtype; 1 returns
    float32. ``anti_alias`` smooths with a Gaussian of sigma ``(n_in / n_out - 1) / 2`` voxels
    along axes that are shrunk.
    """
    shape = tuple(int(n) for n in shape)
    if tuple(array.shape) == shape:
        return array.astype(np.float32) if order > 0 else array.copy()
    scale = np.asarray(array.shape, dtype=np.float64) / np.asarray(shape, dtype=np.float64)
    data = array.astype(np.float32) if order > 0 else array
    if anti_alias and order > 0:
        sigma = np.maximum((scale - 1.0) / 2.0, 0.0)
        if sigma.any():
            data = ndimage.gaussian_filter(data, sigma, mode="nearest")
    return ndimage.affine_transform(data, scale, offset=0.5 * scale - 0.5, output_shape=shape, order=order, mode="nearest")


def cls_slice_indices(n_slices: int, n: int) -> np.ndarray:
    """Slice indices of the classification input: eq. 12 of the paper with a real-valued step.

    Eq. 12 takes N slices a constant step ``S / N`` apart. Slice ``k`` (0-based) is the one
    nearest the centre of the k-th of N equal blocks of the scan, ``floor((k + 0.5) * S / N)``,
    so classification cell ``k`` covers scan slices ``[k S/N, (k+1) S/N)``: exactly the linear
    map that :mod:`deepsc.model.coords` assumes between a patch's normalised box and the
    classification grid (an integer step ``floor(S / N)`` would leave up to N - 1 slices
    unsampled and shift every box). With fewer than N slices, slices repeat.
    """
    if n_slices < 1 or n < 1:
        raise ValueError(f"need at least one slice and one sample, got S={n_slices}, N={n}")
    return np.floor((np.arange(n) + 0.5) * n_slices / n).astype(np.int64)


def classification_input(image: np.ndarray, n: int, size: Sequence[int]) -> np.ndarray:
    """float32 ``(N, Hc, Wc)``: the eq. 12 slices of ``image`` resized in-plane (linear, anti-aliased)."""
    slices = image[cls_slice_indices(image.shape[0], n)]
    return resize(slices, (n, int(size[0]), int(size[1])), order=1, anti_alias=True)


def to_original_grid(array_zyx: np.ndarray, meta: Mapping[str, Any], order: int = 0) -> np.ndarray:
    """Map an array on the preprocessed grid back onto the original scan's ``(Z, Y, X)`` grid.

    Undoes the resampling (``order`` 0 nearest, keeps the dtype; 1 linear, float32) and the
    crop (zeros outside the crop box).

    Args:
        array_zyx: shape ``meta["shape"]``, e.g. a predicted lesion mask or probability map.
        meta: the case's meta.json.
    """
    shape = tuple(meta["shape"])
    if tuple(array_zyx.shape) != shape:
        raise ValueError(f"array shape {tuple(array_zyx.shape)} differs from the preprocessed grid {shape}")
    start, stop = meta["crop_start"], meta["crop_stop"]
    restored = resize(np.asarray(array_zyx), [b - a for a, b in zip(start, stop)], order=order)
    full = np.zeros(tuple(meta["original_shape"]), dtype=restored.dtype)
    full[tuple(slice(a, b) for a, b in zip(start, stop))] = restored
    return full


def _geometry_meta(volume: CTVolume, crop: tuple[slice, ...], out_shape: tuple[int, ...], out_spacing: tuple[float, ...]) -> dict[str, Any]:
    start = np.array([s.start for s in crop], dtype=np.float64)
    scale = np.array([s.stop - s.start for s in crop], dtype=np.float64) / np.asarray(out_shape, dtype=np.float64)
    # output voxel o (z, y, x) -> original voxel start + (o + 0.5) * scale - 0.5; affines act on (x, y, z)
    index_map = np.eye(4)
    index_map[:3, :3] = np.diag(scale[::-1])
    index_map[:3, 3] = (start + 0.5 * scale - 0.5)[::-1]
    return {
        "original_shape": list(volume.shape),
        "original_spacing_mm": list(volume.spacing),
        "original_affine": volume.affine.tolist(),
        "crop_start": [int(s.start) for s in crop],
        "crop_stop": [int(s.stop) for s in crop],
        "shape": [int(n) for n in out_shape],
        "spacing_mm": [float(s) for s in out_spacing],
        "affine": (volume.affine @ index_map).tolist(),
    }


def _patch_meta(lesion: np.ndarray | None, shape: tuple[int, ...], patch_size: tuple[int, int, int]) -> dict[str, Any]:
    starts = patch_grid(shape, patch_size)
    counts = None if lesion is None else [int(np.count_nonzero(extract_patch(lesion, s, patch_size))) for s in starts]
    return {"patch_size": list(patch_size), "patch_starts": [list(s) for s in starts], "patch_lesion_voxels": counts}


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else float(2.0 * np.logical_and(a, b).sum() / total)


def _warn_about_lost_lesion(meta: Mapping[str, Any]) -> None:
    total, lost = meta["lesion_voxels"], meta["lesion_voxels_outside_crop"]
    if total and lost / total > 0.05:
        logger.warning("%s: %.0f%% of the lesion mask lies outside the lung crop and is dropped", meta["case_id"], 100.0 * lost / total)


# ----------------------------------------------------------------------------- cohort


def preprocess_cohort(manifest: Path, out_dir: Path, params: Mapping[str, Any]) -> Path:
    """Preprocess every case of the manifest into ``out_dir``; return ``out_dir/index.csv``.

    Cases whose content hash (input file bytes + ``preprocess`` and ``lungseg`` settings + the
    format version) matches the existing output are skipped; cases no longer in the manifest
    are removed. Each case is written into a temporary directory and renamed into place; the
    index is written last, atomically.

    Raises:
        InputError: a case failed (names it); cases already done stay valid, the old index stays.
    """
    import pandas as pd
    from tqdm import tqdm

    from deepsc.config import section
    from deepsc.data.manifest import load_manifest

    settings = PreprocessSettings.from_params(params)  # fail on bad settings before any work
    lungseg_params = section(params, "lungseg")
    table = load_manifest(manifest)
    out_dir = Path(out_dir)
    cases_dir = out_dir / "cases"
    cases_dir.mkdir(parents=True, exist_ok=True)
    settings_key = _settings_key(settings, lungseg_params)

    rows, done, skipped, seconds = [], 0, 0, 0.0
    for case in tqdm(list(table.itertuples(index=False)), desc="preprocess", unit="case"):
        content_hash = _content_hash(case, settings_key)
        case_dir = cases_dir / case.case_id
        if _stored_hash(case_dir) == content_hash and (case_dir / "lesion.npy").exists() == _has_mask(case):
            skipped += 1  # (a relabelled case without a mask file keeps its hash but not its lesion map)
        else:
            start = time.perf_counter()
            _write_case(case, params, content_hash, cases_dir)
            seconds += time.perf_counter() - start
            done += 1
        rows.append(
            {
                "case_id": case.case_id,
                "label": case.label,
                "label_index": CLASSES.index(case.label),
                "has_mask": _has_mask(case),
                "case_dir": f"cases/{case.case_id}",
                "content_hash": content_hash,
            }
        )
    removed = _remove_stale(cases_dir, {row["case_id"] for row in rows})
    index_path = out_dir / "index.csv"
    atomic_write_bytes(index_path, pd.DataFrame(rows, columns=list(INDEX_COLUMNS)).to_csv(index=False).encode())
    per_case = f", {seconds / done:.2f} s per case" if done else ""
    logger.info("preprocess: %d case(s) written%s, %d unchanged, %d stale removed -> %s", done, per_case, skipped, removed, index_path)
    return index_path


def _has_mask(case: Any) -> bool:
    """A lesion mask is known when given, and for normal scans (no lesions by definition)."""
    return bool(str(case.mask_path or "")) or case.label == "normal"


REFUSAL_ONLY_LUNGSEG_KEYS = ("min_lung_volume_ml",)


def _settings_key(settings: PreprocessSettings, lungseg_params: Mapping[str, Any]) -> str:
    """Everything besides the input files that shapes a case's output, as canonical JSON."""
    from dataclasses import asdict

    from deepsc.data.lungseg import ALGORITHM_VERSION, ThresholdSettings

    payload = {
        "format": FORMAT_VERSION,
        "preprocess": asdict(settings),
        # a refusal threshold shapes no output: changing it must not redo the cases it accepts
        "lungseg": {k: v for k, v in lungseg_params.items() if k not in REFUSAL_ONLY_LUNGSEG_KEYS},
        "lungseg_algorithm": [ALGORITHM_VERSION, asdict(ThresholdSettings())],
    }
    weights = lungseg_params.get("lungmask_weights")
    if lungseg_params.get("backend") == "lungmask" and weights and Path(weights).is_file():
        # the same path may hold new weights: key the lung masks by the file's content
        payload["lungmask_weights_sha256"] = hashlib.sha256(Path(weights).read_bytes()).hexdigest()
    return json.dumps(payload, sort_keys=True, default=str)


def _content_hash(case: Any, settings_key: str) -> str:
    """sha256 of the settings and of the bytes of the case's image, lesion and lung files."""
    digest = hashlib.sha256(settings_key.encode())
    for role in ("image_path", "mask_path", "lung_path"):
        value = str(getattr(case, role) or "")
        digest.update(f"\0{role}\0".encode())
        if value:
            for path in _files_of(Path(value), case.case_id):
                digest.update(path.name.encode())
                with open(path, "rb") as handle:
                    for chunk in iter(lambda: handle.read(1 << 20), b""):
                        digest.update(chunk)
    return digest.hexdigest()


def _files_of(path: Path, case_id: str) -> list[Path]:
    """The file itself, or every file of a (DICOM) folder in name order; for one file of a DICOM
    series, every file of its folder (``read_ct`` reads the whole series from there)."""
    from deepsc.data.io import detect_format

    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    if not path.is_file():
        raise InputError(case_id, f"file not found: {path}")
    if detect_format(path, case_id) == "dicom":
        return _files_of(path.parent, case_id)
    return [path]


def _stored_hash(case_dir: Path) -> str | None:
    try:
        return json.loads((case_dir / "meta.json").read_text()).get("content_hash")
    except (OSError, ValueError):
        return None


def _write_case(case: Any, params: Mapping[str, Any], content_hash: str, cases_dir: Path) -> None:
    """Read, segment, preprocess and atomically (re)place one case directory."""
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".tmp-{case.case_id}-", dir=cases_dir))
    try:
        tmp_dir.chmod(shareable_mode(directory=True))  # it becomes the case folder
        result = _preprocess_manifest_case(case, params)
        result.meta["content_hash"] = content_hash
        result.save(tmp_dir)
        _replace_dir(tmp_dir, cases_dir / case.case_id)
    except DeepSCError:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    except Exception as exc:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise InputError(case.case_id, f"preprocessing failed: {type(exc).__name__}: {exc}") from exc


def _preprocess_manifest_case(case: Any, params: Mapping[str, Any]) -> PreprocessedCase:
    from deepsc.config import section
    from deepsc.data.io import read_ct, read_mask
    from deepsc.data.lungseg import segment_lungs_from_params

    volume = read_ct(case.image_path, case.case_id)
    lesion = None
    if str(case.mask_path or ""):
        lesion = read_mask(case.mask_path, volume, case.case_id)
    elif case.label == "normal":
        lesion = np.zeros(volume.shape, dtype=np.uint8)
    true_lung = read_mask(case.lung_path, volume, case.case_id, binarize=True) if str(case.lung_path or "") else None
    lung = segment_lungs_from_params(volume, section(params, "lungseg"))
    return preprocess_case(volume, lesion, lung, params, true_lung=true_lung)


def _replace_dir(new: Path, target: Path) -> None:
    """Put directory ``new`` at ``target``; an old ``target`` is moved aside first, then deleted."""
    old = None
    if target.exists():
        old = target.with_name(f".old-{target.name}-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove_stale(cases_dir: Path, keep: set[str]) -> int:
    """Delete case directories not in ``keep`` and leftovers of interrupted runs."""
    removed = 0
    for child in cases_dir.iterdir():
        if child.is_dir() and child.name not in keep:
            shutil.rmtree(child, ignore_errors=True)
            removed += 0 if child.name.startswith((".tmp-", ".old-")) else 1
    return removed


# ----------------------------------------------------------------------------- CLI


def add_cli(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", type=Path, default=None, help="cohort manifest (default: paths.manifest)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: <paths.outputs>/preprocessed)")


def run_cli(args: argparse.Namespace, params: dict[str, Any]) -> int:
    from deepsc.config import outputs_dir

    if not params:
        raise ConfigError("preprocess needs params.yaml (its preprocess and lungseg sections)")
    manifest = args.manifest or Path(params.get("paths", {}).get("manifest", "data/manifest.csv"))
    out = args.out or outputs_dir(params) / "preprocessed"
    index = preprocess_cohort(manifest, out, params)
    print(f"preprocessed cohort: {index}")
    return 0
