"""Users' own detection datasets as tfds datasets: a COCO JSON + image folder, or a VOC folder.

`config.data.name`:

- `coco_json`: split `train` from `config.data.train_annotations` (a COCO JSON, see
  `jax_rpn.data.coco_json`) and `train_images` (the folder its `file_name`s are relative to),
  and, when given, split `validation` from `eval_annotations` + `eval_images`. `train_split` /
  `eval_split` pick from them as tfds split specs: without a validation JSON, e.g.
  `train_split="train[:90%]"`, `eval_split="train[90%:]"`.
- `voc_folder`: `config.data.voc_root`, a Pascal-VOC folder (`jax_rpn.data.voc_folder`);
  `train_split` / `eval_split` name its `ImageSets/Main/<split>.txt` files (e.g. `trainval`,
  `test`).

Both become tfds datasets (array_record) with the features of tfds' coco / voc, so the input
pipeline reads them as any other: `image` (RGB JPEG or PNG), `image/id` (COCO image id; VOC:
position in the ImageSets list), `image/filename`, `objects/bbox` (normalized
`[ymin, xmin, ymax, xmax]`), `objects/label` (ClassLabel) and `objects/is_crowd` (coco_json) or
`objects/is_difficult` (voc_folder), which the pipeline turns into `ignore`.

Preparing (`ensure_prepared`, on first use, or `python -m jax_rpn.data.prepare`) reads the
annotations first: anything malformed is an error naming the file and the field (or line).
Then it checks every image, in threads, with a progress bar:

- a missing or undecodable image file is skipped and named in the report; so is an image whose
  size differs from the size its annotations state (its boxes would not fit it);
- grayscale, RGBA, palette, CMYK or 16-bit images are converted to RGB and re-encoded, and
  images with an EXIF orientation are turned upright (as detectron2 and mmdetection read
  them); RGB JPEG and PNG files are stored byte for byte;
- boxes with zero or negative width or height are dropped; boxes crossing the image border are
  clipped to it, and dropped when nothing is left (entirely outside); each counted;
- `iscrowd` / `difficult` boxes are kept, flagged; images without boxes are kept (negatives).

Images reach tfds already encoded, so preparing (like reading) needs no TensorFlow.
The report (images and boxes kept, dropped, repaired, and why) is printed and stored as
`preparation_report.json` in the dataset folder, `<data_dir>/<name>/<config>/1.0.0`, where the
config name ends in a content hash of the annotation files, the image folders' paths and the
splits: editing an annotation file leads to a new dataset, not a stale one (replacing an image
file under the same name does not; delete the dataset folder then). tfds writes into a
temporary folder and renames it when complete, so an interrupted preparation leaves nothing
that looks prepared (a killed one leaves tfds' `incomplete.*` folder, which the next
preparation removes).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
import re
import shutil
import sys
import time

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from jax_rpn.data import coco_json, shapes, voc_folder
from jax_rpn.data.annotations import AnnotationError, ImageEntry

# The box flag each family stores (the pipeline turns it into `ignore`), as tfds' coco / voc.
IGNORE_FEATURE = {"coco_json": "is_crowd", "voc_folder": "is_difficult"}
REPORT_FILE = "preparation_report.json"
VERSION = "1.0.0"
# Part of the dataset key: raise it when the prepared data of the same files would change.
_FORMAT = 1
_KEEP_FORMATS = ("JPEG", "MPO", "PNG")  # stored as they are when RGB (MPO: a camera JPEG)
_JPEG_QUALITY = 95  # re-encoding a converted JPEG
_EXIF_ORIENTATION = 0x0112
_MAX_EXAMPLES = 5  # examples of each kind of box repair in the report
# Box outcomes of `repair_boxes`.
KEPT, CLIPPED, ZERO_OR_NEGATIVE_SIZE, OUTSIDE_IMAGE = 0, 1, 2, 3


def split_names(spec: str) -> list[str]:
    """The split names in a tfds split spec: `"train[:90%]+validation"` -> [train, validation]."""
    return [part.split("[")[0].strip() for part in spec.split("+")]


# --- where the data comes from ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SplitSource:
    """One split of a user dataset: its tfds name, annotation file and image folder."""

    name: str
    annotations: str  # COCO JSON, or the VOC ImageSets file
    images: str  # the folder the image file names are relative to


def _split_sources(d) -> list[SplitSource]:
    if d.name == "coco_json":
        pairs = [("train", d.train_annotations, d.train_images)]
        if d.eval_annotations is not None:
            pairs.append(("validation", d.eval_annotations, d.eval_images))
        return [SplitSource(n, a, i) for n, a, i in pairs]
    names = dict.fromkeys(split_names(d.train_split) + split_names(d.eval_split))
    images = os.path.join(d.voc_root, "JPEGImages")
    return [SplitSource(n, voc_folder.split_file(d.voc_root, n), images) for n in names]


# The config.data fields of each user dataset family (the first two are required).
_FIELDS = {
    "coco_json": ("train_annotations", "train_images", "eval_annotations", "eval_images"),
    "voc_folder": ("voc_root",),
}


def check_config(d) -> None:
    """Raises ValueError / FileNotFoundError naming the first wrong user-data field of `d`.

    `d` is `config.data`. For other dataset names, the user-data fields must be unset.
    """
    own = _FIELDS.get(d.name, ())
    for field in _FIELDS["coco_json"] + _FIELDS["voc_folder"]:
        if field not in own and d[field] is not None:
            fix = (
                f"it is not used by config.data.name={d.name!r}"
                if d.name in IGNORE_FEATURE
                else "set config.data.name to coco_json (COCO JSON) or voc_folder (VOC folder)"
            )
            raise ValueError(f"config.data.{field} is set ({d[field]!r}), but {fix}")
    if d.name not in IGNORE_FEATURE:
        return
    for field in own[:2]:
        if d[field] is None:
            raise ValueError(f"config.data.{field} must be set for config.data.name={d.name!r}")
    if d.name == "coco_json":
        if (d.eval_annotations is None) != (d.eval_images is None):
            raise ValueError(
                "config.data.eval_annotations and config.data.eval_images must be set together"
            )
        for field in own:
            kind = os.path.isfile if field.endswith("annotations") else os.path.isdir
            if d[field] is not None and not kind(d[field]):
                what = "file" if field.endswith("annotations") else "folder"
                raise FileNotFoundError(f"config.data.{field}: no such {what}: {d[field]}")
        available = ["train"] + (["validation"] if d.eval_annotations is not None else [])
    else:
        for sub in ("Annotations", "JPEGImages", os.path.join("ImageSets", "Main")):
            if not os.path.isdir(os.path.join(d.voc_root, sub)):
                raise FileNotFoundError(
                    f"config.data.voc_root={d.voc_root!r} has no {sub} folder (a VOC folder "
                    "has Annotations/, JPEGImages/ and ImageSets/Main/)"
                )
        available = voc_folder.available_splits(d.voc_root)
    for field in ("train_split", "eval_split"):
        for name in split_names(d[field]):
            if name not in available:
                hint = (
                    " (no eval_annotations: evaluate on a part of train, e.g. "
                    "train_split='train[:90%]', eval_split='train[90%:]')"
                    if d.name == "coco_json"
                    else f" (no {voc_folder.split_file(d.voc_root, name)})"
                )
                raise ValueError(
                    f"config.data.{field}={d[field]!r}: split {name!r} is not one of "
                    f"{available}{hint}"
                )


_DIGESTS: dict[tuple, bytes] = {}  # (path, size, mtime, inode) -> sha256 of the contents


def _file_digest(path: str) -> bytes:
    st = os.stat(path)
    stamp = (os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ino)
    if stamp not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        _DIGESTS[stamp] = h.digest()
    return _DIGESTS[stamp]


def _source_files(d, source: SplitSource) -> list[str]:
    if d.name == "coco_json":
        return [source.annotations]
    return voc_folder.source_files(d.voc_root, source.name)


def config_name(d) -> str:
    """The tfds config name of `config.data` `d`: a readable stem + a hash of its sources."""
    sources = _split_sources(d)
    h = hashlib.sha256()
    header = {
        "format": _FORMAT,
        "name": d.name,
        "splits": [(s.name, os.path.realpath(s.images)) for s in sources],
    }
    h.update(json.dumps(header).encode())
    for s in sources:
        for path in _source_files(d, s):
            digest = _file_digest(path) if os.path.isfile(path) else b"missing"  # read() says
            h.update(os.path.basename(path).encode() + b"\0" + digest)
    stem = d.train_annotations if d.name == "coco_json" else d.voc_root.rstrip(os.sep)
    stem = re.sub(r"[^A-Za-z0-9_]+", "_", os.path.splitext(os.path.basename(stem))[0])
    return f"{stem[:40] or 'data'}-{h.hexdigest()[:16]}"


def dataset_dir(d) -> str:
    """The folder `config.data` `d` is prepared into: `<data_dir>/<name>/<config>/<version>`."""
    root = d.data_dir or tfds.core.constants.get_default_data_dir()
    return os.path.join(root, d.name, config_name(d), VERSION)


# --- reading the annotations ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class UserDataset:
    """The annotations of every split, read and checked, with their class labels."""

    name: str  # coco_json or voc_folder
    class_names: tuple[str, ...]
    class_source: str  # where the class names come from, for the report
    splits: tuple[SplitSource, ...]
    entries: dict  # split name -> list[ImageEntry]
    labels: dict  # split name -> list of int64 [n] label arrays, one per entry


def read_dataset(d) -> UserDataset:
    """Reads and checks the annotations of `config.data` `d` (AnnotationError if malformed)."""
    sources = _split_sources(d)
    entries: dict[str, list[ImageEntry]] = {}
    if d.name == "coco_json":
        categories, first = {}, {}
        for s in sources:
            cats, entries[s.name] = coco_json.read(s.annotations, s.images)
            for cid, name in cats.items():
                if cid in categories and categories[cid] != name:
                    raise AnnotationError(
                        s.annotations,
                        "categories",
                        f"id {cid} is {name!r} here but {categories[cid]!r} in {first[cid]}",
                    )
                categories.setdefault(cid, name)
                first.setdefault(cid, s.annotations)
        ids = sorted(categories)
        class_names = tuple(categories[i] for i in ids)
        index = {cid: k for k, cid in enumerate(ids)}
        class_source = f"the COCO categories: ids {ids} -> labels 0..{len(ids) - 1}"
    else:
        for s in sources:
            entries[s.name] = voc_folder.read(d.voc_root, s.name)
        found = {c for es in entries.values() for e in es for c in e.classes}
        class_names, class_source = voc_folder.class_names(found)
        index = {name: k for k, name in enumerate(class_names)}
    labels = {
        s.name: [np.array([index[c] for c in e.classes], np.int64) for e in entries[s.name]]
        for s in sources
    }
    return UserDataset(d.name, class_names, class_source, tuple(sources), entries, labels)


# --- images and boxes -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CheckedImage:
    """An image file after `check_image`: RGB JPEG/PNG bytes, or why it is skipped."""

    data: bytes | None  # None: skipped
    hw: tuple[int, int] | None  # (height, width), upright
    problem: str | None = None  # why it is skipped
    converted_from: str | None = None  # the PIL mode converted to RGB
    exif_rotated: bool = False


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):  # 16-bit grayscale -> 8-bit
        pixels = np.clip(np.asarray(image, np.float32) / 257.0 + 0.5, 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels, "L")
    return image.convert("RGB")  # drops alpha, as torchvision's and detectron2's readers


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation (1: upright), 1 where the EXIF data cannot be read."""
    try:
        return image.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # damaged EXIF data raises all sorts; the pixels may still be fine
        return 1


def check_image(path: str, stated_hw: tuple[int, int] | None) -> CheckedImage:
    """Reads and decodes image `path`; upright RGB JPEG/PNG bytes, or why it is skipped.

    `stated_hw` is the `(height, width)` the annotations state (None: not stated).
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return CheckedImage(None, None, "missing file")
    except OSError as e:
        return CheckedImage(None, None, f"unreadable: {e.strerror or e}")
    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt, mode, stored_wh = image.format, image.mode, image.size
            orientation = _orientation(image)
            rotated = orientation in range(2, 9)
            converted = mode if mode != "RGB" else None
            keep = not (converted or rotated) and fmt in _KEEP_FORMATS
            if keep and fmt in ("JPEG", "MPO"):
                # Decode at 1/8 scale: all the compressed data is still read (and a truncated
                # file fails), for 2/3 of the time of a full decode.
                image.draft(mode, (1, 1))
            image.load()  # a truncated or corrupt file fails here, not during training
            if rotated:
                image = ImageOps.exif_transpose(image)
            if not keep:
                out = io.BytesIO()
                if fmt in ("JPEG", "MPO"):
                    _to_rgb(image).save(out, format="JPEG", quality=_JPEG_QUALITY)
                else:
                    _to_rgb(image).save(out, format="PNG")
                data = out.getvalue()
            w, h = image.size if rotated else stored_wh
    except Image.UnidentifiedImageError:
        return CheckedImage(None, None, "not an image (PIL cannot identify the file)")
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        return CheckedImage(None, None, f"cannot decode: {e}")
    if stated_hw is not None and tuple(stated_hw) != (h, w):
        turned = f" (stored {stored_wh[0]}x{stored_wh[1]}, EXIF orientation {orientation})"
        turned = turned if rotated else ""
        problem = (
            f"the image is {w}x{h} (width x height){turned}, the annotations say "
            f"{stated_hw[1]}x{stated_hw[0]}"
        )
        return CheckedImage(None, None, problem)
    return CheckedImage(data, (h, w), converted_from=converted, exif_rotated=rotated)


def repair_boxes(boxes: np.ndarray, image_hw) -> tuple[np.ndarray, np.ndarray]:
    """Clips boxes [n, 4] (`[x1, y1, x2, y2]` pixels) to the image and says what happened to each.

    Returns the clipped boxes [n, 4] and an outcome per box [n]: KEPT, CLIPPED,
    ZERO_OR_NEGATIVE_SIZE (x2 <= x1 or y2 <= y1 as annotated: to drop) or OUTSIDE_IMAGE (no
    area left inside the image: to drop).
    """
    h, w = image_hw
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    clipped = np.clip(boxes, 0.0, np.array([w, h, w, h], np.float64))  # [n, 4]
    degenerate = ~((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]))
    outside = ~((clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1]))
    changed = np.any(clipped != boxes, axis=1)
    outcome = np.select(
        [degenerate, outside, changed], [ZERO_OR_NEGATIVE_SIZE, OUTSIDE_IMAGE, CLIPPED], KEPT
    )
    return clipped, outcome.astype(np.int32)


# --- the report -------------------------------------------------------------------------------

_OUTCOME_NAMES = {
    CLIPPED: "clipped",
    ZERO_OR_NEGATIVE_SIZE: "dropped_zero_or_negative_size",
    OUTSIDE_IMAGE: "dropped_outside_image",
}


class _SplitReport:
    """Counts of one split's preparation (filled in example order, so deterministic)."""

    def __init__(self, source: SplitSource, ignore_name: str):
        self.source, self.ignore_name = source, ignore_name
        self.images = collections.Counter()
        self.boxes = collections.Counter()
        self.converted = collections.Counter()
        self.skipped: list[dict] = []
        self.examples: dict[str, list[str]] = {k: [] for k in _OUTCOME_NAMES.values()}

    def add(self, e: ImageEntry, image: CheckedImage, outcome: np.ndarray | None, boxes=None):
        """Counts image `e`: skipped, or kept with `outcome` [n] of its boxes (`boxes` [n, 4]
        clipped)."""
        self.images["listed"] += 1
        self.boxes["listed"] += len(e.classes)
        if image.data is None:
            self.skipped.append({"file": e.file_name, "reason": image.problem})
            self.boxes["on_skipped_images"] += len(e.classes)
            return
        self.images["kept"] += 1
        self.converted.update([image.converted_from] if image.converted_from else [])
        self.images["exif_rotated"] += int(image.exif_rotated)
        counts = np.bincount(outcome, minlength=4)  # [4] KEPT, CLIPPED, ZERO_..., OUTSIDE_...
        kept = int(counts[KEPT] + counts[CLIPPED])
        self.images["negatives"] += int(kept == 0)
        self.boxes["kept"] += kept
        self.boxes["ignore"] += int(e.ignore[outcome <= CLIPPED].sum())
        for code, name in _OUTCOME_NAMES.items():
            self.boxes[name] += int(counts[code])
            room = _MAX_EXAMPLES - len(self.examples[name])
            for k in np.flatnonzero(outcome == code)[:room] if counts[code] and room else ():
                was = np.round(e.boxes[k], 2).tolist()
                now = f" -> {np.round(boxes[k], 2).tolist()}" if code == CLIPPED else ""
                self.examples[name].append(
                    f"{e.file_name} {e.refs[k]}: [x1, y1, x2, y2] {was}{now} in a "
                    f"{image.hw[1]}x{image.hw[0]} image"
                )

    def as_dict(self) -> dict:
        return {
            "annotations": os.path.abspath(self.source.annotations),
            "images": os.path.abspath(self.source.images),
            "images_listed": self.images["listed"],
            "images_kept": self.images["kept"],
            "images_skipped": len(self.skipped),
            "negatives": self.images["negatives"],
            "converted_to_rgb": dict(sorted(self.converted.items())),
            "exif_rotated": self.images["exif_rotated"],
            "boxes_listed": self.boxes["listed"],
            "boxes_kept": self.boxes["kept"],
            "boxes_ignore": self.boxes["ignore"],
            "ignore_flag": self.ignore_name,
            **{name: self.boxes[name] for name in _OUTCOME_NAMES.values()},
            "boxes_on_skipped_images": self.boxes["on_skipped_images"],
            "skipped": self.skipped,
            "examples": {k: v for k, v in self.examples.items() if v},
        }


def format_report(report: dict) -> str:
    """The preparation report (`preparation_report.json`) as text."""
    lines = [
        f"{report['name']}: prepared in {report['seconds']:.1f} s "
        f"({report['images_per_second']:.0f} images/s) into {report['dataset_dir']}",
        f"classes ({len(report['class_names'])}, {report['class_source']}): "
        + ", ".join(report["class_names"]),
    ]
    for name, s in report["splits"].items():
        lines += [
            f"split {name}: {s['annotations']} (images in {s['images']})",
            f"  images: {s['images_listed']} listed, {s['images_kept']} kept "
            f"({s['negatives']} of them without boxes: negatives), {s['images_skipped']} skipped",
            f"  boxes: {s['boxes_listed']} listed, {s['boxes_kept']} kept ({s['boxes_ignore']} "
            f"{s['ignore_flag']}: ignored), {s['boxes_on_skipped_images']} on skipped images",
            f"  repaired: {s['clipped']} clipped to the image; dropped: "
            f"{s['dropped_zero_or_negative_size']} with zero or negative width or height, "
            f"{s['dropped_outside_image']} outside the image",
        ]
        if s["converted_to_rgb"] or s["exif_rotated"]:
            modes = ", ".join(f"{n} {m}" for m, n in s["converted_to_rgb"].items()) or "none"
            lines.append(
                f"  converted to RGB: {modes}; turned upright by their EXIF orientation: "
                f"{s['exif_rotated']}"
            )
        for item in s["skipped"]:
            lines.append(f"  skipped {item['file']}: {item['reason']}")
        for kind, examples in s["examples"].items():
            lines += [f"  {kind.replace('_', ' ')}, e.g.:"] + [f"    {x}" for x in examples]
    return "\n".join(lines)


def read_report(path: str) -> dict:
    """The preparation report stored in the prepared dataset folder `path`."""
    with open(os.path.join(path, REPORT_FILE)) as f:
        return {**json.load(f), "dataset_dir": path}


# --- the tfds builders ------------------------------------------------------------------------


def _ordered_map(fn, items, *, workers: int, chunk: int = 8):
    """`map(fn, items)` in `workers` threads, in order; `chunk` items per task, a few in flight."""
    items = list(items)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        pending = collections.deque()
        for start in range(0, len(items), chunk):
            pending.append(
                pool.submit(lambda part: [fn(x) for x in part], items[start : start + chunk])
            )
            if len(pending) >= 4 * workers:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()


def _example(e: ImageEntry, labels: np.ndarray, *, ignore_name: str):
    """(checked image, clipped boxes [n, 4], outcomes [n], tfds example or None if skipped)."""
    image = check_image(e.path, e.stated_hw)
    if image.data is None:
        return image, None, None, None
    h, w = image.hw
    boxes, outcome = repair_boxes(e.boxes, image.hw)  # [n, 4], [n]
    keep = outcome <= CLIPPED
    x1, y1, x2, y2 = (boxes[keep] / np.array([w, h, w, h])).T
    example = {
        "image": image.data,
        "image/id": e.image_id,
        "image/filename": e.file_name,
        "objects": {
            "bbox": np.stack([y1, x1, y2, x2], axis=1).astype(np.float32),  # [k, 4] normalized
            "label": labels[keep],
            ignore_name: e.ignore[keep],
        },
    }
    return image, boxes, outcome, example


class UserDatasetConfig(tfds.core.BuilderConfig):
    """A builder config holding the annotations read by `read_dataset`."""

    def __init__(self, *, dataset: UserDataset, workers: int, progress: bool, **kw):
        super().__init__(**kw)
        self.dataset = dataset
        self.workers = workers
        self.progress = progress


class _UserDetection(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Builds a tfds dataset from the `UserDataset` of its config (see the module doc)."""

    VERSION = tfds.core.Version(VERSION)
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    code_path = epath.Path(__file__)  # tfds 4.9.10 needs it (see shapes.RpnShapes)

    def _info(self) -> tfds.core.DatasetInfo:
        dataset = self.builder_config.dataset
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3)),
                    "image/id": np.int64,
                    "image/filename": tfds.features.Text(),
                    "objects": tfds.features.Sequence(
                        {
                            "bbox": tfds.features.BBoxFeature(),
                            "label": tfds.features.ClassLabel(names=dataset.class_names),
                            IGNORE_FEATURE[self.name]: np.bool_,
                        }
                    ),
                }
            ),
            disable_shuffling=True,  # records in annotation order
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        self.reports = {}
        return {s.name: self._generate_examples(s) for s in self.builder_config.dataset.splits}

    def _generate_examples(self, source: SplitSource):
        dataset = self.builder_config.dataset
        entries, labels = dataset.entries[source.name], dataset.labels[source.name]
        report = self.reports[source.name] = _SplitReport(source, IGNORE_FEATURE[self.name])
        ignore_name = IGNORE_FEATURE[self.name]
        results = _ordered_map(
            lambda pair: _example(*pair, ignore_name=ignore_name),
            zip(entries, labels, strict=True),
            workers=self.builder_config.workers,
        )
        bar = tqdm(
            total=len(entries),
            desc=f"{source.name} images",
            unit="img",
            disable=not self.builder_config.progress,
        )
        for index, (e, (image, boxes, outcome, example)) in enumerate(
            zip(entries, results, strict=True)
        ):
            bar.update()
            report.add(e, image, outcome, boxes)
            if example is not None:
                yield index, example
        bar.close()
        if not report.images["kept"]:
            reasons = "; ".join(f"{s['file']}: {s['reason']}" for s in report.skipped[:3])
            raise ValueError(
                f"{source.annotations}: no image of split {source.name!r} can be used "
                f"({len(report.skipped)} skipped, e.g. {reasons})"
            )

    def _download_and_prepare(self, dl_manager, download_config):
        start = time.perf_counter()
        super()._download_and_prepare(dl_manager, download_config)
        seconds = time.perf_counter() - start
        dataset = self.builder_config.dataset
        num_images = sum(len(es) for es in dataset.entries.values())
        report = {
            "name": f"{self.name}/{self.builder_config.name}",
            "class_names": list(dataset.class_names),
            "class_source": dataset.class_source,
            "seconds": seconds,
            "images_per_second": num_images / max(seconds, 1e-9),
            "splits": {name: r.as_dict() for name, r in self.reports.items()},
        }
        with open(os.path.join(self.data_dir, REPORT_FILE), "w") as f:  # the temporary folder
            json.dump(report, f, indent=1)


class CocoJson(_UserDetection, skip_registration=True):
    """A COCO-format JSON + image folder per split (`jax_rpn.data.coco_json`)."""

    name = "coco_json"


class VocFolder(_UserDetection, skip_registration=True):
    """A Pascal-VOC folder (`jax_rpn.data.voc_folder`)."""

    name = "voc_folder"


_BUILDERS = {"coco_json": CocoJson, "voc_folder": VocFolder}


def _is_prepared(path: str) -> bool:
    return all(os.path.isfile(os.path.join(path, f)) for f in ("dataset_info.json", REPORT_FILE))


def ensure_prepared(d, *, workers: int | None = None, progress=True, print_report=True):
    """The tfds builder of user dataset `config.data` `d`, preparing it first if needed.

    Preparing shows a progress bar (`progress`) and prints the report (`print_report`) to
    stderr. `workers`: image-reading threads (None: 2 per core, at least 4).
    """
    check_config(d)
    path = dataset_dir(d)
    if not _is_prepared(path):
        root = os.path.dirname(os.path.dirname(os.path.dirname(path)))
        lock = os.path.join(root, f".{d.name}_{os.path.basename(os.path.dirname(path))}.lock")
        with shapes.file_lock(lock):
            if not _is_prepared(path):
                if progress:
                    print(f"Preparing {d.name} into {path}", file=sys.stderr)
                workers = workers or max(4, 2 * (os.cpu_count() or 1))
                _prepare(d, path, workers=workers, progress=progress)
                if print_report:
                    print(format_report(read_report(path)), file=sys.stderr)
    return tfds.builder_from_directory(path)


def _prepare(d, path: str, *, workers: int, progress: bool) -> None:
    parent = os.path.dirname(path)
    if os.path.isdir(parent):  # left by a killed preparation (we hold the lock)
        for name in os.listdir(parent):
            if name.startswith(tfds.core.constants.INCOMPLETE_PREFIX):
                shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
    if os.path.isdir(path):  # tfds' files without our report: not ours to trust
        shutil.rmtree(path)
    dataset = read_dataset(d)
    config = UserDatasetConfig(
        name=os.path.basename(parent),
        description=f"{d.name} from " + ", ".join(s.annotations for s in dataset.splits),
        dataset=dataset,
        workers=workers,
        progress=progress,
    )
    with _quiet_tfds():
        builder = _BUILDERS[d.name](
            config=config,
            data_dir=os.path.dirname(os.path.dirname(parent)),
            file_format="array_record",
        )
        builder.download_and_prepare()


@contextlib.contextmanager
def _quiet_tfds():
    """Without tfds' own progress bars, prints and warnings (the report says what happened)."""
    bars = getattr(tfds.core.utils.tqdm_utils, "_active", True)
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    tfds.display_progress_bar(False)
    absl_logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        tfds.display_progress_bar(bars)
        absl_logger.setLevel(level)
