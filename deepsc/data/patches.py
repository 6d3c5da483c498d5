"""3D patch grids over a ``(Z, Y, X)`` volume (the paper's X_seg patches).

:func:`patch_grid` starts at voxel ``(0, 0, 0)`` and steps by the patch size, so every voxel
lies in exactly one patch. The last patch along an axis may reach beyond the volume; the part
outside is zero-padded by :func:`extract_patch` and dropped again by :func:`stitch_patches`. A
volume smaller than the patch along an axis gets a single, padded patch along that axis.

:func:`sliding_grid` adds overlapping patches to that grid (sliding-window inference): their
predictions are combined by :func:`blend_patches` with the centre-weighted
:func:`gaussian_importance` map, as nnU-Net does, so each voxel's value comes mostly from the
patches that see it with context on all sides rather than at a zero-padded patch border.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Triple = tuple[int, int, int]


def _as_triple(values: Sequence[int], name: str) -> Triple:
    triple = tuple(int(v) for v in values)
    if len(triple) != 3 or any(v < 1 for v in triple) or any(int(v) != v for v in values):
        raise ValueError(f"{name} must be three positive integers (Z, Y, X), got {tuple(values)}")
    return triple  # type: ignore[return-value]


def patch_grid(shape: Sequence[int], patch_size: Sequence[int]) -> list[Triple]:
    """Start voxels ``(z, y, x)`` of the non-overlapping patches that cover a volume.

    Args:
        shape: volume shape ``(Z, Y, X)``.
        patch_size: patch shape ``(pd, ph, pw)``.

    Returns:
        ``ceil(Z/pd) * ceil(Y/ph) * ceil(X/pw)`` starts in C order (z slowest).
    """
    shape3 = _as_triple(shape, "shape")
    size3 = _as_triple(patch_size, "patch_size")
    counts = [math.ceil(n / p) for n, p in zip(shape3, size3)]
    return [
        (iz * size3[0], iy * size3[1], ix * size3[2])
        for iz in range(counts[0])
        for iy in range(counts[1])
        for ix in range(counts[2])
    ]


def sliding_grid(shape: Sequence[int], patch_size: Sequence[int], overlap: float) -> list[Triple]:
    """Start voxels of overlapping patches: :func:`patch_grid` plus a start every
    ``round(p * (1 - overlap))`` voxels along each axis, up to the last that fits in the volume.

    ``overlap`` 0 gives :func:`patch_grid` exactly; 0.5 steps by half a patch. The non-overlapping
    grid is always a subset, so a consumer can still tile the scan with part of the patches.

    Returns:
        starts ``(z, y, x)`` in C order (z slowest), no duplicates.
    """
    shape3 = _as_triple(shape, "shape")
    size3 = _as_triple(patch_size, "patch_size")
    if isinstance(overlap, bool) or not isinstance(overlap, (int, float)) or not 0.0 <= float(overlap) < 1.0:
        raise ValueError(f"overlap must be a fraction in [0, 1), got {overlap!r}")
    axes = []
    for n, p in zip(shape3, size3):
        tiles = range(0, n, p)
        steps = range(0, max(n - p, 0) + 1, max(1, round(p * (1.0 - float(overlap)))))
        axes.append(sorted(set(tiles) | set(steps)))
    return [(z, y, x) for z in axes[0] for y in axes[1] for x in axes[2]]


def gaussian_importance(patch_size: Sequence[int], sigma_scale: float = 0.125) -> np.ndarray:
    """Centre-weighted float32 ``(pd, ph, pw)`` map: a Gaussian with sigma ``sigma_scale`` times
    the patch size per axis, 1 at the centre, clipped below at 1e-3 so that a voxel every patch
    sees only at its border still gets a (weak) value."""
    size3 = _as_triple(patch_size, "patch_size")
    if not 0.0 < sigma_scale:
        raise ValueError(f"sigma_scale must be positive, got {sigma_scale!r}")
    axes = [np.exp(-0.5 * ((np.arange(p) - (p - 1) / 2) / (sigma_scale * p)) ** 2) for p in size3]
    weight = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    return np.maximum(weight / weight.max(), 1e-3).astype(np.float32)


def blend_patches(patches: Sequence[np.ndarray], starts: Sequence[Sequence[int]], shape: Sequence[int],
                  weight: np.ndarray) -> np.ndarray:
    """Weighted mean of overlapping patches, float32 ``(Z, Y, X)``; padding is dropped.

    Each voxel gets ``sum(w * patch) / sum(w)`` over the patches that hold it (``weight``, e.g.
    :func:`gaussian_importance`, has the patch shape); voxels no patch holds are 0. Sums are
    float32 (a few terms per voxel): two volumes of the scan's size besides the patches.
    """
    if len(patches) != len(starts):
        raise ValueError(f"{len(patches)} patches but {len(starts)} starts")
    shape3 = _as_triple(shape, "shape")
    total = np.zeros(shape3, dtype=np.float32)
    coverage = np.zeros(shape3, dtype=np.float32)
    for patch, start in zip(patches, starts):
        if patch.shape != weight.shape:
            raise ValueError(f"patch of shape {patch.shape} and weight of shape {weight.shape} differ")
        vol_slices, patch_slices = _overlap(tuple(int(s) for s in start), patch.shape, shape3)  # type: ignore[arg-type]
        total[vol_slices] += patch[patch_slices] * weight[patch_slices]
        coverage[vol_slices] += weight[patch_slices]
    return np.divide(total, coverage, out=np.zeros_like(total), where=coverage > 0)


def _overlap(start: Triple, size: Triple, shape: Sequence[int]) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """Slices into the volume and into the patch for the voxels they share."""
    vol_slices, patch_slices = [], []
    for s, p, n in zip(start, size, shape):
        lo, hi = max(s, 0), min(s + p, n)
        if hi <= lo:
            raise ValueError(f"patch at {start} of size {size} lies outside the volume of shape {tuple(shape)}")
        vol_slices.append(slice(lo, hi))
        patch_slices.append(slice(lo - s, hi - s))
    return tuple(vol_slices), tuple(patch_slices)


def extract_patch(volume: np.ndarray, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """The ``size`` block of ``volume`` at ``start``, zero-padded where it leaves the volume.

    Args:
        volume: ``(Z, Y, X)`` array of any dtype.
        start: first voxel ``(z, y, x)``; may be negative (the part before 0 is padding).
        size: patch shape ``(pd, ph, pw)``.

    Returns:
        a new array of shape ``size`` and the dtype of ``volume``.
    """
    if volume.ndim != 3:
        raise ValueError(f"volume must be (Z, Y, X), got shape {volume.shape}")
    size3 = _as_triple(size, "size")
    start3 = tuple(int(s) for s in start)
    vol_slices, patch_slices = _overlap(start3, size3, volume.shape)  # type: ignore[arg-type]
    patch = np.zeros(size3, dtype=volume.dtype)
    patch[patch_slices] = volume[vol_slices]
    return patch


def stitch_patches(patches: Sequence[np.ndarray], starts: Sequence[Sequence[int]], shape: Sequence[int]) -> np.ndarray:
    """Write patches back into a volume of ``shape``, dropping their padding.

    Voxels covered by no patch are 0; where patches overlap, the later one wins (the grid of
    :func:`patch_grid` has no overlap).

    Args:
        patches: arrays ``(pd, ph, pw)``, one per start, all of one dtype.
        starts: start voxel of each patch, as returned by :func:`patch_grid`.
        shape: ``(Z, Y, X)`` of the output.
    """
    if len(patches) != len(starts):
        raise ValueError(f"{len(patches)} patches but {len(starts)} starts")
    shape3 = _as_triple(shape, "shape")
    dtype = np.result_type(*patches) if patches else np.float32
    out = np.zeros(shape3, dtype=dtype)
    for patch, start in zip(patches, starts):
        if patch.ndim != 3:
            raise ValueError(f"each patch must be (pd, ph, pw), got shape {patch.shape}")
        vol_slices, patch_slices = _overlap(tuple(int(s) for s in start), patch.shape, shape3)  # type: ignore[arg-type]
        out[vol_slices] = patch[patch_slices]
    return out


def normalized_box(start: Sequence[int], size: Sequence[int], shape: Sequence[int]) -> tuple[float, float, float, float, float, float]:
    """The patch's box ``(z0, y0, x0, z1, y1, x1)`` divided by the volume extent ``(Z, Y, X)``.

    ``z1 = (z + pd) / Z`` etc., so a zero-padded edge patch has coordinates above 1.
    """
    start3 = tuple(int(s) for s in start)
    size3 = _as_triple(size, "size")
    shape3 = _as_triple(shape, "shape")
    lo = [s / n for s, n in zip(start3, shape3)]
    hi = [(s + p) / n for s, p, n in zip(start3, size3, shape3)]
    return (lo[0], lo[1], lo[2], hi[0], hi[1], hi[2])
