"""Preparation speed of a user's COCO-JSON dataset vs the raw read speed of the same files.

    python benchmarks/prepare_user_data.py [--images 1000] [--height 256 --width 256]
        [--repeats 3] [--workdir DIR]

Writes `--images` example images (rpn_shapes JPEGs, `jax_rpn.data.example_dataset`)
once, then, `--repeats` times, taking turns, with the files evicted from the page cache before
each (`posix_fadvise(DONTNEED)`: cold reads from disk) and again with a warm cache:

- **read**: read every file's bytes (the same thread pool as the preparation);
- **read + decode**: the same, plus a full PIL decode of each image (what the preparation's
  check costs);
- **prepare**: `user_datasets.ensure_prepared` into a fresh data_dir: read the JSON, check every
  image in threads, write the tfds array_record dataset and the report.

Prints medians in images/s and the ratio prepare / read.
"""

import argparse
import concurrent.futures
import io
import os
import shutil
import statistics
import sys
import tempfile
import time

from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs.default import get_config  # noqa: E402
from jax_rpn.data import example_dataset, user_datasets  # noqa: E402


def _evict(paths):
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def _read_decode(path):
    with Image.open(io.BytesIO(_read(path))) as image:
        image.load()


def _pool_map(fn, paths, workers):
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for _ in pool.map(fn, paths):
            pass


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", default=None, help="default: a temporary folder")
    args = parser.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="prepare_bench_")
    data = os.path.join(work, f"shapes_coco_{args.images}_{args.height}x{args.width}")
    if not os.path.isdir(data):
        image_hw = (args.height, args.width)
        example_dataset.write(data, num_train=args.images, num_val=0, image_hw=image_hw)
    folder = os.path.join(data, "train")
    paths = sorted(os.path.join(folder, n) for n in os.listdir(folder))
    megabytes = sum(os.path.getsize(p) for p in paths) / 1e6
    workers = max(4, 2 * (os.cpu_count() or 1))  # ensure_prepared's default
    config = get_config()
    config.data.name = "coco_json"
    config.data.train_annotations = os.path.join(data, "train.json")
    config.data.train_images = folder
    config.data.eval_split = "train"

    def prepare():
        config.data.data_dir = tempfile.mkdtemp(dir=work)
        user_datasets.ensure_prepared(config.data, progress=False, print_report=False)
        shutil.rmtree(config.data.data_dir)

    methods = {
        "read": lambda: _pool_map(_read, paths, workers),
        "read + decode": lambda: _pool_map(_read_decode, paths, workers),
        "prepare": prepare,
    }
    times = {(m, c): [] for m in methods for c in ("cold", "warm")}
    prepare()  # warm-up: imports, TensorFlow
    for _ in range(args.repeats):
        for name, fn in methods.items():
            for cache in ("cold", "warm"):
                if cache == "cold":
                    _evict(paths + [config.data.train_annotations])
                else:
                    _pool_map(_read, paths, workers)
                start = time.perf_counter()
                fn()
                times[name, cache].append(time.perf_counter() - start)
    n = len(paths)
    print(
        f"{n} JPEG files, {megabytes:.1f} MB, {args.width}x{args.height}; {workers} threads; "
        f"{os.cpu_count()} cores; medians of {args.repeats}\n"
    )
    print("| page cache | read img/s | read + decode img/s | prepare img/s | read / prepare |")
    print("|---|---|---|---|---|")
    for cache in ("cold", "warm"):
        rate = {m: n / statistics.median(times[m, cache]) for m in methods}
        print(
            f"| {cache} | {rate['read']:.0f} | {rate['read + decode']:.0f} | "
            f"{rate['prepare']:.0f} | {rate['read'] / rate['prepare']:.1f}x |"
        )
    if args.workdir is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
