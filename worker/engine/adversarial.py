"""Adversarial enhancement toward the defect class (docs/design.md §3.6).

* FGSM — I. J. Goodfellow, J. Shlens, C. Szegedy, *Explaining and Harnessing Adversarial
  Examples*, ICLR 2015: ``x' = clip(x + ε · sign(∇ₓ z_defect), 0, 1)``.
* PGD — A. Madry et al., *Towards Deep Learning Models Resistant to Adversarial Attacks*,
  ICLR 2018: ``n`` signed-gradient steps of size ``ε/n``, each projected onto the L∞ ε-ball
  around ``x`` and the valid pixel range.

``ε`` is in pixel units of the [0, 1] image (default 2/255). The step *ascends* ``z_defect``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from worker.engine.cam import input_gradient


def _check(x: Tensor, epsilon: float) -> None:
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"epsilon must be in [0, 1] pixel units, got {epsilon}")
    if x.dim() != 4:
        raise ValueError(f"x must be [B, C, H, W], got {tuple(x.shape)}")


def fgsm_step(x: Tensor, grad: Tensor, epsilon: float) -> Tensor:
    """One FGSM step from a precomputed input gradient.

    Args:
        x: ``float32[B, C, H, W]`` in [0, 1].
        grad: ``float32[B, C, H, W]``, ``∇ₓ z_defect``.
        epsilon: step in [0, 1] pixel units.

    Returns:
        ``x'`` with ``|x' − x| ≤ ε`` elementwise and ``x' ∈ [0, 1]``.

    Raises:
        ValueError: ``epsilon`` outside [0, 1], or shapes differ.
    """
    _check(x, epsilon)
    if grad.shape != x.shape:
        raise ValueError(f"grad shape {tuple(grad.shape)} != x shape {tuple(x.shape)}")
    return (x.detach() + epsilon * grad.sign()).clamp(0.0, 1.0)


def fgsm(defect_logit: Callable[[Tensor], Tensor], x: Tensor, epsilon: float) -> Tensor:
    """FGSM toward the defect class.

    Args:
        defect_logit: maps ``float32[B, C, H, W]`` to ``z_defect`` ``float[B]``.
        x: ``float32[B, C, H, W]`` in [0, 1].
        epsilon: in [0, 1] pixel units.

    Returns:
        ``float32[B, C, H, W]`` adversarial input in [0, 1], ``|x' − x|∞ ≤ ε``.
    """
    _check(x, epsilon)
    return fgsm_step(x, input_gradient(defect_logit, x), epsilon)


def pgd(
    defect_logit: Callable[[Tensor], Tensor], x: Tensor, epsilon: float, steps: int = 5
) -> Tensor:
    """PGD (L∞) toward the defect class: ``steps`` steps of ``ε/steps``, projected each time.

    Args:
        defect_logit: maps ``float32[B, C, H, W]`` to ``z_defect`` ``float[B]``.
        x: ``float32[B, C, H, W]`` in [0, 1].
        epsilon: radius of the L∞ ball in [0, 1] pixel units.
        steps: number of steps (≥ 1); ``steps=1`` equals FGSM.

    Returns:
        ``float32[B, C, H, W]`` in [0, 1] with ``|x' − x|∞ ≤ ε``.

    Raises:
        ValueError: ``steps < 1`` or ``epsilon`` outside [0, 1].
    """
    _check(x, epsilon)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    x0 = x.detach()
    step = epsilon / steps
    adv = x0.clone()
    for _ in range(steps):
        g = input_gradient(defect_logit, adv)
        adv = adv + step * g.sign()
        adv = torch.min(torch.max(adv, x0 - epsilon), x0 + epsilon).clamp(0.0, 1.0)
    return adv
