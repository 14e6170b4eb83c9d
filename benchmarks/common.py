"""Shared helpers of the benchmark scripts: timing, peak memory, machine description, tables.

Timings are medians of repeated calls after warm-up calls (other processes may share the
cores, so the median is the figure to quote). Peak memory is the process's peak resident set
size (``VmHWM``), reset before each measured block where the kernel allows it
(``/proc/self/clear_refs``), otherwise the peak since the process started.
"""

import ast
import importlib
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import jax
import numpy as np

# COCO-FPN scale used by the targets and proposals benchmarks: an 800x1344 padded input,
# detectron2's R50-FPN anchors (one size per level, three ratios), ~270k anchors per image.
COCO_PAD_HW = (800, 1344)
COCO_IMAGE_HW = (800, 1333)  # true image size inside the padding (shorter side 800)
COCO_FEATURE_HWS = ((200, 336), (100, 168), (50, 84), (25, 42), (13, 21))
COCO_STRIDES = (4, 8, 16, 32, 64)
COCO_SIZES = ((32,), (64,), (128,), (256,), (512,))
COCO_RATIOS = (0.5, 1.0, 2.0)


def coco_fpn_anchors() -> list[np.ndarray]:
    """Per-level xyxy anchors ``[Nl, 4]`` of the COCO-FPN benchmark scale (N = 268,569)."""
    from jax_rpn import anchors

    return anchors.multilevel_anchors(COCO_FEATURE_HWS, COCO_STRIDES, COCO_SIZES, COCO_RATIOS)


def random_gt_boxes(rng: np.random.Generator, batch: int, num: int, image_hw) -> np.ndarray:
    """``[batch, num, 4]`` float32 xyxy boxes inside ``image_hw``: COCO-like sizes (side
    log-uniform in [12, 600] px, aspect ratio log-uniform in [1/3, 3]), centres uniform."""
    h, w = image_hw
    side = np.exp(rng.uniform(np.log(12.0), np.log(600.0), (batch, num)))
    ratio = np.exp(rng.uniform(np.log(1 / 3), np.log(3.0), (batch, num)))
    bw, bh = side / np.sqrt(ratio), side * np.sqrt(ratio)
    cx, cy = rng.uniform(0, w, (batch, num)), rng.uniform(0, h, (batch, num))
    boxes = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], axis=-1)
    boxes = np.clip(boxes, 0.0, [w, h, w, h])
    # Clipping can flatten a box at a border: keep every side at least 2 px.
    boxes[..., 2:] = np.maximum(boxes[..., 2:], boxes[..., :2] + 2.0)
    return boxes.astype(np.float32)


def load_config(module: str, overrides: dict | None = None, settings: tuple[str, ...] = ()):
    """``module.get_config()`` with ``overrides`` (``{"data.pad_to": (512, 512)}``) and then
    ``settings`` ("field.path=value" strings, the value parsed as a Python literal, e.g.
    ``model.head_dim=16``) applied."""
    config = importlib.import_module(module).get_config()
    changes = list((overrides or {}).items())
    for setting in settings:
        path, sep, value = setting.partition("=")
        if not sep:
            raise ValueError(f"--set expects field.path=value, got {setting!r}")
        changes.append((path, ast.literal_eval(value)))
    for path, value in changes:
        *parents, field = path.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[field] = value
    return config


def random_batch(config, seed: int = 0) -> dict:
    """A batch with the input pipeline's structure: images ``[B, H, W, 3]``, xyxy ``boxes
    [B, G, 4]`` (8 valid per image, the rest padding), ``valid``/``ignore`` ``[B, G]``,
    ``image_hw [B, 2]``, ``example_valid [B]``, ``num_dropped [B]``, ``index [B]``."""
    rng = np.random.default_rng(seed)
    b, (h, w), g = config.batch_size, config.data.pad_to, config.data.max_boxes
    valid = np.zeros((b, g), bool)
    valid[:, : min(g, 8)] = True
    return {
        "image": rng.normal(0.0, 1.0, (b, h, w, 3)).astype(np.float32),
        "boxes": random_gt_boxes(rng, b, g, (h, w)) * valid[..., None],
        "valid": valid,
        "ignore": np.zeros((b, g), bool),
        "image_hw": np.tile(np.array([h, w], np.int32), (b, 1)),
        "num_dropped": np.zeros((b,), np.int32),
        "example_valid": np.ones((b,), bool),
        "index": np.arange(b, dtype=np.int32),
    }


def set_compilation_cache(cache_dir: str) -> None:
    """Cache every compiled JAX program in ``cache_dir`` (however quick its compile)."""
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def block(tree):
    """Wait for every JAX array in ``tree`` (other leaves pass through), and for queued CUDA
    work of PyTorch if it uses a GPU; returns ``tree``."""
    out = jax.block_until_ready(tree)
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return out


class Timer:
    """``with Timer() as t: ...`` -> ``t.seconds``, the block's wall-clock time."""

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
        return False


def _stats(wall: list[float], cpu: list[float]) -> dict:
    return {
        "median": statistics.median(wall),
        "min": min(wall),
        "times": wall,
        "cpu_median": statistics.median(cpu),
    }


def time_fn(
    fn: Callable[[], object], *, repeats: int = 5, warmup: int = 1, budget_s: float | None = None
) -> dict:
    """Run ``fn()`` ``warmup`` times, then time up to ``repeats`` calls (JAX outputs are waited
    for); with ``budget_s``, stop repeating once the timed calls used that many seconds (at
    least one timed call).

    Returns ``{"median": s, "min": s, "times": [s, ...], "cpu_median": s}``: wall-clock
    seconds, and the median process CPU time (all threads) per call.
    """
    for _ in range(warmup):
        block(fn())
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        block(fn())
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
        if budget_s is not None and sum(wall) >= budget_s:
            break
    return _stats(wall, cpu)


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    *,
    repeats: int = 5,
    warmup: int = 1,
    back_to_back: bool = False,
) -> dict[str, dict]:
    """Like :func:`time_fn` for several functions, calling them in turn each round, so a
    change in the machine's load affects all of them alike; round ``r`` starts with the
    ``r``-th function (the order rotates), so no function always follows the same one.
    Returns ``{name: stats}``.

    ``back_to_back``: in each round call each function once untimed right before its timed
    call, so every timed call follows a call of the same function, as in a training loop.
    Whichever JAX step ran first after PyTorch's steps was 5-25% slower than the same step
    after another JAX step (``e2e_train.py``, default size), whichever of ours came first."""
    for _ in range(warmup):
        for fn in fns.values():
            block(fn())
    wall = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fn = fns[name]
            if back_to_back:
                block(fn())
            start, start_cpu = time.perf_counter(), time.process_time()
            block(fn())
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return {name: _stats(wall[name], cpu[name]) for name in fns}


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_memory() -> bool:
    """Reset the peak RSS to the current RSS (Linux ``clear_refs``); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory_mib() -> float:
    """Peak resident set size of this process in MiB (since the last reset, where supported)."""
    kib = _status_kib("VmHWM")
    if kib is None:
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / 1024.0


def current_memory_mib() -> float:
    """Current resident set size of this process in MiB."""
    kib = _status_kib("VmRSS")
    return float("nan") if kib is None else kib / 1024.0


def measure_peak(fn: Callable[[], object]) -> tuple[object, float]:
    """Run ``fn()`` once -> ``(result, MiB)``: the peak RSS during the call above the RSS
    before it, i.e. the most extra memory the call held at once. Where the peak cannot be
    reset this is an upper bound (the process's peak so far)."""
    base = current_memory_mib()
    reset_peak_memory()
    out = block(fn())
    return out, max(peak_memory_mib() - base, 0.0)


def machine() -> str:
    """CPU model, core count, JAX version and platform: one line for the results tables."""
    model = platform.processor() or platform.machine()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in lscpu.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    devices = jax.devices()
    return (
        f"{model}, {os.cpu_count()} cores, jax {jax.__version__} on "
        f"{devices[0].platform} ({len(devices)} device{'s' * (len(devices) > 1)})"
    )


def add_malloc_flag(parser) -> None:
    """``--glibc-malloc``: keep glibc's malloc as it is instead of running again with huge
    pages (:func:`jax_rpn.host_memory.reexec_with_huge_pages`, as ``train.py`` runs; both
    sides of a comparison share the process and so the setting)."""
    parser.add_argument(
        "--glibc-malloc",
        action="store_true",
        help="leave glibc's malloc settings as they are (train.py asks for huge pages)",
    )


def set_malloc(args) -> str:
    """Apply ``--glibc-malloc``'s choice, first thing in ``main``; a line for the results.
    With ``--glibc-malloc`` the script's subprocesses (compile, memory) keep glibc's default
    too: they inherit ``glibc.malloc.hugetlb=0``."""
    from jax_rpn import host_memory

    if args.glibc_malloc:
        host_memory.keep_default_pages()
    else:
        host_memory.reexec_with_huge_pages()
    return f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}"


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, e.g. ``"load 0.52 / 1.40 / 0.80"``: how busy the
    (possibly shared) machine was; quote it next to each figure."""
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "load unknown"
    return f"load {one:.2f} / {five:.2f} / {fifteen:.2f}"


def table(headers: list[str], rows: list[list]) -> str:
    """A GitHub markdown table; floats are printed with 3 significant digits."""

    def cell(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
