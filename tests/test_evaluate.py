"""Tests for jax_rpn.evaluate: the recall of a proposals file equals pycocotools' COCOeval
(useCats=0, maxDets=[100, 300, 1000]) on a generated COCO dataset, which is the reference."""

import contextlib
import io
import json

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from jax_rpn import evaluate, proposal_files


def _coco_dataset(rng):
    """A COCO JSON dict and a matching ProposalSet that exercise what COCOeval does:

    - object sizes over all three ranges, with ``area`` fields (like segmentation areas) from
      40% to 100% of the box area, so the size range by ``area`` differs from the box's;
    - crowd boxes (ignored), an image without annotations, an image without proposals, an
      image with 1100 proposals (only the best 1000 count), categories 1-3 (not used);
    - proposals near the objects (jittered) and anywhere, with distinct random scores.
    """
    images, annotations = [], []
    ids, names, boxes, scores = [], [], [], []
    for i in range(9):
        image_id = 100 + 7 * i  # not positions, so a mix-up of ids and rows would show
        h, w = (int(v) for v in rng.integers(200, 640, size=2))
        images.append({"id": image_id, "file_name": f"img{i}.jpg", "height": h, "width": w})
        num_gt = 0 if i == 3 else int(rng.integers(1, 25))
        side = np.exp(rng.uniform(np.log(6), np.log(min(h, w) * 0.9), size=(num_gt, 2)))
        x = rng.uniform(0, w - side[:, 0])
        y = rng.uniform(0, h - side[:, 1])
        gt = np.stack([x, y, side[:, 0], side[:, 1]], axis=1)  # [n, 4] xywh
        for j, (bx, by, bw, bh) in enumerate(gt):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(rng.integers(1, 4)),
                    "bbox": [float(bx), float(by), float(bw), float(bh)],
                    "area": float(bw * bh * rng.uniform(0.4, 1.0)),
                    "iscrowd": int(j % 7 == 3),
                }
            )
        if i == 5:
            continue  # no proposals for this image
        n = 1100 if i == 1 else int(rng.integers(20, 400))
        near = gt[rng.integers(0, max(num_gt, 1), size=n)] if num_gt else np.zeros((n, 4))
        jitter = rng.normal(0, 0.12, size=(n, 4)) * np.tile(near[:, 2:], 2)
        anywhere = np.stack(
            [rng.uniform(0, w, n), rng.uniform(0, h, n), rng.uniform(4, w / 2, n)], axis=1
        )
        anywhere = np.concatenate([anywhere, rng.uniform(4, h / 2, (n, 1))], axis=1)
        xywh = np.where(rng.random((n, 1)) < 0.6, near + jitter, anywhere)
        xywh[:, 2:] = np.abs(xywh[:, 2:]) + 1.0
        xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        ids.append(image_id)
        names.append(f"img{i}.jpg")
        boxes.append(xyxy.astype(np.float32))
        scores.append(rng.permutation(n).astype(np.float32) / n)
    coco = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": c, "name": f"c{c}"} for c in (1, 2, 3)],
    }
    props = proposal_files.ProposalSet.from_lists(
        ids, names, np.zeros((len(ids), 2)), boxes, scores
    )
    return coco, props


def _cocoeval_recall(ann_path, results_path):
    """pycocotools' recall [T, A, M] (IoU thresholds, area ranges, maxDets), useCats=0."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(ann_path)
        dt = gt.loadRes(results_path)
        ev = COCOeval(gt, dt, iouType="bbox")
        ev.params.useCats = 0
        ev.params.maxDets = [100, 300, 1000]
        ev.evaluate()
        ev.accumulate()
    return ev.eval["recall"][:, 0]  # [T, A, M]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    rng = np.random.default_rng(0)
    coco, props = _coco_dataset(rng)
    tmp = tmp_path_factory.mktemp("evaluate")
    ann = str(tmp / "ann.json")
    with open(ann, "w") as f:
        json.dump(coco, f)
    results = proposal_files.write_coco_json(str(tmp / "proposals.json"), props)
    npz = proposal_files.write_npz(str(tmp / "proposals.npz"), props)
    return {"ann": ann, "json": results, "npz": npz, "props": props, "tmp": tmp}


def test_recall_equals_cocoeval(dataset):
    expected = _cocoeval_recall(dataset["ann"], dataset["json"])  # [T, A, M]
    # A discriminating case: partial recall, growing with the number of proposals.
    assert 0 < expected[0, 0, 0] < 1 and np.any(expected[:, 0, 0] < expected[:, 0, 2])
    gt = evaluate.load_coco_ground_truth(dataset["ann"])
    for path in (dataset["json"], dataset["npz"]):  # both formats hold the same proposals
        acc = evaluate.evaluate(gt, proposal_files.read_proposals(path))
        ours = acc.recall()  # [R, T, K]
        for m, count in enumerate((100, 300, 1000)):
            at = ours[:, :, min(count, ours.shape[-1]) - 1].T  # [T, R]
            np.testing.assert_allclose(at, expected[:, :, m], rtol=0, atol=1e-12)
        result = acc.result()
        for m, count in enumerate((100, 300, 1000)):
            assert result[f"AR@{count}"] == pytest.approx(expected[:, 0, m].mean(), abs=1e-12)
            assert result[f"recall@0.5@{count}"] == pytest.approx(expected[0, 0, m], abs=1e-12)
            assert result[f"recall@0.7@{count}"] == pytest.approx(expected[4, 0, m], abs=1e-12)
            for a, name in enumerate(("small", "medium", "large"), start=1):
                assert result[f"AR_{name}@{count}"] == pytest.approx(
                    expected[:, a, m].mean(), abs=1e-12
                )


def test_size_ranges_use_the_area_field(dataset):
    # The generated areas are 40-100% of the box areas; sizing objects by box area (what
    # recall.recall_stats alone does) gives other per-size counts than COCOeval's.
    gt = evaluate.load_coco_ground_truth(dataset["ann"])
    counted = gt.valid & ~gt.ignore
    box_area = np.prod(gt.boxes[..., 2:] - gt.boxes[..., :2], axis=-1)
    result = evaluate.evaluate(gt, dataset["props"]).result()
    assert result["num_gt_small"] == np.sum(counted & (gt.area <= 32**2))
    assert result["num_gt_small"] != np.sum(counted & (box_area <= 32**2))


def test_unknown_image_ids_are_an_error(dataset):
    gt = evaluate.load_coco_ground_truth(dataset["ann"])
    props = dataset["props"]
    wrong = proposal_files.ProposalSet(
        image_ids=np.arange(props.num_images),  # positions, not the COCO ids
        file_names=props.file_names,
        image_hw=props.image_hw,
        boxes=props.boxes,
        scores=props.scores,
        valid=props.valid,
    )
    with pytest.raises(ValueError, match="--annotations"):
        evaluate.evaluate(gt, wrong)


def test_command_writes_metrics_and_curves(dataset, capsys):
    out = dataset["tmp"] / "report"
    result = evaluate.run(annotations=dataset["ann"], proposals=dataset["npz"], output=str(out))
    printed = capsys.readouterr().out
    assert "AR@100" in printed and "AR_small@1000" in printed
    assert "1 annotation images have no proposals" in printed
    with open(out / "proposals_recall.json") as f:
        assert json.load(f) == pytest.approx(result)
    assert (out / "proposals_recall_curves.png").stat().st_size > 0
    assert result["num_images"] == 9 and result["images_without_proposals"] == 1
