"""Aspect-ratio buckets: hand-computed assignment, batches from one bucket, exact resume."""

import json

import chex
import jax
import numpy as np
import pytest
from PIL import Image

from configs import tiny
from jax_rpn import parallel, training
from jax_rpn.data import buckets, pipeline
from jax_rpn.models import build_rpn
from jax_rpn.optim import create_optimizer

pytestmark = pytest.mark.slow  # end-to-end runs: first in the queue (tests/conftest.py)


def test_padded_shapes_and_assignment_by_hand():
    shapes = buckets.padded_shapes((800, 1344), aspect_buckets=True)
    assert shapes == ((800, 1344), (1344, 800))
    assert buckets.padded_shapes((800, 1344), aspect_buckets=False) == ((800, 1344),)
    assert buckets.padded_shapes((64, 64), aspect_buckets=True) == ((64, 64),)
    bucket = lambda hw: buckets.bucket_of(hw, shapes, short_side=800, max_size=1333)  # noqa: E731
    # 480x640 -> 800x1067 fits the landscape bucket; in the portrait one it would shrink to
    # 600x800. Portrait images the other way round; a square one fits both equally: the first.
    assert bucket((480, 640)) == 0 and bucket((640, 480)) == 1 and bucket((500, 500)) == 0
    # 1:3 panorama: 800x2400 -> capped at 1333 wide (444x1333): landscape.
    assert bucket((300, 900)) == 0


def test_bucket_batches_come_from_one_bucket_and_drop_only_leftovers():
    ids = np.array([0, 1, 1, 0, 1, 1, 1, 0, 0, 0, 1], np.int32)  # 5 landscape, 6 portrait
    seq = buckets.BucketBatches(ids, batch_size=2, seed=3)
    first_epoch = [seq[i] for i in range(2 + 3)]  # 5 // 2 + 6 // 2 batches per epoch
    seen = np.concatenate([indices for _, indices in first_epoch])
    assert len(set(seen.tolist())) == 10  # each record at most once; one leftover dropped
    for b, indices in first_epoch:
        assert np.all(ids[indices] == b)
    again = buckets.BucketBatches(ids, batch_size=2, seed=3)
    for i in (7, 3, 12, 0):  # random access, any order: the same batches
        b, indices = again[i]
        b2, indices2 = seq[i]
        assert b == b2 and np.array_equal(indices, indices2)
    with pytest.raises(ValueError, match="no aspect-ratio bucket has batch_size=8"):
        buckets.BucketBatches(ids, batch_size=8, seed=0)


@pytest.fixture(scope="module")
def mixed_dataset(tmp_path_factory):
    """A COCO JSON dataset of 4 landscape (96x128) and 6 portrait (128x96) images, one box each."""
    root = tmp_path_factory.mktemp("mixed")
    images, annotations = [], []
    rng = np.random.default_rng(0)
    for i in range(10):
        h, w = (96, 128) if i < 4 else (128, 96)
        name = f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(root / name)
        images.append({"id": i + 1, "file_name": name, "height": h, "width": w})
        annotations.append(
            {
                "id": i + 1,
                "image_id": i + 1,
                "category_id": 1,
                "bbox": [2, 4, 10 + i, 12],
                "iscrowd": 0,
            }  # fmt: skip
        )
    ann = root / "ann.json"
    ann.write_text(
        json.dumps(
            {
                "images": images,
                "annotations": annotations,
                "categories": [{"id": 1, "name": "thing"}],
            }
        )  # fmt: skip
    )
    return root, ann


def _config(root, ann):
    c = tiny.get_config()
    c.data.name = "coco_json"
    c.data.data_dir = str(root / "tfds")
    c.data.train_annotations = c.data.eval_annotations = str(ann)
    c.data.train_images = c.data.eval_images = str(root)
    c.data.short_side, c.data.max_size = 64, 128
    c.data.pad_to = (64, 128)
    c.data.aspect_buckets = True
    c.data.num_eval_images = None
    c.batch_size = 2
    return c


def test_train_batches_from_one_bucket_resume_exactly(mixed_dataset):
    config = _config(*mixed_dataset)
    it = pipeline.create_train_iterator(config)
    batches = [next(it) for _ in range(6)]
    for b in batches:
        # Landscape 96x128 -> 64x85 in the 64x128 bucket; portrait 128x96 -> 85x64 in 128x64.
        hw = {(64, 85): (64, 128), (85, 64): (128, 64)}[tuple(b["image_hw"][0])]
        assert b["image"].shape == (2, *hw, 3)
        assert np.all(b["image_hw"] == b["image_hw"][0])  # both rows from the bucket
        for row, i in enumerate(b["index"]):  # the box written for image i, maybe flipped
            w, new_h, new_w = (128 if i < 4 else 96), *b["image_hw"][row]
            box = np.array([2, 4, 12 + i, 16], np.float32)
            flipped = np.array([w - box[2], box[1], w - box[0], box[3]])
            scale = np.array([new_w / w, new_h / (w * 3 / 4 if i < 4 else w * 4 / 3)] * 2)
            got = b["boxes"][row, 0]
            assert np.allclose(got, box * scale, atol=1e-3) or np.allclose(
                got, flipped * scale, atol=1e-3
            ), (got, box * scale)
    assert {b["image"].shape for b in batches} == {(2, 64, 128, 3), (2, 128, 64, 3)}

    resumed = pipeline.create_train_iterator(config)
    probe = pipeline.create_train_iterator(config)
    for _ in range(3):
        next(probe)
    resumed.set_state(probe.get_state())
    for expected in batches[3:]:
        got = next(resumed)
        chex.assert_trees_all_equal(got, expected)

    two_hosts = [
        pipeline.create_train_iterator(config, process_index=p, process_count=2) for p in (0, 1)
    ]
    for expected in batches[:4]:
        rows = [next(h) for h in two_hosts]
        joined = {k: np.concatenate([rows[0][k], rows[1][k]]) for k in expected}
        chex.assert_trees_all_equal(joined, expected)


def test_eval_covers_every_image_once_per_bucket(mixed_dataset):
    config = _config(*mixed_dataset)
    info = pipeline.dataset_info(config)
    batches = list(pipeline.create_eval_iterator(config))
    assert len(batches) == info.num_eval_batches == 2 + 3  # 4 landscape / 2, 6 portrait / 2
    assert info.padded_shapes == ((64, 128), (128, 64))
    indices = np.concatenate([b["index"][b["example_valid"]] for b in batches])
    assert sorted(indices.tolist()) == list(range(10))


def test_train_step_compiles_once_per_bucket(fast_compile):
    config = tiny.get_config()
    config.data.pad_to, config.data.aspect_buckets = (64, 128), True
    config.data.short_side, config.data.max_size = 64, 128
    mesh = parallel.data_mesh(jax.devices()[:1])
    model = build_rpn(config, axis_name=parallel.AXIS)
    tx, schedule = create_optimizer(config.optim, config.num_train_steps)
    state = training.create_train_state(config, build_rpn(config), tx, jax.random.key(0))
    state = jax.device_put(state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    step = chex.assert_max_traces(training.make_train_step(config, model, tx, schedule), n=2)
    p_step = parallel.parallelize(step, mode="shard_map", mesh=mesh)
    rng = np.random.default_rng(0)
    for hw in [(64, 128), (128, 64), (64, 128), (128, 64), (128, 64)]:  # two buckets
        batch = {
            "image": rng.normal(size=(8, *hw, 3)).astype(np.float32),
            "boxes": np.tile(np.array([[4, 4, 30, 40]], np.float32), (8, 8, 1)),
            "valid": np.ones((8, 8), bool),
            "ignore": np.zeros((8, 8), bool),
            "image_hw": np.tile(np.array([hw], np.int32), (8, 1)),
        }
        state, metrics = p_step(state, parallel.shard_batch(batch, mode="shard_map", mesh=mesh))
        assert np.isfinite(float(metrics["loss"]))
