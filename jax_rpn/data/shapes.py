"""`rpn_shapes`: a deterministic synthetic detection dataset, so training needs no download.

Each image holds 1-12 shapes (filled or outlined rectangles, ellipses and triangles, and rings)
of square-root area from 8 px to 60% of the shorter image side and aspect ratio `h / w` from
1/4 to 4, in varied colours over a textured, noisy background. Shapes may overlap, but every
shape keeps at least half of its pixels visible. Example `i` of a split is a pure function of
(split, i), see `render_example`.

Features follow the tfds detection datasets (VOC, COCO): `image` (JPEG), `image/id` (the
example index), `objects/bbox` (normalized `[ymin, xmin, ymax, xmax]`, tight around the drawn
pixels: pixel `(row, col)` covers `[col, col + 1] x [row, row + 1]`), `objects/label` (shape class).

Builder configs: `rpn_shapes` (= `rpn_shapes/default`: 256x256, 2000 train / 300 validation)
and `rpn_shapes/small` (96x128, 32 / 12, for tests). Preparing writes array_record files, which
`builder.as_data_source` (and so grain) reads; `ensure_prepared` does it on first use.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import functools
import io
import logging
import os

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image, ImageDraw

CLASS_NAMES = ("rectangle", "ellipse", "triangle", "ring")
MAX_OBJECTS = 12
MIN_SIZE = 8.0  # smallest sqrt(area), pixels
MAX_SIZE_FRACTION = 0.6  # largest sqrt(area), as a fraction of the shorter image side
MAX_ASPECT = 4.0  # h / w in [1 / MAX_ASPECT, MAX_ASPECT]
MIN_VISIBLE = 0.5  # every shape keeps at least this fraction of its pixels visible
_SPLIT_IDS = {"train": 0, "validation": 1}
_SEED = 20240607
_JPEG_QUALITY = 92

# Triangle vertices in the unit square for apex up, down, left, right; `u` is the apex position.
_TRIANGLES = (
    lambda u: ((u, 0.0), (0.0, 1.0), (1.0, 1.0)),
    lambda u: ((u, 1.0), (0.0, 0.0), (1.0, 0.0)),
    lambda u: ((0.0, u), (1.0, 0.0), (1.0, 1.0)),
    lambda u: ((1.0, u), (0.0, 0.0), (0.0, 1.0)),
)


def _rngs(split: str, index: int) -> tuple[np.random.Generator, np.random.Generator]:
    """The (background, objects) generators of example `index` of `split`."""
    if split not in _SPLIT_IDS:
        raise ValueError(f"split must be one of {tuple(_SPLIT_IDS)}, got {split!r}")
    seq = np.random.SeedSequence([_SEED, _SPLIT_IDS[split], int(index)])
    return tuple(np.random.default_rng(s) for s in seq.spawn(2))


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1], float32 [h, w, 3]: a coarse random grid, upsampled."""
    grid = rng.integers(0, 256, size=(h // cell + 2, w // cell + 2, 3), dtype=np.uint8)
    up = Image.fromarray(grid).resize((w, h), Image.BICUBIC)
    return np.asarray(up, np.float32) / 127.5 - 1.0


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A textured background, float32 [h, w, 3] in [0, 255]: gradient + blobs + pattern + noise."""
    c0, c1 = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    y = np.arange(h, dtype=np.float32)[:, None]
    x = np.arange(w, dtype=np.float32)[None, :]
    t = x * np.float32(np.cos(angle)) + y * np.float32(np.sin(angle))  # [h, w]
    t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
    image = c0 + (c1 - c0) * t[..., None]  # [h, w, 3]
    image += np.float32(rng.uniform(10, 40)) * _smooth_noise(rng, h, w, int(rng.integers(16, 64)))
    kind = rng.integers(3)  # 0: plain, 1: stripes, 2: checkerboard
    if kind:
        a = rng.uniform(0, np.pi)
        f = np.float32(np.pi / rng.uniform(3, 15))  # half-period 3-15 px
        u = f * (x * np.float32(np.cos(a)) + y * np.float32(np.sin(a)))  # [h, w]
        pattern = np.sin(u)
        if kind == 2:
            v = f * (y * np.float32(np.cos(a)) - x * np.float32(np.sin(a)))
            pattern = np.sign(pattern * np.sin(v))
        amplitude = rng.uniform(5, 25) * rng.uniform(0.3, 1.0, size=3)
        image += pattern[..., None] * amplitude.astype(np.float32)
    noise = rng.random(size=image.shape, dtype=np.float32) - np.float32(0.5)  # uniform: fast
    image += np.float32(rng.uniform(2, 12) * np.sqrt(12.0)) * noise  # standard deviation 2-12
    return np.clip(image, 0, 255, out=image)


def _shape_mask(rng: np.random.Generator, cls: int, bh: int, bw: int) -> np.ndarray:
    """Draws a shape of class `cls` filling a `bh` x `bw` box, in a random style; bool [bh, bw]."""
    canvas = Image.new("L", (bw, bh), 0)
    draw = ImageDraw.Draw(canvas)
    outline = rng.random() < 0.4
    thick = max(1, round(min(bh, bw) * rng.uniform(0.06, 0.15)))
    fill, line = (None, 255) if outline else (255, None)
    corners = (0, 0, bw - 1, bh - 1)  # inclusive pixel corners, as PIL draws them
    if cls == 0:
        draw.rectangle(corners, fill=fill, outline=line, width=thick)
    elif cls == 1:
        draw.ellipse(corners, fill=fill, outline=line, width=thick)
    elif cls == 2:
        unit = _TRIANGLES[rng.integers(4)](rng.uniform(0, 1))
        draw.polygon(
            [(u * (bw - 1), v * (bh - 1)) for u, v in unit], fill=fill, outline=line, width=thick
        )
    else:  # ring: an elliptic annulus of 15-45% of the semi-axes
        ring = max(2, round(min(bh, bw) / 2 * rng.uniform(0.15, 0.45)))
        draw.ellipse(corners, fill=None, outline=255, width=ring)
    return np.asarray(canvas) > 0


def _colour(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """A random colour, float32 [3], at least 80 (L1 over RGB) away from the mean colour `under`."""
    for _ in range(10):
        colour = rng.uniform(0, 255, size=3).astype(np.float32)
        if np.abs(colour - under).sum() >= 80:
            return colour
    return np.where(under < 128, 255.0, 0.0).astype(np.float32)


def render_example(split: str, index: int, *, image_hw=(256, 256)) -> dict:
    """Renders example `index` of `split` ("train" or "validation"), deterministically.

    Returns a dict: `image` uint8 [H, W, 3]; `bbox` float32 [n, 4], normalized
    `[ymin, xmin, ymax, xmax]` tight around each shape's drawn pixels; `label` int64 [n] (index
    into CLASS_NAMES), with 1 <= n <= 12.
    """
    h, w = (int(s) for s in image_hw)
    if h < 32 or w < 32:
        raise ValueError(f"image_hw must be at least (32, 32), got {image_hw}")
    rng_bg, rng = _rngs(split, index)
    image = _background(rng_bg, h, w)
    owner = np.full((h, w), -1, np.int32)  # which shape is visible at each pixel
    areas, visible, boxes, labels = [], [], [], []  # visible: pixels of each shape still seen
    log_min, log_max = np.log(MIN_SIZE), np.log(MAX_SIZE_FRACTION * min(h, w))
    for _ in range(int(rng.integers(1, MAX_OBJECTS + 1))):
        cls = int(rng.integers(len(CLASS_NAMES)))
        size = np.exp(rng.uniform(log_min, log_max))
        ratio = np.exp(rng.uniform(-np.log(MAX_ASPECT), np.log(MAX_ASPECT)))
        bh = int(np.clip(round(size * np.sqrt(ratio)), 4, h - 2))
        bw = int(np.clip(round(size / np.sqrt(ratio)), 4, w - 2))
        mask = _shape_mask(rng, cls, bh, bw)  # [bh, bw]
        for _attempt in range(20):  # find a place that keeps every earlier shape visible enough
            y0, x0 = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
            window = (slice(y0, y0 + bh), slice(x0, x0 + bw))
            below = owner[window][mask]
            covered = np.bincount(below[below >= 0], minlength=len(areas))
            if np.all(np.subtract(visible, covered) >= MIN_VISIBLE * np.asarray(areas)):
                break
        else:
            continue  # no such place: skip this shape
        region = image[window]  # a view: writes go to `image`
        colour = _colour(rng, region[mask].mean(axis=0))
        shade = rng.normal(0.0, rng.uniform(0, 6), size=(int(mask.sum()), 3))
        region[mask] = np.clip(colour + shade, 0, 255)
        owner[window][mask] = len(areas)
        visible = [*np.subtract(visible, covered), int(mask.sum())]
        areas.append(int(mask.sum()))
        rows, cols = np.nonzero(mask.any(axis=1))[0] + y0, np.nonzero(mask.any(axis=0))[0] + x0
        boxes.append((rows[0] / h, cols[0] / w, (rows[-1] + 1) / h, (cols[-1] + 1) / w))
        labels.append(cls)
    return {
        "image": np.round(image).astype(np.uint8),
        "bbox": np.asarray(boxes, np.float32).reshape(-1, 4),
        "label": np.asarray(labels, np.int64),
    }


class RpnShapesConfig(tfds.core.BuilderConfig):
    """Image size and split sizes of `rpn_shapes`."""

    def __init__(self, *, image_hw: tuple[int, int], num_train: int, num_validation: int, **kw):
        super().__init__(**kw)
        self.image_hw = tuple(image_hw)
        self.num_examples = {"train": num_train, "validation": num_validation}


class RpnShapes(tfds.core.GeneratorBasedBuilder):
    """Synthetic shapes for training and evaluating region proposal networks."""

    VERSION = tfds.core.Version("1.0.0")
    # Set here: tfds 4.9.10 otherwise needs the `importlib_resources` backport to find it
    # (tensorflow/datasets#11212).
    code_path = epath.Path(__file__)
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        RpnShapesConfig(
            name="default",
            description="256x256 images, 2000 train and 300 validation.",
            image_hw=(256, 256),
            num_train=2000,
            num_validation=300,
        ),
        RpnShapesConfig(
            name="small",
            description="96x128 images, 32 train and 12 validation (tests).",
            image_hw=(96, 128),
            num_train=32,
            num_validation=12,
        ),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(
                        shape=(*self.builder_config.image_hw, 3), encoding_format="jpeg"
                    ),
                    "image/id": np.int64,
                    "objects": tfds.features.Sequence(
                        {
                            "bbox": tfds.features.BBoxFeature(),
                            "label": tfds.features.ClassLabel(names=CLASS_NAMES),
                        }
                    ),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {s: self._generate_examples(s) for s in self.builder_config.num_examples}

    def _generate_examples(self, split: str):
        render = functools.partial(encoded_example, split, image_hw=self.builder_config.image_hw)
        with concurrent.futures.ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:
            yield from pool.map(render, range(self.builder_config.num_examples[split]))


def encoded_example(split: str, index: int, *, image_hw) -> tuple[int, dict]:
    """(key, tfds example) of `render_example`; the JPEG is encoded with PIL, not with TF ops."""
    ex = render_example(split, index, image_hw=image_hw)
    jpeg = io.BytesIO()
    Image.fromarray(ex["image"]).save(jpeg, format="JPEG", quality=_JPEG_QUALITY)
    objects = {"bbox": ex["bbox"], "label": ex["label"]}
    return index, {"image": jpeg.getvalue(), "image/id": index, "objects": objects}


@contextlib.contextmanager
def file_lock(path: str):
    """An exclusive advisory lock on `path` (several processes on one host share a data_dir)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_prepared(name: str = "rpn_shapes", *, data_dir: str | None = None):
    """Returns the tfds builder of `name` (`rpn_shapes[/config]`), preparing it first if needed.

    The data is written as array_record under `data_dir` (None: the tfds default directory).
    """
    if name.split("/")[0] != "rpn_shapes":
        raise ValueError(f"name must be rpn_shapes or rpn_shapes/<config>, got {name!r}")
    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    if builder.is_prepared():
        return builder
    lock = os.path.join(builder.data_dir_root, f".{name.replace('/', '_')}.lock")
    with file_lock(lock):
        builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
        if not builder.is_prepared():
            logging.getLogger(__name__).warning(
                "Preparing the synthetic dataset %s in %s (once; about a minute at 256x256).",
                name,
                builder.data_dir,
            )
            builder.download_and_prepare()
    return builder
