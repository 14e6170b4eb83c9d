"""Writes an example COCO-JSON dataset (rpn_shapes images as JPEG files), to show the format.

    python -m jax_rpn.data.example_dataset --out /tmp/shapes_coco --train 64 --val 16

writes `<out>/train/000001.jpg ...`, `<out>/val/000001.jpg ...`, `<out>/train.json` and
`<out>/val.json`. Train image `i` is example `i - 1` of rpn_shapes' train split, val image `i`
example `i - 1` of its validation split, byte for byte (same renderer, same JPEG encoding) at
the default 256x256: a model trained on rpn_shapes reaches the same recall on them. Train on
it with

    python train.py --config.data.name=coco_json \\
      --config.data.train_annotations=/tmp/shapes_coco/train.json \\
      --config.data.train_images=/tmp/shapes_coco/train \\
      --config.data.eval_annotations=/tmp/shapes_coco/val.json \\
      --config.data.eval_images=/tmp/shapes_coco/val

A COCO JSON needs `images` (id, file_name relative to the image folder, width, height),
`annotations` (image_id, category_id, bbox `[x, y, width, height]` in pixels, iscrowd; area and
id are conventional) and `categories` (id, name); see `jax_rpn.data.coco_json`.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import tempfile

import numpy as np
from tqdm.auto import tqdm

from jax_rpn.data import shapes

SPLITS = {"train": "train", "val": "validation"}  # folder / JSON name -> rpn_shapes split


def _write_image(split: str, index: int, folder: str, image_hw) -> tuple[list, list]:
    """Writes example `index` of rpn_shapes `split` as `<folder>/<index + 1>.jpg`.

    Returns its boxes as COCO `[x, y, width, height]` pixel lists and its class indices.
    """
    _, example = shapes.encoded_example(split, index, image_hw=image_hw)
    with open(os.path.join(folder, f"{index + 1:06d}.jpg"), "wb") as f:
        f.write(example["image"])
    h, w = image_hw
    # Normalized [ymin, xmin, ymax, xmax] of whole pixels -> integer pixel corners.
    y1, x1, y2, x2 = np.round(example["objects"]["bbox"] * [h, w, h, w]).astype(int).T
    boxes = np.stack([x1, y1, x2 - x1, y2 - y1], axis=1).tolist()
    return boxes, example["objects"]["label"].tolist()


def coco_dataset(split: str, count: int, folder: str, *, image_hw=(256, 256), workers=4) -> dict:
    """Writes `count` rpn_shapes images of `split` into `folder`; returns their COCO JSON dict."""
    h, w = (int(s) for s in image_hw)
    images, annotations = [], []
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        results = pool.map(lambda i: _write_image(split, i, folder, (h, w)), range(count))
        for index, (boxes, labels) in enumerate(
            tqdm(results, total=count, desc=f"{os.path.basename(folder)} images", unit="img")
        ):
            image_id = index + 1
            images.append(
                {"id": image_id, "file_name": f"{image_id:06d}.jpg", "width": w, "height": h}
            )
            for box, label in zip(boxes, labels, strict=True):
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": label + 1,
                        "bbox": box,
                        "area": box[2] * box[3],
                        "iscrowd": 0,
                    }
                )
    return {
        "info": {"description": f"rpn_shapes {split} examples 0..{count - 1} (jax_rpn)"},
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": k + 1, "name": name, "supercategory": "shape"}
            for k, name in enumerate(shapes.CLASS_NAMES)
        ],
    }


def write(out: str, *, num_train: int, num_val: int, image_hw=(256, 256), workers: int = 4):
    """Writes the example dataset into the new folder `out` (all or nothing: built beside it
    under a temporary name, then renamed)."""
    if num_train < 1 or num_val < 0:
        raise ValueError(f"num_train must be >= 1 and num_val >= 0, got {num_train}, {num_val}")
    out = os.path.abspath(out)
    if os.path.exists(out):
        raise FileExistsError(f"--out {out} exists; give a new folder")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", dir=parent)
    try:
        for name, count in (("train", num_train), ("val", num_val)):
            if not count:
                continue
            folder = os.path.join(tmp, name)
            os.makedirs(folder)
            data = coco_dataset(SPLITS[name], count, folder, image_hw=image_hw, workers=workers)
            with open(os.path.join(tmp, f"{name}.json"), "w") as f:
                json.dump(data, f)
        os.chmod(tmp, 0o755)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv):
    del argv
    from absl import flags

    f = flags.FLAGS
    write(f.out, num_train=f.train, num_val=f.val, image_hw=(f.height, f.width))
    print(f"Wrote {f.train} train and {f.val} val images with train.json / val.json to {f.out}")


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("out", None, "New folder to write the dataset into.", required=True)
    flags.DEFINE_integer("train", 64, "Number of train images (rpn_shapes train examples).")
    flags.DEFINE_integer("val", 16, "Number of val images (rpn_shapes validation examples).")
    flags.DEFINE_integer("height", 256, "Image height (rpn_shapes' default 256).")
    flags.DEFINE_integer("width", 256, "Image width (rpn_shapes' default 256).")
    app.run(main)
