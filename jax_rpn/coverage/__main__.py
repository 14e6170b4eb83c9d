"""``python -m jax_rpn.coverage``: the anchor coverage report of a config's data, or with
``--model`` the proposal coverage of a trained model.

    python -m jax_rpn.coverage --config configs/default.py [--split validation] [--out DIR]
        [--max_images N] [--sizes_per_level S] [--num_ratios R] [--nosuggest] [--nomatch]
        [--json]
    python -m jax_rpn.coverage --model workdirs/default [--top_k 100] [--split ...] [--out DIR]

The anchor report writes ``report.txt`` (the printed report), ``coverage.json`` and PNGs to
``--out`` (default ``workdirs/<config name>/coverage``); the proposal report writes
``proposal_report.txt`` and ``proposal_coverage.json`` (default ``<model>/coverage``).
``--config.<field>=...`` overrides the config; with ``--model`` the config stored with the
model is used unless ``--config`` is given.
"""

import json
import os

from absl import flags, logging
from ml_collections import config_flags

from jax_rpn import cli
from jax_rpn.coverage.report import format_report, run

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(_REPO, "configs", "default.py"), "Config file (get_config())."
)
flags.DEFINE_string("split", None, "Dataset split; default config.data.eval_split.")
flags.DEFINE_string("out", None, "Output folder; default workdirs/<config name>/coverage.")
flags.DEFINE_integer("max_images", None, "Only the first N images; default the whole split.")
flags.DEFINE_integer("worst", 10, "How many worst-covered boxes to list.")
flags.DEFINE_bool("suggest", True, "Suggest anchors (k-means) and report their coverage.")
flags.DEFINE_integer(
    "sizes_per_level", None, "Suggest this many sizes per level (changes A); default keep."
)
flags.DEFINE_integer(
    "num_ratios", None, "Suggest this many aspect ratios (changes A); default keep."
)
flags.DEFINE_bool(
    "match", True, "Also count each box's positive anchors with the matcher (4x slower)."
)
flags.DEFINE_string(
    "model",
    None,
    "A training workdir or converted variables folder: report its proposals' "
    "coverage instead of the anchors'.",
)
flags.DEFINE_integer("top_k", 100, "With --model: proposals per image that count.")
flags.DEFINE_bool("json", False, "Print the result as JSON instead of the text report.")
FLAGS = flags.FLAGS


def _proposal_report():
    from jax_rpn import checkpoints
    from jax_rpn.coverage.proposals import format_proposal_report, run_proposals

    variables, stored, _ = checkpoints.load_variables(FLAGS.model)
    config = checkpoints.config_of_run(stored, FLAGS["config"])
    out_dir = FLAGS.out or os.path.join(FLAGS.model, "coverage")
    result = run_proposals(
        config,
        variables,
        model=FLAGS.model,
        top_k=FLAGS.top_k,
        split=FLAGS.split,
        out_dir=out_dir,
        max_images=FLAGS.max_images,
        worst=FLAGS.worst,
    )
    if FLAGS.json:
        print(json.dumps(result, indent=1, allow_nan=False))
    else:
        print(format_proposal_report(result))
        print(f"\nWritten to {out_dir}: proposal_coverage.json, proposal_report.txt")


def main(argv):
    del argv
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.ERROR)
    if FLAGS.model is not None:
        return _proposal_report()
    config_file = config_flags.get_config_filename(FLAGS["config"])
    name = os.path.splitext(os.path.basename(config_file))[0]
    out_dir = FLAGS.out or os.path.join("workdirs", name, "coverage")
    result = run(
        _CONFIG.value,
        split=FLAGS.split,
        out_dir=out_dir,
        max_images=FLAGS.max_images,
        suggest=FLAGS.suggest,
        sizes_per_level=FLAGS.sizes_per_level,
        num_ratios=FLAGS.num_ratios,
        worst=FLAGS.worst,
        count_positives=FLAGS.match,
    )
    if FLAGS.json:
        print(json.dumps(result, indent=1, allow_nan=False))
    else:
        print(format_report(result))
        pictures = ", ".join(os.path.basename(p) for p in result["pictures"])
        print(f"\nWritten to {out_dir}: coverage.json, report.txt, {pictures}")


if __name__ == "__main__":
    cli.run(main, name="jax_rpn.coverage")
