"""Users' box annotations as read from their files, before images are checked or boxes repaired.

The readers (`coco_json`, `voc_folder`) turn annotation files into `ImageEntry` records;
`user_datasets` checks the images and repairs the boxes while it prepares a tfds dataset.
Boxes are `[x1, y1, x2, y2]` in absolute pixels of the image, where pixel `(row, col)` covers
`[col, col + 1] x [row, row + 1]`.
"""

from __future__ import annotations

import dataclasses

import numpy as np


class AnnotationError(ValueError):
    """A malformed annotation file: the message names the file and the field (or line)."""

    def __init__(self, path: str, where: str, problem: str):
        super().__init__(f"{path}: {where}: {problem}")
        self.path, self.where, self.problem = path, where, problem


@dataclasses.dataclass(frozen=True)
class ImageEntry:
    """One image and its boxes, exactly as the annotation file states them (nothing repaired).

    Attributes:
      file_name: the image's name as the annotations give it (relative to the image folder).
      path: the image file to read.
      image_id: stored as `image/id` (COCO image id; VOC: position in the ImageSets list).
      stated_hw: `(height, width)` the annotations state; None where they do not.
      boxes: float64 [n, 4] `[x1, y1, x2, y2]` absolute pixels.
      classes: [n] class key of each box (COCO category id, VOC class name).
      ignore: bool [n], COCO `iscrowd` / VOC `difficult`.
      refs: [n] where each box is written, for the preparation report.
    """

    file_name: str
    path: str
    image_id: int
    stated_hw: tuple[int, int] | None
    boxes: np.ndarray
    classes: tuple
    ignore: np.ndarray
    refs: tuple[str, ...]

    def __post_init__(self):
        n = len(self.classes)
        if self.boxes.shape != (n, 4) or self.ignore.shape != (n,) or len(self.refs) != n:
            raise ValueError(
                f"{self.file_name}: boxes {self.boxes.shape}, classes ({n},), ignore "
                f"{self.ignore.shape} and refs ({len(self.refs)},) must agree"
            )


def entry(
    *, file_name: str, path: str, image_id: int, stated_hw, boxes, classes, ignore, refs
) -> ImageEntry:
    """An `ImageEntry` from plain lists (boxes: n lists of 4 numbers, `[x1, y1, x2, y2]`)."""
    return ImageEntry(
        file_name=file_name,
        path=path,
        image_id=int(image_id),
        stated_hw=stated_hw,
        boxes=np.asarray(boxes, np.float64).reshape(-1, 4),
        classes=tuple(classes),
        ignore=np.asarray(ignore, bool).reshape(-1),
        refs=tuple(refs),
    )
