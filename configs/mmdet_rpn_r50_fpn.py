"""mmdetection's ``rpn_r50_fpn_1x_coco`` (configs/rpn/rpn_r50_fpn_1x_coco.py, mmdet 3.x).

The model exactly: ResNet-50 ``style='pytorch'`` (stride in the 3x3, torchvision's ImageNet
weights), FPN (256 channels, convolutions with bias, P6 a max-pool of P5: no extra convs),
RPNHead (one 3x3 conv + ReLU, 3 sigmoid anchors per cell); anchors ``scales=[8]`` x strides
4..64 = 32..512, ratios 0.5/1/2, not rounded, centred at i * stride (mmdet's AnchorGenerator,
the same numbers as detectron2's for one size per level); RGB input with ImageNet mean and
std. Training: MaxIoUAssigner 0.7 / 0.3, 256 samples, half positive, no border filter
(``allowed_border=-1``), L1 box loss; test: ``nms_pre`` 2000 per level, ``max_per_img``
1000, NMS 0.7, ``min_bbox_size`` 0. Schedule 1x: batch 16, SGD 0.02, momentum 0.9, weight
decay 1e-4, 500 warmup steps from 0.001x, 12 epochs with x0.1 at epochs 8 and 11;
``frozen_stages=1`` (stem and layer1 fixed).

Where jax_rpn differs: mmdet keeps BN statistics fixed (``norm_eval=True``) but trains BN's
scale and bias, jax_rpn's ``frozen_bn`` fixes both; mmdet's low-quality matches need IoU >= 0.3
(``min_pos_iou``), jax_rpn's any IoU. Weights: ``rpn_r50_fpn_1x_coco_*.pth`` from mmdet's model
zoo, or torchvision's ``resnet50`` for the backbone (docs/pretrained_weights.md).
"""

from configs import default

COCO_TRAIN_IMAGES = 117_266  # train2017 images with annotations (filter_empty_gt)


def get_config():
    c = default.get_config()
    c.data.name = "coco/2017"
    c.data.short_side = 800
    c.data.max_size = 1333
    c.data.pad_to = (800, 1344)  # landscape; portrait images go to 1344x800
    c.data.aspect_buckets = True  # as detectron2 groups images by aspect ratio
    c.data.max_boxes = 100
    c.model.backbone = "resnet50"
    c.model.width = 64
    c.model.norm = "frozen_bn"
    c.model.stride_in_1x1 = False
    c.model.freeze_at = 2  # frozen_stages=1: the stem and layer1
    c.model.fpn_dim = 256
    c.model.fpn_p6 = "maxpool"  # num_outs=5 without add_extra_convs
    c.model.head_convs = 1
    c.model.head_dim = 256
    c.anchors.sizes = ((32,), (64,), (128,), (256,), (512,))
    c.anchors.aspect_ratios = (0.5, 1.0, 2.0)
    c.anchors.convention = "detectron2"  # one size per level: mmdet's anchors exactly
    c.targets.high = 0.7
    c.targets.low = 0.3
    c.targets.num_samples = 256
    c.targets.positive_fraction = 0.5
    c.proposals.pre_nms_topk_train = 2000
    c.proposals.post_nms_topk_train = 1000
    c.proposals.pre_nms_topk_test = 2000  # nms_pre
    c.proposals.post_nms_topk_test = 1000  # max_per_img
    c.proposals.nms_threshold = 0.7
    c.proposals.min_size = 0.0
    c.loss.beta = 0.0  # L1Loss
    c.loss.box_weight = 1.0
    c.optim.name = "sgd"
    c.optim.learning_rate = 0.02
    c.optim.momentum = 0.9
    c.optim.weight_decay = 1e-4
    c.optim.warmup_steps = 500
    c.optim.schedule = "step"
    epoch = COCO_TRAIN_IMAGES // 16
    c.optim.decay_steps = (8 * epoch, 11 * epoch)
    c.optim.grad_clip_norm = None
    c.batch_size = 16
    c.num_train_steps = 12 * epoch
    c.log_every = 100
    c.eval_every = 10_000
    c.checkpoint_every = 5_000
    return c
