"""IoU matcher: each anchor gets its best ground-truth box and a label in {1, 0, -1}.

Semantics of detectron2's ``Matcher(thresholds=[low, high], labels=[0, -1, 1])`` and
torchvision's ``Matcher``: an anchor whose best IoU is ``>= high`` is positive (1), ``< low``
negative (0), in ``[low, high)`` ignored (-1). With ``allow_low_quality=True`` every anchor
whose IoU with some ground truth equals that ground truth's best IoU over all anchors (ties
included) is also positive (Faster R-CNN Sec. 3.1.2, case i). ``matched_gt`` is the argmax
over ground truth (first index on ties), also for low-quality positives, as in both peers.

Where we differ from the peers, deliberately:

- A ground truth whose best IoU is 0 (it overlaps no anchor) creates no low-quality match.
  detectron2 and torchvision would mark every anchor with IoU 0 as positive for it.
- Padded (``gt_valid`` False), zero-area or non-finite ground truth never matches anything;
  the peers expect such boxes to be filtered out beforehand.
- With ``border`` set, anchors straddling the image by more than ``border`` pixels are removed
  before matching and labelled -1, as py-faster-rcnn's ``allowed_border`` (they take no part
  in the low-quality rule). detectron2's legacy ``BOUNDARY_THRESH`` instead matches them first
  and ignores them afterwards, which can leave a ground truth with no positive anchor.
- Ignored ground truth (``gt_ignore``: COCO crowd, VOC difficult) is dropped from matching, as
  detectron2 drops crowd boxes from its training targets. Optionally (``ignore_iof``) a
  background anchor lying mostly inside an ignored box becomes -1: intersection over the
  anchor's area ``>= ignore_iof``, as mmdetection's ``ignore_iof_thr``.

Memory and speed: the IoU matrix is never built whole. Matching scans over chunks of anchors
(small enough to stay in cache) against all ground truth, so each anchor's best IoU and its
argmax are final within its chunk. A ground truth's best IoU over all anchors is only known
after the scan; each chunk therefore records, as bits, which of its anchors attain the chunk's
best IoU for each ground truth, and an anchor is a low-quality match iff it has such a bit for
a ground truth whose chunk best equals its overall best. Every IoU is evaluated once, so the
exact tie test never compares values rounded by two different computations. The result does
not depend on the chunk size. All boxes are ``[x1, y1, x2, y2]`` in absolute pixels.
"""

import jax
import jax.numpy as jnp
from jax import lax

from jax_rpn import boxes as box_ops

# Auto chunking: about this many IoU values ([chunk, G] floats, 1 MiB) per scan step, so a
# chunk and its reductions stay in cache; measured fastest on XLA CPU (benchmarks/targets.py).
_CHUNK_ELEMENTS = 1 << 18
_MIN_CHUNK, _MAX_CHUNK = 256, 8192


def check_thresholds(high: float, low: float) -> None:
    """Raise ValueError unless ``0 <= low <= high <= 1``."""
    for name, value in (("high", high), ("low", low)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be an IoU threshold in [0, 1], got {value}")
    if low > high:
        raise ValueError(f"low must be <= high, got low={low}, high={high}")


def _check_inputs(anchors, gt_boxes, gt_valid, gt_ignore):
    if anchors.ndim != 2 or anchors.shape[-1] != 4:
        raise ValueError(f"anchors must have shape [N, 4], got {anchors.shape}")
    if gt_boxes.ndim != 2 or gt_boxes.shape[-1] != 4:
        raise ValueError(f"gt_boxes must have shape [G, 4], got {gt_boxes.shape}")
    num_gt = gt_boxes.shape[0]
    if gt_valid.shape != (num_gt,):
        raise ValueError(f"gt_valid must have shape [G] = ({num_gt},), got {gt_valid.shape}")
    if gt_ignore is not None and gt_ignore.shape != (num_gt,):
        raise ValueError(f"gt_ignore must have shape [G] = ({num_gt},), got {gt_ignore.shape}")
    box_ops.check_boxes(anchors, name="anchors")


def auto_anchor_chunk(num_anchors: int, num_gt: int) -> int:
    """Anchor chunk size used when ``anchor_chunk=None``: a power of two near
    ``_CHUNK_ELEMENTS / G`` (G rounded up to 32), at most N rounded up to a multiple of 8."""
    words = -(-max(num_gt, 1) // 32)
    chunk = _CHUNK_ELEMENTS // (32 * words)
    chunk = 1 << (max(chunk, 1).bit_length() - 1)  # power of two
    chunk = min(max(chunk, _MIN_CHUNK), _MAX_CHUNK)
    return int(min(chunk, -(-max(num_anchors, 1) // 8) * 8))


def inside_image(anchors: jax.Array, image_hw, border: float) -> jax.Array:
    """Bool ``[N]``: xyxy ``anchors [N, 4]`` inside an ``image_hw = (h, w)`` image up to ``border``.

    py-faster-rcnn / detectron2 rule: ``x1 >= -border``, ``y1 >= -border``,
    ``x2 < w + border``, ``y2 < h + border``. ``image_hw`` may be a traced ``[2]`` array.
    """
    h = jnp.asarray(image_hw[0], jnp.float32)
    w = jnp.asarray(image_hw[1], jnp.float32)
    return (
        (anchors[:, 0] >= -border)
        & (anchors[:, 1] >= -border)
        & (anchors[:, 2] < w + border)
        & (anchors[:, 3] < h + border)
    )


def _pack_bits(flags):
    """bool ``[..., 32 W]`` -> uint32 ``[..., W]``; bit j of word w is ``flags[..., 32 w + j]``."""
    words = flags.reshape(*flags.shape[:-1], -1, 32).astype(jnp.uint32)
    return jnp.sum(words << jnp.arange(32, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32)


def _scan_chunks(anchors, inside, gt_boxes, gt_use, gt_ign, chunk, with_ignore):
    """Per-anchor best IoU, argmax, low-quality flag and best ignored IoF (module doc)."""
    num_anchors, num_gt = anchors.shape[0], gt_boxes.shape[0]
    num_chunks = -(-num_anchors // chunk)
    pad_n = num_chunks * chunk - num_anchors
    width = 32 * -(-num_gt // 32)  # G rounded up to whole 32-bit words
    pad_g = width - num_gt
    # Padded anchors are outside and padded ground truth unusable: IoU -1 wherever they meet.
    anchors = jnp.pad(anchors, ((0, pad_n), (0, 0))).reshape(num_chunks, chunk, 4)
    inside = jnp.pad(inside, (0, pad_n)).reshape(num_chunks, chunk)
    gt_boxes = jnp.pad(gt_boxes, ((0, pad_g), (0, 0)))  # [Gw, 4]
    gt_use = jnp.pad(gt_use, (0, pad_g))
    gt_ign = jnp.pad(gt_ign, (0, pad_g))
    g_area = box_ops.area(gt_boxes)  # [Gw]
    cols = jnp.arange(width, dtype=jnp.int32)

    def step(_, xs):
        a, a_inside = xs  # [C, 4], [C]
        raw = box_ops.pairwise_iou(a, gt_boxes)  # [C, Gw]
        usable = a_inside[:, None] & gt_use[None, :]
        # Materialised once: every reduction below reads the same bits (a recomputed IoU in
        # another fusion may round differently and break the exact tie test).
        iou = lax.optimization_barrier(jnp.where(usable, raw, -1.0))  # [C, Gw]
        best = jnp.max(iou, axis=1)  # [C]
        # First index attaining the max (argmax's tie rule, and faster than argmax on CPU).
        arg = jnp.min(jnp.where(iou == best[:, None], cols, width), axis=1)  # [C]
        chunk_best = jnp.max(iou, axis=0)  # [Gw]
        ties = _pack_bits(iou == chunk_best[None, :])  # [C, W]
        if with_ignore:
            # Intersection from IoU: inter = iou * (a1 + a2) / (1 + iou).
            a_area = box_ops.area(a)  # [C]
            inter = raw * (a_area[:, None] + g_area[None, :]) / (1.0 + raw)  # [C, Gw]
            safe_area = jnp.where(a_area > 0, a_area, 1.0)[:, None]
            iof = jnp.where(gt_ign[None, :] & (a_area[:, None] > 0), inter / safe_area, 0.0)
            ign_iof = jnp.max(iof, axis=1)  # [C]
        else:
            ign_iof = jnp.zeros_like(best)
        return None, (best, arg, chunk_best, ties, ign_iof)

    _, (best, arg, chunk_best, ties, ign_iof) = lax.scan(step, None, (anchors, inside))
    # chunk_best [K, Gw], ties [K, C, W]. A ground truth's overall best, and the chunks that
    # reach it; an anchor tied at its chunk's best there is tied at the overall best.
    gt_best = jnp.max(chunk_best, axis=0)  # [Gw]
    reached = _pack_bits((chunk_best == gt_best[None, :]) & (gt_best[None, :] > 0.0))  # [K, W]
    low_quality = jnp.any((ties & reached[:, None, :]) != 0, axis=-1)  # [K, C]

    def flat(x):
        return x.reshape(-1)[:num_anchors]  # [N]

    return flat(best), flat(arg), flat(low_quality), flat(ign_iof)


def match(
    anchors: jax.Array,
    gt_boxes: jax.Array,
    gt_valid: jax.Array,
    *,
    high: float = 0.7,
    low: float = 0.3,
    allow_low_quality: bool = True,
    gt_ignore: jax.Array | None = None,
    ignore_iof: float | None = None,
    image_hw=None,
    border: float | None = None,
    anchor_chunk: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Match xyxy ``anchors [N, 4]`` to padded xyxy ``gt_boxes [G, 4]``.

    Args:
      anchors: ``[N, 4]`` xyxy anchors in absolute pixels.
      gt_boxes: ``[G, 4]`` xyxy ground truth, padded to a fixed G.
      gt_valid: bool ``[G]``; False for padding. Zero-area or non-finite boxes are also
        treated as invalid.
      high, low: IoU thresholds, ``0 <= low <= high <= 1``.
      allow_low_quality: also make each ground truth's best anchors (ties included) positive.
      gt_ignore: optional bool ``[G]``: crowd / difficult boxes, dropped from matching.
      ignore_iof: optional threshold in (0, 1]; background anchors whose intersection with an
        ignored box covers at least this fraction of the anchor's area become -1.
      image_hw: ``(height, width)`` of the image (may be a traced ``[2]`` array); needed with
        ``border``.
      border: None (off) or the straddle tolerance in pixels (py-faster-rcnn uses 0); anchors
        going out of the image by more than it are excluded and labelled -1.
      anchor_chunk: anchors per scan step; None picks it from G (``auto_anchor_chunk``).

    Returns:
      ``matched_gt`` int32 ``[N]``: index of the best valid ground truth (first on ties); 0 for
      anchors with no valid ground truth (or outside the border). ``labels`` int32 ``[N]``:
      1 positive, 0 negative, -1 ignored. No valid ground truth -> every anchor is 0 (or -1
      outside the border).
    """
    check_thresholds(high, low)
    if ignore_iof is not None and not 0.0 < ignore_iof <= 1.0:
        raise ValueError(f"ignore_iof must be None or in (0, 1], got {ignore_iof}")
    if border is not None:
        if border < 0:
            raise ValueError(f"border must be None (off) or >= 0 pixels, got {border}")
        if image_hw is None:
            raise ValueError("border needs image_hw = (height, width)")
    if anchor_chunk is not None and (int(anchor_chunk) != anchor_chunk or anchor_chunk < 1):
        raise ValueError(f"anchor_chunk must be None or a positive integer, got {anchor_chunk}")
    anchors = jnp.asarray(anchors, jnp.float32)
    gt_boxes = jnp.asarray(gt_boxes, jnp.float32)
    gt_valid = jnp.asarray(gt_valid).astype(bool)
    if gt_ignore is not None:
        gt_ignore = jnp.asarray(gt_ignore).astype(bool)
    _check_inputs(anchors, gt_boxes, gt_valid, gt_ignore)

    num_anchors, num_gt = anchors.shape[0], gt_boxes.shape[0]
    if border is None:
        inside = jnp.ones((num_anchors,), bool)
    else:
        inside = inside_image(anchors, image_hw, float(border))
    if num_gt == 0:
        return jnp.zeros((num_anchors,), jnp.int32), jnp.where(inside, 0, -1).astype(jnp.int32)

    gt_use = gt_valid & box_ops.is_valid(gt_boxes)
    gt_ign = jnp.zeros_like(gt_use)
    if gt_ignore is not None:
        gt_ign = gt_use & gt_ignore
        gt_use = gt_use & ~gt_ignore
    with_ignore = gt_ignore is not None and ignore_iof is not None
    chunk = auto_anchor_chunk(num_anchors, num_gt) if anchor_chunk is None else int(anchor_chunk)
    best, matched_gt, low_quality, ign_iof = _scan_chunks(
        anchors, inside, gt_boxes, gt_use, gt_ign, min(chunk, num_anchors), with_ignore
    )

    labels = jnp.where(best >= high, 1, jnp.where(best >= low, -1, 0))  # [N]
    if allow_low_quality:
        labels = jnp.where(low_quality, 1, labels)
    if with_ignore:
        labels = jnp.where((labels == 0) & (ign_iof >= ignore_iof), -1, labels)
    labels = jnp.where(inside, labels, -1)
    return matched_gt, labels.astype(jnp.int32)
