"""Proposal coverage: does every object get a good proposal, and what about very small boxes?

The anchor coverage (:mod:`jax_rpn.coverage.analysis`) asks what the anchors could reach; this
asks what a trained model gives. The eval pipeline's images go through the model
(:func:`jax_rpn.inference.predict_function`, the config's test-time proposal settings), each
ground-truth box gets the best IoU of the first ``top_k`` proposals of its image (proposals
come in score order), and the shares of boxes at IoU >= 0.5 and >= 0.7 are broken down by size
and aspect ratio as the anchor report does. Over all boxes these shares bound the recall
table's ``recall@0.5@K`` / ``recall@0.7@K`` from above: COCO's recall matches each proposal to
at most one box, here neighbouring boxes may share their best proposal.

Boxes are ``[x1, y1, x2, y2]`` in absolute pixels of the resized image.
"""

import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from jax_rpn import boxes as box_ops
from jax_rpn import files, inference
from jax_rpn.coverage.analysis import BoxCoverage, size_bin_edges, summarize
from jax_rpn.shape_checks import check_shape

THRESHOLDS = (0.5, 0.7)


@functools.partial(jax.jit, static_argnames="top_k")
def best_proposal_iou(
    proposal_boxes: jax.Array, proposal_valid: jax.Array, gt_boxes: jax.Array, *, top_k: int
) -> jax.Array:
    """The best IoU of each box with its image's first ``top_k`` valid proposals -> ``[B, G]``.

    Args:
      proposal_boxes: ``[B, K, 4]`` xyxy, in score order; ``proposal_valid`` bool ``[B, K]``.
      gt_boxes: ``[B, G, 4]`` xyxy; zero-area boxes get 0.
      top_k: how many proposals per image count (at most K).
    """
    sizes = check_shape(proposal_boxes, "proposal_boxes", "[B, K, 4]")
    check_shape(proposal_valid, "proposal_valid", "[B, K]", dtype="mask", sizes=sizes)
    check_shape(gt_boxes, "gt_boxes", "[B, G, 4]", sizes=sizes)
    if not 1 <= top_k <= sizes["K"]:
        raise ValueError(f"top_k must be in [1, K={sizes['K']}], got {top_k}")

    def one(props, valid, gt):  # [K, 4], [K], [G, 4]
        iou = box_ops.pairwise_iou(gt, props[:top_k])  # [G, k]
        return jnp.max(jnp.where(valid[None, :top_k], iou, 0.0), axis=1)  # [G]

    return jax.vmap(one)(proposal_boxes, proposal_valid.astype(bool), gt_boxes)


def proposal_coverage(
    config: ml_collections.ConfigDict,
    variables: dict,
    *,
    top_k: int,
    split: str | None = None,
    max_images: int | None = None,
    progress: bool = True,
) -> tuple[BoxCoverage, int]:
    """Best proposal IoU of every box of ``split`` (default ``config.data.eval_split``), and
    the number of images.

    ``variables``: the model's (e.g. :func:`jax_rpn.checkpoints.load_variables`). Padding and
    ignored boxes are left out, as in the anchor coverage; ``num_positive`` is -1 (no matcher).
    """
    from jax_rpn.data import pipeline  # keeps `import jax_rpn.coverage` free of tfds and grain

    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images must be None or >= 1, got {max_images}")
    k_max = config.proposals.post_nms_topk_test
    if not 1 <= top_k <= k_max:
        raise ValueError(
            f"top_k must be in [1, config.proposals.post_nms_topk_test={k_max}], got {top_k}"
        )
    cfg = config.copy_and_resolve_references()
    cfg.data.eval_split = split or cfg.data.eval_split
    cfg.data.num_eval_images = max_images
    predict = inference.predict_function(ml_collections.FrozenConfigDict(cfg))
    total = pipeline.dataset_info(cfg).num_eval_examples
    parts, num_images = [], 0
    bar = tqdm(
        total=total,
        desc=f"proposals of {cfg.data.eval_split}",
        unit="img",
        disable=None if progress else True,
    )
    for batch in pipeline.create_eval_iterator(cfg, process_index=0, process_count=1):
        props = predict(variables, batch["image"], batch["image_hw"])
        best = best_proposal_iou(props.boxes, props.valid, batch["boxes"], top_k=top_k)
        use = (
            np.asarray(batch["example_valid"], bool)[:, None]
            & np.asarray(batch["valid"], bool)
            & ~np.asarray(batch["ignore"], bool)
            & np.asarray(box_ops.is_valid(batch["boxes"]))
        )  # [B, G]
        parts.append(
            (
                np.broadcast_to(np.asarray(batch["index"])[:, None], use.shape)[use],
                np.asarray(batch["boxes"], np.float32)[use],
                np.asarray(best)[use],
            )
        )
        num_images += int(np.sum(batch["example_valid"]))
        bar.update(int(np.sum(batch["example_valid"])))
    bar.close()
    index, boxes, best = (np.concatenate(p) for p in zip(*parts, strict=True))
    cov = BoxCoverage(
        image_index=index.astype(np.int32),
        boxes=boxes,
        best_iou=best.astype(np.float32),
        num_positive=np.full(best.shape, -1, np.int32),
    )
    return cov, num_images


def summarize_proposals(cov: BoxCoverage, *, worst: int = 10) -> dict:
    """:func:`summarize` of ``cov`` with each row's share of boxes at every IoU threshold of
    :data:`THRESHOLDS` (``"iou>=0.5"``, ``"iou>=0.7"``) and ``none`` (no proposal overlaps)."""
    edges = size_bin_edges(cov.boxes)
    by_threshold = [summarize(cov, high=t, size_edges=edges, worst=worst) for t in THRESHOLDS]
    out = by_threshold[-1]

    def merge(rows, others):
        for i, row in enumerate(rows):
            for t, other in zip(THRESHOLDS, others, strict=True):
                row[f"iou>={t}"] = other[i]["high"]
            for key in ("high", "low_quality_only", "matched"):
                row.pop(key)

    merge([out["overall"]], [[s["overall"]] for s in by_threshold])
    out["overall"].pop("median_positives")
    for part in ("coco_sizes", "sizes", "ratios"):
        merge(out[part], [s[part] for s in by_threshold])
    for w in out["worst"]:
        w.pop("num_positive")
    return out


def format_proposal_report(result: dict) -> str:
    """The printed report of :func:`run_proposals`' result."""
    s, o = result["setup"], result["summary"]["overall"]
    cols = [f"iou>={t}" for t in THRESHOLDS]
    lines = [
        f"Proposal coverage of {s['dataset']} {s['split']}: {s['num_images']} images, "
        f"{o['boxes']} boxes; the model {s['model']}, its top {s['top_k']} proposals per image",
        "",
        "Does every object get a good proposal?",
        *(
            f"  best proposal IoU >= {t}: {100 * o[c]:5.1f}% of the boxes"
            for t, c in zip(THRESHOLDS, cols, strict=True)
        ),
        f"  no proposal overlaps the box: {100 * o['none']:5.1f}%; mean best IoU "
        f"{o['mean_best_iou']:.3f}",
    ]
    for title, part, first in (
        ("By COCO size (box area after resizing):", "coco_sizes", "size"),
        ("By sqrt(area), half-octave bins (px):", "sizes", "sqrt(area)"),
        ("By aspect ratio h/w (log2 bins):", "ratios", "h/w"),
    ):
        lines += ["", title]
        lines.append(
            f"  {first:<16} {'boxes':>7} {'mean IoU':>8} " + " ".join(f"{c:>8}" for c in cols)
        )
        for r in result["summary"][part]:
            lines.append(
                f"  {r['bin']:<16} {r['boxes']:>7} {r['mean_best_iou']:>8.3f} "
                + " ".join(f"{100 * r[c]:7.1f}%" for c in cols)
            )
    lines += [
        "",
        "Worst-covered boxes:",
        "  image  box [x1, y1, x2, y2]          best IoU  size   h/w",
    ]
    for w in result["summary"]["worst"]:
        box = "[" + ", ".join(f"{v:.1f}" for v in w["box"]) + "]"
        lines.append(
            f"  {w['image_index']:>5}  {box:<28} {w['best_iou']:>8.3f} {w['size']:>5.1f} "
            f"{w['aspect_ratio']:>5.2f}"
        )
    return "\n".join(lines)


def run_proposals(
    config: ml_collections.ConfigDict,
    variables: dict,
    *,
    model: str,
    top_k: int,
    split: str | None = None,
    out_dir: str | None = None,
    max_images: int | None = None,
    worst: int = 10,
    progress: bool = True,
) -> dict:
    """Proposal coverage of ``split`` by the model (``model``: its path, for the report).

    Returns a JSON-able dict: ``setup`` and ``summary`` (:func:`summarize_proposals`). With
    ``out_dir``, writes ``proposal_coverage.json`` and ``proposal_report.txt`` there.
    """
    cov, num_images = proposal_coverage(
        config, variables, top_k=top_k, split=split, max_images=max_images, progress=progress
    )
    if cov.boxes.shape[0] == 0:
        raise ValueError("the split has no (non-ignored) ground-truth boxes")
    result = {
        "setup": {
            "dataset": config.data.name,
            "split": split or config.data.eval_split,
            "num_images": num_images,
            "model": model,
            "top_k": top_k,
        },
        "summary": summarize_proposals(cov, worst=worst),
    }
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        files.write_text(
            os.path.join(out_dir, "proposal_coverage.json"),
            json.dumps(result, indent=1, allow_nan=False),
        )
        files.write_text(
            os.path.join(out_dir, "proposal_report.txt"), format_proposal_report(result) + "\n"
        )
    return result
