"""VGG-16 backbone up to conv5_3 (stride 16, no pool5): the Faster R-CNN paper's setting.

Torchvision's ``vgg16`` feature layers (configuration D): thirteen 3x3 convolutions with bias,
padding 1 and ReLU, 2x2 max-pools after conv1_2, conv2_2, conv3_3 and conv4_3; Kaiming-normal
(fan-out) initialisation. ``norm`` other than ``none`` adds a norm after each convolution, as
``vgg16_bn`` does. Images and features are NHWC.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jax_rpn.models.norm import check_norm, make_norm
from jax_rpn.models.pooling import max_pool
from jax_rpn.models.resnet import conv

# (number of convolutions, channels as a multiple of width) for conv1..conv5.
BLOCKS = ((2, 1), (2, 2), (3, 4), (3, 8), (3, 8))


def stage_of(name: str) -> int:
    """The block number 1..5 of a VGG-16 submodule (``conv3_2`` and ``norm3_2`` are in block 3);
    py-faster-rcnn trains VGG-16 with blocks 1 and 2 fixed."""
    if name.startswith(("conv", "norm")):
        return int(name[4:].split("_")[0])
    raise ValueError(f"{name!r} is not a VGG-16 submodule")


class VGG16(nn.Module):
    """VGG-16: images ``[B, H, W, C]`` -> ``{"conv5_3": [B, H / 16, W / 16, 8 * width]}``.

    Attributes:
      width: channels of conv1 (64 in the standard VGG-16).
      norm: ``none`` (the paper's VGG-16), ``frozen_bn``, ``batch_norm`` or ``group_norm``.
      axis_name: device axis for ``batch_norm`` statistics, or None.
      dtype: compute dtype; parameters are float32.
    """

    width: int = 64
    norm: str = "none"
    axis_name: str | None = None
    dtype: Any = jnp.float32

    @property
    def strides(self) -> dict[str, int]:
        """Stride of the returned feature: conv5_3 16."""
        return {"conv5_3": 16}

    @property
    def channels(self) -> dict[str, int]:
        """Channels of the returned feature."""
        return {"conv5_3": 8 * self.width}

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> dict[str, jax.Array]:
        """``x`` ``[B, H, W, C]`` -> ``{"conv5_3": [B, H / 16, W / 16, 8 * width]}``."""
        if self.width <= 0:
            raise ValueError(f"width must be > 0, got {self.width}")
        check_norm(self.norm)
        x = x.astype(self.dtype)
        for i, (num_convs, mult) in enumerate(BLOCKS, start=1):
            if i > 1:
                x = max_pool(x, (2, 2), (2, 2), ((0, 0), (0, 0)))
            for j in range(1, num_convs + 1):
                channels = mult * self.width
                x = conv(channels, 3, use_bias=True, dtype=self.dtype, name=f"conv{i}_{j}")(x)
                x = make_norm(
                    self.norm,
                    channels,
                    train=train,
                    axis_name=self.axis_name,
                    dtype=self.dtype,
                    name=f"norm{i}_{j}",
                )(x)
                x = nn.relu(x)
        return {"conv5_3": x}
