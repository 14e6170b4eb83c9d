"""Flax (Linen) models: backbones (ResNet, VGG-16), FPN neck, the RPN head and the RPN module."""

from jax_rpn.models.fpn import FPN
from jax_rpn.models.head import RPNHead, foreground_logit
from jax_rpn.models.norm import FrozenBatchNorm, make_norm
from jax_rpn.models.resnet import ResNet
from jax_rpn.models.rpn import (
    RPN,
    FlatOutputs,
    RPNOutput,
    build_rpn,
    flatten_outputs,
    init_variables,
)
from jax_rpn.models.vgg import VGG16

__all__ = [
    "FPN",
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
    "init_variables",
    "make_norm",
]
