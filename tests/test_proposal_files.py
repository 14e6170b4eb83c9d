"""Tests for jax_rpn.proposal_files: the npz and COCO results JSON formats round-trip exactly,
and malformed files are errors naming the file, the record and the field."""

import json

import numpy as np
import pytest

from jax_rpn import proposal_files


def _proposals():
    boxes = [
        np.array([[1.5, 2.25, 30.125, 40.0], [0.1, 0.2, 0.3, 0.4], [5, 5, 9, 7]], np.float32),
        np.zeros((0, 4)),  # an image without proposals
        np.array([[10, 20, 30, 40], [15.3, 25.7, 35.1, 45.9]], np.float32),
    ]
    scores = [np.array([0.9, 0.5, 0.25]), np.zeros(0), np.array([1.0 / 3.0, 0.7])]  # unsorted
    return proposal_files.ProposalSet.from_lists(
        [42, 7, 1000], ["a.jpg", "b.png", ""], [(50, 60), (8, 8), (100, 100)], boxes, scores
    )


def test_npz_round_trip(tmp_path):
    props = _proposals()
    assert props.boxes.shape == (3, 3, 4) and props.valid.sum() == 5
    back = proposal_files.read_npz(proposal_files.write_npz(str(tmp_path / "p.npz"), props))
    for key in proposal_files.NPZ_KEYS:
        np.testing.assert_array_equal(getattr(back, key), getattr(props, key))
    with np.load(tmp_path / "p.npz", allow_pickle=False) as data:  # plain numpy reads it
        assert sorted(data.files) == sorted(proposal_files.NPZ_KEYS)


def test_coco_json_round_trip(tmp_path):
    props = _proposals()
    path = proposal_files.write_coco_json(str(tmp_path / "p.json"), props)
    records = json.loads(open(path).read())
    assert len(records) == 5  # valid proposals only
    assert records[0] == {
        "image_id": 42,
        "category_id": 1,
        "bbox": [1.5, 2.25, 28.625, 37.75],  # xywh of [1.5, 2.25, 30.125, 40.0]
        "score": pytest.approx(0.9),
        "file_name": "a.jpg",
    }
    assert "file_name" not in records[-1]  # unknown names are left out
    back = proposal_files.read_coco_json(path)
    assert back.image_ids.tolist() == [42, 1000]  # images with proposals, in file order
    keep = props.valid.any(axis=1)
    np.testing.assert_array_equal(back.boxes, props.boxes[keep][:, :3])  # float32 exact
    np.testing.assert_array_equal(back.scores, props.scores[keep][:, :3])
    np.testing.assert_array_equal(back.valid, props.valid[keep][:, :3])
    assert back.file_names.tolist() == ["a.jpg", ""]


def test_objectness_probability():
    logits = np.array([[0.0, 2.0, -np.inf], [100.0, -100.0, np.inf]], np.float32)
    valid = np.array([[True, True, False], [True, True, False]])
    p = proposal_files.objectness_probability(logits, valid)
    # sigmoid by hand: 1 / (1 + e^-x); empty slots 0.
    np.testing.assert_allclose(p, [[0.5, 1 / (1 + np.exp(-2.0)), 0.0], [1.0, 0.0, 0.0]])
    assert p.dtype == np.float32


def test_top_proposals_orders_by_score_stably():
    props = _proposals()
    boxes, scores, valid = proposal_files.top_proposals(props, 2)
    assert boxes.shape == (3, 2, 4)
    np.testing.assert_array_equal(scores[2], np.float32([0.7, 1.0 / 3.0]))  # best first
    np.testing.assert_array_equal(boxes[2], props.boxes[2, [1, 0]])
    np.testing.assert_array_equal(scores[0], np.float32([0.9, 0.5]))  # the best 2 of 3
    assert not valid[1].any() and valid[0].all()


@pytest.mark.parametrize(
    "records, message",
    [
        ({"image_id": 1}, "a JSON list of records, got dict"),
        ([{"image_id": 1, "bbox": [0, 0, 1, 1]}], "record 0 has no 'score'"),
        ([{"image_id": "1", "bbox": [0, 0, 1, 1], "score": 1}], "record 0: image_id must be"),
        ([{"image_id": 1, "bbox": [0, 0, 1], "score": 1}], r"record 0: bbox must be \[x, y"),
        ([{"image_id": 1, "bbox": [0, 0, -1, 1], "score": 1}], "width and height must be >= 0"),
        ([{"image_id": 1, "bbox": [0, 0, 1, 1], "score": float("nan")}], "score must be a finite"),
        ([{"image_id": 1, "bbox": [0, None, 1, 1], "score": 1}], "bbox must be a finite"),
    ],
)
def test_bad_coco_json_names_record_and_field(tmp_path, records, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(records))  # json writes NaN as NaN, which json reads back
    with pytest.raises(ValueError, match=message) as info:
        proposal_files.read_proposals(str(path))
    assert "bad.json" in str(info.value)


def test_bad_files_are_named(tmp_path):
    np.savez(tmp_path / "x.npz", boxes=np.zeros((1, 1, 4)))
    with pytest.raises(ValueError, match=r"x.npz: missing keys \['image_ids'"):
        proposal_files.read_proposals(str(tmp_path / "x.npz"))
    (tmp_path / "y.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="y.npz: not a readable npz"):
        proposal_files.read_proposals(str(tmp_path / "y.npz"))
    (tmp_path / "z.pkl").write_bytes(b"")
    with pytest.raises(ValueError, match="z.pkl: not a readable pickle"):
        proposal_files.read_proposals(str(tmp_path / "z.pkl"))
    with pytest.raises(FileNotFoundError, match="nothing.json does not exist"):
        proposal_files.read_proposals(str(tmp_path / "nothing.json"))


def test_detectron2_proposal_pickles_are_read_without_running_code(tmp_path, monkeypatch):
    """A PROPOSAL_FILES pickle as detectron2 writes it: its BoxMode enum is a global of
    detectron2's, here a stand-in module, so the file refers to it by name."""
    import enum
    import pickle
    import sys
    import types

    class BoxMode(enum.IntEnum):
        XYXY_ABS = 0
        XYWH_ABS = 1

    module = types.ModuleType("detectron2.structures.boxes")
    BoxMode.__module__, BoxMode.__qualname__ = module.__name__, "BoxMode"
    module.BoxMode = BoxMode
    for name in ("detectron2", "detectron2.structures", "detectron2.structures.boxes"):
        monkeypatch.setitem(sys.modules, name, module)
    data = {
        "ids": [7, 9],
        "boxes": [np.array([[0, 0, 10, 20], [5, 5, 6, 8]], np.float32), np.zeros((0, 4))],
        "objectness_logits": [np.array([-1.0, 2.0], np.float32), np.zeros(0)],
        "bbox_mode": BoxMode.XYWH_ABS,
    }
    path = tmp_path / "proposals.pkl"
    path.write_bytes(pickle.dumps(data))
    props = proposal_files.read_proposals(str(path))
    assert props.image_ids.tolist() == [7, 9]
    # Sorted by score; XYWH -> XYXY by hand; sigmoid(2) = 0.8808, sigmoid(-1) = 0.2689.
    np.testing.assert_allclose(props.boxes[0], [[5, 5, 11, 13], [0, 0, 10, 20]])
    np.testing.assert_allclose(props.scores[0], [0.8808, 0.2689], atol=1e-4)
    assert props.valid.tolist() == [[True, True], [False, False]]

    class Evil:
        def __reduce__(self):
            return (print, ("ran code",))

    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"ids": [1], "boxes": [Evil()], "objectness_logits": [0]}))
    with pytest.raises(ValueError, match="refused to unpickle the global builtins.print"):
        proposal_files.read_proposals(str(evil))
