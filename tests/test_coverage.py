"""Tests of jax_rpn.coverage: best anchor IoU per box, categories, k-means, the report and CLI."""

import json
import os
import subprocess
import sys

import jax
import matplotlib.image
import numpy as np
import pytest
from PIL import Image

from configs import tiny
from jax_rpn import anchors
from jax_rpn.coverage import analysis, anchor_fit, proposals, report
from jax_rpn.settings import TargetSettings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _grid_anchors(size=16.0, ratios=(1.0,), stride=4, hw=(32, 32)):
    """One level of anchors: size x size squares (and ratios) every `stride` px, offset 0."""
    cells = anchors.cell_anchors((size,), ratios)
    return anchors.grid_anchors((hw[0] // stride, hw[1] // stride), stride, cells)  # [N, 4]


def _coverage(anchor_boxes, gt, *, allow_low_quality=True, high=0.7, border=None):
    """batch_coverage of one image holding `gt` [G, 4] (all valid) in a 32x32 image."""
    gt = np.asarray(gt, np.float32)[None]  # [1, G, 4]
    g = gt.shape[1]
    best, num_pos = analysis.batch_coverage(
        anchor_boxes,
        gt,
        np.ones((1, g), bool),
        np.zeros((1, g), bool),
        np.array([[32, 32]], np.int32),
        high=high,
        low=0.3,
        allow_low_quality=allow_low_quality,
        border=border,
    )
    return np.asarray(best[0]), np.asarray(num_pos[0])


def test_box_equal_to_an_anchor_has_best_iou_exactly_one():
    a = _grid_anchors(ratios=(0.5, 1.0, 2.0))
    gt = a[[40, 100]]  # two anchors of different shapes, as ground truth
    best, num_pos = _coverage(a, gt)
    assert best.tolist() == [1.0, 1.0]  # exactly, not approximately
    # Hand count: an anchor shifted by one stride (4 px) has IoU 192/320 = 0.6 with a 16x16
    # box (0.5 or lower for the other shapes), so each box has exactly one positive anchor.
    assert num_pos.tolist() == [1, 1]
    assert analysis.categories(best, high=0.7).tolist() == [0, 0]  # "high"
    np.testing.assert_array_equal(analysis.best_anchor_iou(a, gt), [1.0, 1.0])


def test_box_smaller_than_the_smallest_anchor_is_uncovered_at_high():
    a = _grid_anchors()  # 16x16 anchors centred at 0, 4, ..., 28
    gt = [[6.0, 6.0, 10.0, 10.0]]  # 4x4, centred on the anchor at (8, 8)
    best, num_pos = _coverage(a, gt)
    # Hand-computed: the box lies inside the anchor, IoU = 16 / 256.
    assert best[0] == pytest.approx(16 / 256, abs=1e-7)
    assert analysis.CATEGORIES[analysis.categories(best, high=0.7)[0]] == "low_quality_only"
    # Low-quality matching makes every tied anchor positive: those containing the box, centred
    # at x, y in {4, 8, 12} (|c - 8| <= 6): 9 anchors.
    assert num_pos[0] == 9
    _, num_pos = _coverage(a, gt, allow_low_quality=False)
    assert num_pos[0] == 0  # without low-quality matching it never becomes positive


def test_box_far_from_every_anchor_is_uncovered():
    a = _grid_anchors()
    best, num_pos = _coverage(a, [[100.0, 100.0, 110.0, 120.0], [0.0, 0.0, 0.0, 0.0]])
    assert best.tolist() == [0.0, 0.0] and num_pos.tolist() == [0, 0]
    assert analysis.categories(best[:1], high=0.7).tolist() == [2]  # "none"


def test_each_image_is_matched_against_the_anchors_of_its_padded_shape():
    """Aspect buckets: a landscape (32x64) and a portrait (64x32) padded image, each holding a
    box equal to the last anchor of its own canvas, which lies outside the other canvas."""
    land, port = (32, 64), (64, 32)
    a = {hw: _grid_anchors(hw=hw) for hw in (land, port)}  # 16x16 squares every 4 px
    # Hand-placed: centre (60, 28) -> [52, 20, 68, 36] and centre (28, 60) -> [20, 52, 36, 68].
    gt_boxes = np.stack([a[land][-1:], a[port][-1:]])  # [2, 1, 4]
    np.testing.assert_array_equal(gt_boxes[:, 0], [[52, 20, 68, 36], [20, 52, 36, 68]])
    gt = analysis.GroundTruth(
        boxes=gt_boxes,
        valid=np.ones((2, 1), bool),
        ignore=np.zeros((2, 1), bool),
        image_hw=np.array([land, port], np.int32),
        pad_hw=np.array([land, port], np.int32),
        index=np.array([0, 1], np.int32),
        num_dropped=0,
    )
    kw = {"targets": TargetSettings(), "progress": False}
    cov = analysis.compute_coverage(a, gt, **kw)
    assert cov.best_iou.tolist() == [1.0, 1.0]
    # One positive each: the neighbours shifted by one stride reach IoU 192/320 = 0.6 < 0.7.
    assert cov.num_positive.tolist() == [1, 1]
    # With the landscape canvas's anchors only, the portrait box (y from 52) overlaps none:
    # the nearest anchor row ends at y = 28 + 8 = 36.
    cov = analysis.compute_coverage(a[land], gt, **kw)
    assert cov.best_iou.tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match=r"no entry for the padded shapes \[\(64, 32\)\]"):
        analysis.compute_coverage({land: a[land]}, gt, **kw)


def _numpy_iou(a, b):
    """Independent IoU [N, M] in float64."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=-1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=-1)
    return inter / (area_a[:, None] + area_b[None, :] - inter)


@pytest.mark.parametrize("border", [None, 0.0])
def test_best_anchor_iou_matches_numpy_with_chunks_and_border(border):
    rng = np.random.default_rng(0)
    a = _grid_anchors(size=12.0, ratios=(0.5, 1.0, 2.0), stride=8, hw=(48, 48))  # N = 108
    xy = rng.uniform(0, 40, (50, 2))
    gt = np.concatenate([xy, xy + rng.uniform(2, 20, (50, 2))], axis=1).astype(np.float32)
    hw = rng.integers(30, 49, (50, 2)).astype(np.int32)
    iou = _numpy_iou(a.astype(np.float64), gt.astype(np.float64))  # [N, M]
    if border is not None:  # matching.inside_image's rule, written out
        inside = (
            (a[:, None, 0] >= -border)
            & (a[:, None, 1] >= -border)
            & (a[:, None, 2] < hw[None, :, 1] + border)
            & (a[:, None, 3] < hw[None, :, 0] + border)
        )
        iou = np.where(inside, iou, 0.0)
    # chunk 7 does not divide N = 108: several scan steps and zero-area padding anchors.
    got = analysis.best_anchor_iou(a, gt, gt_image_hw=hw, border=border, chunk=7)
    np.testing.assert_allclose(got, iou.max(axis=0), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="gt_boxes"):
        analysis.best_anchor_iou(a, gt[:, :3])
    with pytest.raises(ValueError, match="border needs gt_image_hw"):
        analysis.best_anchor_iou(a, gt, border=0.0)


def test_summarize_bins_and_worst():
    boxes = np.array(
        [[0, 0, 10, 10], [0, 0, 50, 50], [0, 0, 100, 100], [0, 0, 10, 40], [0, 0, 40, 10]],
        np.float32,
    )
    cov = analysis.BoxCoverage(
        image_index=np.array([0, 0, 1, 2, 2], np.int32),
        boxes=boxes,
        best_iou=np.array([0.2, 0.75, 0.9, 0.0, 0.5], np.float32),
        num_positive=np.array([1, 2, 3, 0, 1], np.int32),
    )
    s = analysis.summarize(cov, high=0.7, worst=2)
    o = s["overall"]
    assert (o["boxes"], o["high"], o["low_quality_only"], o["none"]) == (5, 0.4, 0.4, 0.2)
    assert o["matched"] == 0.8
    # COCO areas: 100, 400, 400 small; 2500 medium; 10000 large.
    assert [(r["bin"], r["boxes"]) for r in s["coco_sizes"]] == [
        ("small", 3),
        ("medium", 1),
        ("large", 1),
    ]
    assert [(r["bin"], r["boxes"]) for r in s["ratios"]] == [("<=1/4", 1), ("1", 3), (">=4", 1)]
    assert sum(r["boxes"] for r in s["sizes"]) == 5
    assert [w["best_iou"] for w in s["worst"]] == pytest.approx([0.0, 0.2])
    assert s["worst"][0]["image_index"] == 2 and s["worst"][0]["box"] == [0, 0, 10, 40]


def test_kmeans_recovers_three_shapes():
    rng = np.random.default_rng(1)
    truth = np.array([[10.0, 40.0], [30.0, 30.0], [80.0, 20.0]])  # areas 400, 900, 1600
    wh = np.concatenate([t * rng.uniform(0.93, 1.07, (150, 2)) for t in truth])
    rng.shuffle(wh)
    centres = anchor_fit.kmeans_shapes(wh, 3, seed=0)
    np.testing.assert_allclose(centres, truth, rtol=0.03)
    with pytest.raises(ValueError, match="k must be"):
        anchor_fit.kmeans_shapes(wh[:2], 3)


def test_suggest_anchors_fits_levels_and_keeps_a():
    rng = np.random.default_rng(2)
    # Boxes of sizes 18-22 and 36-44 (near levels of sizes 16 and 32), h / w 1/2 or 2.
    size = np.repeat([20.0, 40.0], 100) * rng.uniform(0.9, 1.1, 200)
    ratio = np.tile([0.5, 2.0], 100)
    w, h = size / np.sqrt(ratio), size * np.sqrt(ratio)
    boxes = np.stack([np.zeros(200), np.zeros(200), w, h], axis=1)
    s = anchor_fit.suggest_anchors(
        boxes, strides=(4, 8), sizes=((16,), (32,)), aspect_ratios=(0.5, 2.0)
    )
    assert s.boxes_per_level == (100, 100)
    assert [len(x) for x in s.sizes] == [1, 1]
    assert [x[0] for x in s.sizes] == pytest.approx([20.0, 40.0], abs=0.5)  # medians
    assert s.aspect_ratios == pytest.approx((0.5, 2.0), abs=0.02)
    # More sizes per level: A = 2 x 2 on both levels, sizes spread around each cluster.
    s = anchor_fit.suggest_anchors(
        boxes, strides=(4, 8), sizes=((16,), (32,)), aspect_ratios=(0.5, 2.0), sizes_per_level=2
    )
    assert [len(x) for x in s.sizes] == [2, 2]
    assert 18 <= s.sizes[0][0] < 20 < s.sizes[0][1] <= 22
    assert 36 <= s.sizes[1][0] < 40 < s.sizes[1][1] <= 44
    cells = anchors.level_cell_anchors((4, 8), s.sizes, s.aspect_ratios)
    assert [c.shape[0] for c in cells] == [4, 4]
    with pytest.raises(ValueError, match="same count"):
        anchor_fit.suggest_anchors(
            boxes, strides=(4, 8), sizes=(16,), aspect_ratios=((0.5, 2.0), (1.0,))
        )


def _tiny_config(data_dir):
    c = tiny.get_config()  # 64x64 padded images: rpn_shapes/small is resized to 48x64
    c.data.name = "rpn_shapes/small"
    c.data.data_dir = data_dir
    return c


def _check_png(path):
    assert os.path.getsize(path) > 1000
    img = matplotlib.image.imread(path)
    assert img.shape[0] >= 200 and img.shape[1] >= 200 and img[..., :3].std() > 0.01


def test_run_on_shapes_writes_report_and_pictures(shapes_dir, tmp_path):
    config = _tiny_config(shapes_dir)
    out = str(tmp_path / "out")
    result = report.run(config, out_dir=out, max_images=5, progress=False)
    gt = analysis.load_ground_truth(config, max_images=5, progress=False)
    assert result["setup"]["num_images"] == 5
    assert result["current"]["overall"]["boxes"] == int(np.sum(gt.valid & ~gt.ignore))
    for part in ("current", "suggested"):
        o = result[part]["overall"]
        assert o["high"] + o["low_quality_only"] + o["none"] == pytest.approx(1.0)
        assert sum(r["boxes"] for r in result[part]["sizes"]) == o["boxes"]
        assert result[part]["anchors"]["num_cell_anchors"] == 3
    names = sorted(os.path.basename(p) for p in result["pictures"])
    assert names == [
        "best_iou.png",
        "cell_anchors.png",
        "coverage.png",
        "coverage_by_ratio.png",
        "coverage_by_size.png",
        "current_vs_suggested.png",
    ]
    for p in result["pictures"]:
        _check_png(p)
    with open(os.path.join(out, "coverage.json")) as f:
        assert json.load(f)["current"]["overall"] == result["current"]["overall"]
    text = report.format_report(result)
    assert "Does every object get an anchor?" in text and "What about very small boxes?" in text
    assert "config.anchors.sizes = " in text


def test_cli_prints_json(shapes_dir, tmp_path):
    out = str(tmp_path / "cli")
    cmd = [
        sys.executable,
        "-m",
        "jax_rpn.coverage",
        "--config",
        os.path.join(REPO, "configs", "tiny.py"),
        "--config.data.name=rpn_shapes/small",
        f"--config.data.data_dir={shapes_dir}",
        "--max_images=3",
        f"--out={out}",
        "--nosuggest",
        "--nomatch",
        "--json",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["setup"]["num_images"] == 3 and result["suggested"] is None
    assert result["current"]["overall"]["matched"] is None  # --nomatch: the matcher was skipped
    assert os.path.exists(os.path.join(out, "coverage.png"))
    assert not os.path.exists(os.path.join(out, "current_vs_suggested.png"))


def test_run_with_aspect_buckets_uses_each_buckets_anchors(tmp_path):
    """Two landscape (96x128) and two portrait (128x96) images, each with a 36x36 box in its
    bottom-right corner, padded to 64x128 or 128x64. A portrait image is the transpose of a
    landscape one, and so are its padded canvas, its anchors (ratios 0.5 / 1 / 2 are symmetric)
    and its box: both must reach exactly the same best IoU. With the landscape canvas's anchors
    only, the portrait boxes (below y = 64) would lose their best anchors."""
    images, annotations = [], []
    rng = np.random.default_rng(0)
    for i in range(4):
        h, w = (96, 128) if i < 2 else (128, 96)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(tmp_path / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "height": h, "width": w})
        annotations.append({"id": i + 1, "image_id": i + 1, "category_id": 1,
                            "bbox": [w - 40, h - 40, 36, 36], "iscrowd": 0})  # fmt: skip
    (tmp_path / "ann.json").write_text(
        json.dumps(
            {
                "images": images,
                "annotations": annotations,
                "categories": [{"id": 1, "name": "thing"}],
            }
        )  # fmt: skip
    )
    config = tiny.get_config()
    config.data.name = "coco_json"
    config.data.data_dir = str(tmp_path / "tfds")
    config.data.train_annotations = config.data.eval_annotations = str(tmp_path / "ann.json")
    config.data.train_images = config.data.eval_images = str(tmp_path)
    config.data.short_side, config.data.max_size = 64, 128
    config.data.pad_to, config.data.aspect_buckets = (64, 128), True
    config.batch_size = 2
    result = report.run(config, suggest=False, progress=False)
    assert result["setup"]["padded_shapes"] == [[64, 128], [128, 64]]
    worst = {w["image_index"]: w for w in result["current"]["worst"]}
    for land, port in ((0, 2), (1, 3)):
        x1, y1, x2, y2 = worst[land]["box"]
        assert worst[port]["box"] == [y1, x1, y2, x2]  # transposed
        assert worst[port]["best_iou"] == worst[land]["best_iou"] > 0.4
    assert "at most 64x128 or 128x64" in report.format_report(result)


# --- proposal coverage (--model) ----------------------------------------------------------------


def test_best_proposal_iou_matches_numpy_over_top_k_valid_proposals():
    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 50, (2, 20, 2))
    props = np.concatenate([xy, xy + rng.uniform(2, 30, (2, 20, 2))], -1).astype(np.float32)
    valid = rng.random((2, 20)) < 0.7
    xy = rng.uniform(0, 50, (2, 5, 2))
    gt = np.concatenate([xy, xy + rng.uniform(2, 30, (2, 5, 2))], -1).astype(np.float32)
    gt[1, 4] = 0.0  # a padding slot: zero area
    got = proposals.best_proposal_iou(props, valid, gt, top_k=12)
    for b in range(2):
        iou = _numpy_iou(gt[b].astype(np.float64), props[b, :12].astype(np.float64))  # [G, 12]
        iou = np.where(valid[b, :12], np.nan_to_num(iou), 0.0)
        np.testing.assert_allclose(got[b], iou.max(axis=1), rtol=1e-6, atol=1e-7)
    assert got[1, 4] == 0.0
    with pytest.raises(ValueError, match=r"top_k must be in \[1, K=20\]"):
        proposals.best_proposal_iou(props, valid, gt, top_k=21)


def _random_model(config):
    from jax_rpn.models import build_rpn, init_variables

    h, w = config.data.pad_to
    return init_variables(build_rpn(config), jax.random.key(0), (1, h, w, 3))


def test_proposal_coverage_counts_boxes_with_a_good_proposal(shapes_dir, fast_compile):
    """Checked against the model's proposals from ``predict_proposals`` and a numpy IoU."""
    from jax_rpn import inference
    from jax_rpn.data import pipeline

    config = _tiny_config(shapes_dir)
    variables = _random_model(config)
    result = proposals.run_proposals(
        config, variables, model="random", top_k=30, max_images=6, progress=False
    )
    cfg = config.copy_and_resolve_references()
    cfg.data.num_eval_images = 6
    best = []
    for batch in pipeline.create_eval_iterator(cfg, process_index=0, process_count=1):
        props = inference.predict_proposals(
            variables, batch["image"], batch["image_hw"], config=cfg
        )
        for i in np.flatnonzero(batch["example_valid"]):
            use = batch["valid"][i] & ~batch["ignore"][i]
            p = np.asarray(props.boxes[i, :30], np.float64)[np.asarray(props.valid[i, :30])]
            iou = _numpy_iou(np.asarray(batch["boxes"][i][use], np.float64), p)
            best += list(iou.max(axis=1) if p.size else np.zeros(int(use.sum())))
    best = np.array(best)
    o = result["summary"]["overall"]
    assert result["setup"]["num_images"] == 6 and o["boxes"] == best.size > 0
    assert o["iou>=0.5"] == pytest.approx(np.mean(best >= 0.5))
    assert o["iou>=0.7"] == pytest.approx(np.mean(best >= 0.7))
    assert o["mean_best_iou"] == pytest.approx(best.mean(), rel=1e-5)
    assert sum(r["boxes"] for r in result["summary"]["sizes"]) == o["boxes"]
    text = proposals.format_proposal_report(result)
    assert "Does every object get a good proposal?" in text and "top 30 proposals" in text
    with pytest.raises(ValueError, match=r"top_k must be in \[1, config.proposals"):
        proposals.run_proposals(config, variables, model="random", top_k=10**6, max_images=1)


def test_cli_proposal_coverage_of_a_saved_model(shapes_dir, tmp_path):
    from jax_rpn import checkpoints

    config = _tiny_config(shapes_dir)
    model = str(tmp_path / "model")
    checkpoints.save_variables(model, _random_model(config), config=config)
    cmd = [sys.executable, "-m", "jax_rpn.coverage", f"--model={model}", "--max_images=3"]
    cmd += ["--top_k=20", "--json"]
    env = dict(os.environ, JAX_DISABLE_MOST_OPTIMIZATIONS="true")  # compile time
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)  # the stored config: rpn_shapes/small from the data_dir
    assert result["setup"]["num_images"] == 3 and result["setup"]["top_k"] == 20
    assert os.path.exists(os.path.join(model, "coverage", "proposal_report.txt"))
