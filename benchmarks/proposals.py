"""RPN proposal generation at COCO-FPN scale: ours vs torchvision's and TensorFlow's.

Batch of 8 images, 800x1344 input, 268,569 anchors over P2..P6; pre-NMS top 2000 per level,
NMS at IoU 0.7 within each level, post-NMS top 1000 per image, min size 1e-3. Objectness
logits ~ N(0, 2^2) and deltas ~ N(0, 0.2^2), seeded; true image sizes vary per image.

- ours: ``jax.jit`` of ``jax_rpn.proposals.generate_batch`` (decode, per-level top-k, clip,
  mask small, level-aware exact greedy NMS, fixed 1000 slots per image).
- torchvision: the real ``RegionProposalNetwork`` (eval mode, top-k settings as above) on the
  path of its ``forward``: ``box_coder.decode`` of all anchors, then ``filter_proposals``
  (per-level ``topk``, sigmoid, ``clip_boxes_to_image``, ``remove_small_boxes``, score
  threshold 0, ``batched_nms`` per image, first 1000). On CPU with more than 4000
  coordinates ``batched_nms`` runs ``torchvision.ops.nms`` (C++) once per level, then sorts.
  The time spent in ``torchvision.ops.nms`` is measured by wrapping the module's ``nms``
  during the calls (the calls themselves unchanged).
- TensorFlow: a ``tf.function`` doing the same per-level top-k, decode, clip and small-box
  removal, then (a) ``tf.image.combined_non_max_suppression`` with the levels as classes
  (``max_output_size_per_class`` = ``max_total_size`` = 1000), and (b)
  ``tf.image.non_max_suppression_padded`` over the batch with each level's boxes shifted by
  a level offset (torchvision's coordinate trick). TensorFlow suppresses at IoU >= 0.7, we
  at > 0.7; with random continuous inputs no IoU equals 0.7 exactly.

Agreement: per image, our valid proposals against each peer's: same count, same set of
boxes, same order wherever the peer's scores are untied (its sigmoid probabilities round
to equal floats for close logits near 1; we rank logits), up to 1e-3 px.

Run from the repository root: ``python benchmarks/proposals.py`` (``--quick`` for fewer
repeats). Needs torch and torchvision (CPU use) and TensorFlow (the ``prepare`` extra).
"""

import argparse
import contextlib
import functools
import math
import os
import sys
import time
from pathlib import Path

if not __package__:  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from torchvision.models.detection.rpn import RegionProposalNetwork  # noqa: E402
from torchvision.ops import boxes as tv_box_ops  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.torchvision_rpn import DEVICE  # noqa: E402
from jax_rpn import proposals  # noqa: E402

PRE_NMS_TOPK, POST_NMS_TOPK, NMS_THRESHOLD, MIN_SIZE = 2000, 1000, 0.7, 1e-3
SCALE_CLAMP = math.log(1000.0 / 16)
NMS_SECONDS = [0.0]  # time torchvision spent in torchvision.ops.nms in its latest call
IMAGE_HWS = ((800, 1333), (800, 1067), (800, 1199), (751, 1333), (800, 1333), (800, 1201))


def make_inputs(batch: int, seed: int = 0):
    """Seeded per-level logits ``[B, Nl]``, deltas ``[B, Nl, 4]``, true sizes ``[B, 2]``."""
    rng = np.random.default_rng(seed)
    anchors = common.coco_fpn_anchors()
    logits = [rng.normal(0.0, 2.0, (batch, a.shape[0])).astype(np.float32) for a in anchors]
    deltas = [rng.normal(0.0, 0.2, (batch, a.shape[0], 4)).astype(np.float32) for a in anchors]
    image_hw = np.array([IMAGE_HWS[i % len(IMAGE_HWS)] for i in range(batch)], np.int32)
    return anchors, logits, deltas, image_hw


# --- torchvision ----------------------------------------------------------------------------


def torchvision_rpn() -> RegionProposalNetwork:
    """torchvision's RPN with this benchmark's proposal settings, in eval mode (no head or
    anchor generator: only its box coder and ``filter_proposals`` are called)."""
    rpn = RegionProposalNetwork(
        anchor_generator=None,
        head=None,
        fg_iou_thresh=0.7,
        bg_iou_thresh=0.3,
        batch_size_per_image=256,
        positive_fraction=0.5,
        pre_nms_top_n={"training": PRE_NMS_TOPK, "testing": PRE_NMS_TOPK},
        post_nms_top_n={"training": POST_NMS_TOPK, "testing": POST_NMS_TOPK},
        nms_thresh=NMS_THRESHOLD,
        score_thresh=0.0,
    )
    rpn.min_size = MIN_SIZE
    return rpn.eval()


@contextlib.contextmanager
def nms_timed():
    """While active, ``torchvision.ops.boxes.nms`` (what ``batched_nms`` calls) adds its wall
    time to ``NMS_SECONDS[0]``."""
    original = tv_box_ops.nms

    def timed(*args, **kwargs):
        start = time.perf_counter()
        out = original(*args, **kwargs)
        NMS_SECONDS[0] += time.perf_counter() - start
        return out

    tv_box_ops.nms = timed
    try:
        yield
    finally:
        tv_box_ops.nms = original


def torchvision_proposals(rpn, anchors, objectness, deltas, image_shapes, num_anchors_per_level):
    """``RegionProposalNetwork.forward``'s proposal path: decode all anchors, then
    ``filter_proposals``. ``anchors [N, 4]``, ``objectness [B, N]``, ``deltas [B, N, 4]``
    (levels concatenated). Returns lists over images of boxes ``[k, 4]`` and scores ``[k]``."""
    num_images = objectness.shape[0]
    proposals = rpn.box_coder.decode(deltas.reshape(-1, 4), [anchors] * num_images)
    proposals = proposals.view(num_images, -1, 4)
    with torch.no_grad():
        return rpn.filter_proposals(proposals, objectness, image_shapes, num_anchors_per_level)


# --- TensorFlow --------------------------------------------------------------------------------


def tf_proposals_fn(anchors, *, method):
    """A ``tf.function(logits list, deltas list, image_hw) -> (boxes [B, K, 4], scores
    [B, K], valid [B])``."""
    import tensorflow as tf

    anchors = [tf.constant(a) for a in anchors]
    num_levels = len(anchors)

    def decode(a, d):
        widths, heights = a[..., 2] - a[..., 0], a[..., 3] - a[..., 1]
        ctr_x, ctr_y = a[..., 0] + 0.5 * widths, a[..., 1] + 0.5 * heights
        dw = tf.minimum(d[..., 2], SCALE_CLAMP)
        dh = tf.minimum(d[..., 3], SCALE_CLAMP)
        cx, cy = d[..., 0] * widths + ctr_x, d[..., 1] * heights + ctr_y
        w, h = tf.exp(dw) * widths, tf.exp(dh) * heights
        return tf.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)

    @tf.function(jit_compile=False)
    def fn(logits, deltas, image_hw):
        hw = tf.cast(image_hw, tf.float32)  # [B, 2]
        limit = tf.stack([hw[:, 1], hw[:, 0], hw[:, 1], hw[:, 0]], axis=-1)[:, None, :]
        boxes, scores, levels = [], [], []
        for level in range(num_levels):
            k = min(PRE_NMS_TOPK, anchors[level].shape[0])
            top, idx = tf.math.top_k(logits[level], k=k)  # [B, k]
            b = decode(tf.gather(anchors[level], idx), tf.gather(deltas[level], idx, batch_dims=1))
            b = tf.clip_by_value(b, 0.0, limit)  # [B, k, 4]
            boxes.append(b)
            scores.append(tf.sigmoid(top))
            levels.append(tf.fill(tf.shape(top), level))
        boxes = tf.concat(boxes, axis=1)  # [B, M, 4]
        scores = tf.concat(scores, axis=1)  # [B, M]
        levels = tf.concat(levels, axis=1)  # [B, M]
        width, height = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
        small = (width < MIN_SIZE) | (height < MIN_SIZE)
        scores = tf.where(small, -1.0, scores)
        if method == "combined":
            per_level = tf.where(
                tf.one_hot(levels, num_levels) > 0, scores[..., None], -1.0
            )  # [B, M, L]
            out = tf.image.combined_non_max_suppression(
                boxes[:, :, None, :],
                per_level,
                max_output_size_per_class=POST_NMS_TOPK,
                max_total_size=POST_NMS_TOPK,
                iou_threshold=NMS_THRESHOLD,
                score_threshold=0.0,
                clip_boxes=False,
            )
            return out.nmsed_boxes, out.nmsed_scores, out.valid_detections
        # Coordinate trick: shift each level far away so levels never overlap.
        offset = tf.cast(levels, tf.float32)[..., None] * (tf.reduce_max(boxes) + 1.0)
        idx, valid = tf.image.non_max_suppression_padded(
            boxes + offset,
            scores,
            max_output_size=POST_NMS_TOPK,
            iou_threshold=NMS_THRESHOLD,
            score_threshold=0.0,
            pad_to_max_output_size=True,
        )
        return tf.gather(boxes, idx, batch_dims=1), tf.gather(scores, idx, batch_dims=1), valid

    return fn


# --- benchmark --------------------------------------------------------------------------------


def compare(ours_boxes, ours_valid, ref_boxes, ref_scores):
    """Images (of B) where our valid proposals equal the reference's: same number, same set of
    boxes, and the same box at every rank whose reference score is untied (scores that tie,
    e.g. sigmoids rounding to the same float, may come in either order)."""
    same_count = same_boxes = 0
    for b, v, r, s in zip(ours_boxes, ours_valid, ref_boxes, ref_scores, strict=True):
        mine = b[v]
        if mine.shape[0] != r.shape[0]:
            continue
        same_count += 1
        values, counts = np.unique(s, return_counts=True)
        untied = np.isin(s, values[counts == 1])  # [k]
        close = np.all(np.abs(mine - r) <= 1e-3, axis=1)  # [k]
        near = np.max(np.abs(mine[:, None, :] - r[None, :, :]), axis=-1) <= 1e-3  # [k, k]
        as_set = bool(np.all(near.any(axis=0)) and np.all(near.any(axis=1)))
        same_boxes += bool(as_set and np.all(close[untied]))
    return same_count, same_boxes


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="3 repeats")
    args = parser.parse_args()
    if args.quick:
        args.repeats = 3
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    torch.set_num_threads(os.cpu_count())
    print(f"machine: {common.machine()}")
    load_before = common.load_average()
    print(
        f"torchvision {torchvision.__version__} (torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads), tf {tf.__version__}"
    )
    anchors, logits, deltas, image_hw = make_inputs(args.batch)
    sizes = [a.shape[0] for a in anchors]
    print(f"batch {args.batch}, {sum(sizes)} anchors per image {sizes}")

    # Ours.
    settings = dict(
        pre_nms_topk=PRE_NMS_TOPK,
        post_nms_topk=POST_NMS_TOPK,
        nms_threshold=NMS_THRESHOLD,
        min_size=MIN_SIZE,
    )
    ours_fn = jax.jit(functools.partial(proposals.generate_batch, **settings))
    args_j = (
        [jnp.asarray(a) for a in anchors],
        [jnp.asarray(o) for o in logits],
        [jnp.asarray(d) for d in deltas],
        jnp.asarray(image_hw),
    )
    calls = {"ours": functools.partial(ours_fn, *args_j)}

    # torchvision.
    rpn = torchvision_rpn()
    anchors_t = torch.from_numpy(np.concatenate(anchors)).to(DEVICE)
    obj_t = torch.from_numpy(np.concatenate(logits, axis=1)).to(DEVICE)
    deltas_t = torch.from_numpy(np.concatenate(deltas, axis=1)).to(DEVICE)
    shapes = [tuple(int(v) for v in hw) for hw in image_hw]
    tv_samples = []  # (seconds, of which NMS) per call

    def tv_call():
        NMS_SECONDS[0] = 0.0
        start = time.perf_counter()
        with nms_timed():
            out = torchvision_proposals(rpn, anchors_t, obj_t, deltas_t, shapes, sizes)
        tv_samples.append((time.perf_counter() - start, NMS_SECONDS[0]))
        return out

    calls["torchvision"] = tv_call

    # TensorFlow.
    tf_args = ([tf.constant(o) for o in logits], [tf.constant(d) for d in deltas])
    tf_args += (tf.constant(image_hw),)
    for method in ("combined", "padded"):
        calls[f"tf {method}"] = functools.partial(tf_proposals_fn(anchors, method=method), *tf_args)

    # Timed in turn, round after round.
    times = common.time_interleaved(calls, repeats=args.repeats, warmup=1)
    timed = sorted(tv_samples[1:])  # warm-up call excluded
    tv_s, tv_nms_s = timed[(len(timed) - 1) // 2]  # the median call and its NMS time

    out = calls["ours"]()
    ours_boxes, ours_valid = np.asarray(out.boxes), np.asarray(out.valid)
    ours_s = times["ours"]["median"]
    tv_boxes, tv_scores = calls["torchvision"]()
    count, same = compare(
        ours_boxes,
        ours_valid,
        [b.cpu().numpy() for b in tv_boxes],
        [s.cpu().numpy() for s in tv_scores],
    )
    cpu = {name: t["cpu_median"] * 1e3 for name, t in times.items()}
    rows = [["ours (jax.jit)", ours_s * 1e3, 1.0, cpu["ours"], "-", "-"]]
    rows.append(
        ["torchvision", tv_s * 1e3, tv_s / ours_s, cpu["torchvision"]]
        + [f"{count}/{args.batch}", f"{same}/{args.batch}"]
    )
    rest = tv_s - tv_nms_s
    rows.append(["torchvision without its ops.nms", rest * 1e3, rest / ours_s, "-", "-", "-"])
    for method, name in (
        ("combined", "TF combined_non_max_suppression"),
        ("padded", "TF non_max_suppression_padded"),
    ):
        boxes, scores, valid = calls[f"tf {method}"]()
        valid = valid.numpy()
        kept = [b[:v] for b, v in zip(boxes.numpy(), valid, strict=True)]
        kept_scores = [s[:v] for s, v in zip(scores.numpy(), valid, strict=True)]
        count, same = compare(ours_boxes, ours_valid, kept, kept_scores)
        t = times[f"tf {method}"]["median"]
        rows.append(
            [name, t * 1e3, t / ours_s, cpu[f"tf {method}"]]
            + [f"{count}/{args.batch}", f"{same}/{args.batch}"]
        )

    print(
        f"\nProposals, batch of {args.batch}: pre-NMS {PRE_NMS_TOPK}/level, NMS "
        f"{NMS_THRESHOLD}, post-NMS {POST_NMS_TOPK}; median wall ms and process CPU ms"
    )
    print(
        common.table(
            ["implementation", "ms", "time / ours", "CPU ms", "images with our count"]
            + ["images with our boxes"],
            rows,
        )
    )
    print(f"ours: {ours_valid.sum(1).tolist()} valid proposals per image")
    print(f"{common.load_average()} (before: {load_before})")


if __name__ == "__main__":
    main()
