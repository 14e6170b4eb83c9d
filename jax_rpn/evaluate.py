"""Proposal recall of any proposals file against COCO ground truth.

    python -m jax_rpn.evaluate --annotations instances_val2017.json --proposals out/proposals.json
    python -m jax_rpn.evaluate --annotations ann.json --proposals out/proposals.npz --output rec/

Proposals: a COCO results JSON (ours, detectron2's or mmdetection's ``bbox`` results, a
user's) or our npz (:mod:`jax_rpn.proposal_files`), matched to the annotation images by
``image_id``. Prints AR@100/300/1000 (mean recall over IoU .50:.05:.95), AR by object size
(small / medium / large) and recall at IoU 0.5 and 0.7, and writes ``<stem>_recall.json`` and
``<stem>_recall_curves.png`` (next to the proposals file, or into ``--output``).

The numbers are pycocotools' ``COCOeval`` with ``useCats=0`` and ``maxDets=[100, 300,
1000]`` (``tests/test_evaluate.py`` checks them against it), as :mod:`jax_rpn.recall` counts
them; the ground truth is read as COCOeval reads it:

- every annotation of every image in the file counts, whatever its category;
- ``iscrowd`` annotations are ignored: not counted, and never taking a match from a counted
  box (COCOeval also overwrites any ``ignore`` field with ``iscrowd``, so that field is not
  read);
- object size is the annotation's ``area`` field (for COCO the segmentation's area, not the
  box's), with COCOeval's inclusive bounds 32^2 and 96^2; ``w * h`` where there is none;
- an image without proposals keeps its ground truth, all missed.

Only each image's ``max(counts)`` highest-scoring proposals matter (COCOeval cuts at
``maxDets`` too). :func:`recall.recall_stats` sizes objects by box area, so each size range
runs as its own pass in which the boxes outside the range are marked ignored: the same
matching, since ignored boxes never change which counted box a proposal takes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import os

import numpy as np

from jax_rpn import files, proposal_files, recall

_BATCH = 16  # images per jitted call


@dataclasses.dataclass(frozen=True)
class GroundTruth:
    """COCO ground truth of I images padded to G boxes; boxes ``[x1, y1, x2, y2]`` pixels.

    Attributes:
      image_ids: int64 ``[I]``, sorted.
      file_names: str ``[I]``.
      boxes: float32 ``[I, G, 4]``.
      area: float32 ``[I, G]``, the annotations' ``area`` (``w * h`` where missing).
      ignore: bool ``[I, G]``, ``iscrowd``.
      valid: bool ``[I, G]``, False in padding.
    """

    image_ids: np.ndarray
    file_names: np.ndarray
    boxes: np.ndarray
    area: np.ndarray
    ignore: np.ndarray
    valid: np.ndarray


def load_coco_ground_truth(path: str) -> GroundTruth:
    """Ground truth of every image of a COCO JSON file (read with pycocotools), G = the most
    annotations of any image rounded up to a power of two."""
    from pycocotools.coco import COCO

    if not os.path.isfile(path):
        raise FileNotFoundError(f"annotations file {path} does not exist")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints progress
            coco = COCO(path)
    except (json.JSONDecodeError, KeyError, TypeError, AssertionError) as e:
        raise ValueError(f"{path}: not a COCO annotations file ({type(e).__name__}: {e})") from None
    ids = sorted(coco.getImgIds())
    per_image = [coco.imgToAnns.get(i, []) for i in ids]
    g = 1 << max(0, (max([len(a) for a in per_image] + [1]) - 1).bit_length())
    n = len(ids)
    boxes = np.zeros((n, g, 4), np.float32)  # [I, G, 4]
    area = np.zeros((n, g), np.float32)  # [I, G]
    ignore = np.zeros((n, g), bool)  # [I, G]
    valid = np.zeros((n, g), bool)  # [I, G]
    for i, anns in enumerate(per_image):
        for j, ann in enumerate(anns):
            bbox = ann.get("bbox")
            if not isinstance(bbox, list) or len(bbox) != 4:
                raise ValueError(f"{path}: annotation {ann.get('id')}: bbox must be [x, y, w, h]")
            x, y, w, h = (float(v) for v in bbox)
            if not np.all(np.isfinite([x, y, w, h])) or w < 0 or h < 0:
                raise ValueError(
                    f"{path}: annotation {ann.get('id')}: bbox must be finite with w, h >= 0, "
                    f"got {bbox}"
                )
            boxes[i, j] = (x, y, x + w, y + h)
            area[i, j] = float(ann["area"]) if "area" in ann else w * h
            ignore[i, j] = bool(ann.get("iscrowd", 0))
            valid[i, j] = True
    names = [str(coco.imgs[i].get("file_name", "")) for i in ids]
    return GroundTruth(
        np.asarray(ids, np.int64), np.asarray(names, str), boxes, area, ignore, valid
    )


@functools.lru_cache(maxsize=4)
def _stats_fn(area_ranges: tuple):
    """Jitted per-batch record: images ``[B]``, each size range a pass -> summed RecallStats."""
    import jax
    import jax.numpy as jnp

    everything = (("all", 0.0, 1e10),)
    lo = np.asarray([r[1] for r in area_ranges], np.float32)  # [R]
    hi = np.asarray([r[2] for r in area_ranges], np.float32)

    def one_image(boxes, scores, valid, gt_boxes, gt_valid, gt_ignore, gt_area):
        outside = (gt_area[None] < lo[:, None]) | (gt_area[None] > hi[:, None])  # [R, G]
        per_range = functools.partial(recall.recall_stats, area_ranges=everything)
        stats = jax.vmap(per_range, in_axes=(None, None, None, None, None, 0))(
            boxes, scores, valid, gt_boxes, gt_valid, gt_ignore[None] | outside
        )  # matches [R, 1, T, K], num_gt [R, 1]
        return recall.RecallStats(
            matches=stats.matches[:, 0],
            num_gt=stats.num_gt[:, 0],
            num_proposals=stats.num_proposals[0],
            num_images=stats.num_images[0],
        )

    def batch(boxes, scores, valid, gt_boxes, gt_valid, gt_ignore, gt_area, image_valid):
        stats = jax.vmap(one_image)(boxes, scores, valid, gt_boxes, gt_valid, gt_ignore, gt_area)
        stats = stats._replace(num_images=image_valid.astype(jnp.int32))
        return jax.tree.map(lambda x: x.sum(0), stats)

    return jax.jit(batch)


def evaluate(
    ground_truth: GroundTruth,
    proposals: proposal_files.ProposalSet,
    *,
    counts=recall.PROPOSAL_COUNTS,
) -> recall.RecallAccumulator:
    """Proposal recall over all ground-truth images -> a filled :class:`RecallAccumulator`.

    Raises ValueError naming proposal image ids that are not in the ground truth.
    """
    import jax

    row = {int(i): r for r, i in enumerate(ground_truth.image_ids)}
    unknown = [int(i) for i in proposals.image_ids if int(i) not in row]
    if unknown:
        raise ValueError(
            f"{len(unknown)} proposal image ids are not images of the annotations (e.g. "
            f"{unknown[:5]}); run predict with --annotations so its ids are the COCO ids"
        )
    n = len(ground_truth.image_ids)
    if n == 0:
        raise ValueError("the annotations hold no images")
    boxes, scores, valid = proposal_files.top_proposals(
        proposals, max(counts)
    )  # [P, K, 4], [P, K], [P, K]
    where = np.full(n, -1)  # proposal row of each ground-truth image
    where[[row[int(i)] for i in proposals.image_ids]] = np.arange(proposals.num_images)
    fn = _stats_fn(recall.AREA_RANGES)
    acc = recall.RecallAccumulator(counts=counts)
    for start in range(0, n, _BATCH):
        rows = np.arange(start, start + _BATCH)
        real = rows < n
        rows = np.minimum(rows, n - 1)
        has = (where[rows] >= 0) & real  # [B]
        p = np.maximum(where[rows], 0)
        stats = fn(
            boxes[p],
            np.where(valid[p], scores[p], 0.0),
            valid[p] & has[:, None],
            ground_truth.boxes[rows],
            ground_truth.valid[rows] & real[:, None],
            ground_truth.ignore[rows],
            ground_truth.area[rows],
            real,
        )
        acc.update(jax.device_get(stats))
    return acc


def run(
    *, annotations: str, proposals: str, output: str | None = None, counts=recall.PROPOSAL_COUNTS
) -> dict:
    """The command: evaluate, print the table, write the metrics JSON and the curves PNG."""
    from jax_rpn import viz

    ground_truth = load_coco_ground_truth(annotations)
    props = proposal_files.read_proposals(proposals)
    acc = evaluate(ground_truth, props, counts=counts)
    result = acc.result()
    missing = len(set(ground_truth.image_ids.tolist()) - set(props.image_ids.tolist()))
    result["images_without_proposals"] = missing
    stem = os.path.splitext(os.path.basename(proposals))[0]
    out_dir = output or os.path.dirname(os.path.abspath(proposals))
    os.makedirs(out_dir, exist_ok=True)
    metrics_path = os.path.join(out_dir, f"{stem}_recall.json")
    files.write_text(metrics_path, json.dumps(result, indent=1))
    curves_path = os.path.join(out_dir, f"{stem}_recall_curves.png")
    viz.plot_recall_curves(acc.curves(), curves_path)
    print(recall.format_recall_table(result, title=f"Proposal recall of {proposals}"))
    if missing:
        print(f"{missing} annotation images have no proposals (their objects count as missed)")
    print(f"wrote {metrics_path} and {curves_path}")
    return result


def _define_flags():
    from absl import flags

    flags.DEFINE_string("annotations", None, "COCO JSON with the ground truth.")
    flags.DEFINE_string("proposals", None, "Proposals: COCO results .json or jax_rpn .npz.")
    flags.DEFINE_string(
        "output", None, "Folder for the metrics and curves (default: the proposals file's folder)."
    )
    flags.DEFINE_list("counts", [str(c) for c in recall.PROPOSAL_COUNTS], "Proposals per image.")
    flags.mark_flags_as_required(["annotations", "proposals"])


def main(argv):
    from absl import app, flags, logging

    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # no INFO lines from orbax and jax
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    f = flags.FLAGS
    run(
        annotations=f.annotations,
        proposals=f.proposals,
        output=f.output,
        counts=tuple(int(c) for c in f.counts),
    )


if __name__ == "__main__":
    from jax_rpn import cli

    _define_flags()
    cli.run(main, name="jax_rpn.evaluate")
