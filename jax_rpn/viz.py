"""Pictures with matplotlib: cell anchors, anchor centres, sampled anchors, proposals, recall.

Boxes are ``[x1, y1, x2, y2]`` in absolute pixels; images ``[H, W, C]`` (C = 1 or 3), uint8 or
float. Float images are shown after undoing ``mean`` / ``std`` when given, then rescaled by
min/max to [0, 1] unless already inside it.

Every ``plot_*`` function returns a :class:`matplotlib.figure.Figure` and, when ``path`` is
given, also writes it there as a PNG. Figures are drawn with the Agg canvas and never touch
``pyplot``, so nothing global changes and they are freed like any object.
:func:`figure_to_array` turns a figure into an RGB image for TensorBoard.
"""

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from jax_rpn import anchors as anchor_ops

GT_COLOR = "cyan"
POSITIVE_COLOR = "tab:green"
NEGATIVE_COLOR = "tab:red"
PROPOSAL_COLOR = "orange"


def new_figure(nrows=1, ncols=1, *, size=(6.0, 6.0)):
    """An Agg-backed Figure (no pyplot state) and its ``[nrows, ncols]`` axes grid."""
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _panel_size(image, width):
    """Figure size (inches) of one image panel: ``width`` wide, the image's aspect plus a title."""
    h, w = np.shape(image)[:2]
    return width, width * min(max(h / max(w, 1), 0.25), 4.0) + 0.4


def save_figure(fig, path):
    """Tight layout, then write ``fig`` as PNG to ``path`` (None: don't write); returns ``fig``."""
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, format="png")
    return fig


def figure_to_array(fig: Figure) -> np.ndarray:
    """Render ``fig`` -> uint8 RGB ``[H, W, 3]`` (for TensorBoard's ``add_image``)."""
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def display_image(image, *, mean=None, std=None) -> np.ndarray:
    """``[H, W, C]`` image (C = 1 or 3) -> displayable ``[H, W, 3]`` (uint8 or float in [0, 1])."""
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[-1] not in (1, 3):
        raise ValueError(f"image must have shape [H, W, 1 or 3], got {img.shape}")
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=-1)
    if img.dtype == np.uint8:
        return img
    img = img.astype(np.float32)
    if std is not None:
        img = img * np.asarray(std, np.float32)
    if mean is not None:
        img = img + np.asarray(mean, np.float32)
    lo, hi = float(np.min(img)), float(np.max(img))
    if lo < 0.0 or hi > 1.0:
        img = (img - lo) / max(hi - lo, 1e-12)
    return np.nan_to_num(img)


def _draw_boxes(ax, boxes, *, color, linewidth=1.5, alpha=1.0, linestyle="-"):
    for x1, y1, x2, y2 in np.asarray(boxes, np.float32).reshape(-1, 4):
        ax.add_patch(
            Rectangle(
                (x1, y1),
                x2 - x1,
                y2 - y1,
                fill=False,
                edgecolor=color,
                linewidth=linewidth,
                alpha=alpha,
                linestyle=linestyle,
            )
        )


def _show(ax, image, mean, std):
    ax.imshow(display_image(image, mean=mean, std=std))
    ax.set_axis_off()


def plot_cell_anchors(cell_anchors, path=None, *, stride=None) -> Figure:
    """The A anchors of one cell (xyxy ``cell_anchors [A, 4]``), each centred on the cell.

    With ``stride``, the ``stride x stride`` cell is drawn too (grey, filled).
    """
    cells = np.asarray(cell_anchors, np.float32)
    if cells.ndim != 2 or cells.shape[1] != 4 or cells.shape[0] == 0:
        raise ValueError(f"cell_anchors must have shape [A, 4] with A >= 1, got {cells.shape}")
    wh = cells[:, 2:] - cells[:, :2]  # [A, 2]
    fig, axes = new_figure()
    ax = axes[0, 0]
    colors = [f"C{i % 10}" for i in range(len(cells))]
    for (w, h), color in zip(wh, colors, strict=True):
        ax.add_patch(
            Rectangle(
                (-w / 2, -h / 2),
                w,
                h,
                fill=False,
                edgecolor=color,
                lw=1.5,
                label=f"{w:.0f}x{h:.0f}",
            )
        )
    if stride is not None:
        ax.add_patch(
            Rectangle(
                (-stride / 2, -stride / 2), stride, stride, color="0.6", label=f"cell {stride}"
            )
        )
    half = 0.55 * max(float(wh.max()), float(stride or 0))
    ax.set_xlim(-half, half)
    ax.set_ylim(half, -half)  # image coordinates: y grows downwards
    ax.set_aspect("equal")
    ax.plot([0], [0], "k+")
    ax.legend(loc="upper right", fontsize="small", ncol=1 + len(cells) // 10)
    ax.set_title(f"{len(cells)} anchors per cell (w x h, pixels)")
    return save_figure(fig, path)


def plot_anchor_centers(
    image,
    path=None,
    *,
    anchors=None,
    feature_hw=None,
    stride=None,
    offset=0.0,
    mean=None,
    std=None,
) -> Figure:
    """Anchor centres over ``image [H, W, C]``.

    Give either xyxy ``anchors [N, 4]`` (their distinct centres are drawn) or ``feature_hw`` and
    ``stride`` (and ``offset``), the grid :func:`jax_rpn.anchors.grid_anchors` would use.
    """
    if anchors is None:
        if feature_hw is None or stride is None:
            raise ValueError("plot_anchor_centers needs anchors, or feature_hw and stride")
        anchors = anchor_ops.grid_anchors(feature_hw, stride, np.zeros((1, 4)), offset=offset)
    boxes = np.asarray(anchors, np.float32)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"anchors must have shape [N, 4], got {boxes.shape}")
    centers = np.unique((boxes[:, :2] + boxes[:, 2:]) / 2, axis=0)  # [C, 2]
    fig, axes = new_figure(size=_panel_size(image, 6.0))
    ax = axes[0, 0]
    _show(ax, image, mean, std)
    ax.scatter(centers[:, 0], centers[:, 1], s=16, c="red", edgecolors="white", linewidths=0.5)
    title = f"{len(centers)} anchor centres"
    ax.set_title(title + (f", stride {stride}" if stride is not None else ""))
    return save_figure(fig, path)


def plot_sampled_anchors(
    image,
    anchors,
    labels,
    gt_boxes,
    gt_valid,
    path=None,
    *,
    mean=None,
    std=None,
) -> Figure:
    """Sampled anchors over ``image``: positives (label 1) green, negatives (0) thin red.

    ``anchors [N, 4]`` and ``gt_boxes [G, 4]`` are xyxy; ``labels [N]`` in {1, 0, -1} (-1 is
    not drawn); ``gt_valid [G]`` masks padding. Ground truth is drawn dashed on top.
    """
    boxes = np.asarray(anchors, np.float32)
    labels = np.asarray(labels)
    if boxes.ndim != 2 or boxes.shape[1] != 4 or labels.shape != boxes.shape[:1]:
        raise ValueError(
            f"anchors [N, 4] and labels [N] expected, got {boxes.shape}, {labels.shape}"
        )
    fig, axes = new_figure(size=_panel_size(image, 6.0))
    ax = axes[0, 0]
    _show(ax, image, mean, std)
    _draw_boxes(ax, boxes[labels == 0], color=NEGATIVE_COLOR, linewidth=0.8, alpha=0.5)
    _draw_boxes(ax, boxes[labels == 1], color=POSITIVE_COLOR, linewidth=1.5)
    _draw_boxes(
        ax, np.asarray(gt_boxes)[np.asarray(gt_valid, bool)], color=GT_COLOR, linestyle="--"
    )
    ax.set_title(
        f"{int(np.sum(labels == 1))} positive, {int(np.sum(labels == 0))} negative anchors"
    )
    return save_figure(fig, path)


def _draw_proposals(ax, image, gt_boxes, gt_valid, proposals, scores, valid, *, top, mean, std):
    _show(ax, image, mean, std)
    scores = np.where(np.asarray(valid, bool), np.asarray(scores, np.float32), -np.inf)
    order = np.argsort(-scores, kind="stable")[:top]
    order = order[np.isfinite(scores[order])]
    _draw_boxes(ax, np.asarray(proposals)[order], color=PROPOSAL_COLOR, linewidth=1.0, alpha=0.8)
    gt = np.asarray(gt_boxes)[np.asarray(gt_valid, bool)]
    _draw_boxes(ax, gt, color=GT_COLOR, linewidth=2.0)
    ax.set_title(f"{len(gt)} GT (cyan), top {len(order)} proposals", fontsize="small")


def plot_proposals(
    image, gt_boxes, gt_valid, proposals, scores, valid, path=None, *, top=20, mean=None, std=None
) -> Figure:
    """Ground truth (cyan) vs the ``top`` highest-scoring valid proposals (orange).

    xyxy ``gt_boxes [G, 4]``, ``gt_valid [G]``, ``proposals [K, 4]``, ``scores [K]``,
    ``valid [K]``; ``image [H, W, C]``.
    """
    fig, axes = new_figure(size=_panel_size(image, 6.0))
    _draw_proposals(
        axes[0, 0], image, gt_boxes, gt_valid, proposals, scores, valid, top=top, mean=mean, std=std
    )
    return save_figure(fig, path)


def plot_proposal_grid(
    images,
    gt_boxes,
    gt_valid,
    proposals,
    scores,
    valid,
    path=None,
    *,
    top=20,
    ncols=4,
    mean=None,
    std=None,
) -> Figure:
    """:func:`plot_proposals` for a batch in a grid: ``images [B, H, W, C]``, ``gt_boxes
    [B, G, 4]``, ``gt_valid [B, G]``, ``proposals [B, K, 4]``, ``scores [B, K]``, ``valid [B, K]``.

    For TensorBoard: ``figure_to_array(plot_proposal_grid(...))``.
    """
    b = len(images)
    if b == 0 or not len(gt_boxes) == len(gt_valid) == len(proposals) == len(scores) == len(valid):
        raise ValueError("plot_proposal_grid needs B >= 1 and the same B for every argument")
    ncols = min(ncols, b)
    nrows = -(-b // ncols)
    fig, axes = new_figure(nrows, ncols, size=_panel_size(images[0], 4.0))
    for i, ax in enumerate(axes.flat):
        if i >= b:
            ax.set_axis_off()
            continue
        _draw_proposals(
            ax,
            images[i],
            gt_boxes[i],
            gt_valid[i],
            proposals[i],
            scores[i],
            valid[i],
            top=top,
            mean=mean,
            std=std,
        )
    return save_figure(fig, path)


def plot_recall_curves(curves: dict, path=None) -> Figure:
    """Recall vs IoU and recall vs number of proposals, from
    :meth:`jax_rpn.recall.RecallAccumulator.curves`.
    """
    fig, axes = new_figure(1, 2, size=(5.0, 4.0))
    ax_iou, ax_num = axes[0]
    for count, recall in curves["recall_vs_iou"].items():
        ax_iou.plot(curves["iou_thresholds"], recall, marker="o", label=f"{count} proposals")
    ax_iou.set(xlabel="IoU threshold", ylabel="recall", ylim=(0, 1.02), title="recall vs IoU")
    ax_iou.legend(fontsize="small")
    ax_iou.grid(alpha=0.3)
    for name, recall in curves["recall_vs_num"].items():
        ax_num.plot(curves["num_proposals"], recall, label=name)
    ax_num.set_xscale("log")
    ax_num.set(
        xlabel="number of proposals",
        ylabel="recall",
        ylim=(0, 1.02),
        title="recall vs number of proposals",
    )
    ax_num.legend(fontsize="small")
    ax_num.grid(alpha=0.3, which="both")
    return save_figure(fig, path)
