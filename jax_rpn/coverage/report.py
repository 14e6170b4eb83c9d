"""The coverage report: :func:`run` on a config's data, its text report, JSON and pictures.

:func:`run` loads a split's ground truth through the input pipeline, measures the coverage of
the config's anchors (:mod:`jax_rpn.coverage.analysis`), fits suggested anchors
(:mod:`jax_rpn.coverage.anchor_fit`) and measures theirs; :func:`format_report` answers the
article's questions in text, :func:`write_pictures` draws the figures with :mod:`jax_rpn.viz`.
Anchors are those of each image's padded size: ``config.data.pad_to``, or its transpose for
the portrait bucket with ``config.data.aspect_buckets`` (feature size ``ceil(pad / stride)`` on
each level); the matcher is the config's (``TargetSettings``).
"""

import dataclasses
import json
import math
import os

import numpy as np

from jax_rpn import anchors as anchor_ops
from jax_rpn import boxes as box_ops
from jax_rpn import files, viz
from jax_rpn.coverage.analysis import (
    compute_coverage,
    load_ground_truth,
    size_bin_edges,
    summarize,
)
from jax_rpn.coverage.anchor_fit import suggest_anchors
from jax_rpn.settings import AnchorSettings, TargetSettings


def _pct(x):
    return "  n/a" if x is None else f"{100 * x:5.1f}%"


def _table(title, rows, first="bin"):
    head = f"  {first:<16} {'boxes':>7} {'mean IoU':>8} {'>=high':>7} {'low-q':>7} {'none':>7}"
    lines = [title, head + f" {'matched':>8}"]
    for r in rows:
        lines.append(
            f"  {r['bin']:<16} {r['boxes']:>7} {r['mean_best_iou']:>8.3f} {_pct(r['high']):>7} "
            f"{_pct(r['low_quality_only']):>7} {_pct(r['none']):>7} {_pct(r['matched']):>8}"
        )
    return lines


def _anchor_lines(a):
    return [
        f"  strides {tuple(a['strides'])}, sizes {tuple(tuple(s) for s in a['sizes'])}, "
        f"aspect ratios (h/w) {tuple(a['aspect_ratios'])}",
        f"  A = {a['num_cell_anchors']} anchors per cell, N = {a['num_anchors']} anchors per "
        f"image; smallest anchor area {a['min_anchor_area']:.0f} px^2",
    ]


def format_report(result: dict) -> str:
    """The printed report of :func:`run`'s result, in the article's questions."""
    c, cur, sug = result["setup"], result["current"], result.get("suggested")
    high = c["high"]
    o = cur["overall"]
    lq = "on" if c["allow_low_quality"] else "OFF: these boxes get no positive anchor"
    lines = [
        f"Anchor coverage of {c['dataset']} {c['split']}: {c['num_images']} images, "
        f"{o['boxes']} boxes after resizing to at most "
        + " or ".join(f"{h}x{w}" for h, w in c["padded_shapes"])
        + f" ({c['num_ignored']} ignored and {c['num_dropped']} beyond max_boxes left out)",
        "Anchors:",
        *_anchor_lines(cur["anchors"]),
        f"Matcher: high {high}, low {c['low']}, low-quality matching "
        f"{'on' if c['allow_low_quality'] else 'off'}, border {c['border']}",
        "",
        "Does every object get an anchor?",
    ]
    for label, value, note in (
        (f"best IoU >= {high} (positive at the high threshold)", o["high"], ""),
        (
            f"best IoU in (0, {high}): positive only via low-quality matching",
            o["low_quality_only"],
            f"  (low-quality matching {lq})",
        ),
        ("best IoU 0: uncovered, never positive", o["none"], ""),
    ):
        lines.append(f"  {label:<64} {_pct(value)}{note}")
    if o["matched"] is None:
        lines.append("  (the matcher's positive-anchor counts were skipped: --nomatch)")
    else:
        lines.append(
            f"  with the matcher as in training (neighbours competing): {_pct(o['matched'])} of "
            f"boxes get at least one positive anchor, median {o['median_positives']:g} per box"
        )
    lines += ["", "What about very small boxes?"]
    min_side = math.sqrt(high * cur["anchors"]["min_anchor_area"])
    lines.append(
        f"  IoU <= (smaller area) / (larger area), so a box with sqrt(area) < {min_side:.1f} px "
        f"(area below {high} x the smallest anchor's) can never reach IoU {high}."
    )
    for r in cur["sizes"][:2] + [r for r in cur["coco_sizes"] if r["bin"] == "small"]:
        name = "COCO small (area < 32^2)" if r["bin"] == "small" else f"sqrt(area) {r['bin']} px"
        lines.append(
            f"  {name}: {r['boxes']} boxes, {_pct(r['high']).strip()} >= {high}, "
            f"{_pct(r['low_quality_only']).strip()} only via low-quality matching, "
            f"{_pct(r['none']).strip()} uncovered, mean best IoU {r['mean_best_iou']:.3f}"
        )
    lines += [""] + _table("By COCO size (box area after resizing):", cur["coco_sizes"], "size")
    lines += [""] + _table("By sqrt(area), half-octave bins (px):", cur["sizes"], "sqrt(area)")
    lines += [""] + _table("By aspect ratio h/w (log2 bins):", cur["ratios"], "h/w")
    lines += [
        "",
        "Worst-covered boxes:",
        "  image  box [x1, y1, x2, y2]          best IoU  size   h/w",
    ]
    for w in cur["worst"]:
        box = "[" + ", ".join(f"{v:.1f}" for v in w["box"]) + "]"
        lines.append(
            f"  {w['image_index']:>5}  {box:<28} {w['best_iou']:>8.3f} {w['size']:>5.1f} "
            f"{w['aspect_ratio']:>5.2f}"
        )
    if sug is not None:
        so = sug["overall"]
        a = sug["anchors"]
        lines += [
            "",
            "Suggested anchors (k-means with 1 - IoU over box shapes, YOLOv2; sizes fitted per "
            f"level to the boxes nearest its current sizes: {tuple(a['boxes_per_level'])} boxes):",
            *_anchor_lines(a),
            f"  config.anchors.sizes = {tuple(tuple(s) for s in a['sizes'])}",
            f"  config.anchors.aspect_ratios = {tuple(a['aspect_ratios'])}",
            "",
            "Current vs suggested anchors (each column pair: current, suggested):",
            f"  {'bin':<16} {'boxes':>7} {'>=high':>15} {'low-q only':>15} "
            f"{'matched':>15} {'mean IoU':>13}",
        ]
        pairs = [("all", o, so)] + [
            (r["bin"], r, s) for r, s in zip(cur["sizes"], sug["sizes"], strict=True)
        ]
        pairs += [
            (f"h/w {r['bin']}", r, s) for r, s in zip(cur["ratios"], sug["ratios"], strict=True)
        ]
        for name, r, s in pairs:
            lines.append(
                f"  {name:<16} {r['boxes']:>7}  {_pct(r['high'])} {_pct(s['high'])}  "
                f"{_pct(r['low_quality_only'])} {_pct(s['low_quality_only'])}  "
                f"{_pct(r['matched'])} {_pct(s['matched'])}  "
                f"{r['mean_best_iou']:.3f} {s['mean_best_iou']:.3f}"
            )
        verdict = "improves" if so["high"] > o["high"] else "does not improve"
        lines.append(
            f"  The suggestion {verdict} the fraction of boxes reaching IoU {high} "
            f"({_pct(o['high']).strip()} -> {_pct(so['high']).strip()})."
        )
        a_cur, a_new = cur["anchors"]["num_cell_anchors"], a["num_cell_anchors"]
        if a_new != a_cur:
            lines.append(f"  A changes from {a_cur} to {a_new}: the head must be trained anew.")
        else:
            lines.append(
                "  Sizes one octave apart and a grid of one stride cap the IoU a box can reach; "
                "more anchors per cell (--sizes_per_level, --num_ratios) raise the cap."
            )
    return "\n".join(lines)


def write_pictures(result: dict, coverages: dict, out_dir: str) -> list[str]:
    """PNGs of :func:`run`'s result into ``out_dir`` (:mod:`jax_rpn.viz`); returns their paths.

    ``coverages``: name ("current", "suggested") ->
    :class:`~jax_rpn.coverage.analysis.BoxCoverage`, for the histogram.
    """
    os.makedirs(out_dir, exist_ok=True)
    c, cur, sug = result["setup"], result["current"], result.get("suggested")
    high, low = c["high"], c["low"]
    best = {k: v.best_iou for k, v in coverages.items()}
    names = ["best_iou", "coverage_by_size", "coverage_by_ratio"]
    names += ["current_vs_suggested"] * (sug is not None) + ["coverage", "cell_anchors"]
    paths = {name: os.path.join(out_dir, f"{name}.png") for name in names}
    viz.plot_best_iou(best, paths["best_iou"], high=high, low=low)
    viz.plot_coverage_bars(cur, paths["coverage_by_size"], by="sizes")
    viz.plot_coverage_bars(cur, paths["coverage_by_ratio"], by="ratios")
    if sug is not None:
        viz.plot_coverage_comparison(cur, sug, paths["current_vs_suggested"], high=high)
    # Everything in one figure (the README's picture).
    title = f"anchor coverage: {c['dataset']} {c['split']}, {cur['overall']['boxes']} boxes"
    viz.plot_coverage(best, cur, sug, paths["coverage"], high=high, low=low, title=title)
    # The A anchors of a cell of every level, drawn on one centre.
    a = cur["anchors"]
    cells = anchor_ops.level_cell_anchors(
        a["strides"], a["sizes"], a["aspect_ratios"], convention=c["convention"]
    )
    fig = viz.plot_cell_anchors(np.concatenate(cells), stride=a["strides"][0])
    fig.axes[0].set_title(
        f"cell anchors of {len(cells)} levels (strides {tuple(a['strides'])}), "
        f"A = {a['num_cell_anchors']}",
        fontsize="small",
    )
    viz.save_figure(fig, paths["cell_anchors"])
    return list(paths.values())


def _plain(values):
    """Nested sequences of numbers -> nested lists of floats (JSON)."""
    if isinstance(values, (list, tuple)):
        return [_plain(v) for v in values]
    return float(values)


def _anchor_info(settings: AnchorSettings, image_hw):
    cells = settings.cell_anchors()
    ratios = settings.aspect_ratios
    return {
        "strides": [int(s) for s in settings.strides],
        "sizes": _plain(settings.sizes),
        "aspect_ratios": _plain(ratios[0] if len(set(ratios)) == 1 else ratios),
        "num_cell_anchors": int(cells[0].shape[0]),
        "num_anchors": int(sum(len(x) for x in settings.for_image(image_hw))),
        "min_anchor_area": float(np.asarray(box_ops.area(np.concatenate(cells))).min()),
    }


def run(
    config,
    *,
    split: str | None = None,
    out_dir: str | None = None,
    max_images: int | None = None,
    suggest: bool = True,
    sizes_per_level: int | None = None,
    num_ratios: int | None = None,
    worst: int = 10,
    count_positives: bool = True,
    progress: bool = True,
) -> dict:
    """Coverage of ``split``'s boxes by ``config``'s anchors (and by suggested ones).

    ``sizes_per_level`` / ``num_ratios``: see :func:`suggest_anchors` (None: keep the config's,
    so A stays). Returns a JSON-able dict: ``setup``, ``current`` and ``suggested`` (None when
    ``suggest`` is False) summaries (:func:`summarize`, plus ``anchors``), ``pictures`` (paths).
    ``count_positives=False`` skips the matcher's counts (``matched`` None). With ``out_dir``,
    writes ``coverage.json``, ``report.txt`` and the PNGs of
    :func:`write_pictures` there.
    """
    gt = load_ground_truth(config, split=split, max_images=max_images, progress=progress)
    t, a = TargetSettings.from_config(config), AnchorSettings.from_config(config)
    pad_hw = tuple(int(v) for v in config.data.pad_to)
    # Each padded shape's anchors (with aspect buckets, pad_to and its transpose).
    shapes = list(dict.fromkeys(tuple(int(v) for v in hw) for hw in gt.pad_hw))

    def anchors_of(settings):
        return {hw: np.concatenate(settings.for_image(hw)) for hw in shapes}  # [N, 4] each

    kw = {"targets": t, "progress": progress, "count_positives": count_positives}
    cov = compute_coverage(anchors_of(a), gt, desc="current anchors", **kw)
    if cov.boxes.shape[0] == 0:
        raise ValueError("the split has no (non-ignored) ground-truth boxes")
    edges = size_bin_edges(cov.boxes)
    current = summarize(cov, high=t.high, size_edges=edges, worst=worst)
    current["anchors"] = _anchor_info(a, pad_hw)
    coverages = {"current": cov}
    suggested = None
    if suggest:
        s = suggest_anchors(
            cov.boxes,
            strides=a.strides,
            sizes=a.sizes,
            aspect_ratios=a.aspect_ratios,
            sizes_per_level=sizes_per_level,
            num_ratios=num_ratios,
            seed=config.seed,
        )
        new = dataclasses.replace(a, sizes=s.sizes, aspect_ratios=s.aspect_ratios)
        coverages["suggested"] = compute_coverage(
            anchors_of(new), gt, desc="suggested anchors", **kw
        )
        suggested = summarize(coverages["suggested"], high=t.high, size_edges=edges, worst=worst)
        suggested["anchors"] = _anchor_info(new, pad_hw)
        suggested["anchors"]["boxes_per_level"] = list(s.boxes_per_level)
    result = {
        "setup": {
            "dataset": config.data.name,
            "split": split or config.data.eval_split,
            "num_images": int(len(gt.index)),
            "num_ignored": int(np.sum(gt.valid & gt.ignore)),
            "num_dropped": gt.num_dropped,
            "image_hw": list(pad_hw),
            "padded_shapes": [list(hw) for hw in shapes],
            "high": float(t.high),
            "low": float(t.low),
            "allow_low_quality": bool(t.allow_low_quality),
            "border": t.border,
            "convention": a.convention,
        },
        "current": current,
        "suggested": suggested,
        "pictures": [],
    }
    if out_dir is not None:
        result["pictures"] = write_pictures(result, coverages, out_dir)
        coverage_json = json.dumps(result, indent=1, allow_nan=False)
        files.write_text(os.path.join(out_dir, "coverage.json"), coverage_json)
        files.write_text(os.path.join(out_dir, "report.txt"), format_report(result) + "\n")
    return result
