"""The Faster R-CNN paper's RPN on PASCAL VOC 2007: VGG-16 conv5_3 at stride 16, anchors of
scales 128/256/512 and ratios 0.5/1/2 (py-faster-rcnn's generate_anchors), shorter side 600,
longer side at most 1000; lr 0.001 for 60k steps then 0.0001 for 20k, momentum 0.9, weight
decay 0.0005; 300 proposals at test; conv1 and conv2 fixed (py-faster-rcnn's VGG-16 prototxt).
The paper uses one image per step; we use two so the batch splits over 2 devices (set
batch_size=1 on one device for the exact setting). Start from ImageNet weights: torchvision's
``vgg16`` converts with ``python -m jax_rpn.interop`` (RGB input with ImageNet mean and std,
this config's pixels; py-faster-rcnn's Caffe VGG-16 took BGR 0-255 instead).
"""

from configs import default


def get_config():
    c = default.get_config()
    c.data.name = "voc/2007"
    c.data.eval_split = "test"
    c.data.short_side = 600
    c.data.max_size = 1000
    c.data.pad_to = (608, 1008)  # landscape; portrait images go to 1008x608
    c.data.aspect_buckets = True
    c.data.max_boxes = 64
    c.model.backbone = "vgg16"
    c.model.width = 64
    c.model.fpn = False
    c.model.norm = "none"  # the paper's VGG-16 has no normalisation
    c.model.freeze_at = 2  # conv1_* and conv2_* not trained
    c.model.head_convs = 1  # the paper's 3x3 "intermediate layer" + ReLU
    c.model.head_dim = 512
    c.anchors.strides = (16,)
    c.anchors.sizes = ((128, 256, 512),)
    c.anchors.convention = "py-faster-rcnn"
    c.proposals.pre_nms_topk_train = 12000
    c.proposals.post_nms_topk_train = 2000
    c.proposals.pre_nms_topk_test = 6000
    c.proposals.post_nms_topk_test = 300
    c.proposals.min_size = 16.0
    c.loss.beta = 1.0 / 9.0  # py-faster-rcnn's rpn smooth-L1 sigma 3
    c.targets.high = 0.7
    c.proposals.nms_threshold = 0.7
    c.loss.box_weight = 1.0
    c.optim.name = "sgd"
    c.optim.learning_rate = 0.001
    c.optim.weight_decay = 5e-4
    c.optim.warmup_steps = 0
    c.optim.schedule = "step"
    c.optim.decay_steps = (60_000,)
    c.optim.grad_clip_norm = None
    c.batch_size = 2
    c.num_train_steps = 80_000
    c.log_every = 100
    c.eval_every = 10_000
    c.checkpoint_every = 5_000
    return c
