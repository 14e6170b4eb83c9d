"""torchvision's ``fasterrcnn_resnet50_fpn_v2`` RPN on COCO 2017.

As ``torchvision_fasterrcnn_r50_fpn`` (anchors, RPN settings, input) with v2's model:
BatchNorm after every FPN convolution (which then have no bias) and two 3x3 conv + ReLU in the
RPN head. torchvision trains v2's BatchNorm layers (with SyncBN over 32 GPUs, 400 epochs of
large-scale jitter from ImageNet weights, pull request pytorch/vision#5763); here they are
frozen at the loaded statistics (``frozen_bn``: what eval mode computes), for fine-tuning the
published weights with the v1 schedule.
"""

from configs import torchvision_fasterrcnn_r50_fpn


def get_config():
    c = torchvision_fasterrcnn_r50_fpn.get_config()
    c.model.fpn_norm = "frozen_bn"  # BatchNorm2d in the FPN, at its running statistics
    c.model.head_convs = 2  # RPNHead(conv_depth=2)
    return c
