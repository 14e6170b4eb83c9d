"""Checkpoints in and out: torchvision, detectron2 and mmdet weights as jax_rpn variables.

```python
from jax_rpn import interop

variables, report = interop.from_torchvision("fasterrcnn_resnet50_fpn.pth", config)
variables, report = interop.from_detectron2("R-50.pkl", config)   # backbone only
variables, report = interop.from_mmdet("rpn_r50_fpn_1x_coco.pth", config)
variables, report = interop.load_checkpoint(path, config)          # format detected
state_dict = interop.to_torchvision(variables, config)             # and back
```

Each converter returns the ``{"params": ..., "batch_stats": ...}`` of what the file holds and
a :class:`LoadReport`; a key that is missing, unexpected or of the wrong shape raises
:class:`CheckpointMismatchError` listing them. Files never run code (``torch.load`` with
``weights_only=True``, pickles through a plain-data unpickler). ``python -m jax_rpn.interop``
converts once into a folder that ``config.init.checkpoint`` and ``jax_rpn.checkpoints``
read without torch. See ``docs/pretrained_weights.md``.
"""

from jax_rpn.interop.detectron2 import from_detectron2
from jax_rpn.interop.keymap import CheckpointMismatchError, LoadReport
from jax_rpn.interop.load import FORMATS, convert, detect_format, initialize, load_checkpoint
from jax_rpn.interop.mmdet import from_mmdet
from jax_rpn.interop.safe_load import CheckpointError, UnsafeCheckpointError
from jax_rpn.interop.torchvision import from_torchvision, to_torchvision

__all__ = [
    "FORMATS",
    "CheckpointError",
    "CheckpointMismatchError",
    "LoadReport",
    "UnsafeCheckpointError",
    "convert",
    "detect_format",
    "from_detectron2",
    "from_mmdet",
    "from_torchvision",
    "initialize",
    "load_checkpoint",
    "to_torchvision",
]
