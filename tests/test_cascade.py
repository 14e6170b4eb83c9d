"""Cascade RPN: adaptive convolution, centre-region assignment, both stages' targets and losses,
the head in the model, proposals, gradients on degenerate anchors, one compile per step.

References: plain numpy transcriptions (the bilinear-sampled 3x3 convolution and its adjoint
written out tap by tap; mmdetection's ``RegionAssigner.assign`` loop), ``lax`` dilated
convolutions, and cases computed by hand in the comments.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_training import _random_batch  # tests/ is on sys.path (pytest rootdir)

from configs import cascade as cascade_config
from configs import coco_r50_fpn_cascade, tiny
from jax_rpn import boxes as box_ops
from jax_rpn import config_checks, inference, matching, parallel, region_assign, training
from jax_rpn.cascade_objective import cascade_objective, cascade_targets, stage2_sample
from jax_rpn.models import build_rpn, init_variables
from jax_rpn.models.adaptive_conv import (
    AdaptiveConv,
    adaptive_conv,
    adaptive_conv_at,
    anchor_points,
    multilevel_adaptive_conv,
    regular_points,
)
from jax_rpn.models.cascade_head import CascadeHead, CascadeRPNOutput
from jax_rpn.optim import create_optimizer
from jax_rpn.settings import CascadeSettings, LossSettings, ProposalSettings, TargetSettings


@pytest.fixture(scope="module", autouse=True)
def _fast_compile(fast_compile_module):
    """Every test here compiles a model or a train step: XLA's optimisations off (conftest)."""


# ---------------------------------------------------------------------------------------------
# Adaptive convolution


def _np_bilinear(x, y, xx):
    """Bilinear sample of x [H, W, C] at (y, xx); pixels outside are zero. Also returns the
    (row, col, weight) of each in-map corner, for the adjoint."""
    h, w, c = x.shape
    y0, x0 = int(np.floor(y)), int(np.floor(xx))
    value, corners = np.zeros(c), []
    for r, cc in ((y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)):
        weight = (1 - abs(y - r)) * (1 - abs(xx - cc))
        if 0 <= r < h and 0 <= cc < w:
            value += weight * x[r, cc]
            corners.append((r, cc, weight))
    return value, corners


def _np_adaptive_conv(x, points, kernel, d_out=None):
    """out[i, j] = sum over taps (ky, kx) of bilinear(x, points[i, j, 3 ky + kx]) @ kernel[ky, kx];
    with ``d_out`` also the gradients of sum(out * d_out) w.r.t. x and kernel."""
    x, points, kernel = (np.asarray(a, np.float64) for a in (x, points, kernel))
    h, w, _ = x.shape
    out = np.zeros((h, w, kernel.shape[-1]))
    d_x, d_kernel = np.zeros_like(x), np.zeros_like(kernel)
    for i in range(h):
        for j in range(w):
            for ky in range(3):
                for kx in range(3):
                    y, xx = points[i, j, 3 * ky + kx]
                    value, corners = _np_bilinear(x, y, xx)
                    out[i, j] += value @ kernel[ky, kx]
                    if d_out is not None:
                        d_kernel[ky, kx] += np.outer(value, d_out[i, j])
                        for r, cc, weight in corners:
                            d_x[r, cc] += weight * (kernel[ky, kx] @ d_out[i, j])
    return out, d_x, d_kernel


def test_adaptive_conv_matches_numpy_bilinear_convolution():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 6, 3)).astype(np.float32)
    kernel = rng.normal(size=(3, 3, 3, 4)).astype(np.float32)
    # Points anywhere in and around the map, some integer, some far outside.
    points = rng.uniform(-2.5, 7.5, size=(5, 6, 9, 2)).astype(np.float32)
    points[0, 0, :4] = [[0, 0], [4, 5], [-1, 2], [2, 6]]  # corner, last pixel, edges
    points[1, 1, 0] = [100.0, -100.0]
    d_out = rng.normal(size=(5, 6, 4))
    want, want_dx, want_dk = _np_adaptive_conv(x, points, kernel, d_out)

    got = jax.jit(adaptive_conv)(x, points, kernel)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    grad = jax.jit(
        jax.grad(lambda x, k: jnp.sum(adaptive_conv(x, points, k) * d_out), argnums=(0, 1))
    )
    got_dx, got_dk = grad(x, kernel)
    np.testing.assert_allclose(got_dx, want_dx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_dk, want_dk, rtol=1e-5, atol=1e-5)


def _dilated_conv(x, kernel, dilation):
    """The reference: ``lax``'s 3x3 convolution of ``dilation``, zero padding, NHWC / HWIO."""
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        (1, 1),
        ((dilation, dilation), (dilation, dilation)),
        rhs_dilation=(dilation, dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision="highest",
    )


@pytest.mark.parametrize("dilation", [1, 3])
def test_adaptive_conv_at_regular_points_is_a_dilated_conv(dilation):
    """Zero offsets: the plain 3x3 convolution of that dilation with zero padding (lax)."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 7, 9, 4)).astype(np.float32)
    kernel = rng.normal(size=(3, 3, 4, 5)).astype(np.float32)
    points = np.ascontiguousarray(
        np.broadcast_to(regular_points((7, 9), dilation=dilation), (2, 7, 9, 9, 2))
    )

    conv = functools.partial(_dilated_conv, dilation=dilation)

    def ours(x, k):
        return jax.vmap(adaptive_conv, in_axes=(0, 0, None))(x, points, k)

    np.testing.assert_allclose(jax.jit(ours)(x, kernel), conv(x, kernel), rtol=1e-5, atol=1e-5)
    d_out = rng.normal(size=(2, 7, 9, 5))

    def grads(f):
        return jax.jit(jax.grad(lambda x, k: jnp.sum(f(x, k) * d_out), argnums=(0, 1)))(x, kernel)

    chex.assert_trees_all_close(grads(ours), grads(conv), rtol=1e-4, atol=1e-4)

    # Several maps in one pass (a second, smaller level), and the module: the same kernel
    # through its sampled path and its plain path (whose bias is initialised to 0).
    small = x[:, :3, :4]
    small_points = np.broadcast_to(regular_points((3, 4), dilation=dilation), (2, 3, 4, 9, 2))
    both = jax.jit(multilevel_adaptive_conv)([x, small], [points, small_points], kernel)
    np.testing.assert_allclose(both[0], conv(x, kernel), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(both[1], conv(small, kernel), rtol=1e-5, atol=1e-5)
    module = AdaptiveConv(5, dilation=dilation)
    plain = jax.jit(module.init)(jax.random.key(0), [jnp.asarray(x)])
    sampled = {"params": {"kernel": plain["params"]["conv"]["kernel"]}}
    np.testing.assert_allclose(
        jax.jit(module.apply)(sampled, [x, small], [points, small_points])[1],
        jax.jit(module.apply)(plain, [x, small])[1],
        rtol=1e-5,
        atol=1e-6,
    )


def test_adaptive_conv_with_taps_per_anchor_is_one_conv_per_anchor():
    """Points ``[B, H, W, A, 9, 2]`` (A anchors per cell, two levels): output anchor ``a`` is the
    convolution at points ``[..., a, :, :]``, values and gradients."""
    rng = np.random.default_rng(4)
    xs = [rng.normal(size=(2, 5, 6, 3)).astype(np.float32), rng.normal(size=(2, 3, 3, 3))]
    xs[1] = xs[1].astype(np.float32)
    kernel = rng.normal(size=(3, 3, 3, 4)).astype(np.float32)
    points = [rng.uniform(-1.5, 6.5, size=(*x.shape[:3], 3, 9, 2)).astype(np.float32) for x in xs]
    d_outs = [rng.normal(size=(*x.shape[:3], 3, 4)).astype(np.float32) for x in xs]

    def per_anchor(xs, k):
        outs = multilevel_adaptive_conv(xs, points, k)
        return outs, sum(jnp.sum(o * d) for o, d in zip(outs, d_outs, strict=True))

    def one_by_one(xs, k):
        outs = [
            jnp.stack([multilevel_adaptive_conv([x], [p[:, :, :, a]], k)[0] for a in range(3)], 3)
            for x, p in zip(xs, points, strict=True)
        ]
        return outs, sum(jnp.sum(o * d) for o, d in zip(outs, d_outs, strict=True))

    got, _ = jax.jit(per_anchor)(xs, kernel)
    want, _ = jax.jit(one_by_one)(xs, kernel)
    assert [g.shape for g in got] == [(2, 5, 6, 3, 4), (2, 3, 3, 3, 4)]
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)
    _assert_same_gradients(per_anchor, one_by_one, xs, kernel)


def _assert_same_gradients(f, g, xs, kernel):
    """``f`` and ``g`` map ``(xs, kernel)`` to ``(outputs, loss)``: the same jitted gradients of
    the loss with respect to both."""
    grad = jax.grad(lambda xs, k, fn: fn(xs, k)[1], argnums=(0, 1))
    chex.assert_trees_all_close(
        jax.jit(grad, static_argnums=2)(xs, kernel, f),
        jax.jit(grad, static_argnums=2)(xs, kernel, g),
        rtol=1e-4,
        atol=1e-4,
    )


def test_adaptive_conv_at_chosen_cells_is_the_dense_conv_there():
    """``adaptive_conv_at``: S cells per image picked over two levels give the dense
    convolution's values at those cells, and its gradients for a loss that reads only them;
    a cell of level -1 reads zeros."""
    rng = np.random.default_rng(6)
    xs = [rng.normal(size=(2, 5, 6, 3)).astype(np.float32), rng.normal(size=(2, 3, 3, 3))]
    xs[1] = xs[1].astype(np.float32)
    kernel = rng.normal(size=(3, 3, 3, 4)).astype(np.float32)
    points = [rng.uniform(-1.5, 6.5, size=(*x.shape[:3], 9, 2)).astype(np.float32) for x in xs]
    # Per image: (level, row, col) of each chosen cell; the last is padding (level -1).
    cells = [[(0, 0, 0), (1, 2, 1), (0, 4, 5), (1, 0, 2), (-1, 0, 0)]] * 2
    cells[1] = [(1, 1, 1), (0, 2, 3), (0, 0, 5), (1, 2, 2), (-1, 0, 0)]
    levels = np.array([[c[0] for c in image] for image in cells], np.int32)  # [2, 5]
    picked = np.array(
        [
            [points[lvl][i, r, c] if lvl >= 0 else np.zeros((9, 2)) for lvl, r, c in image]
            for i, image in enumerate(cells)
        ],
        np.float32,
    )  # [2, 5, 9, 2]
    d_out = rng.normal(size=(2, 5, 4)).astype(np.float32)

    def dense(xs, k):
        outs = multilevel_adaptive_conv(xs, points, k)
        rows = [
            jnp.stack([outs[lvl][i, r, c] if lvl >= 0 else jnp.zeros(4) for lvl, r, c in image])
            for i, image in enumerate(cells)
        ]
        out = jnp.stack(rows)  # [2, 5, 4]
        return out, jnp.sum(out * d_out)

    def sparse(xs, k):
        out = adaptive_conv_at(xs, picked, levels, k)
        return out, jnp.sum(out * d_out)

    got, want = jax.jit(sparse)(xs, kernel)[0], jax.jit(dense)(xs, kernel)[0]
    assert got.shape == (2, 5, 4)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got[:, -1], 0.0)
    _assert_same_gradients(sparse, dense, xs, kernel)


def test_anchor_points_sit_on_the_anchor_as_mmdetection_offsets():
    # Anchor [8, 16, 24, 48] at stride 8: centre (x, y) = (2, 4), half size (1, 2) cells.
    got = np.asarray(anchor_points(jnp.array([8.0, 16.0, 24.0, 48.0]), stride=8))
    want = [(y, x) for y in (2.0, 4.0, 6.0) for x in (1.0, 2.0, 3.0)]
    np.testing.assert_allclose(got, want)

    # mmdetection's anchor_offset (kernel 3, dilation 1) added to the regular taps of the cell.
    rng = np.random.default_rng(2)
    h, w, stride = 3, 4, 16
    xy = rng.uniform(0, 64, (h * w, 2))
    anchors = np.concatenate([xy, xy + rng.uniform(1, 90, (h * w, 2))], 1).astype(np.float32)
    idx = np.arange(-1, 2)
    yy, xx = (a.reshape(-1) for a in np.meshgrid(idx, idx, indexing="ij"))
    aw = (anchors[:, 2] - anchors[:, 0]) / stride / 2 - 1
    ah = (anchors[:, 3] - anchors[:, 1]) / stride / 2 - 1
    ctr_x = (anchors[:, 0] + anchors[:, 2]) / 2 / stride - np.tile(np.arange(w), h)
    ctr_y = (anchors[:, 1] + anchors[:, 3]) / 2 / stride - np.repeat(np.arange(h), w)
    offset = np.stack([ah[:, None] * yy + ctr_y[:, None], aw[:, None] * xx + ctr_x[:, None]], -1)
    want = regular_points((h, w)).reshape(h * w, 9, 2) + offset
    np.testing.assert_allclose(anchor_points(anchors, stride=stride), want, rtol=1e-5, atol=1e-4)


def test_adaptive_conv_finite_for_degenerate_points():
    """Points at infinity, NaN or far outside read zero: outputs and gradients stay finite."""
    x = jnp.ones((4, 4, 2))
    kernel = jnp.ones((3, 3, 2, 3))
    points = np.asarray(np.broadcast_to(regular_points((4, 4)), (4, 4, 9, 2))).copy()
    points[0, 0, 0] = [np.nan, 1.0]
    points[0, 1, 1] = [np.inf, -np.inf]
    points[2, 2] = 1e9
    out, grads = jax.jit(
        jax.value_and_grad(lambda x, k: jnp.sum(adaptive_conv(x, points, k)), argnums=(0, 1))
    )(x, kernel)
    assert np.isfinite(out) and all(np.all(np.isfinite(g)) for g in grads)
    # Cell (2, 2) reads nothing; cell (0, 0) lost its first tap (2 channels x 3 outputs).
    np.testing.assert_allclose(jax.jit(adaptive_conv)(x, points, kernel)[2, 2], 0.0)


def test_adaptive_conv_rejects_bad_shapes():
    with pytest.raises(ValueError, match="points must have shape"):
        adaptive_conv(jnp.ones((4, 4, 2)), jnp.zeros((4, 4, 8, 2)), jnp.ones((3, 3, 2, 1)))
    with pytest.raises(ValueError, match="kernel must have shape"):
        adaptive_conv(jnp.ones((4, 4, 2)), jnp.zeros((4, 4, 9, 2)), jnp.ones((3, 3, 3, 1)))


# ---------------------------------------------------------------------------------------------
# Centre-region assignment


def _np_region_assign(anchors, gt, strides, hws, anchor_size, center_ratio, ignore_ratio):
    """mmdetection's RegionAssigner.assign, step by step (returns 1-based gt index or 0 / -1)."""
    num_levels = len(anchors)
    r1, r2 = (1 - center_ratio) / 2, (1 - ignore_ratio) / 2
    scale = np.sqrt((gt[:, 2] - gt[:, 0]) * (gt[:, 3] - gt[:, 1]))
    lvls = np.clip(np.floor(np.log2(scale) - np.log2(anchor_size) + 0.5), 0, num_levels - 1)

    def calc_region(box, ratio, stride, hw):
        f = box / stride
        x1 = np.clip(np.round((1 - ratio) * f[0] + ratio * f[2]), 0, hw[1])
        y1 = np.clip(np.round((1 - ratio) * f[1] + ratio * f[3]), 0, hw[0])
        x2 = np.clip(np.round(ratio * f[0] + (1 - ratio) * f[2]), 0, hw[1])
        y2 = np.clip(np.round(ratio * f[1] + (1 - ratio) * f[3]), 0, hw[0])
        return x1, y1, x2, y2

    def inside(a, stride, reg):
        x = (a[:, 0] + a[:, 2]) * 0.5 / stride
        y = (a[:, 1] + a[:, 3]) * 0.5 / stride
        return (x >= reg[0]) & (x <= reg[2]) & (y >= reg[1]) & (y <= reg[3])

    assigned = [np.zeros(len(a), int) for a in anchors]
    ignore = [np.zeros(len(a), bool) for a in anchors]
    for g, box in enumerate(gt):
        lvl = int(lvls[g])
        s, hw = strides[lvl], hws[lvl]
        assigned[lvl][inside(anchors[lvl], s, calc_region(box, r2, s, hw))] = -1
        assigned[lvl][inside(anchors[lvl], s, calc_region(box, r1, s, hw))] = g + 1
        for adj in (lvl - 1, lvl + 1):
            if 0 <= adj < num_levels:
                reg = calc_region(box, r2, strides[adj], hws[adj])
                ignore[adj] |= inside(anchors[adj], strides[adj], reg)
    for lvl in range(num_levels):
        assigned[lvl][ignore[lvl]] = -1
    return np.concatenate(assigned)


def _grid(hw, stride, size):
    """One square anchor of side ``size`` per cell, centred on (j, i) * stride (detectron2,
    offset 0), cell-major: [H * W, 4]."""
    ys, xs = np.meshgrid(np.arange(hw[0]), np.arange(hw[1]), indexing="ij")
    c = np.stack([xs.reshape(-1), ys.reshape(-1)], 1) * stride
    return np.concatenate([c - size / 2, c + size / 2], 1).astype(np.float32)


def test_region_assign_hand_computed_single_box():
    # Stride 4, an 8x8 map. Box [4, 4, 28, 20]: feature coords x 1..7, y 1..5.
    # Centre region (0.4 in from each side): x round(3.4)=3 .. round(4.6)=5, y round(2.6)=3 ..
    # round(3.4)=3 -> cells (row 3, cols 3..5) positive.
    # Ignore region (0.25 in): x round(2.5)=2 (half to even) .. round(5.5)=6, y 2 .. 4.
    anchors = [_grid((8, 8), 4, 16)]
    gt = jnp.array([[4.0, 4.0, 28.0, 20.0], [0.0, 0.0, 0.0, 0.0]])
    matched, labels = jax.jit(
        lambda a, g, v: region_assign.region_assign(
            a, g, v, strides=(4,), feature_hws=((8, 8),), anchor_sizes=(16.0,)
        )
    )(anchors, gt, jnp.array([True, False]))
    want = np.zeros((8, 8), int)
    want[2:5, 2:7] = -1
    want[3, 3:6] = 1
    np.testing.assert_array_equal(np.asarray(labels).reshape(8, 8), want)
    np.testing.assert_array_equal(matched, 0)


def test_region_assign_levels_overrides_and_adjacent_ignores():
    # Strides 4, 8, 16 on a 64x64 image, level sides 16, 32, 64.
    hws, strides = ((16, 16), (8, 8), (4, 4)), (4, 8, 16)
    anchors = [_grid(hw, s, 16 * s / 4) for hw, s in zip(hws, strides, strict=True)]
    gt = jnp.array(
        [
            [16.0, 16.0, 48.0, 48.0],  # 32x32: floor(log2(2) + 0.5) = level 1
            [20.0, 20.0, 36.0, 36.0],  # 16x16: level 0
            [0.0, 0.0, 4.0, 0.0],  # zero area: left out
            [8.0, 8.0, 16.0, 16.0],  # padding (gt_valid False)
        ]
    )
    valid = jnp.array([True, True, True, False])
    matched, labels = jax.jit(
        lambda gt, valid: region_assign.region_assign(
            anchors, gt, valid, strides=strides, feature_hws=hws, anchor_sizes=(16.0, 32.0, 64.0)
        )
    )(gt, valid)
    np.testing.assert_array_equal(
        region_assign.target_levels(gt[:2], anchor_sizes=(16.0, 32.0, 64.0)), [1, 0]
    )
    l0, l1, l2 = np.split(np.asarray(labels), [256, 320])  # levels of 16x16, 8x8, 4x4 cells
    m0, m1, _ = np.split(np.asarray(matched), [256, 320])
    # Box 0 on level 1 (stride 8): coords 2..6; centre round(3.6)=4 .. round(4.4)=4 -> cell
    # (4, 4); ignore round(3.0)=3 .. round(5.0)=5.
    w1 = np.zeros((8, 8), int)
    w1[3:6, 3:6] = -1
    w1[4, 4] = 1
    # Box 1 (level 0) ignores its ignore region on level 1: coords 2.5..4.5 -> round(3.0)=3 ..
    # round(4.0)=4: cells (3..4, 3..4), already -1 except (4, 4), which turns -1 too.
    w1[3:5, 3:5] = -1
    np.testing.assert_array_equal(l1.reshape(8, 8), w1)
    # Box 1 on level 0 (stride 4): coords 5..9; centre round(6.6)=7 .. round(7.4)=7 -> (7, 7);
    # ignore round(6.0)=6 .. round(8.0)=8. Box 0 (level 1) marks its ignore region on level 0:
    # coords 4..12 -> round(6.0)=6 .. round(10.0)=10, which covers box 1's cells: all -1.
    w0 = np.zeros((16, 16), int)
    w0[6:11, 6:11] = -1
    np.testing.assert_array_equal(l0.reshape(16, 16), w0)
    # Level 2 (stride 16): box 0's ignore region coords 1..3 -> round(1.5)=2 .. round(2.5)=2.
    w2 = np.zeros((4, 4), int)
    w2[2, 2] = -1
    np.testing.assert_array_equal(l2.reshape(4, 4), w2)
    assert m1.reshape(8, 8)[4, 4] == 0 and np.all(m0 == 0)


def test_target_levels_nearest_side_in_log_scale():
    """Sides 16, 64, 128 (not doubling): boundaries at areas 16 * 64 = 32^2 and 64 * 128 =
    8192 (90.5^2), a tie going up; doubling sides give mmdetection's floor(log2(s / 16) + 0.5)."""
    gt = jnp.array(
        [
            [0, 0, 31, 31],  # area 961 < 1024: level 0
            [0, 0, 32, 32],  # 1024: the boundary, level 1
            [5, 5, 21, 69],  # 16 x 64 = 1024: level 1
            [0, 0, 90, 90],  # 8100 < 8192: level 1
            [0, 0, 91, 91],  # 8281: level 2
            [0, 0, 400, 400],  # beyond the last side: level 2
            [3, 3, 3, 9],  # zero area: level 0
        ],
        jnp.float32,
    )
    levels = jax.jit(lambda g: region_assign.target_levels(g, anchor_sizes=(16, 64, 128)))(gt)
    np.testing.assert_array_equal(levels, [0, 1, 1, 1, 2, 2, 0])
    rng = np.random.default_rng(0)
    wh = rng.uniform(2, 600, (500, 2))
    boxes = np.concatenate([np.zeros_like(wh), wh], 1).astype(np.float32)
    mmdet = np.floor(np.log2(np.sqrt(wh[:, 0] * wh[:, 1]) / 16) + 0.5).clip(0, 4)
    np.testing.assert_array_equal(
        region_assign.target_levels(boxes, anchor_sizes=(16, 32, 64, 128, 256)), mmdet
    )
    with pytest.raises(ValueError, match="anchor_sizes must be positive and increasing"):
        region_assign.target_levels(gt, anchor_sizes=(16, 16, 32))


def test_region_assign_matches_mmdetection_loop():
    """Random boxes on 3 levels, including overlapping ones where the later box wins."""
    rng = np.random.default_rng(3)
    hws, strides = ((24, 20), (12, 10), (6, 5)), (4, 8, 16)
    anchors = [_grid(hw, s, 8 * s) for hw, s in zip(hws, strides, strict=True)]
    fn = jax.jit(
        lambda g, v: region_assign.region_assign(
            anchors, g, v, strides=strides, feature_hws=hws, anchor_sizes=(32.0, 64.0, 128.0)
        )
    )
    for _ in range(5):
        xy = rng.uniform(-10, 80, (10, 2))
        gt = np.concatenate([xy, xy + rng.uniform(4, 70, (10, 2))], 1).astype(np.float32)
        matched, labels = fn(gt, np.ones(10, bool))
        want = _np_region_assign(anchors, gt, strides, hws, 32.0, 0.2, 0.5)
        np.testing.assert_array_equal(labels, np.sign(want))
        np.testing.assert_array_equal(np.where(want > 0, want - 1, 0), matched)


# ---------------------------------------------------------------------------------------------
# Both stages' targets and the objective


def _objective(config):
    """cascade_objective with the settings of ``config``."""
    return functools.partial(
        cascade_objective,
        targets_settings=TargetSettings.from_config(config),
        loss_settings=LossSettings.from_config(config),
        cascade_settings=CascadeSettings.from_config(config),
    )


def _hand_example():
    """One level, stride 8, a 4x4 map (32x32 image), 16 px anchors centred on (8 j, 8 i)."""
    anchors = [_grid((4, 4), 8, 16)]
    gt = np.array([[4.0, 4.0, 20.0, 20.0], [0.0, 0.0, 0.0, 0.0]], np.float32)
    refined = anchors[0].copy()
    refined[5] = gt[0]  # IoU 1
    refined[6] = [4.0, 4.0, 20.0, 24.0]  # IoU 256 / 320 = 0.8
    refined[0] = [0.0, 0.0, 8.0, 8.0]  # IoU 16 / 304
    refined[15] = [30.0, 30.0, 30.0, 31.0]  # zero width (degenerate)
    return anchors, refined, gt


def test_cascade_targets_hand_computed():
    anchors, refined, gt = _hand_example()
    settings = dict(strides=(8,), feature_hws=((4, 4),), anchor_sizes=(16.0,), num_samples=32)
    t = jax.jit(lambda k, r, g, v: cascade_targets(k, anchors, r, g, v, **settings))(
        jax.random.key(0), refined, gt, np.array([True, False])
    )
    # Stage 1: box coords 0.5..2.5; centre round(1.3)=1 .. round(1.7)=2, ignore round(1.0)=1 ..
    # round(2.0)=2: cells (1..2, 1..2) positive = anchors 5, 6, 9, 10; the rest negative.
    want1 = np.zeros(16, int)
    want1[[5, 6, 9, 10]] = 1
    np.testing.assert_array_equal(t.stage1_labels, want1)
    # encode(anchor centred (8, 8) side 16, box centred (12, 12) side 16), weights 10, 10, 2, 2:
    # dx = 10 * 4 / 16 = 2.5; anchor 10 (centre (16, 16)): -2.5; dw = dh = 0.
    np.testing.assert_allclose(t.stage1_targets[5], [2.5, 2.5, 0, 0], atol=1e-6)
    np.testing.assert_allclose(t.stage1_targets[10], [-2.5, -2.5, 0, 0], atol=1e-6)
    np.testing.assert_allclose(t.stage1_targets[0], 0.0)
    # Stage 2 on the refined anchors, IoU >= 0.7 positive, < 0.7 negative; 32 samples take all.
    ious = np.asarray(box_ops.pairwise_iou(jnp.asarray(refined), jnp.asarray(gt[:1])))[:, 0]
    want2 = (ious >= 0.7).astype(int)
    np.testing.assert_array_equal(np.flatnonzero(want2), [5, 6])
    np.testing.assert_array_equal(t.stage2_labels, want2)
    # encode(refined 6 = [4, 4, 20, 24], box) with weights 20, 20, 10, 10: dy = 20 * -2 / 20,
    # dh = 10 * log(16 / 20).
    np.testing.assert_allclose(
        t.stage2_targets[6], [0.0, -2.0, 0.0, 10 * np.log(0.8)], rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(t.stage2_targets[5], 0.0, atol=1e-6)


def test_stage2_low_quality_positive_needs_min_iou():
    """A box whose best refined anchor has IoU in [0.3, 0.7) gets it (mmdetection's
    min_pos_iou); below 0.3 it gets none."""
    anchors = [np.array([[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10]], np.float32)]
    refined = anchors[0]
    gt = np.array([[0, 0, 10, 20], [20, 0, 30, 40]], np.float32)  # best IoUs 0.5 and 0.25
    t = jax.jit(
        lambda key: cascade_targets(
            key,
            anchors,
            refined,
            gt,
            np.array([True, True]),
            strides=(8,),
            feature_hws=((1, 3),),
            anchor_sizes=(16.0,),
            num_samples=8,
        )
    )(jax.random.key(0))
    np.testing.assert_array_equal(t.stage2_labels, [1, 0, 0])
    _, labels = matching.match(refined, gt, [True, True], high=0.7, low=0.7)  # no minimum
    np.testing.assert_array_equal(labels, [1, 1, 0])


def test_stage1_with_anchors_per_cell_keeps_the_best_shape():
    """Three anchors per cell (h / w 0.5, 1, 2, area 16^2, A fastest): in each centre-region
    cell only the anchor of the box's shape is positive, its cell-mates are ignored."""
    centres = _grid((4, 4), 8, 0)[:, :2]  # [16, 2]
    shapes = [(16 * np.sqrt(2), 16 / np.sqrt(2)), (16.0, 16.0), (16 / np.sqrt(2), 16 * np.sqrt(2))]
    anchors = (
        np.concatenate(
            [
                np.concatenate([centres - np.array(wh) / 2, centres + np.array(wh) / 2], 1)[:, None]
                for wh in shapes
            ],
            1,
        )
        .reshape(48, 4)
        .astype(np.float32)
    )  # cell-major, then h / w 0.5, 1, 2
    # A tall box, 12 x 24 (h / w 2), and a wide one, 20 x 10 (h / w 0.5).
    gt = np.array([[4.0, 2.0, 16.0, 26.0], [10.0, 20.0, 30.0, 30.0]], np.float32)
    t = jax.jit(
        lambda k, g, v: cascade_targets(
            k,
            [anchors],
            anchors,
            g,
            v,
            strides=(8,),
            feature_hws=((4, 4),),
            anchor_sizes=(16.0,),
            num_samples=32,
        )
    )(jax.random.key(0), gt, np.array([True, True]))
    labels = np.asarray(t.stage1_labels).reshape(16, 3)
    # Tall box in cells (/ 8): x 0.5..2, y 0.25..3.25. Centre region x round(1.1)=1 ..
    # round(1.4)=1, y round(1.45)=1 .. round(2.05)=2: cells 5 and 9; ignore region x 1..2,
    # y 1..2 (round(2.5) = 2): cells 6 and 10 ignored. Centred shape IoU with the tall anchor
    # (11.3 x 22.6): 256 / 288 = 0.89; the square: 192 / 352 = 0.55; the wide: 0.33.
    np.testing.assert_array_equal(labels[[5, 9]], [[-1, -1, 1], [-1, -1, 1]])
    np.testing.assert_array_equal(labels[[6, 10]], -1)
    # Wide box: x 1.25..3.75, y 2.5..3.75: centre and ignore regions are cells 14 and 15; the
    # wide anchor (22.6 x 11.3): 200 / 256 = 0.78 beats the square's 160 / 296.
    np.testing.assert_array_equal(labels[[14, 15]], [[1, -1, -1], [1, -1, -1]])
    assert np.sum(labels == 1) == 4 and np.sum(labels == -1) == 4 * 3 - 4 + 2 * 3
    np.testing.assert_array_equal(
        np.asarray(t.stage1_labels) == 0,
        np.isin(np.arange(48) // 3, [0, 1, 2, 3, 4, 7, 8, 11, 12, 13]),
    )


def _outputs(anchors, refined, batch_size=1):
    """CascadeRPNOutput of one level with zero deltas and logits."""
    n = anchors[0].shape[0]
    zeros4 = jnp.zeros((batch_size, 4, 4, 1, 4))
    return CascadeRPNOutput(
        objectness=(jnp.zeros((batch_size, 4, 4, 1)),),
        deltas=(zeros4,),
        anchors=tuple(anchors),
        stage1_deltas=(zeros4,),
        refined_anchors=(jnp.broadcast_to(jnp.asarray(refined), (batch_size, n, 4)),),
        features=(jnp.zeros((batch_size, 4, 4, 2)),),
        strides=(8,),
    )


def _cascade_test_config():
    c = cascade_config.get_config()
    c.anchors.strides = (8,)
    c.anchors.sizes = ((16,),)
    c.targets.num_samples = 32
    return c


def test_cascade_objective_hand_computed():
    anchors, refined, gt = _hand_example()
    batch = {
        "boxes": gt[None],
        "valid": np.array([[True, False]]),
        "ignore": np.zeros((1, 2), bool),
        "image_hw": np.array([[32, 32]], np.int32),
    }
    objective = jax.jit(lambda o, b: _objective(_cascade_test_config())(o, b, jax.random.key(0)))
    loss, m = objective(_outputs(anchors, refined), batch)
    # Stage 1, zero deltas: the 4 positive anchors are themselves, each IoU 12 * 12 /
    # (2 * 256 - 144) with the box; sum of (1 - IoU) over B * N / 200 = 16 / 200.
    iou = 144.0 / 368.0
    np.testing.assert_allclose(m["stage1_box_loss"], 4 * (1 - iou) / (16 / 200), rtol=1e-5)
    # Stage 2: 2 positives (refined 5 with IoU 1 and 6 with IoU 0.8) and all 14 negatives
    # sampled (32 samples); zero logits -> log 2 each, over B * num_samples = 32.
    np.testing.assert_allclose(m["objectness_loss"], 16 * np.log(2) / 32, rtol=1e-5)
    np.testing.assert_allclose(m["box_loss"], (0 + 0.2) / 32, rtol=1e-5)
    config = _cascade_test_config()
    want = (
        config.cascade.stage1_box_weight * m["stage1_box_loss"]
        + m["objectness_loss"]
        + config.loss.box_weight * m["box_loss"]
    )
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    assert m["num_positive"] == 2 and m["num_negative"] == 14 and m["stage1_positive"] == 4
    np.testing.assert_allclose(m["stage1_iou"], iou, rtol=1e-5)
    # Refined anchors of stage 1's positives: 5 (IoU 1), 6 (0.8), 9 and 10 (the anchors).
    np.testing.assert_allclose(m["refined_iou"], (1 + 0.8 + 2 * iou) / 4, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# The head in the model: outputs, proposals, gradients, one compile


def _tiny_cascade_config():
    c = tiny.get_config()
    c.model.head = "cascade"
    c.anchors.sizes = ((8,), (16,), (32,), (64,), (128,))
    c.anchors.aspect_ratios = (1.0,)
    c.targets.high = 0.7
    c.targets.low = 0.7
    c.targets.weights = (20.0, 20.0, 10.0, 10.0)
    c.loss.box = "iou"
    c.loss.box_weight = 10.0
    return c


@pytest.fixture(scope="module")
def tiny_model():
    config = _tiny_cascade_config()
    model = build_rpn(config)
    return config, model, init_variables(model, jax.random.key(0), (2, 64, 64, 3))


@pytest.mark.parametrize("ratios", [(1.0,), (0.5, 1.0, 2.0)])
def test_model_outputs_and_proposals_from_refined_anchors(tiny_model, ratios):
    config, model, variables = tiny_model
    num_a = len(ratios)
    if num_a > 1:  # A anchors per cell: stage 1 predicts 4 A deltas, stage 2 samples per anchor
        config = _tiny_cascade_config()
        config.anchors.aspect_ratios = ratios
        model = build_rpn(config)
        variables = init_variables(model, jax.random.key(0), (2, 64, 64, 3))
    head = variables["params"]["head"]
    assert set(head) == {"stage1_conv", "stage1_deltas", "stage2_conv", "objectness", "deltas"}
    assert head["stage2_conv"]["kernel"].shape == (3, 3, 16, 16)  # no bias (DeformConv2d)
    images = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
    image_hw = jnp.array([[64, 64], [40, 64]])
    out = jax.jit(functools.partial(model.apply, train=False))(variables, images, image_hw=image_hw)
    assert isinstance(out, CascadeRPNOutput)
    sides = (16, 8, 4, 2, 1)
    assert [o.shape for o in out.objectness] == [(2, s, s, num_a) for s in sides]
    assert [d.shape for d in out.deltas] == [(2, s, s, num_a, 4) for s in sides]
    assert [d.shape for d in out.stage1_deltas] == [(2, s, s, num_a, 4) for s in sides]
    assert [r.shape for r in out.refined_anchors] == [(2, s * s * num_a, 4) for s in sides]
    # Refined anchors: stage 1's boxes (coder weights 10, 10, 2, 2), clipped to each image.
    d1 = out.stage1_deltas[0].reshape(2, -1, 4)
    want = box_ops.clip(
        box_ops.decode(jnp.asarray(out.anchors[0]), d1[1], weights=(10, 10, 2, 2)), (40, 64)
    )
    np.testing.assert_allclose(out.refined_anchors[0][1], want, rtol=1e-6)
    # Proposals are stage 2's deltas decoded against the refined anchors (coder 20, 20, 10, 10).
    settings = ProposalSettings.from_config(config, train=False)
    props = jax.jit(
        functools.partial(inference.proposals_from_outputs, settings=settings, objectness="sigmoid")
    )(out, image_hw)
    flat_refined = jnp.concatenate(out.refined_anchors, 1)
    flat_deltas = jnp.concatenate([d.reshape(2, -1, 4) for d in out.deltas], 1)
    flat_logits = jnp.concatenate([o.reshape(2, -1) for o in out.objectness], 1)
    decoded = box_ops.clip(
        box_ops.decode(flat_refined[1], flat_deltas[1], weights=(20, 20, 10, 10)), (40, 64)
    )
    # The best-scoring box that is not empty after clipping (min_size 0) comes first.
    nonempty = (decoded[:, 2] > decoded[:, 0]) & (decoded[:, 3] > decoded[:, 1])
    top = jnp.argmax(jnp.where(nonempty, flat_logits[1], -jnp.inf))
    np.testing.assert_allclose(props.boxes[1, 0], decoded[top], rtol=1e-5, atol=1e-4)
    assert float(props.scores[1, 0]) == pytest.approx(float(flat_logits[1, top]), rel=1e-6)


@pytest.mark.parametrize("ratios", [(1.0,), (0.5, 1.0, 2.0)])
def test_stage2_at_the_sampled_anchors_gives_the_dense_loss_and_gradients(tiny_model, ratios):
    """Training's stage 2 at the anchors ``stage2_sample`` picks (the ones the loss samples)
    gives the dense head's loss, metrics and gradients; its outputs equal the dense ones there
    and are 0 elsewhere."""
    config, model, variables = tiny_model
    if len(ratios) > 1:
        config = _tiny_cascade_config()
        config.anchors.aspect_ratios = ratios
        model = build_rpn(config)
        variables = init_variables(model, jax.random.key(0), (2, 64, 64, 3))
    batch = _random_batch(np.random.default_rng(8), config, 2)
    keys = jax.random.split(jax.random.key(9), 2)
    t, c = TargetSettings.from_config(config), CascadeSettings.from_config(config)

    def run(params, sparse):
        extra = {}
        if sparse:
            extra["stage2_at"] = lambda refined: stage2_sample(
                refined, batch, keys, targets_settings=t, cascade_settings=c
            )
        out, _ = model.apply(
            {**variables, "params": params},
            batch["image"],
            train=True,
            image_hw=batch["image_hw"],
            mutable=["batch_stats"],
            **extra,
        )
        loss, metrics = _objective(config)(out, batch, keys)
        return loss, (metrics, out)

    grad = jax.jit(jax.value_and_grad(run, has_aux=True), static_argnums=1)
    (loss, (metrics, dense)), grads = grad(variables["params"], False)
    (s_loss, (s_metrics, sparse)), s_grads = grad(variables["params"], True)
    np.testing.assert_allclose(s_loss, loss, rtol=1e-6)
    chex.assert_trees_all_close(s_metrics, metrics, rtol=1e-6)
    chex.assert_trees_all_close(s_grads, grads, rtol=1e-4, atol=1e-7)
    assert metrics["num_positive"] > 0 and metrics["num_negative"] > 0

    # The anchors picked are the sampled ones of cascade_targets (stage 2's labels >= 0).
    refined = jnp.concatenate(dense.refined_anchors, axis=1)  # [B, N, 4]
    picked = jax.jit(stage2_sample, static_argnames=("targets_settings", "cascade_settings"))(
        refined, batch, keys, targets_settings=t, cascade_settings=c
    )
    n = refined.shape[1]
    for i in range(2):
        labels = cascade_targets(
            keys[i],
            dense.anchors,
            refined[i],
            batch["boxes"][i],
            batch["valid"][i],
            strides=dense.strides,
            feature_hws=[o.shape[1:3] for o in dense.objectness],
            anchor_sizes=c.anchor_sizes,
            stage2_weights=t.weights,
            high=t.high,
            low=t.low,
            num_samples=t.num_samples,
            gt_ignore=batch["ignore"][i],
            image_hw=batch["image_hw"][i],
        ).stage2_labels
        want = np.flatnonzero(np.asarray(labels) >= 0)
        np.testing.assert_array_equal(picked[i][: len(want)], want)
        np.testing.assert_array_equal(picked[i][len(want) :], n)
        # Outputs: the dense head's at the picked anchors, 0 at the others.
        for name, k in (("objectness", 1), ("deltas", 4)):
            flat = [
                jnp.concatenate([x[i].reshape(-1, k) for x in getattr(o, name)])  # [N, k]
                for o in (dense, sparse)
            ]
            np.testing.assert_allclose(flat[1][want], flat[0][want], rtol=1e-5, atol=1e-6)
            others = np.setdiff1d(np.arange(n), want)
            np.testing.assert_array_equal(flat[1][others], 0.0)


def test_stage2_at_is_refused_by_the_standard_head():
    model = build_rpn(tiny.get_config())  # head_type "standard"
    with pytest.raises(ValueError, match="stage2_at is for the cascade head.*'standard'"):
        model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False, stage2_at=len)


@pytest.mark.parametrize("dilation", [1, 3])
def test_config_dilation_is_stage_1s_convolution(tiny_model, dilation):
    """``cascade.stage1_dilation`` (``configs/cascade.py``: 1, mmdetection's: 3) is the dilation
    of stage 1's 3x3 convolution: its deltas equal ``relu(conv) @ predictor`` computed with
    ``lax.conv_general_dilated`` of that dilation on the features the head saw."""
    config = _tiny_cascade_config()
    config.cascade.stage1_dilation = dilation
    model = build_rpn(config)
    _, _, variables = tiny_model  # stage 1's parameters do not depend on the dilation
    images = jax.random.normal(jax.random.key(2), (2, 64, 64, 3))
    out = jax.jit(functools.partial(model.apply, train=False))(variables, images)
    head = variables["params"]["head"]
    conv, predictor = head["stage1_conv"]["conv"], head["stage1_deltas"]
    for features, deltas in zip(out.features[:2], out.stage1_deltas[:2], strict=True):
        hidden = _dilated_conv(features, conv["kernel"], dilation)
        hidden = jax.nn.relu(hidden + conv["bias"])
        want = hidden @ predictor["kernel"][0, 0] + predictor["bias"]  # [B, H, W, 4]
        np.testing.assert_allclose(deltas[..., 0, :], want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("sampled_only", [False, True])
def test_gradients_finite_for_degenerate_refined_anchors(sampled_only):
    """Stage 1 pushed to zero-size boxes, or far outside the image (clipped to a line on its
    border): stage 2 samples nothing useful, and the loss and gradients stay finite, with
    stage 2 at every anchor or (as in training) at the sampled ones."""
    config = _tiny_cascade_config()
    hws, strides = ((8, 8), (4, 4), (2, 2)), (8, 16, 32)
    config.anchors.strides, config.anchors.sizes = strides, ((16,), (32,), (64,))
    anchors = [_grid(hw, s, 2 * s) for hw, s in zip(hws, strides, strict=True)]
    rng = np.random.default_rng(4)
    features = [rng.normal(size=(2, *hw, 8)).astype(np.float32) for hw in hws]
    image_hw = jnp.array([[64, 64], [48, 64]])
    batch = _random_batch(rng, config, 2)
    head = CascadeHead(conv_dim=8)
    variables = jax.jit(lambda key: head.init(key, features, anchors, strides, image_hw))(
        jax.random.key(0)
    )

    @jax.jit
    def loss_and_grads(params, bias):
        params = {**params, "stage1_deltas": {**params["stage1_deltas"], "bias": bias}}

        def loss_fn(params, features):
            at = None
            if sampled_only:
                at = functools.partial(
                    stage2_sample,
                    batch=batch,
                    key=jax.random.key(0),
                    targets_settings=TargetSettings.from_config(config),
                    cascade_settings=CascadeSettings.from_config(config),
                )
            s1, refined, objectness, deltas = head.apply(
                {"params": params}, features, anchors, strides, image_hw, stage2_at=at
            )
            out = CascadeRPNOutput(
                objectness, deltas, tuple(anchors), s1, refined, tuple(features), strides
            )
            loss, metrics = _objective(config)(out, batch, jax.random.key(0))
            boxes = jnp.concatenate(refined, 1)
            short = jnp.minimum(boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1])
            return loss, (metrics, jnp.max(short))

        return jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(params, features)

    # dw = dh = -60 / 2: sides times exp(-30); or dx, dy = +-1e4 / 10 anchor sides away.
    for bias in ([0.0, 0.0, -60.0, -60.0], [1e4, -1e4, 0.0, 0.0]):
        (loss, (metrics, short_side)), grads = loss_and_grads(variables["params"], jnp.array(bias))
        assert float(short_side) < 1e-3
        assert np.isfinite(loss) and all(np.isfinite(v) for v in metrics.values())
        assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
        assert metrics["num_positive"] == 0  # no refined anchor overlaps anything


def _trainer_pieces(config, variables):
    """The trainer's model, optimizer and a replicated state from ``variables``, on 2 devices."""
    mesh = parallel.data_mesh(jax.devices()[:2])
    model = build_rpn(config, axis_name=parallel.AXIS)
    tx, schedule = create_optimizer(config.optim, config.num_train_steps)
    state = training.TrainState(
        step=jnp.zeros((), jnp.int32),
        params=variables["params"],
        model_state={"batch_stats": variables["batch_stats"]},
        opt_state=tx.init(variables["params"]),
        key=jax.random.PRNGKey(0),
    )
    state = jax.device_put(state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    return mesh, model, tx, schedule, state


def test_cascade_train_step_compiles_once_and_learns(tiny_model):
    """The trainer's step with the cascade head: one program for every step, on 2 devices."""
    config, _, variables = tiny_model
    rng = np.random.default_rng(5)
    batches = [_random_batch(rng, config, 8) for _ in range(3)]
    mesh, model, tx, schedule, state = _trainer_pieces(config, variables)
    chex.clear_trace_counter()
    step = chex.assert_max_traces(training.make_train_step(config, model, tx, schedule), n=1)
    p_step = parallel.parallelize(step, mode="shard_map", mesh=mesh)
    losses = []
    for batch in batches:  # new data, same shapes: no retrace
        state, m = p_step(state, parallel.shard_batch(batch, mode="shard_map", mesh=mesh))
        losses.append(float(m["loss"]))
        assert m["finite"] == 1 and m["stage1_positive"] > 0
    assert losses[-1] != losses[0]


def test_cascade_train_step_runs_stage2_at_sampled_anchors_only_with_the_same_update(tiny_model):
    """The trainer's step runs stage 2 at the sampled anchors only; the step that also returns
    proposals runs it everywhere. One SGD step (its update is linear in the gradient) from the
    same state on the same batch gives the same parameters and loss."""
    _, _, variables = tiny_model
    config = _tiny_cascade_config()
    config.optim.name, config.optim.schedule, config.optim.warmup_steps = "sgd", "constant", 0
    config.optim.grad_clip_norm = None
    batch = _random_batch(np.random.default_rng(11), config, 4)
    mesh, model, tx, schedule, state = _trainer_pieces(config, variables)
    sharded = parallel.shard_batch(batch, mode="shard_map", mesh=mesh)
    results = []
    for with_proposals, out in ((False, (True, True)), (True, (True, True, False))):
        step = training.make_train_step(config, model, tx, schedule, with_proposals=with_proposals)
        step = parallel.parallelize(step, mode="shard_map", mesh=mesh, replicated_out=out)
        results.append(step(state, sharded))
    (sparse, s_metrics), (dense, metrics, _) = results
    np.testing.assert_allclose(s_metrics["loss"], metrics["loss"], rtol=1e-6)
    assert s_metrics["num_positive"] > 0
    moved = jax.tree.map(
        lambda a, b: float(jnp.max(jnp.abs(a - b))), dense.params, variables["params"]
    )
    assert max(jax.tree.leaves(moved)) > 1e-4  # the step did update the parameters
    chex.assert_trees_all_close(sparse.params, dense.params, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Configs


def test_configs_follow_mmdetection_and_validate():
    coco = coco_r50_fpn_cascade.get_config()
    coco.init.checkpoint = "R-50.pkl"  # frozen BN wants weights; the file is read at training
    config_checks.validate(coco)
    assert coco.anchors.sizes == ((32,), (64,), (128,), (256,), (512,))  # scales=[8]
    assert coco.targets.weights == (20.0, 20.0, 10.0, 10.0)  # 1 / (0.05, 0.05, 0.1, 0.1)
    assert coco.cascade.stage1_weights == (10.0, 10.0, 2.0, 2.0)  # 1 / (0.1, 0.1, 0.5, 0.5)
    assert (coco.targets.high, coco.targets.low, coco.cascade.low_quality_min_iou) == (
        0.7,
        0.7,
        0.3,
    )
    assert (coco.proposals.post_nms_topk_test, coco.proposals.nms_threshold) == (2000, 0.8)
    config_checks.validate(cascade_config.get_config())
    with pytest.raises(ValueError, match="one anchor size per level"):
        c = cascade_config.get_config()
        c.anchors.sizes = ((16, 24), (32, 48), (64, 96), (128, 192), (256, 384))
        build_rpn(c).init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False)
    with pytest.raises(ValueError, match="anchors.sizes.*one size per level"):
        config_checks.validate(c)

    with pytest.raises(ValueError, match="anchors.sizes.*increasing"):
        c = cascade_config.get_config()
        c.anchors.sizes = ((16,), (64,), (32,), (128,), (256,))
        config_checks.validate(c)
