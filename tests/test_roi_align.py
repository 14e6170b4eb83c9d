"""Tests for jax_rpn.roi_align against a loop-based numpy port of torchvision's CPU kernel.

The reference follows torchvision/csrc/ops/cpu/roi_align_kernel.cpp (roi_align_forward_kernel_impl)
and roi_align_common.h (pre_calc_for_bilinear_interpolate) line by line, geometry in float32
like the kernel, for one image in HWC layout. Level-assignment values are computed by hand
from detectron2's ``assign_boxes_to_levels`` formula.
"""

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_rpn import roi_align as ra

f32 = np.float32


def _bilinear(feat, y, x):
    """torchvision's bilinear sample with its edge rules; ``feat [H, W, C]``."""
    height, width = feat.shape[:2]
    if not (y >= -1.0 and y <= height and x >= -1.0 and x <= width):
        return np.zeros(feat.shape[2])
    y, x = max(y, f32(0)), max(x, f32(0))
    y_low, x_low = int(y), int(x)
    if y_low >= height - 1:
        y_high = y_low = height - 1
        y = f32(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_high = x_low = width - 1
        x = f32(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1 - ly, 1 - lx
    return (
        hy * hx * feat[y_low, x_low]
        + hy * lx * feat[y_low, x_high]
        + ly * hx * feat[y_high, x_low]
        + ly * lx * feat[y_high, x_high]
    )


def reference_roi_align(
    feat, boxes, *, output_size, spatial_scale, sampling_ratio, aligned, grid_cap=None
):
    """torchvision roi_align for one image; ``grid_cap`` mimics our documented static cap."""
    feat = np.asarray(feat, np.float64)
    oh, ow = output_size
    out = np.zeros((len(boxes), oh, ow, feat.shape[2]))
    scale = f32(spatial_scale)
    for n, box in enumerate(np.asarray(boxes, f32)):
        offset = f32(0.5) if aligned else f32(0.0)
        start_w, start_h = box[0] * scale - offset, box[1] * scale - offset
        end_w, end_h = box[2] * scale - offset, box[3] * scale - offset
        roi_w, roi_h = end_w - start_w, end_h - start_h
        if not aligned:
            roi_w, roi_h = max(roi_w, f32(1)), max(roi_h, f32(1))
        bin_h, bin_w = roi_h / f32(oh), roi_w / f32(ow)
        grid_h = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_h / f32(oh))
        grid_w = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_w / f32(ow))
        if grid_cap is not None:
            grid_h, grid_w = min(grid_h, grid_cap), min(grid_w, grid_cap)
        count = max(grid_h * grid_w, 1)
        for ph in range(oh):
            for pw in range(ow):
                val = np.zeros(feat.shape[2])
                for iy in range(grid_h):
                    y = start_h + ph * bin_h + f32(iy + 0.5) * bin_h / f32(grid_h)
                    for ix in range(grid_w):
                        x = start_w + pw * bin_w + f32(ix + 0.5) * bin_w / f32(grid_w)
                        val += _bilinear(feat, y, x)
                out[n, ph, pw] = val / count
    return out


FEAT = np.random.default_rng(0).normal(size=(9, 11, 3)).astype(np.float32)
# Input-image pixels at spatial_scale 1/4 (feature map covers 44 x 36 pixels).
BOXES = np.array(
    [
        [4.0, 6.0, 30.0, 22.0],  # inside
        [-10.0, -6.0, 12.0, 9.0],  # partly outside, top left
        [30.0, 20.0, 60.0, 50.0],  # partly outside, bottom right
        [-30.0, -30.0, -8.0, -6.0],  # entirely outside (more than 1 px)
        [10.3, 11.7, 11.1, 12.0],  # tiny (< 1 feature pixel)
        [17.0, 5.0, 17.0, 5.0],  # empty
        [0.7, 1.9, 43.2, 35.1],  # whole map, fractional
        [42.0, 2.0, 44.0, 33.0],  # thin, on the right border
    ],
    np.float32,
)


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [2, 0, -1])
def test_matches_torchvision_reference(aligned, sampling_ratio):
    settings = dict(
        output_size=(3, 4), spatial_scale=0.25, sampling_ratio=sampling_ratio, aligned=aligned
    )
    run = jax.jit(partial(ra.roi_align, max_sampling_ratio=4, **settings))
    out = run(FEAT, BOXES)
    assert out.shape == (len(BOXES), 3, 4, 3)
    # Every box here needs at most ceil(11 / 3) = 4 samples per axis: within the cap, exact.
    np.testing.assert_allclose(out, reference_roi_align(FEAT, BOXES, **settings), atol=1e-5)


def test_adaptive_grid_beyond_cap_uses_capped_grid():
    # A 40 x 32 feature-pixel box at output 2x2 wants a 16 x 20 grid; capped at 3 per axis.
    feat = np.random.default_rng(1).normal(size=(34, 42, 2)).astype(np.float32)
    boxes = np.array([[1.0, 1.0, 41.0, 33.0], [5.0, 5.0, 9.0, 8.0]], np.float32)
    settings = dict(output_size=(2, 2), spatial_scale=1.0, sampling_ratio=0, aligned=True)
    out = jax.jit(partial(ra.roi_align, max_sampling_ratio=3, **settings))(feat, boxes)
    np.testing.assert_allclose(
        out, reference_roi_align(feat, boxes, grid_cap=3, **settings), atol=1e-5
    )
    exact = reference_roi_align(feat, boxes, **settings)
    np.testing.assert_allclose(out[1], exact[1], atol=1e-5)  # the small box: exact anyway
    assert not np.allclose(out[0], exact[0], atol=1e-3)  # the cap is a real approximation


def test_vmap_over_batch_and_square_int_output_size():
    feats = np.stack([FEAT, -2.0 * FEAT])
    boxes = np.stack([BOXES, BOXES[::-1]])
    # Adaptive grid (default sampling_ratio=-1) up to ceil(42.5 / 4 / 2) = 6 <= 8 per axis.
    roi_align = partial(ra.roi_align, output_size=2, spatial_scale=0.25, max_sampling_ratio=8)
    run = jax.jit(jax.vmap(roi_align))
    out = run(feats, boxes)
    assert out.shape == (2, len(BOXES), 2, 2, 3)
    for i in range(2):
        ref = reference_roi_align(
            feats[i],
            boxes[i],
            output_size=(2, 2),
            spatial_scale=0.25,
            sampling_ratio=-1,
            aligned=True,
        )
        np.testing.assert_allclose(out[i], ref, atol=1e-5)


def test_gradient_wrt_features_is_finite_and_the_adjoint():
    boxes = np.concatenate([BOXES, [[np.nan, 0.0, 5.0, 5.0]]]).astype(np.float32)
    cot = np.random.default_rng(2).normal(size=(len(boxes), 3, 3, 3)).astype(np.float32)
    pool = jax.jit(
        lambda f: ra.roi_align(f, boxes, output_size=(3, 3), spatial_scale=0.25, sampling_ratio=0)
    )
    out = pool(FEAT)
    assert np.all(np.isfinite(out)) and np.all(np.asarray(out)[-1] == 0)  # NaN box -> zeros
    grad = jax.grad(lambda f: jnp.sum(pool(f) * cot))(FEAT)
    assert np.all(np.isfinite(grad)) and np.any(grad != 0)
    # RoIAlign is linear in the features, so <grad, f> = <cot, roi_align(f)> for any f.
    other = np.random.default_rng(3).normal(size=FEAT.shape).astype(np.float32)
    np.testing.assert_allclose(np.sum(grad * other), np.sum(pool(other) * cot), rtol=1e-4)


def test_assign_levels_hand_computed():
    # floor(4 + log2(side / 224 + 1e-8)), clamped to [2, 5]:
    # 224 -> 4, 112 -> 3, 448 -> 5, 223 -> floor(3.994) = 3, 56 -> 2, 8 -> 2 (clamped from -0.8),
    # 2000 -> 5 (clamped from 7.2), 160 x 320 (side 226.3) -> 4; empty and NaN boxes -> 2.
    sides = [
        (224, 224),
        (112, 112),
        (448, 448),
        (223, 223),
        (56, 56),
        (8, 8),
        (2000, 2000),
        (160, 320),
        (0, 0),
    ]
    boxes = np.array([[10, 20, 10 + w, 20 + h] for w, h in sides] + [[np.nan] * 4], np.float32)
    levels = jax.jit(ra.assign_levels)(boxes)
    assert levels.dtype == jnp.int32
    np.testing.assert_array_equal(levels, [4, 3, 5, 3, 2, 2, 5, 4, 2, 2])
    np.testing.assert_array_equal(ra.assign_levels(boxes[:3], min_level=3, max_level=4), [4, 3, 4])


def test_multilevel_pools_each_box_from_its_level():
    rng = np.random.default_rng(4)
    strides = (4, 8, 16, 32)  # P2..P5 of a 128 x 96 input
    feats = [rng.normal(size=(96 // s, 128 // s, 2)).astype(np.float32) for s in strides]
    boxes = np.array(
        [
            [3, 4, 13, 17],
            [10, 10, 70, 50],
            [0, 0, 128, 96],
            [40, 20, 100, 90],
            [-20, 60, 40, 110],
            [64, 30, 66, 31],
            [20, 30, 40, 50],
        ],
        np.float32,
    )
    # canonical_size 28 so that boxes of this small image spread over all four levels.
    run = jax.jit(
        partial(
            ra.multilevel_roi_align,
            strides=strides,
            output_size=(2, 3),
            sampling_ratio=2,
            canonical_size=28,
        )
    )
    out = run(feats, boxes)
    levels = np.asarray(ra.assign_levels(boxes, canonical_size=28))
    # Hand-computed: floor(4 + log2(sqrt(area) / 28)), e.g. sqrt(60 * 40) = 49 -> 4.
    np.testing.assert_array_equal(levels, [2, 4, 5, 5, 4, 2, 3])
    for k, level in enumerate(levels):
        ref = reference_roi_align(
            feats[level - 2],
            boxes[k : k + 1],
            output_size=(2, 3),
            spatial_scale=1.0 / strides[level - 2],
            sampling_ratio=2,
            aligned=True,
        )
        np.testing.assert_allclose(out[k : k + 1], ref, atol=1e-5)


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="output_size"):
        ra.roi_align(FEAT, BOXES, output_size=(0, 7), spatial_scale=0.25)
    with pytest.raises(ValueError, match="spatial_scale"):
        ra.roi_align(FEAT, BOXES, spatial_scale=0.0)
    with pytest.raises(ValueError, match="max_sampling_ratio"):
        ra.roi_align(FEAT, BOXES, spatial_scale=0.25, max_sampling_ratio=0)
    with pytest.raises(ValueError, match="boxes"):
        ra.roi_align(FEAT, BOXES[:, :3], spatial_scale=0.25)
    with pytest.raises(ValueError, match="features"):
        ra.roi_align(FEAT[0], BOXES, spatial_scale=0.25)
    with pytest.raises(ValueError, match="strides"):
        ra.multilevel_roi_align([FEAT, FEAT], BOXES, strides=(4, 16))
    with pytest.raises(ValueError, match="strides"):
        ra.multilevel_roi_align([FEAT], BOXES, strides=(4, 8))
    with pytest.raises(ValueError, match="min_level"):
        ra.assign_levels(BOXES, min_level=5, max_level=2)
