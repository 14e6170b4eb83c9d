"""Data: the embedded synthetic shapes dataset (tfds) and the grain input pipeline."""

from jax_rpn.data.augment import denormalize, normalize
from jax_rpn.data.pipeline import (
    DatasetInfo,
    create_eval_iterator,
    create_train_iterator,
    dataset_info,
    decode_example,
)
from jax_rpn.data.shapes import CLASS_NAMES, ensure_prepared, render_example

__all__ = [
    "CLASS_NAMES",
    "DatasetInfo",
    "create_eval_iterator",
    "create_train_iterator",
    "dataset_info",
    "decode_example",
    "denormalize",
    "normalize",
    "ensure_prepared",
    "render_example",
]
