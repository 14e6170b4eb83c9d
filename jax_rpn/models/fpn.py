"""Feature Pyramid Network neck: C2..C5 -> P2..P6 in detectron2's layout (RPN setting).

For each of C2..C5 a lateral 1x1 convolution and an output 3x3 convolution (both with bias, no
norm, ``c2_xavier_fill`` initialisation: Kaiming-uniform with ``a = 1``). Top-down: the merged
map of the level above is upsampled x2 (nearest) and added to the lateral; the output
convolution of the merged map gives P_l. P6 is P5 max-pooled with kernel 1 and stride 2
(detectron2's ``LastLevelMaxPool``), i.e. every other row and column of P5.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jax_rpn.models.resnet import LEVELS, conv

OUT_LEVELS = ("P2", "P3", "P4", "P5", "P6")
XAVIER_FILL = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")


class FPN(nn.Module):
    """FPN neck: ``{C2..C5: [B, H / s, W / s, C_l]}`` -> ``{P2..P6: [B, H / s, W / s, dim]}``.

    Attributes:
      dim: channels of every output level (256 in detectron2).
      dtype: compute dtype; parameters are float32.
    """

    dim: int = 256
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
    def __call__(self, features: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """C2..C5 (each level twice the size of the next) -> P2..P6."""
        if self.dim <= 0:
            raise ValueError(f"dim must be > 0, got {self.dim}")
        if set(features) != set(LEVELS):
            raise ValueError(f"features must have keys {LEVELS}, got {tuple(features)}")
        outputs = {}
        merged = None
        for level in (5, 4, 3, 2):
            c = features[f"C{level}"]
            x = conv(
                self.dim,
                1,
                use_bias=True,
                dtype=self.dtype,
                kernel_init=XAVIER_FILL,
                name=f"lateral{level}",
            )(c.astype(self.dtype))
            if merged is not None:
                if x.shape[1:3] != (2 * merged.shape[1], 2 * merged.shape[2]):
                    raise ValueError(
                        f"C{level} has spatial size {x.shape[1:3]}, expected twice that of "
                        f"C{level + 1} {merged.shape[1:3]}: the image size must be divisible by 32"
                    )
                x = x + jnp.repeat(jnp.repeat(merged, 2, axis=1), 2, axis=2)  # nearest x2
            merged = x
            outputs[f"P{level}"] = conv(
                self.dim,
                3,
                use_bias=True,
                dtype=self.dtype,
                kernel_init=XAVIER_FILL,
                name=f"output{level}",
            )(merged)
        outputs["P6"] = outputs["P5"][:, ::2, ::2]  # max-pool, kernel 1, stride 2
        return {name: outputs[name] for name in OUT_LEVELS}
