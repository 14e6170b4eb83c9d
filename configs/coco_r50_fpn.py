"""detectron2's RPN R50-FPN 1x on COCO 2017 (configs/COCO-Detection/rpn_R_50_FPN_1x.yaml).

The model exactly: MSRA ResNet-50 (stride in the 1x1 convolution, FrozenBN), FPN P2..P6
(convolutions with bias, P6 a max-pool of P5), StandardRPNHead (one 3x3 conv + ReLU), anchors
32..512 over P2..P6 x ratios 0.5/1/2 (detectron2's, not rounded, cell centres at i * stride);
BGR input in 0-255 with mean (103.53, 116.28, 123.675) subtracted, std 1. Pre-NMS top-k per
level 2000 (train) / 1000 (test), post-NMS per image 1000 / 2000, NMS 0.7, IoU 0.7 / 0.3, 256
samples, half positive, L1 box loss. Training from the ImageNet R-50.pkl
(``detectron2://ImageNetPretrained/MSRA/R-50.pkl``, converted with ``python -m
jax_rpn.interop``; stem and res2 frozen): batch 16, 90k steps, SGD 0.02 with 1k warmup and
steps at 60k/80k. Shorter side 800 (detectron2 samples 640..800 in training), longer side at
most 1333, padded to 800x1344 (landscape) or 1344x800 (portrait).
"""

from configs import default


def get_config():
    c = default.get_config()
    c.data.name = "coco/2017"
    c.data.short_side = 800
    c.data.max_size = 1333
    c.data.pad_to = (800, 1344)  # landscape; portrait images go to 1344x800
    c.data.aspect_buckets = True  # as detectron2 groups images by aspect ratio
    c.data.max_boxes = 100
    c.data.channel_order = "bgr"  # detectron2's INPUT.FORMAT: the MSRA weights see BGR
    c.data.pixel_mean = (103.53, 116.28, 123.675)  # MODEL.PIXEL_MEAN (BGR)
    c.data.pixel_std = (1.0, 1.0, 1.0)  # MODEL.PIXEL_STD: 0-255 input
    c.model.backbone = "resnet50"
    c.model.width = 64
    c.model.norm = "frozen_bn"  # detectron2: FrozenBN over ImageNet-pretrained weights
    c.model.stride_in_1x1 = True  # RESNETS.STRIDE_IN_1X1 (MSRA weights)
    c.model.freeze_at = 2  # BACKBONE.FREEZE_AT: stem and res2
    c.model.fpn_dim = 256
    c.model.head_convs = 1  # detectron2's StandardRPNHead: one shared 3x3 conv + ReLU
    c.model.head_dim = 256
    c.anchors.sizes = ((32,), (64,), (128,), (256,), (512,))
    c.proposals.pre_nms_topk_train = 2000
    c.proposals.post_nms_topk_train = 1000
    c.proposals.pre_nms_topk_test = 1000
    c.proposals.post_nms_topk_test = 2000  # rpn_R_50_FPN_1x.yaml: POST_NMS_TOPK_TEST 2000
    c.targets.high = 0.7
    c.proposals.nms_threshold = 0.7
    c.loss.box_weight = 1.0
    c.optim.name = "sgd"
    c.optim.learning_rate = 0.02
    c.optim.warmup_steps = 1000
    c.optim.schedule = "step"
    c.optim.decay_steps = (60_000, 80_000)
    c.optim.grad_clip_norm = None
    c.batch_size = 16
    c.num_train_steps = 90_000
    c.log_every = 100
    c.eval_every = 10_000
    c.checkpoint_every = 5_000
    return c
