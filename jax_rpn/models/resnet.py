"""ResNet-18/34/50/101 backbones returning the stage outputs C2..C5 (strides 4..32).

Torchvision's "v1.5" layout by default: the stride of a bottleneck block is in its 3x3
convolution. ``stride_in_1x1=True`` puts it in the first 1x1 convolution instead, as MSRA's
original ResNets (detectron2's ``RESNETS.STRIDE_IN_1X1``, its default, and mmdet's
``style='caffe'``): their ImageNet weights need it. The shortcut is a strided 1x1 convolution +
norm where the shape changes, convolutions before a norm have no bias, and the padding is
torchvision's and detectron2's (7x7 pad 3, 3x3 max-pool pad 1, 3x3 pad 1) so that pretrained
weights give the same numbers. Kaiming-normal (fan-out) initialisation, as torchvision and
detectron2 (``c2_msra_fill``). Images and features are NHWC.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jax_rpn.models.norm import check_norm, make_norm
from jax_rpn.models.pooling import max_pool

LEVELS = ("C2", "C3", "C4", "C5")
STAGES = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}
KAIMING_FAN_OUT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv(
    features: int,
    kernel: int,
    stride: int = 1,
    *,
    use_bias: bool,
    dtype: Any,
    name: str,
    kernel_init=KAIMING_FAN_OUT,
    conv_general_dilated=None,
) -> nn.Conv:
    """A ``kernel x kernel`` convolution with torchvision's symmetric ``kernel // 2`` padding;
    a 1x1 one runs as a matmul (``conv_1x1_as_matmul``). ``conv_general_dilated`` replaces
    that default (the stem's ``conv_rgb_padded``)."""
    pad = kernel // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=stride,
        padding=((pad, pad), (pad, pad)),
        use_bias=use_bias,
        kernel_init=kernel_init,
        dtype=dtype,
        param_dtype=jnp.float32,
        conv_general_dilated=conv_general_dilated or conv_1x1_as_matmul,
        name=name,
    )


def conv_1x1_as_matmul(lhs, rhs, window_strides, padding, **kwargs) -> jax.Array:
    """``lax.conv_general_dilated`` for ``nn.Conv`` (NHWC images, HWIO kernel), where an
    unpadded, undilated, ungrouped 1x1 kernel becomes a strided slice and one matmul:
    ``[B, H, W, C] -> [B, H / s, W / s, O]``, the same numbers. XLA's CPU convolution is up to
    several times slower than its matmul on 1x1 kernels, forward and backward; the bottleneck
    blocks and the FPN's lateral convolutions are 1x1 (the R50-FPN train step, before and after:
    ``benchmarks/README.md``). Every other convolution goes to ``lax.conv_general_dilated``."""
    undilated = all(
        d is None or all(v == 1 for v in d)
        for d in (kwargs.get("lhs_dilation"), kwargs.get("rhs_dilation"))
    )
    channels_last = kwargs["dimension_numbers"].lhs_spec[1] == lhs.ndim - 1
    if (
        rhs.shape[:-2] == (1, 1)
        and lhs.ndim == 4
        and channels_last
        and undilated
        and kwargs.get("feature_group_count", 1) == 1
        and all(p == (0, 0) for p in padding)
    ):
        sy, sx = window_strides
        x = lhs[:, ::sy, ::sx]  # [B, H / s, W / s, C]
        # As a 2-D matmul: XLA's kernel gradient of a dot over [B, H, W] rows is 1.5x to 5x
        # slower than over [B * H * W] rows (benchmarks/README.md).
        y = lax.dot_general(
            x.reshape(-1, x.shape[-1]),  # [B * H / s * W / s, C]
            rhs[0, 0],
            (((1,), (0,)), ((), ())),
            precision=kwargs.get("precision"),
        )
        return y.reshape(*x.shape[:-1], y.shape[-1])  # [B, H / s, W / s, O]
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs)


def conv_rgb_padded(lhs, rhs, window_strides, padding, **kwargs) -> jax.Array:
    """``lax.conv_general_dilated`` for a narrow stem: when a 3-channel image meets fewer than
    64 output channels, the forward pass gives the image a fourth, zero channel (and the kernel
    a zero input row), the same numbers. XLA's CPU convolution (YNNPACK) takes a slow path for
    the 7x7 stride-2 stem with 3 input channels and 24 or 32 outputs, 4x slower than with 4
    input channels; with 64 outputs (the standard ResNets) the 3 channels are faster
    (``benchmarks/README.md``). The gradients are the unpadded convolution's."""

    def convolve(x, w):
        return lax.conv_general_dilated(x, w, window_strides, padding, **kwargs)

    spec = kwargs["dimension_numbers"]
    lhs_in, rhs_in = spec.lhs_spec[1], spec.rhs_spec[1]  # the input-channel dimensions
    narrow = rhs.shape[spec.rhs_spec[0]] < 64
    if lhs.shape[lhs_in] != 3 or not narrow or kwargs.get("feature_group_count", 1) != 1:
        return convolve(lhs, rhs)

    def one_more(a, dim):
        return jnp.pad(a, [(0, int(d == dim)) for d in range(a.ndim)])

    @jax.custom_vjp
    def padded(x, w):
        return convolve(one_more(x, lhs_in), one_more(w, rhs_in))  # 4 input channels

    def padded_fwd(x, w):
        return padded(x, w), (x, w)

    def padded_bwd(residuals, g):
        return jax.vjp(convolve, *residuals)[1](g)

    padded.defvjp(padded_fwd, padded_bwd)
    return padded(lhs, rhs)


def stage_of(name: str) -> int:
    """detectron2's stage number of a top-level ResNet submodule: 1 for the stem (``conv1``,
    ``norm1``), 2..5 for the blocks ``layer1_*`` .. ``layer4_*`` (res2..res5)."""
    if name in ("conv1", "norm1"):
        return 1
    if name.startswith("layer"):
        return int(name[len("layer") :].split("_")[0]) + 1
    raise ValueError(f"{name!r} is not a ResNet submodule")


class _Block(nn.Module):
    """Residual block: ``basic`` (3x3 with the stride, 3x3; out = features) or ``bottleneck``
    (1x1, 3x3, 1x1; out = 4 * features; the stride in the 3x3, or in the first 1x1 when
    ``stride_in_1x1``)."""

    kind: str
    features: int
    stride: int
    stride_in_1x1: bool
    norm: str
    axis_name: str | None
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        bias = self.norm == "none"
        layer = functools.partial(conv, use_bias=bias, dtype=self.dtype)
        norm = functools.partial(
            make_norm, self.norm, train=train, axis_name=self.axis_name, dtype=self.dtype
        )
        if self.kind == "basic":
            out = self.features
            y = layer(out, 3, self.stride, name="conv1")(x)
            y = nn.relu(norm(out, name="norm1")(y))
            y = layer(out, 3, name="conv2")(y)
            y = norm(out, name="norm2")(y)
        else:
            out = 4 * self.features
            stride_1x1, stride_3x3 = (self.stride, 1) if self.stride_in_1x1 else (1, self.stride)
            y = layer(self.features, 1, stride_1x1, name="conv1")(x)
            y = nn.relu(norm(self.features, name="norm1")(y))
            y = layer(self.features, 3, stride_3x3, name="conv2")(y)
            y = nn.relu(norm(self.features, name="norm2")(y))
            y = layer(out, 1, name="conv3")(y)
            y = norm(out, name="norm3")(y)
        if self.stride != 1 or x.shape[-1] != out:
            x = layer(out, 1, self.stride, name="downsample_conv")(x)
            x = norm(out, name="downsample_norm")(x)
        return nn.relu(x + y)


class ResNet(nn.Module):
    """ResNet backbone: images ``[B, H, W, C]`` -> ``{name: [B, H / s, W / s, channels]}``.

    Attributes:
      depth: 18, 34, 50 or 101.
      width: channels of the stem and of the first stage (64 in the standard ResNet); stage k
        has ``width * 2**k`` (basic) or ``4 * width * 2**k`` (bottleneck) output channels.
      norm: ``frozen_bn``, ``batch_norm``, ``group_norm`` or ``none`` (see ``models.norm``).
      out_features: which of C2..C5 to return, in order; stages after the last one are not
        built (``("C4",)`` is detectron2's R50-C4 RPN backbone, stride 16).
      stride_in_1x1: bottleneck blocks stride in their first 1x1 convolution (MSRA / Caffe2
        weights) instead of the 3x3 (torchvision); basic blocks ignore it.
      axis_name: device axis for ``batch_norm`` statistics (e.g. ``'data'``), or None.
      dtype: compute dtype; parameters are float32.
    """

    depth: int = 50
    width: int = 64
    norm: str = "frozen_bn"
    out_features: tuple[str, ...] = LEVELS
    stride_in_1x1: bool = False
    axis_name: str | None = None
    dtype: Any = jnp.float32

    @property
    def strides(self) -> dict[str, int]:
        """Stride of each returned feature: C2 4, C3 8, C4 16, C5 32."""
        self._check()
        return {name: 2 ** int(name[1]) for name in self.out_features}

    @property
    def channels(self) -> dict[str, int]:
        """Channels of each returned feature."""
        self._check()
        expansion = 1 if STAGES[self.depth][0] == "basic" else 4
        return {
            name: expansion * self.width * 2 ** (int(name[1]) - 2) for name in self.out_features
        }

    def _check(self):
        if self.depth not in STAGES:
            raise ValueError(f"depth must be one of {tuple(STAGES)}, got {self.depth}")
        if self.width <= 0:
            raise ValueError(f"width must be > 0, got {self.width}")
        check_norm(self.norm)
        out = tuple(self.out_features)
        if not out or tuple(n for n in LEVELS if n in out) != out:
            raise ValueError(f"out_features must be an ordered subset of {LEVELS}, got {out}")

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> dict[str, jax.Array]:
        """``x`` ``[B, H, W, C]`` -> dict of ``out_features``, ``[B, H / s, W / s, channels]``."""
        self._check()
        kind, blocks = STAGES[self.depth]
        bias = self.norm == "none"
        x = conv(
            self.width,
            7,
            2,
            use_bias=bias,
            dtype=self.dtype,
            name="conv1",
            conv_general_dilated=conv_rgb_padded,
        )(x.astype(self.dtype))
        x = make_norm(
            self.norm,
            self.width,
            train=train,
            axis_name=self.axis_name,
            dtype=self.dtype,
            name="norm1",
        )(x)
        x = max_pool(nn.relu(x), (3, 3), (2, 2), ((1, 1), (1, 1)))
        outputs = {}
        last = LEVELS.index(self.out_features[-1])
        for stage in range(last + 1):
            for b in range(blocks[stage]):
                x = _Block(
                    kind=kind,
                    features=self.width * 2**stage,
                    stride=2 if stage > 0 and b == 0 else 1,
                    stride_in_1x1=self.stride_in_1x1,
                    norm=self.norm,
                    axis_name=self.axis_name,
                    dtype=self.dtype,
                    name=f"layer{stage + 1}_{b}",
                )(x, train=train)
            if LEVELS[stage] in self.out_features:
                outputs[LEVELS[stage]] = x
        return outputs
