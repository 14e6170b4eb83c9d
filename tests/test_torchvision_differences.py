"""Where "the same numbers" as torchvision stops (docs/same_numbers.md), pinned both ways.

Each test runs the real torchvision (installed with the test extra; never skipped) on a
hand-made input and shows its value next to ours, so a change on either side shows up here:

* NMS at an IoU exactly equal to the threshold (torchvision compares a float32 IoU with a
  double threshold; we round the threshold to float32);
* the IoU of two empty boxes (torchvision 0 / 0 = NaN; ours 0);
* a ground-truth box overlapping no anchor (torchvision's low-quality rule marks every anchor
  positive; ours none);
* proposals ranked by the float32 sigmoid (torchvision; saturated scores tie) or by the logit
  (ours).
"""

import functools

import jax
import numpy as np
import pytest
import torch
import torchvision
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead

from jax_rpn import anchors, boxes, matching, nms, proposals


def _rpn(*, post_nms_top_n=1):
    """A torchvision RPN (eval mode) for its target assignment and proposal filtering; the
    anchor generator and head are required by the constructor but not used by those methods."""
    rpn = RegionProposalNetwork(
        AnchorGenerator(),
        RPNHead(1, 1),
        fg_iou_thresh=0.7,
        bg_iou_thresh=0.3,
        batch_size_per_image=256,
        positive_fraction=0.5,
        pre_nms_top_n={"training": 1, "testing": 1},
        post_nms_top_n={"training": post_nms_top_n, "testing": post_nms_top_n},
        nms_thresh=0.7,
    )
    return rpn.eval()


@pytest.mark.parametrize(
    ("height", "threshold", "torchvision_keeps", "ours_keeps"),
    [
        # IoU 60/100 rounds to float32 0.6000000238 = float32(0.6) > 0.6: torchvision's double
        # comparison suppresses the box, ours (float32 threshold) keeps it.
        (6.0, 0.6, [0], [0, 1]),
        # float32(0.7) = 0.6999999881 < 0.7 and float32(0.5) = 0.5: no float32 IoU lies
        # between the two thresholds, so both agree at these.
        (7.0, 0.7, [0, 1], [0, 1]),
        (5.0, 0.5, [0, 1], [0, 1]),
    ],
)
def test_nms_at_an_iou_exactly_equal_to_the_threshold(
    height, threshold, torchvision_keeps, ours_keeps
):
    b = np.array([[0, 0, 10, 10], [0, 0, 10, height]], np.float32)  # IoU = 10 * height / 100
    s = np.array([0.9, 0.8], np.float32)
    tv_iou = torchvision.ops.box_iou(torch.from_numpy(b), torch.from_numpy(b))[0, 1].item()
    our_iou = float(jax.jit(boxes.pairwise_iou)(b, b)[0, 1])
    assert tv_iou == our_iou == float(np.float32(threshold))  # the same float32 IoU
    tv = torchvision.ops.nms(torch.from_numpy(b), torch.from_numpy(s), threshold)
    assert tv.tolist() == torchvision_keeps
    idx, count = nms.nms(b, s, iou_threshold=threshold, max_output=2)
    assert idx[: int(count)].tolist() == ours_keeps


def test_iou_of_two_empty_boxes_is_nan_in_torchvision_and_zero_here():
    b = np.array([[0, 0, 0, 0], [5, 5, 5, 9]], np.float32)  # a point and a vertical segment
    tv = torchvision.ops.box_iou(torch.from_numpy(b), torch.from_numpy(b)).numpy()
    assert np.isnan(tv).all()  # 0 / 0 for every pair of empty boxes
    ours = np.asarray(jax.jit(boxes.pairwise_iou)(b, b))
    np.testing.assert_array_equal(ours, np.zeros((2, 2), np.float32))
    # With one non-empty box the union is positive and both give 0.
    full = np.array([[0, 0, 4, 4]], np.float32)
    assert torchvision.ops.box_iou(torch.from_numpy(b), torch.from_numpy(full)).sum() == 0
    assert np.asarray(boxes.pairwise_iou(b, full)).sum() == 0


def test_gt_overlapping_no_anchor_makes_every_anchor_positive_in_torchvision_only():
    a = anchors.grid_anchors((4, 4), 8, anchors.cell_anchors((16,), (1.0,)))  # [16, 4]
    # GT 0 sits among the anchors (best IoU 144/256 < 0.7: low-quality matches only); GT 1 is
    # outside the 32x32 grid, overlapping no anchor: its best IoU is 0.
    gt = np.array([[2, 2, 14, 14], [100, 100, 110, 110]], np.float32)
    tv_labels, tv_matched = _rpn().assign_targets_to_anchors(
        [torch.from_numpy(a)], [{"boxes": torch.from_numpy(gt)}]
    )
    # torchvision: every anchor has IoU 0 = GT 1's best, so every anchor is a "low-quality
    # match" and positive, regressing towards its argmax GT (GT 0, the first of the 0 ties).
    assert tv_labels[0].tolist() == [1.0] * 16
    assert (tv_matched[0] == torch.from_numpy(gt[0])).all()
    match = jax.jit(functools.partial(matching.match, high=0.7, low=0.3, allow_low_quality=True))
    _, labels = match(a, gt, np.ones(2, bool))
    # Ours: GT 1 makes no low-quality match. GT 0 (12x12 centred at (8, 8)) has one best
    # anchor, the 16x16 one centred at (8, 8) (row 1, column 1: index 5; IoU 144/256 = 0.5625,
    # positive by the low-quality rule); every other anchor overlaps it by at most
    # 72/328 < 0.3: negative.
    assert np.asarray(labels).tolist() == [1 if i == 5 else 0 for i in range(16)]


def test_saturated_scores_tie_in_torchvision_and_rank_by_logit_here():
    # One proposal per level (deltas 0, so the anchors are the proposals), logits 20 and 30:
    # float32 sigmoid gives 1.0 for both.
    level_boxes = [np.array([[0, 0, 10, 10]], np.float32), np.array([[30, 30, 50, 50]], np.float32)]
    logits = [np.array([20.0], np.float32), np.array([30.0], np.float32)]
    assert torch.sigmoid(torch.tensor([20.0, 30.0])).tolist() == [1.0, 1.0]
    tv_boxes, tv_scores = _rpn(post_nms_top_n=1).filter_proposals(
        torch.from_numpy(np.concatenate(level_boxes))[None],
        torch.from_numpy(np.concatenate(logits))[:, None],
        [(64, 64)],
        [1, 1],
    )
    # torchvision keeps the first of the tied boxes in its candidate order: level 0, logit 20.
    assert tv_boxes[0].tolist() == [[0, 0, 10, 10]] and tv_scores[0].tolist() == [1.0]
    generate = jax.jit(
        functools.partial(
            proposals.generate,
            pre_nms_topk=1,
            post_nms_topk=1,
            nms_threshold=0.7,
            min_size=0.0,
        )
    )
    deltas = [np.zeros((1, 4), np.float32)] * 2
    ours = generate(level_boxes, logits, deltas, np.array([64, 64]))
    # Ours ranks by the logit: the level-1 box (logit 30) is the one proposal kept.
    assert np.asarray(ours.boxes).tolist() == [[30, 30, 50, 50]]
    assert np.asarray(ours.scores).tolist() == [30.0]
    # With room for both, the sets agree; only the order of the tied boxes differs.
    tv_boxes, _ = _rpn(post_nms_top_n=2).filter_proposals(
        torch.from_numpy(np.concatenate(level_boxes))[None],
        torch.from_numpy(np.concatenate(logits))[:, None],
        [(64, 64)],
        [1, 1],
    )
    ours = jax.jit(
        functools.partial(
            proposals.generate, pre_nms_topk=1, post_nms_topk=2, nms_threshold=0.7, min_size=0.0
        )
    )(level_boxes, logits, deltas, np.array([64, 64]))
    assert tv_boxes[0].tolist() == [[0, 0, 10, 10], [30, 30, 50, 50]]
    assert np.asarray(ours.boxes).tolist() == [[30, 30, 50, 50], [0, 0, 10, 10]]
