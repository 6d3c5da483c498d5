"""Lung segmentation of a chest CT: an offline HU-threshold method, or lungmask with local weights.

The threshold backend (default, no weights, no network) works in mm so that the same settings
hold for 0.6 mm and 5 mm scans:

1. Heavy morphology runs on a working grid of about ``work_spacing_mm`` (block-mean of the HU,
   integer factors), and the result is interpolated back to the scan's grid.
2. Air is ``HU < air_hu``. The body is the largest 3D component of non-air, holes filled per
   slice; air outside it (room air, air around and inside the table) is dropped.
3. The trachea and main bronchi are tracked slice by slice from the top of the scan (a small,
   central tube of air darker than parenchyma) down to the hila, and removed with a wall of
   ``airway_wall_mm``: this also cuts the airway bridge between the lungs.
4. The lungs are the large air components that reach the upper half of the largest one (bowel
   gas does not). A component spanning both sides of the body's midline (lungs touching at a
   junction line) is split by erosion and re-grown into two lungs.
5. Each lung is filled: per-slice holes (vessels, dense lesions inside the lung), a 3D closing
   with a ball of ``closing_radius_mm`` (30 mm: consolidation biting into the lung from the
   mediastinum, the diaphragm or the chest wall, up to about that radius, while the heart,
   aorta and spine, broader than the ball, stay out; fat and bone are never added), and per
   slice the bays of its convex hull whose mouth faces the chest wall (consolidation touching
   the pleura) -- bays opening towards the other lung or the mediastinum (heart, hilum) and
   bays too deep or too large (liver dome) are not filled. The large closing also fills the
   hilar soft tissue, so the mask is about 2 % larger than an anatomical lung mask: it is made
   to keep lesions in the model's input, and lesions matter more than the hilum.

The lungmask backend (Hofmanninger et al. 2020, U-net R231) runs only when given a local
weights file; nothing is ever downloaded.

Whatever the backend, the total segmented volume must reach ``lungseg.min_lung_volume_ml``
(:data:`DEFAULT_MIN_LUNG_VOLUME_ML` when unset): a gas pocket in an abdominal or head scan is
large enough to pass step 4, but far smaller than an adult's lungs, so such a scan is refused
instead of being processed as a chest CT.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from deepsc.data.volume import CTVolume
from deepsc.errors import ConfigError, InputError

logger = logging.getLogger(__name__)

BACKENDS = ("threshold", "lungmask")

ALGORITHM_VERSION = 2
"""Bumped whenever the threshold backend's output changes (part of preprocessing's content hash)."""

DEFAULT_MIN_LUNG_VOLUME_ML = 400.0
"""Plausibility floor (mL) of the total segmented lung volume (``lungseg.min_lung_volume_ml``).

Adult lungs hold 2-7 L at CT; segmented here: the default and tiny synthetic cohorts and the
tests' synthetic scans 2.3-5.2 L, the real scan P002 4.1 L. 400 mL leaves a margin of more than
5x, while bowel or stomach gas (tens to a few hundred mL) stays below it. Infants' and young
children's lungs can be smaller: lower the setting for paediatric scans.
"""

_IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE[1] = ndimage.generate_binary_structure(2, 1)
"""4-connected structuring element within one slice (no coupling between slices)."""


@dataclass(frozen=True)
class ThresholdSettings:
    """Settings of the threshold backend; all lengths in mm, areas in mm^2, volumes in mL.

    The defaults work for chest CT from 0.5 to 5 mm voxels, so they are not in params.yaml;
    preprocessing hashes them (with :data:`ALGORITHM_VERSION`) into every case's content hash.
    """

    air_hu: float = -320.0
    work_spacing_mm: float = 2.0
    min_lung_ml: float = 20.0
    min_lung_fraction: float = 0.02
    airway_lumen_hu: float = -950.0
    airway_wall_mm: float = 3.0
    airway_search_mm: float = 40.0
    airway_max_area_mm2: float = 700.0
    airway_min_area_mm2: float = 30.0
    split_fraction: float = 0.15
    max_split_erosion_mm: float = 20.0
    closing_radius_mm: float = 30.0
    fat_hu: tuple[float, float] = (-200.0, -40.0)
    bone_hu: float = 300.0
    bay_max_depth_mm: float = 50.0
    bay_max_area_fraction: float = 1.0
    bay_inner_fraction: float = 0.3

    def __post_init__(self) -> None:
        if not -1000.0 < self.airway_lumen_hu < self.air_hu <= 0.0:
            raise ConfigError(f"need -1000 < airway_lumen_hu < air_hu <= 0 HU, got {self.airway_lumen_hu}, {self.air_hu}")
        if not self.air_hu < self.fat_hu[0] < self.fat_hu[1] < self.bone_hu:
            raise ConfigError(f"need air_hu < fat_hu[0] < fat_hu[1] < bone_hu, got {self.air_hu}, {self.fat_hu}, {self.bone_hu}")
        positive = {k: v for k, v in self.__dict__.items() if not k.endswith("_hu")}
        bad = [k for k, v in positive.items() if not v > 0]
        if bad:
            raise ConfigError(f"lung segmentation settings must be positive: {', '.join(bad)}")


def segment_lungs(
    volume: CTVolume,
    backend: str = "threshold",
    weights: Path | str | None = None,
    settings: ThresholdSettings | None = None,
    min_lung_volume_ml: float = DEFAULT_MIN_LUNG_VOLUME_ML,
) -> np.ndarray:
    """Binary lung mask of a CT scan.

    Args:
        volume: the scan in HU, canonical ``(Z, Y, X)`` LPS (see ``deepsc.data.volume``).
        backend: ``threshold`` (offline default) or ``lungmask`` (needs ``weights``).
        weights: local path of a lungmask R231 state dict (``.pth``), for ``lungmask`` only.
        settings: threshold-backend settings (defaults when None).
        min_lung_volume_ml: smallest plausible total lung volume in mL (0 turns the check off).

    Returns:
        uint8 ``(Z, Y, X)`` {0, 1} on the scan's grid: both lungs, without trachea and main
        bronchi, with vessels and lesions inside.

    Raises:
        InputError: no lung found, or lungs smaller than ``min_lung_volume_ml`` (names the case
            and the measured volume).
        ConfigError: unknown backend, the lungmask backend without package or weights file, or a
            negative ``min_lung_volume_ml``.
    """
    floor = _min_lung_volume(min_lung_volume_ml)
    if backend == "threshold":
        mask = threshold_lungs(volume.array, volume.spacing, settings or ThresholdSettings())
    elif backend == "lungmask":
        mask = _lungmask_lungs(volume, weights)
    else:
        raise ConfigError(f"unknown lung segmentation backend '{backend}' (known: {', '.join(BACKENDS)})")
    if not mask.any():
        raise InputError(volume.case_id, "no lung found (is this a chest CT in HU?)")
    _check_lung_volume(mask, volume, floor)
    return mask


def segment_lungs_from_params(volume: CTVolume, lungseg_params: Mapping[str, Any]) -> np.ndarray:
    """:func:`segment_lungs` with the ``lungseg`` section of params.yaml (``backend``,
    ``lungmask_weights``, ``min_lung_volume_ml``; defaults for absent keys)."""
    return segment_lungs(
        volume,
        lungseg_params.get("backend", "threshold"),
        lungseg_params.get("lungmask_weights"),
        min_lung_volume_ml=lungseg_params.get("min_lung_volume_ml", DEFAULT_MIN_LUNG_VOLUME_ML),
    )


def _min_lung_volume(value: Any) -> float:
    """``lungseg.min_lung_volume_ml`` checked: a finite number >= 0 (mL)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < float("inf"):
        raise ConfigError(f"lungseg.min_lung_volume_ml must be a number >= 0 (mL), got {value!r}")
    return float(value)


def _check_lung_volume(mask: np.ndarray, volume: CTVolume, floor_ml: float) -> None:
    """Refuse a lung mask whose total volume (mL) is below ``floor_ml``: gas, not lungs."""
    found_ml = float(np.count_nonzero(mask)) * volume.voxel_volume_ml
    if found_ml < floor_ml:
        raise InputError(
            volume.case_id,
            f"the segmented lungs hold only {found_ml:.0f} mL, below lungseg.min_lung_volume_ml = {floor_ml:g} mL: "
            "not a chest CT covering the lungs (abdominal gas, a partial scan?); lower the setting for paediatric scans",
        )


# ----------------------------------------------------------------------------- threshold backend


def threshold_lungs(hu: np.ndarray, spacing: tuple[float, float, float], settings: ThresholdSettings) -> np.ndarray:
    """The threshold backend on a raw ``(Z, Y, X)`` HU array with voxel size ``spacing`` (mm)."""
    factors = working_factors(spacing, settings.work_spacing_mm)
    small = block_mean(hu, factors)
    work_spacing = tuple(s * f for s, f in zip(spacing, factors))
    air = small < settings.air_hu
    body = body_mask(air)
    lumen = airway_mask((small < settings.airway_lumen_hu) & body, body, work_spacing, settings)
    airway = dilate_in_plane(lumen, settings.airway_wall_mm, work_spacing)
    candidates = air & body & ~airway
    midline = body_midline(body)
    sides = split_lungs(select_lungs(candidates, work_spacing, settings), midline, work_spacing, settings)
    fillable = body & ~airway & ~_fat_or_bone(small, settings)
    lungs = fill_lungs(sides, midline, work_spacing, settings, exclude=airway, fillable=fillable)
    return upsample_mask(lungs, factors, hu.shape)


def _fat_or_bone(hu: np.ndarray, settings: ThresholdSettings) -> np.ndarray:
    """Voxels that are never lung tissue, so the closing does not add them: fat (mediastinal,
    pericardial, extrapleural) and bone (ribs, spine)."""
    return ((hu >= settings.fat_hu[0]) & (hu <= settings.fat_hu[1])) | (hu > settings.bone_hu)


def working_factors(spacing: tuple[float, float, float], work_spacing_mm: float) -> tuple[int, int, int]:
    """Integer downsampling factor per axis that brings the voxel size near ``work_spacing_mm``."""
    return tuple(max(1, int(round(work_spacing_mm / s))) for s in spacing)  # type: ignore[return-value]


def block_mean(array: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    """Mean over ``factors`` blocks: float32 of shape ``ceil(shape / factors)`` (the last block
    along an axis averages the voxels it has)."""
    out = np.asarray(array, dtype=np.float32)
    for axis, factor in enumerate(factors):
        if factor > 1:
            starts = np.arange(0, out.shape[axis], factor)
            counts = np.minimum(factor, out.shape[axis] - starts).astype(np.float32)
            shape = [1, 1, 1]
            shape[axis] = -1
            out = np.add.reduceat(out, starts, axis=axis) / counts.reshape(shape)
    return out


def upsample_mask(mask: np.ndarray, factors: tuple[int, int, int], shape: tuple[int, ...]) -> np.ndarray:
    """Linear interpolation of a working-grid mask back to the scan grid, thresholded at 0.5.

    Working voxel ``i`` covers scan voxels ``[i * f, (i + 1) * f)`` (see :func:`block_mean`).
    Only the mask's bounding box (plus one voxel) is interpolated.
    """
    if factors == (1, 1, 1):
        return mask.astype(np.uint8)
    out = np.zeros(shape, dtype=np.uint8)
    if not mask.any():
        return out
    region = _bounding_slices(mask, pad=(1, 1, 1))
    up = mask[region].astype(np.float32)
    for axis, factor in enumerate(factors):  # separable: one axis at a time keeps memory low
        if factor > 1:
            zoom = [1.0, 1.0, 1.0]
            zoom[axis] = float(factor)
            up = ndimage.zoom(up, zoom, order=1, mode="nearest", grid_mode=True)
    target = tuple(slice(r.start * f, min(r.stop * f, n)) for r, f, n in zip(region, factors, shape))
    out[target] = up[tuple(slice(0, t.stop - t.start) for t in target)] > 0.5
    return out


def _largest_component(mask: np.ndarray, structure: np.ndarray | None = None) -> np.ndarray:
    labels, count = ndimage.label(mask, structure)
    if count == 0:
        return mask.copy()
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
    """Fill 2D holes slice by slice, each within its bounding box (bool, same shape)."""
    out = np.zeros(mask.shape, dtype=bool)
    for z in np.flatnonzero(mask.any(axis=(1, 2))):
        region = _bounding_slices(mask[z][None])[1:]
        out[z][region] = ndimage.binary_fill_holes(mask[z][region])
    return out


def body_mask(air: np.ndarray) -> np.ndarray:
    """The patient: largest 3D component of non-air, holes filled per slice (bool ``(Z, Y, X)``)."""
    return fill_holes_per_slice(_largest_component(~air))


def _bounding_slices(mask: np.ndarray, pad: tuple[int, ...] = (0, 0, 0)) -> tuple[slice, ...]:
    coords = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    return tuple(slice(max(int(c[0]) - p, 0), min(int(c[-1]) + 1 + p, n)) for c, p, n in zip(coords, pad, mask.shape))


# ----------------------------------------------------------------------------- airway


def airway_mask(candidates: np.ndarray, body: np.ndarray, spacing: tuple[float, float, float], settings: ThresholdSettings) -> np.ndarray:
    """Lumen of the trachea and main bronchi, tracked from the top of the scan (bool ``(Z, Y, X)``).

    ``candidates`` is the airway-lumen air (``HU < airway_lumen_hu``: darker than parenchyma,
    so the thin tracheal wall still separates the lumen from the lung apex after averaging).
    The seed is the largest small air component near the body's left-right centre within
    ``airway_search_mm`` of the top air slice. The tube is followed down (and up) through the
    2D components that overlap it; a component larger than ``airway_max_area_mm2`` is lung,
    so tracking stops there. Empty if no seed is found.
    """
    airway = np.zeros_like(candidates, dtype=bool)
    seed = _airway_seed(candidates, body, spacing, settings)
    if seed is None:
        logger.debug("no trachea found in the top %.0f mm of the scan", settings.airway_search_mm)
        return airway
    z_seed, seed_mask = seed
    airway[z_seed] = seed_mask
    max_pixels = settings.airway_max_area_mm2 / (spacing[1] * spacing[2])
    for step in (-1, 1):  # down towards the carina, and up to the top slice
        current, z = seed_mask, z_seed + step
        while 0 <= z < candidates.shape[0]:
            current = _overlapping_small_components(candidates[z], current, max_pixels)
            if not current.any():
                break
            airway[z] = current
            z += step
    return airway


def _airway_seed(candidates: np.ndarray, body: np.ndarray, spacing: tuple[float, float, float], settings: ThresholdSettings) -> tuple[int, np.ndarray] | None:
    occupied = np.flatnonzero(candidates.any(axis=(1, 2)))
    if occupied.size == 0:
        return None
    pixel_area = spacing[1] * spacing[2]
    top = int(occupied[-1])
    lowest = max(top - int(round(settings.airway_search_mm / spacing[0])), 0)
    for z in range(top, lowest - 1, -1):
        columns = np.flatnonzero(body[z].any(axis=0))
        if columns.size == 0:
            continue
        centre, half_width = (columns[0] + columns[-1]) / 2.0, (columns[-1] - columns[0]) / 2.0
        labels, count = ndimage.label(candidates[z])
        best, best_area = 0, 0.0
        for index, region in enumerate(ndimage.find_objects(labels), start=1):
            component = labels[region] == index
            area = component.sum() * pixel_area
            x_centre = region[1].start + np.nonzero(component)[1].mean()
            central = abs(x_centre - centre) < 0.25 * half_width
            if central and settings.airway_min_area_mm2 <= area <= settings.airway_max_area_mm2 and area > best_area:
                best, best_area = index, area
        if best:
            return z, labels == best
    return None


def _overlapping_small_components(slice_mask: np.ndarray, previous: np.ndarray, max_pixels: float) -> np.ndarray:
    """Components of ``slice_mask`` touching ``previous`` (dilated by one pixel) and not larger than ``max_pixels``."""
    labels, _ = ndimage.label(slice_mask)
    touched = np.unique(labels[ndimage.binary_dilation(previous) & slice_mask])
    touched = touched[touched > 0]
    if touched.size == 0:
        return np.zeros_like(slice_mask)
    sizes = np.bincount(labels.ravel())
    keep = touched[sizes[touched] <= max_pixels]
    return np.isin(labels, keep)


def dilate_in_plane(mask: np.ndarray, radius_mm: float, spacing: tuple[float, float, float]) -> np.ndarray:
    """Dilate each slice by a disk of ``radius_mm`` (no growth across slices)."""
    if not mask.any():
        return mask.copy()
    disk = _ball(radius_mm, (np.inf, spacing[1], spacing[2]))
    return ndimage.binary_dilation(mask, disk)


# ----------------------------------------------------------------------------- selection and split


def select_lungs(candidates: np.ndarray, spacing: tuple[float, float, float], settings: ThresholdSettings) -> np.ndarray:
    """Label image ``(Z, Y, X)`` int32 of the air components that are lung, 0 elsewhere.

    Lung components are at least ``min_lung_ml`` and ``min_lung_fraction`` of the largest, and
    reach above the middle of the largest one's slice range (bowel and stomach gas do not). A
    scan without lungs keeps its largest gas pocket here; :func:`segment_lungs` refuses it by
    its total volume (``lungseg.min_lung_volume_ml``).
    """
    labels, count = ndimage.label(candidates)
    if count == 0:
        return labels
    voxel_ml = float(np.prod(spacing)) / 1000.0
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    regions = ndimage.find_objects(labels)
    largest = int(np.argmax(sizes))
    z_region = regions[largest - 1][0]
    z_middle = (z_region.start + z_region.stop - 1) / 2.0
    minimum = max(settings.min_lung_ml / voxel_ml, settings.min_lung_fraction * sizes[largest])
    keep = [i for i in range(1, count + 1) if sizes[i] >= minimum and regions[i - 1][0].stop - 1 >= z_middle]
    lut = np.zeros(count + 1, dtype=np.int32)
    lut[keep] = np.arange(1, len(keep) + 1)
    return lut[labels]


def body_midline(body: np.ndarray) -> float:
    """Left-right centre (x voxel) of the body: the column mean of its voxels."""
    return float(np.nonzero(body.any(axis=(0, 1)))[0].mean()) if body.any() else (body.shape[2] - 1) / 2.0


def split_lungs(labels: np.ndarray, midline: float, spacing: tuple[float, float, float], settings: ThresholdSettings) -> np.ndarray:
    """uint8 ``(Z, Y, X)``: 1 = lung at lower x (patient right), 2 = at higher x (left), 0 = none.

    Each component goes to the side of ``midline`` (x voxel) holding most of it; a component
    with at least ``split_fraction`` of its voxels on each side (touching lungs) is split first.
    """
    sides = np.zeros(labels.shape, dtype=np.uint8)
    for index, region in enumerate(ndimage.find_objects(labels), start=1):
        if region is None:
            continue
        component = labels[region] == index
        x = np.nonzero(component)[2] + region[2].start
        right_fraction = float((x < midline).mean())
        if min(right_fraction, 1.0 - right_fraction) >= settings.split_fraction:
            parts = _split_touching(component, spacing, settings)
            if parts is not None:
                sides[region] = np.where(component, parts, sides[region])
                continue
        sides[region][component] = 1 if right_fraction >= 0.5 else 2
    return sides


def _split_touching(component: np.ndarray, spacing: tuple[float, float, float], settings: ThresholdSettings) -> np.ndarray | None:
    """Split one component into two lungs: erode in-plane until two large parts appear, then
    give every voxel to the nearer part. Returns 1/2 labels by x order, or None if inseparable."""
    eroded = component.copy()
    for _ in range(max(1, int(settings.max_split_erosion_mm / min(spacing[1:])))):
        eroded = ndimage.binary_erosion(eroded, _IN_PLANE)
        labels, count = ndimage.label(eroded)
        if count == 0:
            return None
        if count < 2:
            continue
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        first, second = np.argsort(sizes)[::-1][:2]
        if sizes[second] < 0.1 * sizes.sum():
            continue
        seeds = np.where(labels == first, 1, 0) + np.where(labels == second, 2, 0)
        nearest = ndimage.distance_transform_edt(seeds == 0, sampling=spacing, return_distances=False, return_indices=True)
        parts = seeds[tuple(nearest)]
        if np.nonzero(parts == 1)[2].mean() > np.nonzero(parts == 2)[2].mean():
            parts = np.where(parts > 0, 3 - parts, 0)
        return np.where(component, parts, 0).astype(np.uint8)
    return None


# ----------------------------------------------------------------------------- filling


def _ball(radius_mm: float, spacing: tuple[float, float, float]) -> np.ndarray:
    """Ellipsoidal structuring element: the voxels within ``radius_mm`` of the centre on a grid
    of ``spacing`` mm (an axis whose spacing exceeds the radius, or is inf, gets one voxel)."""
    radii = [int(radius_mm / s) for s in spacing]
    grids = np.ogrid[tuple(slice(-r, r + 1) for r in radii)]
    return sum((g * (s if r else 0.0) / radius_mm) ** 2 for g, s, r in zip(grids, spacing, radii)) <= 1.0


def close_lung(lung: np.ndarray, spacing: tuple[float, float, float], radius_mm: float, fillable: np.ndarray | None = None) -> np.ndarray:
    """Per-slice hole filling, a 3D closing with a ball of ``radius_mm``, hole filling again.

    The closing is exact in mm (two Euclidean distance transforms, so its cost does not grow
    with the radius): it adds the voxels that a ball of ``radius_mm`` rolling outside the lung
    cannot reach -- bites narrower than the ball, such as a consolidation against the
    mediastinum or the diaphragm. Only ``fillable`` voxels (bool, same shape; all when None)
    are added by the closing. Returns bool ``(Z, Y, X)``; an empty mask stays empty.
    """
    lung = fill_holes_per_slice(lung)
    if not lung.any():
        return lung
    pad = [int(np.ceil(radius_mm / s)) + 1 for s in spacing]
    region = _bounding_slices(lung)
    crop = np.pad(lung[region], [(p, p) for p in pad])
    grown = ndimage.distance_transform_edt(~crop, sampling=spacing) <= radius_mm
    closed = ndimage.distance_transform_edt(grown, sampling=spacing) > radius_mm
    closed = closed[tuple(slice(p, p + n) for p, n in zip(pad, lung[region].shape))]
    if fillable is not None:
        closed &= fillable[region]
    lung[region] |= closed
    return fill_holes_per_slice(lung)


def fill_lungs(
    sides: np.ndarray,
    midline: float,
    spacing: tuple[float, float, float],
    settings: ThresholdSettings,
    exclude: np.ndarray | None = None,
    fillable: np.ndarray | None = None,
) -> np.ndarray:
    """Union of both lungs with vessels, holes and dense lesions filled (bool).

    Each lung is closed on its own (:func:`close_lung`, adding only ``fillable`` voxels), so
    the mediastinum between the lungs is never bridged.

    Wall bays (see :func:`_wall_bays`) are grouped in 3D per lung and filled only where lung
    lies beneath the group's lowest slice: a consolidation is surrounded by lung, whereas the
    liver and spleen domes rise from below the lung base. ``exclude`` (the tracked airway and
    its wall) is removed last, also where the closing wraps the main bronchi at the hila.
    """
    lungs = [close_lung(sides == side, spacing, settings.closing_radius_mm, fillable) for side in (1, 2)]
    bays = [np.zeros_like(lung) for lung in lungs]
    either = lungs[0] | lungs[1]
    for z in np.flatnonzero(either.any(axis=(1, 2))):
        region = _bounding_slices(either[z][None], pad=(0, 2, 2))[1:]
        crops = [lung[z][region] for lung in lungs]
        for this, other in ((0, 1), (1, 0)):
            bays[this][z][region] = _wall_bays(crops[this], crops[other], midline - region[1].start, spacing[1:], settings)
    for lung, bay in zip(lungs, bays):
        lung |= _bays_with_lung_beneath(bay, lung)
    both = fill_holes_per_slice(lungs[0]) | fill_holes_per_slice(lungs[1])
    return both if exclude is None else both & ~exclude


def _bays_with_lung_beneath(bays: np.ndarray, lung: np.ndarray) -> np.ndarray:
    """The 3D groups of ``bays`` whose footprint on their lowest slice has lung under it (>= 50 %)."""
    labels, count = ndimage.label(bays)
    keep = np.zeros(count + 1, dtype=bool)
    for index, region in enumerate(ndimage.find_objects(labels), start=1):
        z0 = region[0].start
        if z0 == 0:
            continue
        footprint = labels[z0][region[1:]] == index
        keep[index] = lung[z0 - 1][region[1:]][footprint].mean() >= 0.5
    return keep[labels]


def _wall_bays(lung: np.ndarray, other: np.ndarray, midline: float, spacing_yx: tuple[float, float], settings: ThresholdSettings) -> np.ndarray:
    """Concavities of one lung slice that may be dense lesions: convex-hull bays facing the wall.

    A bay is a component of hull minus lung; its mouth is the part on the hull border. It is
    kept when its depth (distance to the hull border) is at most ``bay_max_depth_mm``, its area
    at most ``bay_max_area_fraction`` of the lung's, and its mouth faces neither the body
    midline (within 50 degrees) nor, for ``bay_inner_fraction`` of its pixels or more, the
    joint hull of both lungs outside this lung's hull (mediastinum, heart, hilum).
    """
    empty = np.zeros_like(lung)
    if not lung.any():
        return empty
    hull = convex_hull_2d(lung)
    bays, count = ndimage.label(hull & ~lung)
    if count == 0:
        return empty
    inner = convex_hull_2d(lung | other) & ~hull if other.any() else empty
    near_inner = ndimage.binary_dilation(inner, iterations=2) if inner.any() else inner
    depth = ndimage.distance_transform_edt(hull, sampling=spacing_yx)
    mouth = hull & ~ndimage.binary_erosion(hull)
    max_area = settings.bay_max_area_fraction * lung.sum()
    keep = np.zeros(count + 1, dtype=bool)
    for index, bay_region in enumerate(ndimage.find_objects(bays), start=1):
        bay = bays[bay_region] == index
        bay_mouth = mouth[bay_region] & bay
        if bay.sum() > max_area or depth[bay_region][bay].max() > settings.bay_max_depth_mm or not bay_mouth.any():
            continue
        if near_inner[bay_region][bay_mouth].mean() >= settings.bay_inner_fraction:
            continue
        keep[index] = not _faces_midline(bay, bay_mouth, bay_region[1].start, midline, spacing_yx)
    return keep[bays]


def convex_hull_2d(mask: np.ndarray) -> np.ndarray:
    """The filled convex hull of a 2D mask's pixels (squares), as a bool mask of its shape."""
    from scipy.spatial import ConvexHull, QhullError
    from skimage.draw import polygon

    ys, xs = np.nonzero(mask & ~ndimage.binary_erosion(mask))
    corners = np.array([(-0.5, -0.5), (-0.5, 0.5), (0.5, -0.5), (0.5, 0.5)])
    points = (np.stack([ys, xs], axis=1)[:, None, :] + corners[None]).reshape(-1, 2)
    hull = mask.copy()
    try:
        vertices = points[ConvexHull(points).vertices]
    except (QhullError, ValueError):  # fewer than three points, or all on one line
        return hull
    rows, cols = polygon(vertices[:, 0], vertices[:, 1], mask.shape)
    hull[rows, cols] = True
    return hull


def _faces_midline(bay: np.ndarray, mouth: np.ndarray, x_offset: int, midline: float, spacing_yx: tuple[float, float]) -> bool:
    """Whether the direction from the bay's centre to its mouth's centre points to the midline."""
    centre = np.array([c.mean() for c in np.nonzero(bay)]) * spacing_yx
    opening = np.array([c.mean() for c in np.nonzero(mouth)]) * spacing_yx - centre
    length = float(np.hypot(*opening))
    if length == 0.0:
        return False
    towards_midline = np.sign(midline - (x_offset + centre[1] / spacing_yx[1]))
    return bool(opening[1] * towards_midline / length > np.cos(np.deg2rad(50.0)))


# ----------------------------------------------------------------------------- lungmask backend


def _lungmask_lungs(volume: CTVolume, weights: Path | str | None) -> np.ndarray:
    """lungmask U-net R231 from a local weights file (left/right labels merged to 1)."""
    if weights is None:
        raise ConfigError(
            "the lungmask backend needs a local R231 weights file: set lungseg.lungmask_weights "
            "(nothing is downloaded), or use lungseg.backend: threshold"
        )
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ConfigError(f"lungmask weights file not found: {path} (set lungseg.lungmask_weights to a local .pth file)")
    try:
        from lungmask import LMInferer
    except ImportError:
        raise ConfigError("the lungmask backend needs the lungmask package: pip install lungmask (or use backend: threshold)") from None
    inferer = LMInferer(modelpath=str(path), tqdm_disable=True)
    # Our canonical (Z, Y, X) LPS array is what lungmask expects of a numpy input.
    labels = inferer.apply(np.asarray(volume.array, dtype=np.float32))
    return (np.asarray(labels) > 0).astype(np.uint8)


# ----------------------------------------------------------------------------- measurement and CLI


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two binary masks; 1.0 when both are empty."""
    a, b = a.astype(bool), b.astype(bool)
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2.0 * np.logical_and(a, b).sum() / total)


def lesion_outside(lung: np.ndarray, lesion: np.ndarray) -> float:
    """Fraction of the ``lesion`` voxels that lie outside ``lung`` (same shape, any dtype).

    Those voxels are zeroed in the model input by preprocessing, so the model cannot segment
    them. NaN when the lesion mask is empty (normal scans).
    """
    lesion = np.asarray(lesion).astype(bool)
    total = int(lesion.sum())
    if total == 0:
        return float("nan")
    return float(np.logical_and(lesion, ~np.asarray(lung).astype(bool)).sum() / total)


COHORT_COLUMNS = ("case_id", "label", "dice", "lesion_outside", "volume_ml", "true_volume_ml", "seconds")


def cohort_lung_dice(manifest: Path, lungseg_params: Mapping[str, Any]) -> "Any":
    """Score :func:`segment_lungs` on the cases with a true lung mask (``lung_path``).

    Returns a pandas DataFrame with :data:`COHORT_COLUMNS`: Dice against the true lungs,
    :func:`lesion_outside` against the case's lesion mask (``mask_path``; NaN without one or
    when it is empty), both volumes in mL and the segmentation time in seconds.
    """
    import time

    import pandas as pd
    from tqdm import tqdm

    from deepsc.data.io import read_ct, read_mask
    from deepsc.data.manifest import load_manifest

    table = load_manifest(manifest)
    rows = []
    with_lung = table[table["lung_path"].fillna("").astype(str) != ""]
    for case in tqdm(list(with_lung.itertuples()), desc="lung Dice", unit="case"):
        volume = read_ct(case.image_path, case.case_id)
        truth = read_mask(case.lung_path, volume, case.case_id, binarize=True)
        start = time.perf_counter()
        mask = segment_lungs_from_params(volume, lungseg_params)
        seconds = time.perf_counter() - start
        mask_path = str(case.mask_path) if isinstance(case.mask_path, str) else ""
        lesion = read_mask(mask_path, volume, case.case_id, binarize=True) if mask_path else None
        rows.append(
            {
                "case_id": case.case_id,
                "label": case.label,
                "dice": dice(mask, truth),
                "lesion_outside": float("nan") if lesion is None else lesion_outside(mask, lesion),
                "volume_ml": float(mask.sum()) * volume.voxel_volume_ml,
                "true_volume_ml": float(truth.sum()) * volume.voxel_volume_ml,
                "seconds": seconds,
            }
        )
    return pd.DataFrame(rows, columns=list(COHORT_COLUMNS))


def cohort_summary(table: "Any") -> "Any":
    """Per-label summary of :func:`cohort_lung_dice`: Dice mean/min, lesion fraction outside
    the lung mean/max (over the cases with a lesion), seconds mean; plus an ``all`` row."""
    import pandas as pd

    def summarise(group: "Any") -> dict[str, float]:
        lesion = group["lesion_outside"].dropna()
        return {
            "cases": len(group),
            "dice_mean": group["dice"].mean(),
            "dice_min": group["dice"].min(),
            "lesion_outside_mean": lesion.mean() if len(lesion) else float("nan"),
            "lesion_outside_max": lesion.max() if len(lesion) else float("nan"),
            "seconds_mean": group["seconds"].mean(),
        }

    rows = {str(label): summarise(group) for label, group in table.groupby("label", sort=True)}
    rows["all"] = summarise(table)
    return pd.DataFrame.from_dict(rows, orient="index")


def add_cli(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("scan", nargs="?", type=Path, help="a scan (NIfTI file or DICOM folder) to segment")
    parser.add_argument("--out", type=Path, help="where to write the lung mask (.nii.gz), overlaying the scan")
    parser.add_argument("--manifest", type=Path, help="report Dice against each case's lung_path and the lesion fraction outside the mask instead")


def run_cli(args: argparse.Namespace, params: dict[str, Any]) -> int:
    from deepsc.config import section

    lungseg_params = section(params, "lungseg") if params else {"backend": "threshold"}
    if args.manifest is not None:
        if args.scan is not None:
            raise ConfigError("give either a SCAN or --manifest, not both")
        table = cohort_lung_dice(args.manifest, lungseg_params)
        if table.empty:
            raise InputError(str(args.manifest), "no case has a true lung mask (lung_path)")
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        print(cohort_summary(table).to_string(float_format=lambda v: f"{v:.4f}"))
        return 0
    if args.scan is None or args.out is None:
        raise ConfigError("usage: deepsc lungseg SCAN --out MASK.nii.gz  (or --manifest MANIFEST.csv)")
    if not args.out.name.lower().endswith((".nii", ".nii.gz")):
        raise ConfigError(f"--out must be a NIfTI file name (.nii or .nii.gz), got {args.out.name}")
    from deepsc.data.io import read_ct, write_mask

    volume = read_ct(args.scan)
    mask = segment_lungs_from_params(volume, lungseg_params)
    write_mask(mask, volume, args.out)
    print(f"{volume.case_id}: lungs {mask.sum() * volume.voxel_volume_ml / 1000.0:.2f} L -> {args.out}")
    return 0
