"""torchvision's ``fasterrcnn_resnet50_fpn`` RPN on COCO 2017 (torchvision.models.detection).

The model exactly: ResNet-50 (stride in the 3x3, FrozenBatchNorm2d), FPN P2..P6 (convolutions
with bias, P6 a max-pool of P5), RPNHead (one 3x3 conv + ReLU, 3 anchors per cell); anchors of
sizes 32..512 over P2..P6 x ratios 0.5/1/2, rounded and ratio-major, each level stepped
``image_size // feature_size`` per axis (torchvision's AnchorGenerator); RGB input normalised
with ImageNet's mean and std. RPN settings: pre-NMS top-n per level 2000 (train) / 1000
(test), post-NMS per image 2000 / 1000, NMS 0.7, boxes smaller than 1e-3 dropped, IoU
0.7 / 0.3 with low-quality matches, 256 samples per image, half positive, smooth-L1 beta 1/9.
Shorter side 800, longer side at most 1333, padded to a multiple of 32 (here a static
800x1344, or 1344x800 for portrait images). Training (references/detection, ImageNet
ResNet-50 backbone, ``trainable_backbone_layers=3``): batch 16, SGD 0.02, momentum 0.9,
weight decay 1e-4, 1000 warmup steps from 0.001x, 26 epochs with x0.1 at epochs 16 and 22.

Weights: ``fasterrcnn_resnet50_fpn(weights="DEFAULT")`` (COCO) or ``resnet50(weights=...)``
(ImageNet), converted by ``python -m jax_rpn.interop`` (docs/pretrained_weights.md). Where
jax_rpn differs: torchvision divides the RPN loss by the samples drawn, jax_rpn by 256 per
image (equal whenever 256 are drawn); proposals are ranked by logit, torchvision's by
float32 sigmoid (the same order except for ties among saturated scores).
"""

from configs import default

COCO_TRAIN_IMAGES = 117_266  # train2017 images with annotations (torchvision drops the rest)


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
    c.model.norm = "frozen_bn"  # FrozenBatchNorm2d under pretrained weights
    c.model.stride_in_1x1 = False  # torchvision's ResNet strides in the 3x3
    c.model.freeze_at = 2  # trainable_backbone_layers=3: conv1 and layer1 fixed
    c.model.fpn_dim = 256
    c.model.head_convs = 1
    c.model.head_dim = 256
    c.anchors.sizes = ((32,), (64,), (128,), (256,), (512,))
    c.anchors.aspect_ratios = (0.5, 1.0, 2.0)
    c.anchors.convention = "torchvision"
    c.targets.high = 0.7
    c.targets.low = 0.3
    c.targets.num_samples = 256
    c.targets.positive_fraction = 0.5
    c.proposals.pre_nms_topk_train = 2000
    c.proposals.post_nms_topk_train = 2000
    c.proposals.pre_nms_topk_test = 1000
    c.proposals.post_nms_topk_test = 1000
    c.proposals.nms_threshold = 0.7
    c.proposals.min_size = 1e-3
    c.loss.beta = 1.0 / 9.0
    c.loss.box_weight = 1.0
    c.optim.name = "sgd"
    c.optim.learning_rate = 0.02
    c.optim.momentum = 0.9
    c.optim.weight_decay = 1e-4
    c.optim.warmup_steps = 1000
    c.optim.schedule = "step"
    epoch = COCO_TRAIN_IMAGES // 16
    c.optim.decay_steps = (16 * epoch, 22 * epoch)
    c.optim.grad_clip_norm = None
    c.batch_size = 16
    c.num_train_steps = 26 * epoch
    c.log_every = 100
    c.eval_every = 10_000
    c.checkpoint_every = 5_000
    return c
