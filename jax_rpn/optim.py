"""Optax optimizer and learning-rate schedule from ``config.optim``."""

from collections.abc import Callable

import jax
import ml_collections
import optax

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "linear", "step", "constant")


def learning_rate_schedule(optim: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
    """Linear warmup from 0.001 x, then cosine, linear (both to 0 at ``num_steps``), step (x
    ``decay_factor`` at each boundary) or constant. detectron2's ``WarmupMultiStepLR`` is
    ``schedule="step"``."""
    lr, warmup = optim.learning_rate, optim.warmup_steps
    if optim.schedule == "cosine":
        main = optax.cosine_decay_schedule(lr, max(num_steps - warmup, 1))
    elif optim.schedule == "linear":
        main = optax.linear_schedule(lr, 0.0, max(num_steps - warmup, 1))
    elif optim.schedule == "step":
        boundaries = {int(b) - warmup: optim.decay_factor for b in optim.decay_steps}
        main = optax.piecewise_constant_schedule(lr, boundaries)
    else:
        main = optax.constant_schedule(lr)
    if warmup <= 0:
        return main
    warm = optax.linear_schedule(lr * 1e-3, lr, warmup)
    return optax.join_schedules([warm, main], [warmup])


def _decay_mask(params):
    """Weight decay on conv/dense kernels only: not on biases, norm scales or norm offsets."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) == "kernel", params
    )


def create_optimizer(
    optim: ml_collections.ConfigDict,
    num_steps: int,
    *,
    frozen: Callable[[tuple[str, ...]], bool] | None = None,
):
    """``(optax.GradientTransformation, schedule)`` for ``config.optim``.

    ``frozen``: predicate on a parameter's path (keys under ``params``, e.g.
    ``jax_rpn.models.frozen_parameters(backbone, freeze_at)``); those parameters get zero
    updates, no weight decay, no optimizer state, and do not count in gradient clipping.
    """
    tx, schedule = _trainable_optimizer(optim, num_steps)
    if frozen is None:
        return tx, schedule

    def labels(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "frozen" if frozen(tuple(k.key for k in path)) else "train", params
        )

    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels), schedule


def _trainable_optimizer(optim: ml_collections.ConfigDict, num_steps: int):
    schedule = learning_rate_schedule(optim, num_steps)
    if optim.name == "sgd":
        tx = optax.chain(
            optax.add_decayed_weights(optim.weight_decay, mask=_decay_mask),
            optax.sgd(schedule, momentum=optim.momentum),
        )
    else:
        tx = optax.adamw(schedule, weight_decay=optim.weight_decay, mask=_decay_mask)
    if optim.grad_clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(optim.grad_clip_norm), tx)
    return tx, schedule
