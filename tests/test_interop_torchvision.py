"""jax_rpn with torchvision's weights against the real torchvision (0.29, CPU).

Every model here is torchvision's own, randomly initialised, with BatchNorm weights, biases and
running statistics set to random values (the running statistics near the activations' real
statistics, so features keep a sane scale, but not equal to them: frozen BN is neither the
identity nor batch normalisation), saved with ``torch.save`` and read back through
``jax_rpn.interop``. The expected values are torchvision's outputs on the same normalised batch.

The two real-size tests run ``fasterrcnn_resnet50_fpn`` once on two images padded to
800x1216, one of them 760x1100 (module-scoped fixture): backbone and FPN features within 1e-4
of each tensor's largest value, anchors equal (torchvision's per-axis stride: P6 has 13 rows
and a y stride of 61), and the same proposals: boxes within 1e-2 px in the same order, where
only scores closer than float32 noise (1e-5) may swap.

Where torchvision's ``RegionProposalNetwork.filter_proposals`` and ``jax_rpn.proposals`` differ
(none of it shows here): torchvision ranks by float32 sigmoid (jax_rpn by logit: exact ties of
saturated scores may order differently), keeps boxes with sides ``>= min_size`` (jax_rpn ``>``;
they differ only at a side of exactly 1e-3 px), and has a ``score_thresh`` (0.0 in every
torchvision model, which removes nothing) and no handling of non-finite scores (jax_rpn drops
them).
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import concat_box_prediction_layers

from configs import default, torchvision_fasterrcnn_r50_fpn, torchvision_fasterrcnn_r50_fpn_v2
from jax_rpn import inference, interop
from jax_rpn.models import ResNet, build_rpn
from jax_rpn.settings import ProposalSettings

SCORE_TIE = 1e-5  # sigmoid scores closer than this may swap (float32 accumulation differs)
# Small inputs compile without XLA optimisation: the same numbers, faster to compile.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _scene(n, h, w, *, seed):
    """Images with structure at every scale (white noise averages out in deep features, so
    their logits nearly tie): random normal grids of cell 4..256 px, upsampled and summed."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 3, h, w)
    for cell in (4, 16, 64, 256):
        coarse = torch.randn(n, 3, -(-h // cell) + 1, -(-w // cell) + 1, generator=g)
        x += torch.nn.functional.interpolate(coarse, scale_factor=cell, mode="bilinear")[
            ..., :h, :w
        ]
    return x / 2


def _randomize_bn(model, calibration):
    """Random BN affine; running statistics of ``calibration`` (train-mode batch statistics),
    then moved off them by random amounts."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in norms:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.3, 0.3)
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average: one batch gives its statistics
        model.train()
        if hasattr(model, "backbone"):  # a detector: its backbone and FPN
            model.backbone(calibration)
        else:
            model(calibration)
        model.eval()
        for bn in norms:
            std = bn.running_var.sqrt()
            bn.running_mean.add_(0.2 * std * torch.randn_like(std))
            bn.running_var.mul_(torch.empty_like(std).uniform_(0.7, 1.4))
    return model


def _detector(builder, seed):
    torch.manual_seed(seed)
    model = builder(weights=None, weights_backbone=None)
    _randomize_bn(model, _scene(2, 128, 192, seed=seed + 1))
    with torch.no_grad():  # deltas of a trained RPN's size (|d| ~ 1, not ~6 as at init)
        model.rpn.head.bbox_pred.weight.mul_(0.2)
    return model


@torch.no_grad()
def _torchvision_rpn(model, images, image_sizes):
    """torchvision's RPN inference, step by step as ``RegionProposalNetwork.forward`` does it,
    keeping the backbone body's C2..C5, the head outputs and the scores."""
    body = {}
    hook = model.backbone.body.register_forward_hook(lambda m, i, o: body.update(o))
    features = list(model.backbone(images).values())
    hook.remove()
    rpn = model.rpn
    image_list = ImageList(images, image_sizes)
    objectness, deltas = rpn.head(features)
    anchors = rpn.anchor_generator(image_list, features)
    per_level = [o[0].numel() for o in objectness]
    flat_objectness, flat_deltas = concat_box_prediction_layers(objectness, deltas)
    proposals = rpn.box_coder.decode(flat_deltas, anchors).view(len(anchors), -1, 4)
    boxes, scores = rpn.filter_proposals(proposals, flat_objectness, image_sizes, per_level)
    return dict(
        body=[v.numpy() for v in body.values()],
        features=[f.numpy() for f in features],
        objectness=[o.numpy() for o in objectness],
        deltas=[d.numpy() for d in deltas],
        anchors=anchors[0].numpy(),
        boxes=[b.numpy() for b in boxes],
        scores=[s.numpy() for s in scores],
    )


def _jax_rpn(variables, config, images, image_sizes, *, compiler_options=None):
    """jax_rpn's forward (jitted, capturing the backbone's C2..C5) and proposals (jitted)."""
    model = build_rpn(config)
    forward = jax.jit(
        functools.partial(
            model.apply,
            train=False,
            capture_intermediates=lambda module, method: isinstance(module, ResNet),
            mutable=["intermediates"],
        ),
        compiler_options=compiler_options,
    )
    outputs, state = forward(variables, jnp.asarray(images.permute(0, 2, 3, 1).numpy()))
    settings = ProposalSettings.from_config(config, train=False)
    proposals = jax.jit(
        functools.partial(inference.proposals_from_outputs, settings=settings, objectness="sigmoid")
    )(outputs, jnp.asarray(image_sizes, jnp.int32))
    body = state["intermediates"]["body"]["__call__"][0]
    return dict(
        body=[np.asarray(body[k]).transpose(0, 3, 1, 2) for k in ("C2", "C3", "C4", "C5")],
        features=[np.asarray(f).transpose(0, 3, 1, 2) for f in outputs.features],
        objectness=[np.asarray(o).transpose(0, 3, 1, 2) for o in outputs.objectness],
        deltas=[_nchw_deltas(np.asarray(d)) for d in outputs.deltas],
        anchors=np.concatenate(outputs.anchors),
        proposals=jax.device_get(proposals),
    )


def _nchw_deltas(d):
    """jax_rpn ``[B, H, W, A, 4]`` -> torchvision's ``[B, 4A, H, W]`` (channel ``a * 4 + k``)."""
    b, h, w = d.shape[:3]
    return d.reshape(b, h, w, -1).transpose(0, 3, 1, 2)


def _assert_close_to_scale(ours, theirs, rtol, what):
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert a.shape == b.shape, (what, i, a.shape, b.shape)
        err = np.abs(a - b).max() / np.abs(b).max()
        assert err <= rtol, f"{what}[{i}]: max |diff| / max |torchvision| = {err:.2e} > {rtol}"


def _assert_same_proposals(ours, theirs):
    """Same boxes (1e-2 px) and scores (1e-5) in the same order; within a run of torchvision
    scores closer than SCORE_TIE the order is free, so those runs are compared as sets."""
    for i, (boxes, scores) in enumerate(zip(theirs["boxes"], theirs["scores"], strict=True)):
        valid = ours.valid[i]
        got_boxes = ours.boxes[i][valid]
        got_scores = 1.0 / (1.0 + np.exp(-ours.scores[i][valid].astype(np.float64)))
        assert len(got_boxes) == len(boxes), (i, len(got_boxes), len(boxes))
        np.testing.assert_allclose(got_scores, scores, atol=SCORE_TIE, rtol=0)
        runs = np.split(np.arange(len(scores)), np.nonzero(np.diff(scores) < -SCORE_TIE)[0] + 1)
        for run in runs:
            a, b = got_boxes[run], boxes[run]
            if len(run) > 1:  # order within a near-tie: compare as sets
                a, b = a[np.lexsort(a.T[::-1])], b[np.lexsort(b.T[::-1])]
            np.testing.assert_allclose(a, b, atol=1e-2, rtol=0, err_msg=f"image {i}, run {run}")


# --- fasterrcnn_resnet50_fpn at its real input size ---------------------------------------


@pytest.fixture(scope="module")
def r50_fpn(tmp_path_factory):
    """One torchvision and one jax_rpn inference of fasterrcnn_resnet50_fpn on two images
    padded to 800x1216 (the second 760x1100), through a .pth file on disk."""
    model = _detector(torchvision.models.detection.fasterrcnn_resnet50_fpn, seed=0)
    path = str(tmp_path_factory.mktemp("tv") / "fasterrcnn_resnet50_fpn.pth")
    torch.save(model.state_dict(), path)
    config = torchvision_fasterrcnn_r50_fpn.get_config()
    variables, report = interop.from_torchvision(path, config)
    sizes = [(800, 1216), (760, 1100)]
    images = _scene(2, 800, 1216, seed=2)
    images[1, :, 760:] = 0  # the batch is padded with zeros after normalisation
    images[1, :, :, 1100:] = 0
    return dict(
        model=model,
        config=config,
        variables=variables,
        report=report,
        theirs=_torchvision_rpn(model, images, sizes),
        ours=_jax_rpn(variables, config, images, sizes),
    )


def test_r50_fpn_converts_every_key(r50_fpn):
    report = r50_fpn["report"]
    state = r50_fpn["model"].state_dict()
    mapped = [k for k in state if not k.startswith("roi_heads.") and "num_batches_tracked" not in k]
    assert report.loaded == len(mapped) == 287  # 265 backbone.body + 16 fpn + 6 rpn.head
    assert report.left_random == ()
    assert report.ignored == {
        "BatchNorm step counters (not used by a forward pass)": 53,
        "Faster R-CNN's second stage (jax_rpn is its first stage)": 8,
    }


def test_r50_fpn_features_match_torchvision(r50_fpn):
    ours, theirs = r50_fpn["ours"], r50_fpn["theirs"]
    _assert_close_to_scale(ours["body"], theirs["body"], 1e-4, "C2..C5")
    _assert_close_to_scale(ours["features"], theirs["features"], 1e-4, "P2..P6")
    _assert_close_to_scale(ours["objectness"], theirs["objectness"], 1e-4, "objectness")
    _assert_close_to_scale(ours["deltas"], theirs["deltas"], 1e-4, "deltas")
    assert [f.shape[2:] for f in theirs["features"]][-1] == (13, 19)  # P6: ceil(25 / 2) rows


def test_r50_fpn_anchors_follow_torchvision_per_axis_stride(r50_fpn):
    ours, theirs = r50_fpn["ours"]["anchors"], r50_fpn["theirs"]["anchors"]
    np.testing.assert_array_equal(ours, theirs)
    p6 = theirs[-13 * 19 * 3 :].reshape(13, 19, 3, 4)
    assert np.all(np.diff(p6[:, 0, 0, 1]) == 61)  # 800 // 13, not 64
    assert np.all(np.diff(p6[0, :, 0, 0]) == 64)  # 1216 // 19


def test_r50_fpn_proposals_match_torchvision(r50_fpn):
    ours, theirs = r50_fpn["ours"]["proposals"], r50_fpn["theirs"]
    assert [len(b) for b in theirs["boxes"]] == [1000, 1000]
    _assert_same_proposals(ours, theirs)
    # The second image's proposals stay inside its true 760x1100 size.
    assert np.all(ours.boxes[1][ours.valid[1]][:, 2:].max(0) <= [1100, 760])


def test_to_torchvision_round_trips_exactly(r50_fpn):
    config, variables = r50_fpn["config"], r50_fpn["variables"]
    state = {k: v.numpy() for k, v in r50_fpn["model"].state_dict().items()}
    exported = interop.to_torchvision(variables, config)
    assert len(exported) == 287
    for key, value in exported.items():
        np.testing.assert_array_equal(value, state[key], err_msg=key)
    again, _ = interop.from_torchvision(exported, config)
    jax.tree.map(np.testing.assert_array_equal, again, variables)
    fresh = torchvision.models.detection.fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None
    )
    result = fresh.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, False)
    assert result.unexpected_keys == []
    assert all(
        k.startswith("roi_heads.") or k.endswith("num_batches_tracked") for k in result.missing_keys
    )


# --- smaller models ------------------------------------------------------------------------


def test_fasterrcnn_v2_bn_fpn_and_two_conv_head_match_torchvision(tmp_path):
    """fasterrcnn_resnet50_fpn_v2: BatchNorm after every FPN conv, a 2-conv RPN head."""
    model = _detector(torchvision.models.detection.fasterrcnn_resnet50_fpn_v2, seed=3)
    path = str(tmp_path / "v2.pth")
    torch.save(model.state_dict(), path)
    config = torchvision_fasterrcnn_r50_fpn_v2.get_config()
    variables, report = interop.from_torchvision(path, config)
    assert report.loaded == 265 + 4 * 2 * 5 + 2 * 2 + 4  # body, FPN conv + 4 BN leaves, head
    sizes = [(128, 192), (96, 150)]
    images = _scene(2, 128, 192, seed=4)
    images[1, :, 96:] = 0
    images[1, :, :, 150:] = 0
    theirs = _torchvision_rpn(model, images, sizes)
    ours = _jax_rpn(variables, config, images, sizes, compiler_options=FAST_COMPILE)
    _assert_close_to_scale(ours["features"], theirs["features"], 1e-4, "P2..P6")
    _assert_close_to_scale(ours["objectness"], theirs["objectness"], 1e-4, "objectness")
    np.testing.assert_array_equal(ours["anchors"], theirs["anchors"])
    _assert_same_proposals(ours["proposals"], theirs)


def _classifier_config(backbone, **model):
    config = default.get_config()
    config.model.backbone = backbone
    config.model.width = 64
    config.model.norm = "frozen_bn"
    for k, v in model.items():
        config.model[k] = v
    return config


def test_resnet18_classifier_backbone_matches_torchvision():
    torch.manual_seed(5)
    net = torchvision.models.resnet18()
    _randomize_bn(net, _scene(2, 64, 64, seed=6))
    config = _classifier_config("resnet18")
    variables, report = interop.from_torchvision(net.state_dict(), config)
    assert report.loaded == 100 and report.left_random == ("neck", "head")
    x = _scene(2, 64, 96, seed=7)
    with torch.no_grad():
        y = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        theirs = []
        for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
            y = layer(y)
            theirs.append(y.numpy())
    body = ResNet(depth=18, width=64, norm="frozen_bn")
    ours = jax.jit(functools.partial(body.apply, train=False), compiler_options=FAST_COMPILE)(
        {k: v["body"] for k, v in variables.items()}, jnp.asarray(x.permute(0, 2, 3, 1).numpy())
    )
    ours = [np.asarray(ours[k]).transpose(0, 3, 1, 2) for k in ("C2", "C3", "C4", "C5")]
    _assert_close_to_scale(ours, theirs, 1e-4, "C2..C5")


@pytest.mark.parametrize("depth", [18, 34, 50, 101])
def test_every_resnet_classifier_key_maps(depth):
    # Shapes from torchvision's own module (built on the meta device, no memory); zeros as
    # values: every key must find its place with the right shape.
    with torch.device("meta"):
        net = getattr(torchvision.models, f"resnet{depth}")()
    state = {k: np.zeros(v.shape, np.float32) for k, v in net.state_dict().items()}
    bn_counters = sum(k.endswith("num_batches_tracked") for k in state)
    variables, report = interop.from_torchvision(state, _classifier_config(f"resnet{depth}"))
    assert report.loaded == len(state) - bn_counters - 2  # all but fc.weight, fc.bias
    assert report.ignored["the ImageNet classifier"] == 2
    assert set(variables["params"]) == {"body"}


@pytest.mark.parametrize("batch_norm", [False, True])
def test_vgg16_classifier_maps_and_matches(batch_norm):
    torch.manual_seed(8)
    net = (torchvision.models.vgg16_bn if batch_norm else torchvision.models.vgg16)()
    if batch_norm:
        _randomize_bn(net.features, _scene(2, 32, 32, seed=9))
    config = _classifier_config(
        "vgg16", fpn=False, norm="frozen_bn" if batch_norm else "none", head_convs=1
    )
    config.anchors.strides = (16,)
    config.anchors.sizes = ((128, 256, 512),)
    variables, report = interop.from_torchvision(net.state_dict(), config)
    assert report.loaded == 13 * (6 if batch_norm else 2)
    assert report.ignored["the ImageNet classifier"] == 6
    x = _scene(1, 64, 64, seed=10)
    with torch.no_grad():
        theirs = net.features[:-1](x).numpy()  # up to conv5_3's ReLU (no pool5)
    features = functools.partial(build_rpn(config).apply, train=False, method="features")
    (ours,) = jax.jit(features, compiler_options=FAST_COMPILE)(
        {k: {"body": v["body"]} for k, v in variables.items()},
        jnp.asarray(x.permute(0, 2, 3, 1).numpy()),
    )
    _assert_close_to_scale([np.asarray(ours).transpose(0, 3, 1, 2)], [theirs], 1e-4, "conv5_3")


def test_published_v1_key_names_load_like_current_ones():
    """The published fasterrcnn_resnet50_fpn weights predate torchvision 0.13's names
    (``rpn.head.conv.weight``, ``backbone.fpn.inner_blocks.0.weight``); torchvision renames
    them on load, and so does jax_rpn."""
    with torch.device("meta"):
        model = torchvision.models.detection.fasterrcnn_resnet50_fpn(
            weights=None, weights_backbone=None
        )
    rng = np.random.default_rng(0)
    state = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in model.state_dict().items()}
    old = {
        re.sub(r"(rpn\.head\.conv|fpn\.\w+_blocks\.\d)\.0(\.0)?\.", r"\1.", k): v
        for k, v in state.items()
    }
    assert "rpn.head.conv.weight" in old and "backbone.fpn.inner_blocks.0.weight" in old
    config = torchvision_fasterrcnn_r50_fpn.get_config()
    new_vars, _ = interop.from_torchvision(state, config)
    old_vars, _ = interop.from_torchvision(old, config)
    jax.tree.map(np.testing.assert_array_equal, old_vars, new_vars)
