"""Class activation maps computed from one forward pass (docs/design.md §3.1–3.2).

* Grad-CAM — R. R. Selvaraju et al., *Grad-CAM: Visual Explanations from Deep Networks via
  Gradient-based Localization*, ICCV 2017: ``α_k^c = mean_ij ∂z_c/∂A_k``,
  ``S_c = ReLU(Σ_k α_k^c A_k)``.
* Eigen-CAM — M. B. Muhammad and M. Yeasin, *Eigen-CAM: Class Activation Map using Principal
  Components*, IJCNN 2020: projection of the spatially centred activations on their first
  right-singular vector, with the SVD sign fixed to correlate positively with the channel-mean
  map, then ReLU.

Hooks are registered per call and removed in ``finally``; gradients are taken with
``torch.autograd.grad`` with respect to activations (and the input), never parameters, so
parameters' ``.grad`` is never touched and frozen models work.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class CamError(RuntimeError):
    """The target layer produced no usable activation for this model and input."""


def resolve_layer(model: nn.Module, layer: str | nn.Module) -> nn.Module:
    """The submodule named ``layer`` (dotted path) of ``model``, or ``layer`` itself.

    Raises:
        ValueError: no such submodule.
    """
    if isinstance(layer, nn.Module):
        return layer
    try:
        return model.get_submodule(layer)
    except AttributeError as exc:
        raise ValueError(f"target layer {layer!r} is not a submodule of the model") from exc


def forward_with_activations(
    model: nn.Module, layer: nn.Module, x: Tensor, *, need_grad: bool
) -> tuple[Tensor, Tensor]:
    """Run ``model(x)`` once and capture the output of ``layer``.

    The returned activation is the layer's own output, whatever the rest of the network does
    with it: the forward hook keeps that tensor and hands a clone of it to the layers after
    ``layer``. In-place operations downstream (torchvision DenseNet's
    ``F.relu(features, inplace=True)`` after ``features``, a residual ``out += identity`` after
    a block's last BatchNorm) act on the clone, so they can neither change the activation nor
    make the gradient taken w.r.t. it the gradient w.r.t. their own result, and a detached
    leaf (``need_grad`` with frozen parameters) is never modified in place. The gradient of
    the logits still flows to the activation (and on to ``x``) through the clone.

    Args:
        model: the classifier; ``x`` → logits ``float[B, C]``.
        layer: a submodule whose output is a ``float[B, K, h, w]`` tensor.
        x: ``float32[B, C_in, H, W]`` input.
        need_grad: when True and the activation does not require grad (frozen parameters,
            input without grad), it is replaced by a detached leaf that does, so gradients
            w.r.t. the activation can still be taken.

    Returns:
        ``(logits float[B, C], activations float[B, K, h, w])``; the activations are part of the
        graph of the logits whenever they require grad.

    Raises:
        CamError: the layer did not run, its output is not a 4-D tensor, or its output was
            modified in place after the layer returned (an output that aliases a tensor the
            network changes later, e.g. an ``nn.Identity`` whose input is then modified in
            place: explain another layer).
    """
    store: dict[str, Tensor] = {}
    version: dict[str, int] = {}  # inference tensors (caller's inference_mode) have none

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> Tensor:
        if not isinstance(output, Tensor):
            raise CamError(f"target layer output is {type(output).__name__}, not a tensor")
        act = output
        if need_grad and not act.requires_grad:
            act = act.detach().requires_grad_(True)
        store["a"] = act
        if not act.is_inference():
            version["a"] = act._version
        # The rest of the network gets a copy: in-place ops after the layer act on the copy.
        return act.clone()

    handle = layer.register_forward_hook(hook)
    try:
        logits = model(x)
    finally:
        handle.remove()
    act = store.get("a")
    if act is None:
        raise CamError("target layer did not run in the forward pass")
    if "a" in version and act._version != version["a"]:
        raise CamError(
            "target layer output was modified in place after the layer returned (it aliases a "
            "tensor the network changes later); choose a layer that returns a new tensor"
        )
    if act.dim() != 4:
        raise CamError(f"target layer output must be [B, K, h, w], got {tuple(act.shape)}")
    if logits.dim() != 2:
        raise CamError(f"model output must be logits [B, C], got {tuple(logits.shape)}")
    return logits, act


def grad_cam(activations: Tensor, gradients: Tensor) -> Tensor:
    """Grad-CAM from activations and the gradient of a class logit w.r.t. them.

    Args:
        activations: ``float[B, K, h, w]``.
        gradients: ``float[B, K, h, w]``, ``∂z_c/∂A`` per image.

    Returns:
        ``float[B, h, w]``, ``ReLU(Σ_k mean_ij(∂z_c/∂A_k) · A_k)`` (not normalised).
    """
    if activations.shape != gradients.shape:
        raise ValueError(f"shape mismatch {tuple(activations.shape)} vs {tuple(gradients.shape)}")
    alpha = gradients.mean(dim=(2, 3), keepdim=True)
    return F.relu((alpha * activations).sum(dim=1))


def grad_cam_from_weights(activations: Tensor, alpha: Tensor) -> Tensor:
    """Grad-CAM with channel weights given directly.

    Args:
        activations: ``float[B, K, h, w]``.
        alpha: ``float[B, K]`` or ``float[K]`` channel weights ``α_k^c``.

    Returns:
        ``float[B, h, w]``, ``ReLU(Σ_k α_k A_k)``.
    """
    if alpha.dim() == 1:
        alpha = alpha.expand(activations.shape[0], -1)
    return F.relu(torch.einsum("bk,bkhw->bhw", alpha.to(activations.dtype), activations))


def eigen_cam_projection(activations: Tensor) -> Tensor:
    """Signed Eigen-CAM projection, with the SVD sign fixed (before the ReLU).

    ``A`` is reshaped to ``(h·w) × K`` per image, each channel centred over the spatial
    positions, and projected on its first right-singular vector ``v₁``. The sign of ``v₁`` is
    arbitrary; it is chosen so that the projection correlates positively (Pearson, over the
    spatial positions) with the channel-mean activation map. A zero correlation keeps the SVD's sign.

    Args:
        activations: ``float[B, K, h, w]``.

    Returns:
        ``float[B, h, w]`` signed projection. All zeros when the activations are spatially constant.
    """
    b, k, h, w = activations.shape
    m = activations.detach().reshape(b, k, h * w).transpose(1, 2)  # [B, hw, K]
    mc = m - m.mean(dim=1, keepdim=True)
    # float64 keeps the first singular vector stable for near-degenerate spectra.
    _, _, vh = torch.linalg.svd(mc.double(), full_matrices=False)
    v1 = vh[:, 0, :]  # [B, K]
    proj = torch.einsum("bpk,bk->bp", mc.double(), v1)  # [B, hw]
    mean_map = m.double().mean(dim=2)
    corr = ((proj - proj.mean(1, keepdim=True)) * (mean_map - mean_map.mean(1, keepdim=True))).sum(
        1
    )
    sign = torch.where(corr < 0, -1.0, 1.0).to(proj.dtype)
    return (proj * sign[:, None]).to(activations.dtype).reshape(b, h, w)


def eigen_cam(activations: Tensor) -> Tensor:
    """Eigen-CAM: ``ReLU`` of :func:`eigen_cam_projection`. ``float[B, K, h, w]`` → ``float[B, h, w]``."""
    return F.relu(eigen_cam_projection(activations))


def channel_mean_map(activations: Tensor) -> Tensor:
    """Class-agnostic alternative: ``ReLU(mean_k A_k)``. ``float[B, K, h, w]`` → ``float[B, h, w]``."""
    return F.relu(activations.detach().mean(dim=1))


def linear_head_weights(model: nn.Module, layer: nn.Module) -> Tensor | None:
    """The closed-form Grad-CAM weights' source when ``layer`` feeds a GAP + linear head.

    For ``z = W · GAP(A) + b`` (e.g. a torchvision ResNet explained at ``layer4``),
    ``∂z_c/∂A_k(i, j) = W_ck / (h·w)`` at every position, so ``α_k^c = W_ck / (h·w)`` and no
    backward pass is needed. Returns ``W`` (``float[C, K]``) when the structure is recognised
    (``backbone`` with ``avgpool`` = global average pool and ``fc`` = ``nn.Linear`` directly after
    ``layer``), else ``None``.
    """
    backbone = getattr(model, "backbone", model)
    children = list(backbone.named_children())
    names = [n for n, _ in children]
    if not {"avgpool", "fc"} <= set(names):
        return None
    pool, fc = backbone.avgpool, backbone.fc
    if not isinstance(fc, nn.Linear):
        return None
    if not (isinstance(pool, nn.AdaptiveAvgPool2d) and pool.output_size in (1, (1, 1))):
        return None
    i_pool = names.index("avgpool")
    if i_pool == 0 or children[i_pool - 1][1] is not layer or names.index("fc") != i_pool + 1:
        return None
    return fc.weight.detach()


def input_gradient(logit_fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """``∂(Σ_b s_b)/∂x`` where ``s = logit_fn(x)`` is ``float[B]``: per-image input gradients.

    ``x`` (``float[B, C, H, W]``) is detached first; parameters' ``.grad`` is not touched.
    """
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(logit_fn(x).sum(), x)
    return g
