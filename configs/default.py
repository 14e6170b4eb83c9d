"""Default config: ResNet-18-FPN (narrow) RPN on the embedded synthetic shapes data, CPU-sized."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """Every field the package reads, with its default; variants change only what differs."""
    c = ml_collections.ConfigDict()
    c.seed = 0  # parameter init, data order, flips and sampling

    # Data (jax_rpn.data).
    c.data = ml_collections.ConfigDict()
    c.data.name = "rpn_shapes"  # tfds builder name: rpn_shapes, voc/2007, voc/2012, coco/2017
    c.data.data_dir = ml_collections.config_dict.placeholder(str)  # None = tfds default
    c.data.train_split = "train"  # tfds split expression, e.g. "train+validation"
    c.data.eval_split = "validation"  # split whose proposal recall is reported
    c.data.short_side = 256  # resize so the shorter side is this ...
    c.data.max_size = 256  # ... unless the longer side would pass this
    c.data.pad_to = (256, 256)  # static padded image size (H, W), divisible by the largest stride
    c.data.max_boxes = 16  # padded ground-truth slots per image
    c.data.hflip = True  # random horizontal flips in training
    c.data.ignore_difficult = True  # VOC "difficult" / COCO crowd: ignored in targets and recall
    c.data.num_workers = 0  # grain worker processes (0 = in-process)
    c.data.num_eval_images = ml_collections.config_dict.placeholder(int)  # None: whole split
    # Model input: channels in this order (rgb: torchvision's weights; bgr: Caffe2/detectron2
    # MSRA weights), then (pixel - mean) / std per channel in that order, in 0-255 units.
    c.data.channel_order = "rgb"
    c.data.pixel_mean = (123.675, 116.28, 103.53)  # ImageNet (RGB)
    c.data.pixel_std = (58.395, 57.12, 57.375)  # Caffe2 weights: (1.0, 1.0, 1.0)

    # Model (jax_rpn.models).
    c.model = ml_collections.ConfigDict()
    c.model.backbone = "resnet18"  # resnet18/34/50/101, vgg16
    c.model.width = 32  # channels of the first stage (64 in the standard ResNet)
    # From scratch (no pretrained weights here), so real batch statistics; frozen_bn is for
    # pretrained backbones. Options: frozen_bn, batch_norm (cross-device), group_norm, none.
    c.model.norm = "batch_norm"
    c.model.fpn = True  # FPN P2..P6 (ResNet); False: C4 (ResNet) or conv5_3 (VGG-16), stride 16
    c.model.fpn_dim = 64  # FPN channels (256 in detectron2)
    # The 1x1 predictors sit directly on the FPN outputs (the FPN already ends in a 3x3 conv):
    # the same recall as detectron2's extra 3x3 conv + ReLU here, in a 1.2x shorter step
    # (benchmarks/README.md, "A cheaper head, measured"). Peer configs set head_convs = 1.
    c.model.head_convs = 0
    c.model.head_dim = ml_collections.config_dict.placeholder(int)  # 3x3 conv channels; None: input
    c.model.objectness = "sigmoid"  # sigmoid (A logits per cell) or softmax (2A)
    c.model.dtype = "float32"  # compute dtype: float32 or bfloat16 (parameters and losses stay f32)

    # Anchors (jax_rpn.anchors): one entry of sizes per level.
    c.anchors = ml_collections.ConfigDict()
    c.anchors.strides = (4, 8, 16, 32, 64)  # must equal the feature strides of the model
    # Three sizes per level, an octave apart in thirds (2^0, 2^1/3, 2^2/3 as RetinaNet), x 3
    # ratios: A = 9. One size per level leaves 77% of the shapes data's boxes below IoU 0.7
    # with every anchor (python -m jax_rpn.coverage).
    c.anchors.sizes = tuple(
        tuple(round(s * 2 ** (i / 3)) for i in range(3)) for s in (16, 32, 64, 128, 256)
    )
    c.anchors.aspect_ratios = (0.5, 1.0, 2.0)  # h / w; one tuple shared, or one per level
    c.anchors.offset = 0.0  # cell centre offset in strides (detectron2 0.0, some use 0.5)
    c.anchors.convention = "detectron2"  # detectron2, torchvision or py-faster-rcnn (anchors.py)

    # Targets (jax_rpn.matching, jax_rpn.sampling, jax_rpn.boxes).
    c.targets = ml_collections.ConfigDict()
    c.targets.high = 0.6  # detectron2: 0.7; 0.6 gives ~2.7x the positives, faster learning here
    c.targets.low = 0.3  # IoU below this: negative; between low and high: ignored
    c.targets.allow_low_quality = True  # each GT's best anchors (ties included) are positive
    c.targets.num_samples = 256  # anchors sampled per image for the losses
    c.targets.positive_fraction = 0.5  # at most this fraction of the samples positive
    c.targets.weights = (1.0, 1.0, 1.0, 1.0)  # box coder (wx, wy, ww, wh); proposals decode with it
    # Anchors crossing the image border by more than this many pixels are ignored (py-faster-rcnn:
    # 0); None keeps them all (detectron2, torchvision).
    c.targets.border = ml_collections.config_dict.placeholder(float)
    # Background anchors covered by an ignored (crowd / difficult) box over at least this
    # fraction of their area become "ignore" (detectron2 has no such rule; mmdet's ignore_iof_thr).
    c.targets.ignore_iof = ml_collections.config_dict.placeholder(float)

    # Losses (jax_rpn.losses).
    c.loss = ml_collections.ConfigDict()
    c.loss.box = "smooth_l1"  # smooth_l1, giou
    c.loss.beta = 0.0  # smooth-L1 beta (0 = L1), detectron2's RPN default
    c.loss.box_weight = 2.0  # loss = objectness + box_weight * box

    # Proposals (jax_rpn.proposals).
    c.proposals = ml_collections.ConfigDict()
    c.proposals.pre_nms_topk_train = 2000  # per level, before NMS (training-mode proposals)
    c.proposals.post_nms_topk_train = 1000  # per image, after NMS
    c.proposals.pre_nms_topk_test = 1000  # per level, before NMS (evaluation, predict)
    c.proposals.post_nms_topk_test = 1000  # K, proposals per image
    c.proposals.nms_threshold = 0.65  # detectron2: 0.7; only proposals (eval) use it here
    c.proposals.min_size = 0.0  # boxes with a side <= this (pixels) are dropped

    # Optimisation (jax_rpn.training).
    c.optim = ml_collections.ConfigDict()
    c.optim.name = "adamw"  # sgd (momentum) or adamw; AdamW learns faster from scratch
    c.optim.learning_rate = 0.002  # peak, after warmup
    c.optim.momentum = 0.9  # sgd only
    c.optim.weight_decay = 1e-4  # not applied to norms and biases
    c.optim.warmup_steps = 50  # linear warmup from 0.001 x learning_rate
    c.optim.schedule = "cosine"  # cosine, step or constant
    c.optim.decay_steps = ()  # step boundaries for schedule="step"
    c.optim.decay_factor = 0.1  # schedule="step": learning rate x this at each boundary
    c.optim.grad_clip_norm = 10.0  # None = no clipping

    # Loop (jax_rpn.training).
    c.batch_size = 8  # global, divided over devices
    c.num_train_steps = 1600  # the schedule's length; more steps in a workdir train on
    c.log_every = 50  # steps between logged (averaged) training metrics
    c.eval_every = 1600  # steps between recall evaluations (and one at the end)
    c.checkpoint_every = 250  # steps between checkpoints (and one at the end)
    c.keep_checkpoints = 2  # latest checkpoints kept in <workdir>/checkpoints
    c.parallelism = "shard_map"  # shard_map or pmap
    c.num_vis_images = 4  # eval images drawn with their top proposals
    return c.lock()  # variants may change these fields but not add new ones (typos fail)
