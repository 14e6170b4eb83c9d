"""Convert a checkpoint once into a jax_rpn variables folder (read later without torch).

  python -m jax_rpn.interop --from torchvision --checkpoint fasterrcnn_resnet50_fpn.pth \\
      --config configs/torchvision_fasterrcnn_r50_fpn.py --out weights/tv_r50_fpn
  python -m jax_rpn.interop --checkpoint R-50.pkl --config configs/coco_r50_fpn.py \\
      --out weights/msra_r50          # --from auto: the format is detected from the keys

The folder (``config.json``, ``variables/`` orbax, ``report.json``) is written atomically:
it appears complete or not at all. Train from it with
``python train.py --config <same config> --config.init.checkpoint=<folder>``.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_FORMAT = flags.DEFINE_enum(
    "from",
    "auto",
    ["auto", "torchvision", "detectron2", "mmdet"],
    "Checkpoint format; auto detects it from the keys.",
)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "The .pth / .pkl file to convert.")
_CONFIG = config_flags.DEFINE_config_file("config", None, "Config whose model gets the weights.")
_OUT = flags.DEFINE_string("out", None, "Output folder (must not exist, unless --overwrite).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing output folder.")
flags.mark_flags_as_required(["checkpoint", "config", "out"])


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes
    from jax_rpn.interop import convert

    try:
        out, report, (read, write) = convert(
            _CHECKPOINT.value,
            _CONFIG.value,
            _OUT.value,
            format=_FORMAT.value,
            overwrite=_OVERWRITE.value,
        )
    except (ValueError, FileNotFoundError, FileExistsError) as e:  # CheckpointError included
        sys.exit(f"error: {e}")
    print(report.summary())
    print(
        f"Wrote {out} in {read + write:.1f} s (read and convert {read:.1f} s, write {write:.1f} s)"
    )


if __name__ == "__main__":
    app.run(main)
