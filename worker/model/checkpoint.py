"""The production model's checkpoint format (docs/design.md §2): build, save and load.

A checkpoint is a ``torch.save`` dict with ``arch`` (a torchvision classification model name),
``state_dict``, ``num_classes`` (2, or 1 for a single-logit sigmoid head), ``class_names``,
``input_size`` ``[H, W]``, ``mean``, ``std``, ``in_channels``, optional ``target_layer``
(dotted module name; auto-detected when absent) and ``model_version``. Extra keys (the
training ``recipe``, ``metrics``) are kept. No weights are ever downloaded.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

REQUIRED_KEYS = ("arch", "state_dict", "num_classes", "class_names", "input_size", "mean", "std")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the reason."""


class NormalizedModel(nn.Module):
    """``backbone((x - mean) / std)``: takes images in [0, 1] pixel units.

    Input ``float32[B, C, H, W]`` in [0, 1]; output logits ``float32[B, num_classes]``.
    Keeping the normalisation inside the model lets the adversarial step's ε be stated in
    pixel units of the [0, 1] image.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, backbone: nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.backbone = backbone
        c = len(mean)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, c, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, c, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone((x - self.mean) / self.std)


@dataclass
class ProductionModel:
    """A loaded checkpoint: the model in eval mode and its metadata."""

    model: NormalizedModel
    arch: str
    num_classes: int
    class_names: list[str]
    input_size: tuple[int, int]
    in_channels: int
    target_layer: str
    model_version: str
    path: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: how an image is fitted to ``input_size``: ``squash`` or ``pad`` (see
    #: :data:`worker.model.preprocess.RESIZE_MODES`)
    resize: str = "squash"

    @property
    def defect_index(self) -> int:
        return self.class_names.index("defect") if self.num_classes == 2 else 0

    @property
    def ok_index(self) -> int:
        return self.class_names.index("ok") if self.num_classes == 2 else 0

    def to(self, device: torch.device | str) -> ProductionModel:
        self.model.to(device)
        return self


def p_defect_from_logits(z: torch.Tensor, defect_index: int = 1) -> torch.Tensor:
    """P(defect) from the production model's logits (the one place this is computed).

    Args:
        z: logits ``float[N, 2]`` (softmax head) or ``float[N, 1]`` (single-logit sigmoid head,
            ``z_defect = z``).
        defect_index: index of the ``defect`` logit of a 2-logit head (ignored for 1 logit).

    Returns:
        ``float[N]`` in [0, 1], unitless probability.

    Raises:
        ValueError: ``z`` is not ``[N, 1]`` or ``[N, 2]``, or ``defect_index`` is out of range.
    """
    if z.dim() != 2 or z.shape[1] not in (1, 2):
        raise ValueError(f"logits must be [N, 1] or [N, 2], got {tuple(z.shape)}")
    if z.shape[1] == 1:
        return torch.sigmoid(z[:, 0])
    if defect_index not in (0, 1):
        raise ValueError(f"defect_index must be 0 or 1, got {defect_index}")
    return torch.softmax(z, dim=1)[:, defect_index]


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Eval-mode logits ``float32[N, num_classes]`` for ``float32[N, C, H, W]`` in [0, 1].

    Puts ``model`` in ``eval()`` mode (BatchNorm statistics frozen) and runs it in chunks of
    ``batch_size`` images.
    """
    model.eval()
    return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def _adapt_in_channels(model: nn.Module, in_channels: int) -> None:
    """Replace the first ``Conv2d`` so the model takes ``in_channels`` input channels."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            if module.in_channels == in_channels:
                return
            new = nn.Conv2d(
                in_channels,
                module.out_channels,
                kernel_size=module.kernel_size,  # type: ignore[arg-type]
                stride=module.stride,  # type: ignore[arg-type]
                padding=module.padding,  # type: ignore[arg-type]
                dilation=module.dilation,  # type: ignore[arg-type]
                groups=module.groups,
                bias=module.bias is not None,
            )
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, new)
            return
    raise CheckpointError(f"model has no Conv2d to take {in_channels} input channels")


def build_backbone(arch: str, num_classes: int, in_channels: int) -> nn.Module:
    """A freshly initialised torchvision classifier (``weights=None``: nothing is downloaded).

    Raises:
        CheckpointError: ``arch`` is not a torchvision classification model.
    """
    try:
        available = torchvision.models.list_models(module=torchvision.models)
    except Exception:  # pragma: no cover - very old torchvision
        available = []
    if arch not in available:
        raise CheckpointError(f"unknown arch {arch!r} (not a torchvision classification model)")
    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    if in_channels != 3:
        _adapt_in_channels(model, in_channels)
    return model


#: torchvision model classes whose target layer is auto-detected, and that layer: the last
#: convolutional stage, fed to global pooling and the head. Each family is checked against
#: ``pytorch_grad_cam`` in ``tests/test_engine_families.py``; add a family only with its test.
AUTO_TARGET_LAYERS: dict[type[nn.Module], str] = {
    torchvision.models.ResNet: "layer4",  # resnet*, resnext*, wide_resnet*
    torchvision.models.DenseNet: "features",  # densenet*
    torchvision.models.MobileNetV2: "features",
    torchvision.models.MobileNetV3: "features",  # mobilenet_v3_small / _large
    torchvision.models.EfficientNet: "features",  # efficientnet_b*, efficientnet_v2_*
    torchvision.models.VGG: "features",  # vgg*, vgg*_bn
    torchvision.models.ConvNeXt: "features",  # convnext_*
    torchvision.models.RegNet: "trunk_output",  # regnet_x_*, regnet_y_*
}


def detect_target_layer(backbone: nn.Module, *, arch: str | None = None) -> str:
    """The target layer to explain when a checkpoint names none.

    For the torchvision families of :data:`AUTO_TARGET_LAYERS` (ResNet/ResNeXt/Wide ResNet,
    DenseNet, MobileNet v2/v3, EfficientNet, VGG, ConvNeXt, RegNet) it is that family's last
    convolutional stage (``layer4``, ``features`` or ``trunk_output``). Any other torchvision
    model, and any model named by ``arch``, is refused: name ``target_layer`` in its checkpoint.
    A module that is not a torchvision classifier (``arch`` not given) gets the last top-level
    child that contains a ``Conv2d``.

    Args:
        backbone: the classifier (without :class:`NormalizedModel`).
        arch: the checkpoint's torchvision model name, used in the error message and to refuse
            a backbone outside the tested families.

    Raises:
        CheckpointError: an arch outside the tested families, or a model with no convolution.
    """
    cls = type(backbone)
    if cls in AUTO_TARGET_LAYERS:
        return AUTO_TARGET_LAYERS[cls]
    if arch is not None or cls.__module__.startswith("torchvision.models"):
        name = arch if arch is not None else cls.__name__
        raise CheckpointError(
            f"arch {name!r} has no auto-detected target layer (auto-detection covers resnet, "
            "resnext, wide_resnet, densenet, mobilenet_v2, mobilenet_v3, efficientnet, vgg, "
            "convnext and regnet); set target_layer in the checkpoint"
        )
    last: str | None = None
    for name, child in backbone.named_children():
        if any(isinstance(m, nn.Conv2d) for m in child.modules()):
            last = name
    if last is None:
        raise CheckpointError("model has no Conv2d block to explain")
    return last


def model_version_of(state_dict: dict[str, torch.Tensor], arch: str) -> str:
    """A stable fallback version: ``arch-<sha1 of the weights>[:12]``."""
    h = hashlib.sha1(arch.encode())
    for k in sorted(state_dict):
        h.update(k.encode())
        h.update(state_dict[k].detach().cpu().contiguous().numpy().tobytes())
    return f"{arch}-{h.hexdigest()[:12]}"


def save_checkpoint(
    path: str | Path,
    backbone: nn.Module,
    *,
    arch: str,
    num_classes: int,
    class_names: list[str],
    input_size: tuple[int, int],
    mean: list[float],
    std: list[float],
    in_channels: int,
    target_layer: str | None = None,
    model_version: str | None = None,
    **extra: Any,
) -> str:
    """Write a docs/design.md §2 checkpoint; returns its ``model_version``."""
    state = {k: v.detach().cpu() for k, v in backbone.state_dict().items()}
    version = model_version or model_version_of(state, arch)
    payload = {
        "arch": arch,
        "state_dict": state,
        "num_classes": num_classes,
        "class_names": list(class_names),
        "input_size": [int(input_size[0]), int(input_size[1])],
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "in_channels": in_channels,
        "target_layer": target_layer or detect_target_layer(backbone, arch=arch),
        "model_version": version,
        **extra,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return version


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> ProductionModel:
    """Load a checkpoint into an eval-mode :class:`NormalizedModel` on ``device``.

    Raises:
        CheckpointError: the file is missing or corrupt, a key is missing or malformed, the
            arch is unknown, the ``state_dict`` does not fit, or ``target_layer`` is absent
            from the model. The message names the file and the reason.
    """
    path = Path(path)

    def fail(reason: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {path}: {reason}")

    if not path.is_file():
        raise fail("file not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt zip, pickle of disallowed types, truncated file...
        raise fail(f"cannot be read ({type(exc).__name__}: {exc})") from exc
    if not isinstance(ckpt, dict):
        raise fail(f"expected a dict, found {type(ckpt).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise fail(f"missing keys {missing}")
    num_classes = int(ckpt["num_classes"])
    class_names = [str(c) for c in ckpt["class_names"]]
    if num_classes not in (1, 2):
        raise fail(f"num_classes must be 1 or 2, got {num_classes}")
    if num_classes == 2 and sorted(class_names) != ["defect", "ok"]:
        raise fail(f"class_names must be ['ok', 'defect'] in some order, got {class_names}")
    mean, std = list(ckpt["mean"]), list(ckpt["std"])
    in_channels = int(ckpt.get("in_channels", len(mean)))
    if len(mean) != in_channels or len(std) != in_channels:
        raise fail(f"mean/std need {in_channels} values, got {len(mean)}/{len(std)}")
    if any(float(s) <= 0 for s in std):
        raise fail("std must be positive")
    size = ckpt["input_size"]
    if len(size) != 2 or min(int(s) for s in size) < 8:
        raise fail(f"input_size must be [H, W] with sides >= 8, got {size}")
    try:
        backbone = build_backbone(str(ckpt["arch"]), num_classes, in_channels)
    except CheckpointError as exc:
        raise fail(str(exc)) from exc
    try:
        backbone.load_state_dict(ckpt["state_dict"], strict=True)
    except Exception as exc:
        raise fail(f"state_dict does not fit arch {ckpt['arch']!r}: {exc}") from exc
    try:
        target_layer = ckpt.get("target_layer") or detect_target_layer(
            backbone, arch=str(ckpt["arch"])
        )
    except CheckpointError as exc:
        raise fail(str(exc)) from exc
    try:
        backbone.get_submodule(target_layer)
    except AttributeError as exc:
        raise fail(f"target_layer {target_layer!r} is not a module of the model") from exc
    model = NormalizedModel(backbone, mean, std).eval().to(device)
    extra = {k: v for k, v in ckpt.items() if k not in REQUIRED_KEYS and k != "state_dict"}
    resize = str(ckpt.get("resize") or "squash")
    if resize not in ("squash", "pad"):
        raise fail(f"resize must be 'squash' or 'pad', got {resize!r}")
    return ProductionModel(
        resize=resize,
        model=model,
        arch=str(ckpt["arch"]),
        num_classes=num_classes,
        class_names=class_names,
        input_size=(int(size[0]), int(size[1])),
        in_channels=in_channels,
        target_layer=str(target_layer),
        model_version=str(
            ckpt.get("model_version") or model_version_of(ckpt["state_dict"], ckpt["arch"])
        ),
        path=path,
        extra=extra,
    )
