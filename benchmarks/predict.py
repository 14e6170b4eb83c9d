"""`python -m jax_rpn.predict` speed: images/s on JPEG files, compile time apart.

    python benchmarks/predict.py                       # default config, random weights
    python benchmarks/predict.py --model workdirs/default --images 512

Writes ``--images`` 256x256 JPEG files of the shapes data (the default config's size) into a
temporary folder and runs the whole command on them (``predict.run``: read, decode, resize,
normalise, pad, model + proposals, boxes back to original pixels, COCO JSON and npz written),
``--repeats`` times in one process. Reported: the compile time (first run, per padded
shape), then the median images/s of the runs without compiling, and the parts of one batch:
host preprocessing of its images (one thread) and the compiled model + proposals call.

Weights: a model folder's (``--model``) or the default config's random initialisation. The
model's cost does not depend on the weights; NMS's does a little (how many boxes a kept box
suppresses), so quote figures from a trained model.
"""

import argparse
import os
import statistics
import sys
import tempfile

if not __package__:  # run as a file: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import ml_collections  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks import common  # noqa: E402
from configs import default  # noqa: E402
from jax_rpn import checkpoints, inference, predict  # noqa: E402
from jax_rpn.data import shapes  # noqa: E402
from jax_rpn.models import build_rpn, init_variables  # noqa: E402


def _model_folder(args, tmp) -> str:
    if args.model:
        return args.model
    config = default.get_config()
    variables = init_variables(build_rpn(config), jax.random.key(0), (1, *config.data.pad_to, 3))
    return checkpoints.save_variables(os.path.join(tmp, "model"), variables, config=config)


def _write_images(folder, n, hw) -> None:
    os.makedirs(folder)
    for i in range(n):
        image = shapes.render_example("validation", i % 300, image_hw=hw)["image"]
        Image.fromarray(image).save(os.path.join(folder, f"{i:05d}.jpg"), quality=92)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="workdir or variables folder (default: random weights)")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        model = _model_folder(args, tmp)
        images = os.path.join(tmp, "images")
        _write_images(images, args.images, (256, 256))
        runs = []
        for r in range(args.repeats + 1):
            _, report = predict.run(
                [images],
                model=model,
                output=os.path.join(tmp, f"out{r}"),
                batch_size=args.batch_size,
                progress=False,
            )
            runs.append(report)
        compile_s = runs[0].compile_s
        rates = [r.images_per_second for r in runs[1:]]

        # The parts of one batch.
        variables, config, _ = checkpoints.load_variables(model)
        plans = predict.plan_images(
            predict.find_images([images])[: args.batch_size], config, report=predict.Report()
        )
        host = common.time_fn(
            lambda: predict._load_batch(plans, args.batch_size, config), repeats=5
        )
        batch, image_hw, _ = predict._load_batch(plans, args.batch_size, config)
        fn = inference.predict_function(ml_collections.FrozenConfigDict(config))
        device_vars = jax.device_put(variables)
        model_time = common.time_fn(lambda: fn(device_vars, batch, image_hw), repeats=10)

    b, rate = args.batch_size, statistics.median(rates)
    print(f"# predict: {args.images} JPEG files, 256x256, batch {b}\n")
    print(common.machine())
    print("weights:", args.model or "random (configs/default.py)", "\n")
    rows = [
        ["compile (first run; one padded shape)", f"{sum(compile_s.values()):.1f} s", ""],
        [
            "end to end (median of runs, compiling excluded)",
            f"{rate:.1f} images/s",
            "runs: " + ", ".join(f"{r:.1f}" for r in rates),
        ],
        [
            "one batch, host: read, decode, resize, normalise, pad",
            f"{host['median'] * 1e3:.0f} ms",
            f"{b / host['median']:.0f} images/s on one thread",
        ],
        [
            "one batch, model + proposals (compiled)",
            f"{model_time['median'] * 1e3:.0f} ms",
            f"{b / model_time['median']:.0f} images/s",
        ],
    ]
    print(common.table(["", "time", "note"], rows))
    return {"images_per_second": statistics.median(rates), "compile_s": compile_s}


if __name__ == "__main__":
    main()
