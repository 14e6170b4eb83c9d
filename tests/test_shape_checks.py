"""Every public op rejects a wrong rank, last dimension or dtype with an error naming the argument.

The public functions of the op modules are enumerated with ``inspect``, so a new op without a
case here fails :func:`test_every_public_function_has_a_case`. Each case gives good arguments
(which must run, jitted) and, for every array argument, a bad one; the expected text is the
argument's name and its documented shape (the docstrings' ``[N, 4]`` notation), checked on
concrete inputs and, for the JAX ops, on traced ones (shape checks are static, so ``jit``
raises the same error at trace time).
"""

import dataclasses
import inspect
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_rpn import (
    anchors,
    boxes,
    matching,
    nms,
    proposals,
    recall,
    roi_align,
    sampling,
    targets,
)
from jax_rpn.shape_checks import check_shape

MODULES = (boxes, anchors, matching, sampling, targets, nms, proposals, roi_align, recall)
# Public functions that take no arrays (settings or results only): nothing to check.
NO_ARRAYS = {
    "matching.check_thresholds",
    "matching.auto_anchor_chunk",
    "sampling.check_sampling",
    "recall.format_recall_table",
    "recall.short_recall",
}


def _public_functions():
    for module in MODULES:
        for name, fn in inspect.getmembers(module, inspect.isfunction):
            if not name.startswith("_") and fn.__module__ == module.__name__:
                yield f"{module.__name__.rsplit('.', 1)[-1]}.{name}", fn


def shape(arg, value, expected, label=None):
    """A bad value of ``arg`` and the error text naming it: '<arg> must have shape <expected>'."""
    return arg, value, f"{label or arg} must have shape {expected}"


def dtype(arg, value, words):
    """A bad dtype of ``arg`` and the error text naming it: '<arg> must be <words>'."""
    return arg, value, f"{arg} must be {words}"


MASK = "a bool mask (bool or integer dtype"
B4 = np.array([[0, 0, 8, 8], [4, 4, 12, 16], [2, 2, 30, 20]], np.float32)  # [3, 4]
GT = np.array([[1, 1, 9, 9], [10, 10, 20, 20]], np.float32)  # [2, 4]
ANCHORS = anchors.grid_anchors((4, 4), 8, anchors.cell_anchors((16,), (0.5, 1.0)))  # [32, 4]
KEY = jax.random.key(0)


@dataclasses.dataclass(frozen=True)
class Case:
    fn: Callable
    arrays: dict  # good array arguments (traced under jit)
    bad: tuple  # (argument, bad value, expected error text) for every array argument
    settings: dict = dataclasses.field(default_factory=dict)  # static keyword arguments
    jittable: bool = True  # False for the numpy-only anchor functions


CASES = {
    "boxes.area": Case(boxes.area, {"boxes": B4}, (shape("boxes", B4[:, :3], "[..., 4]"),)),
    "boxes.pairwise_iou": Case(
        boxes.pairwise_iou,
        {"boxes1": B4, "boxes2": GT},
        # The example: [3, 5] used to give a result from the first four columns.
        (shape("boxes1", np.zeros((3, 5)), "[N, 4]"), shape("boxes2", GT[None], "[M, 4]")),
    ),
    "boxes.aligned_iou": Case(
        boxes.aligned_iou,
        {"boxes1": B4, "boxes2": B4},
        (shape("boxes1", B4[:, :3], "[..., 4]"), shape("boxes2", B4[:, 0], "[..., 4]")),
    ),
    "boxes.aligned_giou": Case(
        boxes.aligned_giou,
        {"boxes1": B4, "boxes2": B4},
        (shape("boxes1", np.zeros((3, 5)), "[..., 4]"), shape("boxes2", B4[:, :2], "[..., 4]")),
    ),
    "boxes.clip": Case(
        boxes.clip,
        {"boxes": B4, "image_hw": np.array([16, 20])},
        (
            shape("boxes", B4[:, :3], "[..., 4]"),
            shape("image_hw", np.array([[16, 20]]), "[2]"),
            dtype("image_hw", np.array([True, True]), "a real dtype"),
        ),
    ),
    "boxes.is_valid": Case(boxes.is_valid, {"boxes": B4}, (shape("boxes", B4.T, "[..., 4]"),)),
    "boxes.check_boxes": Case(
        boxes.check_boxes, {"boxes": B4}, (shape("boxes", B4[:, :2], "[..., 4]"),)
    ),
    "boxes.encode": Case(
        boxes.encode,
        {"reference": B4, "target": B4},
        (shape("reference", B4[:, :3], "[..., 4]"), shape("target", B4[:, 1], "[..., 4]")),
    ),
    "boxes.decode": Case(
        boxes.decode,
        {"reference": B4, "deltas": np.zeros((3, 4), np.float32)},
        (shape("reference", B4[:, :3], "[..., 4]"), shape("deltas", np.zeros(3), "[..., 4]")),
    ),
    "anchors.cell_anchors": Case(
        anchors.cell_anchors,
        {"sizes": (16, 32), "aspect_ratios": (0.5, 1.0, 2.0)},
        (
            shape("sizes", ((16,), (32,)), "[V]"),
            shape("aspect_ratios", np.ones((2, 2)), "[V]"),
        ),
        jittable=False,
    ),
    "anchors.num_cell_anchors": Case(
        anchors.num_cell_anchors,
        {"sizes": (16, 32), "aspect_ratios": (0.5, 1.0, 2.0)},
        (shape("sizes", np.ones((1, 2)), "[V]"), shape("aspect_ratios", 1.0, "[V]")),
        jittable=False,
    ),
    "anchors.grid_anchors": Case(
        anchors.grid_anchors,
        {"feature_hw": (2, 3), "stride": 8, "cell_anchors": B4},
        (
            shape("feature_hw", (2, 3, 1), "[2]"),
            dtype("feature_hw", (2.0, 3.0), "an integer dtype"),
            shape("stride", (8, 8), "[]"),
            shape("cell_anchors", B4[:, :3], "[A, 4]"),
        ),
        jittable=False,
    ),
    "anchors.per_level": Case(
        anchors.per_level,
        {"values": ((16,), (32,))},
        (shape("values", (((16,),), ((32,),)), "[V]", label="sizes[0]"),),
        settings={"name": "sizes", "num_levels": 2},
        jittable=False,
    ),
    "anchors.level_cell_anchors": Case(
        anchors.level_cell_anchors,
        {"strides": (4, 8), "sizes": ((16,), (32,)), "aspect_ratios": (1.0, 2.0)},
        (
            shape("strides", ((4,), (8,)), "[V]"),
            shape("sizes", (((16,),), ((32,),)), "[V]", label="sizes[0]"),
            shape("aspect_ratios", (1.0, (2.0,)), "[V]"),
        ),
        jittable=False,
    ),
    "anchors.multilevel_anchors": Case(
        anchors.multilevel_anchors,
        {
            "feature_hws": ((4, 4), (2, 2)),
            "strides": (4, 8),
            "sizes": ((16,), (32,)),
            "aspect_ratios": (1.0,),
        },
        (
            shape("feature_hws", ((4, 4, 1), (2, 2, 1)), "[L, 2]"),
            shape("strides", (4, 8, 16), "[L] with L = 2"),
            shape("sizes", ((16, (8,)), (32,)), "[V]", label="sizes[0]"),
            shape("aspect_ratios", np.ones((1, 1, 1)), "[V]", label="aspect_ratios[0]"),
        ),
        jittable=False,
    ),
    "matching.inside_image": Case(
        matching.inside_image,
        {"anchors": ANCHORS, "image_hw": (32, 32)},
        (shape("anchors", ANCHORS[:, :2], "[N, 4]"), shape("image_hw", (32, 32, 3), "[2]")),
        settings={"border": 0.0},
    ),
    "matching.match": Case(
        matching.match,
        {
            "anchors": ANCHORS,
            "gt_boxes": GT,
            "gt_valid": np.array([True, False]),
            "gt_ignore": np.array([0, 1], np.int32),  # integer masks are accepted
            "image_hw": (32, 32),
        },
        (
            shape("anchors", ANCHORS[None], "[N, 4]"),
            shape("gt_boxes", GT[:, :3], "[G, 4]"),
            shape("gt_valid", np.ones(3, bool), "[G] with G = 2"),
            dtype("gt_valid", np.ones(2, np.float32), MASK),
            shape("gt_ignore", np.zeros((2, 1), bool), "[G] with G = 2"),
            shape("image_hw", np.array([[32, 32]]), "[2]"),
        ),
        settings={"border": 0.0},
    ),
    "matching.check_inputs": Case(
        matching.check_inputs,
        {
            "anchors": ANCHORS,
            "gt_boxes": np.stack([GT]),
            "gt_valid": np.ones((1, 2), bool),
            "gt_ignore": np.zeros((1, 2), bool),
            "image_hw": np.array([[32, 32]]),
        },
        (
            shape("anchors", ANCHORS[:, :3], "[N, 4]"),
            shape("gt_boxes", GT, "[B, G, 4]"),
            shape("gt_valid", np.ones((1, 3), bool), "[B, G] with B = 1, G = 2"),
            shape("gt_ignore", np.ones(2, bool), "[B, G] with B = 1, G = 2"),
            dtype("gt_ignore", np.ones((1, 2), np.float16), MASK),
            shape("image_hw", np.array([32, 32]), "[B, 2] with B = 1"),
        ),
        settings={"batched": True},
    ),
    "sampling.check_key": Case(
        sampling.check_key,
        {"key": jax.random.PRNGKey(1)},
        (
            shape(
                "key", jax.random.split(jax.random.PRNGKey(1)), "[K]", "key (a raw uint32 PRNG key)"
            ),
            ("key", np.zeros(2, np.int32), "key must be a PRNG key"),
        ),
    ),
    "sampling.sample_labels": Case(
        sampling.sample_labels,
        {"key": KEY, "labels": np.array([1, 0, -1, 0], np.int32)},
        (
            shape("key", jax.random.split(KEY, 2), "[]", label="key (a typed PRNG key)"),
            shape("labels", np.zeros((4, 1), np.int32), "[N]"),
            dtype("labels", np.zeros(4, np.float32), "an integer dtype"),
        ),
        settings={"num_samples": 2},
    ),
    "targets.anchor_targets": Case(
        targets.anchor_targets,
        {
            "key": jax.random.PRNGKey(0),
            "anchors": ANCHORS,
            "gt_boxes": GT,
            "gt_valid": np.array([True, True]),
            "gt_ignore": np.array([False, True]),
            "image_hw": np.array([32, 32]),
        },
        (
            shape("key", jnp.zeros((2, 2), jnp.uint32), "[K]", label="key (a raw uint32 PRNG key)"),
            shape("anchors", ANCHORS[:, :3], "[N, 4]"),
            shape("gt_boxes", GT[None], "[G, 4]"),
            shape("gt_valid", np.ones(1, bool), "[G] with G = 2"),
            shape("gt_ignore", np.ones(3, bool), "[G] with G = 2"),
            shape("image_hw", np.array([32]), "[2]"),
        ),
        settings={"border": 4.0, "num_samples": 8},
    ),
    "targets.batch_anchor_targets": Case(
        targets.batch_anchor_targets,
        {
            "key": KEY,
            "anchors": ANCHORS,
            "gt_boxes": np.stack([GT, GT]),
            "gt_valid": np.ones((2, 2), bool),
            "gt_ignore": np.zeros((2, 2), bool),
            "image_hw": np.array([[32, 32], [24, 32]]),
        },
        (
            shape("key", jax.random.split(KEY, 3), "[B] with B = 2", label="key (one per image)"),
            shape("anchors", ANCHORS[:, 0], "[N, 4]"),
            shape("gt_boxes", GT, "[B, G, 4]"),
            shape("gt_valid", np.ones(2, bool), "[B, G] with B = 2, G = 2"),
            dtype("gt_valid", np.ones((2, 2), np.float32), MASK),
            shape("gt_ignore", np.zeros((2, 3), bool), "[B, G] with B = 2, G = 2"),
            shape("image_hw", np.array([32, 32]), "[B, 2] with B = 2"),
        ),
        settings={"border": 4.0, "num_samples": 8},
    ),
    "nms.nms": Case(
        nms.nms,
        {"boxes": B4, "scores": np.array([0.9, 0.8, 0.7], np.float32)},
        (shape("boxes", B4[:, :3], "[N, 4]"), shape("scores", np.ones(2), "[N] with N = 3")),
        settings={"iou_threshold": 0.5, "max_output": 2},
    ),
    "nms.batched_nms": Case(
        nms.batched_nms,
        {"boxes": B4, "scores": np.ones(3, np.float32), "groups": np.array([0, 1, 0])},
        (
            shape("boxes", B4[None], "[N, 4]"),
            shape("scores", np.ones((3, 1)), "[N] with N = 3"),
            shape("groups", np.zeros(4, np.int32), "[N] with N = 3"),
            dtype("groups", np.zeros(3, np.float32), "an integer dtype"),
        ),
        settings={"iou_threshold": 0.5, "max_output": 2},
    ),
    "proposals.generate": Case(
        proposals.generate,
        {
            "anchors": [ANCHORS[:16], ANCHORS[16:]],
            "objectness": [np.zeros(16, np.float32), np.zeros(16, np.float32)],
            "deltas": [np.zeros((16, 4), np.float32)] * 2,
            "image_hw": (32, 32),
        },
        (
            shape("anchors", [ANCHORS[:16, :3], ANCHORS[16:]], "[Nl, 4]", label="anchors[0]"),
            shape("objectness", [np.zeros(16), np.zeros(8)], "[Nl] with Nl = 16", "objectness[1]"),
            shape("deltas", [np.zeros((16, 4)), np.zeros(16)], "[Nl, 4]", label="deltas[1]"),
            shape("image_hw", (32,), "[2]"),
        ),
        settings={"pre_nms_topk": 8, "post_nms_topk": 4, "nms_threshold": 0.7, "min_size": 0.0},
    ),
    "proposals.generate_batch": Case(
        proposals.generate_batch,
        {
            "anchors": [ANCHORS],
            "objectness": [np.zeros((2, 32), np.float32)],
            "deltas": [np.zeros((2, 32, 4), np.float32)],
            "image_hw": np.array([[32, 32], [24, 32]]),
        },
        (
            shape("anchors", [ANCHORS[None]], "[Nl, 4]", label="anchors[0]"),
            shape("objectness", [np.zeros(32)], "[B, Nl] with B = 2", label="objectness[0]"),
            shape("deltas", [np.zeros((3, 32, 4))], "[B, Nl, 4] with B = 2", label="deltas[0]"),
            shape("image_hw", np.array([32, 32]), "[B, 2]"),
        ),
        settings={"pre_nms_topk": 8, "post_nms_topk": 4, "nms_threshold": 0.7, "min_size": 0.0},
    ),
    "roi_align.roi_align": Case(
        roi_align.roi_align,
        {"features": np.zeros((8, 8, 3), np.float32), "boxes": B4},
        (
            shape("features", np.zeros((1, 8, 8, 3)), "[H, W, C]"),
            shape("boxes", B4[:, :3], "[K, 4]"),
        ),
        settings={"output_size": 2, "spatial_scale": 0.25},
    ),
    "roi_align.assign_levels": Case(
        roi_align.assign_levels, {"boxes": B4}, (shape("boxes", B4.reshape(-1), "[K, 4]"),)
    ),
    "roi_align.multilevel_roi_align": Case(
        roi_align.multilevel_roi_align,
        {
            "features": [np.zeros((8, 8, 3), np.float32), np.zeros((4, 4, 3), np.float32)],
            "boxes": B4,
        },
        (
            shape(
                "features",
                [np.zeros((8, 8, 3)), np.zeros((4, 4, 5))],
                "[Hl, Wl, C] with C = 3",
                label="features[1]",
            ),
            shape("boxes", B4[:, :3], "[K, 4]"),
        ),
        settings={"strides": (4, 8), "output_size": 2},
    ),
    "recall.recall_stats": Case(
        recall.recall_stats,
        {
            "boxes": B4,
            "scores": np.ones(3, np.float32),
            "valid": np.ones(3, bool),
            "gt_boxes": GT,
            "gt_valid": np.ones(2, bool),
            "gt_ignore": np.zeros(2, bool),
        },
        (
            shape("boxes", B4[:, :3], "[K, 4]"),
            shape("scores", np.ones(4), "[K] with K = 3"),
            shape("valid", np.ones((3, 1), bool), "[K] with K = 3"),
            dtype("valid", np.ones(3, np.float32), MASK),
            shape("gt_boxes", GT[:, None], "[G, 4]"),
            shape("gt_valid", np.ones(1, bool), "[G] with G = 2"),
            shape("gt_ignore", np.ones(3, bool), "[G] with G = 2"),
        ),
    ),
}


def test_every_public_function_has_a_case():
    names = {name for name, _ in _public_functions()}
    assert names - NO_ARRAYS - set(CASES) == set(), "public op without a shape-check case"
    assert set(CASES) | NO_ARRAYS <= names, "a case for a function that is gone"
    for name, case in CASES.items():
        assert case.fn is dict(_public_functions())[name]
        # Every array argument has a bad value.
        assert {arg for arg, _, _ in case.bad} == set(case.arrays), name


def _call(case, arrays, *, jit):
    if jit:
        return jax.jit(lambda a: case.fn(**a, **case.settings))(arrays)
    return case.fn(**arrays, **case.settings)


@pytest.mark.parametrize("name", sorted(CASES))
def test_good_arguments_pass(name):
    """The checks reject nothing valid: the good arguments run (jitted where the op is)."""
    case = CASES[name]
    jax.block_until_ready(_call(case, case.arrays, jit=case.jittable))


BAD = [(name, i) for name, case in sorted(CASES.items()) for i in range(len(case.bad))]


@pytest.mark.parametrize(
    ("name", "index"), BAD, ids=[f"{n}-{CASES[n].bad[i][0]}-{i}" for n, i in BAD]
)
def test_bad_argument_is_named_with_its_shape(name, index):
    case = CASES[name]
    arg, value, text = case.bad[index]
    # The text names the argument (per_level's values are named by its `name` setting).
    assert text.startswith(case.settings.get("name", arg)), text
    arrays = dict(case.arrays, **{arg: value})
    for jit in (False, True) if case.jittable else (False,):
        with pytest.raises(ValueError, match=re.escape(text)):
            _call(case, arrays, jit=jit)


def test_check_shape_binds_letters_and_reads_no_values():
    sizes = check_shape(np.zeros((5, 4)), "boxes", "[N, 4]")
    assert sizes == {"N": 5}
    with pytest.raises(
        ValueError, match=re.escape("scores must have shape [N] with N = 5, got (4,)")
    ):
        check_shape(np.zeros(4), "scores", "[N]", sizes=sizes)
    assert check_shape(np.zeros((2, 3, 4)), "x", "[..., 4]") == {}
    assert check_shape(np.float32(1), "x", "[]") == {}
    with pytest.raises(ValueError, match=re.escape("x must have shape [..., 4], got ()")):
        check_shape(1.0, "x", "[..., 4]")
    with pytest.raises(ValueError, match="mixed shapes"):
        check_shape([[1, 2], [3]], "x", "[N, 2]")
    # Under jit only shapes are read: no concretisation error, and the same message.
    jax.jit(lambda x: check_shape(x, "x", "[N, N]") and x)(jnp.zeros((3, 3)))
    with pytest.raises(ValueError, match=re.escape("x must have shape [N, N], got (3, 2)")):
        jax.jit(lambda x: check_shape(x, "x", "[N, N]") and x)(jnp.zeros((3, 2)))
    # A tuple of traced scalars (an image size inside a vmapped function) has shape [2].
    jax.jit(lambda h, w: check_shape((h, w), "image_hw", "[2]", dtype="real") and h)(3, 4)
