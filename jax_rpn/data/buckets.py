"""Aspect-ratio buckets: a few static padded shapes instead of one square that fits everything.

Padding every COCO image to 1344x1344 makes a landscape 800x1333 image carry 1.7x the pixels
it needs, and every convolution pays for them. detectron2 groups images by aspect ratio
(``AspectRatioGroupedDataset``) and pads each batch to its own size. With static shapes the
same saving comes from a small fixed set of padded shapes, here ``config.data.pad_to`` and,
with ``config.data.aspect_buckets``, its transpose (e.g. 800x1344 landscape and 1344x800
portrait): every batch is drawn from one bucket, and a jitted step compiles once per bucket.

An image goes to the bucket where the pipeline's resize (``augment.resized_hw``) shrinks it
least, ties to the smaller padded area, then to the first. Training batches are made as
detectron2 makes them: records are taken in the epoch's shuffled order into per-bucket
buffers, and a buffer that reaches the batch size becomes the next batch (the last partial
buffers of an epoch are dropped). The batch sequence is a pure function of (seed, sizes), so
a grain iterator over it resumes exactly.
"""

from __future__ import annotations

import concurrent.futures
import io
import os
import threading

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from jax_rpn.data import augment


def padded_shapes(pad_to, *, aspect_buckets: bool) -> tuple[tuple[int, int], ...]:
    """The padded shapes ``(H, W)``: ``pad_to``, and its transpose with ``aspect_buckets``
    (once if ``pad_to`` is square)."""
    h, w = (int(v) for v in pad_to)
    if aspect_buckets and h != w:
        return ((h, w), (w, h))
    return ((h, w),)


def bucket_of(image_hw, shapes, *, short_side: int, max_size: int) -> int:
    """Index into ``shapes`` of the bucket of an image of size ``image_hw`` (see module doc)."""

    def key(i):
        h, w = augment.resized_hw(
            image_hw, short_side=short_side, max_size=max_size, pad_hw=shapes[i]
        )
        return (-h * w, shapes[i][0] * shapes[i][1], i)

    return min(range(len(shapes)), key=key)


def record_sizes(builder, split: str) -> np.ndarray:
    """``[n, 2]`` int ``(h, w)`` of every image of ``split``, read from the encoded images'
    headers (no decoding), with a few threads."""
    source = builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})

    def size(i):
        with Image.open(io.BytesIO(source[i]["image"])) as im:
            w, h = im.size
        return h, w

    workers = min(8, (os.cpu_count() or 1) * 2)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        sizes = list(pool.map(size, range(len(source)), chunksize=256))
    return np.asarray(sizes, np.int64).reshape(-1, 2)


def bucket_ids(sizes: np.ndarray, shapes, *, short_side: int, max_size: int) -> np.ndarray:
    """``[n]`` bucket index of each image size ``(h, w)`` in ``sizes [n, 2]``."""
    return np.asarray(
        [bucket_of(hw, shapes, short_side=short_side, max_size=max_size) for hw in sizes.tolist()],
        np.int32,
    )


class BucketBatches:
    """The endless sequence of training batches as record indices: element ``i`` is
    ``(bucket, indices [batch_size])`` (a ``grain.MapDataset.source``).

    Epoch ``e`` visits the records in ``np.random.default_rng([seed, e]).permutation(n)``
    order, filling one buffer per bucket; a full buffer is the next batch.
    """

    def __init__(self, buckets: np.ndarray, *, batch_size: int, seed: int):
        self._buckets = np.asarray(buckets, np.int32)
        self._batch_size = int(batch_size)
        self._seed = int(seed)
        counts = np.bincount(self._buckets)
        if np.all(counts < self._batch_size):
            raise ValueError(
                f"no aspect-ratio bucket has batch_size={batch_size} images (bucket sizes "
                f"{counts.tolist()}): lower config.batch_size or set config.data.aspect_buckets "
                "to False"
            )
        self._ends = [0]  # cumulative batch counts at the end of each epoch made so far
        self._epoch, self._batches = -1, []
        self._lock = threading.Lock()  # grain's reader threads share this object

    def __len__(self) -> int:
        return np.iinfo(np.int64).max  # endless, like MapDataset.repeat()

    def _make_epoch(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        order = np.random.default_rng([self._seed, epoch]).permutation(len(self._buckets))
        buffers: dict[int, list[int]] = {}
        batches = []
        for index in order.tolist():
            b = int(self._buckets[index])
            buffers.setdefault(b, []).append(index)
            if len(buffers[b]) == self._batch_size:
                batches.append((b, np.asarray(buffers.pop(b), np.int64)))
        return batches

    def __getitem__(self, i: int) -> tuple[int, np.ndarray]:
        i = int(i)
        with self._lock:
            while self._ends[-1] <= i:  # each epoch's batch count is found once
                self._ends.append(self._ends[-1] + len(self._make_epoch(len(self._ends) - 1)))
            epoch = int(np.searchsorted(self._ends, i, side="right")) - 1
            if epoch != self._epoch:
                self._epoch, self._batches = epoch, self._make_epoch(epoch)
            return self._batches[i - self._ends[epoch]]


def eval_order(buckets: np.ndarray, batch_size: int) -> list[tuple[int, np.ndarray]]:
    """One pass in record order, bucket after bucket: ``(bucket, positions [batch_size])`` with
    ``-1`` filling each bucket's last batch."""
    out = []
    for b in np.unique(buckets).tolist():
        records = np.flatnonzero(buckets == b)
        padded = np.full(-(-len(records) // batch_size) * batch_size, -1, np.int64)
        padded[: len(records)] = records
        out += [(b, chunk) for chunk in padded.reshape(-1, batch_size)]
    return out
