"""Where the convolutional part of the train step loses to PyTorch: the backbone + FPN forward
and backward, and its layers one by one, per core; and XLA's own breakdown of our program.

    python benchmarks/backbone_layers.py           # default config, 7 rounds
    python benchmarks/backbone_layers.py --quick   # 3 rounds, no profile

One thread on each side (one JAX CPU device; ``torch.set_num_threads(1)``), a batch of 4 at
256 x 256: the share of ``configs/default.py``'s batch of 8 that one of ``train.py``'s two
devices computes. Per core the comparison does not depend on how each side spreads work
over the cores, and it holds on a loaded machine (CPU times are given too).

- backbone + FPN: ``RPN.features`` of ``configs/default.py`` (narrow ResNet-18 with batch
  norm in training mode, FPN), forward + backward of a dummy loss (mean of squares of
  P2..P6), vs torchvision's ResNet + ``BackboneWithFPN`` of ``benchmarks/torchvision_rpn.py``
  (NCHW, and ``channels_last``).
- layers: each as the model uses it, forward + backward (the stem's backward only for its
  kernel, as the image needs none): the 7x7 stride-2 stem convolution, batch norm + ReLU
  in training mode, the stem's 3x3 stride-2 max-pool (``flax.linen.max_pool``), and the
  convolutions of the stages and of the FPN.
- profile: ``jax.profiler`` trace of our backbone + FPN program, time by XLA operation kind
  (``ynn_fusion``: convolutions through YNNPACK; ``reduce-window``, ``iota``, ``scatter``:
  the max-pool's gradient; ``transpose``: layout copies around convolutions; the rest:
  fused elementwise and reductions, mostly batch norm).
"""

import argparse
import collections
import functools
import glob
import re
import sys
import tempfile
from pathlib import Path

if not __package__:  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402, I001
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import flax.linen as nn  # noqa: E402
from jax import lax  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks import torchvision_rpn as tvr  # noqa: E402

BATCH = 4


def _mean_square(arrays):
    return sum(jnp.mean(jnp.square(a.astype(jnp.float32))) for a in arrays)


def ours_backbone(config, images):
    """``(fwd + bwd call, forward-only call)`` of our backbone + FPN on ``images``."""
    from jax_rpn import training
    from jax_rpn.models import build_rpn

    model = build_rpn(config)
    variables = model.init(jax.random.key(0), images[:1], train=False)
    params = variables.pop("params")
    mutable = list(training.model_state_collections(config))

    def loss(p):
        maps = model.apply(
            {"params": p, **variables}, images, train=True, mutable=mutable, method="features"
        )[0]
        return _mean_square(maps)

    grad = jax.jit(jax.value_and_grad(loss))
    return functools.partial(grad, params), functools.partial(jax.jit(loss), params)


def torch_backbone(config, images, *, channels_last: bool):
    torch.manual_seed(0)
    model = tvr.build(config).train().backbone
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    def grad():
        model.zero_grad(set_to_none=True)
        loss = sum(torch.mean(torch.square(t)) for t in model(x).values())
        loss.backward()
        return loss.detach()

    def forward():
        with torch.no_grad():
            return sum(torch.mean(torch.square(t)) for t in model(x).values())

    return grad, forward


def layer_cases(width: int, fpn_dim: int):
    """(name, input NHWC shape, kind, settings) of the layers of the default backbone."""
    w = width
    return [
        ("stem conv 7x7 s2, 3 -> w", (BATCH, 256, 256, 3), "conv", (7, w, 2, False)),
        ("batch norm + ReLU (stem output)", (BATCH, 128, 128, w), "bn_relu", ()),
        ("max-pool 3x3 s2 (stem)", (BATCH, 128, 128, w), "max_pool", ()),
        ("conv 3x3, w -> w at 64x64", (BATCH, 64, 64, w), "conv", (3, w, 1, True)),
        ("conv 3x3 s2, w -> 2w", (BATCH, 64, 64, w), "conv", (3, 2 * w, 2, True)),
        ("conv 1x1 s2, w -> 2w (shortcut)", (BATCH, 64, 64, w), "conv", (1, 2 * w, 2, True)),
        ("conv 3x3, 4w -> 4w at 16x16", (BATCH, 16, 16, 4 * w), "conv", (3, 4 * w, 1, True)),
        ("FPN lateral 1x1, w -> d at 64x64", (BATCH, 64, 64, w), "conv", (1, fpn_dim, 1, True)),
        (
            "FPN output 3x3, d -> d at 64x64",
            (BATCH, 64, 64, fpn_dim),
            "conv",
            (3, fpn_dim, 1, True),
        ),
    ]


def ours_layer(shape, kind, settings):
    x = jax.random.normal(jax.random.key(0), shape)
    if kind == "conv":
        k, out, stride, grad_x = settings
        kernel = jax.random.normal(jax.random.key(1), (k, k, shape[-1], out)) * 0.05
        pad = ((k // 2, k // 2),) * 2

        def f(x, kernel):
            y = lax.conv_general_dilated(
                x, kernel, (stride, stride), pad, None, None, ("NHWC", "HWIO", "NHWC")
            )
            return jnp.sum(jnp.square(y))

        g = jax.jit(jax.value_and_grad(f, argnums=(0, 1) if grad_x else (1,)))
        return functools.partial(g, x, kernel)
    if kind == "bn_relu":
        bn = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5)
        variables = bn.init(jax.random.key(1), x)

        def f(x, params):
            y, _ = bn.apply(
                {"params": params, "batch_stats": variables["batch_stats"]},
                x,
                mutable=["batch_stats"],
            )
            return jnp.sum(jnp.square(nn.relu(y)))

        g = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))
        return functools.partial(g, x, variables["params"])

    def f(x):  # the stem's max-pool as jax_rpn.models.resnet applies it
        y = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        return jnp.sum(jnp.square(y))

    return functools.partial(jax.jit(jax.value_and_grad(f)), jax.nn.relu(x))


def torch_layer(shape, kind, settings, *, channels_last: bool):
    b, h, w, c = shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(b, c, h, w).contiguous(memory_format=fmt)
    if kind == "conv":
        k, out, stride, grad_x = settings
        layer = torch.nn.Conv2d(c, out, k, stride, k // 2, bias=False).to(memory_format=fmt)
        x.requires_grad_(grad_x)
    elif kind == "bn_relu":
        layer = torch.nn.Sequential(torch.nn.BatchNorm2d(c), torch.nn.ReLU())
        x.requires_grad_(True)
    else:
        layer = torch.nn.MaxPool2d(3, 2, 1)
        x = torch.relu(x).requires_grad_(True)

    def call():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        loss = torch.sum(torch.square(layer(x)))
        loss.backward()
        return loss.detach()

    return call


def profile_ops(call, rounds: int = 3) -> list[tuple[str, float, float]]:
    """``(kind, ms per call, share)`` of the XLA operations in ``rounds`` calls of ``call``."""
    from jax.profiler import ProfileData

    with tempfile.TemporaryDirectory(prefix="jax_rpn_trace_") as d:
        with jax.profiler.trace(d):
            for _ in range(rounds):
                common.block(call())
        data = ProfileData.from_file(glob.glob(f"{d}/**/*.xplane.pb", recursive=True)[0])
    skip = ("ThunkExecutor", "Rendezvous", "Wait", "$", "end:", "Handle", "Slinky")
    kinds = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            if not line.name.startswith("tf_XLA"):  # XLA's worker threads
                continue
            for event in line.events:
                if event.name.startswith(skip):
                    continue
                name = re.sub(r"^wrapped_", "", re.sub(r"\.\d+$", "", event.name))
                kind = next(
                    (
                        k
                        for k in (
                            "ynn_fusion",
                            "reduce-window",
                            "iota",
                            "scatter",
                            "transpose",
                            "convolution",
                        )
                        if k in name
                    ),
                    "other (elementwise, reductions)",
                )
                kinds[kind] += event.duration_ns
    total = sum(kinds.values())
    return [(k, v / 1e6 / rounds, v / total) for k, v in kinds.most_common()]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="3 rounds, no profile")
    args = parser.parse_args()
    if args.quick:
        args.repeats = 3
    jax.config.update("jax_num_cpu_devices", 1)
    torch.set_num_threads(1)
    config = common.load_config("configs.default", {"batch_size": BATCH})
    images = common.random_batch(config)["image"]
    load_before = common.load_average()

    calls = {}
    calls["ours"], calls["ours forward"] = ours_backbone(config, jnp.asarray(images))
    calls["torch"], calls["torch forward"] = torch_backbone(config, images, channels_last=False)
    calls["torch cl"], calls["torch cl forward"] = torch_backbone(
        config, images, channels_last=True
    )
    times = common.time_interleaved(calls, repeats=args.repeats, warmup=2)

    def ms(name, what="median"):
        return times[name][what if what == "median" else "cpu_median"] * 1e3

    rows = []
    for label, suffix in (("forward + backward", ""), ("forward only", " forward")):
        rows.append(
            [f"backbone + FPN, {label}", ms("ours" + suffix), ms("torch" + suffix)]
            + [ms("torch cl" + suffix), f"{ms('ours' + suffix) / ms('torch' + suffix):.2f}"]
            + [f"{ms('ours' + suffix) / ms('torch cl' + suffix):.2f}"]
            + [
                ms("ours" + suffix, "cpu"),
                ms("torch" + suffix, "cpu"),
                ms("torch cl" + suffix, "cpu"),
            ]
        )

    layer_calls = {}
    for name, shape, kind, settings in layer_cases(config.model.width, config.model.fpn_dim):
        layer_calls[(name, "ours")] = ours_layer(shape, kind, settings)
        for cl in (False, True):
            layer_calls[(name, "torch cl" if cl else "torch")] = torch_layer(
                shape, kind, settings, channels_last=cl
            )
    layer_times = common.time_interleaved(layer_calls, repeats=args.repeats, warmup=2)
    for name, *_ in layer_cases(config.model.width, config.model.fpn_dim):
        o, t, c = (layer_times[(name, side)] for side in ("ours", "torch", "torch cl"))
        rows.append(
            [name, o["median"] * 1e3, t["median"] * 1e3, c["median"] * 1e3]
            + [f"{o['median'] / t['median']:.2f}", f"{o['median'] / c['median']:.2f}"]
            + [o["cpu_median"] * 1e3, t["cpu_median"] * 1e3, c["cpu_median"] * 1e3]
        )

    print(f"machine: {common.machine()}")
    print(f"{tvr.versions()}; {load_before} before, {common.load_average()} after")
    print(
        f"\nconfigs/default.py backbone + FPN and its layers, batch {BATCH} at 256x256, one "
        f"thread per side; forward + backward unless said; median of {args.repeats} rounds, "
        "ms (wall, then process CPU)\n"
    )
    print(
        common.table(
            ["part", "ours ms", "torch ms", "torch channels_last ms", "ours / torch"]
            + ["ours / channels_last", "ours CPU ms", "torch CPU ms", "channels_last CPU ms"],
            rows,
        )
    )
    if not args.quick:
        print("\nOur backbone + FPN forward + backward by XLA operation kind (jax.profiler)\n")
        ops = profile_ops(calls["ours"])
        print(
            common.table(
                ["operation kind", "ms per call", "share"],
                [[k, v, f"{100 * s:.1f}%"] for k, v, s in ops],
            )
        )


if __name__ == "__main__":
    main()
