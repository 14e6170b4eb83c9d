"""Tiny config for tests: 64x64 images, a narrow ResNet-18-FPN on three levels, a few steps."""

from configs import default


def get_config():
    c = default.get_config()
    c.data.name = "rpn_shapes/small"  # 96x128 images, 32 train / 12 validation
    c.data.short_side = 64
    c.data.max_size = 64
    c.data.pad_to = (64, 64)
    c.data.max_boxes = 8
    c.data.num_eval_images = 16
    c.model.width = 8
    c.model.fpn_dim = 16
    c.anchors.strides = (4, 8, 16, 32, 64)
    c.anchors.sizes = ((8,), (16,), (32,), (64,), (128,))
    c.targets.num_samples = 64
    c.proposals.pre_nms_topk_train = 200
    c.proposals.post_nms_topk_train = 100
    c.proposals.pre_nms_topk_test = 200
    c.proposals.post_nms_topk_test = 100
    c.optim.name = "sgd"
    c.optim.warmup_steps = 2
    c.batch_size = 8
    c.num_train_steps = 6
    c.log_every = 2
    c.eval_every = 1000
    c.checkpoint_every = 3
    c.num_vis_images = 2
    return c
