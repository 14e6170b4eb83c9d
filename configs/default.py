"""Default config: ResNet-18-FPN (narrow) RPN on the embedded synthetic shapes data, CPU-sized."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """Every field the package reads, with its default; variants change only what differs."""
    c = ml_collections.ConfigDict()
    c.seed = 0  # parameter init, data order, flips and sampling

    # Data (jax_rpn.data).
    c.data = ml_collections.ConfigDict()
    # tfds builder name: rpn_shapes, voc/2007, voc/2012, coco/2017, or users' own data:
    # coco_json, voc_folder (jax_rpn.data.user_datasets; prepared on first use, or with
    # `python -m jax_rpn.data.prepare`).
    c.data.name = "rpn_shapes"
    c.data.data_dir = ml_collections.config_dict.placeholder(str)  # None = tfds default
    # tfds split expressions, e.g. "train+validation", "train[:90%]"; voc_folder: names of
    # ImageSets/Main files (trainval, test). eval_split is the split whose recall is reported.
    c.data.train_split = "train"
    c.data.eval_split = "validation"
    # coco_json: the COCO JSON of split "train" and the folder its file_names are relative to,
    # and (optional) the same for split "validation".
    c.data.train_annotations = ml_collections.config_dict.placeholder(str)
    c.data.train_images = ml_collections.config_dict.placeholder(str)
    c.data.eval_annotations = ml_collections.config_dict.placeholder(str)
    c.data.eval_images = ml_collections.config_dict.placeholder(str)
    # voc_folder: the folder holding Annotations/, JPEGImages/ and ImageSets/Main/.
    c.data.voc_root = ml_collections.config_dict.placeholder(str)
    c.data.short_side = 256  # resize so the shorter side is this ...
    c.data.max_size = 256  # ... unless the longer side would pass this
    c.data.pad_to = (256, 256)  # static padded image size (H, W), divisible by the largest stride
    # Also pad to the transpose of pad_to: landscape and portrait buckets, each batch from one,
    # one compile each (jax_rpn/data/buckets.py); e.g. pad_to (800, 1344) for COCO.
    c.data.aspect_buckets = False
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
    # ResNet bottlenecks stride in their first 1x1 conv: MSRA/Caffe2 weights (detectron2's
    # STRIDE_IN_1X1, its default; mmdet style='caffe'). False: in the 3x3 (torchvision, mmdet).
    c.model.stride_in_1x1 = False
    # Backbone stages whose parameters are not trained (detectron2's FREEZE_AT): 0 none, 1 the
    # stem, 2 stem + res2 (the peers' fine-tuning default), ..., 5 all; VGG-16: its first blocks.
    c.model.freeze_at = 0
    c.model.fpn = True  # FPN P2..P6 (ResNet); False: C4 (ResNet) or conv5_3 (VGG-16), stride 16
    c.model.fpn_dim = 64  # FPN channels (256 in detectron2)
    c.model.fpn_norm = "none"  # norm after each FPN conv (torchvision's _v2 has BN there)
    # P6: maxpool (every other P5 cell: torchvision, detectron2, mmdet's RPN), conv_p5 or conv_c5
    # (a 3x3 stride-2 conv of P5 or C5: mmdet add_extra_convs='on_output' / 'on_input').
    c.model.fpn_p6 = "maxpool"
    # The 1x1 predictors sit directly on the FPN outputs (the FPN already ends in a 3x3 conv):
    # the same recall as detectron2's extra 3x3 conv + ReLU here, in a 1.2x shorter step
    # (benchmarks/README.md, "A cheaper head, measured"). Peer configs set head_convs = 1.
    c.model.head_convs = 0
    c.model.head_dim = ml_collections.config_dict.placeholder(int)  # 3x3 conv channels; None: input
    c.model.objectness = "sigmoid"  # sigmoid (A logits per cell) or softmax (2A)
    # standard: the RPN head above. cascade: Cascade RPN (jax_rpn.models.cascade_head), two
    # stages on one anchor size per level (anchors.sizes), one aspect ratio as the paper or
    # several (A anchors per cell), head_dim channels in both stages' 3x3 convolutions;
    # settings in c.cascade below.
    c.model.head = "standard"
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
    c.loss.box = "smooth_l1"  # smooth_l1, giou, iou
    c.loss.beta = 0.0  # smooth-L1 beta (0 = L1), detectron2's RPN default
    c.loss.box_weight = 2.0  # loss = objectness + box_weight * box

    # Cascade RPN (model.head = "cascade"; jax_rpn.cascade_objective). Stage 2 is matched,
    # sampled and encoded with c.targets and weighed with c.loss.box_weight; stage 1 puts each
    # box on the level whose anchor (anchors.sizes, one per level) is nearest in size.
    # mmdetection's values.
    c.cascade = ml_collections.ConfigDict()
    c.cascade.stage1_dilation = 3  # dilation of stage 1's 3x3 convolution
    c.cascade.stage1_weights = (10.0, 10.0, 2.0, 2.0)  # stage 1's box coder (1 / target stds)
    c.cascade.stage1_box_weight = 10.0  # weight of stage 1's IoU loss
    c.cascade.center_ratio = 0.2  # stage 1: positive if the anchor centre is in this region
    c.cascade.ignore_ratio = 0.5  # ... ignored if in this one (and on adjacent levels)
    c.cascade.low_quality_min_iou = 0.3  # stage 2: best-anchor positives need this IoU

    # Proposals (jax_rpn.proposals).
    c.proposals = ml_collections.ConfigDict()
    c.proposals.pre_nms_topk_train = 2000  # per level, before NMS (training-mode proposals)
    c.proposals.post_nms_topk_train = 1000  # per image, after NMS
    c.proposals.pre_nms_topk_test = 1000  # per level, before NMS (evaluation, predict)
    c.proposals.post_nms_topk_test = 1000  # K, proposals per image
    c.proposals.nms_threshold = 0.65  # detectron2: 0.7; only proposals (eval) use it here
    c.proposals.nms_across_levels = False  # True: one NMS over all levels (peers: per level)
    c.proposals.min_size = 0.0  # boxes with a side <= this (pixels) are dropped

    # Initial weights (jax_rpn.interop), loaded before step 0; resuming a workdir ignores them.
    c.init = ml_collections.ConfigDict()
    # A peer checkpoint (torchvision / detectron2 / mmdet file), a folder converted by
    # `python -m jax_rpn.interop`, or a jax_rpn workdir. None: random initialisation.
    c.init.checkpoint = ml_collections.config_dict.placeholder(str)
    c.init.format = "auto"  # auto (detected from the keys), torchvision, detectron2, mmdet, jax_rpn
    # frozen_bn (model.norm or model.fpn_norm) keeps BN statistics fixed: right over pretrained
    # weights, the identity over random ones, so a config with it and no init.checkpoint is
    # refused unless this is True.
    c.init.allow_random_frozen_bn = False

    # Optimisation (jax_rpn.training).
    c.optim = ml_collections.ConfigDict()
    c.optim.name = "adamw"  # sgd (momentum) or adamw; AdamW learns faster from scratch
    c.optim.learning_rate = 0.002  # peak, after warmup
    c.optim.momentum = 0.9  # sgd only
    c.optim.weight_decay = 1e-4  # not applied to norms and biases
    c.optim.warmup_steps = 50  # linear warmup from 0.001 x learning_rate
    c.optim.schedule = "cosine"  # cosine, linear (to 0), step or constant
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
