"""Fixed-size exact greedy non-maximum suppression (tiled) and its group-aware form.

Boxes are ``[x1, y1, x2, y2]`` in absolute pixels, float32. The result equals exact greedy
NMS at every threshold: boxes are visited in descending score order (ties: lower index
first) and a box is kept unless its IoU (:func:`jax_rpn.boxes.pairwise_iou`) with an already kept
box is ``> iou_threshold``; visiting stops once ``max_output`` boxes are kept. IoU and the
comparison are float32 (the threshold is rounded to float32); XLA flushes subnormal floats
to zero, so subnormal scores tie with 0.

Defined behaviour for bad data (traced values cannot raise): a box whose score is NaN or
``-inf``, or whose coordinates are not all finite, is never kept and suppresses nothing.
Zero-area and flipped boxes (``x2 <= x1`` or ``y2 <= y1``) have IoU 0 with every box, so
they are kept in score order like any other non-overlapping box.

Algorithm: sort once, then walk tiles of ``_TILE`` sorted boxes. Each tile is first
suppressed by the boxes kept so far (a compact buffer of at most ``max_output`` boxes,
compared chunk by chunk up to the kept count), then resolved inside itself exactly by
iterating "a box is kept iff no kept earlier box of the tile suppresses it" to its fixed
point; the walk stops early once ``max_output`` boxes are kept or the candidates run out.
Memory is ``O(tile x (tile + chunk))``: the ``N x N`` IoU matrix is never formed.
"""

import numbers

import jax
import jax.numpy as jnp
from jax import lax

from jax_rpn.boxes import pairwise_iou

# Sorted boxes per tile, and kept boxes compared with a tile per inner step. On XLA CPU
# (benchmarks/nms.py) 128 to 256 are equally fast for RPN-sized inputs; bigger tiles waste
# work past the point where max_output boxes are kept, smaller ones add loop steps.
_TILE = 256
_CHUNK = 256
# Largest N for the packed single-key sort: rank * N + index must fit in int32.
_PACKED_SORT_MAX_N = 46340


def _check_static(boxes, scores, groups, iou_threshold, max_output):
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must have shape [N, 4] (x1, y1, x2, y2), got {boxes.shape}")
    n = boxes.shape[0]
    if scores.shape != (n,):
        raise ValueError(f"scores must have shape [N] = ({n},) like boxes, got {scores.shape}")
    if groups is not None:
        if groups.shape != (n,):
            raise ValueError(f"groups must have shape [N] = ({n},) like boxes, got {groups.shape}")
        if not jnp.issubdtype(groups.dtype, jnp.integer):
            raise ValueError(f"groups must be integers, got dtype {groups.dtype}")
    if not isinstance(iou_threshold, numbers.Real) or not 0.0 <= iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must be a number in [0, 1], got {iou_threshold!r}")
    if (
        not isinstance(max_output, numbers.Integral)
        or isinstance(max_output, bool)
        or max_output <= 0
    ):
        raise ValueError(f"max_output must be a positive integer, got {max_output!r}")


def _rows(x, start, size):
    """``x[start:start + size]`` as a gather: in while-loop bodies XLA CPU (JAX 0.10) runs
    dynamic-slice fusions about 5x slower than the equivalent gather."""
    return jnp.take(x, start + jnp.arange(size), axis=0, mode="clip")


def _descending_order(scores, valid):
    """int32 ``[N]``: indices by descending score, ties by lower index, invalid ones last."""
    n = scores.shape[0]
    key = jnp.where(valid, -scores, jnp.inf)
    key = jnp.where(key == 0, 0.0, key)  # -0.0 ties with 0.0
    index = jnp.arange(n, dtype=jnp.int32)
    if n > _PACKED_SORT_MAX_N:
        return lax.sort((key, index), num_keys=1, is_stable=True)[1]
    # Two single-key int32 sorts are ~3x faster on XLA CPU than one (key, index) sort:
    # map floats to order-preserving ints, rank them, then sort the unique rank * N + index.
    bits = lax.bitcast_convert_type(key, jnp.int32)
    ordered = jnp.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    rank = jnp.searchsorted(lax.sort(ordered), ordered, side="left").astype(jnp.int32)
    return lax.sort(rank * n + index) % n


def _suppresses(boxes1, groups1, boxes2, groups2, iou_threshold):
    """bool ``[T, M]``: box i of ``boxes1 [T, 4]`` and box j of ``boxes2 [M, 4]`` overlap by
    IoU > threshold (and share a group when groups are given)."""
    over = pairwise_iou(boxes1, boxes2) > iou_threshold  # [T, M]
    if groups1 is not None:
        over &= groups1[:, None] == groups2[None, :]
    return over


def _nms(boxes, scores, groups, *, iou_threshold, max_output, tile_size=_TILE, chunk=_CHUNK):
    """Greedy NMS (within ``groups`` when not None); settings validated by the callers."""
    n = boxes.shape[0]
    if n == 0:
        return jnp.full((max_output,), -1, jnp.int32), jnp.zeros((), jnp.int32)
    boxes = boxes.astype(jnp.float32)
    scores = scores.astype(jnp.float32)
    valid = jnp.all(jnp.isfinite(boxes), axis=1) & (scores > -jnp.inf)  # NaN > x is False
    order = _descending_order(scores, valid)  # [N]
    num_candidates = jnp.sum(valid, dtype=jnp.int32)

    t = min(tile_size, -(-n // 8) * 8)
    num_tiles = -(-n // t)
    pad = num_tiles * t - n
    sorted_boxes = jnp.pad(jnp.where(valid[:, None], boxes, 0.0)[order], ((0, pad), (0, 0)))
    sorted_valid = jnp.pad(valid[order], (0, pad))
    sorted_groups = None if groups is None else jnp.pad(groups[order], (0, pad))

    # Kept-set buffer; unused slots hold zero boxes, whose IoU with anything is 0.
    k = min(max_output, n)
    c = min(chunk, k)
    kbuf = -(-k // c) * c
    # Loop carries start as zeros_like(data) so they vary like the data under shard_map.
    ref = order if groups is None else sorted_groups
    kept_boxes = jnp.zeros_like(ref, jnp.float32, shape=(kbuf, 4))
    kept_groups = None if groups is None else jnp.zeros_like(ref, shape=(kbuf,))
    kept_pos = jnp.zeros_like(ref, jnp.int32, shape=(k,))  # positions in sorted order
    count = jnp.zeros_like(ref, jnp.int32, shape=())
    earlier = jnp.arange(t)[None, :] < jnp.arange(t)[:, None]  # [T, T]: j < i

    def tile_step(state):
        i, kept_boxes, kept_groups, kept_pos, count = state
        start = i * t
        tile_boxes = _rows(sorted_boxes, start, t)  # [T, 4]
        tile_groups = None if groups is None else _rows(sorted_groups, start, t)

        # 1. Suppression by the boxes kept in earlier tiles, up to the kept count.
        def chunk_step(carry):
            j, suppressed = carry
            other = _rows(kept_boxes, j * c, c)  # [C, 4]
            other_groups = None if groups is None else _rows(kept_groups, j * c, c)
            hit = _suppresses(tile_boxes, tile_groups, other, other_groups, iou_threshold)
            return j + 1, suppressed | jnp.any(hit, axis=1)

        num_chunks = -(-count // c)
        start_carry = (count * 0, ~_rows(sorted_valid, start, t))
        _, suppressed = lax.while_loop(lambda jc: jc[0] < num_chunks, chunk_step, start_carry)
        candidate = ~suppressed  # [T]

        # 2. Inside the tile: keep[i] = candidate[i] and no kept j < i suppresses i. Iterating
        # from keep = candidate fixes position i after at most i + 1 rounds, and the fixed
        # point is unique, so stopping at the first unchanged round is exact greedy NMS.
        # Each round is a 0/1 matrix-vector product (exact: sums of 0/1 terms, any rounding
        # keeps a positive sum positive), ~3x faster than a boolean any() on XLA CPU.
        pair = _suppresses(tile_boxes, tile_groups, tile_boxes, tile_groups, iou_threshold)
        pair = (pair & earlier).astype(jnp.float32)  # [T, T]

        def fix_step(carry):
            keep, _ = carry
            new = candidate & ~(pair @ keep.astype(jnp.float32) > 0)
            return new, jnp.any(new != keep)

        keep, _ = lax.while_loop(lambda kc: kc[1], fix_step, (candidate, jnp.any(candidate)))

        # 3. Append the tile's kept boxes in score order; those beyond max_output drop.
        slot = count + jnp.cumsum(keep, dtype=jnp.int32) - 1
        slot = jnp.where(keep & (slot < k), slot, kbuf)
        kept_boxes = kept_boxes.at[slot].set(tile_boxes, mode="drop")
        if groups is not None:
            kept_groups = kept_groups.at[slot].set(tile_groups, mode="drop")
        kept_pos = kept_pos.at[slot].set(start + jnp.arange(t, dtype=jnp.int32), mode="drop")
        count = jnp.minimum(count + jnp.sum(keep, dtype=jnp.int32), k)
        return i + 1, kept_boxes, kept_groups, kept_pos, count

    def more(state):
        i, _, _, _, count = state
        return (i < num_tiles) & (i * t < num_candidates) & (count < k)

    state = (count, kept_boxes, kept_groups, kept_pos, count)
    _, _, _, kept_pos, count = lax.while_loop(more, tile_step, state)
    indices = jnp.where(jnp.arange(k) < count, order[kept_pos], -1)  # [K]
    indices = jnp.pad(indices, (0, max_output - k), constant_values=-1)  # [max_output]
    return indices, count


_nms_jit = jax.jit(_nms, static_argnames=("iou_threshold", "max_output", "tile_size", "chunk"))


def nms(boxes: jax.Array, scores: jax.Array, *, iou_threshold: float, max_output: int):
    """Exact greedy NMS of xyxy ``boxes [N, 4]`` with ``scores [N]``, fixed output size.

    A box is suppressed when its IoU with a kept, higher-scoring box is ``> iou_threshold``
    (in [0, 1]; 1 suppresses nothing); ties in score go to the lower index. Boxes with NaN or
    ``-inf`` scores or non-finite coordinates are never kept. Works under ``jit``, ``vmap``
    and ``shard_map``; compiles once per shape.

    Returns ``(indices [max_output] int32, num_valid int32)``: indices into ``boxes`` of the
    kept boxes in descending score order, padded with -1 after the first ``num_valid``.
    """
    boxes, scores = jnp.asarray(boxes), jnp.asarray(scores)
    _check_static(boxes, scores, None, iou_threshold, max_output)
    return _nms_jit(boxes, scores, None, iou_threshold=iou_threshold, max_output=max_output)


def batched_nms(
    boxes: jax.Array,
    scores: jax.Array,
    groups: jax.Array,
    *,
    iou_threshold: float,
    max_output: int,
):
    """Greedy NMS within groups: like :func:`nms`, but boxes of different ``groups [N]``
    (integers: pyramid levels or classes) never suppress each other.

    xyxy ``boxes [N, 4]``, ``scores [N]``. One pass over all groups by score, so the
    ``max_output`` kept boxes are the best across groups; suppression is masked by group
    equality (exact, unlike a coordinate offset). Returns ``(indices [max_output] int32,
    num_valid int32)`` as :func:`nms`.
    """
    boxes, scores, groups = jnp.asarray(boxes), jnp.asarray(scores), jnp.asarray(groups)
    _check_static(boxes, scores, groups, iou_threshold, max_output)
    return _nms_jit(boxes, scores, groups, iou_threshold=iou_threshold, max_output=max_output)
