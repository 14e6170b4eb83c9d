"""Prepare the dataset of a config once and print its preparation report.

    python -m jax_rpn.data.prepare --config configs/default.py --config.data.name=coco_json \\
        --config.data.train_annotations=train.json --config.data.train_images=train/ \\
        --config.data.eval_annotations=val.json --config.data.eval_images=val/
    python -m jax_rpn.data.prepare --config.data.name=voc_folder \\
        --config.data.voc_root=VOCdevkit/VOC2007 --config.data.train_split=trainval \\
        --config.data.eval_split=test

Users' datasets (coco_json, voc_folder; `jax_rpn.data.user_datasets`) print their report:
images and boxes kept, dropped or repaired and why. It is stored with the data, so a second run
prints it again without preparing. Malformed annotations stop it with a message naming the
file and the field (exit status 1). rpn_shapes is prepared as on first use; tfds' voc and coco
need `tfds build` (see `jax_rpn.data.pipeline`).
"""

import json
import os
import sys

from jax_rpn.data import shapes, user_datasets


def main(argv):
    del argv
    from absl import flags, logging

    f = flags.FLAGS
    if not f["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    d = f.config.data
    if d.name.split("/")[0] == "rpn_shapes":
        builder = shapes.ensure_prepared(d.name, data_dir=d.data_dir)
        print(f"{d.name} is prepared in {builder.data_dir}")
        return
    if d.name not in user_datasets.IGNORE_FEATURE:
        sys.exit(
            f"error: prepare tfds' {d.name} with `tfds build {d.name} --file_format=array_record`"
            " (see jax_rpn/data/pipeline.py)"
        )
    try:
        builder = user_datasets.ensure_prepared(d, print_report=False)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    report = user_datasets.read_report(os.fspath(builder.data_dir))
    print(json.dumps(report, indent=1) if f.json else user_datasets.format_report(report))


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    default = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "default.py")
    config_flags.DEFINE_config_file("config", os.path.normpath(default), "Config file.")
    flags.DEFINE_bool("json", False, "Print the report as JSON.")
    app.run(main)
