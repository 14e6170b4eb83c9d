"""Cascade RPN on the embedded shapes data: ``configs/default.py`` with ``model.head = "cascade"``.

Only what the cascade head needs differs from the default: one square anchor per cell (the
default's smallest size per level, 16..256 px, i.e. mmdetection's ``scales=[8]`` halved for
these small images), stage 2 matched at IoU 0.7 / 0.7 with the coder weights (20, 20, 10, 10)
and IoU loss of weight 10, as mmdetection's ``cascade-rpn_r50-caffe_fpn_1x_coco`` (see
``configs/coco_r50_fpn_cascade.py``).
"""

from configs import default


def get_config():
    c = default.get_config()
    c.model.head = "cascade"
    c.model.head_dim = 32  # both stages' 3x3 convs; 64 (the FPN's width) makes the step 1.57x
    c.anchors.sizes = ((16,), (32,), (64,), (128,), (256,))
    c.anchors.aspect_ratios = (1.0,)
    c.targets.high = 0.7
    c.targets.low = 0.7
    c.targets.weights = (20.0, 20.0, 10.0, 10.0)
    c.loss.box = "iou"
    c.loss.box_weight = 10.0
    return c
