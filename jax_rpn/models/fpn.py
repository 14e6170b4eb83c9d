"""Feature Pyramid Network neck: C2..C5 -> P2..P6, in the layouts of torchvision, detectron2
and mmdet (RPN settings).

For each of C2..C5 a lateral 1x1 convolution and an output 3x3 convolution (``c2_xavier_fill``
initialisation: Kaiming-uniform with ``a = 1``). Without a norm both have a bias (torchvision's
``fasterrcnn_resnet50_fpn``, detectron2, mmdet); with one (``norm``, e.g. torchvision's
``fasterrcnn_resnet50_fpn_v2``, which has BatchNorm there) each convolution is followed by it
and has no bias. Top-down: the merged map of the level above is upsampled x2 (nearest) and
added to the lateral; the output convolution of the merged map gives P_l.

P6 (``p6``):
- ``maxpool``: P5 max-pooled with kernel 1 and stride 2, i.e. every other row and column of
  P5, ``ceil(H5 / 2)`` rows (torchvision's and detectron2's ``LastLevelMaxPool``, mmdet's
  default ``add_extra_convs=False``);
- ``conv_p5``: a 3x3 stride-2 convolution (+ norm) of P5 (mmdet ``add_extra_convs='on_output'``);
- ``conv_c5``: the same convolution of C5 (mmdet ``'on_input'``, RetinaNet's P6).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jax_rpn.models.norm import check_norm, make_norm
from jax_rpn.models.resnet import LEVELS, conv

OUT_LEVELS = ("P2", "P3", "P4", "P5", "P6")
P6_MODES = ("maxpool", "conv_p5", "conv_c5")
XAVIER_FILL = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")


class FPN(nn.Module):
    """FPN neck: ``{C2..C5: [B, H / s, W / s, C_l]}`` -> ``{P2..P6: [B, H / s, W / s, dim]}``.

    Attributes:
      dim: channels of every output level (256 in the peers).
      norm: norm after each convolution (``jax_rpn.models.norm``); ``none``: convolutions
        with bias.
      p6: how P6 is made: ``maxpool``, ``conv_p5`` or ``conv_c5`` (see the module docstring).
      axis_name: device axis for ``batch_norm`` statistics, or None.
      dtype: compute dtype; parameters are float32.
    """

    dim: int = 256
    norm: str = "none"
    p6: str = "maxpool"
    axis_name: str | None = None
    dtype: Any = jnp.float32

    @property
    def strides(self) -> dict[str, int]:
        """Stride of each output level: P2 4, P3 8, P4 16, P5 32, P6 64."""
        return {name: 2 ** int(name[1]) for name in OUT_LEVELS}

    @property
    def channels(self) -> dict[str, int]:
        """Channels of each output level."""
        return dict.fromkeys(OUT_LEVELS, self.dim)

    @nn.compact
    def __call__(self, features: dict[str, jax.Array], *, train: bool = False) -> dict:
        """C2..C5 (each level twice the size of the next) -> P2..P6.

        ``train`` selects batch statistics for a ``batch_norm`` norm; others ignore it.
        """
        if self.dim <= 0:
            raise ValueError(f"dim must be > 0, got {self.dim}")
        check_norm(self.norm)
        if self.p6 not in P6_MODES:
            raise ValueError(f"p6 must be one of {P6_MODES}, got {self.p6!r}")
        if set(features) != set(LEVELS):
            raise ValueError(f"features must have keys {LEVELS}, got {tuple(features)}")

        def conv_norm(x, kernel, name, stride=1):
            x = conv(
                self.dim,
                kernel,
                stride,
                use_bias=self.norm == "none",
                dtype=self.dtype,
                kernel_init=XAVIER_FILL,
                name=name,
            )(x.astype(self.dtype))
            return make_norm(
                self.norm,
                self.dim,
                train=train,
                axis_name=self.axis_name,
                dtype=self.dtype,
                name=f"{name}_norm",
            )(x)

        outputs = {}
        merged = None
        for level in (5, 4, 3, 2):
            x = conv_norm(features[f"C{level}"], 1, f"lateral{level}")
            if merged is not None:
                if x.shape[1:3] != (2 * merged.shape[1], 2 * merged.shape[2]):
                    raise ValueError(
                        f"C{level} has spatial size {x.shape[1:3]}, expected twice that of "
                        f"C{level + 1} {merged.shape[1:3]}: the image size must be divisible by 32"
                    )
                x = x + jnp.repeat(jnp.repeat(merged, 2, axis=1), 2, axis=2)  # nearest x2
            merged = x
            outputs[f"P{level}"] = conv_norm(merged, 3, f"output{level}")
        if self.p6 == "maxpool":
            outputs["P6"] = outputs["P5"][:, ::2, ::2]  # max-pool, kernel 1, stride 2
        else:
            source = outputs["P5"] if self.p6 == "conv_p5" else features["C5"]
            outputs["P6"] = conv_norm(source, 3, "p6", stride=2)
        return {name: outputs[name] for name in OUT_LEVELS}
