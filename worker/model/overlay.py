"""Review maps: every map the audit made, drawn so that a reviewer can act on it.

One PNG per map (:func:`render_map`), at the image's own aspect ratio, on a **fixed colour
scale anchored to the decision threshold** (:class:`EvidenceScale`):

* the Grad-CAM and class-agnostic maps are normalised to [0, 1] per image and binarised at θ
  (``EngineConfig.theta``) before their IoU is taken (docs/design.md §3.3), so their scale is
  [0, 1] with θ at the anchor colour;
* an anomaly map holds raw patch distances in its bank's units; its scale is [0, 2τ] with the
  anomaly method's τ at the anchor colour (without a τ: [0, the map's maximum], marked
  "uncalibrated").

Below the anchor a map is drawn in translucent blues (no evidence for the decision), from the
anchor up in opaque yellow → red, so **yellow always means "at the threshold"**, on every image
and every map. Each map carries a legend strip (colour bar, its ends and the anchor). The
binarised mask of each map (the pixels its IoU was computed on) is outlined, and
:func:`decision_region` (the region that drove the decision) is outlined in cyan on the image
and boxed when it is small. :func:`save_review_maps` writes them all plus a composite
thumbnail for the review queue.

:func:`overlay_array` / :func:`save_overlay` (a single map, min-max ``jet``) are kept for
callers that want the old picture. No pyplot and no display: PIL and numpy only.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from worker.model.naming import map_title

MIN_SIDE = 256
TITLE_HEIGHT = 22

#: Where the anchor (θ or τ) sits on the normalised colour scale.
ANCHOR_AT = 0.5
#: Colour of the decision region's outline and box (cyan: absent from the evidence scale).
REGION_RGB = (0, 229, 255)
#: Colour of each map's own binarised-mask outline.
MASK_RGB = (255, 255, 255)
#: Longest side of each panel of the composite thumbnail.
THUMB_SIDE = 192
#: A decision region covering less than this share of the image is also boxed.
BOX_BELOW = 0.05

# --- fonts ------------------------------------------------------------------------------------
_FONT_CACHE: dict[int, Any] = {}


def _font(size: int = 12) -> Any:
    """DejaVu Sans when installed (it has θ and τ), else PIL's built-in font."""
    if size not in _FONT_CACHE:
        try:
            _FONT_CACHE[size] = ImageFont.truetype("DejaVuSans.ttf", size)
        except OSError:
            _FONT_CACHE[size] = ImageFont.load_default(size=size)
    return _FONT_CACHE[size]


def _symbol(greek: str, ascii_name: str) -> str:
    """``greek`` when the font has it (DejaVu), else ``ascii_name``."""
    return greek if "DejaVu" in str(getattr(_font(), "path", "")) else ascii_name


# --- the colour scale -------------------------------------------------------------------------
@dataclass(frozen=True)
class EvidenceScale:
    """A fixed colour scale ``[lo, hi]`` whose ``anchor`` (the decision threshold) always
    lands on the same colour (:data:`ANCHOR_AT` of the colour map: yellow).

    Attributes:
        lo, anchor, hi: map values; ``lo < anchor < hi``.
        symbol: what the anchor is, e.g. ``θ`` or ``τ``.
        calibrated: False when no threshold was known (the anchor is then only the middle).

    Raises:
        ValueError: values that are not finite or not ordered ``lo < anchor < hi``.
    """

    lo: float
    anchor: float
    hi: float
    symbol: str = "θ"
    calibrated: bool = True

    def __post_init__(self) -> None:
        vals = (self.lo, self.anchor, self.hi)
        if not all(np.isfinite(v) for v in vals) or not self.lo < self.anchor < self.hi:
            raise ValueError(f"scale needs finite lo < anchor < hi, got {vals}")

    @classmethod
    def for_cam(cls, theta: float) -> EvidenceScale:
        """A normalised map in [0, 1] binarised at ``theta`` (0 < θ < 1; θ = 1 is drawn at
        0.999 so that the scale stays ordered)."""
        t = min(max(float(theta), 1e-3), 0.999)
        return cls(0.0, t, 1.0, _symbol("θ", "theta"))

    @classmethod
    def for_distance(cls, tau: float | None, values: np.ndarray | None = None) -> EvidenceScale:
        """Raw distances (an anomaly map): ``[0, 2τ]`` with τ at the anchor; without a usable
        τ, ``[0, max]`` of ``values`` (marked uncalibrated)."""
        sym = _symbol("τ", "tau")
        if tau is not None and np.isfinite(tau) and tau > 0:
            return cls(0.0, float(tau), 2.0 * float(tau), sym)
        top = float(np.nanmax(values)) if values is not None and values.size else 1.0
        top = top if np.isfinite(top) and top > 0 else 1.0
        return cls(0.0, top / 2.0, top, sym, calibrated=False)

    def normalise(self, values: np.ndarray) -> np.ndarray:
        """Map values onto [0, 1], piecewise linearly, with ``anchor`` at :data:`ANCHOR_AT`."""
        v = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=self.lo)
        below = ANCHOR_AT * (v - self.lo) / (self.anchor - self.lo)
        above = ANCHOR_AT + (1 - ANCHOR_AT) * (v - self.anchor) / (self.hi - self.anchor)
        return np.clip(np.where(v < self.anchor, below, above), 0.0, 1.0)

    def describe(self) -> str:
        """E.g. ``"0 … θ 0.50 … 1"``."""
        cal = "" if self.calibrated else " (uncalibrated)"
        return f"{_num(self.lo)} … {self.symbol} {_num(self.anchor)} … {_num(self.hi)}{cal}"


def _num(v: float) -> str:
    return f"{v:.2f}" if abs(v) < 100 else f"{v:.0f}"


# (position, RGB, alpha): translucent blues below the anchor, opaque yellow → red above it.
_STOPS = np.array(
    [
        (0.00, 8, 48, 107, 0.00),
        (0.499, 107, 174, 214, 0.35),
        (0.50, 255, 224, 51, 0.60),
        (0.75, 253, 141, 60, 0.70),
        (1.00, 215, 25, 28, 0.78),
    ]
)


def evidence_colours(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Colours of normalised values ``t`` in [0, 1]: ``(rgb float[..., 3] in [0, 1], alpha
    float[...])``. ``t = 0.5`` (the anchor) is always yellow ``(255, 224, 51)``."""
    t = np.clip(np.asarray(t, dtype=np.float64), 0.0, 1.0)
    rgb = np.stack([np.interp(t, _STOPS[:, 0], _STOPS[:, c]) for c in (1, 2, 3)], -1) / 255.0
    alpha = np.interp(t, _STOPS[:, 0], _STOPS[:, 4])
    return rgb, alpha


# --- drawing ------------------------------------------------------------------------------------
def _image_rgb(image: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """``float[C, h, w]`` in [0, 1] → ``float[H, W, 3]`` at ``size`` (H, W)."""
    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"image must be [C, H, W] with C = 1 or 3, got {tuple(image.shape)}")
    img = image.detach().float().cpu().clamp(0.0, 1.0)
    if tuple(img.shape[1:]) != size:
        img = torch.nn.functional.interpolate(
            img[None], size=size, mode="bilinear", align_corners=False, antialias=True
        )[0].clamp(0.0, 1.0)
    h, w = size
    return (img.expand(3, h, w) if img.shape[0] == 1 else img).permute(1, 2, 0).numpy()


def _as_array(m: torch.Tensor | np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
    t = torch.as_tensor(m).detach().float().cpu()
    if t.dim() != 2:
        raise ValueError(f"a map must be [H, W], got {tuple(t.shape)}")
    if size is not None and tuple(t.shape) != size:
        t = torch.nn.functional.interpolate(
            t[None, None], size=size, mode="bilinear", align_corners=False
        )[0, 0]
    return t.numpy().astype(np.float64)


def boundary(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """Pixels of ``mask`` (bool[H, W]) that touch a pixel outside it, thickened to ``width``."""
    m = np.asarray(mask, dtype=bool)
    pad = np.pad(m, 1, mode="constant", constant_values=False)
    inner = pad[1:-1, 1:-1] & pad[:-2, 1:-1] & pad[2:, 1:-1] & pad[1:-1, :-2] & pad[1:-1, 2:]
    edge = m & ~inner
    for _ in range(max(0, width - 1)):
        p = np.pad(edge, 1)
        edge = edge | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]
    return edge


def render_map(
    image: torch.Tensor,
    values: torch.Tensor | np.ndarray,
    scale: EvidenceScale,
    *,
    mask: np.ndarray | None = None,
    region: np.ndarray | None = None,
) -> np.ndarray:
    """Draw a map over its image on ``scale``; returns ``uint8[H, W, 3]`` at the map's size.

    Args:
        image: ``float[C, h, w]`` in [0, 1] (resized to the map when it differs).
        values: ``float[H, W]``, the map in its own units.
        scale: the fixed colour scale.
        mask: the map's binarised mask (outlined in white), if any.
        region: the decision region (outlined in cyan), if any.

    Raises:
        ValueError: wrong shapes.
    """
    v = _as_array(values)
    size = (int(v.shape[0]), int(v.shape[1]))
    rgb = _image_rgb(image, size)
    colour, alpha = evidence_colours(scale.normalise(v))
    out = (1.0 - alpha[..., None]) * rgb + alpha[..., None] * colour
    if mask is not None and mask.shape == size:
        out[boundary(mask)] = np.array(MASK_RGB) / 255.0
    if region is not None and region.shape == size:
        out[boundary(region, 2)] = np.array(REGION_RGB) / 255.0
    return (np.clip(out, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def legend(width: int, scale: EvidenceScale, title: str) -> Image.Image:
    """A legend strip ``width`` pixels wide: ``title`` (wrapped), the colour bar, its ends and
    the anchor."""
    font = _font(11)
    lines = _wrap(title, font, width - 8)
    top = 2 + 13 * len(lines)
    strip = Image.new("RGB", (width, top + 30), "white")
    draw = ImageDraw.Draw(strip)
    for i, line in enumerate(lines):
        draw.text((4, 1 + 13 * i), line, fill="black", font=font)
    x0, x1, y0, y1 = 6, max(8, width - 6), top + 2, top + 12
    t = np.linspace(0.0, 1.0, max(2, x1 - x0))
    colour, alpha = evidence_colours(t)
    bar = (1 - alpha[:, None]) * 1.0 + alpha[:, None] * colour  # over white, as on the image
    bar_img = Image.fromarray((np.clip(bar, 0, 1) * 255).astype(np.uint8)[None].repeat(y1 - y0, 0))
    strip.paste(bar_img, (x0, y0))
    draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=(90, 90, 90))
    ax = x0 + round(ANCHOR_AT * (x1 - x0))
    draw.line((ax, y0 - 3, ax, y1 + 2), fill="black", width=2)
    labels = [
        (x0, _num(scale.lo), "la"),
        (ax, f"{scale.symbol} {_num(scale.anchor)}" + ("" if scale.calibrated else "?"), "ma"),
        (x1, _num(scale.hi), "ra"),
    ]
    for x, text, anchor in labels:
        draw.text((x, y1 + 3), text, fill="black", font=font, anchor=anchor)
    return strip


def with_legend(pic: np.ndarray | Image.Image, scale: EvidenceScale, title: str) -> Image.Image:
    """``pic`` with :func:`legend` below it (at least 200 px wide, so the labels fit)."""
    img = pic if isinstance(pic, Image.Image) else Image.fromarray(pic, mode="RGB")
    width = max(img.size[0], 200)
    strip = legend(width, scale, title)
    canvas = Image.new("RGB", (width, img.size[1] + strip.size[1]), "white")
    canvas.paste(img, ((width - img.size[0]) // 2, 0))
    canvas.paste(strip, (0, img.size[1]))
    return canvas


# --- masks and the decision region ------------------------------------------------------------
def cam_mask(
    values: torch.Tensor | np.ndarray,
    binarize: str = "threshold",
    theta: float = 0.5,
    topk: float = 0.2,
) -> np.ndarray:
    """The engine's own binarisation (:func:`worker.engine.maps.binarize`) of a normalised map."""
    from worker.engine.maps import binarize as engine_binarize

    t = torch.as_tensor(values).detach().float().cpu()
    return engine_binarize(t[None], binarize, theta, topk)[0].numpy().astype(bool)  # type: ignore[arg-type]


def decision_region(method: str, masks: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """The pixels that drove the decision of ``method``.

    * an anomaly method (``anomaly_<bank>``): its map above τ;
    * an IoU method (``iou_*``, the paper's scores): the Grad-CAM defect mask ∩ the
      class-agnostic mask (the overlap the IoU counts), or the defect mask alone when they do
      not overlap;
    * any other method (P(defect) of the production model, its snapshots or auditors, rules):
      the Grad-CAM defect mask, the evidence the network gave for ``defect``.

    Returns ``None`` when no mask is known.
    """
    if method in masks:
        return masks[method]
    defect, agn = masks.get("gradcam_defect"), masks.get("agnostic")
    if defect is None:
        return agn
    overlap = agn is not None and agn.shape == defect.shape and bool((defect & agn).any())
    if method.startswith("iou_") and overlap:
        assert agn is not None
        return defect & agn
    return defect


def _box(pic: Image.Image, region: np.ndarray, scale_factor: float) -> None:
    ys, xs = np.nonzero(region)
    if len(ys) == 0:
        return
    pad = 4
    draw = ImageDraw.Draw(pic)
    x0, x1 = xs.min() * scale_factor - pad, (xs.max() + 1) * scale_factor + pad
    y0, y1 = ys.min() * scale_factor - pad, (ys.max() + 1) * scale_factor + pad
    draw.rectangle((x0, y0, x1, y1), outline=REGION_RGB, width=2)


# --- what the worker writes ---------------------------------------------------------------------
@dataclass
class ReviewMaps:
    """What :func:`save_review_maps` wrote.

    Attributes:
        composite: the queue's thumbnail (image with the decision region | decision map).
        maps: map name → PNG (``image`` is the plain image at the maps' size).
        region_fraction: share of the image inside the decision region.
        scales: map name → its scale, as text (``"0 … θ 0.50 … 1"``).
    """

    composite: Path
    maps: dict[str, Path] = field(default_factory=dict)
    region_fraction: float = 0.0
    scales: dict[str, str] = field(default_factory=dict)


def _save_png(pic: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pic.save(tmp, format="PNG", optimize=False, compress_level=6)
    tmp.replace(path)
    return path


def save_review_maps(
    image: torch.Tensor,
    maps: Mapping[str, torch.Tensor],
    folder: str | Path,
    *,
    method: str,
    binarize: str = "threshold",
    theta: float = 0.5,
    topk: float = 0.2,
    taus: Mapping[str, float | None] | None = None,
    caption: str | None = None,
) -> ReviewMaps:
    """Write every map of one audited image under ``folder`` (created), atomically.

    Args:
        image: the image at the maps' size, ``float[C, h, w]`` in [0, 1]
            (``worker.measure.Measured.images[i]``).
        maps: ``Measured.maps[i]``: ``gradcam_defect``, ``gradcam_ok``, ``agnostic`` (normalised
            [0, 1]) and any ``anomaly_<bank>`` (raw distances).
        folder: where ``image.png``, ``<map>.png`` and ``composite.png`` go.
        method: the decision method (which region to outline; see :func:`decision_region`).
        binarize, theta, topk: the engine's binarisation (``EngineConfig``), the masks the IoUs
            were computed on.
        taus: τ per scoring method (anomaly maps are drawn on ``[0, 2τ]`` of their method).
        caption: one line above the composite (id, score and τ).

    Returns:
        :class:`ReviewMaps`.

    Raises:
        ValueError: wrong shapes; OSError: the files cannot be written.
    """
    folder = Path(folder)
    taus = taus or {}
    arrays = {name: _as_array(m) for name, m in maps.items()}
    if not arrays:
        raise ValueError("no maps to draw")
    size = next(iter(arrays.values())).shape
    size = (int(size[0]), int(size[1]))
    scales: dict[str, EvidenceScale] = {}
    masks: dict[str, np.ndarray] = {}
    for name, v in arrays.items():
        if v.shape != size:
            arrays[name] = v = _as_array(torch.from_numpy(v), size)
        if name.startswith("anomaly_"):
            tau = taus.get(name)
            scales[name] = EvidenceScale.for_distance(tau, v)
            if tau is not None and np.isfinite(tau):
                masks[name] = v >= tau
        else:
            scales[name] = EvidenceScale.for_cam(theta)
            masks[name] = cam_mask(v, binarize, theta, topk)
    region = decision_region(method, masks)
    out = ReviewMaps(composite=folder / "composite.png")
    base = Image.fromarray(
        (np.clip(_image_rgb(image, size), 0, 1) * 255 + 0.5).astype(np.uint8), mode="RGB"
    )
    out.maps["image"] = _save_png(base, folder / "image.png")
    for name, v in arrays.items():
        pic = render_map(image, v, scales[name], mask=masks.get(name), region=region)
        rule = "binarised" if not name.startswith("anomaly_") else "above τ"
        title = f"{map_title(name)}; white: {rule}, cyan: decision region"
        out.maps[name] = _save_png(with_legend(pic, scales[name], title), folder / f"{name}.png")
        out.scales[name] = scales[name].describe()
    if region is not None:
        out.region_fraction = float(region.mean())
    out.composite = _save_png(
        composite(image, arrays, scales, masks, region, method, caption), out.composite
    )
    return out


def _decision_map(method: str, arrays: Mapping[str, np.ndarray]) -> str:
    if method in arrays:
        return method
    return "gradcam_defect" if "gradcam_defect" in arrays else next(iter(arrays))


def composite(
    image: torch.Tensor,
    arrays: Mapping[str, np.ndarray],
    scales: Mapping[str, EvidenceScale],
    masks: Mapping[str, np.ndarray],
    region: np.ndarray | None,
    method: str,
    caption: str | None = None,
) -> Image.Image:
    """The queue's thumbnail: the image with the decision region outlined (and boxed when
    small) beside the decision map on its fixed scale, a legend below, ``caption`` above."""
    name = _decision_map(method, arrays)
    v = arrays[name]
    size = (int(v.shape[0]), int(v.shape[1]))
    f = THUMB_SIDE / max(size)
    thumb = (max(1, round(size[1] * f)), max(1, round(size[0] * f)))
    plain = render_map(
        image, np.full(size, scales[name].lo), scales[name], region=region
    )  # the image itself, outline only
    heat = render_map(image, v, scales[name], mask=masks.get(name), region=region)
    left = Image.fromarray(plain).resize(thumb, Image.Resampling.BILINEAR)
    right = Image.fromarray(heat).resize(thumb, Image.Resampling.BILINEAR)
    if region is not None and 0 < region.mean() < BOX_BELOW:
        _box(left, region, f)
        _box(right, region, f)
    gap = 4
    row = Image.new("RGB", (thumb[0] * 2 + gap, thumb[1]), "white")
    row.paste(left, (0, 0))
    row.paste(right, (thumb[0] + gap, 0))
    pic = with_legend(row, scales[name], map_title(name))
    if caption:
        font = _font(11)
        lines = _wrap(caption, font, pic.size[0] - 8)
        head = 16 * len(lines) + 4
        canvas = Image.new("RGB", (pic.size[0], pic.size[1] + head), "white")
        canvas.paste(pic, (0, head))
        draw = ImageDraw.Draw(canvas)
        for i, line in enumerate(lines):
            draw.text((4, 2 + 16 * i), line, fill="black", font=font)
        pic = canvas
    return pic


# --- the single-map picture of before (kept for other callers) -----------------------------
def _colormap(name: str) -> Any:
    from matplotlib import colormaps

    return colormaps[name]


def overlay_array(
    image: torch.Tensor, cam: torch.Tensor, *, alpha: float = 0.45, cmap: str = "jet"
) -> np.ndarray:
    """Blend ``cam`` onto ``image``; returns ``uint8[H, W, 3]``.

    Args:
        image: ``float[C, H, W]`` in [0, 1], ``C`` = 1 or 3.
        cam: ``float[H', W']`` in [0, 1]; resized bilinearly to ``H × W`` when it differs.
        alpha: weight of the heatmap.
        cmap: a matplotlib colormap name.

    Raises:
        ValueError: wrong shapes.
    """
    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"image must be [C, H, W] with C = 1 or 3, got {tuple(image.shape)}")
    if cam.dim() != 2:
        raise ValueError(f"cam must be [H, W], got {tuple(cam.shape)}")
    img = image.detach().float().cpu().clamp(0.0, 1.0)
    h, w = img.shape[1:]
    m = cam.detach().float().cpu()
    if tuple(m.shape) != (h, w):
        m = torch.nn.functional.interpolate(
            m[None, None], size=(h, w), mode="bilinear", align_corners=False
        )[0, 0]
    heat_in = torch.nan_to_num(m, nan=0.0).clamp(0.0, 1.0).numpy()
    rgb = (
        img.expand(3, h, w).permute(1, 2, 0).numpy()
        if img.shape[0] == 1
        else img.permute(1, 2, 0).numpy()
    )
    heat = _colormap(cmap)(heat_in)[..., :3]
    out = (1.0 - alpha) * rgb + alpha * heat
    return (np.clip(out, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _wrap(text: str, font: Any, width: int) -> list[str]:
    """Split ``text`` at spaces into lines that fit ``width`` pixels (a long word stays whole)."""
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def save_overlay(
    image: torch.Tensor,
    cam: torch.Tensor,
    path: str | Path,
    title: str | None = None,
    *,
    alpha: float = 0.45,
    cmap: str = "jet",
    min_side: int = MIN_SIDE,
) -> Path:
    """Write a PNG of ``cam`` (``[H, W]`` in [0, 1]) over ``image`` (``[C, H, W]`` in [0, 1]).

    The picture is upscaled so that its shorter side is at least ``min_side`` pixels; a
    ``title`` goes in a white strip above it. The file is written atomically (a temporary file
    renamed into place); parent folders are created. Returns the path written.
    """
    arr = overlay_array(image, cam, alpha=alpha, cmap=cmap)
    pic = Image.fromarray(arr, mode="RGB")
    short = min(pic.size)
    if short < min_side:
        f = min_side / short
        pic = pic.resize(
            (round(pic.size[0] * f), round(pic.size[1] * f)), Image.Resampling.BILINEAR
        )
    if title:
        font = ImageFont.load_default()
        lines = _wrap(title, font, pic.size[0] - 8)
        height = TITLE_HEIGHT * len(lines)
        canvas = Image.new("RGB", (pic.size[0], pic.size[1] + height), "white")
        canvas.paste(pic, (0, height))
        draw = ImageDraw.Draw(canvas)
        for i, line in enumerate(lines):
            draw.text((4, 4 + i * TITLE_HEIGHT), line, fill="black", font=font)
        pic = canvas
    return _save_png(pic, Path(path))
