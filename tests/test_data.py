"""Tests of jax_rpn.data: the synthetic shapes builder, the transforms and the grain pipeline."""

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from configs.default import get_config
from jax_rpn.data import augment, pipeline, shapes

SMALL_HW = (96, 128)  # the rpn_shapes/small image size


def _config(data_dir, *, batch_size=4, **data):
    """rpn_shapes/small resized by 1/2 (96x128 -> 48x64), padded to 64x64, 6 GT slots."""
    c = get_config()
    c.batch_size = batch_size
    c.data.name = "rpn_shapes/small"
    c.data.data_dir = data_dir
    c.data.short_side, c.data.max_size, c.data.pad_to = 48, 64, (64, 64)
    c.data.max_boxes = 6
    c.data.num_eval_images = 10
    c.data.update(data)
    return c


def _source(data_dir, split):
    return tfds.builder("rpn_shapes/small", data_dir=data_dir).as_data_source(split)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# --- the synthetic dataset -------------------------------------------------------------------


def test_render_is_deterministic_per_split_and_index():
    a = shapes.render_example("train", 7)
    b = shapes.render_example("train", 7)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    c = shapes.render_example("validation", 7)
    assert not np.array_equal(a["image"], c["image"])


def test_render_counts_sizes_and_aspect_ratios():
    h, w = 256, 256
    examples = [shapes.render_example("train", i) for i in range(40)]
    counts = [len(ex["bbox"]) for ex in examples]
    assert min(counts) >= 1 and max(counts) <= 12
    assert max(counts) >= 10  # many objects do occur
    bbox = np.concatenate([ex["bbox"] for ex in examples])  # [n, 4] ymin, xmin, ymax, xmax
    assert np.all((bbox >= 0) & (bbox <= 1))
    bh, bw = (bbox[:, 2] - bbox[:, 0]) * h, (bbox[:, 3] - bbox[:, 1]) * w
    size = np.sqrt(bh * bw)
    # sqrt(area) drawn in [8, 0.6 * 256]; a side of 4 px may round from 4.49 (so >= 7).
    assert size.min() >= 7 and size.max() <= 0.6 * 256 + 1
    assert size.min() < 12 and size.max() > 100  # both ends are reached
    # h / w drawn in [1/4, 4]; integer sides (at least 4 px) round that to at most 4.5.
    assert np.all((bh / bw >= 1 / 4.5) & (bh / bw <= 4.5))
    assert (bh / bw).min() < 0.35 and (bh / bw).max() > 3
    labels = np.concatenate([ex["label"] for ex in examples])
    assert set(labels.tolist()) == set(range(len(shapes.CLASS_NAMES)))


def _changed_pixels(split, index, hw):
    """The example and where it differs from its own background (bool [h, w])."""
    rng_bg, _ = shapes._rngs(split, index)
    background = np.round(shapes._background(rng_bg, *hw)).astype(np.uint8)
    ex = shapes.render_example(split, index, image_hw=hw)
    return ex, np.any(ex["image"] != background, axis=-1)


def _pixel_boxes(bbox, hw):
    """Normalized [ymin, xmin, ymax, xmax] -> int pixel edges (r0, c0, r1, c1), r1/c1 exclusive."""
    return np.round(bbox * np.array([hw[0], hw[1], hw[0], hw[1]])).astype(int)


def test_single_shape_boxes_equal_the_drawn_pixels():
    hw = SMALL_HW
    found = 0
    for index in range(200):
        ex, changed = _changed_pixels("validation", index, hw)
        if len(ex["bbox"]) != 1:
            continue
        rows, cols = np.nonzero(changed.any(axis=1))[0], np.nonzero(changed.any(axis=0))[0]
        expected = [rows[0], cols[0], rows[-1] + 1, cols[-1] + 1]  # pixel edges of the shape
        np.testing.assert_array_equal(_pixel_boxes(ex["bbox"], hw)[0], expected)
        found += 1
        if found == 3:
            break
    assert found == 3


def test_boxes_are_tight_around_overlapping_shapes():
    hw = (256, 256)
    for index in range(8):
        ex, changed = _changed_pixels("train", index, hw)
        inside_some_box = np.zeros(hw, bool)
        for r0, c0, r1, c1 in _pixel_boxes(ex["bbox"], hw):
            inside_some_box[r0:r1, c0:c1] = True
            # Each edge line of a box holds drawn pixels (of this shape, or of one on top).
            assert changed[r0, c0:c1].any() and changed[r1 - 1, c0:c1].any()
            assert changed[r0:r1, c0].any() and changed[r0:r1, c1 - 1].any()
        assert not np.any(changed & ~inside_some_box)  # nothing drawn outside the boxes


def test_prepared_split_holds_the_rendered_examples(shapes_dir):
    info = tfds.builder("rpn_shapes/small", data_dir=shapes_dir).info
    assert info.splits["train"].num_examples == 32
    assert info.splits["validation"].num_examples == 12
    source = _source(shapes_dir, "validation")
    for record in (source[0], source[5]):
        ex = shapes.render_example("validation", int(record["image/id"]), image_hw=SMALL_HW)
        np.testing.assert_allclose(np.stack(record["objects"]["bbox"]), ex["bbox"])
        np.testing.assert_array_equal(record["objects"]["label"], ex["label"])
        # JPEG (quality 92) of a noisy image: close, not equal.
        assert np.abs(record["image"].astype(int) - ex["image"]).mean() < 12


# --- transforms (hand-computed) -------------------------------------------------------------


def test_hflip_mirrors_image_and_boxes():
    image = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    boxes = np.array([[1, 0, 3, 2], [0, 1, 6, 4]], np.float32)
    out_image, out_boxes = augment.hflip(image, boxes)
    # x -> 6 - x, then swap x1 / x2.
    np.testing.assert_array_equal(out_boxes, [[3, 0, 5, 2], [0, 1, 6, 4]])
    np.testing.assert_array_equal(out_image[:, 0], image[:, 5])


def test_resized_hw_hand_checked():
    big = (1000, 1000)
    assert augment.resized_hw((96, 128), short_side=48, max_size=64, pad_hw=big) == (48, 64)
    # shorter side 60 would make the longer 180 > 120: scale = 120 / 300 = 0.4.
    assert augment.resized_hw((100, 300), short_side=60, max_size=120, pad_hw=big) == (40, 120)
    # 480x640 -> short side 600 gives 600x800 (the VOC setting, max 1000).
    assert augment.resized_hw((480, 640), short_side=600, max_size=1000, pad_hw=big) == (600, 800)
    # does not fit in pad_to (64, 128): shrunk to 64 rows.
    assert augment.resized_hw((100, 100), short_side=80, max_size=80, pad_hw=(64, 128)) == (64, 64)


def test_resize_scales_boxes_with_the_image():
    image = np.zeros((30, 40, 3), np.uint8)
    boxes = np.array([[4, 6, 20, 30]], np.float32)
    out_image, out_boxes = augment.resize(
        image, boxes, short_side=15, max_size=100, pad_hw=(64, 64)
    )
    assert out_image.shape == (15, 20, 3)
    np.testing.assert_allclose(out_boxes, [[2, 3, 10, 15]])  # x0.5 on both axes


def test_pad_boxes_keeps_the_largest_and_counts_the_rest():
    boxes = np.array(
        [[0, 0, 2, 2], [0, 0, 10, 10], [0, 0, 5, 5], [0, 0, 1, 1], [0, 0, 8, 8]], np.float32
    )  # areas 4, 100, 25, 1, 64
    labels = np.array([5, 6, 7, 8, 9])
    ignore = np.array([False, True, False, False, False])
    out, out_labels, valid, out_ignore, dropped = augment.pad_boxes(
        boxes, labels, ignore, max_boxes=3
    )
    # Non-ignored first, then by area: 64 (#4), 25 (#2), 4 (#0); kept in input order.
    np.testing.assert_array_equal(out, boxes[[0, 2, 4]])
    np.testing.assert_array_equal(out_labels, [5, 7, 9])  # the labels of boxes #0, #2, #4
    assert out_labels.dtype == np.int32
    assert valid.all() and not out_ignore.any() and dropped == 2
    out, out_labels, valid, out_ignore, dropped = augment.pad_boxes(
        boxes[:2], labels[:2], ignore[:2], max_boxes=4
    )
    np.testing.assert_array_equal(out, [[0, 0, 2, 2], [0, 0, 10, 10], [0, 0, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(out_labels, [5, 6, 0, 0])
    np.testing.assert_array_equal(valid, [True, True, False, False])
    np.testing.assert_array_equal(out_ignore, [False, True, False, False])
    assert dropped == 0


# --- the pipeline ---------------------------------------------------------------------------


def _expected_boxes(record, *, flip, max_boxes, resized_hw=(48, 64)):
    """Plain-numpy reference: normalized yxyx -> resized xyxy pixels, flipped, largest kept.

    Returns (boxes [k, 4], the kept positions [k], number dropped).
    """
    h, w = resized_hw
    bbox = np.stack(record["objects"]["bbox"])
    boxes = bbox[:, [1, 0, 3, 2]] * np.array([w, h, w, h], np.float32)
    if flip:
        boxes = np.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], 1)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep = np.sort(np.argsort(-area, kind="stable")[:max_boxes])
    return boxes[keep], keep, len(boxes) - len(keep)


def _rendered_labels(split, record):
    """The shape classes `shapes.render_example` drew in the image of `record` ([n] int)."""
    return shapes.render_example(split, int(record["image/id"]), image_hw=SMALL_HW)["label"]


def test_train_batches_shapes_flip_resize_and_padding(shapes_dir):
    config = _config(shapes_dir)
    source = _source(shapes_dir, "train")
    flips, num_dropped = set(), 0
    for batch in _take(pipeline.create_train_iterator(config), 4):
        assert batch["image"].shape == (4, 64, 64, 3) and batch["image"].dtype == np.float32
        assert batch["boxes"].shape == (4, 6, 4) and batch["boxes"].dtype == np.float32
        for k in ("valid", "ignore", "example_valid"):
            assert batch[k].dtype == bool
        assert batch["valid"].shape == batch["ignore"].shape == batch["labels"].shape == (4, 6)
        assert batch["labels"].dtype == np.int32
        assert batch["image_hw"].dtype == np.int32 and batch["num_dropped"].dtype == np.int32
        np.testing.assert_array_equal(batch["image_hw"], [[48, 64]] * 4)
        assert batch["example_valid"].all() and not batch["ignore"].any()
        for i in range(4):
            record = source[int(batch["index"][i])]
            n = int(batch["valid"][i].sum())
            matches = []
            for flip in (False, True):
                boxes, keep, dropped = _expected_boxes(record, flip=flip, max_boxes=6)
                if np.allclose(batch["boxes"][i, :n], boxes, atol=1e-4):
                    matches.append(flip)
                    assert batch["num_dropped"][i] == dropped and n == len(boxes)
                    # Labels follow their boxes, also when boxes beyond max_boxes are dropped.
                    labels = _rendered_labels("train", record)[keep]
                    np.testing.assert_array_equal(batch["labels"][i, :n], labels)
            assert len(matches) == 1
            flips.add(matches[0])
            num_dropped += int(batch["num_dropped"][i])
            assert not batch["boxes"][i, n:].any()  # empty slots are zero
            assert not batch["labels"][i, n:].any()
            # Image: PIL-resized source (flipped like the boxes), then padding of zeros.
            resized = np.asarray(Image.fromarray(record["image"]).resize((64, 48), Image.BILINEAR))
            if matches[0]:
                resized = resized[:, ::-1]
            image = augment.denormalize(batch["image"][i])
            assert np.abs(image[:48].astype(int) - resized).max() <= 1
            assert not batch["image"][i, 48:].any()
    assert flips == {False, True}  # both happen among 16 examples
    assert num_dropped > 0  # up to 12 shapes in 6 slots: the label check covered dropping


def test_no_flip_when_hflip_is_off(shapes_dir):
    config = _config(shapes_dir, hflip=False)
    source = _source(shapes_dir, "train")
    batch = next(pipeline.create_train_iterator(config))
    for i in range(4):
        boxes, _, _ = _expected_boxes(source[int(batch["index"][i])], flip=False, max_boxes=6)
        np.testing.assert_allclose(batch["boxes"][i, : len(boxes)], boxes, atol=1e-4)


def test_train_order_is_deterministic_for_a_seed(shapes_dir):
    config = _config(shapes_dir)
    a = _take(pipeline.create_train_iterator(config), 2)
    b = _take(pipeline.create_train_iterator(config), 2)
    _assert_batches_equal(a, b)
    config.seed = 1
    c = _take(pipeline.create_train_iterator(config), 2)
    assert not np.array_equal(a[0]["index"], c[0]["index"])
    # 32 examples, batch 4: the first epoch (8 batches) visits each example once.
    epoch = _take(pipeline.create_train_iterator(config), 8)
    assert sorted(np.concatenate([b["index"] for b in epoch]).tolist()) == list(range(32))


def test_hosts_build_slices_of_the_same_global_batch(shapes_dir):
    config = _config(shapes_dir)
    whole = _take(pipeline.create_train_iterator(config, process_index=0, process_count=1), 3)
    parts = [
        _take(pipeline.create_train_iterator(config, process_index=p, process_count=2), 3)
        for p in range(2)
    ]
    joined = [
        {k: np.concatenate([p0[k], p1[k]]) for k in p0} for p0, p1 in zip(*parts, strict=True)
    ]
    _assert_batches_equal(joined, whole)


def test_iterator_state_restores_the_next_batches(shapes_dir):
    config = _config(shapes_dir)
    it = pipeline.create_train_iterator(config)
    _take(it, 3)
    state = it.get_state()
    want = _take(it, 2)
    restored = pipeline.create_train_iterator(config)
    restored.set_state(state)
    _assert_batches_equal(_take(restored, 2), want)


def test_iterator_state_through_an_orbax_checkpoint(shapes_dir, tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    config = _config(shapes_dir)
    it = pipeline.create_train_iterator(config)
    _take(it, 2)
    manager = ocp.CheckpointManager(tmp_path / "ckpt")
    manager.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
    want = _take(it, 2)
    restored = pipeline.create_train_iterator(config)
    manager = ocp.CheckpointManager(tmp_path / "ckpt")
    args = ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored))
    manager.restore(manager.latest_step(), args=args)
    _assert_batches_equal(_take(restored, 2), want)


def test_eval_pass_pads_the_last_batch(shapes_dir):
    config = _config(shapes_dir)  # 10 eval images, batch 4 -> 3 batches, 2 blank rows
    info = pipeline.dataset_info(config)
    assert (info.num_eval_examples, info.num_eval_batches) == (10, 3)
    assert info.class_names == shapes.CLASS_NAMES and info.num_train_examples == 32
    batches = list(pipeline.create_eval_iterator(config))
    assert len(batches) == 3
    index = np.concatenate([b["index"] for b in batches])
    np.testing.assert_array_equal(index, [*range(10), -1, -1])
    last = batches[-1]
    np.testing.assert_array_equal(last["example_valid"], [True, True, False, False])
    assert not last["valid"][2:].any() and not last["image"][2:].any()
    assert not last["labels"][2:].any() and last["labels"].dtype == np.int32
    source = _source(shapes_dir, "validation")
    # Validation image 4, looked at by eye (rendered, drawn with its boxes): a filled triangle
    # (bottom left), a thin ring (top right) and an outlined triangle (bottom middle), in this
    # order; 3 boxes fit in 6 slots.
    position = [int(source[i]["image/id"]) for i in range(10)].index(4)
    labels = batches[position // 4]["labels"][position % 4]
    np.testing.assert_array_equal(labels, [2, 3, 2, 0, 0, 0])
    assert [info.class_names[c] for c in labels[:3]] == ["triangle", "ring", "triangle"]
    for b in batches:  # no flip in eval
        for i in np.nonzero(b["example_valid"])[0]:
            record = source[int(b["index"][i])]
            boxes, keep, _ = _expected_boxes(record, flip=False, max_boxes=6)
            np.testing.assert_allclose(b["boxes"][i, : len(boxes)], boxes, atol=1e-4)
            labels = _rendered_labels("validation", record)[keep]
            np.testing.assert_array_equal(b["labels"][i, : len(labels)], labels)
    parts = [
        list(pipeline.create_eval_iterator(config, process_index=p, process_count=2))
        for p in (0, 1)
    ]
    joined = [{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(*parts, strict=True)]
    _assert_batches_equal(joined, batches)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("name", "imagenet", "config.data.name"),
        ("pad_to", (80, 80), "config.data.pad_to"),  # not divisible by 32 (FPN)
        ("short_side", 100, "config.data.short_side"),  # > max_size
        ("max_boxes", 0, "config.data.max_boxes"),
    ],
)
def test_invalid_settings_name_the_field(shapes_dir, field, value, message):
    config = _config(shapes_dir, **{field: value})
    with pytest.raises(ValueError, match=message):
        pipeline.create_train_iterator(config)


def test_batch_must_divide_over_processes(shapes_dir):
    with pytest.raises(ValueError, match="config.batch_size"):
        pipeline.create_train_iterator(_config(shapes_dir), process_index=0, process_count=3)


# --- VOC and COCO ---------------------------------------------------------------------------


def _record(ignore_key):
    """A hand-made tfds record, 40x80: two boxes (the second flagged) and a degenerate one,
    of classes 3, 1 and 2."""
    rng = np.random.default_rng(0)
    bbox = [
        [0.1, 0.25, 0.5, 0.5],
        [0.5, 0.5, 1.0, 1.0],
        [0.2, 0.2, 0.2, 0.6],
    ]  # ymin xmin ymax xmax
    objects = {
        "bbox": [np.array(b, np.float32) for b in bbox],
        "label": [np.int64(3), np.int64(1), np.int64(2)],
        ignore_key: [False, True, False],
    }
    return {"image": rng.integers(0, 256, (40, 80, 3), dtype=np.uint8), "objects": objects}


@pytest.mark.parametrize(("family", "key"), [("voc", "is_difficult"), ("coco", "is_crowd")])
def test_decode_example_marks_difficult_and_crowd_boxes(family, key):
    image, boxes, labels, ignore = pipeline.decode_example(_record(key), family=family)
    assert image.shape == (40, 80, 3)
    # x = xmin * 80, y = ymin * 40; the zero-height third box (class 2) is dropped.
    np.testing.assert_allclose(boxes, [[20, 4, 40, 20], [40, 20, 80, 40]])
    np.testing.assert_array_equal(labels, [3, 1])
    assert labels.dtype == np.int32
    np.testing.assert_array_equal(ignore, [False, True])
    _, _, _, ignore = pipeline.decode_example(_record(key), family=family, ignore_difficult=False)
    np.testing.assert_array_equal(ignore, [False, False])


@pytest.mark.parametrize(
    ("name", "key"),
    [("voc/2007", "is_difficult"), ("voc/2012", "is_difficult"), ("coco/2017", "is_crowd")],
)
def test_real_datasets_through_the_pipeline_with_mock_data(monkeypatch, name, key):
    records = [_record(key) for _ in range(3)]

    def as_data_source(self, split, **kwargs):
        del self, split, kwargs
        return records

    config = get_config()
    config.data.name = name
    config.data.short_side, config.data.max_size, config.data.pad_to = 20, 64, (64, 64)
    config.data.max_boxes = 4
    config.data.num_eval_images = None
    config.batch_size = 2
    monkeypatch.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda self: True)
    with tfds.testing.mock_data(as_data_source_fn=as_data_source):
        # The real tfds feature spec has the fields the adapter reads.
        objects = tfds.builder(name).info.features["objects"]
        assert isinstance(objects["bbox"], tfds.features.BBoxFeature)
        assert objects[key].dtype == np.bool_
        # `objects/label` indexes the class names (`DatasetInfo.class_names`): 20 or 80.
        assert objects["label"].num_classes == (20 if name.startswith("voc") else 80)
        batches = list(pipeline.create_eval_iterator(config))
    assert len(batches) == 2
    b = batches[0]
    # 40x80 -> short side 20: scale 0.5 -> 20x40.
    np.testing.assert_array_equal(b["image_hw"], [[20, 40], [20, 40]])
    np.testing.assert_allclose(b["boxes"][0, :2], [[10, 2, 20, 10], [20, 10, 40, 20]])
    np.testing.assert_array_equal(b["valid"][0], [True, True, False, False])
    np.testing.assert_array_equal(b["ignore"][0], [False, True, False, False])
    np.testing.assert_array_equal(b["labels"][0], [3, 1, 0, 0])  # the degenerate box's 2 is gone
    np.testing.assert_array_equal(batches[1]["example_valid"], [True, False])
    np.testing.assert_array_equal(batches[1]["labels"][1], [0, 0, 0, 0])  # blank padding row


def test_unprepared_real_dataset_says_how_to_prepare(tmp_path):
    config = get_config()
    config.data.name = "voc/2007"
    config.data.data_dir = str(tmp_path)
    with pytest.raises(FileNotFoundError, match="tfds build voc/2007 --file_format=array_record"):
        pipeline.create_train_iterator(config)
