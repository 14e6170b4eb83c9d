"""Flax (Linen) models: backbones (ResNet, VGG-16), FPN neck, the RPN head and the RPN module."""

from jax_rpn.models.fpn import FPN, P6_MODES
from jax_rpn.models.head import RPNHead, foreground_logit
from jax_rpn.models.norm import FrozenBatchNorm, make_norm
from jax_rpn.models.resnet import ResNet
from jax_rpn.models.rpn import (
    RPN,
    FlatOutputs,
    RPNOutput,
    build_rpn,
    flatten_outputs,
    frozen_parameters,
    init_variables,
    size_divisibility,
)
from jax_rpn.models.vgg import VGG16

__all__ = [
    "FPN",
    "P6_MODES",
    "RPN",
    "VGG16",
    "FlatOutputs",
    "FrozenBatchNorm",
    "RPNHead",
    "RPNOutput",
    "ResNet",
    "build_rpn",
    "flatten_outputs",
    "foreground_logit",
    "frozen_parameters",
    "init_variables",
    "make_norm",
    "size_divisibility",
]
