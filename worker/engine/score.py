"""The reliability score: IoU gap between class-specific and class-agnostic maps (docs/design.md §3).

Source of the method: H.-C. Dong et al., *When Can We Trust Deep Neural Networks? Towards
Reliable Industrial Deployment with an Interpretability Guide*, arXiv:2604.19206 (2026).

For a batch ``x: float32[B, C, H, W]`` in [0, 1] the engine runs one forward pass with a hook
on the target layer and returns, per image:

* ``p_defect`` and the energy score ``−logsumexp(z)`` (higher = more suspicious);
* Grad-CAM maps for ``defect`` and ``ok`` and the class-agnostic map (Eigen-CAM, or the
  channel mean), upsampled to ``H × W`` and min-max normalised to [0, 1];
* ``iou_defect = IoU(S_defect, S_agn)``, ``iou_ok = IoU(S_ok, S_agn)`` and the gap
  ``iou_gap = iou_defect − iou_ok`` ∈ [−1, 1] (higher = more suspicious);
* with adversarial enhancement (FGSM or PGD toward ``defect``, ε in [0, 1] pixel units): the same
  numbers on ``x'`` (``*_adv``) and whether ``x'`` flips the prediction.

Known property (docs/design.md §7): for a softmax head trained with cross-entropy, ``S_ok`` is close
to ``ReLU(−D)`` where ``S_defect = ReLU(D)``; for a single-logit head they are exact mirrors. The
two masks are then (nearly) disjoint and ``iou_gap`` is a signed test of where the
class-agnostic region falls. The score stays defined.

When the target layer feeds a GAP + linear head (ResNet ``layer4``), the Grad-CAM weights are
the closed form ``W_c / (h·w)`` and the maps need no backward pass; otherwise they come from
``torch.autograd.grad`` w.r.t. the activations. The enhanced score costs one backward pass to
the input (reusing the first forward graph) and one more forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from worker.engine.adversarial import fgsm_step, pgd
from worker.engine.cam import (
    channel_mean_map,
    eigen_cam,
    forward_with_activations,
    grad_cam,
    grad_cam_from_weights,
    linear_head_weights,
    resolve_layer,
)
from worker.engine.iou import binary_iou, soft_iou
from worker.engine.maps import binarize, minmax_normalize, upsample
from worker.engine.options import EngineConfig
from worker.model.checkpoint import p_defect_from_logits


@dataclass
class MapScores:
    """Maps and IoUs for one pass. Maps are ``float32[B, H, W]`` in [0, 1]; the rest ``[B]``."""

    logits: Tensor
    p_defect: Tensor
    energy: Tensor
    cam_defect: Tensor
    cam_ok: Tensor
    cam_agnostic: Tensor
    iou_defect: Tensor
    iou_ok: Tensor

    @property
    def iou_gap(self) -> Tensor:
        return self.iou_defect - self.iou_ok


#: The per-image numbers of :meth:`ReliabilityScores.rows`, in order.
ROW_KEYS = (
    "p_defect",
    "energy",
    "iou_defect",
    "iou_ok",
    "iou_gap",
    "p_defect_adv",
    "iou_defect_adv",
    "iou_ok_adv",
    "iou_gap_adv",
    "flipped",
)


@dataclass
class ReliabilityScores:
    """Per-image results of :meth:`ReliabilityEngine.score` for a batch of ``B`` images."""

    clean: MapScores
    adv: MapScores | None = None
    x_adv: Tensor | None = None
    config: EngineConfig = field(default_factory=EngineConfig)

    def __len__(self) -> int:
        return int(self.clean.p_defect.shape[0])

    @property
    def p_defect(self) -> Tensor:
        return self.clean.p_defect

    @property
    def iou_gap(self) -> Tensor:
        return self.clean.iou_gap

    @property
    def iou_gap_adv(self) -> Tensor | None:
        return None if self.adv is None else self.adv.iou_gap

    @property
    def flipped(self) -> Tensor | None:
        """``bool[B]``: the prediction on ``x'`` differs from the prediction on ``x``."""
        if self.adv is None:
            return None
        return (self.adv.p_defect >= 0.5) != (self.clean.p_defect >= 0.5)

    @property
    def cam_defect(self) -> Tensor:
        return self.clean.cam_defect

    @property
    def cam_ok(self) -> Tensor:
        return self.clean.cam_ok

    @property
    def cam_agnostic(self) -> Tensor:
        return self.clean.cam_agnostic

    def rows(self) -> list[dict[str, Any]]:
        """One dict of Python numbers per image (the numbers an audit row stores)."""
        c = self.clean
        cols: dict[str, Tensor | None] = {
            "p_defect": c.p_defect,
            "energy": c.energy,
            "iou_defect": c.iou_defect,
            "iou_ok": c.iou_ok,
            "iou_gap": c.iou_gap,
            "p_defect_adv": None if self.adv is None else self.adv.p_defect,
            "iou_defect_adv": None if self.adv is None else self.adv.iou_defect,
            "iou_ok_adv": None if self.adv is None else self.adv.iou_ok,
            "iou_gap_adv": None if self.adv is None else self.adv.iou_gap,
            "flipped": self.flipped,
        }
        lists = {k: (None if v is None else v.detach().cpu().tolist()) for k, v in cols.items()}
        return [
            {k: (None if v is None else v[i]) for k, v in lists.items()} for i in range(len(self))
        ]


class ReliabilityEngine:
    """Batched, device-agnostic reliability scoring of a binary ok/defect classifier.

    Args:
        model: maps ``float32[B, C, H, W]`` in [0, 1] to logits ``[B, 2]`` (softmax head) or
            ``[B, 1]`` (single-logit sigmoid head, ``z_defect = z``, ``z_ok = −z``). Must be in
            ``eval()`` mode (BatchNorm in train mode makes a map depend on its batch).
        target_layer: dotted name or module whose output ``[B, K, h, w]`` is explained.
        defect_index, ok_index: logit indices for a 2-logit head (ignored for 1 logit).
        config: :class:`EngineConfig`.
        max_chunk: score at most this many images per pass (``None``: the whole batch). Results
            are identical (eval mode); peak memory of the FGSM graph falls with the chunk.

    Raises:
        ValueError: bad indices, target layer or ``max_chunk``.
    """

    def __init__(
        self,
        model: nn.Module,
        target_layer: str | nn.Module,
        *,
        defect_index: int = 1,
        ok_index: int = 0,
        config: EngineConfig | None = None,
        max_chunk: int | None = None,
    ) -> None:
        if max_chunk is not None and max_chunk < 1:
            raise ValueError(f"max_chunk must be >= 1 or None, got {max_chunk}")
        self.max_chunk = max_chunk
        self.model = model
        self.layer = resolve_layer(model, target_layer)
        self.target_layer_name = (
            target_layer if isinstance(target_layer, str) else type(target_layer).__name__
        )
        if defect_index == ok_index:
            raise ValueError("defect_index and ok_index must differ")
        self.defect_index = defect_index
        self.ok_index = ok_index
        self.config = config or EngineConfig()

    @classmethod
    def from_production_model(
        cls, pm: Any, config: EngineConfig | None = None, max_chunk: int | None = None
    ) -> ReliabilityEngine:
        """Build from a :class:`worker.model.checkpoint.ProductionModel`.

        The explained layer is ``config.target_layer`` when set, else the checkpoint's
        ``target_layer``; either is a dotted name inside ``pm.model.backbone``.

        Raises:
            ValueError: the layer is not a submodule of the backbone.
        """
        config = config or EngineConfig()
        name = config.target_layer or pm.target_layer
        try:
            layer = pm.model.backbone.get_submodule(name)
        except AttributeError as exc:
            raise ValueError(f"target layer {name!r} is not a submodule of the model") from exc
        eng = cls(
            pm.model,
            layer,
            defect_index=pm.defect_index if pm.num_classes == 2 else 1,
            ok_index=pm.ok_index if pm.num_classes == 2 else 0,
            config=config,
            max_chunk=max_chunk,
        )
        eng.target_layer_name = name
        return eng

    # -- helpers -----------------------------------------------------------------------------
    def _class_logits(self, z: Tensor) -> tuple[Tensor, Tensor]:
        if z.shape[1] == 1:
            return z[:, 0], -z[:, 0]
        if z.shape[1] <= max(self.defect_index, self.ok_index):
            raise ValueError(f"model returns {z.shape[1]} logits; class indices out of range")
        return z[:, self.defect_index], z[:, self.ok_index]

    def _probs_energy(self, z: Tensor) -> tuple[Tensor, Tensor]:
        z = z.detach().float()
        p = p_defect_from_logits(z, self.defect_index)
        if z.shape[1] == 1:
            return p, -F.softplus(z[:, 0])  # logits [0, z]
        return p, -torch.logsumexp(z, dim=1)

    def _validate(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise ValueError(
                f"x must be a float tensor [B, C, H, W], got {getattr(x, 'shape', type(x))}"
            )
        if not x.is_floating_point():
            raise ValueError(f"x must be floating point in [0, 1], got {x.dtype}")
        if x.shape[0] == 0:
            raise ValueError("x is an empty batch")
        if not torch.isfinite(x).all():
            raise ValueError("x contains NaN or infinite values")
        lo, hi = float(x.min()), float(x.max())
        if lo < -1e-6 or hi > 1 + 1e-6:
            raise ValueError(f"x must be in [0, 1] pixel units, got range [{lo:.3g}, {hi:.3g}]")
        if self.model.training:
            raise ValueError(
                "model is in train() mode: BatchNorm would make each map depend on its batch; "
                "call model.eval() first"
            )

    def _maps(self, x: Tensor, *, want_input_grad: bool) -> tuple[MapScores, Tensor | None]:
        """One forward pass → maps, IoUs and (optionally) ``∇ₓ z_defect``."""
        cfg = self.config
        w_head = linear_head_weights(self.model, self.layer) if cfg.closed_form else None
        need_act_grad = w_head is None
        if want_input_grad:
            x = x.detach().requires_grad_(True)
        z, act = forward_with_activations(self.model, self.layer, x, need_grad=need_act_grad)
        z_def, z_ok = self._class_logits(z)
        grad_x: Tensor | None = None
        if w_head is not None:
            hw = act.shape[2] * act.shape[3]
            if w_head.shape[0] == 1:
                a_def, a_ok = w_head[0] / hw, -w_head[0] / hw
            else:
                a_def, a_ok = w_head[self.defect_index] / hw, w_head[self.ok_index] / hw
            a = act.detach()
            s_def, s_ok = grad_cam_from_weights(a, a_def), grad_cam_from_weights(a, a_ok)
            if want_input_grad:
                (grad_x,) = torch.autograd.grad(z_def.sum(), x)
        else:
            inputs = [act, x] if want_input_grad else [act]
            g = torch.autograd.grad(z_def.sum(), inputs, retain_graph=z.shape[1] != 1)
            g_def = g[0]
            grad_x = g[1] if want_input_grad else None
            if z.shape[1] == 1:
                g_ok = -g_def
            else:
                (g_ok,) = torch.autograd.grad(z_ok.sum(), [act])
            a = act.detach()
            s_def, s_ok = grad_cam(a, g_def), grad_cam(a, g_ok)
        a = act.detach()
        s_agn = eigen_cam(a) if cfg.agnostic == "eigen" else channel_mean_map(a)
        size = (x.shape[2], x.shape[3])
        m_def, m_ok, m_agn = (
            minmax_normalize(upsample(s.float(), size)) for s in (s_def, s_ok, s_agn)
        )
        if cfg.iou == "soft":
            iou_def, iou_ok = soft_iou(m_def, m_agn), soft_iou(m_ok, m_agn)
        else:
            b = [binarize(m, cfg.binarize, cfg.theta, cfg.topk) for m in (m_def, m_ok, m_agn)]
            iou_def, iou_ok = binary_iou(b[0], b[2]), binary_iou(b[1], b[2])
        p, energy = self._probs_energy(z)
        scores = MapScores(z.detach(), p, energy, m_def, m_ok, m_agn, iou_def, iou_ok)
        return scores, grad_x

    def _defect_logit(self, x: Tensor) -> Tensor:
        return self._class_logits(self.model(x))[0]

    # -- public -----------------------------------------------------------------------------
    def score(self, x: Tensor) -> ReliabilityScores:
        """Score a batch.

        Args:
            x: ``float32[B, C, H, W]`` in [0, 1] pixel units, on the model's device.

        Returns:
            :class:`ReliabilityScores`; with ``attack="none"`` the ``*_adv`` fields are ``None``.

        Raises:
            ValueError: ``x`` is not a finite 4-D float batch in [0, 1], or the model is in
                train mode.
            worker.engine.cam.CamError: the target layer gave no usable activation.

        Works under a caller's ``torch.no_grad()`` or ``torch.inference_mode()``; never writes
        parameters' ``.grad``.
        """
        self._validate(x)
        c = self.max_chunk
        if c is None or x.shape[0] <= c:
            return self._score(x)
        return _concat([self._score(x[i : i + c]) for i in range(0, x.shape[0], c)])

    def _score(self, x: Tensor) -> ReliabilityScores:
        cfg = self.config
        with torch.inference_mode(False), torch.enable_grad():
            if (
                x.is_inference()
            ):  # made under a caller's inference_mode: autograd needs a normal tensor
                x = x.clone()
            clean, grad_x = self._maps(x, want_input_grad=cfg.attack == "fgsm")
            if cfg.attack == "none":
                return ReliabilityScores(clean=clean, config=cfg)
            if cfg.attack == "fgsm":
                assert grad_x is not None
                x_adv = fgsm_step(x, grad_x, cfg.epsilon)
            else:
                x_adv = pgd(self._defect_logit, x, cfg.epsilon, cfg.pgd_steps)
            adv, _ = self._maps(x_adv, want_input_grad=False)
        return ReliabilityScores(clean=clean, adv=adv, x_adv=x_adv.detach(), config=cfg)


def _concat(parts: list[ReliabilityScores]) -> ReliabilityScores:
    """Concatenate the results of consecutive chunks of one batch."""

    def cat_maps(ms: list[MapScores]) -> MapScores:
        return MapScores(*(torch.cat([getattr(m, f.name) for m in ms]) for f in fields(MapScores)))

    adv = None if parts[0].adv is None else cat_maps([p.adv for p in parts if p.adv is not None])
    x_adv = (
        None
        if parts[0].x_adv is None
        else torch.cat([p.x_adv for p in parts if p.x_adv is not None])
    )
    return ReliabilityScores(cat_maps([p.clean for p in parts]), adv, x_adv, parts[0].config)
