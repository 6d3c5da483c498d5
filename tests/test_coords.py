"""deepsc.model.coords: the one patch <-> scan mapping, checked against known numbers."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from deepsc.data.patches import extract_patch, normalized_box, patch_grid  # noqa: E402
from deepsc.model.coords import box_to_grid, crop_from_grid, paste_into_grid, resize_to_scan  # noqa: E402


def ramp_x(shape, start=0.0):
    """(1, 1, D, H, W) whose value is the x index (+ start)."""
    d, h, w = shape
    return (torch.arange(w, dtype=torch.float64) + start).view(1, 1, 1, 1, w).expand(1, 1, d, h, w).contiguous()


def test_box_to_grid_scales_by_grid_shape():
    box = torch.tensor([[0.0, 0.25, 0.5, 0.5, 0.75, 1.25]])
    assert box_to_grid(box, (4, 8, 16)).tolist() == [[0.0, 2.0, 8.0, 2.0, 6.0, 20.0]]


def test_box_validation():
    with pytest.raises(ValueError, match=r"\(B, 6\)"):
        box_to_grid(torch.zeros(1, 4), (2, 2, 2))
    with pytest.raises(ValueError, match="z1 > z0"):
        box_to_grid(torch.tensor([[0.5, 0, 0, 0.5, 1, 1]]), (2, 2, 2))
    with pytest.raises(ValueError, match="batch size"):
        crop_from_grid(torch.zeros(2, 1, 2, 2, 2), torch.tensor([[0.0, 0, 0, 1, 1, 1]]), (2, 2, 2))
    with pytest.raises(ValueError, match="grid_shape"):
        paste_into_grid(torch.zeros(1, 1, 2, 2, 2), torch.tensor([[0.0, 0, 0, 1, 1, 1]]), (2, 0, 2))


def test_paste_known_numbers_and_coverage():
    patch = ramp_x((2, 2, 2))  # x values 0, 1
    box = torch.tensor([[0.0, 0.0, 0.25, 1.0, 1.0, 0.75]], dtype=torch.float64)
    pasted, coverage = paste_into_grid(patch, box, (2, 2, 8))
    assert pasted[0, 0, 0, 0].tolist() == [0, 0, 0, 0, 1, 1, 0, 0]
    assert coverage[0, 0, 1, 1].tolist() == [0, 0, 1, 1, 1, 1, 0, 0]


def test_paste_area_weights_partial_cells():
    patch = torch.full((1, 1, 1, 1, 1), 4.0, dtype=torch.float64)
    # box covers x in [0.125, 0.625) of a 4-cell grid: cells 0 (half), 1 (full), 2 (half)
    box = torch.tensor([[0.0, 0.0, 0.125, 1.0, 1.0, 0.625]], dtype=torch.float64)
    pasted, coverage = paste_into_grid(patch, box, (1, 1, 4))
    assert coverage.flatten().tolist() == [0.5, 1.0, 0.5, 0.0]
    assert pasted.flatten().tolist() == [2.0, 4.0, 2.0, 0.0]


def test_paste_box_narrower_than_a_cell_keeps_its_mass():
    patch = torch.ones(1, 1, 4, 1, 1, dtype=torch.float64)
    box = torch.tensor([[0.30, 0.0, 0.0, 0.40, 1.0, 1.0]], dtype=torch.float64)  # 0.2 of one z cell
    pasted, coverage = paste_into_grid(patch, box, (2, 1, 1))
    assert coverage.flatten().tolist() == pytest.approx([0.2, 0.0])
    assert pasted.flatten().tolist() == pytest.approx([0.2, 0.0])


def test_paste_clips_the_zero_padded_edge():
    patch = ramp_x((1, 1, 4), start=1.0)  # 1, 2, 3, 4; the last two lie beyond the scan
    box = torch.tensor([[0.0, 0.0, 0.5, 1.0, 1.0, 1.5]], dtype=torch.float64)
    pasted, coverage = paste_into_grid(patch, box, (1, 1, 4))
    assert pasted.flatten().tolist() == [0, 0, 1, 2]
    assert coverage.flatten().tolist() == [0, 0, 1, 1]


def test_pastes_of_a_patch_grid_add_up_to_the_area_resampled_scan():
    rng = np.random.default_rng(0)
    shape, size = (8, 12, 12), (4, 8, 8)  # edge patches along y and x are zero-padded
    volume = rng.random(shape)
    starts = patch_grid(shape, size)
    patches = torch.from_numpy(np.stack([extract_patch(volume, s, size) for s in starts])[:, None])
    boxes = torch.tensor([normalized_box(s, size, shape) for s in starts], dtype=torch.float64)
    pasted, coverage = paste_into_grid(patches, boxes, (4, 6, 6))
    expected = torch.nn.functional.avg_pool3d(torch.from_numpy(volume)[None, None], 2)
    torch.testing.assert_close(pasted.sum(0, keepdim=True), expected)
    torch.testing.assert_close(coverage.sum(0), torch.ones(1, 4, 6, 6, dtype=torch.float64))


def test_crop_known_numbers():
    grid = ramp_x((2, 2, 8))
    box = torch.tensor([[0.0, 0.0, 0.25, 1.0, 1.0, 0.75]], dtype=torch.float64)
    assert crop_from_grid(grid, box, (2, 2, 4))[0, 0, 0, 0].tolist() == [2, 3, 4, 5]
    assert crop_from_grid(grid, box, (2, 2, 2))[0, 0, 1, 1].tolist() == [2.5, 4.5]  # centres at x 2.5, 4.5


def test_crop_beyond_the_scan_reads_zero():
    grid = ramp_x((1, 1, 8), start=1.0)  # 1..8
    box = torch.tensor([[0.0, 0.0, 0.75, 1.0, 1.0, 1.25]], dtype=torch.float64)
    assert crop_from_grid(grid, box, (1, 1, 4)).flatten().tolist() == [7, 8, 0, 0]


def test_crop_matches_grid_sample_inside_the_scan():
    torch.manual_seed(0)
    feat = torch.rand(2, 3, 4, 6, 5, dtype=torch.float64)
    box = torch.tensor([[0.1, 0.2, 0.0, 0.9, 0.7, 0.6], [0.0, 0.0, 0.3, 0.5, 1.0, 1.0]], dtype=torch.float64)
    out_shape = (3, 5, 7)
    ours = crop_from_grid(feat, box, out_shape)
    # reference: grid_sample(align_corners=False) at the output cell centres, border padding
    axes = []
    for a, n in enumerate(out_shape):
        centres = (torch.arange(n, dtype=torch.float64) + 0.5) / n
        axes.append(box[:, a, None] + (box[:, a + 3] - box[:, a])[:, None] * centres)
    z, y, x = (2 * axes[i] - 1 for i in range(3))
    grid = torch.stack(torch.broadcast_tensors(x[:, None, None, :], y[:, None, :, None], z[:, :, None, None]), dim=-1)
    reference = torch.nn.functional.grid_sample(feat, grid, mode="bilinear", padding_mode="border", align_corners=False)
    torch.testing.assert_close(ours, reference)


def test_round_trip_paste_then_crop_is_identity_on_an_aligned_box():
    torch.manual_seed(1)
    patch = torch.rand(1, 2, 2, 4, 4, dtype=torch.float64)
    box = torch.tensor([[0.5, 0.25, 0.5, 1.0, 0.75, 1.0]], dtype=torch.float64)  # 2x4x4 cells of a 4x8x8 grid
    pasted, _ = paste_into_grid(patch, box, (4, 8, 8))
    torch.testing.assert_close(crop_from_grid(pasted, box, (2, 4, 4)), patch)
    # and the other way: cropping a scan then pasting back restores the box region
    scan = torch.rand(1, 1, 4, 8, 8, dtype=torch.float64)
    restored, coverage = paste_into_grid(crop_from_grid(scan, box, (2, 4, 4)), box, (4, 8, 8))
    torch.testing.assert_close(restored, scan * coverage)


def test_batch_rows_with_different_boxes_are_independent():
    torch.manual_seed(2)
    feat = torch.rand(3, 2, 4, 8, 8, dtype=torch.float64)
    boxes = torch.tensor(
        [[0.0, 0.0, 0.0, 0.5, 0.5, 0.5], [0.25, 0.5, 0.5, 1.0, 1.5, 1.5], [0.1, 0.3, 0.2, 0.6, 0.9, 0.7]],
        dtype=torch.float64,
    )
    crops = crop_from_grid(feat, boxes, (2, 4, 4))
    pasted, coverage = paste_into_grid(crops, boxes, (4, 8, 8))
    for i in range(3):
        torch.testing.assert_close(crops[i : i + 1], crop_from_grid(feat[i : i + 1], boxes[i : i + 1], (2, 4, 4)))
        alone, cov = paste_into_grid(crops[i : i + 1], boxes[i : i + 1], (4, 8, 8))
        torch.testing.assert_close(pasted[i : i + 1], alone)
        torch.testing.assert_close(coverage[i : i + 1], cov)


def test_both_directions_are_differentiable():
    feat = torch.rand(1, 1, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    box = torch.tensor([[0.1, 0.2, 0.3, 0.8, 0.9, 1.2]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda f: crop_from_grid(f, box, (2, 2, 4)), (feat,))
    assert torch.autograd.gradcheck(lambda f: paste_into_grid(f, box, (3, 4, 4))[0], (feat,))


def test_resize_to_scan_interpolates_the_whole_grid():
    grid = ramp_x((1, 1, 2))  # values 0, 1 at centres 0.25, 0.75
    out = resize_to_scan(grid, (1, 1, 4)).flatten().tolist()
    assert out == [0.0, 0.25, 0.75, 1.0]
