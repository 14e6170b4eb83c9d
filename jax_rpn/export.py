"""The proposal function exported for serving: StableHLO (``jax.export``) and a TF SavedModel.

    python -m jax_rpn.export --model workdirs/default --output export/
    python -m jax_rpn.export --model workdirs/default --output export/ --saved_model

The exported function, with the model's variables baked in as constants::

    (images float32 [B, H, W, 3], image_hw int32 [B, 2])
        -> (boxes float32 [B, K, 4], scores float32 [B, K], valid bool [B, K])

``images`` are normalised as the input pipeline does (``jax_rpn.data.augment``: resize keeping
the aspect ratio, channels in ``channel_order``, ``(pixel - mean) / std``) and zero-padded at
the bottom and right to ``(H, W) = config.data.pad_to``; ``image_hw`` are the resized sizes
inside the padding. ``boxes`` are ``[x1, y1, x2, y2]`` in pixels of the resized image (divide
by the resize scale for the original image), valid ones first, best first; ``scores`` are
objectness probabilities (the sigmoid of the foreground logit, see
:mod:`jax_rpn.proposal_files`), 0 where not valid. K = ``proposals.post_nms_topk_test``.
``proposals.json`` (the sidecar) records all of this for the serving side.

Files written into ``--output``:

- ``proposals.jax_exported``: the serialized ``jax.export.Exported`` (StableHLO and its calling
  convention), batch size symbolic (any B), lowered for ``--platforms`` (default cpu and
  cuda). Running it needs jax only, not jax_rpn::

      exported = jax.export.deserialize(bytearray(open(path, "rb").read()))
      boxes, scores, valid = exported.call(images, image_hw)

- ``proposals.json``: the sidecar (shapes, preprocessing, K, platforms, source checkpoint).
- ``saved_model/`` (``--saved_model``, needs TensorFlow): the same function through
  ``jax2tf``, signature ``serving_default(images, image_hw) -> boxes, scores, valid``, for TF
  Serving. Its batch size is fixed (``--saved_model_batch_size``): TensorFlow 2.21's StableHLO
  cannot specialise the shape-polymorphic top-k that jax lowers, so a symbolic batch fails in
  TF when called. It is serialized for StableHLO consumers 12 weeks old rather than jax's
  default 4 (TensorFlow's bundled StableHLO lags jax's).

Variables are baked in rather than passed as arguments: the file is the whole model, with
nothing else to load or keep in step at serving time, and XLA sees the weights as constants.
The cost: one export per checkpoint, and the file holds the weights (13 MiB for the default
config). Outputs match ``jax_rpn.inference.predict_proposals`` to float rounding (boxes
within 1e-3 px, scores 1e-5: a separately compiled program; ``tests/test_export.py``).
"""

from __future__ import annotations

import contextlib
import json
import os

import jax
import jax.numpy as jnp

from jax_rpn import files, inference
from jax_rpn.models import build_rpn
from jax_rpn.settings import PixelSettings, ProposalSettings

EXPORTED_FILE = "proposals.jax_exported"
SIDECAR_FILE = "proposals.json"
SAVED_MODEL_DIR = "saved_model"
DEFAULT_PLATFORMS = ("cpu", "cuda")


def proposal_function(variables: dict, config):
    """``(images [B, H, W, 3], image_hw [B, 2]) -> (boxes [B, K, 4], scores [B, K], valid
    [B, K])`` with ``variables`` closed over; scores are objectness probabilities."""
    model = build_rpn(config)
    settings = ProposalSettings.from_config(config, train=False)
    variables = jax.tree.map(jnp.asarray, variables)

    def propose(images, image_hw):
        props = inference.proposals_from_images(
            model, variables, images, image_hw, settings=settings
        )
        scores = jnp.where(props.valid, jax.nn.sigmoid(props.scores), 0.0)
        return props.boxes, scores, props.valid

    return propose


def _input_specs(config, batch_size):
    h, w = (int(v) for v in config.data.pad_to)
    return (
        jax.ShapeDtypeStruct((batch_size, h, w, 3), jnp.float32),
        jax.ShapeDtypeStruct((batch_size, 2), jnp.int32),
    )


def export_proposals(
    variables: dict, config, *, batch_size: int | None = None, platforms=DEFAULT_PLATFORMS
) -> jax.export.Exported:
    """:func:`proposal_function` exported with ``jax.export`` for ``platforms``; a symbolic
    batch size when ``batch_size`` is None."""
    batch = jax.export.symbolic_shape("b")[0] if batch_size is None else int(batch_size)
    fn = jax.jit(proposal_function(variables, config))
    return jax.export.export(fn, platforms=tuple(platforms))(*_input_specs(config, batch))


def sidecar(config, exported: jax.export.Exported, *, source: str | None = None) -> dict:
    """What a server needs to know to feed the exported function and read its outputs."""
    d = config.data
    pixels = PixelSettings.from_config(config)
    k = int(config.proposals.post_nms_topk_test)
    h, w = (int(v) for v in d.pad_to)
    return {
        "function": "jax_rpn proposals: (images, image_hw) -> (boxes, scores, valid)",
        "inputs": {
            "images": {"shape": ["B", h, w, 3], "dtype": "float32"},
            "image_hw": {"shape": ["B", 2], "dtype": "int32"},
        },
        "outputs": {
            "boxes": {"shape": ["B", k, 4], "dtype": "float32", "format": "xyxy resized pixels"},
            "scores": {"shape": ["B", k], "dtype": "float32", "meaning": "objectness probability"},
            "valid": {"shape": ["B", k], "dtype": "bool"},
        },
        "preprocess": {
            "resize": "bilinear, keep aspect ratio: shorter side -> short_side unless the longer "
            "side would pass max_size; then pad zeros at the bottom and right to pad_to",
            "short_side": int(d.short_side),
            "max_size": int(d.max_size),
            "pad_to": [h, w],
            "channel_order": pixels.channel_order,
            "pixel_mean": list(pixels.mean),
            "pixel_std": list(pixels.std),
        },
        "K": k,
        "platforms": list(exported.platforms),
        "source": source,
        "jax_version": jax.__version__,
    }


def save_exported(out_dir: str, exported: jax.export.Exported, info: dict) -> str:
    """Write ``proposals.jax_exported`` and its sidecar ``proposals.json`` atomically; returns
    the exported file's path."""
    path = os.path.join(out_dir, EXPORTED_FILE)
    os.makedirs(out_dir, exist_ok=True)
    with files.atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(exported.serialize())
    files.write_text(os.path.join(out_dir, SIDECAR_FILE), json.dumps(info, indent=1))
    return path


def load_exported(path: str) -> jax.export.Exported:
    """Read a ``proposals.jax_exported`` file; call it with ``.call(images, image_hw)``."""
    with open(path, "rb") as f:
        return jax.export.deserialize(bytearray(f.read()))


@contextlib.contextmanager
def _stablehlo_for_tensorflow():
    """Serialize StableHLO for consumers 12 weeks old instead of jax's 4 (TensorFlow bundles an
    older StableHLO than jax: TF 2.21 reads 1.13, jax 0.10.2 writes 1.15 by default).

    jax has no public setting for this, so the version lookup its exporter calls is replaced
    for the duration; where this jax has no such lookup, nothing changes.
    """
    try:
        from jax._src.lib.mlir.dialects import hlo

        original = hlo.get_version_from_compatibility_requirement
        older = hlo.StablehloCompatibilityRequirement.WEEK_12
    except (ImportError, AttributeError):
        yield
        return
    hlo.get_version_from_compatibility_requirement = lambda requirement: original(older)
    try:
        yield
    finally:
        hlo.get_version_from_compatibility_requirement = original


def save_saved_model(
    out_dir: str, variables: dict, config, *, batch_size: int = 1, platforms=DEFAULT_PLATFORMS
) -> str:
    """The proposal function as a TF SavedModel (jax2tf, batch ``batch_size``) in
    ``out_dir/saved_model``; signature ``serving_default(images, image_hw)`` with outputs
    ``boxes``, ``scores``, ``valid``. Needs TensorFlow. Returns the folder."""
    import tensorflow as tf
    from jax.experimental import jax2tf

    images, image_hw = _input_specs(config, int(batch_size))
    propose = jax2tf.convert(
        proposal_function(variables, config),
        with_gradient=False,
        native_serialization_platforms=tuple(platforms),
    )

    @tf.function(
        autograph=False,
        input_signature=[
            tf.TensorSpec(images.shape, tf.float32, name="images"),
            tf.TensorSpec(image_hw.shape, tf.int32, name="image_hw"),
        ],
    )
    def serve(images, image_hw):
        boxes, scores, valid = propose(images, image_hw)
        return {"boxes": boxes, "scores": scores, "valid": valid}

    module = tf.Module()
    module.serve = serve
    path = os.path.join(out_dir, SAVED_MODEL_DIR)
    with files.atomic_dir(path, overwrite=True) as tmp, _stablehlo_for_tensorflow():
        tf.saved_model.save(module, tmp, signatures={"serving_default": serve})
    return path


def run(
    *,
    model: str,
    output: str,
    config=None,
    batch_size: int | None = None,
    platforms=DEFAULT_PLATFORMS,
    saved_model: bool = False,
    saved_model_batch_size: int = 1,
) -> dict:
    """The command: load the model, export, write the files; returns the sidecar."""
    from jax_rpn import checkpoints, predict

    variables, stored, step = checkpoints.load_variables(model)
    config = predict.resolve_config(stored, config, model)
    predict.check_variables(config, variables, tuple(config.data.pad_to))
    exported = export_proposals(variables, config, batch_size=batch_size, platforms=platforms)
    source = os.path.abspath(model) + (f" (step {step})" if step is not None else "")
    info = sidecar(config, exported, source=source)
    os.makedirs(output, exist_ok=True)
    path = save_exported(output, exported, info)
    print(f"wrote {path} ({os.path.getsize(path) / 2**20:.1f} MiB) and its sidecar")
    if saved_model:
        folder = save_saved_model(
            output, variables, config, batch_size=saved_model_batch_size, platforms=platforms
        )
        print(f"wrote {folder} (batch size {saved_model_batch_size})")
    return info


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config", None, "Config file (get_config()); default: the config stored with --model."
    )
    flags.DEFINE_string("model", None, "Training workdir or converted variables folder.")
    flags.DEFINE_string("output", None, "Output folder.")
    flags.DEFINE_integer("batch_size", None, "Fixed batch size (default: any).", lower_bound=1)
    flags.DEFINE_list("platforms", list(DEFAULT_PLATFORMS), "Platforms to lower for.")
    flags.DEFINE_bool("saved_model", False, "Also write a TF SavedModel (needs tensorflow).")
    flags.DEFINE_integer("saved_model_batch_size", 1, "The SavedModel's batch size.", lower_bound=1)
    flags.mark_flags_as_required(["model", "output"])


def main(argv):
    from absl import app, flags, logging

    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # no INFO lines from orbax and jax
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    f = flags.FLAGS
    run(
        model=f.model,
        output=f.output,
        config=f.config,
        batch_size=f.batch_size,
        platforms=tuple(f.platforms),
        saved_model=f.saved_model,
        saved_model_batch_size=f.saved_model_batch_size,
    )


if __name__ == "__main__":
    from jax_rpn import cli

    _define_flags()
    cli.run(main, name="jax_rpn.export")
