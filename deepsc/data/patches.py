"""Non-overlapping 3D patch grid over a ``(Z, Y, X)`` volume (the paper's X_seg patches).

The grid starts at voxel ``(0, 0, 0)`` and steps by the patch size, so every voxel lies in
exactly one patch. The last patch along an axis may reach beyond the volume; the part outside
is zero-padded by :func:`extract_patch` and dropped again by :func:`stitch_patches`. A volume
smaller than the patch along an axis gets a single, padded patch along that axis.
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
