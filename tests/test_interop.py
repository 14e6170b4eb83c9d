"""jax_rpn.interop: safe reading, format detection, errors, the CLI, and training from weights.

Checkpoints here are torchvision's ResNet-18 (real torchvision, random weights, saved with
``torch.save``) and hand-written pickles; the model is ``configs/tiny.py`` at width 64 (the
width of torchvision's ResNet-18).
"""

import os
import pickle
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import torchvision

from configs import coco_r50_fpn, tiny
from jax_rpn import checkpoints, config_checks, interop, training
from jax_rpn.interop import keymap, safe_load
from jax_rpn.models import build_rpn, frozen_parameters
from jax_rpn.optim import create_optimizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**fields):
    config = tiny.get_config()
    config.model.width = 64  # torchvision's ResNet-18
    config.model.norm = "frozen_bn"
    for key, value in fields.items():
        section, name = key.split(".")
        config[section][name] = value
    return config


@pytest.fixture(scope="module")
def resnet18(tmp_path_factory):
    """torchvision ResNet-18 with random BN statistics, as a .pth file and a state dict."""
    torch.manual_seed(0)
    net = torchvision.models.resnet18()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    path = str(tmp_path_factory.mktemp("r18") / "resnet18.pth")
    torch.save(net.state_dict(), path)
    return path, {k: v.numpy() for k, v in net.state_dict().items()}


# --- safe loading ---------------------------------------------------------------------------


class _RunsCode:
    """Unpickling this calls ``os.system`` (what a malicious checkpoint does)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_with_objects_is_refused_before_anything_runs(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "model_final.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {"w": np.ones(3)}, "x": _RunsCode(marker)}, f)
    with pytest.raises(
        interop.UnsafeCheckpointError, match=r"model_final\.pkl.*(posix|os)\.system"
    ):
        interop.load_checkpoint(str(path), _config())
    assert not marker.exists()


def test_torch_file_with_objects_is_refused(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.ones(3)}, "x": _RunsCode(marker)}, path)
    with pytest.raises(interop.UnsafeCheckpointError, match=r"evil\.pth.*weights_only.*system"):
        interop.load_checkpoint(str(path), _config())
    assert not marker.exists()


def test_torch_files_may_hold_numpy_data(tmp_path):
    """mmdet's and mmengine's "meta" can hold numpy scalars and arrays: plain data, admitted."""
    path = tmp_path / "mmdet.pth"
    meta = {"seed": np.int64(3), "palette": np.zeros((2, 3), np.uint8), "CLASSES": ("a", "b")}
    torch.save({"meta": meta, "state_dict": {"neck.x.weight": torch.ones(2)}}, path)
    loaded = safe_load.load_file(str(path))
    assert loaded["meta"]["seed"] == 3 and loaded["meta"]["palette"].shape == (2, 3)
    assert safe_load.read_state_dict(str(path)).keys() == {"neck.x.weight"}


def test_plain_data_pickles_load():
    """numpy arrays and scalars, OrderedDict, lists, tuples, strings, bytes (protocol 2 spells
    them ``_codecs.encode``) and numbers: what detectron2's and Caffe2's pickles hold."""
    import collections
    import io

    data = {
        "model": collections.OrderedDict(w=np.arange(6, dtype=np.float32).reshape(2, 3)),
        "meta": ("a", 1, 2.5, [np.float32(3.0)], b"\x00\xff"),
    }
    for protocol in (2, 4):
        blob = pickle.dumps(data, protocol=protocol)
        loaded = safe_load.SafeUnpickler(io.BytesIO(blob), source="x").load()
        np.testing.assert_array_equal(loaded["model"]["w"], data["model"]["w"])
        assert loaded["meta"][:3] == ("a", 1, 2.5) and loaded["meta"][4] == b"\x00\xff"


def test_codecs_other_than_latin1_are_refused():
    import io

    # _codecs.encode("abc", "rot13") in protocol 2
    blob = b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x05\x00\x00\x00rot13\x86R."
    with pytest.raises(pickle.UnpicklingError, match="rot13"):
        safe_load.SafeUnpickler(io.BytesIO(blob), source="x").load()


@pytest.mark.parametrize("suffix", [".pth", ".pkl"])
def test_truncated_file_is_a_clear_error(tmp_path, resnet18, suffix):
    path, state = resnet18
    if suffix == ".pkl":
        data = pickle.dumps({k: v for k, v in state.items()}, protocol=2)
    else:
        with open(path, "rb") as f:
            data = f.read()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(interop.CheckpointError, match=rf"cut\{suffix}.*truncated"):
        interop.load_checkpoint(str(cut), _config())


def test_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        interop.load_checkpoint(str(tmp_path / "nothere.pth"), _config())


# --- formats and mismatches -----------------------------------------------------------------


@pytest.mark.parametrize(
    "keys, expected",
    [
        (["conv1.weight", "layer1.0.conv1.weight", "fc.weight"], "torchvision"),
        (["features.0.weight", "classifier.0.weight"], "torchvision"),
        (["backbone.body.conv1.weight", "rpn.head.cls_logits.weight"], "torchvision"),
        (["conv1_w", "res_conv1_bn_s", "res2_0_branch2a_w"], "detectron2"),
        (["stem.conv1.weight", "res2.0.conv1.weight"], "detectron2"),
        (["backbone.bottom_up.stem.conv1.weight", "proposal_generator.x"], "detectron2"),
        (["backbone.conv1.weight", "backbone.layer1.0.conv1.weight", "neck.x"], "mmdet"),
        (["encoder.layers.0.weight"], None),
    ],
)
def test_format_is_detected_from_the_keys(keys, expected):
    assert interop.detect_format(dict.fromkeys(keys)) == expected


def test_unknown_keys_are_an_error_that_shows_some(tmp_path):
    path = tmp_path / "vit.pth"
    torch.save({"encoder.layers.0.weight": torch.ones(2)}, path)
    with pytest.raises(interop.CheckpointError, match=r"vit\.pth.*encoder\.layers\.0\.weight"):
        interop.load_checkpoint(str(path), _config())


def test_checkpoint_for_another_architecture_lists_keys_and_shapes(resnet18):
    path, _ = resnet18
    config = _config(**{"model.backbone": "resnet50"})
    with pytest.raises(interop.CheckpointMismatchError) as e:
        interop.load_checkpoint(path, config)
    message = str(e.value)
    assert path in message
    assert "The file holds resnet18, the config model.backbone=resnet50." in message
    # ResNet-50's first block has a 1x1 conv1 of 64 -> 64; ResNet-18's a 3x3.
    assert "layer1.0.conv1.weight: expected [64, 64, 1, 1], found [64, 64, 3, 3]" in message
    assert "missing" in message and "layer1.0.conv3.weight [256, 64, 1, 1]" in message


def test_anchors_that_do_not_fit_the_head_name_both_counts():
    state = {
        f"rpn.head.{k}": np.zeros(s, np.float32)
        for k, s in [("cls_logits.weight", (3, 16, 1, 1)), ("bbox_pred.weight", (12, 16, 1, 1))]
    }
    config = _config(**{"model.width": 8, "model.fpn_dim": 16, "model.head_convs": 0})
    config.anchors.sizes = ((8, 10), (16, 20), (32, 40), (64, 80), (128, 160))  # 6 per cell
    with pytest.raises(interop.CheckpointMismatchError) as e:
        interop.torchvision.convert_state(state, config, source="head.pth")
    assert (
        "rpn.head.cls_logits.weight: expected [6, 16, 1, 1], found [3, 16, 1, 1] (the config "
        "gives 6 anchors per cell" in str(e.value)
    )


def test_a_detector_checkpoint_must_be_complete(resnet18):
    """Only whole parts may be absent (a backbone checkpoint's FPN and head): a Faster R-CNN
    file without its FPN output convs is an error, not a partial load."""
    with torch.device("meta"):
        model = torchvision.models.detection.fasterrcnn_resnet50_fpn(
            weights=None, weights_backbone=None
        )
    state = {
        k: np.zeros(v.shape, np.float32)
        for k, v in model.state_dict().items()
        if "layer_blocks" not in k
    }
    from configs import torchvision_fasterrcnn_r50_fpn

    with pytest.raises(interop.CheckpointMismatchError, match=r"layer_blocks\.0\.0\.weight"):
        interop.from_torchvision(state, torchvision_fasterrcnn_r50_fpn.get_config())


# --- the CLI and the converted folder --------------------------------------------------------


def _convert(*args, cwd=ROOT):
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("XLA_FLAGS", None)
    return subprocess.run(
        [sys.executable, "-m", "jax_rpn.interop", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=300,
    )


def test_cli_converts_once_and_training_reads_the_folder(tmp_path, resnet18):
    path, state = resnet18
    out = tmp_path / "r18"
    common = [
        f"--checkpoint={path}",
        f"--config={os.path.join(ROOT, 'configs', 'tiny.py')}",
        "--config.model.width=64",
        "--config.model.norm=frozen_bn",
    ]
    done = _convert("--from=torchvision", *common, f"--out={out}")
    assert done.returncode == 0, done.stderr
    assert "Loaded 100 arrays (backbone) in" in done.stdout and "Wrote" in done.stdout
    assert sorted(os.listdir(out)) == ["config.json", "report.json", "variables"]
    variables, config, step = checkpoints.load_variables(str(out))
    assert step is None and config.model.width == 64
    np.testing.assert_array_equal(
        variables["params"]["body"]["conv1"]["kernel"], state["conv1.weight"].transpose(2, 3, 1, 0)
    )
    # The folder initialises training: the same arrays, FPN and head from the seed.
    train_config = _config(**{"init.checkpoint": str(out)})
    loaded, report = interop.load_checkpoint(str(out), train_config)
    assert report.format == "jax_rpn variables folder"
    assert report.notes == (f"converted from torchvision classifier: {path}",)
    assert report.left_random == ("neck", "head")
    jax.tree.map(np.testing.assert_array_equal, loaded, variables)


def test_converted_folder_for_another_model_lists_its_variables(tmp_path, resnet18):
    path, _ = resnet18
    variables, _ = interop.from_torchvision(path, _config())
    out = checkpoints.save_variables(str(tmp_path / "w"), variables, config=_config())
    with pytest.raises(interop.CheckpointMismatchError) as e:
        interop.load_checkpoint(out, _config(**{"model.backbone": "resnet34"}))
    # ResNet-34 has 3 blocks in layer1, ResNet-18 2: shapes in jax_rpn's layout.
    assert "missing" in str(e.value) and "batch_stats/body/layer1_2/norm1/mean [64]" in str(e.value)


def test_failed_conversion_writes_nothing(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(interop.CheckpointError, match="bad.pth"):
        interop.convert(str(bad), _config(), str(tmp_path / "out"))
    assert os.listdir(tmp_path) == ["bad.pth"]  # no folder, no temporary sibling


def test_converted_folder_for_another_convention_is_refused(tmp_path, resnet18):
    path, _ = resnet18
    variables, report = interop.from_torchvision(path, _config())
    out = checkpoints.save_variables(
        str(tmp_path / "w"), variables, config=_config(), report=report.to_dict()
    )
    bgr = _config(**{"data.channel_order": "bgr"})
    with pytest.raises(interop.CheckpointError, match=r"data\.channel_order: stored 'rgb'"):
        interop.load_checkpoint(out, bgr)


# --- training from a checkpoint ---------------------------------------------------------------


def test_frozen_bn_without_weights_is_refused_unless_asked():
    config = _config()
    with pytest.raises(
        ValueError,
        match=r"model\.norm is 'frozen_bn'.*init\.checkpoint.*"
        r"allow_random_frozen_bn",
    ):
        config_checks.validate(config)
    config.init.allow_random_frozen_bn = True
    config_checks.validate(config)
    fpn = _config(**{"model.norm": "batch_norm", "model.fpn_norm": "frozen_bn"})
    with pytest.raises(ValueError, match=r"model\.fpn_norm is 'frozen_bn'"):
        config_checks.validate(fpn)
    peer = coco_r50_fpn.get_config()
    with pytest.raises(ValueError, match="frozen_bn"):
        config_checks.validate(peer)
    peer.init.checkpoint = "R-50.pkl"  # read when training starts
    config_checks.validate(peer)


def _random_batch(config, seed=0):
    rng = np.random.default_rng(seed)
    b, (h, w), g = config.batch_size, config.data.pad_to, config.data.max_boxes
    xy = rng.uniform(0, 40, (b, g, 2))
    return {
        "image": rng.normal(size=(b, h, w, 3)).astype(np.float32),
        "boxes": np.concatenate([xy, xy + rng.uniform(8, 24, (b, g, 2))], -1).astype(np.float32),
        "valid": np.ones((b, g), bool),
        "ignore": np.zeros((b, g), bool),
        "image_hw": np.full((b, 2), h, np.int32),
        "example_valid": np.ones((b,), bool),
    }


@pytest.fixture(scope="module")
def narrow_resnet18(tmp_path_factory):
    """A ResNet-18 of width 8 in torchvision's classifier names and layout (``to_torchvision``
    of random variables with random BN statistics): small enough to train from in a test."""
    config = _config(**{"model.width": 8})
    rng = np.random.default_rng(1)
    draw = {
        "kernel": lambda s: rng.normal(0, np.sqrt(2 / np.prod(s[:-1])), s),
        "scale": lambda s: rng.uniform(0.5, 1.5, s),
        "bias": lambda s: rng.normal(0, 0.1, s),
        "mean": lambda s: rng.normal(0, 0.2, s),
        "var": lambda s: rng.uniform(0.5, 2.0, s),
    }
    body = {
        p: draw[p[-1]](s).astype(np.float32)
        for p, s in keymap.template(config).items()
        if p[1] == "body"
    }
    state = interop.to_torchvision(keymap.unflatten(body), config, backbone_only=True)
    assert "layer4.1.bn2.running_var" in state and "conv1.weight" in state
    path = str(tmp_path_factory.mktemp("narrow") / "resnet18_w8.pth")
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, path)
    return path, state


def test_training_starts_from_the_checkpoint_and_freeze_at_holds_the_stem(narrow_resnet18, capsys):
    from jax_rpn import parallel

    path, state = narrow_resnet18
    config = _config(**{"model.width": 8, "init.checkpoint": path, "model.freeze_at": 2})
    config.batch_size = 2
    frozen = frozen_parameters(config.model.backbone, config.model.freeze_at)
    tx, schedule = create_optimizer(config.optim, config.num_train_steps, frozen=frozen)
    state0 = training.create_train_state(config, build_rpn(config), tx, jax.random.key(0))
    printed = capsys.readouterr().out
    assert f"s from torchvision classifier: {path}" in printed
    assert "partial load: FPN, RPN head not in the file, left at random init" in printed
    body = state0.model_state["batch_stats"]["body"]
    np.testing.assert_array_equal(
        body["layer2_0"]["norm1"]["var"], state["layer2.0.bn1.running_var"]
    )
    np.testing.assert_array_equal(
        state0.params["body"]["layer3_1"]["conv2"]["kernel"],
        state["layer3.1.conv2.weight"].transpose(2, 3, 1, 0),
    )
    # Two SGD steps: the stem and res2 (layer1) stay as loaded; res3.., FPN and head move.
    mesh = parallel.data_mesh(jax.devices()[:1])
    step = parallel.parallelize(
        training.make_train_step(config, build_rpn(config, axis_name=parallel.AXIS), tx, schedule),
        mode="shard_map",
        mesh=mesh,
    )
    state1 = jax.device_put(state0, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    for seed in range(2):
        batch = parallel.shard_batch(_random_batch(config, seed), mode="shard_map", mesh=mesh)
        state1, metrics = step(state1, batch)
        assert np.isfinite(float(metrics["loss"]))
    flat0 = keymap.flatten(jax.device_get(state0.params))
    flat1 = keymap.flatten(jax.device_get(state1.params))
    for path_, value in flat0.items():
        assert np.array_equal(value, flat1[path_]) == frozen(path_), path_
    assert len(jax.tree.leaves(state1.opt_state)) < 2 * len(flat0)  # no momentum for frozen


def test_a_resumed_run_does_not_read_init_checkpoint(tmp_path):
    # The Trainer passes load_init=False when the workdir has a checkpoint: the weights file
    # may be gone by then, and the workdir's own weights replace it anyway.
    config = _config(**{"model.width": 8, "init.checkpoint": str(tmp_path / "deleted.pth")})
    fresh = keymap.unflatten(
        {p: np.zeros(s, np.float32) for p, s in keymap.template(config).items()}
    )
    with pytest.raises(FileNotFoundError, match="deleted.pth"):
        interop.initialize(fresh, config)  # what create_train_state does by default
    tx, _ = create_optimizer(config.optim, config.num_train_steps)
    state = training.create_train_state(
        config, build_rpn(config), tx, jax.random.key(0), load_init=False
    )
    assert int(state.step) == 0


def test_report_summary_and_dict():
    report = keymap.LoadReport(
        source="x.pth", format="torchvision classifier", loaded=3, loaded_parts=("body",)
    )
    report.left_random = ("neck", "head")
    report.ignored = {"the ImageNet classifier": 2}
    assert report.summary().splitlines() == [
        "Loaded 3 arrays (backbone) in 0.0 s from torchvision classifier: x.pth",
        "  partial load: FPN, RPN head not in the file, left at random init",
        "  skipped 2 keys: the ImageNet classifier",
    ]
    assert report.to_dict()["left_random"] == ("neck", "head") and not report.complete
