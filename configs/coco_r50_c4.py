"""detectron2's RPN R50-C4 1x on COCO 2017 (configs/COCO-Detection/rpn_R_50_C4_1x.yaml).

As ``coco_r50_fpn`` (MSRA R-50, stride in 1x1, FrozenBN, BGR 0-255 input, stem and res2
frozen) but one level: the head on res4 (stride 16, res5 not built), anchors 32..512 x ratios
0.5/1/2 (15 per cell); pre/post-NMS top-k 12000/2000 in training, 12000/2000 at test.
"""

from configs import coco_r50_fpn


def get_config():
    c = coco_r50_fpn.get_config()
    c.model.fpn = False
    c.model.head_dim = None  # the head keeps res4's 1024 channels
    c.anchors.strides = (16,)
    c.anchors.sizes = ((32, 64, 128, 256, 512),)
    c.proposals.pre_nms_topk_train = 12000
    c.proposals.post_nms_topk_train = 2000
    c.proposals.pre_nms_topk_test = 12000  # rpn_R_50_C4_1x.yaml: PRE_NMS_TOPK_TEST 12000
    c.proposals.post_nms_topk_test = 2000  # and POST_NMS_TOPK_TEST 2000
    return c
