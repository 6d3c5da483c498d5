"""The one mapping between a patch and its scan, used wherever the two meet.

A training sample is one scan: the classification input ``cls`` (a uniform resampling of the
whole preprocessed scan) and one patch of the same scan with its box
``(z0, y0, x0, z1, y1, x1)`` divided by the scan shape ``(Z, Y, X)``
(:func:`deepsc.data.patches.normalized_box`). Boxes of zero-padded edge patches exceed 1.

Coordinate convention (voxels are cells, as in ``align_corners=False``): normalised coordinate
``u`` in ``[0, 1]`` spans the scan from the first voxel's leading edge to the last voxel's
trailing edge, so voxel ``j`` of any grid of size ``G`` that covers the scan spans
``[j / G, (j + 1) / G)`` and has its centre at ``(j + 0.5) / G``. The same holds inside a
box for the patch's own grid. Every scan grid (``cls`` input, its feature maps, the encoder
maps) is treated as sharing one normalised frame, and a box maps onto any of them by a scale.
(Strictly, after L stride-2 convolutions a feature cell's centre lies (2^L - 1) / 2 input
voxels, just under half its own cell, before this frame's: docs/architecture.md, known
limitations.)

Both operations are separable linear maps (one small matrix per axis and sample), hence exact,
differentiable with respect to the features, and free of half-voxel ambiguity:

* :func:`paste_into_grid` (patch -> scan, the seg -> cls direction) averages the zero-extended
  patch over each scan cell (area weighting), so it is exact for down-sampling, works for
  boxes narrower than one cell, and the pastes of a non-overlapping patch grid add up to the
  area-resampled stitched volume. The coverage is the fraction of each cell inside the box.
* :func:`crop_from_grid` (scan -> patch, the cls -> seg direction) samples the scan features by
  trilinear interpolation at the centres of the output cells (``grid_sample`` with
  ``align_corners=False`` and border padding inside the scan); samples beyond the scan (the
  zero-padded part of an edge patch) read 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Shape3 = tuple[int, int, int]


def _shape3(shape: Sequence[int], name: str) -> Shape3:
    values = tuple(int(s) for s in shape)
    if len(values) != 3 or any(v < 1 for v in values):
        raise ValueError(f"{name} must be three positive integers (D, H, W), got {tuple(shape)}")
    return values  # type: ignore[return-value]


def _check_box(box: torch.Tensor, batch: int | None = None) -> None:
    if box.ndim != 2 or box.shape[1] != 6:
        raise ValueError(f"box must be (B, 6) = (z0, y0, x0, z1, y1, x1), got shape {tuple(box.shape)}")
    if batch is not None and box.shape[0] != batch:
        raise ValueError(f"box has {box.shape[0]} rows but the features have batch size {batch}")
    if not bool((box[:, 3:] > box[:, :3]).all()):
        raise ValueError("box must have z1 > z0, y1 > y0 and x1 > x0 for every sample")


def _geometry_dtype(feat: torch.Tensor) -> torch.dtype:
    """Weights are built in at least float32 (a bf16 box would misplace it by ~0.1 voxel)."""
    return torch.promote_types(feat.dtype, torch.float32)


def box_to_grid(box: torch.Tensor, grid_shape: Sequence[int]) -> torch.Tensor:
    """Normalised boxes -> fractional voxel boxes on a grid that covers the scan.

    Args:
        box: ``(B, 6)`` normalised ``(z0, y0, x0, z1, y1, x1)``.
        grid_shape: ``(D, H, W)`` of the grid.

    Returns:
        ``(B, 6)`` in voxel-edge units of that grid: voxel ``j`` spans ``[j, j + 1)``, so a box
        ``(0, 0, 0, 1, 1, 1)`` becomes ``(0, 0, 0, D, H, W)``.
    """
    _check_box(box)
    grid = _shape3(grid_shape, "grid_shape")
    scale = torch.tensor(grid + grid, dtype=box.dtype, device=box.device)
    return box * scale


def _area_weights(lo: torch.Tensor, hi: torch.Tensor, n_patch: int, n_grid: int) -> torch.Tensor:
    """``(B, n_grid, n_patch)``: fraction of grid cell j covered by patch cell k along one axis.

    ``lo``/``hi`` are the box edges in grid voxel units, shape ``(B,)``.
    """
    steps = torch.arange(n_patch + 1, dtype=lo.dtype, device=lo.device)
    edges = lo[:, None] + (hi - lo)[:, None] * steps / n_patch  # (B, n_patch + 1)
    start, stop = edges[:, None, :-1], edges[:, None, 1:]  # (B, 1, n_patch)
    cell = torch.arange(n_grid, dtype=lo.dtype, device=lo.device)[None, :, None]  # (1, n_grid, 1)
    return (torch.minimum(cell + 1, stop) - torch.maximum(cell, start)).clamp_min(0)


def _interp_weights(lo: torch.Tensor, hi: torch.Tensor, n_out: int, n_grid: int) -> torch.Tensor:
    """``(B, n_out, n_grid)``: linear interpolation of grid values at the output cell centres.

    Centres inside the scan (``[0, n_grid]`` in grid units) interpolate between the two nearest
    grid centres, clamped at the border; centres outside read 0.
    """
    centres = (torch.arange(n_out, dtype=lo.dtype, device=lo.device) + 0.5) / n_out
    pos = lo[:, None] + (hi - lo)[:, None] * centres  # (B, n_out) grid units
    inside = (pos >= 0) & (pos <= n_grid)
    p = (pos - 0.5).clamp(0, n_grid - 1)  # continuous index of grid centres
    left = p.floor().clamp(max=n_grid - 1)
    frac = p - left
    right = (left + 1).clamp(max=n_grid - 1)
    idx = torch.arange(n_grid, dtype=lo.dtype, device=lo.device)[None, None, :]
    weights = (1 - frac)[..., None] * (idx == left[..., None]) + frac[..., None] * (idx == right[..., None])
    return weights * inside[..., None]


def _apply_separable(
    feat: torch.Tensor, wz: torch.Tensor, wy: torch.Tensor, wx: torch.Tensor
) -> torch.Tensor:
    """Apply per-sample axis matrices ``(B, out, in)`` to ``(B, C, D, H, W)``, one axis at a time.

    One axis at a time keeps the intermediates no larger than the bigger of input and output.
    """
    feat = torch.einsum("bcdhw,bxw->bcdhx", feat, wx.to(feat.dtype))
    feat = torch.einsum("bcdhx,byh->bcdyx", feat, wy.to(feat.dtype))
    return torch.einsum("bcdyx,bzd->bczyx", feat, wz.to(feat.dtype))


def paste_into_grid(
    patch_feat: torch.Tensor, box: torch.Tensor, grid_shape: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Place patch features at their box on a scan grid (seg -> cls), zeros elsewhere.

    Each scan cell receives the area average of the zero-extended patch over that cell, so a
    cell half inside the box gets half the patch mean there; parts of the box beyond the scan
    (zero-padded edge patches) are clipped.

    Args:
        patch_feat: ``(B, C, d, h, w)`` features on the patch's own grid.
        box: ``(B, 6)`` normalised box of each patch (rows may differ).
        grid_shape: ``(D, H, W)`` of the scan grid.

    Returns:
        ``(pasted, coverage)``: ``(B, C, D, H, W)`` features and ``(B, 1, D, H, W)`` fraction of
        each cell covered by the box (1 inside, 0 outside, fractional on its edges).
    """
    if patch_feat.ndim != 5:
        raise ValueError(f"patch_feat must be (B, C, d, h, w), got shape {tuple(patch_feat.shape)}")
    _check_box(box, patch_feat.shape[0])
    grid = _shape3(grid_shape, "grid_shape")
    edges = box_to_grid(box.to(_geometry_dtype(patch_feat)), grid)
    wz, wy, wx = (
        _area_weights(edges[:, a], edges[:, a + 3], patch_feat.shape[2 + a], grid[a]) for a in range(3)
    )
    pasted = _apply_separable(patch_feat, wz, wy, wx)
    coverage = torch.einsum("bz,by,bx->bzyx", wz.sum(-1), wy.sum(-1), wx.sum(-1)).unsqueeze(1).to(patch_feat.dtype)
    return pasted, coverage


def crop_from_grid(scan_feat: torch.Tensor, box: torch.Tensor, out_shape: Sequence[int]) -> torch.Tensor:
    """Crop each sample's box from scan features and resize it to a patch grid (cls -> seg).

    Trilinear interpolation at the output cell centres (``grid_sample`` semantics with
    ``align_corners=False``, border-clamped inside the scan); the part of the box beyond the
    scan reads 0, like the zero padding of an edge patch. Differentiable w.r.t. ``scan_feat``.

    Args:
        scan_feat: ``(B, C, D, H, W)`` features on a grid covering the whole scan.
        box: ``(B, 6)`` normalised box of each patch.
        out_shape: ``(d, h, w)`` of the output (patch-aligned) grid.

    Returns:
        ``(B, C, d, h, w)``.
    """
    if scan_feat.ndim != 5:
        raise ValueError(f"scan_feat must be (B, C, D, H, W), got shape {tuple(scan_feat.shape)}")
    _check_box(box, scan_feat.shape[0])
    out = _shape3(out_shape, "out_shape")
    grid = scan_feat.shape[2:]
    edges = box_to_grid(box.to(_geometry_dtype(scan_feat)), grid)
    wz, wy, wx = (_interp_weights(edges[:, a], edges[:, a + 3], out[a], grid[a]) for a in range(3))
    return _apply_separable(scan_feat, wz, wy, wx)


def resize_to_scan(scan_feat: torch.Tensor, out_shape: Sequence[int]) -> torch.Tensor:
    """Resample whole-scan features ``(B, C, D, H, W)`` to another whole-scan grid ``out_shape``.

    Same interpolation as :func:`crop_from_grid` with the full box ``(0, 0, 0, 1, 1, 1)``.
    """
    full = torch.tensor([[0.0, 0.0, 0.0, 1.0, 1.0, 1.0]], dtype=scan_feat.dtype, device=scan_feat.device)
    return crop_from_grid(scan_feat, full.expand(scan_feat.shape[0], 6), out_shape)
