"""Fixtures: models and small synthetic datasets.

Plain functions (importable: ``from tests.support.models import tiny_checkpoint``) and pytest
fixtures of the same name that return those functions, so both spellings work::

    def test_a(tmp_path):
        path = tiny_checkpoint(tmp_path, num_classes=1)

    def test_b(tmp_path, tiny_checkpoint, tiny_manifest):
        path = tiny_checkpoint(tmp_path, in_channels=3)
        manifest = tiny_manifest(tmp_path, n_ok=12, n_defect=8)

Everything is seeded and small (CPU, 2 cores, a training job running beside the tests).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from worker.model.checkpoint import NormalizedModel, build_backbone, save_checkpoint

#: Normalisation stored in the tiny checkpoints (per channel).
TINY_MEAN = 0.5
TINY_STD = 0.25


def tiny_model(
    *, num_classes: int = 2, in_channels: int = 1, arch: str = "resnet18", seed: int = 0
) -> NormalizedModel:
    """A seeded, randomly initialised torchvision classifier in ``eval()`` mode.

    Input ``float32[B, in_channels, H, W]`` in [0, 1]; output ``float32[B, num_classes]``.
    The global RNG state is left untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = build_backbone(arch, num_classes, in_channels)
    model = NormalizedModel(backbone, [TINY_MEAN] * in_channels, [TINY_STD] * in_channels)
    return model.eval()


def tiny_checkpoint(
    tmp_path: str | Path,
    *,
    num_classes: int = 2,
    in_channels: int = 1,
    size: tuple[int, int] = (32, 32),
    arch: str = "resnet18",
    seed: int = 0,
    target_layer: str | None = None,
    model_version: str | None = None,
    name: str | None = None,
) -> Path:
    """Write a seeded random-init docs/design.md §2 checkpoint under ``tmp_path`` and return its path.

    ``class_names`` is ``["ok", "defect"]``; ``mean``/``std`` are ``0.5``/``0.25`` per channel;
    ``target_layer`` is auto-detected (``layer4`` for a ResNet) unless given.

    Note: a ResNet downsamples by 32, so at the default 32×32 its ``layer4`` is 1×1 and every
    map is constant (all IoUs and gaps 0, by definition). Score images of 64×64 or more when a
    test needs non-trivial maps.
    """
    model = tiny_model(num_classes=num_classes, in_channels=in_channels, arch=arch, seed=seed)
    h, w = int(size[0]), int(size[1])
    fname = name or f"tiny-{arch}-k{num_classes}-c{in_channels}-{h}x{w}-s{seed}.pt"
    path = Path(tmp_path) / fname
    save_checkpoint(
        path,
        model.backbone,
        arch=arch,
        num_classes=num_classes,
        class_names=["ok", "defect"],
        input_size=(h, w),
        mean=[TINY_MEAN] * in_channels,
        std=[TINY_STD] * in_channels,
        in_channels=in_channels,
        target_layer=target_layer,
        model_version=model_version,
    )
    return path


# -- synthetic surface-inspection dataset --------------------------------------------------


def _smooth_noise(rng: np.random.Generator, size: int, cell: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: a coarse random grid upsampled bilinearly."""
    n = size // cell + 2
    coarse = rng.uniform(-1.0, 1.0, (n, n))
    pos = np.arange(size) / cell
    i0 = np.floor(pos).astype(int)
    f = pos - i0
    rows = coarse[i0] * (1 - f)[:, None] + coarse[i0 + 1] * f[:, None]
    return rows[:, i0] * (1 - f)[None, :] + rows[:, i0 + 1] * f[None, :]


def texture(rng: np.random.Generator, size: int = 48) -> np.ndarray:
    """A noisy mid-grey surface texture, ``float64[size, size]`` in about [0.45, 0.75]."""
    base = 0.6 + 0.06 * _smooth_noise(rng, size, 8)
    grain = 0.03 * rng.standard_normal((size, size))
    stripes = 0.02 * np.sin(np.arange(size) * rng.uniform(0.5, 1.0) + rng.uniform(0, 6.3))
    return np.clip(base + grain + stripes[None, :], 0.0, 1.0)


def defect_mask(rng: np.random.Generator, size: int = 48) -> tuple[np.ndarray, str]:
    """A random defect region (``bool[size, size]``) and its type: ``blob`` or ``scratch``."""
    yy, xx = np.mgrid[0:size, 0:size].astype(float)
    margin = 8
    cy, cx = rng.uniform(margin, size - margin, 2)
    if rng.random() < 0.5:
        ry, rx = rng.uniform(3.5, 6.5, 2)
        return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0, "blob"
    angle = rng.uniform(0, np.pi)
    half = rng.uniform(8, 14)
    dy, dx = np.sin(angle), np.cos(angle)
    along = (yy - cy) * dy + (xx - cx) * dx
    across = np.abs(-(yy - cy) * dx + (xx - cx) * dy)
    return (np.abs(along) <= half) & (across <= 1.5), "scratch"


def tiny_manifest(
    tmp_path: str | Path,
    n_ok: int = 30,
    n_defect: int = 20,
    *,
    size: int = 48,
    seed: int = 0,
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
    folder: str = "tiny_dataset",
) -> Path:
    """Write a small synthetic dataset and return the path of its ``manifest.csv``.

    Layout under ``tmp_path/folder``: ``images/{ok,defect}_NNN.png`` (8-bit grayscale,
    ``size × size``, a noisy mid-grey texture), ``masks/defect_NNN.png`` (0/255) and
    ``manifest.csv`` with ``path,label,defect_type,mask_path,split`` (paths relative to the
    manifest's folder; ``defect_type``/``mask_path`` empty for ``ok``). A defect is a dark
    blob (radii 3.5–6.5 px) or a dark scratch (3 px wide, 16–28 px long) at a random position,
    about 0.35 darker than the surface: a tiny CNN learns it in a few epochs.
    The split is stratified per label in ``fractions`` (train/val/test), each split getting at
    least one image of each label when there are at least 3. Deterministic in ``seed``.
    """
    if n_ok < 1 or n_defect < 1:
        raise ValueError("need at least one ok and one defect image")
    root = Path(tmp_path) / folder
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows: list[dict[str, str]] = []
    for label, n in (("ok", n_ok), ("defect", n_defect)):
        splits = _stratified_splits(n, fractions, rng)
        for i in range(n):
            img = texture(rng, size)
            defect_type, mask_rel = "", ""
            if label == "defect":
                mask, defect_type = defect_mask(rng, size)
                depth = rng.uniform(0.3, 0.4)
                img = np.where(mask, np.clip(img - depth, 0.0, 1.0), img)
                mask_rel = f"masks/defect_{i:03d}.png"
                Image.fromarray((mask * 255).astype(np.uint8), mode="L").save(root / mask_rel)
            rel = f"images/{label}_{i:03d}.png"
            Image.fromarray(np.round(img * 255).astype(np.uint8), mode="L").save(root / rel)
            rows.append(
                {
                    "path": rel,
                    "label": label,
                    "defect_type": defect_type,
                    "mask_path": mask_rel,
                    "split": splits[i],
                }
            )
    manifest = root / "manifest.csv"
    with manifest.open("w", newline="") as fh:
        writer = csv.DictWriter(
            fh, fieldnames=["path", "label", "defect_type", "mask_path", "split"]
        )
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def _stratified_splits(
    n: int, fractions: tuple[float, float, float], rng: np.random.Generator
) -> list[str]:
    names = ("train", "val", "test")
    counts = [int(round(f * n)) for f in fractions]
    if n >= 3:
        counts = [max(1, c) for c in counts]
    while sum(counts) > n:  # take the surplus from the largest split
        counts[int(np.argmax(counts))] -= 1
    counts[0] += n - sum(counts)
    labels = [name for name, c in zip(names, counts, strict=True) for _ in range(c)]
    order = rng.permutation(n)
    return [labels[j] for j in order]


# -- pytest fixtures (same names, returning the factories) ----------------------------------


@pytest.fixture
def single_thread():
    """Run the test with one intra-op torch thread (restored afterwards).

    On a 2-core machine shared with a training job, two OpenMP threads spin against each other:
    a resnet18 forward pass that takes ~15 ms on one thread took ~850 ms on two.
    Use with ``pytestmark = pytest.mark.usefixtures("single_thread")``.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(name="tiny_checkpoint")
def _tiny_checkpoint_fixture():
    """The :func:`tiny_checkpoint` factory: ``tiny_checkpoint(tmp_path, num_classes=..., ...)``."""
    return tiny_checkpoint


@pytest.fixture(name="tiny_manifest")
def _tiny_manifest_fixture():
    """The :func:`tiny_manifest` factory: ``tiny_manifest(tmp_path, n_ok=..., n_defect=...)``."""
    return tiny_manifest


@pytest.fixture(name="tiny_model")
def _tiny_model_fixture():
    """The :func:`tiny_model` factory: a seeded eval-mode ``NormalizedModel``."""
    return tiny_model
