"""A user's own two-stage detector on jax_rpn: our backbone + FPN + RPN + proposals + RoIAlign
under a box head of its own (Fast R-CNN style), trained a few steps on the synthetic shapes.

    python examples/two_stage_detector.py --steps 20
    python examples/two_stage_detector.py --steps 20 --data-name rpn_shapes/small  # 32 images

`TwoStage` holds an `RPN` built from `configs/tiny.py`; the RPN's proposals (no gradient) and the
ground-truth boxes are pooled 7x7 from their FPN level (P2..P5, the maps the RPN returns in
`RPNOutput.features`) and a 2-layer MLP gives class logits (background + shape classes, from the
batch's `labels`) and box deltas. Loss: the RPN loss + softmax cross-entropy + smooth-L1 on
positives, over 64 sampled ROIs per image. Boxes are xyxy absolute pixels.
"""

import argparse
import functools
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for configs/
from configs import tiny  # noqa: E402
from jax_rpn import boxes, losses, matching, sampling  # noqa: E402
from jax_rpn.data import pipeline  # noqa: E402
from jax_rpn.inference import proposals_from_outputs  # noqa: E402
from jax_rpn.models import build_rpn  # noqa: E402
from jax_rpn.objective import rpn_objective  # noqa: E402
from jax_rpn.roi_align import multilevel_roi_align  # noqa: E402
from jax_rpn.settings import RPNSettings  # noqa: E402

NUM_ROI_LEVELS = 4  # RoIAlign pools from P2..P5, the first 4 RPN levels (detectron2)
BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)  # second-stage box coder weights (detectron2)


class BoxHead(nn.Module):
    """Pooled ROIs ``[..., 7, 7, C]`` -> class logits ``[..., 1 + num_classes]`` (0 background)
    and class-agnostic box deltas ``[..., 4]``."""

    num_classes: int
    dim: int = 256

    @nn.compact
    def __call__(self, pooled):
        x = pooled.reshape(*pooled.shape[:-3], -1)  # [..., 7 * 7 * C]
        x = nn.relu(nn.Dense(self.dim, name="fc1")(x))
        x = nn.relu(nn.Dense(self.dim, name="fc2")(x))
        normal = nn.initializers.normal
        logits = nn.Dense(self.num_classes + 1, kernel_init=normal(0.01), name="cls_score")(x)
        deltas = nn.Dense(4, kernel_init=normal(0.001), name="bbox_pred")(x)
        return logits, deltas


class TwoStage(nn.Module):
    """Images ``[B, H, W, 3]`` -> RPN outputs, ROIs ``[B, R, 4]`` and their valid mask, class
    logits ``[B, R, 1 + num_classes]`` and deltas ``[B, R, 4]``. With ``gt_boxes [B, G, 4]`` and
    ``gt_valid [B, G]`` (training) the ground truth joins the proposals: R = K + G."""

    config: ml_collections.FrozenConfigDict
    num_classes: int

    def setup(self):
        self.rpn = build_rpn(self.config)
        self.settings = RPNSettings.from_config(self.config)
        self.box_head = BoxHead(self.num_classes)

    def __call__(self, images, image_hw, gt_boxes=None, gt_valid=None, *, train):
        outputs = self.rpn(images, train=train)
        props = proposals_from_outputs(
            outputs,
            image_hw,
            settings=self.settings.train_proposals if train else self.settings.test_proposals,
            objectness=self.rpn.objectness,
        )
        rois, valid = jax.lax.stop_gradient(props.boxes), props.valid  # [B, K, 4], [B, K]
        if gt_boxes is not None:
            rois = jnp.concatenate([rois, gt_boxes], axis=1)  # [B, R, 4]
            valid = jnp.concatenate([valid, gt_valid], axis=1)  # [B, R]
        roi_align = functools.partial(
            multilevel_roi_align, strides=outputs.strides[:NUM_ROI_LEVELS]
        )
        pyramid = list(outputs.features[:NUM_ROI_LEVELS])  # P2..P5: [B, Hl, Wl, C]
        pooled = jax.vmap(roi_align)(pyramid, rois)  # [B, R, 7, 7, C]
        logits, deltas = self.box_head(pooled)
        return outputs, rois, valid, logits, deltas


def roi_targets(key, rois, roi_valid, gt_boxes, gt_classes, gt_valid):
    """One image: ``rois [R, 4]`` -> classes ``[R]`` (1 + GT class for sampled positives, 0 for
    sampled background, -1 not sampled) and box targets ``[R, 4]`` (meaningful on positives)."""
    matched, labels = matching.match(
        rois, gt_boxes, gt_valid, high=0.5, low=0.5, allow_low_quality=False
    )  # [R], [R]
    labels = jnp.where(roi_valid, labels, -1)
    labels = sampling.sample_labels(key, labels, num_samples=64, positive_fraction=0.25)
    classes = jnp.where(labels == 1, gt_classes[matched] + 1, labels)  # [R]
    return classes, boxes.encode(rois, gt_boxes[matched], weights=BOX_WEIGHTS)  # [R], [R, 4]


def loss_fn(params, state, batch, key, *, model, settings):
    """RPN loss + second-stage cross-entropy and smooth-L1, normalised by the sampled ROIs."""
    rpn_key, roi_key = jax.random.split(key)
    gt_use = batch["valid"] & ~batch["ignore"]  # [B, G]
    outputs, rois, valid, logits, deltas = model.apply(
        {"params": params, **state},
        batch["image"],
        batch["image_hw"],
        batch["boxes"],
        gt_use,
        train=True,
    )
    rpn, _ = rpn_objective(
        outputs, batch, rpn_key, targets_settings=settings.targets, loss_settings=settings.loss
    )
    keys = jax.random.split(roi_key, rois.shape[0])
    classes, targets = jax.vmap(roi_targets)(
        keys, rois, valid, batch["boxes"], batch["labels"], gt_use
    )  # [B, R], [B, R, 4]
    sampled = classes >= 0
    num = jnp.maximum(sampled.sum(), 1)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(classes, 0))
    cls = jnp.sum(jnp.where(sampled, ce, 0.0)) / num
    box = losses.box_loss(deltas, targets, (classes > 0).astype(jnp.int32), beta=1.0) / num
    return rpn + cls + box, {"rpn": rpn, "cls": cls, "box": box}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--data-name", default="rpn_shapes", help="rpn_shapes or rpn_shapes/small")
    parser.add_argument(
        "--data-dir", default=None, help="tfds data_dir (default ~/tensorflow_datasets)"
    )
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    """Train ``--steps`` steps; returns the per-step losses and the initial and final params."""
    args = parse_args(argv)
    config = tiny.get_config()
    config.data.name, config.data.data_dir = args.data_name, args.data_dir
    config.batch_size, config.seed = args.batch_size, args.seed
    config.model.norm = "frozen_bn"  # fixed statistics: the place for pretrained weights
    num_classes = len(pipeline.dataset_info(config).class_names)
    model = TwoStage(ml_collections.FrozenConfigDict(config), num_classes)
    batches = pipeline.create_train_iterator(config)

    key, init_key = jax.random.split(jax.random.key(args.seed))
    h, w = config.data.pad_to
    init = jax.jit(functools.partial(model.init, train=False))
    variables = init(init_key, jnp.zeros((1, h, w, 3)), jnp.array([[h, w]]))
    params, state = variables.pop("params"), variables  # state: the frozen BN statistics
    tx = optax.adam(args.learning_rate)
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, state, opt_state, batch, key):
        grad_fn = jax.value_and_grad(
            functools.partial(loss_fn, model=model, settings=RPNSettings.from_config(config)),
            has_aux=True,
        )
        (loss, parts), grads = grad_fn(params, state, batch, key)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, {"loss": loss, **parts}

    initial, history = params, []
    for step in range(args.steps):
        batch = next(batches)
        params, opt_state, metrics = train_step(
            params, state, opt_state, batch, jax.random.fold_in(key, step)
        )
        history.append({k: float(metrics[k]) for k in ("loss", "rpn", "cls", "box")})
        print(f"step {step:3d}  " + "  ".join(f"{k} {v:.4f}" for k, v in history[-1].items()))
    return {"history": history, "initial_params": initial, "params": params}


if __name__ == "__main__":
    main()
