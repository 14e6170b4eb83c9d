"""Single convolutions of the R50-FPN and default train steps, forward and both gradients,
XLA's CPU convolution against a matmul and against PyTorch (oneDNN): what bounds the
end-to-end step.

    python benchmarks/conv_gradients.py           # 7 rounds
    python benchmarks/conv_gradients.py --quick   # 3 rounds

One JAX CPU device and ``torch.set_num_threads(<cores>)``, each convolution at the shape one
of ``train.py``'s two devices sees: batch 1 at R50-FPN's 512 x 512 (``benchmarks/e2e_train.py``'s
``r50_fpn``), batch 4 at the default's 256 x 256. NHWC on our side, ``channels_last`` on
PyTorch's. For each convolution:

- **xla**: ``lax.conv_general_dilated``: the forward, the gradient for the input (``dx``) and
  for the kernel (``dw``), each its own jitted program;
- **matmul** (1x1 only): the same numbers as a strided slice + ``lax.dot_general``, as
  ``jax_rpn.models.resnet.conv_1x1_as_matmul`` runs every 1x1 convolution of the models;
- **torch**: ``nn.Conv2d`` forward, and forward + backward of the sum of its output times a
  fixed random tensor (``dx`` and ``dw`` together).

Outputs are checked against each other before timing.
"""

import argparse
import os
import sys
from pathlib import Path

if not __package__:  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402, I001
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

from benchmarks import common  # noqa: E402
from jax_rpn.models.resnet import conv_1x1_as_matmul  # noqa: E402

# (where in the model, batch, H = W, in channels, out channels, kernel, stride)
SHAPES = [
    ("R50 res2 1x1 reduce (256 -> 64)", 1, 128, 256, 64, 1, 1),
    ("R50 res3 1x1 expand (128 -> 512)", 1, 64, 128, 512, 1, 1),
    ("R50 res4 shortcut 1x1 stride 2", 1, 64, 512, 1024, 1, 2),
    ("R50 FPN lateral 1x1 on C2", 1, 128, 256, 256, 1, 1),
    ("R50 res3 3x3 (128)", 1, 64, 128, 128, 3, 1),
    ("R50 FPN output / head 3x3 on P2 (256)", 1, 128, 256, 256, 3, 1),
    ("R50 FPN output / head 3x3 on P3 (256)", 1, 64, 256, 256, 3, 1),
    ("default res2 3x3 (32)", 4, 64, 32, 32, 3, 1),
    ("default res4 3x3 (128)", 4, 16, 128, 128, 3, 1),
]
DIMS = ("NHWC", "HWIO", "NHWC")


def _xla_conv(x, w, stride):
    pad = w.shape[0] // 2
    return lax.conv_general_dilated(
        x, w, (stride, stride), ((pad, pad),) * 2, dimension_numbers=DIMS
    )


def _matmul_conv(x, w, stride):
    dims = lax.conv_dimension_numbers(x.shape, w.shape, DIMS)
    return conv_1x1_as_matmul(x, w, (stride, stride), ((0, 0), (0, 0)), dimension_numbers=dims)


def programs(conv, stride):
    """Jitted ``(forward, dx, dw)`` of ``conv``; the gradients of ``sum(conv(x, w) * g)``."""
    fwd = jax.jit(lambda x, w: conv(x, w, stride))
    dx = jax.jit(lambda x, w, g: jax.vjp(lambda x: conv(x, w, stride), x)[1](g)[0])
    dw = jax.jit(lambda x, w, g: jax.vjp(lambda w: conv(x, w, stride), w)[1](g)[0])
    return fwd, dx, dw


def bench_shape(shape, repeats):
    name, b, hw, cin, cout, k, stride = shape
    rng = np.random.default_rng(0)
    x = rng.normal(size=(b, hw, hw, cin)).astype(np.float32)
    w = (rng.normal(size=(k, k, cin, cout)) / np.sqrt(k * k * cin)).astype(np.float32)
    out_hw = hw // stride
    g = rng.normal(size=(b, out_hw, out_hw, cout)).astype(np.float32)
    xj, wj, gj = jnp.asarray(x), jnp.asarray(w), jnp.asarray(g)

    tconv = torch.nn.Conv2d(cin, cout, k, stride, k // 2, bias=False)
    with torch.no_grad():
        tconv.weight.copy_(torch.from_numpy(w.transpose(3, 2, 0, 1)))
    tconv = tconv.to(memory_format=torch.channels_last)
    tx = torch.from_numpy(x.transpose(0, 3, 1, 2)).contiguous(memory_format=torch.channels_last)
    tg = torch.from_numpy(g.transpose(0, 3, 1, 2)).contiguous(memory_format=torch.channels_last)
    tx.requires_grad_(True)

    def torch_fwd():
        with torch.inference_mode():
            return tconv(tx)

    def torch_fwd_bwd():
        tconv.weight.grad, tx.grad = None, None
        (tconv(tx) * tg).sum().backward()
        return tx.grad

    fwd, dx, dw = programs(_xla_conv, stride)
    calls = {
        "xla fwd": lambda: fwd(xj, wj),
        "xla dx": lambda: dx(xj, wj, gj),
        "xla dw": lambda: dw(xj, wj, gj),
        "torch fwd": torch_fwd,
        "torch fwd+bwd": torch_fwd_bwd,
    }
    expected = torch_fwd().numpy().transpose(0, 2, 3, 1)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(np.asarray(fwd(xj, wj)), expected, atol=1e-4 * scale)
    torch_fwd_bwd()
    np.testing.assert_allclose(
        np.asarray(dw(xj, wj, gj)),
        tconv.weight.grad.numpy().transpose(2, 3, 1, 0),
        rtol=1e-3,
        atol=1e-3 * np.abs(tconv.weight.grad.numpy()).max(),
    )
    if k == 1:
        mfwd, mdx, mdw = programs(_matmul_conv, stride)
        np.testing.assert_allclose(np.asarray(mfwd(xj, wj)), expected, atol=1e-4 * scale)
        reference_dw = np.asarray(dw(xj, wj, gj))
        np.testing.assert_allclose(
            np.asarray(mdw(xj, wj, gj)), reference_dw, atol=1e-5 * np.abs(reference_dw).max()
        )
        calls |= {
            "matmul fwd": lambda: mfwd(xj, wj),
            "matmul dx": lambda: mdx(xj, wj, gj),
            "matmul dw": lambda: mdw(xj, wj, gj),
        }
    med = {k: v["median"] * 1e3 for k, v in common.time_interleaved(calls, repeats=repeats).items()}
    ours = med["xla fwd"] + med["xla dx"] + med["xla dw"]
    row = [
        name,
        f"{b}x{hw}x{hw}x{cin} -> {cout}",
        med["xla fwd"],
        med["xla dx"],
        med["xla dw"],
        f"{med['xla dw'] / med['xla fwd']:.1f}x",
    ]
    if k == 1:
        mm = med["matmul fwd"] + med["matmul dx"] + med["matmul dw"]
        row += [f"{med['matmul fwd']:.3g} / {med['matmul dx']:.3g} / {med['matmul dw']:.3g}"]
        ours = min(ours, mm)
    else:
        row += ["-"]
    row += [med["torch fwd"], med["torch fwd+bwd"], f"{med['torch fwd+bwd'] / ours:.2f}x"]
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="3 rounds")
    args = parser.parse_args()
    repeats = 3 if args.quick else args.repeats
    torch.set_num_threads(os.cpu_count())
    print(f"machine: {common.machine()}")
    print(f"jax devices: {jax.devices()}; torch threads {torch.get_num_threads()}")
    print(f"{common.load_average()} before")
    rows = [bench_shape(s, repeats) for s in SHAPES]
    print(f"{common.load_average()} after")
    print(
        f"\nOne convolution, median ms of {repeats} rounds; "
        "ratio = torch fwd+bwd / our best fwd + dx + dw"
    )
    print(
        common.table(
            ["convolution", "shape", "xla fwd", "xla dx", "xla dw", "dw / fwd"]
            + ["matmul fwd / dx / dw", "torch fwd", "torch fwd+bwd", "ratio"],
            rows,
        )
    )


if __name__ == "__main__":
    main()
