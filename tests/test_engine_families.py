"""The engine's maps on every torchvision family the target-layer auto-detection accepts.

Worker-like setup: a seeded random-init model (``weights=None``) in ``eval()`` mode with frozen
parameters, scored under the caller's ``torch.inference_mode()``, at the layer
:func:`worker.model.checkpoint.detect_target_layer` picks. Grad-CAM (``defect`` and ``ok``) must equal
``pytorch_grad_cam.GradCAM`` and Eigen-CAM ``pytorch_grad_cam.EigenCAM`` (up to the SVD sign)
within 1e-4 after min-max normalisation and bilinear upsampling (see ``test_engine_cam.py``).

The oracle must see the target layer's own output. ``pytorch_grad_cam`` 1.5.7 keeps the
activations with a forward hook as ``output.detach()``, which shares storage with ``output``,
and the gradient with a hook on ``output``. DenseNet's forward runs
``F.relu(features, inplace=True)`` right after ``features``, so a plain ``GradCAM`` on
``features`` stores the post-ReLU activations while its tensor hook gets the gradient w.r.t. the
pre-ReLU output: a mix of two tensors, wrong by up to 1.0 here. :func:`_oracle_model`
therefore gives ``pytorch_grad_cam`` a deep copy of the model in which the target layer is
replaced by ``nn.Sequential(layer, _Clone())`` and hooks the inner ``layer``: its output is never touched again, the in-place ReLU acts on
``_Clone``'s copy and the gradient reaching ``layer``'s output through the copy is unchanged.
For the other families the wrapper changes nothing. ``test_plain_oracle_is_contaminated_for_
densenet`` shows that the wrapper matters, so the DenseNet comparison decides something.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pytorch_grad_cam import EigenCAM, GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from tests.support.models import tiny_model
from worker.engine import (
    CamError,
    EngineConfig,
    ReliabilityEngine,
    eigen_cam_projection,
    forward_with_activations,
    linear_head_weights,
    minmax_normalize,
    upsample,
)
from worker.model.checkpoint import AUTO_TARGET_LAYERS, detect_target_layer

pytestmark = pytest.mark.usefixtures("single_thread")

ATOL = 1e-4
B = 3
SIZE = (96, 96)  # every family downsamples by 32: a 3×3 target layer

# (arch, num_classes, in_channels): the smallest model of each auto-detected family.
FAMILIES = [
    ("resnet18", 2, 1),
    ("densenet121", 2, 1),
    ("mobilenet_v2", 2, 3),
    ("mobilenet_v3_small", 2, 1),
    ("efficientnet_b0", 2, 3),
    ("vgg11_bn", 2, 1),
    ("convnext_tiny", 2, 3),
    ("regnet_x_400mf", 2, 1),
    ("densenet121", 1, 1),  # single-logit head: S_ok explains −z
    ("resnet18", 1, 3),
]
IDS = [f"{a}-k{k}-c{c}" for a, k, c in FAMILIES]


class _Clone(nn.Module):
    """``x ↦ x.clone()``: later in-place ops act on the copy, gradients pass unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()


def _oracle_model(
    model: nn.Module, layer: str, *, clean: bool = True
) -> tuple[nn.Module, nn.Module]:
    """A deep copy for ``pytorch_grad_cam`` and the module to hook in it.

    ``clean``: ``backbone.<layer>`` is replaced by ``Sequential(layer, _Clone())`` and the inner
    layer is returned, whose output nothing modifies. Otherwise the layer itself (the plain,
    contaminated oracle).
    """
    mc = copy.deepcopy(model)
    parent_name, _, child = layer.rpartition(".")
    parent = mc.backbone.get_submodule(parent_name) if parent_name else mc.backbone
    inner = parent.get_submodule(child)
    if clean:
        setattr(parent, child, nn.Sequential(inner, _Clone()))
    return mc, inner


def _oracle_gradcam(
    oracle: tuple[nn.Module, nn.Module], x: torch.Tensor, target: Callable
) -> np.ndarray:
    """``GradCAM`` maps ``float32[B, H, W]``. The copy's parameters stay frozen: the input
    requires grad, so the hooked output does and ``.backward()`` stops at the input."""
    mc, hooked = oracle
    with GradCAM(model=mc, target_layers=[hooked]) as cam:
        out = cam(input_tensor=x.clone().requires_grad_(True), targets=[target] * x.shape[0])
    assert out.shape == (x.shape[0], *x.shape[2:])
    return out


def _oracle_eigencam(oracle: tuple[nn.Module, nn.Module], x: torch.Tensor) -> np.ndarray:
    mc, hooked = oracle
    with EigenCAM(model=mc, target_layers=[hooked]) as cam:
        return cam(input_tensor=x, targets=None)


def _images(cin: int, seed: int) -> torch.Tensor:
    return torch.rand(B, cin, *SIZE, generator=torch.Generator().manual_seed(seed))


def _frozen(arch: str, k: int, cin: int) -> nn.Module:
    """A seeded eval-mode model, BatchNorm statistics set from one batch, parameters frozen.

    At random init (running mean 0, variance 1) MobileNet's and EfficientNet's activations
    vanish to 1e-8…1e-13 at the target layer, where the ``1e-7`` that ``pytorch_grad_cam``
    adds in its min-max normalisation dominates and the oracle is no longer one. A trained
    model's statistics fit its data: so does this one's.
    """
    model = tiny_model(arch=arch, num_classes=k, in_channels=cin, seed=3)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            # only BatchNorm in train mode (no dropout / stochastic depth: deterministic);
            # cumulative average: after one batch, the running statistics are that batch's
            m.train()
            m.momentum = None
    with torch.no_grad():
        model(torch.rand(8, cin, *SIZE, generator=torch.Generator().manual_seed(99)))
    return model.eval().requires_grad_(False)


def _targets(k: int) -> tuple[Callable, Callable]:
    """Oracle targets for (defect, ok): logits 1 and 0, or z and −z for a single logit."""
    if k == 1:
        return ClassifierOutputTarget(0), lambda out: -out[0]
    return ClassifierOutputTarget(1), ClassifierOutputTarget(0)


@pytest.mark.parametrize(("arch", "k", "cin"), FAMILIES, ids=IDS)
def test_family_maps_match_pytorch_grad_cam(arch, k, cin):
    model = _frozen(arch, k, cin)
    layer = detect_target_layer(model.backbone, arch=arch)
    assert layer == AUTO_TARGET_LAYERS[type(model.backbone)]
    x = _images(cin, seed=len(arch) + k + cin)
    engine = ReliabilityEngine(model, f"backbone.{layer}", config=EngineConfig(attack="none"))
    with torch.inference_mode():
        s = engine.score(x)
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    # the closed form still serves the GAP + linear heads (ResNet, RegNet)
    has_closed_form = linear_head_weights(model, engine.layer) is not None
    assert has_closed_form == (arch.startswith(("resnet", "regnet")))

    oracle_model = _oracle_model(model, layer)
    t_def, t_ok = _targets(k)
    for ours, target in ((s.cam_defect, t_def), (s.cam_ok, t_ok)):
        oracle = _oracle_gradcam(oracle_model, x, target)
        np.testing.assert_allclose(ours.numpy(), oracle, rtol=0, atol=ATOL)
    # not vacuous: some maps are non-constant
    assert (s.cam_defect.amax(dim=(1, 2)) == 1).any() or (s.cam_ok.amax(dim=(1, 2)) == 1).any()

    # Eigen-CAM: the engine's map is the sign-fixed projection; the oracle's sign is the SVD's.
    with torch.inference_mode():
        _, act = forward_with_activations(model, engine.layer, x, need_grad=False)
    p = eigen_cam_projection(act.clone())
    pos = minmax_normalize(upsample(F.relu(p), SIZE)).numpy()
    neg = minmax_normalize(upsample(F.relu(-p), SIZE)).numpy()
    np.testing.assert_allclose(s.cam_agnostic.numpy(), pos, rtol=0, atol=1e-6)
    oracle = _oracle_eigencam(oracle_model, x)
    for i in range(B):
        err = min(np.abs(oracle[i] - pos[i]).max(), np.abs(oracle[i] - neg[i]).max())
        assert err <= ATOL, f"{arch} image {i}: Eigen-CAM max abs error {err}"


def test_plain_oracle_is_contaminated_for_densenet():
    """Without the ``_Clone`` wrapper ``pytorch_grad_cam`` mixes post-ReLU activations with
    pre-ReLU gradients on DenseNet's ``features`` and disagrees with the clean oracle."""
    model = _frozen("densenet121", 2, 1)
    x = _images(1, seed=5)
    target = ClassifierOutputTarget(1)
    clean = _oracle_gradcam(_oracle_model(model, "features"), x, target)
    plain = _oracle_gradcam(_oracle_model(model, "features", clean=False), x, target)
    assert np.abs(clean - plain).max() > 0.05


@pytest.mark.parametrize("attack", ["fgsm", "pgd"])
def test_densenet_frozen_score_with_attack_regression(attack):
    """Used to fail: ``a leaf Variable that requires grad is being used in an in-place
    operation`` (DenseNet's in-place ReLU on the engine's detached activation leaf)."""
    model = _frozen("densenet121", 2, 3)
    x = _images(3, seed=6)
    cfg = EngineConfig(attack=attack, epsilon=8 / 255, pgd_steps=2)
    with torch.inference_mode():
        s = ReliabilityEngine(model, "backbone.features", config=cfg).score(x)
    assert s.adv is not None and s.x_adv is not None
    for t in (s.clean.p_defect, s.iou_gap, s.adv.p_defect, s.adv.iou_gap, s.adv.cam_defect):
        assert torch.isfinite(t).all()
    assert all(p.grad is None for p in model.parameters())
    # the clean maps equal those of a run without an attack (one forward graph, two uses)
    with torch.inference_mode():
        s0 = ReliabilityEngine(model, "backbone.features", config=EngineConfig(attack="none"))
        ref = s0.score(x)
    torch.testing.assert_close(s.cam_defect, ref.cam_defect, rtol=0, atol=0)


def test_activation_is_the_layers_own_output_with_trainable_parameters():
    """With trainable parameters the activation is the pre-ReLU ``features`` output and its
    gradient is the gradient w.r.t. that output; parameters' ``.grad`` stays ``None``."""
    model = tiny_model(arch="densenet121", num_classes=2, in_channels=1, seed=4)
    x = _images(1, seed=7)
    with torch.no_grad():
        ref = model.backbone.features((x - model.mean) / model.std)
    assert (ref < 0).any()  # the ReLU after `features` would change it
    with torch.enable_grad():
        z, act = forward_with_activations(model, model.backbone.features, x, need_grad=True)
        (g,) = torch.autograd.grad(z[:, 1].sum(), act)
    torch.testing.assert_close(act.detach(), ref, rtol=0, atol=0)
    # ∂z/∂A is zero exactly where ReLU(A) is 0, and W/(hw) (per channel) elsewhere
    w = model.backbone.classifier.weight[1].detach() / (ref.shape[2] * ref.shape[3])
    expected = torch.where(ref > 0, w[None, :, None, None].expand_as(ref), 0.0)
    torch.testing.assert_close(g, expected, rtol=1e-5, atol=1e-8)
    assert all(p.grad is None for p in model.parameters())


class _AliasNet(nn.Module):
    """The target ``ident`` returns its input, which the network then changes in place."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.ident = nn.Identity()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv(x)
        b = self.ident(a)
        a.relu_()
        return self.fc((a + b).mean(dim=(2, 3)))


@pytest.mark.parametrize("need_grad", [True, False])
def test_output_aliasing_a_tensor_changed_later_is_refused(need_grad):
    net = _AliasNet().eval().requires_grad_(False)
    x = _images(1, seed=8)[:, :, :8, :8]
    with pytest.raises(CamError, match="modified in place after the layer returned"):
        forward_with_activations(net, net.ident, x, need_grad=need_grad)
    # an in-place op on what the network gets from the layer is harmless
    z, act = forward_with_activations(net, net.conv, x, need_grad=need_grad)
    torch.testing.assert_close(act.detach(), net.conv(x), rtol=0, atol=0)
    assert (act < 0).any()
