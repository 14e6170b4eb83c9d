"""The examples run: examples/two_stage_detector.py trains a few steps on rpn_shapes/small, on
its RPN's proposals and on a precomputed proposal file."""

import importlib.util
import json
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from jax_rpn import proposal_files
from jax_rpn.data import shapes

pytestmark = pytest.mark.slow  # end-to-end runs: first in the queue (tests/conftest.py)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _recording(example, monkeypatch):
    """Collects the batches the example trains on (the same dict objects)."""
    batches = []
    create = example.pipeline.create_train_iterator

    def recording_iterator(*args, **kwargs):
        for batch in create(*args, **kwargs):
            batches.append(batch)
            yield batch

    monkeypatch.setattr(example.pipeline, "create_train_iterator", recording_iterator)
    return batches


def _unchanged(before, after) -> list[str]:
    """Paths of the parameters that training left as they were."""
    same = jax.tree.map(lambda a, b: bool(np.all(np.asarray(a) == np.asarray(b))), before, after)
    return [jax.tree_util.keystr(p) for p, v in jax.tree.leaves_with_path(same) if v]


def test_two_stage_detector_trains(shapes_dir, monkeypatch, fast_compile):
    example = _load("two_stage_detector")
    batches = _recording(example, monkeypatch)
    result = example.main(
        ["--steps", "3", "--batch-size", "2", "--image-size", "64", "--data-dir", shapes_dir]
    )
    history = result["history"]
    assert len(history) == 3 and len(batches) == 3
    # The second stage trains on the real shape classes (0..3), not a zero fill.
    labels = np.concatenate([b["labels"][b["valid"]] for b in batches])
    assert labels.max() > 0 and labels.max() < len(shapes.CLASS_NAMES)
    for metrics in history:
        assert set(metrics) == {"loss", "rpn", "cls", "box", "fg_accuracy"}
        assert all(np.isfinite(v) for v in metrics.values()), metrics
        assert metrics["loss"] == pytest.approx(metrics["rpn"] + metrics["cls"] + metrics["box"])
        assert metrics["rpn"] > 0 and metrics["cls"] > 0 and 0 <= metrics["fg_accuracy"] <= 1
    # The second-stage head and the shared backbone both learn from the composed loss.
    for part in ("box_head", "rpn"):
        assert not _unchanged(result["initial_params"][part], result["params"][part]), part


def test_two_stage_detector_trains_on_a_proposal_file(
    shapes_dir, tmp_path, monkeypatch, fast_compile
):
    example = _load("two_stage_detector")
    common = ["--data-name", "rpn_shapes/small", "--data-dir", shapes_dir, "--image-size", "64"]
    example.main(["--write-images", str(tmp_path / "split")] + common)

    # The written files are the training split: record 5's JPEG and boxes (pipeline decode).
    source = shapes.ensure_prepared("rpn_shapes/small", data_dir=shapes_dir).as_data_source("train")
    image, gt, _, _ = example.pipeline.decode_example(source[5], family="rpn_shapes")
    written = np.asarray(Image.open(tmp_path / "split" / "images" / "000005.jpg"))
    np.testing.assert_array_equal(written, image)
    coco = json.loads((tmp_path / "split" / "annotations.json").read_text())
    assert len(coco["images"]) == 32
    boxes5 = [a["bbox"] for a in coco["annotations"] if a["image_id"] == 5]
    np.testing.assert_allclose(boxes5, np.concatenate([gt[:, :2], gt[:, 2:] - gt[:, :2]], 1))

    # A proposal file (as predict writes one, in original pixels): each image's ground truth
    # as its best proposals, then boxes shifted off them.
    ids, names, sizes, all_boxes, all_scores = [], [], [], [], []
    for im in coco["images"]:
        xywh = np.array([a["bbox"] for a in coco["annotations"] if a["image_id"] == im["id"]])
        xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        ids.append(im["id"])
        names.append(im["file_name"])
        sizes.append((im["height"], im["width"]))
        all_boxes.append(np.concatenate([xyxy, xyxy + 7.0]))
        all_scores.append(np.concatenate([np.full(len(xyxy), 0.9), np.full(len(xyxy), 0.2)]))
    path = str(tmp_path / "proposals.npz")
    proposal_files.write_npz(
        path, proposal_files.ProposalSet.from_lists(ids, names, sizes, all_boxes, all_scores)
    )

    batches = _recording(example, monkeypatch)
    result = example.main(["--proposals", path, "--steps", "2", "--batch-size", "2"] + common)
    for metrics in result["history"]:
        assert metrics["rpn"] == 0.0  # no RPN head, no RPN loss: a Fast R-CNN
        assert all(np.isfinite(v) for v in metrics.values()) and metrics["cls"] > 0
    assert "head" not in result["params"]["rpn"]
    # Backbone, FPN and box head learn. At 64x64 every ROI pools from P2 (RoIAlign's level
    # rule: 4 + log2(sqrt(area) / 224) < 3), so P3-P5's output convolutions get no gradient.
    unchanged = _unchanged(result["initial_params"], result["params"])
    assert unchanged == [
        f"['rpn']['neck']['output{l}']['{p}']" for l in (3, 4, 5) for p in ("bias", "kernel")
    ]
    # The ROIs of a batch: the file's boxes in the batch's resized pixels. The ground-truth
    # proposals land on the pipeline's own (unflipped, resized) ground truth.
    file = proposal_files.read_npz(path)
    rois, roi_valid = example.proposals_for_batch(file, batches[0], 100)
    for i in range(2):
        want = batches[0]["boxes"][i][batches[0]["valid"][i]]  # [n, 4]
        got = rois[i][roi_valid[i]]
        gaps = np.abs(want[:, None] - got[None]).max(-1).min(-1)  # nearest ROI of each box
        assert np.all(gaps < 1e-4), gaps
    with pytest.raises(ValueError, match="no image with id 999"):
        example.proposals_for_batch(file, {**batches[0], "index": np.array([999, 0])}, 100)
