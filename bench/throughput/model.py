"""The model under test: a seeded random resnet18 or a checkpoint, and the engines on it."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from worker.engine.options import Attack
    from worker.engine.score import ReliabilityEngine
    from worker.model.checkpoint import NormalizedModel


@dataclass
class ModelSpec:
    """The model under test and what the engine and pytorch_grad_cam need to know about it.

    Attributes:
        model: ``[0, 1]`` pixels in, logits out, eval mode (a ``NormalizedModel``).
        layer: target layer, dotted name inside ``model.backbone``.
        num_classes: logits of the head (2, or 1 for a single-logit sigmoid head).
        defect_index, ok_index: logit indices of the two classes (2-logit head).
        input_size: ``(H, W)`` in pixels.
        in_channels: image channels the model takes.
        description: one line for the report.
        arch: torchvision architecture name (written into a saved checkpoint).
        checkpoint: the checkpoint file it came from, if any.
    """

    model: NormalizedModel
    layer: str
    num_classes: int
    defect_index: int
    ok_index: int
    input_size: tuple[int, int]
    in_channels: int
    description: str
    arch: str = "resnet18"
    checkpoint: Path | None = None

    def target_module(self) -> nn.Module:
        """The explained layer (``model.backbone.<layer>``)."""
        return self.model.backbone.get_submodule(self.layer)


def random_model(
    image_size: int, seed: int = 0, arch: str = "resnet18", in_channels: int = 1
) -> ModelSpec:
    """``build_backbone(arch, 2, in_channels)`` with seeded random weights in a
    ``NormalizedModel`` (mean 0.5, std 0.25 per channel).

    The global RNG is left as it was (the weights come from a forked RNG).
    """
    from worker.model.checkpoint import NormalizedModel, build_backbone

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = build_backbone(arch, 2, in_channels)
    model = NormalizedModel(backbone, [0.5] * in_channels, [0.25] * in_channels).eval()
    return ModelSpec(
        model=model,
        layer="layer4",
        num_classes=2,
        defect_index=1,
        ok_index=0,
        input_size=(image_size, image_size),
        in_channels=in_channels,
        description=f"{arch}, random weights (seed {seed}), {in_channels} input channel"
        + ("s" if in_channels != 1 else ""),
        arch=arch,
    )


def checkpoint_model(path: Path) -> ModelSpec:
    """A docs/design.md §2 checkpoint, loaded on the CPU (its calibration sidecar is not used)."""
    from worker.model.checkpoint import load_checkpoint

    pm = load_checkpoint(path, "cpu")
    return ModelSpec(
        model=pm.model.eval(),
        layer=pm.target_layer,
        num_classes=pm.num_classes,
        defect_index=pm.defect_index if pm.num_classes == 2 else 0,
        ok_index=pm.ok_index if pm.num_classes == 2 else 0,
        input_size=pm.input_size,
        in_channels=pm.in_channels,
        description=f"{pm.arch} checkpoint {path} (model_version {pm.model_version}), "
        f"{pm.in_channels} input channel(s)",
        arch=pm.arch,
        checkpoint=path,
    )


def save_model_checkpoint(spec: ModelSpec, path: Path, model_version: str | None = None) -> Path:
    """Write ``spec``'s model as a checkpoint the worker can load (random weights included).

    A ``--model`` checkpoint is copied as it is (without its calibration sidecar).
    ``model_version`` defaults to ``bench-<arch>-<H>x<W>``.
    """
    if spec.checkpoint is not None:
        shutil.copyfile(spec.checkpoint, path)
        return path
    from worker.model.checkpoint import save_checkpoint

    model = spec.model
    save_checkpoint(
        path,
        model.backbone,
        arch=spec.arch,
        num_classes=spec.num_classes,
        class_names=["ok", "defect"],
        input_size=spec.input_size,
        mean=[float(v) for v in model.mean.flatten()],
        std=[float(v) for v in model.std.flatten()],
        in_channels=spec.in_channels,
        target_layer=spec.layer,
        model_version=model_version
        or f"bench-{spec.arch}-{spec.input_size[0]}x{spec.input_size[1]}",
    )
    return path


def make_engine(spec: ModelSpec, attack: Attack) -> ReliabilityEngine:
    """A ``ReliabilityEngine`` on ``spec``'s model at its target layer, ``EngineConfig(attack)``.

    Every other option keeps the engine's default (the worker's defaults); ``target_layer``
    names ``spec.layer`` so the config says which layer is explained.
    """
    from worker.engine.options import EngineConfig
    from worker.engine.score import ReliabilityEngine

    return ReliabilityEngine(
        spec.model,
        spec.target_module(),
        defect_index=spec.defect_index if spec.num_classes == 2 else 1,
        ok_index=spec.ok_index if spec.num_classes == 2 else 0,
        config=EngineConfig(attack=attack, target_layer=spec.layer),
    )
