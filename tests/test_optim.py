"""Learning-rate schedules and the optimizer's weight-decay mask and frozen parameters.

Expected values are computed by hand: linear warmup from ``0.001 x`` the peak (detectron2's
``WarmupMultiStepLR`` warmup), then a cosine or linear decay to 0 over the remaining steps,
detectron2's multi-step decay at absolute step boundaries, or a constant.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from jax_rpn.optim import create_optimizer, learning_rate_schedule

LR, WARMUP, STEPS = 0.01, 10, 110


def _optim(**overrides):
    c = default.get_config().optim
    c.learning_rate, c.warmup_steps = LR, WARMUP
    for key, value in overrides.items():
        setattr(c, key, value)
    return c


# (schedule, extra settings, {step: learning rate}); warmup steps 0 and 5 are the same for all:
# 0.001 x LR, then halfway 0.001 LR + (LR - 0.001 LR) / 2.
CASES = [
    ("cosine", {}, {10: LR, 35: LR * (1 + np.cos(np.pi / 4)) / 2, 60: LR / 2, 110: 0.0}),
    ("linear", {}, {10: LR, 35: 0.75 * LR, 60: LR / 2, 110: 0.0}),
    (
        "step",
        {"decay_steps": (50, 80), "decay_factor": 0.1},
        {10: LR, 49: LR, 50: LR / 10, 79: LR / 10, 80: LR / 100, 110: LR / 100},
    ),
    ("constant", {}, {10: LR, 110: LR, 1000: LR}),
]


@pytest.mark.parametrize("name,extra,expected", CASES, ids=[c[0] for c in CASES])
def test_schedule_values(name, extra, expected):
    schedule = learning_rate_schedule(_optim(schedule=name, **extra), STEPS)
    expected = {0: LR * 1e-3, 5: LR * 1e-3 + (LR - LR * 1e-3) / 2, **expected}
    steps = np.array(sorted(expected), np.int32)
    want = np.array([expected[int(s)] for s in steps])
    np.testing.assert_allclose([float(schedule(int(s))) for s in steps], want, atol=1e-9)
    # As the train step evaluates it: jitted, on a traced step count.
    np.testing.assert_allclose(jax.jit(jax.vmap(schedule))(steps), want, rtol=1e-6, atol=1e-9)


def test_schedule_without_warmup_starts_at_the_peak():
    schedule = learning_rate_schedule(_optim(schedule="linear", warmup_steps=0), 100)
    np.testing.assert_allclose([schedule(0), schedule(50), schedule(100)], [LR, LR / 2, 0.0])


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_weight_decay_on_kernels_only_and_frozen_parameters_untouched(name):
    # Zero gradients: Adam's step is 0 / (0 + eps) = 0 and SGD's is 0, so the update is the
    # decay alone, -lr x weight_decay x parameter, on kernels; biases and frozen leaves get 0.
    optim = _optim(name=name, schedule="constant", warmup_steps=0, weight_decay=0.5)
    optim.learning_rate, optim.grad_clip_norm = 0.1, None
    params = {
        "head": {"kernel": jnp.full((3, 2), 2.0), "bias": jnp.ones(2)},
        "stem": {"kernel": jnp.full((2,), 3.0)},
    }
    tx, _ = create_optimizer(optim, 10, frozen=lambda path: path[0] == "stem")
    state = tx.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(tx.update)(zeros, state, params)
    np.testing.assert_allclose(updates["head"]["kernel"], np.full((3, 2), -0.1 * 0.5 * 2.0))
    np.testing.assert_array_equal(updates["head"]["bias"], np.zeros(2))
    np.testing.assert_array_equal(updates["stem"]["kernel"], np.zeros(2))
