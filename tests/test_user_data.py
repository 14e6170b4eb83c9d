"""Tests of users' own datasets: COCO JSON and VOC folders -> tfds -> the input pipeline.

Every dataset here is written by the test into tmp_path (a few tiny images); expected boxes are
computed by hand from the numbers written into the annotation files.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from configs import tiny
from configs.default import get_config
from jax_rpn import coverage
from jax_rpn.data import coco_json, example_dataset, pipeline, shapes, user_datasets, voc_folder
from jax_rpn.data.annotations import AnnotationError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pixels(h, w, seed=0, channels=3):
    return np.random.default_rng(seed).integers(0, 256, (h, w, channels), np.uint8).squeeze()


def _save(path, array, fmt="PNG", mode=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array, mode).save(path, format=fmt)


def _write_json(path, data):
    with open(path, "w") as f:
        json.dump(data, f)
    return str(path)


def _image(i, name, h, w):
    return {"id": i, "file_name": name, "height": h, "width": w}


def _ann(i, image_id, bbox, category_id=1, iscrowd=0):
    return {"id": i, "image_id": image_id, "category_id": category_id, "bbox": bbox,
            "iscrowd": iscrowd}  # fmt: skip


CATS = [{"id": 1, "name": "thing"}]


def _coco_config(tmp_path, annotations, images, *, eval_pair=None):
    """config: 64x64 padding, short side 32; eval on `eval_pair`, else on split train."""
    c = get_config()
    c.batch_size = 4
    c.data.name = "coco_json"
    c.data.data_dir = str(tmp_path / "tfds")
    c.data.train_annotations, c.data.train_images = str(annotations), str(images)
    if eval_pair is None:
        c.data.eval_split = "train"
    else:
        c.data.eval_annotations, c.data.eval_images = (str(p) for p in eval_pair)
    c.data.short_side, c.data.max_size, c.data.pad_to = 32, 64, (64, 64)
    c.data.max_boxes = 4
    return c


def _prepare(config):
    builder = user_datasets.ensure_prepared(config.data, progress=False, print_report=False)
    return builder, user_datasets.read_report(os.fspath(builder.data_dir))


def _eval_batches(config):
    return list(pipeline.create_eval_iterator(config, process_index=0, process_count=1))


def _examples(config):
    """The eval examples, unbatched: a list of dicts of arrays (padding rows left out)."""
    out = []
    for b in _eval_batches(config):
        for r in range(len(b["index"])):
            if b["example_valid"][r]:
                out.append({k: v[r] for k, v in b.items()})
    return out


def _one_image_dataset(tmp_path, annotations, *, h=40, w=60, categories=CATS):
    """A COCO JSON with one 40x60 PNG `a.png` and `annotations` for image 1."""
    _save(str(tmp_path / "img" / "a.png"), _pixels(h, w))
    data = {"images": [_image(1, "a.png", h, w)], "annotations": annotations,
            "categories": categories}  # fmt: skip
    return _write_json(tmp_path / "a.json", data), tmp_path / "img"


# --- round trips ------------------------------------------------------------------------------


def test_coco_round_trip_through_the_eval_pipeline(tmp_path):
    img = tmp_path / "images"
    a = _pixels(40, 60, seed=1)
    _save(str(img / "a.png"), a)
    _save(str(img / "sub" / "b.jpg"), _pixels(50, 30, seed=2), fmt="JPEG")
    _save(str(img / "c.png"), _pixels(64, 64, seed=3))
    data = {
        "images": [
            _image(11, "a.png", 40, 60),
            _image(5, "sub/b.jpg", 50, 30),
            _image(9, "c.png", 64, 64),
        ],  # fmt: skip
        "annotations": [
            _ann(1, 11, [4.5, 2.0, 20.0, 10.5], category_id=7),
            _ann(2, 11, [30, 20, 10, 15], category_id=3, iscrowd=1),
            _ann(3, 5, [0, 0, 30, 50], category_id=10),
        ],
        # Sparse ids, listed out of order: labels follow increasing id (3, 7, 10 -> 0, 1, 2).
        "categories": [{"id": 10, "name": "c10"}, {"id": 3, "name": "c3"}, {"id": 7, "name": "c7"}],
    }
    config = _coco_config(tmp_path, _write_json(tmp_path / "a.json", data), img)
    info = pipeline.dataset_info(config)
    assert info.class_names == ("c3", "c7", "c10")
    assert info.num_train_examples == info.num_eval_examples == 3
    ex = _examples(config)
    assert [e["index"] for e in ex] == [0, 1, 2]  # records keep the JSON's order
    # a.png 40x60: short side 40 -> 32, scale 0.8 on both axes -> 32x48.
    # xywh [4.5, 2, 20, 10.5] -> xyxy [4.5, 2, 24.5, 12.5] -> x 0.8; crowd [30, 20, 40, 35].
    np.testing.assert_array_equal(ex[0]["image_hw"], [32, 48])
    np.testing.assert_allclose(
        ex[0]["boxes"][:2], [[3.6, 1.6, 19.6, 10.0], [24.0, 16.0, 32.0, 28.0]], atol=1e-4
    )
    np.testing.assert_array_equal(ex[0]["labels"][:2], [1, 0])
    np.testing.assert_array_equal(ex[0]["ignore"][:2], [False, True])
    np.testing.assert_array_equal(ex[0]["valid"], [True, True, False, False])
    # b.jpg 50x30: short side 30 -> 32: h = 50 * 32 / 30 = 53.3 -> 53, w = 32; the whole image.
    np.testing.assert_array_equal(ex[1]["image_hw"], [53, 32])
    np.testing.assert_allclose(ex[1]["boxes"][0], [0, 0, 32, 53], atol=1e-4)
    assert ex[1]["labels"][0] == 2 and not ex[1]["ignore"][0]
    # c.png has no annotations: kept as a negative.
    np.testing.assert_array_equal(ex[2]["image_hw"], [32, 32])
    assert not ex[2]["valid"].any()
    # The stored bytes are the files' own: PNG decodes to the written pixels, the JPEG to what
    # PIL decodes from the file.
    builder, report = _prepare(config)
    source = builder.as_data_source("train")
    np.testing.assert_array_equal(source[0]["image"], a)
    np.testing.assert_array_equal(source[1]["image"], np.asarray(Image.open(img / "sub" / "b.jpg")))
    assert [int(source[i]["image/id"]) for i in range(3)] == [11, 5, 9]
    assert source[1]["image/filename"] in ("sub/b.jpg", b"sub/b.jpg")
    s = report["splits"]["train"]
    assert (s["images_kept"], s["negatives"], s["boxes_kept"], s["boxes_ignore"]) == (3, 1, 3, 1)
    assert report["class_names"] == ["c3", "c7", "c10"]


def _voc_xml(filename, h, w, objects):
    objs = "".join(
        f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{b[0]}</xmin>"
        f"<ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for n, d, b in objects
    )
    return (
        f"<annotation><filename>{filename}</filename><size><width>{w}</width>"
        f"<height>{h}</height><depth>3</depth></size>{objs}</annotation>"
    )


def _voc_folder(root, images, splits):
    """images: {id: (h, w, objects)}; splits: {name: [ids]}."""
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        os.makedirs(root / sub, exist_ok=True)
    for k, (image_id, (h, w, objects)) in enumerate(images.items()):
        _save(str(root / "JPEGImages" / f"{image_id}.jpg"), _pixels(h, w, seed=k), fmt="JPEG")
        (root / "Annotations" / f"{image_id}.xml").write_text(
            _voc_xml(f"{image_id}.jpg", h, w, objects)
        )
    for name, ids in splits.items():
        (root / "ImageSets" / "Main" / f"{name}.txt").write_text("".join(f"{i}\n" for i in ids))


def _voc_config(tmp_path, root, train_split, eval_split):
    c = get_config()
    c.batch_size = 4
    c.data.name = "voc_folder"
    c.data.data_dir = str(tmp_path / "tfds")
    c.data.voc_root = str(root)
    c.data.train_split, c.data.eval_split = train_split, eval_split
    c.data.short_side, c.data.max_size, c.data.pad_to = 32, 64, (64, 64)
    c.data.max_boxes = 4
    return c


def test_voc_round_trip_through_the_eval_pipeline(tmp_path):
    root = tmp_path / "VOC"
    _voc_folder(
        root,
        {
            "000001": (40, 60, [("dog", 0, (5, 3, 24, 12)), ("cat", 1, (31, 21, 40, 35))]),
            "000002": (32, 32, [("zebra", 0, (1, 1, 32, 32))]),
            "000003": (32, 32, []),
        },
        {"train": ["000002", "000003"], "val": ["000001"]},
    )
    config = _voc_config(tmp_path, root, "train", "val")
    info = pipeline.dataset_info(config)
    # zebra is not a VOC class: the classes are those found, sorted.
    assert info.class_names == ("cat", "dog", "zebra")
    assert (info.num_train_examples, info.num_eval_examples) == (2, 1)
    (ex,) = _examples(config)
    # VOC pixels 5..24 (1-based, inclusive) are [4, 24] here; 40x60 -> 32x48 (x 0.8).
    np.testing.assert_array_equal(ex["image_hw"], [32, 48])
    np.testing.assert_allclose(
        ex["boxes"][:2], [[3.2, 1.6, 19.2, 9.6], [24.0, 16.0, 32.0, 28.0]], atol=1e-4
    )
    np.testing.assert_array_equal(ex["labels"][:2], [1, 0])
    np.testing.assert_array_equal(ex["ignore"][:2], [False, True])  # difficult -> ignore
    _, report = _prepare(config)
    assert report["splits"]["train"]["negatives"] == 1
    assert "found in the XML files" in report["class_source"]


def test_voc_classes_are_the_twenty_when_all_names_are_voc_classes(tmp_path):
    root = tmp_path / "VOC"
    _voc_folder(root, {"a": (32, 32, [("person", 0, (1, 1, 10, 10))])}, {"trainval": ["a"]})
    info = pipeline.dataset_info(_voc_config(tmp_path, root, "trainval", "trainval"))
    assert info.class_names == voc_folder.VOC_CLASSES and len(info.class_names) == 20
    assert voc_folder.class_names({"cat", "zebra"})[0] == ("cat", "zebra")


# --- bad input: repaired and counted ----------------------------------------------------------


def test_boxes_with_zero_or_negative_size_are_dropped_and_counted(tmp_path):
    ann, img = _one_image_dataset(
        tmp_path,
        [
            _ann(1, 1, [20, 5, -6, 10]),  # x2 = 14 < x1 = 20
            _ann(2, 1, [3, 4, 0, 10]),  # zero width
            _ann(3, 1, [3, 4, 10, 0]),  # zero height
            _ann(4, 1, [10, 10, 5, 5]),  # fine: [10, 10, 15, 15]
        ],
    )
    config = _coco_config(tmp_path, ann, img)
    _, report = _prepare(config)
    s = report["splits"]["train"]
    assert s["dropped_zero_or_negative_size"] == 3 and s["boxes_kept"] == 1
    assert s["boxes_listed"] == 4 and s["dropped_outside_image"] == s["clipped"] == 0
    assert "annotations[0] (id 1)" in s["examples"]["dropped_zero_or_negative_size"][0]
    (ex,) = _examples(config)
    np.testing.assert_allclose(ex["boxes"][0], np.array([10, 10, 15, 15]) * 0.8, atol=1e-4)
    assert ex["valid"].sum() == 1


def test_boxes_crossing_the_border_are_clipped_and_outside_ones_dropped(tmp_path):
    ann, img = _one_image_dataset(
        tmp_path,
        [
            _ann(1, 1, [-5, 30, 20, 20]),  # [-5, 30, 15, 50] in a 60x40 image -> [0, 30, 15, 40]
            _ann(2, 1, [70, 5, 10, 10]),  # [70, 80] right of x = 60: outside
            _ann(3, 1, [60, 5, 10, 10]),  # touches the right edge only: outside
        ],
    )
    config = _coco_config(tmp_path, ann, img)
    _, report = _prepare(config)
    s = report["splits"]["train"]
    assert (s["clipped"], s["dropped_outside_image"], s["boxes_kept"]) == (1, 2, 1)
    assert "-> [0.0, 30.0, 15.0, 40.0]" in s["examples"]["clipped"][0]
    (ex,) = _examples(config)
    np.testing.assert_allclose(ex["boxes"][0], np.array([0, 30, 15, 40]) * 0.8, atol=1e-4)
    assert np.isfinite(ex["boxes"]).all() and ex["valid"].sum() == 1


def test_grayscale_and_rgba_images_become_rgb_and_are_counted(tmp_path):
    img = tmp_path / "img"
    gray, rgba = _pixels(32, 32, seed=4, channels=1), _pixels(32, 32, seed=5, channels=4)
    _save(str(img / "gray.png"), gray, mode="L")
    _save(str(img / "rgba.png"), rgba, mode="RGBA")
    _save(str(img / "gray.jpg"), gray, fmt="JPEG", mode="L")
    data = {
        "images": [
            _image(1, "gray.png", 32, 32),
            _image(2, "rgba.png", 32, 32),
            _image(3, "gray.jpg", 32, 32),
        ],  # fmt: skip
        "annotations": [_ann(1, 1, [1, 1, 8, 8]), _ann(2, 2, [2, 2, 8, 8])],
        "categories": CATS,
    }
    config = _coco_config(tmp_path, _write_json(tmp_path / "a.json", data), img)
    builder, report = _prepare(config)
    assert report["splits"]["train"]["converted_to_rgb"] == {"L": 2, "RGBA": 1}
    source = builder.as_data_source("train")
    np.testing.assert_array_equal(source[0]["image"], np.repeat(gray[..., None], 3, axis=2))
    np.testing.assert_array_equal(source[1]["image"], rgba[..., :3])  # alpha dropped
    gray_jpeg = np.asarray(Image.open(img / "gray.jpg"), np.float32)  # re-encoded at quality 95
    assert source[2]["image"].shape == (32, 32, 3)
    assert np.abs(source[2]["image"][..., 0] - gray_jpeg).mean() < 2.0
    batch = _eval_batches(config)[0]
    assert batch["image"].shape == (4, 64, 64, 3) and np.isfinite(batch["image"]).all()


def test_exif_orientation_is_applied(tmp_path):
    img = tmp_path / "img"
    stored = np.full((20, 30, 3), 128, np.uint8)  # 30 wide, 20 high; orientation 6: clockwise
    stored[:8, :16] = (255, 0, 0)  # red top-left block
    exif = Image.Exif()
    exif[0x0112] = 6
    os.makedirs(img)
    Image.fromarray(stored).save(img / "r.jpg", exif=exif.tobytes(), quality=95)
    data = {"images": [_image(1, "r.jpg", 30, 20)], "annotations": [], "categories": CATS}
    config = _coco_config(tmp_path, _write_json(tmp_path / "a.json", data), img)
    builder, report = _prepare(config)
    assert report["splits"]["train"]["exif_rotated"] == 1
    upright = builder.as_data_source("train")[0]["image"]
    assert upright.shape == (30, 20, 3)
    # Turned clockwise: the red block is now at the top right (JPEG: approximately).
    decoded = np.asarray(Image.open(img / "r.jpg"), float)  # as stored, not turned
    # Re-encoded at quality 95 (a turn the wrong way would differ by about 50 on average).
    assert np.abs(upright - np.rot90(decoded, k=-1)).mean() < 3
    assert upright[:16, -8:, 0].mean() > 200 and upright[:16, :8, 0].mean() < 160


# --- bad input: skipped and named -------------------------------------------------------------


def test_missing_and_non_image_files_are_skipped_and_named(tmp_path):
    img = tmp_path / "img"
    _save(str(img / "ok.png"), _pixels(32, 32))
    (img / "notes.jpg").write_text("this is not an image")
    jpeg = img / "cut.jpg"
    _save(str(jpeg), _pixels(32, 32), fmt="JPEG")
    jpeg.write_bytes(jpeg.read_bytes()[:300])  # truncated
    _save(str(img / "big.png"), _pixels(40, 40))  # but the JSON says 32x32
    data = {
        "images": [
            _image(1, "ok.png", 32, 32),
            _image(2, "gone.jpg", 32, 32),
            _image(3, "notes.jpg", 32, 32),
            _image(4, "cut.jpg", 32, 32),
            _image(5, "big.png", 32, 32),
        ],  # fmt: skip
        "annotations": [
            _ann(1, 1, [1, 1, 5, 5]),
            _ann(2, 2, [1, 1, 5, 5]),
            _ann(3, 2, [2, 2, 5, 5]),
            _ann(4, 3, [1, 1, 5, 5]),
        ],  # fmt: skip
        "categories": CATS,
    }
    config = _coco_config(tmp_path, _write_json(tmp_path / "a.json", data), img)
    _, report = _prepare(config)
    s = report["splits"]["train"]
    reasons = {x["file"]: x["reason"] for x in s["skipped"]}
    assert reasons["gone.jpg"] == "missing file"
    assert reasons["notes.jpg"].startswith("not an image")
    assert reasons["cut.jpg"] == "cannot decode: Truncated File Read"
    assert reasons["big.png"] == "the image is 40x40 (width x height), the annotations say 32x32"
    assert (s["images_listed"], s["images_kept"], s["images_skipped"]) == (5, 1, 4)
    assert (s["boxes_listed"], s["boxes_kept"], s["boxes_on_skipped_images"]) == (4, 1, 3)
    assert pipeline.dataset_info(config).num_train_examples == 1
    text = user_datasets.format_report(report)
    assert "skipped gone.jpg: missing file" in text and "skipped notes.jpg: not an image" in text


def test_a_split_without_any_usable_image_is_an_error(tmp_path):
    data = {"images": [_image(1, "gone.jpg", 32, 32)], "annotations": [], "categories": CATS}
    os.makedirs(tmp_path / "img")
    config = _coco_config(tmp_path, _write_json(tmp_path / "a.json", data), tmp_path / "img")
    with pytest.raises(ValueError, match=r"a\.json: no image of split 'train' can be used.*gone"):
        _prepare(config)
    assert not os.path.exists(user_datasets.dataset_dir(config.data))


# --- bad input: errors naming the file and the field ------------------------------------------


@pytest.mark.parametrize(
    "change, where, problem",
    [
        (lambda d: d["annotations"][1].update(category_id=4), "annotations[1].category_id",
         "one of the categories' ids [1]"),
        (lambda d: d["annotations"][0].update(image_id=99), "annotations[0].image_id",
         "the id of an item of images"),
        (lambda d: d["annotations"][0].pop("bbox"), "annotations[0].bbox", "four finite numbers"),
        (lambda d: d["annotations"][0].update(bbox=[1, 2, float("nan"), 3]),
         "annotations[0].bbox", "four finite numbers"),
        (lambda d: d["images"][0].pop("file_name"), "images[0].file_name", "one-line string"),
        (lambda d: d["images"].append(dict(d["images"][0])), "images[1].id", "appears twice"),
        (lambda d: d.pop("categories"), "categories", "missing"),
        (lambda d: d["categories"].append({"id": 2, "name": "thing"}), "categories[1].name",
         "also the name of categories[0]"),
    ],
)  # fmt: skip
def test_malformed_coco_json_is_an_error_naming_file_and_field(tmp_path, change, where, problem):
    data = {
        "images": [_image(1, "a.png", 40, 60)],
        "annotations": [_ann(1, 1, [1, 1, 5, 5]), _ann(2, 1, [2, 2, 5, 5])],
        "categories": [{"id": 1, "name": "thing"}],
    }
    change(data)
    ann, img = str(tmp_path / "a.json"), tmp_path / "img"
    with open(ann, "w") as f:
        json.dump(data, f)  # NaN written as the NaN literal, which Python's json reads
    with pytest.raises(AnnotationError) as e:
        coco_json.read(ann, str(img))
    assert (e.value.path, e.value.where) == (ann, where) and problem in e.value.problem
    assert str(e.value).startswith(f"{ann}: {where}: ")


def test_invalid_json_syntax_names_the_line(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('{"images": [],\n "annotations": [,\n "categories": []}')
    with pytest.raises(AnnotationError, match=r"a\.json: line 2 column 18: invalid JSON"):
        coco_json.read(str(path), str(tmp_path))


def test_a_category_conflict_between_train_and_eval_json_is_an_error(tmp_path):
    ann, img = _one_image_dataset(tmp_path, [])
    other = _write_json(
        tmp_path / "b.json",
        {"images": [], "annotations": [], "categories": [{"id": 1, "name": "other"}]},
    )
    config = _coco_config(tmp_path, ann, img, eval_pair=(other, img))
    with pytest.raises(AnnotationError, match=r"b\.json: categories: id 1 is 'other' here but "):
        _prepare(config)


@pytest.mark.parametrize(
    "xml, where",
    [
        ("<annotation><object><name>a</name>\n<bndbox><xmin>1</xmin></bndbox>\n</annotation>",
         "line 3 column 2"),
        ("<annotation><object><name>a</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax>"
         "</bndbox></object></annotation>", "object[0] (a)/bndbox/ymax"),
        ("<annotation><object><name>a</name><bndbox><xmin>one</xmin><ymin>1</ymin><xmax>5</xmax>"
         "<ymax>5</ymax></bndbox></object></annotation>", "object[0] (a)/bndbox/xmin"),
        ("<annotation><object><bndbox/></object></annotation>", "object[0]/name"),
        ("<annotation><object><name>a</name><difficult>yes</difficult><bndbox/></object>"
         "</annotation>", "object[0] (a)/difficult"),
    ],
)  # fmt: skip
def test_malformed_voc_xml_is_an_error_naming_file_and_field(tmp_path, xml, where):
    root = tmp_path / "VOC"
    _voc_folder(root, {}, {"train": ["x"]})
    (root / "Annotations" / "x.xml").write_text(xml)
    config = _voc_config(tmp_path, root, "train", "train")
    with pytest.raises(AnnotationError) as e:
        _prepare(config)
    assert e.value.path == str(root / "Annotations" / "x.xml") and e.value.where == where


def test_voc_listing_an_image_without_xml_names_the_line(tmp_path):
    root = tmp_path / "VOC"
    _voc_folder(root, {"a": (32, 32, [])}, {"train": ["a", "b"]})
    with pytest.raises(AnnotationError, match=r"train\.txt: line 2: lists 'b', but .*b\.xml"):
        _prepare(_voc_config(tmp_path, root, "train", "train"))


def test_config_errors_name_the_field(tmp_path):
    ann, img = _one_image_dataset(tmp_path, [])
    c = _coco_config(tmp_path, ann, img)
    c.data.eval_split = "validation"
    with pytest.raises(ValueError, match=r"config.data.eval_split='validation'.*train\[90%:\]"):
        pipeline.dataset_info(c)
    c = _coco_config(tmp_path, str(tmp_path / "nope.json"), img)
    with pytest.raises(FileNotFoundError, match="config.data.train_annotations: no such file"):
        pipeline.dataset_info(c)
    c = get_config()
    c.data.train_annotations = ann
    with pytest.raises(ValueError, match="config.data.train_annotations is set .* coco_json"):
        pipeline.dataset_info(c)
    c = _voc_config(tmp_path, tmp_path, "train", "test")
    with pytest.raises(FileNotFoundError, match="config.data.voc_root=.* has no Annotations"):
        pipeline.dataset_info(c)


# --- preparation: keyed by the files, all or nothing ------------------------------------------


def test_editing_the_json_prepares_a_new_dataset(tmp_path):
    ann, img = _one_image_dataset(tmp_path, [_ann(1, 1, [1, 1, 5, 5])])
    config = _coco_config(tmp_path, ann, img)
    first, _ = _prepare(config)
    assert user_datasets.ensure_prepared(config.data).data_dir == first.data_dir  # reused
    _one_image_dataset(tmp_path, [_ann(1, 1, [1, 1, 5, 5]), _ann(2, 1, [2, 2, 9, 9])])
    second, report = _prepare(config)
    assert second.data_dir != first.data_dir and report["splits"]["train"]["boxes_kept"] == 2
    assert os.path.isdir(first.data_dir)  # the earlier dataset is left alone


def test_an_interrupted_preparation_leaves_nothing_prepared(tmp_path, monkeypatch):
    ann, img = _one_image_dataset(tmp_path, [_ann(1, 1, [1, 1, 5, 5])])
    for name in ("b.png", "c.png"):
        _save(str(img / name), _pixels(32, 32))
    data = json.loads(open(ann).read())
    data["images"] += [_image(2, "b.png", 32, 32), _image(3, "c.png", 32, 32)]
    _write_json(ann, data)
    config = _coco_config(tmp_path, ann, img)
    path = user_datasets.dataset_dir(config.data)
    check_image, calls = user_datasets.check_image, []

    def failing(*args):  # the third image "crashes" the preparation after two were written
        calls.append(args)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return check_image(*args)

    monkeypatch.setattr(user_datasets, "check_image", failing)
    with pytest.raises(KeyboardInterrupt):
        _prepare(config)
    assert len(calls) == 3 and not os.path.exists(path)
    assert os.listdir(os.path.dirname(path)) == []  # tfds removed its temporary folder
    # A killed run leaves tfds' temporary folder; the next preparation removes it.
    stale = os.path.join(os.path.dirname(path), "incomplete.ABCDEF_1.0.0")
    os.makedirs(stale)
    monkeypatch.setattr(user_datasets, "check_image", check_image)
    builder, report = _prepare(config)
    assert os.fspath(builder.data_dir) == path and report["splits"]["train"]["images_kept"] == 3
    assert os.listdir(os.path.dirname(path)) == ["1.0.0"]


# --- commands ---------------------------------------------------------------------------------


def _run(*args):
    env = {**os.environ, "PYTHONPATH": REPO}
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=120,
        env=env,
    )  # fmt: skip


def test_example_dataset_matches_rpn_shapes(tmp_path):
    out = tmp_path / "shapes_coco"
    example_dataset.write(str(out), num_train=2, num_val=12, image_hw=(96, 128))
    assert sorted(os.listdir(out)) == ["train", "train.json", "val", "val.json"]
    assert sorted(os.listdir(out / "val"))[:2] == ["000001.jpg", "000002.jpg"]
    val = json.loads((out / "val.json").read_text())
    # rpn_shapes/small's validation split, prepared by tfds, against the example read back.
    small = shapes.ensure_prepared("rpn_shapes/small", data_dir=str(tmp_path / "tfds"))
    reference = small.as_data_source("validation")
    by_id = {int(reference[i]["image/id"]): reference[i] for i in range(len(reference))}
    config = _coco_config(tmp_path, out / "train.json", out / "train",
                          eval_pair=(out / "val.json", out / "val"))  # fmt: skip
    builder, _ = _prepare(config)
    mine = builder.as_data_source("validation")
    assert len(mine) == len(val["images"]) == 12
    for i in range(12):
        ours, theirs = mine[i], by_id[int(mine[i]["image/id"]) - 1]
        np.testing.assert_array_equal(ours["image"], theirs["image"])
        np.testing.assert_array_equal(ours["objects"]["bbox"], theirs["objects"]["bbox"])
        np.testing.assert_array_equal(ours["objects"]["label"], theirs["objects"]["label"])
    a = val["annotations"][0]
    assert set(a) == {"id", "image_id", "category_id", "bbox", "area", "iscrowd"}
    assert a["area"] == a["bbox"][2] * a["bbox"][3]
    with pytest.raises(FileExistsError):
        example_dataset.write(str(out), num_train=1, num_val=1)


def test_prepare_command_prints_the_report_and_names_errors(tmp_path):
    ann, img = _one_image_dataset(tmp_path, [_ann(1, 1, [1, 1, 5, 5]), _ann(2, 1, [0, 0, 0, 5])])
    flags = ["--config.data.name=coco_json", f"--config.data.data_dir={tmp_path / 'tfds'}",
             f"--config.data.train_annotations={ann}", f"--config.data.train_images={img}",
             "--config.data.eval_split=train"]  # fmt: skip
    proc = _run("jax_rpn.data.prepare", *flags)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "images: 1 listed, 1 kept" in proc.stdout
    assert "dropped: 1 with zero or negative width or height, 0 outside" in proc.stdout
    data = json.loads(open(ann).read())
    data["annotations"][1]["category_id"] = 5
    _write_json(ann, data)
    bad = _run("jax_rpn.data.prepare", *flags)
    assert bad.returncode == 1
    assert f"error: {ann}: annotations[1].category_id: expected one of" in bad.stderr


def test_coverage_on_a_coco_json_dataset(tmp_path):
    out = tmp_path / "shapes_coco"
    example_dataset.write(str(out), num_train=3, num_val=0, image_hw=(64, 64))
    boxes = len(json.loads((out / "train.json").read_text())["annotations"])
    config = tiny.get_config()  # what `python -m jax_rpn.coverage --config configs/tiny.py
    config.data.name = "coco_json"  # --config.data.name=coco_json ...` runs
    config.data.data_dir = str(tmp_path / "tfds")
    config.data.train_annotations = str(out / "train.json")
    config.data.train_images = str(out / "train")
    config.data.eval_split = "train"
    config.data.max_boxes = 12
    result = coverage.run(config, suggest=False, count_positives=False, progress=False)
    assert result["setup"]["num_images"] == 3
    assert result["current"]["overall"]["boxes"] == boxes
