"""Tests for jax_rpn.predict: a tiny random-weight RPN run on image files of any size and kind.

Random weights give valid proposals, which is all these tests need: each checks what predict
does to the images (sizes, conversions, skips) against a reference built by hand here (PIL
resize to a hand-computed size, ImageNet normalisation, ``predict_proposals``, boxes scaled
back by hand).
"""

import json
import os

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from configs import tiny
from jax_rpn import checkpoints, evaluate, inference, predict, proposal_files, recall
from jax_rpn.data import pipeline, shapes
from jax_rpn.models import build_rpn, init_variables

BATCH = 4  # every run uses it, so the tests share one compiled program per padded shape
MEAN = np.array([123.675, 116.28, 103.53], np.float32)  # ImageNet RGB, tiny's pixel settings
STD = np.array([58.395, 57.12, 57.375], np.float32)


def _rgb(index, hw):
    return shapes.render_example("validation", index, image_hw=hw)["image"]


@pytest.fixture(scope="module", autouse=True)
def _clear_predict_cache(fast_compile_module):
    yield
    inference.predict_function.cache_clear()  # later tests count their own compiles


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    config = tiny.get_config()
    variables = init_variables(build_rpn(config), jax.random.key(0), (1, 64, 64, 3))
    path = str(tmp_path_factory.mktemp("model") / "tiny")
    checkpoints.save_variables(path, variables, config=config)
    return {"path": path, "config": config, "variables": variables}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A folder of ordinary and unusual images (PNG, so the pixels are exact)."""
    folder = tmp_path_factory.mktemp("images")
    color = _rgb(0, (96, 128))
    Image.fromarray(color).save(folder / "a_landscape.png")
    Image.fromarray(_rgb(1, (200, 100))).save(folder / "b_portrait.png")
    Image.fromarray(_rgb(2, (64, 64))).save(folder / "c_square.jpg", quality=95)
    gray = np.asarray(Image.fromarray(color).convert("L"))
    Image.fromarray(gray).save(folder / "d_gray.png")  # mode L
    Image.fromarray(np.repeat(gray[..., None], 3, axis=-1)).save(folder / "d_gray_as_rgb.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(folder / "d_gray16.png")  # I;16
    rgba = np.concatenate([color, np.full((96, 128, 1), 90, np.uint8)], axis=-1)
    Image.fromarray(rgba).save(folder / "e_rgba.png")
    Image.fromarray(color[:5, :6]).save(folder / "f_tiny.png")  # below the smallest anchor (8)
    Image.fromarray(np.zeros((2, 300, 3), np.uint8)).save(folder / "g_strip.png")  # -> 0x64
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    Image.fromarray(_rgb(3, (48, 96))).save(folder / "h_exif.png", exif=exif)
    Image.fromarray(np.rot90(_rgb(3, (48, 96)), k=-1)).save(folder / "h_rotated_by_hand.png")
    Image.fromarray(_rgb(4, (48, 128))).save(folder / "k_wide.png")
    (folder / "i_not_an_image.jpg").write_text("this is text")
    with open(folder / "c_square.jpg", "rb") as f:
        data = f.read()
    (folder / "j_truncated.jpg").write_bytes(data[: len(data) * 2 // 3])  # header fine, data cut
    (folder / "notes.txt").write_text("not an image extension: not picked up from the folder")
    return folder


@pytest.fixture(scope="module")
def result(model, images, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    props, report = predict.run(
        [str(images)], model=model["path"], output=str(out), batch_size=BATCH, progress=False
    )
    rows = {str(name): i for i, name in enumerate(props.file_names)}
    return {"props": props, "report": report, "out": out, "rows": rows}


def _expected(model, rgb, resized_hw):
    """Reference proposals of one uint8 image, by hand: PIL bilinear resize to ``resized_hw``,
    ImageNet normalisation, zero padding to 64x64, predict_proposals, boxes scaled back."""
    h, w = rgb.shape[:2]
    rh, rw = resized_hw
    small = np.asarray(Image.fromarray(rgb).resize((rw, rh), Image.BILINEAR), np.float32)
    batch = np.zeros((BATCH, 64, 64, 3), np.float32)
    batch[0, :rh, :rw] = (small - MEAN) / STD
    hw = np.tile(np.array([[64, 64]], np.int32), (BATCH, 1))
    hw[0] = resized_hw
    p = inference.predict_proposals(model["variables"], batch, hw, config=model["config"])
    valid = np.asarray(p.valid[0])
    boxes = np.asarray(p.boxes[0])[valid] * np.array([w / rw, h / rh, w / rw, h / rh])
    return boxes, np.asarray(jax.nn.sigmoid(p.scores[0]))[valid]


def _get(result, name):
    props, i = result["props"], result["rows"][name]
    valid = props.valid[i]
    return props.boxes[i][valid], props.scores[i][valid]


@pytest.mark.parametrize(
    "name, index, hw, resized",
    [
        # tiny: short side 64, long side at most 64, padded 64x64. 96x128 -> scale 0.5.
        ("a_landscape.png", 0, (96, 128), (48, 64)),
        ("b_portrait.png", 1, (200, 100), (64, 32)),  # scale 0.32
    ],
)
def test_proposals_in_original_pixels(model, result, name, index, hw, resized):
    boxes, scores = _get(result, name)
    want_boxes, want_scores = _expected(model, _rgb(index, hw), resized)
    assert len(boxes) == len(want_boxes) > 0
    np.testing.assert_allclose(boxes, want_boxes, atol=1e-3)
    np.testing.assert_allclose(scores, want_scores, atol=1e-6)
    assert np.all(np.diff(scores) <= 0)  # best first
    assert boxes.min() >= 0 and np.all(boxes[:, [2, 3]] <= [hw[1], hw[0]])


def test_outputs_agree(result):
    # The COCO JSON holds the npz's proposals, xywh, with image ids and file names.
    out, props = result["out"], result["props"]
    npz = proposal_files.read_npz(str(out / "proposals.npz"))
    for key in proposal_files.NPZ_KEYS:
        np.testing.assert_array_equal(getattr(npz, key), getattr(props, key))
    with open(out / "proposals.json") as f:
        records = json.load(f)
    first = props.image_ids[0]
    mine = [r for r in records if r["image_id"] == first]
    assert len(mine) == props.valid[0].sum()
    x1, y1, x2, y2 = props.boxes[0, 0].astype(np.float64)
    assert mine[0]["bbox"] == [x1, y1, x2 - x1, y2 - y1]
    assert mine[0]["file_name"] == props.file_names[0] and mine[0]["category_id"] == 1
    assert np.all(np.isfinite(props.boxes)) and np.all(np.isfinite(props.scores))
    # Ids are positions in the sorted input list; a skipped image keeps its number free.
    assert result["rows"]["a_landscape.png"] == 0 and props.image_ids[0] == 0
    report = json.load(open(out / "report.json"))
    assert report["processed"] == props.num_images == 11
    assert report["num_inputs"] == 14  # the .txt file is not an image extension
    assert report["images_per_second"] > 0 and list(report["compile_s"]) == ["64x64"]


def _assert_same_proposals(got, want):
    """Proposals of the same pixels: equal up to float32 rounding. XLA's CPU convolutions may
    round an image's outputs differently by its place in the batch (1 ulp on some CPUs)."""
    (boxes, scores), (want_boxes, want_scores) = got, want
    assert len(boxes) == len(want_boxes) > 0
    np.testing.assert_allclose(boxes, want_boxes, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-6, atol=1e-7)


def test_grayscale_rgba_and_16_bit_are_converted_and_counted(result):
    gray_boxes, gray_scores = _get(result, "d_gray_as_rgb.png")
    for name in ("d_gray.png", "d_gray16.png"):  # the same pixels as d_gray_as_rgb.png
        _assert_same_proposals(_get(result, name), (gray_boxes, gray_scores))
    # alpha dropped: the colour image's proposals
    _assert_same_proposals(_get(result, "e_rgba.png"), _get(result, "a_landscape.png"))
    repaired = result["report"].repaired
    assert [os.path.basename(p) for p in repaired["L converted to RGB"]] == ["d_gray.png"]
    assert [os.path.basename(p) for p in repaired["RGBA converted to RGB"]] == ["e_rgba.png"]
    assert [os.path.basename(p) for p in repaired["I;16 scaled from 16 bits to 8-bit RGB"]] == [
        "d_gray16.png"
    ]


def test_exif_orientation_is_applied(result):
    _assert_same_proposals(_get(result, "h_exif.png"), _get(result, "h_rotated_by_hand.png"))
    i = result["rows"]["h_exif.png"]
    assert tuple(result["props"].image_hw[i]) == (96, 48)  # as displayed
    assert any("h_exif.png" in p for p in result["report"].repaired["EXIF orientation applied"])


def test_image_smaller_than_smallest_anchor_is_enlarged_and_counted(result):
    # 5x6 pixels, smallest anchor 8 px: the resize enlarges it to 53x64 like any image.
    boxes, scores = _get(result, "f_tiny.png")
    assert len(boxes) > 0 and np.all(np.isfinite(boxes)) and np.all(np.isfinite(scores))
    assert boxes.min() >= 0 and boxes[:, 2].max() <= 6 and boxes[:, 3].max() <= 5
    note = "smaller than the smallest anchor (8 px), enlarged"
    assert [os.path.basename(p) for p in result["report"].repaired[note]] == ["f_tiny.png"]


def test_image_that_resizes_below_the_smallest_anchor_is_skipped_and_named(result):
    # 2x300: fitting the long side to 64 px leaves 0 rows (2 * 64 / 300 = 0.43).
    reason = result["report"].skipped[next(p for p in result["report"].skipped if "strip" in p)]
    assert "2x300 -> 0x64" in reason and "smallest anchor (8 px)" in reason
    assert "g_strip.png" not in result["rows"]


def test_files_that_are_not_images_are_skipped_and_named(result):
    skipped = {os.path.basename(p): r for p, r in result["report"].skipped.items()}
    assert skipped["i_not_an_image.jpg"].startswith("not an image Pillow can read")
    assert skipped["j_truncated.jpg"].startswith("cannot be decoded")
    assert set(skipped) == {"g_strip.png", "i_not_an_image.jpg", "j_truncated.jpg"}
    summary = result["report"].summary()
    assert "i_not_an_image.jpg" in summary and "j_truncated.jpg" in summary


def test_one_compile_per_padded_shape(model, images, tmp_path):
    # Aspect-ratio buckets as training has them: pad_to 64x128 and its transpose. Seven images
    # of five sizes in three batches: two compiles.
    config = tiny.get_config()
    config.data.max_size, config.data.pad_to, config.data.aspect_buckets = 128, (64, 128), True
    fn = inference.predict_function(ml_collections.FrozenConfigDict(config))
    before = fn._cache_size()
    names = ["a_landscape.png", "b_portrait.png", "c_square.jpg", "d_gray.png", "e_rgba.png"]
    names += ["h_exif.png", "k_wide.png"]
    paths = [str(images / n) for n in names]
    _, report = predict.run(
        paths,
        model=model["path"],
        output=str(tmp_path),
        config=config,
        batch_size=3,
        progress=False,
    )
    assert report.processed == 7 and sorted(report.compile_s) == ["128x64", "64x128"]
    assert fn._cache_size() - before == 2
    # 200x100 fits 128x64 at scale 0.64 (128x64) but 64x128 only at 0.32: the portrait bucket.
    plans = predict.plan_images(paths, config, report=predict.Report())
    assert [(p.pad_hw, p.resized_hw) for p in plans[:2]] == [
        ((64, 128), (64, 85)),  # 96x128: scale 2/3
        ((128, 64), (128, 64)),
    ]
    assert [p.pad_hw for p in plans].count((128, 64)) == 2  # b_portrait, h_exif (96x48 shown)


def test_annotations_give_coco_ids(model, images, tmp_path):
    ann = tmp_path / "ann.json"
    coco = {"images": [{"id": 42, "file_name": "sub/c_square.jpg"}], "annotations": []}
    ann.write_text(json.dumps(coco))
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "c_square.jpg").write_bytes((images / "c_square.jpg").read_bytes())
    props, report = predict.run(
        [str(images / "c_square.jpg"), str(images / "b_portrait.png"), str(copy / "c_square.jpg")],
        model=model["path"],
        output=str(tmp_path / "out"),
        batch_size=BATCH,
        annotations=str(ann),
        overlays=3,
        progress=False,
    )
    assert props.image_ids.tolist() == [42]
    assert "not among the --annotations" in report.skipped[str(images / "b_portrait.png")]
    assert "has the same file name" in report.skipped[str(copy / "c_square.jpg")]
    assert (tmp_path / "out" / "overlays" / "42_c_square.png").stat().st_size > 0


def test_errors_name_the_input(model, images, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png is not a file or folder"):
        predict.find_images([str(tmp_path / "nope.png")])
    with pytest.raises(ValueError, match="(?s)no usable images.*i_not_an_image.jpg"):
        predict.run(
            [str(images / "i_not_an_image.jpg")],
            model=model["path"],
            output=str(tmp_path),
            progress=False,
        )
    # A config that does not fit the variables (another width) is named, not a Flax error.
    wide = tiny.get_config()
    wide.model.width = 12
    with pytest.raises(ValueError, match="do not fit the model of this config"):
        predict.run([str(images)], model=model["path"], output=str(tmp_path), config=wide)
    variables, _, _ = checkpoints.load_variables(model["path"])
    bare = tmp_path / "bare"
    checkpoints.save_variables(str(bare), variables, config=tiny.get_config())
    os.remove(bare / "config.json")
    with pytest.raises(ValueError, match="holds no config.json; pass --config"):
        predict.run([str(images)], model=str(bare), output=str(tmp_path))


def test_predict_and_evaluate_reproduce_training_eval(model, tmp_path):
    # The validation images as files + a COCO JSON of their boxes; predict and evaluate on
    # them must give the recall the trainer's own evaluation gives (proposals from pipeline
    # batches, jax_rpn.recall), the reference here. Sizes differ (files 96x128, pipeline
    # 48x64: exactly half), which leaves IoUs, so overall recall, unchanged.
    config = tiny.get_config()
    config.data.data_dir = str(tmp_path / "tfds")
    config.batch_size = BATCH
    config.data.max_boxes = shapes.MAX_OBJECTS  # keep every box (tiny keeps 8)
    source = shapes.ensure_prepared(config.data.name, data_dir=config.data.data_dir)
    records = source.as_data_source("validation")
    folder = tmp_path / "val"
    folder.mkdir()
    images, annotations = [], []
    for index in range(len(records)):
        image, boxes, _, _ = pipeline.decode_example(records[index], family="rpn_shapes")
        Image.fromarray(image).save(folder / f"{index:03d}.png")
        images.append({"id": index, "file_name": f"{index:03d}.png"})
        for x1, y1, x2, y2 in boxes.tolist():
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": index,
                    "category_id": 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                }
            )
    ann = tmp_path / "val.json"
    ann.write_text(
        json.dumps(
            {
                "images": images,
                "annotations": annotations,
                "categories": [{"id": 1, "name": "shape"}],
            }
        )
    )
    predict.run(
        [str(folder)],
        model=model["path"],
        output=str(tmp_path / "out"),
        annotations=str(ann),
        batch_size=BATCH,
        progress=False,
    )
    ours = evaluate.run(annotations=str(ann), proposals=str(tmp_path / "out" / "proposals.npz"))

    acc = recall.RecallAccumulator()
    stats_fn = jax.jit(jax.vmap(recall.recall_stats))
    for batch in pipeline.create_eval_iterator(config):
        p = inference.predict_proposals(
            model["variables"], batch["image"], batch["image_hw"], config=config
        )
        valid = p.valid & batch["example_valid"][:, None]
        stats = stats_fn(p.boxes, p.scores, valid, batch["boxes"], batch["valid"], batch["ignore"])
        acc.update(stats._replace(num_images=batch["example_valid"].astype(np.int32)))
    want = acc.result()
    assert want["num_images"] == ours["num_images"] == 12 and want["num_gt"] == ours["num_gt"]
    assert 0 < want["recall@0.5@100"] < 1
    for key in ("AR@100", "AR@300", "AR@1000", "recall@0.5@100", "recall@0.7@100"):
        assert ours[key] == pytest.approx(want[key], abs=1e-12), key
