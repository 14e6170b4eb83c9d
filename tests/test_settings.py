"""Config -> settings at one boundary: locked configs, and settings that reach the ops."""

import dataclasses
import functools

import jax
import numpy as np
import pytest

from configs import default, tiny
from jax_rpn import anchors, targets
from jax_rpn.models import build_rpn, init_variables
from jax_rpn.settings import AnchorSettings, ProposalSettings, RPNSettings, TargetSettings


def test_configs_are_locked_against_typos():
    config = default.get_config()
    with pytest.raises(AttributeError, match="bordr"):
        config.targets.bordr = 0.0
    config.targets.border = 0.0  # a declared field can be changed


def test_model_anchors_are_the_settings_anchors(fast_compile):
    """The model and the coverage tool take anchors from the same settings: equal arrays."""
    config = tiny.get_config()
    config.anchors.sizes = ((8, 10), (16, 20), (32, 40), (64, 80), (128, 160))
    model = build_rpn(config)
    variables = init_variables(model, jax.random.key(0), (1, 64, 64, 3))
    outputs = jax.jit(functools.partial(model.apply, train=False))(
        variables, np.zeros((1, 64, 64, 3), np.float32)
    )
    expected = AnchorSettings.from_config(config).for_image((64, 64))
    assert len(outputs.anchors) == len(expected) == 5
    for got, want in zip(outputs.anchors, expected, strict=True):
        np.testing.assert_array_equal(got, want)
    # Hand-computed: P2 (stride 4) of a 64x64 image has 16x16 cells x 2 sizes x 3 ratios.
    assert expected[0].shape == (16 * 16 * 6, 4)


def test_anchor_settings_broadcast_and_feature_sizes():
    a = AnchorSettings(strides=(8, 16), sizes=(32,), aspect_ratios=(0.5, 1.0, 2.0))
    assert a.sizes == ((32.0,), (32.0,)) and a.aspect_ratios == ((0.5, 1.0, 2.0),) * 2
    assert a.num_cell_anchors == 3
    assert a.feature_hws((100, 60)) == [(13, 8), (7, 4)]  # ceil(100 / 8), ceil(60 / 8), ...
    hash(a)  # usable as a jit static argument
    with pytest.raises(ValueError, match="aspect_ratios"):
        AnchorSettings(strides=(8,), sizes=(32,), aspect_ratios=(0.0,))


def test_target_settings_reach_the_matcher():
    """config.targets.border (py-faster-rcnn's straddle rule) reaches anchor_targets."""
    config = tiny.get_config()
    config.targets.border = 0.0
    settings = TargetSettings.from_config(config)
    assert settings.border == 0.0 and settings.ignore_iof is None
    cells = anchors.cell_anchors([32], [1.0])  # one 32x32 anchor per cell
    grid = anchors.grid_anchors((4, 4), 16, cells)  # [16, 4], centres at 0, 16, 32, 48
    gt = np.array([[20.0, 20.0, 44.0, 44.0]], np.float32)
    fn = jax.jit(
        lambda k: targets.anchor_targets(
            k, grid, gt, np.ones(1, bool), image_hw=(64, 64), **settings.kwargs()
        )
    )
    labels, _ = fn(jax.random.key(0))
    inside = (grid[:, 0] >= 0) & (grid[:, 1] >= 0) & (grid[:, 2] <= 64) & (grid[:, 3] <= 64)
    np.testing.assert_array_equal(np.asarray(labels)[~inside], -1)
    assert np.asarray(labels)[inside].max() == 1


def test_proposal_settings_pick_train_or_test_and_share_the_coder_weights():
    config = default.get_config()
    config.targets.weights = (2.0, 2.0, 1.0, 1.0)
    s = RPNSettings.from_config(config)
    assert s.train_proposals.pre_nms_topk == config.proposals.pre_nms_topk_train
    assert s.test_proposals.post_nms_topk == config.proposals.post_nms_topk_test
    assert s.train_proposals.weights == s.test_proposals.weights == s.targets.weights
    assert dataclasses.asdict(s.test_proposals) == s.test_proposals.kwargs()
    assert ProposalSettings.from_config(config, train=False) == s.test_proposals
