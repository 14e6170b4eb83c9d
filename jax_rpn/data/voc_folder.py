"""Reader of Pascal-VOC folders (as VOC itself, CVAT or LabelImg write them).

    <root>/ImageSets/Main/<split>.txt   one image id per line (e.g. train, val, trainval, test)
    <root>/Annotations/<id>.xml         <annotation> with <filename>, <size>, <object>s
    <root>/JPEGImages/<filename>        the image (<id>.jpg when the XML has no <filename>)

An <object> needs <name> and <bndbox> (<xmin>, <ymin>, <xmax>, <ymax>); <difficult> 1 marks a
box to ignore. <size> (<width>, <height>) is optional; when given (not 0) it must match the
image. VOC coordinates are 1-based pixel indices, both ends included, so the box covering
pixels `xmin..xmax` is `[xmin - 1, xmax]` in our convention (pixel `col` covers
`[col, col + 1]`): the same as detectron2's VOC loader and torchvision's VOC reference
(tfds' `voc` keeps `xmin` and so shifts boxes by one pixel).
"""

from __future__ import annotations

import math
import os
import xml.etree.ElementTree as ET

from jax_rpn.data.annotations import AnnotationError, ImageEntry, entry

# The 20 Pascal VOC classes, in the order of tfds' voc and the VOC devkit.
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # fmt: skip


def split_file(root: str, split: str) -> str:
    """The ImageSets file listing the images of `split`."""
    return os.path.join(root, "ImageSets", "Main", f"{split}.txt")


def available_splits(root: str) -> list[str]:
    """Split names with an ImageSets/Main file (per-class files such as `car_train` left out)."""
    folder = os.path.join(root, "ImageSets", "Main")
    names = (
        [n[:-4] for n in os.listdir(folder) if n.endswith(".txt")] if os.path.isdir(folder) else []
    )
    return sorted(n for n in names if "_" not in n or n.split("_")[0] not in VOC_CLASSES)


def _listing(root: str, split: str) -> list[tuple[int, str]]:
    """(line number, image id) of each non-empty line of `split`'s ImageSets file."""
    with open(split_file(root, split)) as f:
        return [(n, line.split()[0]) for n, line in enumerate(f, 1) if line.strip()]


def image_ids(root: str, split: str) -> list[str]:
    """The image ids listed in `split`'s ImageSets file (the first word of each non-empty line)."""
    return [image_id for _, image_id in _listing(root, split)]


def annotation_file(root: str, image_id: str) -> str:
    return os.path.join(root, "Annotations", f"{image_id}.xml")


def source_files(root: str, split: str) -> list[str]:
    """The files a split is read from: its ImageSets file and the XML of each of its images."""
    return [split_file(root, split)] + [annotation_file(root, i) for i in image_ids(root, split)]


def _text(node, tag: str, path: str, where: str, *, required=True) -> str | None:
    child = node.find(tag)
    text = None if child is None or child.text is None else child.text.strip()
    if required and not text:
        raise AnnotationError(path, f"{where}/{tag}", "missing or empty")
    return text


def _number(node, tag: str, path: str, where: str) -> float:
    text = _text(node, tag, path, where)
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise AnnotationError(path, f"{where}/{tag}", f"expected a number, got {text!r:.40}")
    return value


def _stated_hw(root_node, path: str) -> tuple[int, int] | None:
    """(height, width) of <size>, or None where it is missing or 0 (some tools write 0)."""
    size = root_node.find("size")
    if size is None or size.find("width") is None or size.find("height") is None:
        return None
    hw = tuple(_number(size, tag, path, "size") for tag in ("height", "width"))
    for tag, v in zip(("height", "width"), hw, strict=True):
        if v < 0 or v != int(v):
            raise AnnotationError(path, f"size/{tag}", f"expected a whole number, got {v}")
    return None if 0 in hw else (int(hw[0]), int(hw[1]))


def read_xml(path: str, *, root: str, image_id: str, index: int) -> ImageEntry:
    """One VOC XML file -> ImageEntry (boxes `[xmin - 1, ymin - 1, xmax, ymax]`, classes names)."""
    try:
        tree = ET.parse(path)
    except ET.ParseError as e:
        line, column = e.position
        raise AnnotationError(path, f"line {line} column {column}", f"invalid XML: {e}") from None
    node = tree.getroot()
    if node.tag != "annotation":
        raise AnnotationError(path, node.tag, "expected the root element <annotation>")
    file_name = _text(node, "filename", path, "annotation", required=False) or f"{image_id}.jpg"
    boxes, classes, ignore, refs = [], [], [], []
    for k, obj in enumerate(node.findall("object")):
        name = _text(obj, "name", path, f"object[{k}]")
        where = f"object[{k}] ({name})"
        difficult = _text(obj, "difficult", path, where, required=False) or "0"
        if difficult not in ("0", "1"):
            raise AnnotationError(path, f"{where}/difficult", f"expected 0 or 1, got {difficult!r}")
        bndbox = obj.find("bndbox")
        if bndbox is None:
            raise AnnotationError(path, f"{where}/bndbox", "missing")
        x1, y1, x2, y2 = (
            _number(bndbox, t, path, f"{where}/bndbox") for t in ("xmin", "ymin", "xmax", "ymax")
        )
        boxes.append([x1 - 1.0, y1 - 1.0, x2, y2])
        classes.append(name)
        ignore.append(difficult == "1")
        refs.append(f"{os.path.basename(path)} {where}")
    return entry(
        file_name=os.path.join("JPEGImages", file_name),
        path=os.path.join(root, "JPEGImages", file_name),
        image_id=index,
        stated_hw=_stated_hw(node, path),
        boxes=boxes,
        classes=classes,
        ignore=ignore,
        refs=refs,
    )


def read(root: str, split: str) -> list[ImageEntry]:
    """The images of `split` (ImageSets/Main/<split>.txt), in list order, `image_id` = position.

    Raises AnnotationError naming the file and field (or line) of the first malformed XML, or
    the ImageSets line of an image without an XML file.
    """
    entries = []
    listing = split_file(root, split)
    for index, (line, image_id) in enumerate(_listing(root, split)):
        path = annotation_file(root, image_id)
        if not os.path.isfile(path):
            raise AnnotationError(
                listing, f"line {line}", f"lists {image_id!r}, but {path} does not exist"
            )
        entries.append(read_xml(path, root=root, image_id=image_id, index=index))
    return entries


def class_names(found) -> tuple[tuple[str, ...], str]:
    """The class names for the class names `found` in the XML files, and where they come from.

    All found names among the 20 VOC classes: the 20 VOC classes (labels as tfds' voc and the
    peers' VOC models number them). Otherwise the found names, sorted.
    """
    found = set(found)
    if found <= set(VOC_CLASSES):
        return VOC_CLASSES, "the 20 Pascal VOC classes (every class found is one of them)"
    return tuple(sorted(found)), "the classes found in the XML files, sorted"
