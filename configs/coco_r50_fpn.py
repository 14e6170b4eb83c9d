"""detectron2's RPN R50-FPN 1x on COCO 2017 (configs/COCO-Detection/rpn_R_50_FPN_1x.yaml).

Anchors 32..512 over P2..P6, ratios 0.5/1/2; batch 16, 90k steps, SGD 0.02 with 1k warmup
and steps at 60k/80k; shorter side 800, longer side at most 1333, padded to 1344x1344.
"""

from configs import default


def get_config():
    c = default.get_config()
    c.data.name = "coco/2017"
    c.data.short_side = 800
    c.data.max_size = 1333
    c.data.pad_to = (1344, 1344)
    c.data.max_boxes = 100
    c.model.backbone = "resnet50"
    c.model.width = 64
    c.model.norm = "frozen_bn"  # detectron2: FrozenBN over ImageNet-pretrained weights
    c.model.fpn_dim = 256
    c.model.head_convs = 1  # detectron2's StandardRPNHead: one shared 3x3 conv + ReLU
    c.model.head_dim = 256
    c.anchors.sizes = ((32,), (64,), (128,), (256,), (512,))
    c.proposals.pre_nms_topk_train = 2000
    c.proposals.post_nms_topk_train = 1000
    c.proposals.pre_nms_topk_test = 1000
    c.proposals.post_nms_topk_test = 1000
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
