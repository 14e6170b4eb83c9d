"""Proposal files: the proposals of a set of images on disk, shared by predict, evaluate and
second stages (detectron2's ``PROPOSAL_FILES``, mmdetection's proposal files).

Boxes are in pixels of the original images. Two formats are read and written:

* **COCO results JSON** (``.json``): a list of records ``{"image_id": int, "bbox": [x, y, w,
  h], "score": float, "category_id": 1}``, several per image; ``predict`` adds ``"file_name"``.
  ``category_id`` is 1 for every proposal (mmdetection's proposal JSON does the same); it is
  not read back. Any tool's COCO results file (detectron2's, a user's) can be read.
* **npz** (``.npz``, ours, compact): ``np.load(path)`` gives

  ============== ========================= ==========================================
  ``image_ids``  int64 ``[I]``             COCO image ids (or positions, see predict)
  ``file_names`` str ``[I]``               image file names ("" when unknown)
  ``image_hw``   int32 ``[I, 2]``          original image (height, width); 0 unknown
  ``boxes``      float32 ``[I, K, 4]``     ``[x1, y1, x2, y2]`` original pixels, 0 pad
  ``scores``     float32 ``[I, K]``        objectness probability, 0 in padding
  ``valid``      bool ``[I, K]``           slot holds a proposal
  ============== ========================= ==========================================

  Valid slots come first in each row, highest score first. Reading needs no pickle
  (``allow_pickle=False``).

Scores: ``predict`` writes the objectness probability, the sigmoid of the RPN's foreground
logit (for a ``softmax`` head that logit is foreground minus background, so this equals the
softmax's foreground probability). Recall only ranks proposals by score, in a stable order, so
any score that grows with confidence gives the same numbers.

detectron2's precomputed-proposal pickles (``.pkl``: ``ids``, ``boxes`` ``[n_i, 4]`` in
``bbox_mode`` XYXY_ABS or XYWH_ABS, ``objectness_logits [n_i]``, detectron2's
``PROPOSAL_FILES``) are read through the plain-data unpickler of
``jax_rpn.interop.safe_load``; scores become sigmoid probabilities.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import functools
import json
import math
import os

import numpy as np

from jax_rpn import files

NPZ_KEYS = ("image_ids", "file_names", "image_hw", "boxes", "scores", "valid")
PROPOSAL_CATEGORY_ID = 1  # category_id written with every proposal in COCO results JSON


@dataclasses.dataclass(frozen=True)
class ProposalSet:
    """Proposals of I images padded to K slots; boxes ``[x1, y1, x2, y2]`` original pixels.

    Attributes:
      image_ids: int64 ``[I]``, unique.
      file_names: str ``[I]`` ("" where unknown).
      image_hw: int32 ``[I, 2]``, original (height, width); 0 where unknown.
      boxes: float32 ``[I, K, 4]``, finite.
      scores: float32 ``[I, K]``, finite in valid slots (higher = more confident).
      valid: bool ``[I, K]``.
    """

    image_ids: np.ndarray
    file_names: np.ndarray
    image_hw: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    valid: np.ndarray

    def __post_init__(self):
        i = len(self.image_ids)
        k = self.boxes.shape[1] if self.boxes.ndim == 3 else -1
        shapes = {
            "image_ids": ((i,), self.image_ids.shape),
            "file_names": ((i,), self.file_names.shape),
            "image_hw": ((i, 2), self.image_hw.shape),
            "boxes": ((i, k, 4), self.boxes.shape),
            "scores": ((i, k), self.scores.shape),
            "valid": ((i, k), self.valid.shape),
        }
        for name, (want, got) in shapes.items():
            if want != got:
                raise ValueError(f"ProposalSet.{name} must have shape {want}, got {got}")
        if len(np.unique(self.image_ids)) != i:
            raise ValueError("ProposalSet.image_ids must be unique")
        if not np.all(np.isfinite(self.boxes)):
            raise ValueError("ProposalSet.boxes must be finite")
        if not np.all(np.isfinite(self.scores[self.valid])):
            raise ValueError("ProposalSet.scores must be finite in valid slots")

    @property
    def num_images(self) -> int:
        return len(self.image_ids)

    @classmethod
    def from_lists(cls, image_ids, file_names, image_hw, boxes, scores) -> ProposalSet:
        """From per-image lists: ``boxes[i] [n_i, 4]`` and ``scores[i] [n_i]`` (any n_i), kept in
        their order; K = the largest n_i (at least 1)."""
        k = max([len(s) for s in scores] + [1])
        n = len(image_ids)
        out_boxes = np.zeros((n, k, 4), np.float32)  # [I, K, 4]
        out_scores = np.zeros((n, k), np.float32)  # [I, K]
        valid = np.zeros((n, k), bool)  # [I, K]
        for i, (b, s) in enumerate(zip(boxes, scores, strict=True)):
            out_boxes[i, : len(s)] = np.asarray(b, np.float32).reshape(-1, 4)
            out_scores[i, : len(s)] = s
            valid[i, : len(s)] = True
        return cls(
            image_ids=np.asarray(image_ids, np.int64).reshape(n),
            file_names=np.asarray(file_names, dtype=str).reshape(n),
            image_hw=np.asarray(image_hw, np.int32).reshape(n, 2),
            boxes=out_boxes,
            scores=out_scores,
            valid=valid,
        )


def objectness_probability(logits: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Foreground logits ``[..., K]`` -> float32 probabilities (sigmoid), 0 where not valid.

    The logits are :class:`jax_rpn.proposals.Proposals` scores (``-inf`` in empty slots).
    """
    logits = np.where(valid, np.asarray(logits, np.float64), 0.0)
    return np.where(valid, 0.5 * (1.0 + np.tanh(0.5 * logits)), 0.0).astype(np.float32)


def top_proposals(proposals: ProposalSet, k: int):
    """Each image's ``k`` highest-scoring valid proposals (stable: file order breaks ties) ->
    boxes ``[I, k', 4]``, scores ``[I, k']``, valid ``[I, k']`` with k' = min(k, K)."""
    scores = np.where(proposals.valid, proposals.scores, -np.inf)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # [I, k']
    take = functools.partial(np.take_along_axis, axis=1)
    return (
        take(proposals.boxes, order[..., None]),
        take(proposals.scores, order),
        take(proposals.valid, order),
    )


# --- npz ------------------------------------------------------------------------------------


def write_npz(path: str, proposals: ProposalSet) -> str:
    """Write ``proposals`` as our npz file (see the module doc) atomically; returns ``path``."""
    with files.atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **{k: getattr(proposals, k) for k in NPZ_KEYS})
    return path


def read_npz(path: str) -> ProposalSet:
    """Read our npz proposal file. Raises ValueError naming the file and a missing or
    malformed key."""
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError("an .npy array, not an npz archive")
        with data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, EOFError, ValueError) as e:  # not a zip, truncated, pickled data
        raise ValueError(f"{path}: not a readable npz file ({e})") from None
    missing = [k for k in NPZ_KEYS if k not in arrays]
    if missing:
        raise ValueError(f"{path}: missing keys {missing}; a jax_rpn proposal file has {NPZ_KEYS}")
    try:
        return ProposalSet(
            image_ids=arrays["image_ids"].astype(np.int64),
            file_names=arrays["file_names"].astype(str),
            image_hw=arrays["image_hw"].astype(np.int32),
            boxes=arrays["boxes"].astype(np.float32),
            scores=arrays["scores"].astype(np.float32),
            valid=arrays["valid"].astype(bool),
        )
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


# --- COCO results JSON ----------------------------------------------------------------------


def write_coco_json(path: str, proposals: ProposalSet) -> str:
    """Write ``proposals`` as a COCO results JSON list atomically; returns ``path``.

    One record per valid proposal, image by image, in slot order (bbox xywh). Numbers are
    written in full (Python's float repr, as ``json.dump`` writes them), so reading the file
    back gives the same float32 boxes and scores, and the same recall as the npz file. The
    records are formatted directly rather than through ``json.dump`` of dicts: 4x faster
    (0.7 s instead of 2.9 s for 256 images of 1000 proposals).
    """
    with files.atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write("[")
        first = True
        for i, image_id in enumerate(proposals.image_ids.tolist()):
            valid = proposals.valid[i]
            if not valid.any():
                continue
            boxes = proposals.boxes[i][valid].astype(np.float64)  # [n, 4]
            xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
            name = str(proposals.file_names[i])
            head = f'{{"image_id": {int(image_id)}, "category_id": {PROPOSAL_CATEGORY_ID}, '
            if name:
                head += f'"file_name": {json.dumps(name)}, '
            record = head + '"bbox": [%r, %r, %r, %r], "score": %r}'
            scores = proposals.scores[i][valid].tolist()
            text = ", ".join(
                record % (*box, score) for box, score in zip(xywh.tolist(), scores, strict=True)
            )
            f.write(text if first else ", " + text)
            first = False
        f.write("]")
    return path


def _number(value, path, index, field) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{path}: record {index}: {field} must be a finite number, got {value!r}")
    return float(value)


def read_coco_json(path: str) -> ProposalSet:
    """Read a COCO results JSON list (``image_id``, ``bbox`` xywh, ``score``; optional
    ``file_name``). Images keep the order of their first record, proposals their file order.
    Raises ValueError naming the file, the record and the field that is wrong."""
    try:
        with open(path) as f:
            records = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(records, list):
        raise ValueError(
            f"{path}: a COCO results file is a JSON list of records, got {type(records).__name__}"
        )
    per_image = collections.defaultdict(lambda: ([], []))  # image_id -> (boxes, scores)
    names = {}
    for index, r in enumerate(records):
        if not isinstance(r, dict):
            raise ValueError(f"{path}: record {index} is not a JSON object")
        for field in ("image_id", "bbox", "score"):
            if field not in r:
                raise ValueError(f"{path}: record {index} has no {field!r}")
        image_id = r["image_id"]
        if isinstance(image_id, bool) or not isinstance(image_id, int):
            raise ValueError(f"{path}: record {index}: image_id must be an int, got {image_id!r}")
        bbox = r["bbox"]
        if not isinstance(bbox, list) or len(bbox) != 4:
            raise ValueError(f"{path}: record {index}: bbox must be [x, y, w, h], got {bbox!r}")
        x, y, w, h = (_number(v, path, index, "bbox") for v in bbox)
        if w < 0 or h < 0:
            raise ValueError(f"{path}: record {index}: bbox width and height must be >= 0: {bbox}")
        boxes, scores = per_image[image_id]
        boxes.append((x, y, x + w, y + h))
        scores.append(_number(r["score"], path, index, "score"))
        names.setdefault(image_id, str(r.get("file_name", "")))
    ids = list(per_image)
    return ProposalSet.from_lists(
        ids,
        [names[i] for i in ids],
        np.zeros((len(ids), 2), np.int32),
        [per_image[i][0] for i in ids],
        [per_image[i][1] for i in ids],
    )


# --- any format -----------------------------------------------------------------------------


def read_proposals(path: str) -> ProposalSet:
    """Read a proposal file by its extension: ``.json`` (COCO results) or ``.npz`` (ours)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"proposal file {path} does not exist")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".json":
        return read_coco_json(path)
    if ext == ".npz":
        return read_npz(path)
    if ext in (".pkl", ".pickle"):
        return read_detectron2_pickle(path)
    raise ValueError(
        f"{path}: unknown proposal file type {ext!r}; expected .json, .npz or .pkl (detectron2)"
    )


class _BoxMode(enum.IntEnum):
    """Stands in for detectron2's ``BoxMode`` while unpickling (values as detectron2's)."""

    XYXY_ABS = 0
    XYWH_ABS = 1


def read_detectron2_pickle(path: str) -> ProposalSet:
    """detectron2's precomputed proposals (see the module doc) -> :class:`ProposalSet`."""
    from jax_rpn.interop import safe_load

    data = safe_load.load_pickle(path, admit={("detectron2.structures.boxes", "BoxMode"): _BoxMode})
    if not isinstance(data, dict) or not {"ids", "boxes", "objectness_logits"} <= set(data):
        raise ValueError(
            f"{path}: a detectron2 proposal file is a dict with ids, boxes, objectness_logits "
            f"and bbox_mode; got {type(data).__name__}"
            + (f" with keys {sorted(data)}" if isinstance(data, dict) else "")
        )
    mode = int(data.get("bbox_mode", _BoxMode.XYXY_ABS))
    if mode not in (_BoxMode.XYXY_ABS, _BoxMode.XYWH_ABS):
        raise ValueError(f"{path}: bbox_mode {mode} is not XYXY_ABS (0) or XYWH_ABS (1)")
    ids, boxes, logits = data["ids"], data["boxes"], data["objectness_logits"]
    if not len(ids) == len(boxes) == len(logits):
        raise ValueError(
            f"{path}: ids, boxes and objectness_logits have {len(ids)}, {len(boxes)} and "
            f"{len(logits)} entries; expected one per image"
        )
    per_boxes, per_scores = [], []
    for i, (b, s) in enumerate(zip(boxes, logits, strict=True)):
        b = np.asarray(b, np.float32).reshape(-1, 4)
        s = np.asarray(s, np.float32).reshape(-1)
        if len(b) != len(s):
            raise ValueError(f"{path}: image {i}: {len(b)} boxes but {len(s)} objectness_logits")
        if mode == _BoxMode.XYWH_ABS:
            b = np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], axis=1)
        order = np.argsort(-s, kind="stable")
        per_boxes.append(b[order])
        per_scores.append(objectness_probability(s[order], np.ones(len(s), bool)))
    n = len(ids)
    return ProposalSet.from_lists(ids, [""] * n, np.zeros((n, 2), np.int32), per_boxes, per_scores)
