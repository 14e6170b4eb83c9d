"""Tests for jax_rpn.recall: hand-computed cases and a cross-check against pycocotools."""

import contextlib
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from jax_rpn import recall

_recall_stats = jax.jit(recall.recall_stats)


def _stats(boxes, scores, gt_boxes, *, valid=None, gt_valid=None, gt_ignore=None, pad=4):
    """Jitted ``recall_stats``, inputs padded to ``pad`` slots (one compile; invalid padding
    proposals get the highest score, so every such test also checks they are skipped)."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    gt_boxes = np.asarray(gt_boxes, np.float32).reshape(-1, 4)
    valid = np.ones(len(boxes), bool) if valid is None else np.asarray(valid)
    gt_valid = np.ones(len(gt_boxes), bool) if gt_valid is None else np.asarray(gt_valid)
    gt_ignore = np.zeros(len(gt_boxes), bool) if gt_ignore is None else np.asarray(gt_ignore)
    k, g = max(pad, len(boxes)), max(pad, len(gt_boxes))
    padded = [np.zeros((n, *x.shape[1:]), x.dtype) for n, x in ((k, boxes), (g, gt_boxes))]
    padded[0][: len(boxes)], padded[1][: len(gt_boxes)] = boxes, gt_boxes
    return _recall_stats(
        padded[0],
        np.pad(np.asarray(scores, np.float32), (0, k - len(boxes)), constant_values=9.0),
        np.pad(valid, (0, k - len(boxes))),
        padded[1],
        np.pad(gt_valid, (0, g - len(gt_boxes))),
        np.pad(gt_ignore, (0, g - len(gt_boxes))),
    )


def _result(stats, **kwargs):
    acc = recall.RecallAccumulator(**kwargs)
    acc.update(stats)
    return acc.result()


def test_one_gt_iou_058():
    # Proposal [0,0,10,5.8] vs GT [0,0,10,10]: IoU = 58/100 = 0.58, so it passes thresholds
    # 0.50 and 0.55 only: recall@0.5 = 1, recall@0.7 = 0, AR = 2/10.
    r = _result(_stats([[0, 0, 10, 5.8]], [0.9], [[0, 0, 10, 10]]))
    assert r["recall@0.5@100"] == 1.0
    assert r["recall@0.7@100"] == 0.0
    assert r["AR@100"] == pytest.approx(0.2)
    assert r["AR@1000"] == pytest.approx(0.2)  # more counts than proposals: all of them
    assert r["AR_small@100"] == pytest.approx(0.2)  # area 100 <= 32^2
    assert r["AR_medium@100"] == -1.0 and r["AR_large@100"] == -1.0  # no GT there (COCO: -1)
    assert (r["num_gt"], r["num_gt_small"], r["num_gt_medium"]) == (1, 1, 0)
    assert r["num_images"] == 1 and r["proposals_per_image"] == 1.0


def test_recall_by_number_of_proposals():
    # Ranked by score: p0 hits GT A exactly, p1 misses everything, p2 hits GT B exactly.
    gt = [[0, 0, 20, 20], [50, 50, 80, 90]]
    props = [[100, 100, 120, 120], [50, 50, 80, 90], [0, 0, 20, 20]]  # slots in any order
    stats = _stats(props, [0.5, 0.2, 0.9], gt)  # scores rank: slot 2, slot 0, slot 1
    np.testing.assert_array_equal(stats.matches[0, :, :3], [[1, 0, 1]] * 10)
    r = _result(stats, counts=(1, 2, 3))
    assert (r["AR@1"], r["AR@2"], r["AR@3"]) == (0.5, 0.5, 1.0)


def test_coco_greedy_not_detectron2_greedy():
    # p0 (higher score) overlaps B best; p1 is B itself and overlaps A at 8/12 = 0.667.
    # COCOeval at t=0.7: p0 takes B (its best), p1 has only A left at IoU < 0.7 -> recall 1/2.
    # detectron2's max-overlap-pair greedy would pair (p1, B) first, then (p0, A): recall 1.
    a = np.array([0, 0, 10, 10], np.float32)
    b = np.array([2, 0, 12, 10], np.float32)
    p0 = np.array([1.5, 0, 11.5, 10], np.float32)  # IoU(p0, A) = 8.5/11.5, IoU(p0, B) = 9.5/10.5
    p1 = np.array([2, 0, 12, 10], np.float32)  # IoU(p1, B) = 1, IoU(p1, A) = 8/12
    r = _result(_stats([p0, p1], [0.9, 0.8], [a, b]))
    assert r["recall@0.5@100"] == 1.0  # p1 matches A at 0.667 >= 0.5
    assert r["recall@0.7@100"] == 0.5


def test_ignored_and_padded_gt_not_counted():
    gt = [[0, 0, 10, 10], [0, 0, 20, 20], [30, 30, 40, 40], [60, 60, 70, 70]]
    gt_valid = [True, True, True, False]  # slot 3 is padding
    gt_ignore = np.array([False, True, False, False])  # slot 1 is crowd / difficult
    # p0: IoU 1 with the ignored box, 0.25 with GT 0; p1 is exactly the padding box;
    # p2: IoU 0.62 with GT 0, 0.155 with the ignored box. As in COCOeval, the ignored box
    # never takes a proposal from a counted one: p2 still matches GT 0.
    props = [[0, 0, 20, 20], [60, 60, 70, 70], [0, 0, 10, 6.2]]
    r = _result(_stats(props, [0.9, 0.8, 0.7], gt, gt_valid=gt_valid, gt_ignore=gt_ignore))
    assert r["num_gt"] == 2
    assert r["recall@0.5@100"] == 0.5  # GT 0 found, GT 2 not
    assert r["AR@100"] == pytest.approx(0.5 * 3 / 10)  # IoU 0.62 passes .50, .55, .60


def test_invalid_proposals_do_not_count():
    gt = [[0, 0, 10, 10]]
    # Slot 0 is invalid (highest score, a perfect box); slot 1 valid, IoU 0.58.
    props = [[0, 0, 10, 10], [0, 0, 10, 5.8]]
    stats = _stats(props, [0.9, 0.1], gt, valid=[False, True])
    assert int(stats.num_proposals) == 1
    r = _result(stats, counts=(1,))
    assert r["AR@1"] == pytest.approx(0.2)  # the valid proposal is rank 0


def test_area_ranges_inclusive_bounds():
    # COCOeval bounds are inclusive: a 32x32 box is both small and medium.
    gt = [[0, 0, 32, 32], [0, 0, 100, 100], [0, 0, 8, 8]]
    r = _result(_stats(gt[:2], [0.9, 0.8], gt))
    assert (r["num_gt"], r["num_gt_small"], r["num_gt_medium"], r["num_gt_large"]) == (3, 2, 1, 1)
    assert r["AR_small@100"] == 0.5 and r["AR_medium@100"] == 1.0 and r["AR_large@100"] == 1.0
    assert r["AR@100"] == pytest.approx(2 / 3)


def test_no_counted_gt():
    r = _result(_stats([[0, 0, 5, 5]], [1.0], [[0, 0, 5, 5]], gt_valid=[False]))
    assert r["AR@100"] == -1.0 and r["num_gt"] == 0
    stats = recall.recall_stats(
        np.zeros((1, 4)), np.ones(1), np.ones(1, bool), np.zeros((0, 4)), np.zeros(0, bool)
    )
    assert stats.matches.shape == (4, 10, 1) and int(stats.matches.sum()) == 0


def _random_image(rng, *, num_gt, num_props, size=320):
    """GT of all sizes, proposals jittered around them plus random ones; xyxy float32."""
    wh = np.exp(rng.uniform(np.log(6), np.log(200), (num_gt, 2)))
    xy = rng.uniform(0, size - wh)
    gt = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    src = gt[rng.integers(0, num_gt, num_props)]
    src_wh = src[:, 2:] - src[:, :2]
    jitter = rng.normal(0, 1, (num_props, 4)) * rng.uniform(0.1, 0.6, (num_props, 1))
    props = src + jitter * np.concatenate([src_wh, src_wh], 1)
    rand = rng.integers(0, num_props, num_props // 3)  # some background proposals
    rxy = rng.uniform(0, size - 40, (len(rand), 2))
    props[rand] = np.concatenate([rxy, rxy + rng.uniform(5, 40, (len(rand), 2))], 1)
    props = np.concatenate([props[:, :2], np.maximum(props[:, 2:], props[:, :2] + 1)], 1)
    return gt, props.astype(np.float32), rng.permutation(num_props).astype(np.float32)


def _iou64(a, b):
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), -1)
    area = lambda x: np.prod(x[:, 2:] - x[:, :2], -1)  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None] - inter)


def test_matches_pycocotools_cocoeval():
    """Recall for every IoU threshold, area range and maxDet equals COCOeval(useCats=0)."""
    rng = np.random.default_rng(0)
    num_images, g, k = 3, 22, 1100
    ev_thresholds = np.linspace(0.5, 0.95, 10)  # COCOeval's
    images, per_image, anns, dets = [], [], [], []
    for i in range(num_images):
        gt, props, scores = _random_image(rng, num_gt=g - 2, num_props=k)
        crowd = rng.random(g - 2) < 0.2
        valid = rng.random(k) > 0.05  # invalid slots anywhere; COCO never sees them
        # float32 IoU vs COCO's float64: keep clear of the thresholds so both agree exactly.
        overlaps = _iou64(props.astype(np.float64), gt.astype(np.float64))  # [K, G]
        assert np.min(np.abs(overlaps[..., None] - ev_thresholds)) > 1e-6
        for j, box in enumerate(gt.astype(np.float64)):
            w, h = (box[2:] - box[:2]).tolist()
            anns.append(
                dict(
                    id=len(anns) + 1,  # COCOeval treats id 0 as "no match"
                    image_id=i + 1,
                    category_id=1,
                    bbox=[float(box[0]), float(box[1]), w, h],
                    area=w * h,
                    iscrowd=int(crowd[j]),
                )
            )
        for box, s in zip(props[valid].astype(np.float64), scores[valid], strict=True):
            w, h = (box[2:] - box[:2]).tolist()
            dets.append(
                dict(
                    image_id=i + 1,
                    category_id=1,
                    bbox=[float(box[0]), float(box[1]), w, h],
                    score=float(s),
                )
            )
        images.append(dict(id=i + 1, width=320, height=320))
        pad = np.zeros((2, 4), np.float32)  # two padding slots
        per_image.append(
            (
                props,
                scores,
                valid,
                np.concatenate([gt, pad]),
                np.arange(g) < g - 2,
                np.concatenate([crowd, [False, False]]),
            )
        )

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = dict(images=images, annotations=anns, categories=[dict(id=1)])
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(dets)
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.params.useCats = 0
        ev.params.maxDets = [100, 300, 1000]
        ev.evaluate()
        ev.accumulate()
    expected = ev.eval["recall"][:, 0]  # [T, A, M]

    batch = [np.stack(x) for x in zip(*per_image, strict=True)]
    stats = jax.jit(jax.vmap(recall.recall_stats))(*batch)
    acc = recall.RecallAccumulator()
    acc.update(stats)
    curve = acc.recall()  # [R, T, K]
    got = np.stack([curve[..., c - 1] for c in (100, 300, 1000)], -1)  # [R, T, M]
    np.testing.assert_allclose(got, expected.transpose(1, 0, 2), atol=1e-6)
    # Recall must be non-trivial for the check to mean anything.
    ar100, ar1000 = expected[:, 0, 0].mean(), expected[:, 0, 2].mean()
    assert 0.2 < ar100 < 0.8 and ar1000 > ar100 + 0.1 and expected[0, 0, 0] < 1

    r = acc.result()
    for m, c in enumerate((100, 300, 1000)):
        assert r[f"AR@{c}"] == pytest.approx(expected[:, 0, m].mean(), abs=1e-6)
        assert r[f"AR_small@{c}"] == pytest.approx(expected[:, 1, m].mean(), abs=1e-6)
        assert r[f"AR_large@{c}"] == pytest.approx(expected[:, 3, m].mean(), abs=1e-6)
        assert r[f"recall@0.7@{c}"] == pytest.approx(expected[4, 0, m], abs=1e-6)
    # COCOeval's summary line "AR @[ IoU=0.50:0.95 | area=all | maxDets=1000 ]".
    with contextlib.redirect_stdout(io.StringIO()):
        ev.summarize()
    assert r["AR@1000"] == pytest.approx(ev.stats[8], abs=1e-6)


def test_jit_vmap_and_summed_updates_agree():
    rng = np.random.default_rng(1)
    per_image = []
    for _ in range(2):
        gt, props, scores = _random_image(rng, num_gt=5, num_props=60, size=200)
        gt = np.concatenate([gt, np.zeros((1, 4), np.float32)])
        per_image.append(
            (props, scores, np.ones(60, bool), gt, np.arange(6) < 5, np.zeros(6, bool))
        )
    single = [jax.jit(recall.recall_stats)(*x) for x in per_image]
    batch = [np.stack(x) for x in zip(*per_image, strict=True)]
    batched = jax.jit(jax.vmap(recall.recall_stats))(*batch)
    for i, s in enumerate(single):
        for a, b in zip(s, batched, strict=True):
            np.testing.assert_array_equal(a, b[i])

    counts = dict(counts=(1, 10, 60))
    acc_images, acc_batch, acc_sum = (recall.RecallAccumulator(**counts) for _ in range(3))
    for s in single:
        acc_images.update(s)
    acc_batch.update(batched)
    acc_sum.update(jax.tree.map(lambda x: jnp.sum(x, 0), batched))  # summed on device
    assert acc_images.result() == acc_batch.result() == acc_sum.result()
    assert acc_batch.result()["num_images"] == 2


def test_inside_shard_map():
    # Per-device eval step: vmap over the local batch, psum the record. The scan's carry must
    # not be a constant there (shard_map's check_vma would reject the loop).
    rng = np.random.default_rng(4)
    per_image = []
    for _ in range(4):
        gt, props, scores = _random_image(rng, num_gt=3, num_props=20, size=200)
        per_image.append((props, scores, np.ones(20, bool), gt, np.ones(3, bool)))
    batch = [np.stack(x) for x in zip(*per_image, strict=True)]
    mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))

    def per_device(*args):
        stats = jax.vmap(recall.recall_stats)(*args)
        return jax.tree.map(lambda x: jax.lax.psum(jnp.sum(x, 0), "data"), stats)

    spec = jax.sharding.PartitionSpec("data")
    replicated = jax.sharding.PartitionSpec()
    sharded = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=spec, out_specs=replicated))
    got = sharded(*batch)
    want = jax.jit(
        lambda *a: jax.tree.map(lambda x: jnp.sum(x, 0), jax.vmap(recall.recall_stats)(*a))
    )(*batch)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)


def test_curves():
    rng = np.random.default_rng(2)
    gt, props, scores = _random_image(rng, num_gt=6, num_props=300, size=200)
    acc = recall.RecallAccumulator()
    acc.update(_stats(props, scores, gt))
    c = acc.curves(num_points=20)
    nums = c["num_proposals"]
    assert nums[0] == 1 and nums[-1] == 300 and np.all(np.diff(nums) > 0)
    for name in ("recall@0.5", "recall@0.7", "AR"):
        assert c["recall_vs_num"][name].shape == nums.shape
        assert np.all(np.diff(c["recall_vs_num"][name]) >= 0)  # more proposals, more recall
    r = acc.result()
    assert c["recall_vs_num"]["AR"][-1] == pytest.approx(r["AR@300"])
    assert c["recall_vs_num"]["recall@0.5"][-1] == r["recall@0.5@1000"]
    for count, curve in c["recall_vs_iou"].items():
        assert curve.shape == (10,) and np.all(np.diff(curve) <= 0)
        assert curve.mean() == pytest.approx(r[f"AR@{count}"])


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"scores must have shape \[K\] with K = 3"):
        recall.recall_stats(
            jnp.zeros((3, 4)), jnp.zeros(2), jnp.ones(3, bool), jnp.zeros((1, 4)), jnp.ones(1, bool)
        )
    with pytest.raises(ValueError, match=r"gt_valid must have shape \[G\] with G = 1"):
        recall.recall_stats(
            jnp.zeros((3, 4)), jnp.zeros(3), jnp.ones(3, bool), jnp.zeros((1, 4)), jnp.ones(2, bool)
        )
    with pytest.raises(ValueError, match="iou_thresholds"):
        recall.RecallAccumulator(iou_thresholds=(0.5, 1.5))
    with pytest.raises(ValueError, match="recall_ious"):
        recall.RecallAccumulator(iou_thresholds=(0.5, 0.75), recall_ious=(0.7,))
    with pytest.raises(ValueError, match="before any update"):
        recall.RecallAccumulator().result()
    acc = recall.RecallAccumulator()
    acc.update(_stats([[0, 0, 1, 1]], [1.0], [[0, 0, 1, 1]]))
    with pytest.raises(ValueError, match="K = 5"):
        acc.update(_stats([[0, 0, 1, 1]] * 5, np.ones(5), [[0, 0, 1, 1]]))
