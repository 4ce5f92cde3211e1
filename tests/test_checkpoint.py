"""The docs/design.md §2 checkpoint format: round trip, target-layer detection, refusal messages."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tests.support.models import TINY_MEAN, TINY_STD, tiny_checkpoint, tiny_model
from worker.model.checkpoint import (
    CheckpointError,
    NormalizedModel,
    build_backbone,
    detect_target_layer,
    load_checkpoint,
    model_version_of,
    save_checkpoint,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def _rand(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("num_classes", "in_channels"), [(2, 1), (2, 3), (1, 1), (1, 3)])
def test_round_trip_gives_identical_logits(tmp_path, num_classes, in_channels):
    path = tiny_checkpoint(
        tmp_path, num_classes=num_classes, in_channels=in_channels, size=(40, 56), seed=3
    )
    pm = load_checkpoint(path)
    original = tiny_model(num_classes=num_classes, in_channels=in_channels, seed=3)
    x = _rand((3, in_channels, 40, 56), seed=1)
    with torch.no_grad():
        z_loaded, z_orig = pm.model(x), original(x)
    assert z_loaded.shape == (3, num_classes)
    assert torch.equal(z_loaded, z_orig)
    assert not pm.model.training
    assert pm.arch == "resnet18"
    assert pm.num_classes == num_classes and pm.in_channels == in_channels
    assert pm.class_names == ["ok", "defect"]
    assert pm.input_size == (40, 56)
    assert pm.target_layer == "layer4"
    assert pm.path == path
    assert pm.model.backbone.conv1.in_channels == in_channels
    torch.testing.assert_close(pm.model.mean.flatten(), torch.full((in_channels,), TINY_MEAN))
    torch.testing.assert_close(pm.model.std.flatten(), torch.full((in_channels,), TINY_STD))
    if num_classes == 2:
        assert (pm.defect_index, pm.ok_index) == (1, 0)
    # the fallback version is a hash of the weights: stable and equal to model_version_of
    assert pm.model_version == model_version_of(original.backbone.state_dict(), "resnet18")
    assert pm.model_version.startswith("resnet18-")


def test_different_weights_give_different_versions(tmp_path):
    a = load_checkpoint(tiny_checkpoint(tmp_path, seed=0)).model_version
    b = load_checkpoint(tiny_checkpoint(tmp_path, seed=1)).model_version
    c = load_checkpoint(tiny_checkpoint(tmp_path / "again", seed=0)).model_version
    assert a != b and a == c
    named = tiny_checkpoint(tmp_path, seed=0, model_version="line7-v3", name="named.pt")
    assert load_checkpoint(named).model_version == "line7-v3"


def test_normalized_model_normalises_inside():
    backbone = nn.Identity()
    m = NormalizedModel(backbone, [0.5, 0.25], [0.5, 0.25])
    x = torch.tensor([[[[1.0]], [[0.0]]]])
    torch.testing.assert_close(m(x), torch.tensor([[[[1.0]], [[-1.0]]]]))


def test_target_layer_detected_when_key_absent(tmp_path):
    path = tiny_checkpoint(tmp_path, num_classes=2, in_channels=1)
    ckpt = torch.load(path, weights_only=True)
    del ckpt["target_layer"]
    bare = tmp_path / "no-target.pt"
    torch.save(ckpt, bare)
    pm = load_checkpoint(bare)
    assert pm.target_layer == "layer4"
    assert detect_target_layer(build_backbone("resnet18", 2, 1)) == "layer4"
    # an explicit key is honoured
    explicit = tiny_checkpoint(tmp_path, target_layer="layer3", name="l3.pt")
    assert load_checkpoint(explicit).target_layer == "layer3"


def test_detect_target_layer_on_other_models():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(1, 4, 3)
            self.block = nn.Sequential(nn.Conv2d(4, 4, 3), nn.ReLU())
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(4, 2)

    assert detect_target_layer(Net()) == "block"
    with pytest.raises(CheckpointError, match="no Conv2d"):
        detect_target_layer(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)))


@pytest.mark.parametrize(
    ("arch", "layer"),
    [
        ("resnet18", "layer4"),
        ("resnext50_32x4d", "layer4"),
        ("densenet121", "features"),
        ("mobilenet_v2", "features"),
        ("mobilenet_v3_small", "features"),
        ("efficientnet_b0", "features"),
        ("vgg11_bn", "features"),
        ("convnext_tiny", "features"),
        ("regnet_x_400mf", "trunk_output"),
        ("regnet_y_400mf", "trunk_output"),
    ],
)
def test_detect_target_layer_on_tested_families(arch, layer):
    """The families checked against pytorch_grad_cam in test_engine_families.py."""
    backbone = build_backbone(arch, 2, 1)
    assert detect_target_layer(backbone, arch=arch) == layer
    assert detect_target_layer(backbone) == layer


@pytest.mark.parametrize("arch", ["squeezenet1_1", "shufflenet_v2_x0_5", "mnasnet0_5"])
def test_detect_target_layer_refuses_other_torchvision_archs(arch):
    backbone = build_backbone(arch, 2, 1)
    with pytest.raises(CheckpointError) as info:
        detect_target_layer(backbone, arch=arch)
    assert f"arch {arch!r} has no auto-detected target layer" in str(info.value)
    assert "set target_layer in the checkpoint" in str(info.value)
    with pytest.raises(CheckpointError, match="set target_layer in the checkpoint"):
        detect_target_layer(backbone)  # recognised as a torchvision model without the name


@pytest.mark.parametrize(
    ("arch", "layer"), [("squeezenet1_1", "features"), ("shufflenet_v2_x0_5", "conv5")]
)
def test_checkpoint_of_other_arch_needs_explicit_target_layer(tmp_path, arch, layer):
    with pytest.raises(CheckpointError, match=f"arch {arch!r} has no auto-detected target"):
        tiny_checkpoint(tmp_path, arch=arch)
    # with an explicit target layer the checkpoint is written and loaded...
    path = tiny_checkpoint(tmp_path, arch=arch, target_layer=layer)
    assert load_checkpoint(path).target_layer == layer
    # ...and without one, loading names the file, the arch and the remedy
    ckpt = torch.load(path, weights_only=True)
    del ckpt["target_layer"]
    bare = tmp_path / f"{arch}-no-target.pt"
    torch.save(ckpt, bare)
    _assert_refused(bare, f"arch {arch!r} has no auto-detected target layer")
    _assert_refused(bare, "set target_layer in the checkpoint")


def test_detect_target_layer_refuses_a_custom_module_named_by_arch():
    with pytest.raises(CheckpointError, match="arch 'mynet'"):
        detect_target_layer(nn.Sequential(nn.Conv2d(1, 4, 3)), arch="mynet")


def _assert_refused(path: Path, reason: str) -> None:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert str(path) in message, message
    assert reason in message, message


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory) -> dict:
    """The dict of a valid tiny checkpoint, loaded once."""
    return torch.load(tiny_checkpoint(tmp_path_factory.mktemp("base")), weights_only=True)


def _edited(base: dict, tmp_path: Path, name: str, **changes) -> Path:
    """``base`` with some keys changed (a value of ``None`` deletes the key), saved to a file."""
    ckpt = dict(base)
    for k, v in changes.items():
        if v is None:
            del ckpt[k]
        else:
            ckpt[k] = v
    path = tmp_path / name
    torch.save(ckpt, path)
    return path


def test_missing_file(tmp_path):
    _assert_refused(tmp_path / "nope.pt", "file not found")
    (tmp_path / "a_dir.pt").mkdir()
    _assert_refused(tmp_path / "a_dir.pt", "file not found")


def test_corrupt_files(tmp_path):
    noise = tmp_path / "noise.pt"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    _assert_refused(noise, "cannot be read")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(tiny_checkpoint(tmp_path).read_bytes()[:5000])
    _assert_refused(truncated, "cannot be read")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    _assert_refused(empty, "cannot be read")


def test_pickled_code_is_refused(tmp_path):
    """weights_only loading: an arbitrary pickled object is refused, not executed."""
    path = tmp_path / "evil.pt"
    torch.save({"arch": "resnet18", "payload": Path("/tmp")}, path)
    _assert_refused(path, "cannot be read")


def test_not_a_dict(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)
    _assert_refused(path, "expected a dict, found list")


def test_unknown_arch(tmp_path, base_ckpt):
    _assert_refused(
        _edited(base_ckpt, tmp_path, "arch.pt", arch="resnet9000"), "unknown arch 'resnet9000'"
    )
    with pytest.raises(CheckpointError, match="unknown arch"):
        build_backbone("not_a_model", 2, 1)


def test_state_dict_that_does_not_fit(tmp_path, base_ckpt):
    _assert_refused(
        _edited(base_ckpt, tmp_path, "r34.pt", arch="resnet34"),
        "state_dict does not fit arch 'resnet34'",
    )
    _assert_refused(
        _edited(base_ckpt, tmp_path, "ch.pt", in_channels=3, mean=[0.5] * 3, std=[0.2] * 3),
        "state_dict does not fit",
    )
    _assert_refused(
        _edited(base_ckpt, tmp_path, "k.pt", num_classes=1, class_names=["defect"]),
        "state_dict does not fit",
    )


@pytest.mark.parametrize(
    "key", ["arch", "state_dict", "num_classes", "class_names", "input_size", "mean", "std"]
)
def test_missing_key(tmp_path, base_ckpt, key):
    _assert_refused(
        _edited(base_ckpt, tmp_path, f"no-{key}.pt", **{key: None}), f"missing keys ['{key}']"
    )


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        (dict(num_classes=3), "num_classes must be 1 or 2"),
        (dict(class_names=["good", "bad"]), "class_names must be"),
        (dict(mean=[0.5, 0.5]), "mean/std need 1 values"),
        (dict(std=[0.0]), "std must be positive"),
        (dict(input_size=[4, 4]), "input_size must be"),
        (dict(input_size=[64]), "input_size must be"),
        (dict(target_layer="layer7"), "target_layer 'layer7' is not a module"),
    ],
)
def test_malformed_values(tmp_path, base_ckpt, changes, reason):
    _assert_refused(_edited(base_ckpt, tmp_path, "bad.pt", **changes), reason)


def test_save_is_atomic_and_creates_folders(tmp_path):
    model = tiny_model(num_classes=1, in_channels=1)
    out = tmp_path / "deep" / "er" / "m.pt"
    version = save_checkpoint(
        out,
        model.backbone,
        arch="resnet18",
        num_classes=1,
        class_names=["defect"],
        input_size=(32, 32),
        mean=[0.5],
        std=[0.25],
        in_channels=1,
        recipe={"epochs": 3},
    )
    assert out.is_file() and not out.with_suffix(".pt.tmp").exists()
    pm = load_checkpoint(out)
    assert pm.model_version == version
    assert pm.extra["recipe"] == {"epochs": 3}
