"""Input pipeline: tfds array_record data sources read by grain, into static-shape numpy batches.

Per example: decode -> boxes to absolute `[x1, y1, x2, y2]` pixels -> random horizontal flip
(train) -> resize keeping the aspect ratio (`augment.resized_hw`) -> normalize
(`augment.normalize`: `config.data` channel order, pixel mean and std) -> pad the image to
`config.data.pad_to` (top-left, zeros after normalization) and the ground truth to
`config.data.max_boxes` slots. A batch is a dict of numpy arrays, b examples (b =
config.batch_size / process count: this host's part of the global batch):

    image          float32 [b, H, W, 3]  (H, W) = pad_to
    boxes          float32 [b, G, 4]     [x1, y1, x2, y2] in pixels of the resized image; 0 if empty
    labels         int32   [b, G]        class of each box, an index into
                                         `DatasetInfo.class_names` (`objects/label`); 0 if empty
    valid          bool    [b, G]        slot holds a box (ignored boxes included)
    ignore         bool    [b, G]        VOC difficult / COCO crowd box (when ignore_difficult):
                                         left out of training targets and of recall
    image_hw       int32   [b, 2]        (h, w) of the resized image before padding
    num_dropped    int32   [b]           boxes beyond max_boxes that were dropped
    example_valid  bool    [b]           False for the eval padding examples
    index          int32   [b]           record index in the split; -1 for eval padding

Sharding: all hosts read the same global order (seeded shuffle, a new order each epoch); host p
of P builds rows `[p * b, (p + 1) * b)` of each global batch. So a global batch, and each
example's flip, are the same whatever the number of hosts and devices.

Datasets (`config.data.name`):
- `rpn_shapes`, `rpn_shapes/small`: the embedded synthetic data (`jax_rpn.data.shapes`),
  prepared on first use.
- `voc/2007`, `voc/2012` (tfds; `objects/is_difficult` -> ignore; splits train, validation,
  test (without boxes in 2012); e.g. `train_split="train+validation"`) and `coco/2017` (tfds;
  `objects/is_crowd` -> ignore; splits train, validation). They must be prepared beforehand,
  in the array_record format that random access (grain) needs; tfds downloads them (VOC 2007
  about 0.9 GB, VOC 2012 2 GB, COCO 2017 about 25 GB)::

      # pip install tensorflow-cpu importlib_resources  (tfds 4.9.10 needs both to build)
      import tensorflow_datasets as tfds
      builder = tfds.builder("voc/2007", data_dir="/data/tfds", file_format="array_record")
      builder.download_and_prepare()

  or with the tfds CLI (which also needs `pip install simple_parsing`):
  `tfds build voc/2007 --file_format=array_record --data_dir=/data/tfds`. A dataset prepared
  earlier as tfrecord can be converted in place: `tfds convert_format
  --dataset_version_dir=/data/tfds/voc/2007/5.0.0 --out_file_format=array_record`.
  Then set `config.data.data_dir = "/data/tfds"`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import grain
import numpy as np
import tensorflow_datasets as tfds
from absl import flags

from jax_rpn import config_checks
from jax_rpn.data import augment, shapes
from jax_rpn.settings import PixelSettings

# The dataset families (`config.data.name` up to the first "/") and the box flag each turns
# into `ignore`.
FAMILIES = {"rpn_shapes": None, "voc": "is_difficult", "coco": "is_crowd"}


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the trainer needs to know about the data of a config."""

    name: str
    class_names: tuple[str, ...]
    num_train_examples: int
    num_eval_examples: int  # after num_eval_images
    num_eval_batches: int  # global batches of one eval pass (the last one padded)
    image_hw: tuple[int, int]  # padded image size (H, W)
    max_boxes: int


@dataclasses.dataclass(frozen=True)
class _Settings:
    """The per-example processing settings, from `config.data`."""

    family: str
    short_side: int
    max_size: int
    pad_hw: tuple[int, int]
    max_boxes: int
    ignore_difficult: bool
    hflip: bool
    pixels: PixelSettings


def decode_example(example: dict, *, family: str, ignore_difficult: bool = True):
    """Maps a tfds example of `family` (rpn_shapes, voc, coco) to (image, boxes, labels, ignore).

    Returns image uint8 [h, w, 3]; boxes float32 [n, 4], `[x1, y1, x2, y2]` absolute pixels
    from tfds' normalized `[ymin, xmin, ymax, xmax]`; labels int32 [n] (`objects/label`, an
    index into the dataset's class names); ignore bool [n] (difficult / crowd, all False unless
    `ignore_difficult`). Boxes with zero width or height are dropped.
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {tuple(FAMILIES)}, got {family!r}")
    image = np.asarray(example["image"], np.uint8)  # tfds decodes these datasets to RGB
    h, w = image.shape[:2]
    objects = example["objects"]
    bbox = np.asarray(objects["bbox"], np.float32).reshape(-1, 4)  # [n, 4] ymin, xmin, ymax, xmax
    boxes = bbox[:, [1, 0, 3, 2]] * np.array([w, h, w, h], np.float32)  # [n, 4]
    labels = np.asarray(objects["label"], np.int32).reshape(-1)  # [n]
    if len(labels) != len(boxes):
        raise ValueError(f"objects/label has {len(labels)} entries for {len(boxes)} boxes")
    ignore = np.zeros(len(boxes), bool)
    key = FAMILIES[family]
    if key is not None and ignore_difficult:
        ignore = np.asarray(objects[key], bool).reshape(-1)
        if len(ignore) != len(boxes):
            raise ValueError(f"objects/{key} has {len(ignore)} entries for {len(boxes)} boxes")
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return image, boxes[keep], labels[keep], ignore[keep]


def _process(example: dict, index: int, *, settings: _Settings, flip: bool) -> dict:
    """One tfds example -> one padded, normalized pipeline example (see the module doc)."""
    image, boxes, labels, ignore = decode_example(
        example, family=settings.family, ignore_difficult=settings.ignore_difficult
    )
    if flip:
        image, boxes = augment.hflip(image, boxes)
    image, boxes = augment.resize(
        image,
        boxes,
        short_side=settings.short_side,
        max_size=settings.max_size,
        pad_hw=settings.pad_hw,
    )
    boxes, labels, valid, ignore, num_dropped = augment.pad_boxes(
        boxes, labels, ignore, max_boxes=settings.max_boxes
    )
    return {
        "image": augment.pad_image(augment.normalize(image, settings.pixels), settings.pad_hw),
        "boxes": boxes,
        "labels": labels,
        "valid": valid,
        "ignore": ignore,
        "image_hw": np.array(image.shape[:2], np.int32),
        "num_dropped": np.int32(num_dropped),
        "example_valid": np.bool_(True),
        "index": np.int32(index),
    }


def _blank(settings: _Settings) -> dict:
    """An eval padding example: zero image, boxes and labels, nothing valid, image_hw = pad_to."""
    g = settings.max_boxes
    return {
        "image": np.zeros((*settings.pad_hw, 3), np.float32),
        "boxes": np.zeros((g, 4), np.float32),
        "labels": np.zeros(g, np.int32),
        "valid": np.zeros(g, bool),
        "ignore": np.zeros(g, bool),
        "image_hw": np.array(settings.pad_hw, np.int32),
        "num_dropped": np.int32(0),
        "example_valid": np.bool_(False),
        "index": np.int32(-1),
    }


class _TrainExample(grain.transforms.RandomMap):
    """Record index -> processed example, flipped with probability 1/2 (when hflip)."""

    def __init__(self, source, settings: _Settings):
        self._source = source
        self._settings = settings

    def random_map(self, index, rng: np.random.Generator) -> dict:
        flip = self._settings.hflip and bool(rng.random() < 0.5)
        return _process(self._source[int(index)], int(index), settings=self._settings, flip=flip)


class _EvalExample(grain.transforms.Map):
    """Position -> processed example of record `position`, or a blank one past `num_examples`."""

    def __init__(self, source, settings: _Settings, num_examples: int):
        self._source = source
        self._settings = settings
        self._num_examples = num_examples

    def map(self, position) -> dict:
        position = int(position)
        if position >= self._num_examples:
            return _blank(self._settings)
        return _process(self._source[position], position, settings=self._settings, flip=False)


def _settings(config) -> _Settings:
    d = config.data
    return _Settings(
        family=d.name.split("/")[0],
        short_side=int(d.short_side),
        max_size=int(d.max_size),
        pad_hw=tuple(int(s) for s in d.pad_to),
        max_boxes=int(d.max_boxes),
        ignore_difficult=bool(d.ignore_difficult),
        hflip=bool(d.hflip),
        pixels=PixelSettings.from_config(config),
    )


def _builder(config):
    """The tfds builder of `config.data.name`, prepared (rpn_shapes) or checked to be."""
    name, data_dir = config.data.name, config.data.data_dir
    if name.split("/")[0] == "rpn_shapes":
        return shapes.ensure_prepared(name, data_dir=data_dir)
    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"config.data.name={name!r} is not prepared in {builder.data_dir}. Prepare it with "
            f"`tfds build {name} --file_format=array_record --data_dir={builder.data_dir_root}` "
            "(more in the jax_rpn/data/pipeline.py docstring), or set config.data.data_dir."
        )
    return builder


def _hosts(config, process_index, process_count) -> tuple[int, int, int]:
    """(process_index, process_count, per-host batch size), checked."""
    if process_index is None or process_count is None:
        import jax  # only here: the pipeline itself does not need JAX

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}")
    if config.batch_size % process_count:
        raise ValueError(
            f"config.batch_size ({config.batch_size}) must be divisible by the number of "
            f"processes ({process_count})"
        )
    return process_index, process_count, config.batch_size // process_count


def _host_batches(
    ds: grain.MapDataset, local_batch: int, process_index: int, process_count: int, workers: int
) -> grain.IterDataset:
    """Batches of this host's rows of each global batch of `ds`, made by `workers` processes."""
    ds = ds.batch(local_batch, drop_remainder=True)[process_index::process_count]
    # Two threads prepare the next batches while the caller trains (the iterator's state
    # counts only the batches returned).
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=2))
    if workers:
        if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return it


def create_train_iterator(
    config, *, process_index: int | None = None, process_count: int | None = None
) -> grain.DatasetIterator:
    """An endless iterator over this host's part of the training batches (see the module doc).

    Each batch: image [b, H, W, 3], boxes [b, G, 4] `[x1, y1, x2, y2]` in absolute pixels of
    the resized image, labels (class indices) / valid / ignore [b, G], image_hw [b, 2],
    num_dropped / example_valid / index [b], with b = config.batch_size / process_count.

    `process_index` / `process_count` default to `jax.process_index()` / `jax.process_count()`.
    Deterministic for `config.seed`. The iterator has `get_state()` (a JSON-able dict) and
    `set_state(state)`; `grain.checkpoint.CheckpointSave(it)` / `CheckpointRestore(it)` save and
    restore it with orbax.
    """
    config_checks.validate_data(config)
    p, n_proc, local_batch = _hosts(config, process_index, process_count)
    source = _builder(config).as_data_source(config.data.train_split)
    ds = grain.MapDataset.range(len(source)).shuffle(seed=config.seed).repeat()
    ds = ds.random_map(_TrainExample(source, _settings(config)), seed=config.seed)
    return iter(_host_batches(ds, local_batch, p, n_proc, config.data.num_workers))


def create_eval_iterator(
    config, *, process_index: int | None = None, process_count: int | None = None
) -> Iterator[dict]:
    """One pass over the eval split (no shuffle, no flip), `dataset_info().num_eval_batches` long.

    Batches as in `create_train_iterator` (boxes `[x1, y1, x2, y2]` absolute pixels, [b, G, 4]).

    Takes the first `config.data.num_eval_images` examples (None: all). The last global batch
    is filled with blank examples whose `example_valid` is False, so every batch has b rows.
    """
    config_checks.validate_data(config)
    p, n_proc, local_batch = _hosts(config, process_index, process_count)
    source = _builder(config).as_data_source(config.data.eval_split)
    num = _num_eval(config, len(source))
    total = math.ceil(num / config.batch_size) * config.batch_size
    ds = grain.MapDataset.range(total).map(_EvalExample(source, _settings(config), num))
    return iter(_host_batches(ds, local_batch, p, n_proc, config.data.num_workers))


def _num_eval(config, split_size: int) -> int:
    n = config.data.num_eval_images
    return split_size if n is None else min(int(n), split_size)


def dataset_info(config) -> DatasetInfo:
    """Sizes and class names of `config.data` (prepares rpn_shapes if needed)."""
    config_checks.validate_data(config)
    builder = _builder(config)
    splits = builder.info.splits
    num_eval = _num_eval(config, splits[config.data.eval_split].num_examples)
    label = builder.info.features["objects"]["label"]
    return DatasetInfo(
        name=config.data.name,
        class_names=tuple(label.names),
        num_train_examples=splits[config.data.train_split].num_examples,
        num_eval_examples=num_eval,
        num_eval_batches=math.ceil(num_eval / config.batch_size),
        image_hw=tuple(int(s) for s in config.data.pad_to),
        max_boxes=int(config.data.max_boxes),
    )
