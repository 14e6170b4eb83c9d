"""Anchor coverage of a dataset's boxes: does every object get an anchor? What about small ones?

Three parts, each usable by itself:

* :mod:`~jax_rpn.coverage.analysis`: per-box best anchor IoU and the matcher's positive anchors
  (jitted), the high / low-quality-only / uncovered categories, summaries by size and aspect
  ratio;
* :mod:`~jax_rpn.coverage.anchor_fit`: k-means of box shapes with distance ``1 - IoU``
  (YOLOv2) and suggested anchor sizes per pyramid level with the same A on every level;
* :mod:`~jax_rpn.coverage.report`: :func:`run` on a config's data, the text report, JSON and
  pictures (drawn by :mod:`jax_rpn.viz`); ``python -m jax_rpn.coverage`` is its command line.

Boxes are ``[x1, y1, x2, y2]`` in absolute pixels; aspect ratio is ``h / w``.
"""

from jax_rpn.coverage.analysis import compute_coverage, load_ground_truth, summarize
from jax_rpn.coverage.anchor_fit import kmeans_shapes, suggest_anchors
from jax_rpn.coverage.report import format_report, run, write_pictures

__all__ = [
    "compute_coverage",
    "format_report",
    "kmeans_shapes",
    "load_ground_truth",
    "run",
    "suggest_anchors",
    "summarize",
    "write_pictures",
]
