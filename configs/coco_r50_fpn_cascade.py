"""mmdetection's Cascade RPN R50-FPN 1x on COCO 2017 (``cascade-rpn_r50-caffe_fpn_1x_coco``).

Settings from mmdetection's ``configs/cascade_rpn/cascade-rpn_r50-caffe_fpn_1x_coco.py`` (2.x:
``crpn_r50_caffe_fpn_1x_coco.py``) and ``mmdet/models/dense_heads/cascade_rpn_head.py``:

- one anchor per cell, ``scales=[8]``, ``ratios=[1.0]``, strides 4..64: sides 32..512;
- stage 1: ``AdaptiveConv(type='dilation', dilation=3)``, 256 channels, bridged features,
  ``RegionAssigner(center_ratio=0.2, ignore_ratio=0.5)``, no sampling, no classification,
  coder ``target_stds=(0.1, 0.1, 0.5, 0.5)``, ``IoULoss(linear=True, loss_weight=10.0)`` on
  decoded boxes;
- stage 2: ``AdaptiveConv(type='offset')`` on the refined anchors, ``MaxIoUAssigner(
  pos_iou_thr=0.7, neg_iou_thr=0.7, min_pos_iou=0.3)``, ``RandomSampler(num=256,
  pos_fraction=0.5)``, coder ``target_stds=(0.05, 0.05, 0.1, 0.1)``, sigmoid cross-entropy
  (weight 1) and ``IoULoss(linear=True, loss_weight=10.0)``;
- test: ``nms_pre=2000`` per level, ``max_per_img=2000``, NMS 0.8, ``min_bbox_size=0``;
- ``clip_grad max_norm=35``; the rest of ``rpn_r50-caffe_fpn_1x_coco`` (``schedule_1x.py``):
  SGD 0.02, batch 16, 12 epochs (7.33k steps each on COCO 2017 train) with x0.1 steps at
  epochs 8 and 11, 500 linear warm-up iterations.

Backbone, data and schedule as ``configs/coco_r50_fpn.py``. mmdetection reports AR@1000 72.0
for this config (``configs/cascade_rpn/README.md``); the Cascade RPN paper (Vu et al.,
NeurIPS 2019) 71.7 against 58.3 for the plain RPN.
"""

from configs import coco_r50_fpn


def get_config():
    c = coco_r50_fpn.get_config()
    c.model.head = "cascade"
    c.model.head_dim = 256  # feat_channels of both stages
    c.anchors.sizes = ((32,), (64,), (128,), (256,), (512,))  # scales=[8] x strides
    c.anchors.aspect_ratios = (1.0,)
    c.cascade.stage1_dilation = 3
    c.cascade.stage1_weights = (10.0, 10.0, 2.0, 2.0)
    c.cascade.stage1_box_weight = 10.0
    c.cascade.center_ratio = 0.2
    c.cascade.ignore_ratio = 0.5
    c.cascade.low_quality_min_iou = 0.3
    c.targets.high = 0.7
    c.targets.low = 0.7
    c.targets.allow_low_quality = True
    c.targets.num_samples = 256
    c.targets.positive_fraction = 0.5
    c.targets.weights = (20.0, 20.0, 10.0, 10.0)
    c.loss.box = "iou"
    c.loss.box_weight = 10.0
    c.proposals.pre_nms_topk_test = 2000
    c.proposals.post_nms_topk_test = 2000
    c.proposals.nms_threshold = 0.8
    c.proposals.min_size = 0.0
    c.optim.warmup_steps = 500
    c.optim.decay_steps = (58_600, 80_600)
    c.optim.grad_clip_norm = 35.0
    c.num_train_steps = 87_900
    return c
