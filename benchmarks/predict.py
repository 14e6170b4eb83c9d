"""`python -m jax_rpn.predict` speed: images/s on JPEG files, compile time apart.

    python benchmarks/predict.py                       # default config, random weights
    python benchmarks/predict.py --model workdirs/default --images 512

Writes ``--images`` 256x256 JPEG files of the shapes data (the default config's size) into a
temporary folder and runs the whole command on them (``predict.run``) ``--repeats`` + 1
times in one process. Reported, wall clock and process CPU time:

- compile: the first run's, per padded shape (later runs find the program compiled);
- predict loop: read, decode, resize, normalise, pad, model + proposals, boxes back to
  original pixels, per image: the images/s predict prints at the end (median of the runs
  after the first);
- whole command: the same plus loading the model, reading the headers and writing the COCO
  JSON and the npz file;
- the parts of one batch: host preprocessing of its images (one thread), the compiled model +
  proposals call, and the model's forward pass alone.

Weights: a model folder's (``--model``) or the default config's random initialisation. The
model's cost does not depend on the weights; NMS's does a little (how many boxes a kept box
suppresses), so quote figures from a trained model.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

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
        runs, cpu, whole = [], [], []
        for r in range(args.repeats + 1):
            start, start_cpu = time.perf_counter(), time.process_time()
            _, report = predict.run(
                [images],
                model=model,
                output=os.path.join(tmp, f"out{r}"),
                batch_size=args.batch_size,
                progress=False,
            )
            runs.append(report)
            cpu.append((time.process_time() - start_cpu) / report.processed)
            whole.append(report.processed / (time.perf_counter() - start))
        compile_s = sum(runs[0].compile_s.values())
        rates = [r.images_per_second for r in runs[1:]]
        whole_rate = statistics.median(whole[1:])  # later runs find the program compiled

        # The parts of one batch.
        variables, config, _ = checkpoints.load_variables(model)
        plans = predict.plan_images(
            predict.find_images([images])[: args.batch_size], config, report=predict.Report()
        )
        host = common.time_fn(lambda: predict.load_batch(plans, args.batch_size, config))
        batch, image_hw, _ = predict.load_batch(plans, args.batch_size, config)
        device_vars = jax.device_put(variables)
        fn = inference.predict_function(ml_collections.FrozenConfigDict(config))
        full = common.time_fn(lambda: fn(device_vars, batch, image_hw), repeats=10)
        rpn = build_rpn(config)
        forward = jax.jit(lambda v, x: rpn.apply(v, x, train=False))
        net = common.time_fn(lambda: forward(device_vars, batch), repeats=10)

    b, rate = args.batch_size, statistics.median(rates)
    print(f"# predict: {args.images} JPEG files, 256x256, batch {b}\n")
    print(common.machine())
    print(f"load average (1 min) at the end: {os.getloadavg()[0]:.1f}")
    print("weights:", args.model or "random (configs/default.py)", "\n")

    def batch_row(name, t):
        return [
            name,
            f"{t['median'] * 1e3:.0f} ms",
            f"{t['cpu_median'] * 1e3:.0f} ms",
            f"{b / t['median']:.0f}",
        ]

    rows = [
        ["compile (first run, per padded shape)", f"{compile_s:.1f} s", "", ""],
        [
            "predict loop, per image (read to proposals; what predict prints)",
            f"{1e3 / rate:.1f} ms",
            "",
            f"{rate:.1f}",
        ],
        [
            "whole command, per image (+ load model, read headers, write JSON and npz)",
            f"{1e3 / whole_rate:.1f} ms",
            f"{statistics.median(cpu[1:]) * 1e3:.1f} ms",
            f"{whole_rate:.1f}",
        ],
        batch_row("one batch, host: read, decode, resize, normalise, pad (1 thread)", host),
        batch_row("one batch, model + proposals (compiled)", full),
        batch_row("one batch, model forward only (compiled)", net),
    ]
    print(common.table(["", "wall", "CPU", "images/s"], rows))
    print("\npredict loop, each run (images/s): " + ", ".join(f"{r:.1f}" for r in rates))
    print("whole command, each run (images/s): " + ", ".join(f"{r:.1f}" for r in whole[1:]))
    return {
        "images_per_second": rate,
        "whole_images_per_second": whole_rate,
        "compile_s": compile_s,
    }


if __name__ == "__main__":
    main()
