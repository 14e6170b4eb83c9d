"""Reader of COCO-format detection JSON files (as CVAT, Label Studio or Roboflow export them).

A file needs (other keys are ignored)::

    {"images":      [{"id": 1, "file_name": "a.jpg", "width": 640, "height": 480}, ...],
     "annotations": [{"id": 7, "image_id": 1, "category_id": 3, "bbox": [x, y, w, h],
                      "iscrowd": 0}, ...],
     "categories":  [{"id": 3, "name": "car"}, ...]}

`bbox` is `[x, y, width, height]` in pixels from the image's top-left corner (the box is
`[x, x + width] x [y, y + height]`); `iscrowd` (default 0) marks a box to ignore; `width` and
`height` of an image are optional (when given they must match the file). `file_name` is relative
to the image folder. Category ids may be any integers; the dataset's labels number them
0, 1, ... in increasing id order.
"""

from __future__ import annotations

import json
import math
import os

from jax_rpn.data.annotations import AnnotationError, ImageEntry, entry


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


class _Fields:
    """Typed access to the fields of one JSON object, raising AnnotationError naming them."""

    def __init__(self, path: str, where: str, obj):
        if not isinstance(obj, dict):
            raise AnnotationError(path, where, f"expected a JSON object, got {obj!r:.80}")
        self.path, self.where, self.obj = path, where, obj

    def fail(self, key: str, expected: str):
        value = self.obj.get(key, "<missing>")
        raise AnnotationError(
            self.path, f"{self.where}.{key}", f"expected {expected}, got {value!r:.80}"
        )

    def int(self, key: str, *, positive=False, default=None) -> int:
        v = self.obj.get(key, default)
        if not _is_int(v) or (positive and v <= 0):
            self.fail(key, "a positive integer" if positive else "an integer")
        return v

    def str(self, key: str) -> str:
        v = self.obj.get(key)
        if not isinstance(v, str) or not v.strip() or "\n" in v:
            self.fail(key, "a non-empty one-line string")
        return v


def read_categories(path: str, data: dict) -> dict[int, str]:
    """`categories` of a loaded COCO JSON -> {category id: name}, checked."""
    names: dict[int, str] = {}
    where_of: dict[str, str] = {}
    for k, c in enumerate(_list(path, data, "categories")):
        f = _Fields(path, f"categories[{k}]", c)
        cid, name = f.int("id"), f.str("name")
        if cid in names:
            raise AnnotationError(path, f"categories[{k}].id", f"id {cid} appears twice")
        if name in where_of:
            raise AnnotationError(
                path, f"categories[{k}].name", f"{name!r} is also the name of {where_of[name]}"
            )
        names[cid], where_of[name] = name, f"categories[{k}]"
    if not names:
        raise AnnotationError(path, "categories", "is empty: at least one category is needed")
    return names


def _list(path: str, data: dict, key: str) -> list:
    if key not in data:
        raise AnnotationError(
            path, key, "missing (a COCO JSON has images, annotations, categories)"
        )
    if not isinstance(data[key], list):
        raise AnnotationError(path, key, f"expected a list, got {type(data[key]).__name__}")
    return data[key]


def load(path: str) -> dict:
    """The parsed JSON object of `path`; AnnotationError naming the line of a syntax error."""
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        where = f"line {e.lineno} column {e.colno}"
        raise AnnotationError(path, where, f"invalid JSON: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise AnnotationError(path, f"byte {e.start}", "not UTF-8 text") from None
    if not isinstance(data, dict):
        expected = "a JSON object with images, annotations and categories"
        raise AnnotationError(
            path, "top level", f"expected {expected}, got a {type(data).__name__}"
        )
    return data


def read(path: str, images_dir: str) -> tuple[dict[int, str], list[ImageEntry]]:
    """Reads COCO JSON `path` whose `file_name`s are relative to `images_dir`.

    Returns the categories `{id: name}` and one `ImageEntry` per item of `images`, in file order
    (boxes `[x1, y1, x2, y2]` = `[x, y, x + w, y + h]`, classes = category ids). Raises
    AnnotationError naming the file and field of the first malformed item.
    """
    data = load(path)
    categories = read_categories(path, data)
    images, order = {}, []
    for i, im in enumerate(_list(path, data, "images")):
        f = _Fields(path, f"images[{i}]", im)
        image_id, file_name = f.int("id"), f.str("file_name")
        if image_id in images:
            raise AnnotationError(path, f"images[{i}].id", f"id {image_id} appears twice")
        stated = None
        if "width" in im or "height" in im:
            stated = (f.int("height", positive=True), f.int("width", positive=True))
        images[image_id] = {"file_name": file_name, "stated_hw": stated, "boxes": []}
        order.append(image_id)
    for j, a in enumerate(_list(path, data, "annotations")):
        f = _Fields(path, f"annotations[{j}]", a)
        image_id, category_id = f.int("image_id"), f.int("category_id")
        if image_id not in images:
            f.fail("image_id", "the id of an item of images")
        if category_id not in categories:
            f.fail("category_id", f"one of the categories' ids {sorted(categories)}")
        bbox = a.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(map(_is_number, bbox))):
            f.fail("bbox", "[x, y, width, height], four finite numbers")
        crowd = a.get("iscrowd", 0)
        if crowd not in (0, 1):  # True / False compare equal to 1 / 0
            f.fail("iscrowd", "0 or 1")
        x, y, w, h = (float(v) for v in bbox)
        ref = f"annotations[{j}]" + (f" (id {a['id']})" if "id" in a else "")
        images[image_id]["boxes"].append(([x, y, x + w, y + h], category_id, bool(crowd), ref))
    entries = []
    for image_id in order:
        im = images[image_id]
        boxes, classes, ignore, refs = zip(*im["boxes"], strict=True) if im["boxes"] else ((),) * 4
        entries.append(
            entry(
                file_name=im["file_name"],
                path=os.path.join(images_dir, im["file_name"]),
                image_id=image_id,
                stated_hw=im["stated_hw"],
                boxes=boxes,
                classes=classes,
                ignore=ignore,
                refs=refs,
            )
        )
    return categories, entries
