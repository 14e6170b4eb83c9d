"""Tests for jax_rpn.models: shapes, parameter counts, channel layout, config checks, norms,
bf16, gradients, one compile per shape.

Big backbones are checked with ``jax.eval_shape`` (no compute); real runs use width 4-8 and
32x32 / 64x64 images.
"""

import functools
import importlib.util
import re
from pathlib import Path

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jax_rpn import anchors as anchors_lib
from jax_rpn.models import (
    FPN,
    RPN,
    VGG16,
    ResNet,
    RPNHead,
    RPNOutput,
    build_rpn,
    flatten_outputs,
    frozen_parameters,
    init_variables,
    make_norm,
)

KEY = jax.random.key(0)
RNG = np.random.default_rng(0)
# Tests compile without XLA optimisation: same numbers, several times faster to compile.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def _default_config():
    path = Path(__file__).resolve().parents[1] / "configs" / "default.py"
    spec = importlib.util.spec_from_file_location("default_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _count(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def _random_variables(model, *args, **kwargs):
    """Variables from numpy instead of ``model.init`` (threefry compiles slowly on CPU): kernels
    He-normal, biases 0, norm scales and variances 1, means 0."""
    shapes = jax.eval_shape(functools.partial(model.init, **kwargs), KEY, *args)

    def fill(path, s):
        name = path[-1].key
        if name == "kernel":
            return (RNG.normal(size=s.shape) * np.sqrt(2 / np.prod(s.shape[:-1]))).astype(s.dtype)
        return np.full(s.shape, 1.0 if name in ("scale", "var") else 0.0, s.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def _init_shapes(model, image_shape):
    """Variable shapes of ``model`` (no compute)."""
    init = functools.partial(model.init, train=False)
    return jax.eval_shape(init, KEY, jax.ShapeDtypeStruct(image_shape, jnp.float32))


def _apply_shapes(model, image_shape):
    variables = _init_shapes(model, image_shape)
    apply = functools.partial(model.apply, train=False)
    return jax.eval_shape(apply, variables, jax.ShapeDtypeStruct(image_shape, jnp.float32))


def _c4(**kw):
    """Tiny ResNet-18-C4 RPN (one level, stride 16)."""
    return RPN(backbone="resnet18", width=4, fpn=False, strides=(16,), sizes=((32, 64),), **kw)


# ------------------------------------------------------------------ backbones


# Torchvision's parameter counts minus the classifier: resnet18 11,689,512 - (512 * 1000 + 1000);
# resnet34 21,797,672 - 513,000; resnet50 25,557,032 - (2048 * 1000 + 1000); resnet101
# 44,549,160 - 2,049,000; vgg16 138,357,544 - classifier 123,642,856 (= 25088*4096 + 4096 +
# 4096*4096 + 4096 + 4096*1000 + 1000), i.e. the 13 convolutions of vgg16.features.
@pytest.mark.parametrize(
    "model, expected",
    [
        (ResNet(depth=18, norm="batch_norm"), 11_176_512),
        (ResNet(depth=34, norm="batch_norm"), 21_284_672),
        (ResNet(depth=50, norm="batch_norm"), 23_508_032),
        (ResNet(depth=101, norm="batch_norm"), 42_500_160),
        (VGG16(norm="none"), 14_714_688),
    ],
)
def test_backbone_param_counts_match_torchvision(model, expected):
    variables = _init_shapes(model, (1, 64, 64, 3))
    assert _count(variables["params"]) == expected


def test_resnet50_param_count_for_every_norm():
    # Trainable: conv weights + norm scale/bias = 23,508,032. Frozen BN keeps its scale and bias
    # in batch_stats (not trained), so params + those two equal the same number.
    shape = (1, 64, 64, 3)
    bn = _init_shapes(ResNet(depth=50, norm="batch_norm"), shape)
    gn = _init_shapes(ResNet(depth=50, norm="group_norm"), shape)
    frozen = _init_shapes(ResNet(depth=50, norm="frozen_bn"), shape)
    assert _count(gn["params"]) == 23_508_032
    assert "batch_stats" not in gn
    leaves = jax.tree_util.tree_leaves_with_path(frozen["batch_stats"])
    frozen_affine = [x for path, x in leaves if path[-1].key in ("scale", "bias")]
    norm_params = _count(frozen_affine)
    assert _count(frozen["params"]) + norm_params == 23_508_032
    # BatchNorm running mean + var: as many numbers as its scale + bias.
    assert _count(bn["batch_stats"]) == norm_params
    # All convolutions without bias: 23,508,032 - 2 * (BN channels) in params.
    assert all(
        path[-1].key == "kernel"
        for path, _ in jax.tree_util.tree_leaves_with_path(frozen["params"])
    )


@pytest.mark.parametrize("depth", [18, 34, 50, 101])
def test_resnet_feature_shapes(depth):
    model = ResNet(depth=depth, width=8)
    out = _apply_shapes(model, (2, 64, 96, 3))
    expansion = 1 if depth < 50 else 4
    assert model.strides == {"C2": 4, "C3": 8, "C4": 16, "C5": 32}
    for k, name in enumerate(("C2", "C3", "C4", "C5")):
        s = 4 * 2**k
        assert out[name].shape == (2, 64 // s, 96 // s, expansion * 8 * 2**k)
        assert model.channels[name] == out[name].shape[-1]


def test_resnet_c4_builds_no_res5():
    model = ResNet(depth=50, width=8, out_features=("C4",))
    out = _apply_shapes(model, (1, 64, 64, 3))
    assert set(out) == {"C4"} and out["C4"].shape == (1, 4, 4, 4 * 8 * 4)
    names = set(_init_shapes(model, (1, 64, 64, 3))["params"])
    assert "layer3_5" in names and not any(n.startswith("layer4") for n in names)


def test_vgg16_conv5_3_at_stride_16():
    out = _apply_shapes(VGG16(width=8), (1, 64, 96, 3))
    assert set(out) == {"conv5_3"} and out["conv5_3"].shape == (1, 4, 6, 64)
    names = set(_init_shapes(VGG16(width=8), (1, 64, 64, 3))["params"])
    assert len([n for n in names if n.startswith("conv")]) == 13


def test_fpn_layout():
    feats = {f"C{k}": jnp.zeros((1, 128 // 2**k, 64 // 2**k, 8 * k)) for k in (2, 3, 4, 5)}
    fpn = FPN(dim=16)
    variables = jax.eval_shape(fpn.init, KEY, feats)
    # detectron2: lateral 1x1 and output 3x3 (both with bias) on each of C2..C5, nothing for P6.
    expected = sum((8 * k) * 16 + 16 + 9 * 16 * 16 + 16 for k in (2, 3, 4, 5))
    assert _count(variables["params"]) == expected
    out = jax.eval_shape(fpn.apply, variables, feats)
    assert list(out) == ["P2", "P3", "P4", "P5", "P6"]
    for k in (2, 3, 4, 5, 6):
        assert out[f"P{k}"].shape == (1, 128 // 2**k, 64 // 2**k, 16)


@pytest.mark.parametrize("norm", ["frozen_bn", "batch_norm"])
def test_fpn_norm_replaces_the_conv_bias(norm):
    # torchvision's fasterrcnn_resnet50_fpn_v2: Conv2dNormActivation(bias=False) + BatchNorm2d
    # for each lateral and output conv.
    feats = {f"C{k}": jnp.zeros((1, 128 // 2**k, 64 // 2**k, 8 * k)) for k in (2, 3, 4, 5)}
    variables = jax.eval_shape(FPN(dim=16, norm=norm).init, KEY, feats)
    params, stats = variables["params"], variables["batch_stats"]
    for level in (2, 3, 4, 5):
        for conv in (f"lateral{level}", f"output{level}"):
            assert set(params[conv]) == {"kernel"}
            assert set(stats[f"{conv}_norm"]) >= {"mean", "var"}
            owner = stats if norm == "frozen_bn" else params
            assert set(owner[f"{conv}_norm"]) >= {"scale", "bias"}


@pytest.mark.parametrize("p6, source_channels", [("conv_c5", 40), ("conv_p5", 16)])
def test_fpn_p6_by_a_stride_2_conv(p6, source_channels):
    # mmdet add_extra_convs='on_input' (of C5, 8 * 5 = 40 channels here) or 'on_output' (of P5):
    # a 3x3 stride-2 conv with padding 1, so P6 has ceil(H5 / 2) rows, as the max-pool.
    feats = {f"C{k}": jnp.zeros((1, 96 // 2**k, 64 // 2**k, 8 * k)) for k in (2, 3, 4, 5)}
    fpn = FPN(dim=16, p6=p6)
    variables = jax.eval_shape(fpn.init, KEY, feats)
    assert variables["params"]["p6"]["kernel"].shape == (3, 3, source_channels, 16)
    out = jax.eval_shape(fpn.apply, variables, feats)
    assert out["P5"].shape[1:3] == (3, 2) and out["P6"].shape[1:3] == (2, 1)


def test_stride_in_1x1_moves_the_stride_to_the_first_conv():
    # MSRA / detectron2 STRIDE_IN_1X1: res3's first block halves the size in conv1 (1x1), the
    # torchvision layout in conv2 (3x3); parameters and outputs have the same shapes.
    def conv_outputs(stride_in_1x1):
        model = ResNet(depth=50, width=4, stride_in_1x1=stride_in_1x1)
        x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
        variables = jax.eval_shape(functools.partial(model.init, train=False), KEY, x)
        _, state = jax.eval_shape(
            functools.partial(
                model.apply,
                train=False,
                capture_intermediates=lambda m, _: isinstance(m, nn.Conv),
                mutable=["intermediates"],
            ),
            variables,
            x,
        )
        block = state["intermediates"]["layer2_0"]
        return [block[c]["__call__"][0].shape[1:3] for c in ("conv1", "conv2", "conv3")]

    assert conv_outputs(True) == [(8, 8), (8, 8), (8, 8)]
    assert conv_outputs(False) == [(16, 16), (8, 8), (8, 8)]


@pytest.mark.parametrize("stride, hw", [(1, (9, 7)), (2, (9, 7)), (2, (8, 6))])
def test_1x1_conv_is_a_matmul_with_the_convolution_numbers(stride, hw):
    # resnet.conv runs a 1x1 kernel as a strided slice + matmul (faster on XLA CPU); the
    # reference is the same nn.Conv on lax.conv_general_dilated, and numpy's einsum.
    from jax_rpn.models.resnet import conv

    x = jnp.asarray(RNG.normal(size=(2, *hw, 5)), jnp.float32)
    ours = conv(3, 1, stride, use_bias=True, dtype=jnp.float32, name="c")
    reference = nn.Conv(3, (1, 1), strides=stride, padding=((0, 0), (0, 0)))
    variables = ours.init(KEY, x)
    variables = jax.tree.map(lambda v: v + 0.1, variables)  # a nonzero bias

    def loss(module, variables, x):
        return jnp.sum(jnp.sin(module.apply(variables, x)))

    out = jit(ours.apply)(variables, x)
    kernel, bias = variables["params"]["kernel"], variables["params"]["bias"]
    expected = np.einsum("bhwc,co->bhwo", np.asarray(x)[:, ::stride, ::stride], kernel[0, 0])
    np.testing.assert_allclose(out, expected + np.asarray(bias), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out, reference.apply(variables, x), rtol=1e-5, atol=1e-5)
    grads = jit(jax.grad(functools.partial(loss, ours), argnums=(0, 1)))(variables, x)
    expected_grads = jax.grad(functools.partial(loss, reference), argnums=(0, 1))(variables, x)
    chex.assert_trees_all_close(grads, expected_grads, rtol=1e-5, atol=1e-5)
    # The 1x1 kernel takes the matmul path; a 3x3 one stays a convolution.
    assert "conv_general_dilated" not in str(jax.make_jaxpr(ours.apply)(variables, x))
    conv3 = conv(3, 3, stride, use_bias=False, dtype=jnp.float32, name="c")
    assert "conv_general_dilated" in str(jax.make_jaxpr(conv3.apply)(conv3.init(KEY, x), x))


@pytest.mark.parametrize(
    "channels, features, hw", [(3, 4, (9, 7)), (3, 4, (8, 6)), (5, 4, (8, 6)), (3, 64, (8, 6))]
)
def test_stem_conv_with_a_zero_channel_gives_the_convolution_numbers(channels, features, hw):
    # A narrow stem's 7x7 stride-2 convolution runs its forward pass with a zero 4th image
    # channel (faster on XLA CPU); references: the same nn.Conv on lax.conv_general_dilated,
    # and a plain numpy sum over the 49 taps. Other channel counts, and 64 or more outputs,
    # take the plain convolution.
    from jax_rpn.models.resnet import conv, conv_rgb_padded

    x = jnp.asarray(RNG.normal(size=(2, *hw, channels)), jnp.float32)
    ours = conv(
        features,
        7,
        2,
        use_bias=True,
        dtype=jnp.float32,
        name="c",
        conv_general_dilated=conv_rgb_padded,
    )
    reference = nn.Conv(features, (7, 7), strides=2, padding=((3, 3), (3, 3)))
    variables = jax.tree.map(lambda v: v + 0.1, ours.init(KEY, x))  # a nonzero bias

    def loss(module, variables, x):
        return jnp.sum(jnp.sin(module.apply(variables, x)))

    out = jit(ours.apply)(variables, x)
    kernel, bias = (np.asarray(variables["params"][k], np.float64) for k in ("kernel", "bias"))
    xp = np.pad(np.asarray(x, np.float64), ((0, 0), (3, 3), (3, 3), (0, 0)))
    ho, wo = (hw[0] + 1) // 2, (hw[1] + 1) // 2
    expected = bias + sum(
        np.einsum("bhwc,co->bhwo", xp[:, i : i + 2 * ho : 2, j : j + 2 * wo : 2], kernel[i, j])
        for i in range(7)
        for j in range(7)
    )
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out, reference.apply(variables, x), rtol=1e-5, atol=1e-5)
    grads = jit(jax.grad(functools.partial(loss, ours), argnums=(0, 1)))(variables, x)
    expected_grads = jax.grad(functools.partial(loss, reference), argnums=(0, 1))(variables, x)
    chex.assert_trees_all_close(grads, expected_grads, rtol=1e-5, atol=1e-5)
    assert grads[0]["params"]["kernel"].shape == (7, 7, channels, features)
    # Only a 3-channel image gets the zero channel: a [2, H, W, 4] array in the program.
    padded = f"f32[2,{hw[0]},{hw[1]},4]"
    expect_padded = channels == 3 and features < 64
    assert (padded in str(jax.make_jaxpr(ours.apply)(variables, x))) == expect_padded
    # The ResNet's stem uses it.
    resnet = ResNet(depth=18, width=features)
    resnet_vars = resnet.init(KEY, x[..., :3], train=False)
    resnet_jaxpr = jax.make_jaxpr(functools.partial(resnet.apply, train=False))
    assert (padded in str(resnet_jaxpr(resnet_vars, x[..., :3]))) == (features < 64)


@pytest.mark.parametrize(
    "window, strides, padding, hw",
    [
        ((3, 3), (2, 2), ((1, 1), (1, 1)), (9, 8)),  # ResNet's stem, odd and even sizes
        ((3, 3), (2, 2), ((1, 1), (1, 1)), (8, 8)),
        ((2, 2), (2, 2), ((0, 0), (0, 0)), (8, 6)),  # VGG-16
        ((2, 2), (2, 2), ((0, 0), (0, 0)), (9, 7)),  # a last row and column no window reads
        ((3, 3), (1, 1), ((1, 1), (1, 1)), (6, 5)),  # stride 1
        ((3, 2), (2, 3), ((1, 1), (1, 1)), (9, 10)),  # uneven window and strides
    ],
)
def test_max_pool_gradient_goes_to_the_first_maximum(window, strides, padding, hw):
    # References: JAX's own gradient of nn.max_pool (XLA's select_and_scatter) and PyTorch's
    # max_pool2d backward, both routing to the first maximum of a window in row-major order.
    # Small integers after a ReLU make ties everywhere (zeros and repeated values), and
    # integer output gradients keep every sum exact, so the three must agree bit for bit.
    import torch

    from jax_rpn.models.pooling import max_pool

    x = jnp.asarray(np.maximum(RNG.integers(-2, 3, size=(2, *hw, 3)), 0), jnp.float32)
    y = jit(max_pool, static_argnums=(1, 2, 3))(x, window, strides, padding)
    np.testing.assert_array_equal(y, nn.max_pool(x, window, strides=strides, padding=padding))
    g = jnp.asarray(RNG.integers(-4, 5, size=y.shape), jnp.float32)
    vjp = jit(lambda x: jax.vjp(lambda x: max_pool(x, window, strides, padding), x)[1](g)[0])
    ours = vjp(x)
    jax_own = jax.vjp(lambda x: nn.max_pool(x, window, strides=strides, padding=padding), x)
    np.testing.assert_array_equal(ours, jax_own[1](g)[0])

    xt = torch.tensor(np.asarray(x).transpose(0, 3, 1, 2), requires_grad=True)
    yt = torch.nn.functional.max_pool2d(xt, window, strides, [p[0] for p in padding])
    yt.backward(torch.tensor(np.asarray(g).transpose(0, 3, 1, 2)))
    np.testing.assert_array_equal(ours, xt.grad.numpy().transpose(0, 2, 3, 1))


def test_frozen_parameters_follow_detectron2_freeze_at():
    resnet = frozen_parameters("resnet50", 2)
    assert resnet(("body", "conv1", "kernel")) and resnet(("body", "layer1_2", "conv3", "kernel"))
    assert not resnet(("body", "layer2_0", "conv1", "kernel"))
    assert not resnet(("neck", "lateral2", "kernel"))
    assert frozen_parameters("resnet50", 0) is None
    assert frozen_parameters("resnet50", 5)(("body", "layer4_2", "conv3", "kernel"))
    vgg = frozen_parameters("vgg16", 2)
    assert vgg(("body", "conv2_2", "kernel")) and not vgg(("body", "conv3_1", "kernel"))
    with pytest.raises(ValueError, match="freeze_at"):
        frozen_parameters("resnet50", 6)


def test_fpn_top_down_values():
    # 1x1 convolutions made identities: lateral = C, output conv = identity (centre tap), so
    # P5 = C5, P4 = C4 + up2(C5), ...; P6 = P5[::2, ::2]. Reference in numpy.
    rng = np.random.default_rng(0)
    feats = {f"C{k}": rng.normal(size=(1, 64 // 2**k, 64 // 2**k, 2)) for k in (2, 3, 4, 5)}
    fpn = FPN(dim=2)
    shapes = jax.eval_shape(fpn.init, KEY, feats)["params"]
    params = {}
    for name, p in shapes.items():
        k = np.zeros(p["kernel"].shape, np.float32)
        c = k.shape[0] // 2
        k[c, c] = np.eye(2)
        params[name] = {"kernel": k, "bias": np.zeros(2, np.float32)}
    out = jit(fpn.apply)({"params": params}, feats)

    def up(x):
        return x.repeat(2, axis=1).repeat(2, axis=2)

    ref5 = feats["C5"]
    ref4 = feats["C4"] + up(ref5)
    ref3 = feats["C3"] + up(ref4)
    ref2 = feats["C2"] + up(ref3)
    for name, ref in (("P2", ref2), ("P3", ref3), ("P4", ref4), ("P5", ref5)):
        np.testing.assert_allclose(out[name], ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["P6"], ref5[:, ::2, ::2], rtol=1e-6)


# ------------------------------------------------------------------ head


@pytest.mark.parametrize("objectness, per_anchor", [("sigmoid", 1), ("softmax", 2)])
def test_head_param_count_hand_computed(objectness, per_anchor):
    c, dim, a = 16, 24, 3
    head = RPNHead(num_anchors=a, num_convs=2, conv_dim=dim, objectness=objectness)
    feats = [jnp.zeros((1, 8, 8, c)), jnp.zeros((1, 4, 4, c))]
    params = jax.eval_shape(head.init, KEY, feats)["params"]
    expected = (
        (9 * c * dim + dim)  # conv0 3x3
        + (9 * dim * dim + dim)  # conv1 3x3
        + (dim * per_anchor * a + per_anchor * a)  # objectness 1x1
        + (dim * 4 * a + 4 * a)  # deltas 1x1
    )
    assert _count(params) == expected
    assert set(params) == {"conv0", "conv1", "objectness", "deltas"}  # one set for all levels


def test_head_init_normal_001_zero_bias():
    head = RPNHead(num_anchors=9, num_convs=1)
    params = jit(head.init)(KEY, [jnp.zeros((1, 4, 4, 64))])["params"]
    for name in ("conv0", "objectness", "deltas"):
        np.testing.assert_array_equal(params[name]["bias"], 0.0)
    kernel = np.asarray(params["conv0"]["kernel"])  # 36,864 draws
    assert abs(kernel.std() - 0.01) < 5e-4 and abs(kernel.mean()) < 5e-4


@pytest.mark.parametrize("objectness", ["sigmoid", "softmax"])
def test_head_channel_layout(objectness):
    # Zero kernels and bias = arange: each output channel shows its index. Softmax objectness
    # channel a * 2 + k -> [..., a, k]; deltas channel a * 4 + k -> [..., a, k].
    a = 3
    head = RPNHead(num_anchors=a, num_convs=0, objectness=objectness)
    feats = [jnp.ones((2, 3, 5, 4)), jnp.ones((2, 2, 1, 4))]
    shapes = jax.eval_shape(head.init, KEY, feats)["params"]
    params = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes)
    n_obj = a if objectness == "sigmoid" else 2 * a
    params["objectness"]["bias"] = np.arange(n_obj, dtype=np.float32)
    params["deltas"]["bias"] = np.arange(4 * a, dtype=np.float32)
    obj, deltas = jit(head.apply)({"params": params}, feats)
    for o, d, f in zip(obj, deltas, feats, strict=True):
        b, h, w = f.shape[:3]
        if objectness == "sigmoid":
            assert o.shape == (b, h, w, a)
            np.testing.assert_array_equal(o, np.broadcast_to(np.arange(a), o.shape))
        else:
            assert o.shape == (b, h, w, a, 2)
            ref = np.arange(2 * a).reshape(a, 2)  # [a, (bg, fg)]
            np.testing.assert_array_equal(o, np.broadcast_to(ref, o.shape))
        assert d.shape == (b, h, w, a, 4) and d.dtype == jnp.float32
        np.testing.assert_array_equal(d, np.broadcast_to(np.arange(4 * a).reshape(a, 4), d.shape))


@pytest.mark.parametrize("objectness", ["sigmoid", "softmax"])
def test_head_matches_numpy_convolutions(objectness):
    # Independent reference: the 3x3 conv (zero padding 1) as a sum of 9 shifted matmuls, ReLU,
    # then the two 1x1 predictors as separate matmuls, channels laid out as documented.
    a, c, dim = 3, 5, 6
    head = RPNHead(num_anchors=a, num_convs=1, conv_dim=dim, objectness=objectness)
    feats = [RNG.normal(size=(2, hw[0], hw[1], c)).astype(np.float32) for hw in [(6, 7), (3, 4)]]
    variables = jax.tree_util.tree_map_with_path(  # random biases too
        lambda path, v: RNG.normal(size=v.shape).astype(v.dtype) if path[-1].key == "bias" else v,
        _random_variables(head, feats),
    )
    obj, deltas = jit(head.apply)(variables, feats)
    p = jax.tree.map(np.asarray, variables["params"])
    for x, o, d in zip(feats, obj, deltas, strict=True):
        b, h, w, _ = x.shape
        xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        y = sum(
            xp[:, i : i + h, j : j + w] @ p["conv0"]["kernel"][i, j]
            for i in range(3)
            for j in range(3)
        )
        y = np.maximum(y + p["conv0"]["bias"], 0.0)  # [B, H, W, dim]
        want_obj = y @ p["objectness"]["kernel"][0, 0] + p["objectness"]["bias"]
        want_box = y @ p["deltas"]["kernel"][0, 0] + p["deltas"]["bias"]  # [B, H, W, 4A]
        np.testing.assert_allclose(o, want_obj.reshape(o.shape), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(d, want_box.reshape(b, h, w, a, 4), rtol=1e-4, atol=1e-5)


def test_head_weights_shared_across_levels():
    head = RPNHead(num_anchors=2, num_convs=1)
    x = RNG.normal(size=(1, 4, 4, 8)).astype(np.float32)
    variables = _random_variables(head, [x, x[:, :2, :2]])
    obj, deltas = jit(head.apply)(variables, [x, x])
    np.testing.assert_array_equal(obj[0], obj[1])
    np.testing.assert_array_equal(deltas[0], deltas[1])


def test_head_rejects_levels_with_different_channels():
    head = RPNHead(num_anchors=3)
    with pytest.raises(ValueError, match="same C"):
        jax.eval_shape(head.init, KEY, [jnp.zeros((1, 4, 4, 8)), jnp.zeros((1, 2, 2, 16))])


# ------------------------------------------------------------------ RPN shapes


@pytest.mark.parametrize(
    "kw, levels",
    [
        (dict(backbone="resnet18"), (4, 8, 16, 32, 64)),
        (dict(backbone="resnet34"), (4, 8, 16, 32, 64)),
        (dict(backbone="resnet50"), (4, 8, 16, 32, 64)),
        (dict(backbone="resnet101", objectness="softmax"), (4, 8, 16, 32, 64)),
        (dict(backbone="resnet50", fpn=False), (16,)),  # R50-C4
        (dict(backbone="vgg16", fpn=False, norm="none"), (16,)),
    ],
)
def test_rpn_output_shapes_every_backbone(kw, levels):
    sizes = tuple((32 * s / 4,) for s in levels) if len(levels) > 1 else ((64, 128),)
    model = RPN(width=8, fpn_dim=16, strides=levels, sizes=sizes, **kw)
    b, h, w = 2, 128, 64
    out = _apply_shapes(model, (b, h, w, 3))
    a = anchors_lib.num_cell_anchors(sizes[0], model.aspect_ratios)
    ref_anchors = anchors_lib.multilevel_anchors(
        [(h // s, w // s) for s in levels], levels, sizes, model.aspect_ratios
    )
    assert out.strides == levels
    assert len(out.objectness) == len(out.deltas) == len(out.anchors) == len(levels)
    for o, d, anc, ref, s in zip(
        out.objectness, out.deltas, out.anchors, ref_anchors, levels, strict=True
    ):
        extra = (2,) if model.objectness == "softmax" else ()
        assert o.shape == (b, h // s, w // s, a, *extra) and o.dtype == jnp.float32
        assert d.shape == (b, h // s, w // s, a, 4) and d.dtype == jnp.float32
        # Anchors per level equal the head's predictions per level.
        assert anc.shape == ref.shape == ((h // s) * (w // s) * a, 4)
    channels = model.fpn_dim if model.fpn else (64 if kw["backbone"] == "vgg16" else 4 * 8 * 4)
    assert [f.shape for f in out.features] == [(b, h // s, w // s, channels) for s in levels]


def test_flatten_order_matches_anchor_order():
    # Objectness value encodes (level, row, col, anchor); after flattening, anchor n must be
    # the cell anchor a shifted to cell (row, col) of that level.
    strides, sizes, ratios = (8, 16), ((16, 24), (32, 48)), (0.5, 1.0, 2.0)
    hws = [(4, 6), (2, 3)]
    level_anchors = anchors_lib.multilevel_anchors(hws, strides, sizes, ratios)
    cells = anchors_lib.level_cell_anchors(strides, sizes, ratios)
    a = cells[0].shape[0]
    objectness, deltas = [], []
    for lvl, (h, w) in enumerate(hws):
        i, j, k = np.meshgrid(np.arange(h), np.arange(w), np.arange(a), indexing="ij")
        code = (lvl * 1_000_000 + i * 10_000 + j * 100 + k).astype(np.float32)
        objectness.append(code[None])  # [1, H, W, A]
        deltas.append(np.stack([code] * 4, axis=-1)[None])  # [1, H, W, A, 4]
    out = RPNOutput(
        objectness=tuple(objectness),
        deltas=tuple(deltas),
        anchors=tuple(level_anchors),
        features=(),
        strides=strides,
    )
    flat = flatten_outputs(out)
    n = sum(h * w * a for h, w in hws)
    assert flat.objectness.shape == (1, n) and flat.deltas.shape == (1, n, 4)
    assert flat.anchors.shape == (n, 4) and isinstance(flat.anchors, np.ndarray)
    assert flat.level_sizes == (4 * 6 * a, 2 * 3 * a)
    np.testing.assert_array_equal(flat.level_ids, np.repeat([0, 1], flat.level_sizes))
    code = np.asarray(flat.objectness[0]).astype(np.int64)
    lvl, i, j, k = code // 1_000_000, code // 10_000 % 100, code // 100 % 100, code % 100
    np.testing.assert_array_equal(lvl, flat.level_ids)
    stride = np.asarray(strides)[lvl]
    shift = np.stack([j * stride, i * stride, j * stride, i * stride], axis=1)
    expected = shift + np.stack([cells[l][kk] for l, kk in zip(lvl, k, strict=True)])
    np.testing.assert_allclose(flat.anchors, expected, atol=1e-4)
    np.testing.assert_array_equal(flat.deltas[0, :, 2], flat.objectness[0])
    for lv in range(2):
        np.testing.assert_array_equal(
            flat.objectness_per_level[lv][0], code[flat.level_ids == lv].astype(np.float32)
        )
        np.testing.assert_array_equal(flat.anchors_per_level[lv], level_anchors[lv])


# ------------------------------------------------------------------ RPN forward (real compute)


@pytest.fixture(scope="module")
def fpn_model():
    """Default config (ResNet-18-FPN) made tiny: width 8, FPN/head 16 channels, 64x64 images,
    with detectron2's 3x3 head conv (the default has none) so every part is exercised."""
    config = _default_config()
    config.model.width = 8
    config.model.fpn_dim = 16
    config.model.head_convs = 1
    config.model.head_dim = 16
    model = build_rpn(config)
    variables = init_variables(model, KEY, (2, 64, 64, 3))
    images = RNG.uniform(-1.0, 1.0, size=(2, 64, 64, 3)).astype(np.float32)
    return config, model, variables, images


def test_build_rpn_reads_config(fpn_model):
    config, model, _, _ = fpn_model
    assert model.backbone == config.model.backbone and model.norm == config.model.norm
    assert model.strides == tuple(config.anchors.strides)
    assert model.sizes == tuple(tuple(s) for s in config.anchors.sizes)
    assert RPN.from_config(config) == build_rpn(config)
    assert RPN.from_config(config, axis_name="data").axis_name == "data"


def test_rpn_forward_gradients_and_one_compile(fpn_model):
    config, model, variables, images = fpn_model

    @chex.assert_max_traces(n=1)
    def loss_and_outputs(params, images):
        out = model.apply({**variables, "params": params}, images, train=False)
        flat = flatten_outputs(out)
        loss = jnp.mean(jax.nn.softplus(flat.objectness)) + jnp.mean(flat.deltas**2)
        return loss, flat

    step = jit(jax.value_and_grad(loss_and_outputs, has_aux=True))
    (_, flat), grads = step(variables["params"], images)
    (_, flat2), _ = step(variables["params"], images[::-1])  # same shape: no retrace
    np.testing.assert_allclose(flat2.objectness, flat.objectness[::-1], rtol=1e-5, atol=1e-6)
    assert not np.allclose(flat.objectness[0], flat.objectness[1])

    # Shapes and anchors of the flattened outputs.
    a = len(config.anchors.sizes[0]) * len(config.anchors.aspect_ratios)
    hws = [(64 // s, 64 // s) for s in config.anchors.strides]
    n = sum(h * w * a for h, w in hws)
    assert flat.objectness.shape == (2, n) and flat.objectness.dtype == jnp.float32
    assert flat.deltas.shape == (2, n, 4) and flat.level_ids.shape == (n,)
    ref = anchors_lib.multilevel_anchors(
        hws, config.anchors.strides, config.anchors.sizes, config.anchors.aspect_ratios
    )
    np.testing.assert_allclose(flat.anchors, np.concatenate(ref), atol=1e-5)
    assert flat.level_sizes == tuple(len(r) for r in ref)
    assert np.isfinite(flat.objectness).all() and np.isfinite(flat.deltas).all()

    # Gradients reach every part: backbone stem and last stage, FPN, head.
    assert set(grads) == {"body", "neck", "head"}
    for path in [
        ("body", "conv1", "kernel"),
        ("body", "layer4_1", "conv2", "kernel"),
        ("neck", "lateral2", "kernel"),
        ("neck", "output5", "bias"),
        ("head", "conv0", "kernel"),
        ("head", "objectness", "kernel"),
        ("head", "deltas", "bias"),
    ]:
        g = grads
        for p in path:
            g = g[p]
        g = np.asarray(g)
        assert np.isfinite(g).all() and np.abs(g).max() > 0, path


def test_bfloat16_compute_float32_params_and_outputs():
    model = _c4()
    bf16 = model.clone(dtype=jnp.bfloat16)
    images = RNG.normal(size=(2, 32, 32, 3)).astype(np.float32)
    shapes = _init_shapes(bf16, images.shape)
    assert {x.dtype for x in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
    variables = _random_variables(model, images, train=False)
    ref = jit(functools.partial(model.apply, train=False))(variables, images)
    out = jit(functools.partial(bf16.apply, train=False))(variables, images)
    for o, r in zip(out.objectness + out.deltas, ref.objectness + ref.deltas, strict=True):
        assert o.dtype == jnp.float32
        scale = float(np.abs(r).max())
        np.testing.assert_allclose(o, r, atol=0.05 * scale)


# ------------------------------------------------------------------ configuration errors


def test_level_count_mismatch_fails_at_init():
    model = RPN(backbone="resnet18", width=4, strides=(4, 8, 16, 32), sizes=((32,),) * 4)
    with pytest.raises(ValueError, match=r"gives 5 feature levels.*has 4 entries"):
        _init_shapes(model, (1, 64, 64, 3))


def test_sizes_levels_mismatch_fails_at_init():
    model = RPN(backbone="resnet18", width=4, sizes=((32,), (64,), (128,)))
    with pytest.raises(ValueError, match=r"anchors.sizes has 3 levels.*gives 5 feature levels"):
        _init_shapes(model, (1, 64, 64, 3))


def test_stride_mismatch_fails_at_init():
    model = _c4().clone(strides=(32,))
    with pytest.raises(ValueError, match=r"feature strides \(16,\).*anchors.strides is \(32,\)"):
        _init_shapes(model, (1, 32, 32, 3))


def test_different_anchors_per_level_fails_at_init():
    model = RPN(backbone="resnet18", width=4, sizes=((32,), (32, 64), (128,), (256,), (512,)))
    with pytest.raises(ValueError, match="same number of anchors per cell"):
        _init_shapes(model, (1, 64, 64, 3))


@pytest.mark.parametrize("shape", [(32, 32, 3), (1, 32, 32, 1), (1, 32, 32, 4)])
def test_bad_image_shape(shape):
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\].*" + re.escape(str(shape))):
        _init_shapes(_c4(), shape)


def test_fpn_takes_sizes_divisible_by_32_with_p6_by_ceil():
    # torchvision, detectron2 and mmdet pad to a multiple of 32; P6 = P5[::2, ::2] then has
    # ceil(H5 / 2) rows: 96 / 32 = 3 -> 2 rows, as their max_pool2d(P5, 1, 2) gives.
    model = RPN(backbone="resnet18", width=4)
    out = _apply_shapes(model, (1, 96, 128, 3))
    assert [o.shape[1:3] for o in out.objectness] == [(24, 32), (12, 16), (6, 8), (3, 4), (2, 2)]
    assert [a.shape[0] for a in out.anchors] == [24 * 32 * 3, 12 * 16 * 3, 6 * 8 * 3, 36, 12]


def test_image_not_divisible():
    model = RPN(backbone="resnet18", width=4)
    with pytest.raises(ValueError, match=r"\(80, 128\) must be divisible by 32 \(FPN\)"):
        _init_shapes(model, (1, 80, 128, 3))
    with pytest.raises(ValueError, match="divisible by the feature stride 16"):
        _init_shapes(_c4(), (1, 40, 32, 3))


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(backbone="resnet152"), "backbone must be one of"),
        (dict(backbone="vgg16", fpn=True), "fpn=True needs a ResNet"),
        (dict(norm="layer_norm"), "norm must be one of"),
        (dict(objectness="focal"), "objectness must be one of"),
    ],
)
def test_bad_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        _init_shapes(RPN(width=4, **kw), (1, 64, 64, 3))


def test_build_rpn_rejects_bad_dtype():
    config = _default_config()
    config.model.dtype = "float16"
    with pytest.raises(ValueError, match="model.dtype"):
        build_rpn(config)


# ------------------------------------------------------------------ norms


class _Norm(nn.Module):
    kind: str
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, *, train):
        return make_norm(
            self.kind, x.shape[-1], train=train, axis_name=self.axis_name, dtype=x.dtype, name="n"
        )(x)


def test_frozen_bn_is_fixed_affine():
    x = RNG.normal(size=(2, 3, 3, 4)).astype(np.float32)
    stats = {
        "scale": np.array([1.0, 2.0, 0.5, -1.0], np.float32),
        "bias": np.array([0.0, 1.0, -1.0, 0.5], np.float32),
        "mean": np.array([0.1, -0.2, 0.3, 0.0], np.float32),
        "var": np.array([1.0, 4.0, 0.25, 2.0], np.float32),
    }
    variables = {"batch_stats": {"n": stats}}
    y, updates = _Norm("frozen_bn").apply(variables, x, train=True, mutable=["batch_stats"])
    # detectron2 FrozenBatchNorm2d: (x - mean) / sqrt(var + 1e-5) * scale + bias.
    ref = (np.asarray(x) - stats["mean"]) / np.sqrt(stats["var"] + 1e-5) * stats["scale"]
    np.testing.assert_allclose(y, ref + stats["bias"], rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_equal(updates["batch_stats"]["n"], stats)  # never updated
    assert "params" not in _Norm("frozen_bn").init(KEY, x, train=False)


def test_batch_norm_train_and_eval():
    x = (3.0 + 2.0 * RNG.normal(size=(4, 3, 3, 2))).astype(np.float32)
    norm = _Norm("batch_norm")
    variables = norm.init(KEY, x, train=False)
    y, updates = norm.apply(variables, x, train=True, mutable=["batch_stats"])
    xn = np.asarray(x).reshape(-1, 2)
    mean, var = xn.mean(0), xn.var(0)  # biased variance normalises, as torch does
    np.testing.assert_allclose(y, (np.asarray(x) - mean) / np.sqrt(var + 1e-5), atol=1e-4)
    # Running mean after one step with torch momentum 0.1 (flax momentum 0.9) from 0.
    np.testing.assert_allclose(updates["batch_stats"]["n"]["mean"], 0.1 * mean, rtol=1e-5)
    y_eval = norm.apply(variables, x, train=False)  # running stats: mean 0, var 1
    np.testing.assert_allclose(y_eval, np.asarray(x) / np.sqrt(1 + 1e-5), rtol=1e-5)


def test_batch_norm_cross_device_matches_single_device():
    # Under shard_map over 4 devices with axis_name='data', statistics are those of the global
    # batch: outputs and updated running stats equal the single-device run on the whole batch.
    assert jax.device_count() >= 4
    x = (1.0 + RNG.normal(size=(8, 4, 4, 3))).astype(np.float32)
    single = _Norm("batch_norm")
    variables = single.init(KEY, x, train=False)
    ref, ref_upd = single.apply(variables, x, train=True, mutable=["batch_stats"])
    sharded = _Norm("batch_norm", axis_name="data")
    mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    step = jax.shard_map(
        lambda v, x: sharded.apply(v, x, train=True, mutable=["batch_stats"]),
        mesh=mesh,
        in_specs=(P(), P("data")),
        out_specs=(P("data"), P()),
    )
    y, upd = jax.jit(step)(variables, x)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(upd, ref_upd, rtol=1e-5, atol=1e-6)
    # A per-device (non-synchronised) BN would differ: check the test can fail.
    y_local = jax.jit(
        jax.shard_map(
            lambda v, x: single.apply(v, x, train=True, mutable=["batch_stats"])[0],
            mesh=mesh,
            in_specs=(P(), P("data")),
            out_specs=P("data"),
        )
    )(variables, x)
    assert not np.allclose(y_local, ref, atol=1e-3)


@pytest.mark.parametrize("channels, groups", [(64, 32), (48, 16), (8, 8)])
def test_group_norm_groups(channels, groups):
    x = (RNG.normal(size=(2, 3, 3, channels)) * np.arange(1, channels + 1)).astype(np.float32)
    norm = _Norm("group_norm")
    variables = norm.init(KEY, x, train=False)
    assert set(variables) == {"params"}
    y = norm.apply(variables, x, train=True)
    g = np.asarray(x).reshape(2, 9, groups, channels // groups)
    mean = g.mean(axis=(1, 3), keepdims=True)
    var = g.var(axis=(1, 3), keepdims=True)
    ref = ((g - mean) / np.sqrt(var + 1e-5)).reshape(x.shape)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("norm", ["frozen_bn", "batch_norm", "group_norm", "none"])
def test_rpn_norm_variables(norm):
    variables = _init_shapes(_c4(norm=norm), (1, 32, 32, 3))
    stem = variables["params"]["body"]
    if norm == "frozen_bn":
        assert set(variables["batch_stats"]["body"]["norm1"]) == {"scale", "bias", "mean", "var"}
        assert "norm1" not in stem
    elif norm == "batch_norm":
        assert set(variables["batch_stats"]["body"]["norm1"]) == {"mean", "var"}
        assert set(stem["norm1"]) == {"scale", "bias"}
    elif norm == "group_norm":
        assert "batch_stats" not in variables and set(stem["norm1"]) == {"scale", "bias"}
    else:
        assert "batch_stats" not in variables and "norm1" not in stem
    assert ("bias" in stem["conv1"]) == (norm == "none")
    if norm == "batch_norm":  # the trainer's model: init outside shard_map with train=False
        synced = _init_shapes(_c4(norm=norm, axis_name="data"), (1, 32, 32, 3))
        chex.assert_trees_all_equal_shapes(synced, variables)


def test_pixel_normalisation():
    mean, std = (100.0, 110.0, 120.0), (50.0, 60.0, 70.0)
    model = _c4(norm="none")
    images = RNG.uniform(0, 255, size=(1, 32, 32, 3)).astype(np.float32)
    variables = _random_variables(model, images, train=False)
    with_norm = model.clone(pixel_mean=mean, pixel_std=std)
    out = jit(functools.partial(with_norm.apply, train=False))(variables, images)
    normalised = (images - np.asarray(mean)) / np.asarray(std)
    ref = jit(functools.partial(model.apply, train=False))(variables, normalised)
    np.testing.assert_allclose(out.deltas[0], ref.deltas[0], rtol=1e-4, atol=1e-5)


def test_rpn_batch_norm_train_updates_stats():
    model = _c4(norm="batch_norm")
    images = RNG.normal(size=(2, 32, 32, 3)).astype(np.float32)
    variables = _random_variables(model, images, train=False)
    apply = jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))
    out, updates = apply(variables, images)
    assert out.objectness[0].shape == (2, 2, 2, 6)
    assert np.isfinite(out.objectness[0]).all() and np.isfinite(out.deltas[0]).all()
    before = variables["batch_stats"]["body"]["norm1"]["mean"]
    after = updates["batch_stats"]["body"]["norm1"]["mean"]
    assert not np.allclose(before, after)
