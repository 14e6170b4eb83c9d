"""detectron2 and mmdet checkpoints in their published names and layouts, against numpy.

Neither library installs here, so each test builds a checkpoint the way the library lays it
out, from its published source: detectron2's ``modeling/backbone/resnet.py`` (``stem.conv1``
with ``.norm``, ``res<s>.<b>.conv<k>``, ``.shortcut`` on each stage's first block),
``fpn.py`` (``fpn_lateral<l>``, ``fpn_output<l>``, P6 = max-pool of P5),
``proposal_generator/rpn.py`` (``rpn_head.conv``, ``objectness_logits``, ``anchor_deltas``),
the Caffe2 blob names of ``checkpoint/c2_model_loading.py`` (``res2_0_branch2a_w``,
``res_conv1_bn_s``) and its model-zoo pickles (``{"model": ..., "__author__": ...}``);
mmdet's ResNet (``backbone.layer1.0.bn1``, ``downsample.0/1``), ``necks/fpn.py``
(``neck.lateral_convs.<i>.conv``, ``neck.fpn_convs.<i>.conv``, ``fpn_convs.4`` for an extra
conv) and ``dense_heads/rpn_head.py`` (``rpn_conv``, ``rpn_cls``, ``rpn_reg``) in
``{"meta": ..., "state_dict": ...}``. Small models (ResNet-50 layout at width 8), random
weights and BN statistics.

The expected features and head outputs come from a float64 numpy forward pass written from the
same sources, reading the checkpoint in the peer's own names: PyTorch convolutions, frozen BN
``(x - mean) / sqrt(var + 1e-5) * weight + bias`` (Caffe2 blobs as detectron2 loads them:
mean 0, var 1), MSRA bottlenecks with the stride in the first 1x1 (detectron2's
``STRIDE_IN_1X1``), PyTorch-style ones with it in the 3x3 (mmdet ``style='pytorch'``).
"""

import functools
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from configs import coco_r50_c4, coco_r50_fpn, mmdet_rpn_r50_fpn
from jax_rpn import interop
from jax_rpn.models import FPN, ResNet, build_rpn

WIDTH, FPN_DIM, A = 8, 16, 3
BLOCKS = (3, 4, 6, 3)  # ResNet-50
IMAGES = (2, 3, 64, 96)  # NCHW
# Compiled without XLA optimisation: the same numbers, much faster to compile.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


# --- numpy reference (PyTorch semantics, NCHW, float64) ------------------------------------


def conv(x, w, b=None, *, stride=1, pad=None):
    """``torch.nn.functional.conv2d``: ``x [N, C, H, W]``, ``w [O, C, k, k]``, padding k // 2."""
    k = w.shape[-1]
    pad = k // 2 if pad is None else pad
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    win = np.lib.stride_tricks.sliding_window_view(xp, (k, k), axis=(2, 3))[
        :, :, ::stride, ::stride
    ]  # [N, C, Ho, Wo, k, k]
    y = np.einsum("nchwij,ocij->nohw", win, w.astype(np.float64), optimize=True)
    return y if b is None else y + b[None, :, None, None]


def frozen_bn(x, weight, bias, mean, var):
    scale = weight / np.sqrt(var + 1e-5)
    return x * scale[None, :, None, None] + (bias - mean * scale)[None, :, None, None]


def relu(x):
    return np.maximum(x, 0.0)


def max_pool_3x3_s2(x):
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
    return np.lib.stride_tricks.sliding_window_view(xp, (3, 3), axis=(2, 3))[:, :, ::2, ::2].max(
        axis=(-1, -2)
    )


def resnet_reference(x, stem, blocks, *, stride_in_1x1):
    """C2..C5 of a bottleneck ResNet. ``stem`` = (conv weight, bn tuple); ``blocks[s][b]`` =
    dict of ``conv1..conv3`` and optional ``shortcut``, each (weight, bn tuple)."""
    x = max_pool_3x3_s2(relu(frozen_bn(conv(x, stem[0], stride=2), *stem[1])))
    outs = []
    for s, stage in enumerate(blocks):
        for b, p in enumerate(stage):
            stride = 2 if s > 0 and b == 0 else 1
            s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
            y = relu(frozen_bn(conv(x, p["conv1"][0], stride=s1), *p["conv1"][1]))
            y = relu(frozen_bn(conv(y, p["conv2"][0], stride=s3), *p["conv2"][1]))
            y = frozen_bn(conv(y, p["conv3"][0]), *p["conv3"][1])
            if "shortcut" in p:
                x = frozen_bn(conv(x, p["shortcut"][0], stride=stride), *p["shortcut"][1])
            x = relu(y + x)
        outs.append(x)
    return outs


def fpn_reference(cs, lateral, output, p6=None):
    """P2..P6 from C2..C5: ``lateral[l]`` / ``output[l]`` = (weight, bias) for l = 2..5;
    ``p6`` = (weight, bias, "c5" or "p5") for a stride-2 3x3 conv, else a max-pool."""
    prev, ps = None, {}
    for level in (5, 4, 3, 2):
        x = conv(cs[level - 2], *lateral[level])
        if prev is not None:
            x = x + prev.repeat(2, axis=2).repeat(2, axis=3)  # nearest x2
        prev = x
        ps[level] = conv(x, *output[level])
    if p6 is None:
        ps[6] = ps[5][:, :, ::2, ::2]
    else:
        ps[6] = conv(cs[3] if p6[2] == "c5" else ps[5], p6[0], p6[1], stride=2)
    return [ps[level] for level in range(2, 7)]


def head_reference(ps, hidden, objectness, deltas):
    outs = []
    for p in ps:
        t = relu(conv(p, *hidden))
        outs.append((conv(t, *objectness), conv(t, *deltas)))
    return outs


# --- checkpoints in the peers' layouts ---------------------------------------------------


def _bottlenecks(width=WIDTH, counts=BLOCKS):
    """(stage 2..5, block, in, mid, out channels, has shortcut) as detectron2's
    build_resnet_backbone and mmdet's ResNet build them."""
    cin = width
    for s, n in enumerate(counts):
        mid, out = width * 2**s, 4 * width * 2**s
        for b in range(n):
            yield s + 2, b, cin, mid, out, b == 0
            cin = out


class Params:
    """Random conv weights and BN statistics, named by the caller."""

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)
        self.state = {}

    def conv(self, name, cout, cin, k, *, bias=False):
        fan_in = cin * k * k
        self.state[name + "weight"] = self.rng.normal(0, np.sqrt(2 / fan_in), (cout, cin, k, k))
        if bias:
            self.state[name + "bias"] = self.rng.normal(0, 0.1, cout)

    def bn(self, name, c, *, leaves=("weight", "bias", "running_mean", "running_var")):
        values = (
            self.rng.uniform(0.5, 1.5, c),
            self.rng.uniform(-0.3, 0.3, c),
            self.rng.normal(0, 0.2, c),
            self.rng.uniform(0.5, 2.0, c),
        )
        for leaf, v in zip(leaves, values, strict=False):
            self.state[name + leaf] = v

    def float32(self):
        return {k: np.asarray(v, np.float32) for k, v in self.state.items()}


def detectron2_state(seed, *, prefix="backbone.bottom_up.", fpn=True, num_anchors=A):
    """A detectron2 model (RPN R-FPN, or R-C4 with ``fpn=False``: res2..res4, head on res4)."""
    p = Params(seed)
    p.conv(f"{prefix}stem.conv1.", WIDTH, 3, 7)
    p.bn(f"{prefix}stem.conv1.norm.", WIDTH)
    counts = BLOCKS if fpn else BLOCKS[:3]
    for s, b, cin, mid, out, short in _bottlenecks(counts=counts):
        name = f"{prefix}res{s}.{b}."
        for k, (co, ci, ks) in enumerate([(mid, cin, 1), (mid, mid, 3), (out, mid, 1)], 1):
            p.conv(f"{name}conv{k}.", co, ci, ks)
            p.bn(f"{name}conv{k}.norm.", co)
        if short:
            p.conv(f"{name}shortcut.", out, cin, 1)
            p.bn(f"{name}shortcut.norm.", out)
    dim = FPN_DIM
    if fpn:
        for level, cin in zip(range(2, 6), (4, 8, 16, 32), strict=True):
            p.conv(f"backbone.fpn_lateral{level}.", dim, cin * WIDTH, 1, bias=True)
            p.conv(f"backbone.fpn_output{level}.", dim, dim, 3, bias=True)
    else:
        dim = 16 * WIDTH  # the head on res4
    p.conv("proposal_generator.rpn_head.conv.", dim, dim, 3, bias=True)
    p.conv("proposal_generator.rpn_head.objectness_logits.", num_anchors, dim, 1, bias=True)
    p.conv("proposal_generator.rpn_head.anchor_deltas.", 4 * num_anchors, dim, 1, bias=True)
    p.conv("roi_heads.box_predictor.cls_score.", 81, 32, 1, bias=True)  # not the RPN's
    return p.float32()


def caffe2_state(seed):
    """MSRA ImageNet R-50 blobs as in detectron2's R-50.pkl: BN folded into ``_bn_s``/``_bn_b``."""
    p = Params(seed)
    p.conv("conv1_", WIDTH, 3, 7)
    p.bn("res_conv1_bn_", WIDTH, leaves=("s", "b"))
    for s, b, cin, mid, out, short in _bottlenecks():
        for branch, (co, ci, ks) in zip(
            "abc", [(mid, cin, 1), (mid, mid, 3), (out, mid, 1)], strict=True
        ):
            p.conv(f"res{s}_{b}_branch2{branch}_", co, ci, ks)
            p.bn(f"res{s}_{b}_branch2{branch}_bn_", co, leaves=("s", "b"))
        if short:
            p.conv(f"res{s}_{b}_branch1_", out, cin, 1)
            p.bn(f"res{s}_{b}_branch1_bn_", out, leaves=("s", "b"))
    state = {k.replace("_weight", "_w"): v for k, v in p.float32().items()}
    state["fc1000_w"] = np.zeros((10, 32 * WIDTH), np.float32)  # the ImageNet classifier
    state["fc1000_b"] = np.zeros((10,), np.float32)
    state["res2_0_branch2a_w_momentum"] = np.zeros_like(state["res2_0_branch2a_w"])
    return state


def mmdet_state(seed, *, extra_conv_in=None):
    """mmdet RPN: mmcv/mmdet ResNet, FPN (with ``fpn_convs.4`` when ``extra_conv_in``), head."""
    p = Params(seed)
    p.conv("backbone.conv1.", WIDTH, 3, 7)
    p.bn("backbone.bn1.", WIDTH)
    for s, b, cin, mid, out, short in _bottlenecks():
        name = f"backbone.layer{s - 1}.{b}."
        for k, (co, ci, ks) in enumerate([(mid, cin, 1), (mid, mid, 3), (out, mid, 1)], 1):
            p.conv(f"{name}conv{k}.", co, ci, ks)
            p.bn(f"{name}bn{k}.", co)
        if short:
            p.conv(f"{name}downsample.0.", out, cin, 1)
            p.bn(f"{name}downsample.1.", out)
    for i, cin in enumerate((4, 8, 16, 32)):
        p.conv(f"neck.lateral_convs.{i}.conv.", FPN_DIM, cin * WIDTH, 1, bias=True)
        p.conv(f"neck.fpn_convs.{i}.conv.", FPN_DIM, FPN_DIM, 3, bias=True)
    if extra_conv_in is not None:
        p.conv("neck.fpn_convs.4.conv.", FPN_DIM, extra_conv_in, 3, bias=True)
    p.conv("rpn_head.rpn_conv.", FPN_DIM, FPN_DIM, 3, bias=True)
    p.conv("rpn_head.rpn_cls.", A, FPN_DIM, 1, bias=True)
    p.conv("rpn_head.rpn_reg.", 4 * A, FPN_DIM, 1, bias=True)
    state = p.float32()
    for key in [k for k in state if k.endswith("running_var")]:
        state[key.replace("running_var", "num_batches_tracked")] = np.array(100, np.int64)
    return state


def _blocks(conv_bn, counts=BLOCKS):
    """The reference's block parameters, read through ``conv_bn(stage, block, part)``."""
    stages = [[] for _ in counts]
    for s, b, *_, short in _bottlenecks(counts=counts):
        parts = ["conv1", "conv2", "conv3"] + (["shortcut"] if short else [])
        stages[s - 2].append({part: conv_bn(s, b, part) for part in parts})
    return stages


def _images(seed=0):
    rng = np.random.default_rng(seed)
    n, c, h, w = IMAGES
    x = np.zeros(IMAGES)
    for cell in (2, 8, 32):  # structure at several scales
        coarse = rng.normal(size=(n, c, h // cell + 1, w // cell + 1))
        x += coarse.repeat(cell, 2).repeat(cell, 3)[:, :, :h, :w]
    return x


def _config(module, **model):
    config = module.get_config()
    config.model.width = WIDTH
    config.model.fpn_dim = FPN_DIM
    config.model.head_dim = FPN_DIM if config.model.fpn else None
    for k, v in model.items():
        config.model[k] = v
    return config


@functools.lru_cache(maxsize=4)
def _forward(model):
    """The jitted forward of ``model`` returning (RPNOutput, C2..C5)."""

    def forward(variables, images):
        out, state = model.apply(
            variables,
            images,
            train=False,
            capture_intermediates=lambda module, method: isinstance(module, ResNet),
            mutable=["intermediates"],
        )
        c = state["intermediates"]["body"]["__call__"][0]
        return out, [c[k] for k in ("C2", "C3", "C4", "C5")]

    return jit(forward)


def _run(config, variables, x):
    """jax_rpn's C2..C5, P2..P6 and head outputs, NCHW like the reference."""
    out, cs = _forward(build_rpn(config))(variables, jnp.asarray(x.transpose(0, 2, 3, 1)))
    nchw = [np.asarray(c).transpose(0, 3, 1, 2) for c in cs]
    head = [
        (
            np.asarray(o).transpose(0, 3, 1, 2),
            np.asarray(d).reshape(*d.shape[:3], -1).transpose(0, 3, 1, 2),
        )
        for o, d in zip(out.objectness, out.deltas, strict=True)
    ]
    return nchw, [np.asarray(f).transpose(0, 3, 1, 2) for f in out.features], head


def assert_close(ours, ref, what, rtol=1e-4):
    """Each array within ``rtol`` of the reference's largest magnitude."""
    for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
        assert a.shape == b.shape, (what, i, a.shape, b.shape)
        err = np.abs(a - b).max() / np.abs(b).max()
        assert err <= rtol, f"{what}[{i}]: {err:.2e}"


def _with_zero_neck_and_head(config, variables):
    """``variables`` (a backbone) completed with zeros where the model has more."""
    tmpl = interop.keymap.template(config)
    flat = {path: np.zeros(shape, np.float32) for path, shape in tmpl.items()}
    flat.update(interop.keymap.flatten(variables))
    return interop.keymap.unflatten(flat)


# --- detectron2 -----------------------------------------------------------------------------


def test_detectron2_model_zoo_pickle_matches_numpy(tmp_path):
    state = detectron2_state(0)
    state["pixel_mean"] = np.array([103.53, 116.28, 123.675], np.float32).reshape(3, 1, 1)
    path = tmp_path / "model_final_02ce48.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": state, "__author__": "Detectron2 Model Zoo"}, f)
    config = _config(coco_r50_fpn)
    variables, report = interop.from_detectron2(str(path), config)
    num_weights = len(state) - 3  # pixel_mean and the roi_heads predictor are not the RPN's
    assert report.loaded == num_weights and report.left_random == ()
    assert report.ignored == {
        "Faster R-CNN's second stage (jax_rpn is its first stage)": 2,
        "input normalisation (checked against config.data)": 1,
    }

    def conv_bn(s, b, part):
        name = f"backbone.bottom_up.res{s}.{b}.{part}."
        return state[name + "weight"], tuple(
            state[name + "norm." + leaf]
            for leaf in ("weight", "bias", "running_mean", "running_var")
        )

    x = _images()
    stem_bn = tuple(
        state[f"backbone.bottom_up.stem.conv1.norm.{leaf}"]
        for leaf in ("weight", "bias", "running_mean", "running_var")
    )
    cs = resnet_reference(
        x,
        (state["backbone.bottom_up.stem.conv1.weight"], stem_bn),
        _blocks(conv_bn),
        stride_in_1x1=True,
    )
    wb = lambda name: (state[name + ".weight"], state[name + ".bias"])  # noqa: E731
    ps = fpn_reference(
        cs,
        {level: wb(f"backbone.fpn_lateral{level}") for level in range(2, 6)},
        {level: wb(f"backbone.fpn_output{level}") for level in range(2, 6)},
    )
    head = "proposal_generator.rpn_head."
    outs = head_reference(
        ps, wb(head + "conv"), wb(head + "objectness_logits"), wb(head + "anchor_deltas")
    )
    our_cs, our_ps, our_head = _run(config, variables, x)
    assert_close(our_cs, cs, "C2..C5")
    assert_close(our_ps, ps, "P2..P6")
    assert_close([o for o, _ in our_head], [o for o, _ in outs], "objectness")
    assert_close([d for _, d in our_head], [d for _, d in outs], "deltas")


def test_caffe2_imagenet_r50_pickle_matches_numpy(tmp_path):
    """detectron2's ImageNetPretrained/MSRA/R-50.pkl layout, pickled with protocol 2 as
    Python 2 wrote it: a backbone; FPN and head stay random; BN mean 0 and var 1 are set."""
    state = caffe2_state(1)
    path = tmp_path / "R-50.pkl"
    with open(path, "wb") as f:
        pickle.dump(state, f, protocol=2)
    config = _config(coco_r50_fpn)
    variables, report = interop.from_detectron2(str(path), config)
    num_bn = sum(k.endswith("_bn_s") for k in state)
    assert report.loaded == len(state) - 3  # fc1000_w/_b ignored, the momentum blob dropped
    assert report.filled == {"mean": num_bn, "var": num_bn}
    assert report.left_random == ("neck", "head")
    assert set(variables["params"]) == {"body"}

    def affine(name):  # Caffe2 folds BN: detectron2 loads it with mean 0, var 1
        return (state[name + "_s"], state[name + "_b"], 0.0, 1.0)

    def conv_bn(s, b, part):
        branch = {"conv1": "2a", "conv2": "2b", "conv3": "2c", "shortcut": "1"}[part]
        name = f"res{s}_{b}_branch{branch}"
        return state[name + "_w"], affine(name + "_bn")

    x = _images(1)
    cs = resnet_reference(
        x, (state["conv1_w"], affine("res_conv1_bn")), _blocks(conv_bn), stride_in_1x1=True
    )
    our_cs, _, _ = _run(config, _with_zero_neck_and_head(config, variables), x)
    assert_close(our_cs, cs, "C2..C5")


def test_caffe2_weights_need_the_msra_convention(tmp_path):
    path = tmp_path / "R-50.pkl"
    with open(path, "wb") as f:
        pickle.dump(caffe2_state(2), f, protocol=2)
    config = _config(mmdet_rpn_r50_fpn)  # torchvision's convention: RGB, std, stride in 3x3
    with pytest.raises(interop.CheckpointError, match=r"R-50\.pkl holds Caffe2.*stride_in_1x1"):
        interop.from_detectron2(str(path), config)


def test_caffe2_file_missing_a_norm_lists_its_blobs():
    state = caffe2_state(9)
    del state["res3_0_branch2a_bn_s"], state["res3_0_branch2a_bn_b"]
    with pytest.raises(interop.CheckpointMismatchError) as e:
        interop.from_detectron2(state, _config(coco_r50_fpn))
    message = str(e.value)
    assert f"res3_0_branch2a_bn_s [{2 * WIDTH}]" in message
    assert f"res3_0_branch2a_bn.mean = 0 [{2 * WIDTH}]" in message  # set only with its blobs


def test_detectron2_pixel_mean_must_match_the_config(tmp_path):
    state = detectron2_state(3)
    state["pixel_mean"] = np.array([123.675, 116.28, 103.53], np.float32)  # an RGB model
    config = _config(coco_r50_fpn)
    with pytest.raises(interop.CheckpointError, match=r"pixel_mean \[123\.675.*config\.data"):
        interop.from_detectron2(state, config)


def test_detectron2_backbone_in_its_own_names_maps():
    """A backbone in detectron2's names without a model prefix (what its
    convert-torchvision-to-d2.py writes): ``stem.conv1.*``, ``res2.0.conv1.norm.*``."""
    state = detectron2_state(10, prefix="")
    body = {k: v for k, v in state.items() if k.startswith(("stem.", "res"))}
    variables, report = interop.from_detectron2(body, _config(coco_r50_fpn))
    assert report.format == "detectron2 backbone" and report.loaded == len(body)
    assert report.left_random == ("neck", "head")
    np.testing.assert_array_equal(
        variables["params"]["body"]["layer4_2"]["conv3"]["kernel"],
        body["res5.2.conv3.weight"].transpose(2, 3, 1, 0),
    )


def test_detectron2_r50_c4_keys_map():
    """RPN R50-C4: ``backbone.stem``/``backbone.res2..4`` (no res5), the head on res4 with 15
    anchors per cell (5 sizes x 3 ratios)."""
    state = detectron2_state(4, prefix="backbone.", fpn=False, num_anchors=15)
    variables, report = interop.from_detectron2(state, _config(coco_r50_c4))
    assert report.loaded == len(state) - 2  # the roi_heads predictor
    assert variables["params"]["head"]["objectness"]["kernel"].shape == (1, 1, 16 * WIDTH, 15)


# --- mmdet ----------------------------------------------------------------------------------


def _mmdet_reference(state, x, *, p6=None):
    def bn(name):
        return tuple(
            state[name + leaf] for leaf in ("weight", "bias", "running_mean", "running_var")
        )

    def conv_bn(s, b, part):
        name = f"backbone.layer{s - 1}.{b}."
        if part == "shortcut":
            return state[name + "downsample.0.weight"], bn(name + "downsample.1.")
        k = part[-1]
        return state[f"{name}conv{k}.weight"], bn(f"{name}bn{k}.")

    cs = resnet_reference(
        x,
        (state["backbone.conv1.weight"], bn("backbone.bn1.")),
        _blocks(conv_bn),
        stride_in_1x1=False,
    )
    wb = lambda name: (state[name + ".weight"], state[name + ".bias"])  # noqa: E731
    ps = fpn_reference(
        cs,
        {level: wb(f"neck.lateral_convs.{level - 2}.conv") for level in range(2, 6)},
        {level: wb(f"neck.fpn_convs.{level - 2}.conv") for level in range(2, 6)},
        p6=None if p6 is None else (*wb("neck.fpn_convs.4.conv"), p6),
    )
    outs = head_reference(
        ps, wb("rpn_head.rpn_conv"), wb("rpn_head.rpn_cls"), wb("rpn_head.rpn_reg")
    )
    return cs, ps, outs


def test_mmdet_rpn_checkpoint_matches_numpy(tmp_path):
    state = mmdet_state(5)
    path = tmp_path / "rpn_r50_fpn_1x_coco_20200218-5525fa2e.pth"
    torch.save(
        {
            "meta": {"mmdet_version": "2.10.0", "CLASSES": ("person", "bicycle"), "epoch": 12},
            "state_dict": {k: torch.from_numpy(v) for k, v in state.items()},
        },
        path,
    )
    config = _config(mmdet_rpn_r50_fpn)
    variables, report = interop.from_mmdet(str(path), config)
    counters = sum(k.endswith("num_batches_tracked") for k in state)
    assert report.loaded == len(state) - counters and report.left_random == ()
    x = _images(2)
    cs, ps, outs = _mmdet_reference(state, x)
    our_cs, our_ps, our_head = _run(config, variables, x)
    assert_close(our_cs, cs, "C2..C5")
    assert_close(our_ps, ps, "P2..P6")
    assert_close([o for o, _ in our_head], [o for o, _ in outs], "objectness")
    assert_close([d for _, d in our_head], [d for _, d in outs], "deltas")


@pytest.mark.parametrize("p6, source", [("conv_c5", "c5"), ("conv_p5", "p5")])
def test_mmdet_extra_conv_p6_matches_numpy(p6, source):
    """``add_extra_convs='on_input'`` (P6 = 3x3 stride-2 conv of C5) and ``'on_output'`` (of
    P5): ``neck.fpn_convs.4``. The FPN alone, on random C2..C5."""
    state = mmdet_state(6, extra_conv_in=32 * WIDTH if source == "c5" else FPN_DIM)
    config = _config(mmdet_rpn_r50_fpn, fpn_p6=p6)
    variables, _ = interop.from_mmdet(state, config)
    rng = np.random.default_rng(7)
    cs = [
        rng.normal(size=(2, c * WIDTH, 16 // 2**i, 24 // 2**i))
        for i, c in enumerate((4, 8, 16, 32))
    ]
    wb = lambda name: (state[name + ".weight"], state[name + ".bias"])  # noqa: E731
    ps = fpn_reference(
        cs,
        {level: wb(f"neck.lateral_convs.{level - 2}.conv") for level in range(2, 6)},
        {level: wb(f"neck.fpn_convs.{level - 2}.conv") for level in range(2, 6)},
        p6=(*wb("neck.fpn_convs.4.conv"), source),
    )
    neck = FPN(dim=FPN_DIM, p6=p6)
    ours = jit(neck.apply)(
        {"params": variables["params"]["neck"]},
        {f"C{i + 2}": jnp.asarray(c.transpose(0, 2, 3, 1)) for i, c in enumerate(cs)},
    )
    assert_close([np.asarray(ours[f"P{i}"]).transpose(0, 3, 1, 2) for i in range(2, 7)], ps, "P")


def test_mmdet_without_the_extra_conv_is_refused_for_a_conv_p6_config():
    config = _config(mmdet_rpn_r50_fpn, fpn_p6="conv_c5")
    with pytest.raises(
        interop.CheckpointMismatchError, match=r"(?s)missing.*neck\.fpn_convs\.4\.conv"
    ):
        interop.from_mmdet(mmdet_state(8), config)
