"""Patch grids: coverage, zero padding, exact stitching, sliding-window blending, normalised boxes."""

from __future__ import annotations

import numpy as np
import pytest

from deepsc.data.patches import (blend_patches, extract_patch, gaussian_importance, normalized_box, patch_grid,
                                 sliding_grid, stitch_patches)


@pytest.mark.parametrize(
    "shape, size",
    [((17, 33, 29), (8, 16, 16)), ((5, 7, 9), (16, 16, 16)), ((16, 64, 64), (16, 64, 64)), ((1, 1, 1), (2, 3, 4))],
)
def test_stitch_of_extract_is_identity(shape, size):
    volume = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    starts = patch_grid(shape, size)
    patches = [extract_patch(volume, start, size) for start in starts]
    assert all(p.shape == size for p in patches)
    np.testing.assert_array_equal(stitch_patches(patches, starts, shape), volume)


def test_grid_counts_and_padding():
    starts = patch_grid((17, 33, 29), (8, 16, 16))
    assert len(starts) == 3 * 3 * 2
    assert starts[0] == (0, 0, 0) and starts[-1] == (16, 32, 16)
    volume = np.ones((17, 33, 29), dtype=np.uint8)
    last = extract_patch(volume, starts[-1], (8, 16, 16))
    assert last.dtype == np.uint8
    assert last.sum() == 1 * 1 * 13  # one slice, one row, 13 columns inside; the rest is padding


def test_every_voxel_in_exactly_one_patch():
    shape, size = (9, 10, 11), (4, 4, 4)
    coverage = np.zeros(shape, dtype=np.int32)
    for z, y, x in patch_grid(shape, size):
        coverage[z : z + 4, y : y + 4, x : x + 4] += 1
    assert (coverage == 1).all()


def test_extract_patch_with_negative_start_pads_before():
    volume = np.arange(27, dtype=np.int16).reshape(3, 3, 3)
    patch = extract_patch(volume, (-1, 0, 0), (2, 3, 3))
    assert (patch[0] == 0).all()
    np.testing.assert_array_equal(patch[1], volume[0])


def test_normalized_box():
    assert normalized_box((0, 0, 0), (16, 64, 64), (32, 128, 128)) == (0.0, 0.0, 0.0, 0.5, 0.5, 0.5)
    box = normalized_box((16, 64, 64), (16, 64, 64), (20, 100, 128))
    assert box[:3] == (0.8, 0.64, 0.5)
    assert box[3] == pytest.approx(1.6) and box[4] == pytest.approx(1.28) and box[5] == 1.0


@pytest.mark.parametrize("bad", [(0, 4, 4), (4, 4), (4, -1, 4), (2.5, 4, 4)])
def test_bad_sizes_are_rejected(bad):
    with pytest.raises(ValueError):
        patch_grid((8, 8, 8), bad)


def test_patch_outside_volume_is_rejected():
    with pytest.raises(ValueError, match="outside"):
        extract_patch(np.zeros((4, 4, 4)), (4, 0, 0), (2, 2, 2))
    with pytest.raises(ValueError, match="starts"):
        stitch_patches([np.zeros((2, 2, 2))], [], (4, 4, 4))


# ------------------------------------------------------------------ sliding windows
def test_sliding_grid_without_overlap_is_the_patch_grid():
    assert sliding_grid((17, 33, 29), (8, 16, 16), 0.0) == patch_grid((17, 33, 29), (8, 16, 16))


def test_sliding_grid_steps_by_half_a_patch_and_keeps_the_tiles():
    shape, size = (30, 100, 64), (16, 64, 64)
    starts = sliding_grid(shape, size, 0.5)
    assert len(starts) == len(set(starts)) and starts == sorted(starts)
    assert set(patch_grid(shape, size)) <= set(starts)
    assert sorted({s[0] for s in starts}) == [0, 8, 16]  # half steps up to 30 - 16, plus the tile at 16
    assert sorted({s[1] for s in starts}) == [0, 32, 64]
    assert sorted({s[2] for s in starts}) == [0]  # one patch fits the axis exactly


@pytest.mark.parametrize("bad", [-0.1, 1.0, True, "0.5"])
def test_sliding_grid_rejects_a_bad_overlap(bad):
    with pytest.raises(ValueError, match="overlap"):
        sliding_grid((8, 8, 8), (4, 4, 4), bad)


@pytest.mark.parametrize("shape, size", [((17, 33, 29), (8, 16, 16)), ((5, 7, 9), (16, 16, 16))])
def test_blend_of_extracted_overlapping_patches_is_identity(shape, size):
    volume = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    starts = sliding_grid(shape, size, 0.5)
    patches = [extract_patch(volume, start, size) for start in starts]
    blended = blend_patches(patches, starts, shape, gaussian_importance(size))
    assert blended.dtype == np.float32
    np.testing.assert_allclose(blended, volume, atol=1e-5)


def test_blend_weights_each_patch_by_where_the_voxel_lies_in_it():
    # two patches disagree on their shared voxels: the one that holds a voxel nearer its centre wins
    size, shape = (1, 1, 8), (1, 1, 12)
    weight = gaussian_importance(size)
    blended = blend_patches([np.zeros(size, np.float32), np.ones(size, np.float32)], [(0, 0, 0), (0, 0, 4)], shape, weight)
    assert blended[0, 0, 4] < 0.5 < blended[0, 0, 7]  # x=4 is central in the first patch, x=7 in the second
    assert blended[0, 0, 0] == 0.0 and blended[0, 0, 11] == 1.0  # held by one patch only


def test_gaussian_importance_is_centred_positive_and_symmetric():
    weight = gaussian_importance((8, 16, 16))
    assert weight.shape == (8, 16, 16) and weight.dtype == np.float32
    assert weight.max() == pytest.approx(1.0, abs=0.05) and weight.min() >= 1e-3
    np.testing.assert_allclose(weight, weight[::-1, ::-1, ::-1])
    assert weight[4, 8, 8] > weight[0, 8, 8] > weight[0, 0, 0]
