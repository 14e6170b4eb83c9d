"""Run a trained RPN on image files: proposals as COCO results JSON, an npz file, overlays.

    python -m jax_rpn.predict --model workdirs/default --output out/ photos/ 'more/*.jpg'
    python -m jax_rpn.predict --model converted/r50_fpn --output out/ --overlays 20 img.png
    python -m jax_rpn.predict --model workdirs/x --config configs/default.py \\
        --config.proposals.post_nms_topk_test=300 --output out/ photos/

``--model`` is a training workdir (its latest checkpoint) or a converted variables folder
(``jax_rpn.checkpoints.load_variables``); the config stored there is used unless ``--config``
gives one. Inputs are image files, folders (searched recursively for the file types Pillow
opens) and globs. Each image goes through the input pipeline's own steps (``augment.resized_hw``
and ``resize``, ``normalize`` with the config's pixel settings, ``pad_image``), so the model
sees what it saw in training. Each image goes to the padded shape training would give it
(``config.data.pad_to``, and its transpose with ``config.data.aspect_buckets``: see
:mod:`jax_rpn.data.buckets`); batches hold one padded shape, so there is one compile per
padded shape, not per image.

Writes into ``--output``: ``proposals.json`` (COCO results: ``image_id``, ``file_name``,
``bbox`` xywh in original-image pixels, ``score`` = objectness probability, see
:mod:`jax_rpn.proposal_files`), ``proposals.npz`` (the same proposals, compact, for a second
stage), ``report.json`` (what was skipped or repaired, timings) and, with ``--overlays K``,
``overlays/<image_id>_<name>.png`` with the top K proposals drawn.

Image ids are positions in the sorted input list, or with ``--annotations ann.json`` the ids
of the COCO images whose ``file_name`` has the same base name.

Unusual inputs: grayscale, palette, alpha, CMYK and 16-bit images are converted to 8-bit RGB
(alpha dropped, 16 bits scaled to 8) and counted; EXIF orientation is applied (as detectron2
does) and counted; boxes are in the pixels of the image as it is displayed. Files Pillow
cannot read, float images, and images that, resized as the config says, would be smaller than
the smallest anchor, are skipped and named. Images smaller than the smallest anchor before
resizing are enlarged by the resize like any other and counted.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import glob
import json
import os
import time
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps

from jax_rpn import files, proposal_files
from jax_rpn.data import augment, buckets
from jax_rpn.settings import AnchorSettings, PixelSettings

_EXIF_ORIENTATION = 0x0112  # EXIF tag; values 5-8 swap width and height


def image_extensions() -> frozenset[str]:
    """File extensions (lower case, with the dot) of the formats Pillow can open."""
    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def find_images(inputs: Sequence[str]) -> list[str]:
    """Image paths from ``inputs``: files (any extension), folders (recursively, files with an
    extension Pillow opens) and glob patterns (``**`` recurses). Folders and globs are sorted;
    duplicates are dropped. Raises FileNotFoundError naming an input that matches nothing."""
    extensions = image_extensions()
    paths = []
    for item in inputs:
        if os.path.isfile(item):
            found = [item]
        elif os.path.isdir(item):
            found = sorted(
                os.path.join(root, name)
                for root, _, names in os.walk(item)
                for name in names
                if os.path.splitext(name)[1].lower() in extensions
            )
            if not found:
                raise FileNotFoundError(f"folder {item} holds no image files")
        else:
            found = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
            if not found:
                raise FileNotFoundError(f"{item} is not a file or folder and no file matches it")
        paths.extend(found)
    return list(dict.fromkeys(os.path.normpath(p) for p in paths))


class SkipImage(Exception):
    """An image that cannot be used; the message says why."""


def _open(path: str) -> Image.Image:
    try:
        return Image.open(path)
    except Image.DecompressionBombError as e:
        raise SkipImage(f"too large for Pillow's decompression-bomb limit ({e})") from None
    except (Image.UnidentifiedImageError, OSError) as e:
        raise SkipImage(f"not an image Pillow can read ({type(e).__name__}: {e})") from None


def image_header(path: str) -> tuple[tuple[int, int], list[str]]:
    """``((height, width), notes)`` of an image as displayed (EXIF orientation applied), read
    from its header; ``notes`` name the repairs loading it will make. Raises SkipImage."""
    with _open(path) as image:
        w, h = image.size
        try:
            orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
        except (OSError, ValueError, SyntaxError) as e:  # Pillow's errors for bad metadata
            raise SkipImage(f"unreadable metadata ({e})") from None
        notes = _mode_notes(image.mode)
    if orientation in (5, 6, 7, 8):
        h, w = w, h
    if orientation not in (None, 1):
        notes.append("EXIF orientation applied")
    if h < 1 or w < 1:
        raise SkipImage(f"has no pixels ({h}x{w})")
    return (h, w), notes


def _mode_notes(mode: str) -> list[str]:
    if mode == "RGB":
        return []
    if mode == "F":
        raise SkipImage("32-bit float image: its value range is unknown; convert it to 8-bit")
    if mode.startswith("I"):
        return [f"{mode} scaled from 16 bits to 8-bit RGB"]
    return [f"{mode} converted to RGB"]


def load_rgb(path: str) -> np.ndarray:
    """uint8 RGB ``[h, w, 3]`` of an image file, as displayed (EXIF orientation applied).

    Grayscale, palette, alpha and CMYK images are converted by Pillow (alpha dropped); 16-bit
    and 32-bit integer images are taken as 0-65535 and scaled to 0-255. Raises SkipImage.
    """
    with _open(path) as image:
        try:
            image = ImageOps.exif_transpose(image)
            if image.mode.startswith("I"):  # I;16, I;16B, I: 16-bit data
                values = np.asarray(image, np.float64)
                gray = np.clip(values * (255.0 / 65535.0) + 0.5, 0, 255).astype(np.uint8)
                return np.repeat(gray[..., None], 3, axis=-1)
            _mode_notes(image.mode)  # float images: SkipImage
            return np.asarray(image.convert("RGB"), np.uint8)
        except (OSError, ValueError, SyntaxError) as e:  # truncated or corrupt data
            raise SkipImage(f"cannot be decoded ({e})") from None


@dataclasses.dataclass(frozen=True)
class ImagePlan:
    """One image to run: where it is, its id, its size before and after resizing, its bucket."""

    path: str
    image_id: int
    file_name: str
    original_hw: tuple[int, int]
    resized_hw: tuple[int, int]
    pad_hw: tuple[int, int]


@dataclasses.dataclass
class Report:
    """What a run did: images processed, skipped (path -> reason), repaired (note -> paths),
    and timings (``compile_s`` per padded shape, ``run_s`` for everything after compiling)."""

    num_inputs: int = 0
    processed: int = 0
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    repaired: dict[str, list[str]] = dataclasses.field(
        default_factory=lambda: collections.defaultdict(list)
    )
    compile_s: dict[str, float] = dataclasses.field(default_factory=dict)
    run_s: float = 0.0

    @property
    def images_per_second(self) -> float:
        """Processed images per second of running (compiling excluded)."""
        return self.processed / self.run_s if self.run_s > 0 else float("nan")

    def to_dict(self) -> dict:
        return {
            "num_inputs": self.num_inputs,
            "processed": self.processed,
            "skipped": dict(self.skipped),
            "repaired": {k: list(v) for k, v in self.repaired.items()},
            "compile_s": dict(self.compile_s),
            "run_s": self.run_s,
            "images_per_second": self.images_per_second,
        }

    def summary(self) -> str:
        lines = [
            f"{self.processed} of {self.num_inputs} images: {self.run_s:.2f} s, "
            f"{self.images_per_second:.1f} images/s (compiling excluded: "
            + ", ".join(f"{k} {v:.1f} s" for k, v in self.compile_s.items())
            + ")"
        ]
        for note, paths in self.repaired.items():
            lines.append(f"repaired ({len(paths)} of them): {note}, e.g. {paths[0]}")
        for path, reason in self.skipped.items():
            lines.append(f"skipped: {path}: {reason}")
        return "\n".join(lines)


def smallest_anchor(config) -> float:
    """The smallest anchor size (square root of its area, pixels) of ``config.anchors``."""
    return min(min(level) for level in AnchorSettings.from_config(config).sizes)


def padded_shapes(config) -> tuple[tuple[int, int], ...]:
    """The padded shapes ``(H, W)`` images are batched in: training's (``config.data.pad_to``,
    and its transpose with ``config.data.aspect_buckets``)."""
    d = config.data
    return buckets.padded_shapes(d.pad_to, aspect_buckets=d.aspect_buckets)


def plan_images(
    paths: Sequence[str],
    config,
    *,
    image_ids: dict[str, int] | None = None,
    report: Report,
) -> list[ImagePlan]:
    """Read the headers of ``paths`` and plan each image: id, sizes, padded shape (the bucket
    training would put it in, ``jax_rpn.data.buckets.bucket_of``).

    ``image_ids`` maps a base file name to an id (from ``--annotations``); without it the id is
    the position in ``paths``. Unusable images are recorded in ``report.skipped``, expected
    repairs in ``report.repaired``.
    """
    d = config.data
    shapes = padded_shapes(config)
    smallest = smallest_anchor(config)
    plans, first = [], {}  # first: image id -> the path that took it
    report.num_inputs += len(paths)
    for position, path in enumerate(paths):
        name = os.path.basename(path)
        try:
            if image_ids is None:
                image_id = position
            elif name in image_ids:
                image_id = image_ids[name]
            else:
                raise SkipImage("its file name is not among the --annotations images")
            if image_id in first:
                raise SkipImage(f"{first[image_id]} has the same file name, so the same image id")
            original, notes = image_header(path)
            pad = shapes[
                buckets.bucket_of(original, shapes, short_side=d.short_side, max_size=d.max_size)
            ]
            resized = augment.resized_hw(
                original, short_side=d.short_side, max_size=d.max_size, pad_hw=pad
            )
            if min(resized) < smallest:
                raise SkipImage(
                    f"resized as the config says ({original[0]}x{original[1]} -> "
                    f"{resized[0]}x{resized[1]}) it is smaller than the smallest anchor "
                    f"({smallest:g} px)"
                )
            if min(original) < smallest:
                notes.append(f"smaller than the smallest anchor ({smallest:g} px), enlarged")
        except SkipImage as e:
            report.skipped[path] = str(e)
            continue
        for note in notes:
            report.repaired[note].append(path)
        first[image_id] = path
        plans.append(ImagePlan(path, image_id, name, original, resized, pad))
    return plans


def preprocess(rgb: np.ndarray, plan: ImagePlan, config) -> np.ndarray:
    """uint8 RGB ``[h, w, 3]`` -> the model input float32 ``[H, W, 3]`` (``H, W = plan.pad_hw``),
    by the input pipeline's own steps without the flip: resize, normalize, pad."""
    d = config.data
    no_boxes = np.zeros((0, 4), np.float32)
    image, _ = augment.resize(
        rgb, no_boxes, short_side=d.short_side, max_size=d.max_size, pad_hw=plan.pad_hw
    )
    if image.shape[:2] != plan.resized_hw:
        raise ValueError(f"{plan.path}: resized to {image.shape[:2]}, planned {plan.resized_hw}")
    return augment.pad_image(
        augment.normalize(image, PixelSettings.from_config(config)), plan.pad_hw
    )


def load_batch(plans: Sequence[ImagePlan], batch_size: int, config):
    """Model inputs of ``plans`` (one padded shape): images float32 ``[batch_size, H, W, 3]``,
    true sizes int32 ``[batch_size, 2]`` (unused rows: zeros, the padded size), and
    ``{path: reason}`` of the images that failed to decode."""
    pad_hw = plans[0].pad_hw
    images = np.zeros((batch_size, *pad_hw, 3), np.float32)  # [B, H, W, 3]
    image_hw = np.tile(np.asarray(pad_hw, np.int32), (batch_size, 1))  # [B, 2]
    failed = {}
    for i, plan in enumerate(plans):
        try:
            rgb = load_rgb(plan.path)
            if rgb.shape[:2] != plan.original_hw:  # e.g. the file changed since its header
                raise SkipImage(f"decoded size {rgb.shape[:2]} != header size {plan.original_hw}")
        except SkipImage as e:
            failed[plan.path] = str(e)
            continue
        images[i] = preprocess(rgb, plan, config)
        image_hw[i] = plan.resized_hw
    return images, image_hw, failed


def check_variables(config, variables: dict, pad_hw) -> None:
    """Raise ValueError if ``variables`` do not fit the model ``config`` builds, naming the
    first differing entries (e.g. a checkpoint run with another config's ``model.width``)."""
    import jax
    import jax.numpy as jnp

    from jax_rpn.models import build_rpn

    model = build_rpn(config)
    images = jax.ShapeDtypeStruct((1, *pad_hw, 3), jnp.float32)
    expected = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), images)
    want = {jax.tree_util.keystr(p): v.shape for p, v in jax.tree.leaves_with_path(expected)}
    given = {k: v for k, v in variables.items() if k in expected}
    got = {jax.tree_util.keystr(p): np.shape(v) for p, v in jax.tree.leaves_with_path(given)}
    problems = [
        f"{k}: config gives {want[k]}, variables have {got.get(k, 'nothing')}"
        for k in want
        if got.get(k) != want[k]
    ]
    problems += [f"{k}: in the variables but not in the model" for k in got if k not in want]
    if problems:
        raise ValueError(
            "the variables do not fit the model of this config (pass the config the model was "
            f"trained with): {len(problems)} entries differ, e.g. " + "; ".join(problems[:3])
        )


def predict_images(
    plans: Sequence[ImagePlan],
    variables: dict,
    config,
    *,
    batch_size: int = 8,
    report: Report,
    progress: bool = True,
) -> proposal_files.ProposalSet:
    """Proposals of the planned images, in original-image pixels, in the order of ``plans``.

    Batches of ``batch_size`` images of one padded shape (the last one filled with blank
    images), so the model compiles once per padded shape; each shape is compiled ahead of its
    first batch and timed apart (``report.compile_s``). Images are decoded in a background
    thread while the previous batch runs. Images that fail to decode are left out and
    recorded in ``report.skipped``. Scores are objectness probabilities.
    """
    import jax
    import ml_collections
    from tqdm import tqdm

    from jax_rpn import inference

    fn = inference.predict_function(ml_collections.FrozenConfigDict(config))
    variables = jax.device_put(variables)
    buckets = collections.defaultdict(list)
    for plan in plans:
        buckets[plan.pad_hw].append(plan)
    jobs = [
        group[i : i + batch_size]
        for group in buckets.values()
        for i in range(0, len(group), batch_size)
    ]
    results = {}  # path -> (boxes [n, 4], scores [n])
    start = time.perf_counter()
    compile_s = 0.0
    with (
        concurrent.futures.ThreadPoolExecutor(1) as pool,
        tqdm(
            total=len(plans), unit="image", disable=None if progress else True, leave=False
        ) as bar,
    ):
        pending = collections.deque(
            pool.submit(load_batch, j, batch_size, config) for j in jobs[:2]
        )
        for n, job in enumerate(jobs):
            images, image_hw, failed = pending.popleft().result()
            if n + 2 < len(jobs):
                pending.append(pool.submit(load_batch, jobs[n + 2], batch_size, config))
            shape = "x".join(str(v) for v in job[0].pad_hw)
            if shape not in report.compile_s:
                t = time.perf_counter()
                fn.lower(variables, images, image_hw).compile()
                report.compile_s[shape] = time.perf_counter() - t
                compile_s += report.compile_s[shape]
            props = jax.device_get(fn(variables, images, image_hw))
            scores = proposal_files.objectness_probability(props.scores, props.valid)  # [B, K]
            for i, plan in enumerate(job):
                if plan.path in failed:
                    report.skipped[plan.path] = failed[plan.path]
                    continue
                valid = props.valid[i]
                (h, w), (rh, rw) = plan.original_hw, plan.resized_hw
                scale = np.array([w / rw, h / rh, w / rw, h / rh], np.float64)
                boxes = np.minimum(props.boxes[i][valid] * scale, [w, h, w, h])  # [n, 4]
                results[plan.path] = (boxes.astype(np.float32), scores[i][valid])
                if props.num_nonfinite[i]:
                    report.repaired["had non-finite RPN outputs (those anchors dropped)"].append(
                        plan.path
                    )
            bar.update(len(job))
    report.run_s += time.perf_counter() - start - compile_s
    report.processed += len(results)
    done = [p for p in plans if p.path in results]
    return proposal_files.ProposalSet.from_lists(
        [p.image_id for p in done],
        [p.file_name for p in done],
        [p.original_hw for p in done],
        [results[p.path][0] for p in done],
        [results[p.path][1] for p in done],
    )


def write_overlays(out_dir: str, proposals: proposal_files.ProposalSet, paths, *, top: int):
    """``<out_dir>/<image_id>_<name>.png``: each image with its ``top`` proposals drawn."""
    from jax_rpn import viz

    os.makedirs(out_dir, exist_ok=True)
    # The pictures label boxes with the sigmoid of a logit: the probabilities' logits.
    p = np.clip(proposals.scores.astype(np.float64), 1e-7, 1 - 1e-7)
    logits = np.log(p) - np.log1p(-p)  # [I, K]
    for i, path in enumerate(paths):
        stem = os.path.splitext(str(proposals.file_names[i]))[0]
        target = os.path.join(out_dir, f"{proposals.image_ids[i]}_{stem}.png")
        viz.plot_proposals(
            load_rgb(path),
            np.zeros((0, 4), np.float32),
            np.zeros(0, bool),
            proposals.boxes[i],
            logits[i],
            proposals.valid[i],
            target,
            top=top,
        )


def coco_image_ids(annotations: str) -> dict[str, int]:
    """``{base file name: image id}`` of the images of a COCO JSON file."""
    with open(annotations) as f:
        images = json.load(f).get("images")
    if not isinstance(images, list):
        raise ValueError(f"{annotations}: a COCO JSON file needs an 'images' list")
    ids = {}
    for index, image in enumerate(images):
        if "file_name" not in image or "id" not in image:
            raise ValueError(f"{annotations}: images[{index}] needs 'id' and 'file_name'")
        name = os.path.basename(image["file_name"])
        if name in ids:
            raise ValueError(
                f"{annotations}: images {ids[name]} and {image['id']} share the file name "
                f"{name!r}, so ids cannot be matched by file name"
            )
        ids[name] = int(image["id"])
    return ids


def resolve_config(stored, given, model_path: str):
    """The config to run with: ``given`` (--config) if any, else the one stored with the model.
    Raises ValueError if there is neither."""
    if given is not None:
        return given
    if stored is None:
        raise ValueError(
            f"{model_path} holds no config.json; pass --config (the config the model was trained "
            "with, e.g. --config configs/default.py)"
        )
    return stored


def run(
    inputs: Sequence[str],
    *,
    model: str,
    output: str,
    config=None,
    batch_size: int = 8,
    overlays: int = 0,
    annotations: str | None = None,
    progress: bool = True,
) -> tuple[proposal_files.ProposalSet, Report]:
    """The command: load the model, plan and run the images, write the output files."""
    from jax_rpn import checkpoints, config_checks

    variables, stored, _ = checkpoints.load_variables(model)
    config = resolve_config(stored, config, model)
    config_checks.validate_data(config)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    check_variables(config, variables, tuple(config.data.pad_to))
    report = Report()
    paths = find_images(inputs)
    ids = coco_image_ids(annotations) if annotations else None
    plans = plan_images(paths, config, image_ids=ids, report=report)
    if not plans:
        raise ValueError("no usable images:\n" + report.summary())
    proposals = predict_images(
        plans, variables, config, batch_size=batch_size, report=report, progress=progress
    )
    if not report.processed:
        raise ValueError("no usable images:\n" + report.summary())
    os.makedirs(output, exist_ok=True)
    proposal_files.write_coco_json(os.path.join(output, "proposals.json"), proposals)
    proposal_files.write_npz(os.path.join(output, "proposals.npz"), proposals)
    if overlays > 0:
        done = [p.path for p in plans if p.path not in report.skipped]  # proposals' order
        write_overlays(os.path.join(output, "overlays"), proposals, done, top=overlays)
    files.write_text(os.path.join(output, "report.json"), json.dumps(report.to_dict(), indent=1))
    return proposals, report


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config", None, "Config file (get_config()); default: the config stored with --model."
    )
    flags.DEFINE_string("model", None, "Training workdir or converted variables folder.")
    flags.DEFINE_string("output", None, "Output folder (proposals.json, proposals.npz, ...).")
    flags.DEFINE_integer("batch_size", 8, "Images per batch.", lower_bound=1)
    flags.DEFINE_integer("overlays", 0, "Draw the top this many proposals of each image.")
    flags.DEFINE_string("annotations", None, "COCO JSON whose image ids (by file name) to use.")
    flags.mark_flags_as_required(["model", "output"])


def main(argv):
    from absl import app, flags, logging

    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # no INFO lines from orbax and jax
    if len(argv) < 2:
        raise app.UsageError("give image files, folders or globs after the flags")
    f = flags.FLAGS
    proposals, report = run(
        argv[1:],
        model=f.model,
        output=f.output,
        config=f.config,
        batch_size=f.batch_size,
        overlays=f.overlays,
        annotations=f.annotations,
    )
    print(report.summary())
    print(f"proposals of {proposals.num_images} images written to {f.output}")


if __name__ == "__main__":
    from jax_rpn import cli

    _define_flags()
    cli.run(main, name="jax_rpn.predict")
