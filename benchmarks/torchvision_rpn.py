"""The torchvision side of the end-to-end benchmarks: a config's RPN built from torchvision.

``build(config)`` gives the same architecture as ``jax_rpn.models.build_rpn(config)`` out of
torchvision's own modules: a ResNet (``torchvision.models.resnet``) with its FPN
(``BackboneWithFPN``, ``LastLevelMaxPool`` for P6), ``RPNHead``, ``AnchorGenerator`` and
``RegionProposalNetwork`` with the config's thresholds, sampler and top-k settings. All layers
are trainable, as on our side (torchvision's ``trainable_layers=5``).

torchvision's ``ResNet`` hard-codes the stem and first-stage width at 64. For a narrower
``model.width`` (32 in ``configs/default.py``) :class:`NarrowResNet` is a minimal subclass
that rebuilds the stem and the four stages with torchvision's own ``_make_layer`` and
``BasicBlock``/``Bottleneck`` at that width (stage k: ``width * 2**k`` planes), then applies
torchvision's initialisation; everything else is the torchvision class.

The loss is torchvision's (``RegionProposalNetwork.compute_loss``: BCE over the sampled
anchors, smooth-L1 with beta 1/9 over the positives), summed as ``objectness + box_weight x
box``; the optimizer mirrors ``config.optim`` (AdamW or SGD with momentum, weight decay on
convolution kernels only, global-norm clipping, warmup then cosine or step schedule).
"""

import math

import torch
import torchvision
from torch import nn
from torchvision.models import resnet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.ops import misc as misc_nn_ops
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

# PyTorch runs where JAX does: a GPU when there is one, else the CPU.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
STAGES = {18: (resnet.BasicBlock, [2, 2, 2, 2]), 34: (resnet.BasicBlock, [3, 4, 6, 3])}
STAGES |= {50: (resnet.Bottleneck, [3, 4, 6, 3]), 101: (resnet.Bottleneck, [3, 4, 23, 3])}


class NarrowResNet(resnet.ResNet):
    """torchvision's ``ResNet`` with ``width`` channels in the stem and first stage (64 in
    torchvision) and ``width * 2**k`` planes in stage k. No classifier."""

    def __init__(self, block, layers, *, width: int, norm_layer):
        super().__init__(block, layers, norm_layer=norm_layer)
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(width)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, 2 * width, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 4 * width, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 8 * width, layers[3], stride=2)
        del self.fc  # the FPN reads layer1..layer4 only
        for m in self.modules():  # torchvision's ResNet initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)


def _norm_layer(norm: str):
    if norm == "frozen_bn":
        return misc_nn_ops.FrozenBatchNorm2d
    if norm == "batch_norm":
        return nn.BatchNorm2d
    raise ValueError(f"model.norm {norm!r} has no torchvision counterpart here")


def _tuples(values):
    return tuple(tuple(v) if isinstance(v, (list, tuple)) else (v,) for v in values)


def build_backbone(config) -> BackboneWithFPN:
    """The config's ResNet + FPN (P2..P6) from torchvision's modules."""
    m = config.model
    if not (m.backbone.startswith("resnet") and m.fpn):
        raise ValueError(f"only ResNet-FPN configs are built here, got {m.backbone}, fpn={m.fpn}")
    block, layers = STAGES[int(m.backbone[len("resnet") :])]
    norm_layer = _norm_layer(m.norm)
    if m.width == 64:
        body = getattr(resnet, m.backbone)(weights=None, norm_layer=norm_layer)
        del body.fc
    else:
        body = NarrowResNet(block, layers, width=m.width, norm_layer=norm_layer)
    # torchvision's _resnet_fpn_extractor with trainable_layers=5 (every layer trained) and
    # out_channels from the config (that helper fixes 256).
    expansion = block.expansion
    in_channels = [expansion * m.width * 2**k for k in range(4)]
    return BackboneWithFPN(
        body,
        return_layers={f"layer{k + 1}": str(k) for k in range(4)},
        in_channels_list=in_channels,
        out_channels=m.fpn_dim,
        extra_blocks=LastLevelMaxPool(),
    )


def build_rpn_module(config) -> RegionProposalNetwork:
    """torchvision's ``RegionProposalNetwork`` with the config's anchors, head and settings."""
    m, a, t, p = config.model, config.anchors, config.targets, config.proposals
    if m.objectness != "sigmoid":
        raise ValueError("torchvision's RPN scores anchors with a sigmoid only")
    sizes = _tuples(a.sizes)
    ratios = _tuples(a.aspect_ratios) if isinstance(a.aspect_ratios[0], (list, tuple)) else None
    ratios = ratios or (tuple(a.aspect_ratios),) * len(sizes)
    generator = AnchorGenerator(sizes=sizes, aspect_ratios=ratios)
    head = RPNHead(m.fpn_dim, generator.num_anchors_per_location()[0], conv_depth=m.head_convs)
    return RegionProposalNetwork(
        generator,
        head,
        fg_iou_thresh=t.high,
        bg_iou_thresh=t.low,
        batch_size_per_image=t.num_samples,
        positive_fraction=t.positive_fraction,
        pre_nms_top_n={"training": p.pre_nms_topk_train, "testing": p.pre_nms_topk_test},
        post_nms_top_n={"training": p.post_nms_topk_train, "testing": p.post_nms_topk_test},
        nms_thresh=p.nms_threshold,
        score_thresh=0.0,
    )


class TorchvisionRPN(nn.Module):
    """Backbone + FPN + ``RegionProposalNetwork``: ``(images [B, 3, H, W], image sizes,
    targets) -> (proposals, losses)``, as ``GeneralizedRCNN`` runs its first stage (images
    already normalised and padded, so no ``GeneralizedRCNNTransform``)."""

    def __init__(self, config):
        super().__init__()
        self.backbone = build_backbone(config)
        self.rpn = build_rpn_module(config)

    def forward(self, images, image_sizes, targets=None):
        features = self.backbone(images)
        return self.rpn(ImageList(images, image_sizes), features, targets)


def build(config) -> TorchvisionRPN:
    """The config's RPN in torchvision (parameters float32, on :data:`DEVICE`)."""
    if config.model.head_dim not in (None, config.model.fpn_dim):
        raise ValueError("torchvision's RPNHead keeps the feature channels in its convolutions")
    return TorchvisionRPN(config).to(DEVICE)


def create_optimizer(config, model: nn.Module):
    """``(torch optimizer, LambdaLR scheduler)`` mirroring ``jax_rpn.optim.create_optimizer``:
    weight decay on convolution kernels only (not biases or norm parameters). Uses the fused
    CPU kernels where torch has them (the fastest option)."""
    o = config.optim
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim == 4]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim != 4]
    groups = [{"params": decay, "weight_decay": o.weight_decay}]
    groups.append({"params": rest, "weight_decay": 0.0})
    if o.name == "adamw":
        opt = torch.optim.AdamW(groups, lr=o.learning_rate, fused=True)
    else:
        opt = torch.optim.SGD(groups, lr=o.learning_rate, momentum=o.momentum, fused=True)

    def factor(step):
        warm = min(1.0, 1e-3 + (1 - 1e-3) * step / o.warmup_steps) if o.warmup_steps else 1.0
        if o.schedule == "cosine":
            span = max(config.num_train_steps - o.warmup_steps, 1)
            done = min(max(step - o.warmup_steps, 0) / span, 1.0)
            return warm * 0.5 * (1 + math.cos(math.pi * done))
        if o.schedule == "step":
            return warm * o.decay_factor ** sum(step >= b for b in o.decay_steps)
        return warm

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def to_torch_batch(batch: dict):
    """A numpy batch with the input pipeline's structure -> ``(images [B, 3, H, W], image
    sizes, targets)``: the valid ground truth of each image as torchvision takes it."""
    images = torch.from_numpy(batch["image"]).permute(0, 3, 1, 2).contiguous().to(DEVICE)
    sizes = [(int(h), int(w)) for h, w in batch["image_hw"]]
    pairs = zip(batch["boxes"], batch["valid"], strict=True)
    targets = [{"boxes": torch.from_numpy(b[v]).to(DEVICE)} for b, v in pairs]
    return images, sizes, targets


def versions() -> str:
    """torch and torchvision versions, the device and the thread settings, in one line."""
    return (
        f"torch {torch.__version__}, torchvision {torchvision.__version__} on {DEVICE.type}, "
        f"{torch.get_num_threads()} intra-op threads, {torch.get_num_interop_threads()} "
        f"inter-op, mkldnn {torch.backends.mkldnn.is_available()}"
    )
