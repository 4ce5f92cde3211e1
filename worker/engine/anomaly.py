"""PatchCore-style anomaly score learnt from ``ok`` images only.

* PatchCore — K. Roth, L. Pemula, J. Zepeda, B. Schölkopf, T. Brox and P. Gehler, *Towards
  Total Recall in Industrial Anomaly Detection*, CVPR 2022. Mid-level patch features of a
  frozen backbone, aggregated over each patch's 3 × 3 neighbourhood, form a memory bank from
  defect-free images, subsampled by a greedy k-center coreset; a query patch's anomaly is its
  L2 distance to the nearest bank patch, the image score is the largest patch anomaly, and the
  patch anomalies upsampled and blurred (Gaussian, σ = 4 px) form the anomaly map.
* Greedy k-center coreset — T. F. Gonzalez, *Clustering to minimize the maximum intercluster
  distance*, Theor. Comput. Sci. 1985 (PatchCore's "minimax facility location" selection,
  a 2-approximation of the optimal covering radius), on a Johnson–Lindenstrauss random
  projection of the features (W. B. Johnson and J. Lindenstrauss, 1984).

Differences from the paper, on purpose: the image score is the plain maximum of the patch
distances (the paper's optional re-weighting by the neighbourhood of the nearest bank patch,
its eq. 7, is not applied); features are not first reduced per layer by adaptive average
pooling (an optional seeded random projection keeps ``D`` small instead).

Images enter in [0, 1] pixel units. Non-square images are letterboxed (:func:`letterbox`), and
the padded region is excluded from the bank and from the image score. The nearest-neighbour
search uses faiss (J. Johnson, M. Douze and H. Jégou, *Billion-scale similarity search with
GPUs*, IEEE TBD 2019) when it is importable, else an exact torch search with the same results.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from worker.engine.cam import resolve_layer
from worker.engine.maps import upsample

PadMode = Literal["edge", "zeros"]
SearchBackend = Literal["auto", "faiss", "torch"]

#: ``format`` key of a saved :class:`PatchBank`.
BANK_FORMAT = "inspection-audit/patch-bank/1"
#: PatchCore's anomaly-map smoothing, in pixels of the (letterboxed) input.
PATCHCORE_SIGMA = 4.0
#: Largest query-by-bank distance block (elements) the torch search builds at once.
_SEARCH_BLOCK = 1 << 24


class BankError(ValueError):
    """A patch bank that cannot be used; the message names the file and the reason."""


class _FeaturesCaptured(Exception):
    """Raised by the last hook to stop the forward pass once every layer is captured."""


# -- input ------------------------------------------------------------------------------------


def letterbox(x: Tensor, size: tuple[int, int], *, pad: PadMode = "edge") -> tuple[Tensor, Tensor]:
    """Aspect-preserving resize into ``size``, centred, then padded.

    The scale is ``s = min(H_t / H, W_t / W)``; the image is resized bilinearly (antialiased
    when shrinking) to ``(round(H·s), round(W·s))`` (halves round up) and placed at offset
    ``((H_t − h) // 2, (W_t − w) // 2)``. E.g. ``100 × 50`` into ``64 × 64``: ``s = 0.64``,
    ``64 × 32`` at column 16, valid columns 16…47.

    Args:
        x: ``float32[B, C, H, W]`` in [0, 1] pixel units.
        size: ``(H_t, W_t)`` target size in pixels.
        pad: ``"edge"`` repeats the border pixels into the padding (no artificial edge for the
            backbone to respond to); ``"zeros"`` pads with black.

    Returns:
        ``(x_resized float32[B, C, H_t, W_t], valid bool[B, H_t, W_t])``; ``valid`` is True
        exactly on the resized image, False on the padding.

    Raises:
        ValueError: ``x`` is not 4-D, ``size`` is not two positive ints, or ``pad`` is unknown.
    """
    if x.dim() != 4:
        raise ValueError(f"x must be [B, C, H, W], got {tuple(x.shape)}")
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"size must be two positive ints (H, W), got {size}")
    if pad not in ("edge", "zeros"):
        raise ValueError(f"pad must be 'edge' or 'zeros', got {pad!r}")
    b, _, h, w = x.shape
    th, tw = int(size[0]), int(size[1])
    scale = min(th / h, tw / w)
    nh = min(th, max(1, math.floor(h * scale + 0.5)))
    nw = min(tw, max(1, math.floor(w * scale + 0.5)))
    if (nh, nw) == (h, w):
        resized = x
    else:
        resized = F.interpolate(
            x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=nh < h or nw < w
        )
    top, left = (th - nh) // 2, (tw - nw) // 2
    pads = [left, tw - nw - left, top, th - nh - top]
    if any(pads):
        out = F.pad(resized, pads, mode="replicate" if pad == "edge" else "constant")
    else:
        out = resized
    valid = torch.zeros(b, th, tw, dtype=torch.bool, device=x.device)
    valid[:, top : top + nh, left : left + nw] = True
    return out, valid


def random_projection(in_dim: int, out_dim: int, *, seed: int) -> Tensor:
    """A fixed Gaussian random projection ``float32[in_dim, out_dim]``, entries ``N(0, 1/out_dim)``.

    ``features @ P`` preserves L2 distances up to a factor ``1 ± ε`` with high probability
    (Johnson–Lindenstrauss). The same ``(in_dim, out_dim, seed)`` always gives the same matrix
    (a CPU ``torch.Generator``); a :class:`PatchBank` stores the matrix itself anyway.

    Raises:
        ValueError: a dimension is below 1.
    """
    if in_dim < 1 or out_dim < 1:
        raise ValueError(f"projection dims must be >= 1, got {in_dim} -> {out_dim}")
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn(in_dim, out_dim, generator=g) / math.sqrt(out_dim)


# -- patch features ---------------------------------------------------------------------------


class PatchFeatures(NamedTuple):
    """Patch features of a batch: ``features float32[B, h·w, D]`` (row-major over the grid)."""

    features: Tensor
    grid: tuple[int, int]


def extract_patch_features(
    model: nn.Module,
    layers: Sequence[str],
    x: Tensor,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    projection: Tensor | None = None,
    neighbourhood: int = 3,
) -> PatchFeatures:
    """PatchCore patch features of ``layers`` from one forward pass of ``model``.

    Each layer's output ``[B, K_l, h_l, w_l]`` is captured by a forward hook (registered for
    this call, removed in ``finally``; the pass stops as soon as every layer has run, so the
    head is never computed), averaged over each position's ``neighbourhood × neighbourhood``
    window (``avg_pool2d``, stride 1, zero padding counted, as anomalib does), upsampled
    bilinearly (``align_corners=False``) to the first layer's grid ``(h, w)``, and the channels
    are concatenated: ``D = Σ K_l``. Runs under ``torch.no_grad()``.

    Args:
        model: an eval-mode ``nn.Module`` taking ``x`` (e.g. a
            :class:`worker.model.checkpoint.NormalizedModel`, whose normalisation is inside, with
            layers ``"backbone.layer2", "backbone.layer3"``; or
            :func:`worker.engine.backbones.efficientnet_lite0_feature_model`).
        layers: dotted submodule names, first = the finest grid; each must output a 4-D tensor
            (a layer that runs more than once is captured at its first call).
        x: ``float32[B, C, H, W]`` in [0, 1] pixel units.
        mean, std: optional per-channel normalisation ``(x − mean) / std`` applied before the
            model (leave None when the model normalises itself).
        projection: optional ``float32[D, D']`` matrix (:func:`random_projection`) applied last.
        neighbourhood: odd window size of the local aggregation (PatchCore: 3; 1 disables it).

    Returns:
        :class:`PatchFeatures` with ``features float32[B, h·w, D or D']`` on ``x``'s device.

    Raises:
        ValueError: ``model`` is in training mode (batch norm would update its statistics),
            ``layers`` is empty, repeats a name or names no submodule, ``x`` is not 4-D,
            ``neighbourhood`` is not a positive odd int, ``mean``/``std`` do not match the
            channels, or ``projection`` does not match ``D``.
        RuntimeError: a layer did not run or its output is not ``[B, K, h, w]``.
    """
    if model.training:
        raise ValueError("model must be in eval() mode for feature extraction")
    if not layers:
        raise ValueError("layers must name at least one submodule")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers repeat a name: {list(layers)}")
    if x.dim() != 4:
        raise ValueError(f"x must be [B, C, H, W], got {tuple(x.shape)}")
    if neighbourhood < 1 or neighbourhood % 2 == 0:
        raise ValueError(f"neighbourhood must be a positive odd int, got {neighbourhood}")
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std, or neither")
    modules = {name: resolve_layer(model, name) for name in layers}
    inp = x
    if mean is not None and std is not None:
        c = x.shape[1]
        if len(mean) != c or len(std) != c:
            raise ValueError(f"mean/std need {c} values, got {len(mean)} and {len(std)}")
        m = torch.tensor(list(mean), dtype=x.dtype, device=x.device).view(1, c, 1, 1)
        s = torch.tensor(list(std), dtype=x.dtype, device=x.device).view(1, c, 1, 1)
        inp = (x - m) / s

    store: dict[str, Tensor] = {}

    def make_hook(name: str) -> Any:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if name in store:
                return
            if not isinstance(output, Tensor) or output.dim() != 4:
                shape = tuple(output.shape) if isinstance(output, Tensor) else type(output)
                raise RuntimeError(f"layer {name!r} output must be [B, K, h, w], got {shape}")
            store[name] = output
            if len(store) == len(modules):
                raise _FeaturesCaptured

        return hook

    handles = [modules[name].register_forward_hook(make_hook(name)) for name in layers]
    try:
        with torch.no_grad():
            model(inp)
    except _FeaturesCaptured:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in layers if name not in store]
    if missing:
        raise RuntimeError(f"layers {missing} did not run in the forward pass")

    pad = neighbourhood // 2
    grid = (int(store[layers[0]].shape[-2]), int(store[layers[0]].shape[-1]))
    parts = []
    for name in layers:
        a = store[name].float()
        if neighbourhood > 1:
            a = F.avg_pool2d(a, neighbourhood, stride=1, padding=pad)
        if tuple(a.shape[-2:]) != grid:
            a = F.interpolate(a, size=grid, mode="bilinear", align_corners=False)
        parts.append(a)
    feats = torch.cat(parts, dim=1).flatten(2).transpose(1, 2)  # [B, h*w, D]
    if projection is not None:
        if projection.dim() != 2 or projection.shape[0] != feats.shape[-1]:
            raise ValueError(
                f"projection must be [{feats.shape[-1]}, D'], got {tuple(projection.shape)}"
            )
        feats = feats @ projection.to(device=feats.device, dtype=feats.dtype)
    return PatchFeatures(feats.contiguous(), grid)


def patch_valid_mask(valid: Tensor, grid: tuple[int, int], *, min_fraction: float = 0.5) -> Tensor:
    """Which patches of a ``grid`` lie on the image rather than on letterbox padding.

    Args:
        valid: ``bool[B, H, W]`` pixel mask from :func:`letterbox`.
        grid: ``(h, w)`` patch grid of :class:`PatchFeatures`.
        min_fraction: a patch is valid when at least this fraction of its cell (area
            interpolation of the pixel mask to the grid) is image.

    Returns:
        ``bool[B, h·w]`` in the row-major order of :attr:`PatchFeatures.features`.

    Raises:
        ValueError: ``valid`` is not 3-D bool, or ``min_fraction`` is outside (0, 1].
    """
    if valid.dim() != 3 or valid.dtype != torch.bool:
        raise ValueError(f"valid must be bool [B, H, W], got {valid.dtype} {tuple(valid.shape)}")
    if not 0.0 < min_fraction <= 1.0:
        raise ValueError(f"min_fraction must be in (0, 1], got {min_fraction}")
    frac = F.interpolate(valid.float()[:, None], size=grid, mode="area")[:, 0]
    return (frac >= min_fraction - 1e-6).flatten(1)


# -- coreset ----------------------------------------------------------------------------------


class Coreset(NamedTuple):
    """Greedy k-center selection: ``indices int64[k]`` in selection order, and ``radius``,
    the largest distance of any point to its nearest selected point, measured in the space the
    selection ran in (the random projection when one was used)."""

    indices: Tensor
    radius: float


def k_center_greedy(
    features: Tensor,
    k: int,
    *,
    seed: int = 0,
    projection_dim: int | None = 128,
    start: int | None = None,
) -> Coreset:
    """Greedy k-center ("minimax facility location") coreset, as PatchCore subsamples its bank.

    Start from one point (``start``, else drawn with ``seed``); repeatedly add the point
    farthest from everything selected so far (ties: the lowest index). After ``k`` picks every
    point lies within :attr:`Coreset.radius` of a selected point, and that radius is at most
    twice the best possible with ``k`` centres (Gonzalez 1985). Distances are Euclidean, on
    ``features @ random_projection(D, projection_dim, seed=seed)`` when ``projection_dim`` is
    set and smaller than ``D`` (PatchCore's speed-up; 128 by default), else on ``features``.
    Each step is one batched matrix-vector product over all ``N`` points, on ``features``'
    device: ``O(k·N·D')`` time, ``O(N)`` extra memory.

    Args:
        features: ``float32[N, D]``.
        k: number of points to keep, ``1 ≤ k ≤ N``.
        seed: seeds the projection and the random start.
        projection_dim: dimension of the projection, or None to select on the raw features.
        start: index of the first point (overrides the random start).

    Returns:
        :class:`Coreset` with ``indices int64[k]`` (distinct, selection order) and ``radius``.

    Raises:
        ValueError: ``features`` is not 2-D with ``N ≥ 1`` finite rows, ``k`` is outside
            ``[1, N]``, ``start`` is outside ``[0, N)`` or ``projection_dim < 1``.
    """
    if features.dim() != 2 or features.shape[0] < 1:
        raise ValueError(f"features must be [N, D] with N >= 1, got {tuple(features.shape)}")
    n, d = features.shape
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    if start is not None and not 0 <= start < n:
        raise ValueError(f"start must be in [0, {n}), got {start}")
    if projection_dim is not None and projection_dim < 1:
        raise ValueError(f"projection_dim must be >= 1 or None, got {projection_dim}")
    z = features.detach().float()
    if not bool(torch.isfinite(z).all()):
        raise ValueError("features contain NaN or inf")
    if projection_dim is not None and projection_dim < d:
        z = z @ random_projection(d, projection_dim, seed=seed).to(z.device)
    if start is None:
        g = torch.Generator().manual_seed(int(seed))
        start = int(torch.randint(n, (1,), generator=g))
    sq = (z * z).sum(dim=1)
    min_d2 = torch.full((n,), float("inf"), device=z.device)
    chosen = torch.empty(k, dtype=torch.long)
    idx = start
    for i in range(k):
        chosen[i] = idx
        d2 = (sq + sq[idx] - 2.0 * (z @ z[idx])).clamp_min_(0.0)
        torch.minimum(min_d2, d2, out=min_d2)
        min_d2[idx] = 0.0
        if i + 1 < k:
            idx = int(torch.argmax(min_d2))
    return Coreset(chosen, float(min_d2.max().sqrt()))


def greedy_coreset(
    features: Tensor, k: int, *, seed: int, projection_dim: int | None = 128
) -> Tensor:
    """Indices ``int64[k]`` of the greedy k-center coreset of ``features float32[N, D]``.

    See :func:`k_center_greedy` (which also reports the covering radius) for the method and
    the errors raised.
    """
    return k_center_greedy(features, k, seed=seed, projection_dim=projection_dim).indices


# -- nearest-neighbour search -----------------------------------------------------------------


def _faiss() -> Any | None:
    try:
        import faiss  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return None
    return faiss


class NearestNeighbourIndex:
    """Exact Euclidean nearest-neighbour search over a bank ``float32[M, D]``.

    Backend ``"faiss"``: ``faiss.IndexFlatL2`` (exact, CPU; it returns *squared* L2
    distances). Backend ``"torch"``: ``torch.cdist`` in blocks of at most 2²⁴ distances, on
    the bank's device. ``"auto"`` takes faiss when it is importable, else torch. Both backends
    find neighbours with ``‖x‖² + ‖y‖² − 2x·y``, which loses precision near 0, so the distances
    returned are recomputed exactly as ``‖q − bank[i]‖₂`` for the neighbours found: a query
    equal to a bank row gets distance 0 exactly, and the two backends return the same
    distances (indices may differ only between exactly tied neighbours).

    Raises:
        ValueError: the bank is not 2-D with at least one finite row, or the backend is unknown.
        RuntimeError: ``backend="faiss"`` but faiss is not importable.
    """

    def __init__(self, bank: Tensor, *, backend: SearchBackend = "auto") -> None:
        if bank.dim() != 2 or bank.shape[0] < 1:
            raise ValueError(f"bank must be [M, D] with M >= 1, got {tuple(bank.shape)}")
        if not bool(torch.isfinite(bank).all()):
            raise ValueError("bank contains NaN or inf")
        if backend not in ("auto", "faiss", "torch"):
            raise ValueError(f"backend must be auto, faiss or torch, got {backend!r}")
        self.bank = bank.detach().float().contiguous()
        faiss = _faiss() if backend in ("auto", "faiss") else None
        if backend == "faiss" and faiss is None:
            raise RuntimeError(
                "backend='faiss' but faiss is not importable (pip install faiss-cpu)"
            )
        self._index: Any = None
        if faiss is not None:
            self._index = faiss.IndexFlatL2(int(self.bank.shape[1]))
            self._index.add(self.bank.cpu().numpy())
        self.backend: str = "faiss" if self._index is not None else "torch"

    @property
    def dim(self) -> int:
        return int(self.bank.shape[1])

    def __len__(self) -> int:
        return int(self.bank.shape[0])

    def search(self, queries: Tensor, k: int = 1) -> tuple[Tensor, Tensor]:
        """The ``k`` nearest bank rows of each query.

        Args:
            queries: ``float32[Q, D]``.
            k: neighbours per query, ``1 ≤ k ≤ M``.

        Returns:
            ``(distances float32[Q, k], indices int64[Q, k])``, L2 distances (not squared),
            ascending per row, on ``queries``' device.

        Raises:
            ValueError: ``queries`` is not ``[Q, D]``, or ``k`` is out of range.
        """
        if queries.dim() != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be [Q, {self.dim}], got {tuple(queries.shape)}")
        if not 1 <= k <= len(self):
            raise ValueError(f"k must be in [1, {len(self)}], got {k}")
        out_device = queries.device
        q = queries.detach().float().to(self.bank.device)
        if q.shape[0] == 0:
            empty = torch.empty(0, k, device=out_device)
            return empty, empty.long()
        if self._index is not None:
            _, idx_np = self._index.search(q.cpu().contiguous().numpy(), k)
            idx = torch.from_numpy(idx_np).to(self.bank.device)
        else:
            block = max(1, _SEARCH_BLOCK // len(self))
            idx = torch.cat(
                [
                    torch.cdist(q[i : i + block], self.bank).topk(k, dim=1, largest=False).indices
                    for i in range(0, q.shape[0], block)
                ]
            )
        dist = self._exact_distances(q, idx)
        order = dist.argsort(dim=1, stable=True)
        return dist.gather(1, order).to(out_device), idx.gather(1, order).to(out_device)

    def _exact_distances(self, q: Tensor, idx: Tensor) -> Tensor:
        block = max(1, _SEARCH_BLOCK // (idx.shape[1] * self.dim))
        return torch.cat(
            [
                (q[i : i + block, None, :] - self.bank[idx[i : i + block]]).norm(dim=-1)
                for i in range(0, q.shape[0], block)
            ]
        )


# -- memory bank ------------------------------------------------------------------------------


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class PatchBank:
    """PatchCore memory bank ``float32[M, D]`` of ``ok`` patch features, with provenance.

    Attributes:
        bank: ``float32[M, D]`` (coreset of the valid patches of the source images).
        feature_extractor: e.g. ``"production"`` or ``"efficientnet-lite0"``.
        layers: the dotted layer names the features came from, finest first.
        input_size: ``(H, W)`` the images were letterboxed to, pixels.
        resize_mode: e.g. ``"letterbox-edge"``, ``"letterbox-zeros"``.
        model_version: the production model's ``model_version`` the bank was built for (or the
            feature extractor's version, :func:`worker.engine.backbones.efficientnet_lite0_version`).
        n_images: number of source images.
        n_patches: valid patches before coreset subsampling.
        projection: the ``float32[D_raw, D]`` random projection applied to the features, if any.
        projection_seed: its seed.
        coreset_seed: seed of the coreset selection (None: no subsampling).
        mean, std: normalisation applied before the model, if not inside it.
        created_at: ISO-8601 UTC time.
    """

    bank: Tensor
    feature_extractor: str
    layers: tuple[str, ...]
    input_size: tuple[int, int]
    resize_mode: str
    model_version: str
    n_images: int
    n_patches: int
    projection: Tensor | None = None
    projection_seed: int | None = None
    coreset_seed: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    created_at: str = field(default_factory=_now)

    def __post_init__(self) -> None:
        if self.bank.dim() != 2 or self.bank.shape[0] < 1 or self.bank.dtype != torch.float32:
            raise ValueError(
                f"bank must be float32 [M, D] with M >= 1, got {self.bank.dtype} "
                f"{tuple(self.bank.shape)}"
            )
        if not self.layers:
            raise ValueError("layers must not be empty")
        if len(self.input_size) != 2 or min(self.input_size) < 1:
            raise ValueError(f"input_size must be two positive ints, got {self.input_size}")
        if self.projection is not None and (
            self.projection.dim() != 2 or self.projection.shape[1] != self.bank.shape[1]
        ):
            raise ValueError(
                f"projection must be [D_raw, {self.bank.shape[1]}], "
                f"got {tuple(self.projection.shape)}"
            )
        self.layers = tuple(self.layers)
        self.input_size = (int(self.input_size[0]), int(self.input_size[1]))

    @property
    def dim(self) -> int:
        return int(self.bank.shape[1])

    def __len__(self) -> int:
        return int(self.bank.shape[0])

    def index(self, *, backend: SearchBackend = "auto") -> NearestNeighbourIndex:
        """A :class:`NearestNeighbourIndex` over :attr:`bank`."""
        return NearestNeighbourIndex(self.bank, backend=backend)

    def to_dict(self) -> dict[str, Any]:
        """Plain tensors, strings, numbers and lists (``torch.load(weights_only=True)``-safe)."""
        return {
            "format": BANK_FORMAT,
            "bank": self.bank.detach().cpu().contiguous(),
            "feature_extractor": self.feature_extractor,
            "layers": list(self.layers),
            "input_size": list(self.input_size),
            "resize_mode": self.resize_mode,
            "model_version": self.model_version,
            "n_images": int(self.n_images),
            "n_patches": int(self.n_patches),
            "projection": None if self.projection is None else self.projection.detach().cpu(),
            "projection_seed": self.projection_seed,
            "coreset_seed": self.coreset_seed,
            "mean": None if self.mean is None else [float(v) for v in self.mean],
            "std": None if self.std is None else [float(v) for v in self.std],
            "created_at": self.created_at,
        }

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` with ``torch.save``; returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(self.to_dict(), path)
        return path

    @classmethod
    def load(cls, path: str | Path, expected_model_version: str) -> PatchBank:
        """Read a bank written by :meth:`save` (``weights_only=True``, on the CPU).

        Raises:
            BankError: the file is missing or unreadable, is not a patch bank, is malformed, or
                was built for another ``model_version`` than ``expected_model_version``.
        """
        path = Path(path)
        if not path.is_file():
            raise BankError(f"patch bank {path} does not exist")
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # unpickling errors come in many types
            raise BankError(f"patch bank {path} is unreadable: {exc}") from exc
        if not isinstance(raw, dict) or raw.get("format") != BANK_FORMAT:
            raise BankError(f"{path} is not a patch bank (format {BANK_FORMAT!r} expected)")
        version = raw.get("model_version")
        if version != expected_model_version:
            raise BankError(
                f"patch bank {path} was built for model_version {version!r}, not "
                f"{expected_model_version!r}; rebuild it for this model"
            )
        try:
            mean, std = raw["mean"], raw["std"]
            return cls(
                bank=raw["bank"],
                feature_extractor=str(raw["feature_extractor"]),
                layers=tuple(str(v) for v in raw["layers"]),
                input_size=(int(raw["input_size"][0]), int(raw["input_size"][1])),
                resize_mode=str(raw["resize_mode"]),
                model_version=str(version),
                n_images=int(raw["n_images"]),
                n_patches=int(raw["n_patches"]),
                projection=raw["projection"],
                projection_seed=raw["projection_seed"],
                coreset_seed=raw["coreset_seed"],
                mean=None if mean is None else tuple(float(v) for v in mean),
                std=None if std is None else tuple(float(v) for v in std),
                created_at=str(raw["created_at"]),
            )
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            raise BankError(f"patch bank {path} is malformed: {exc!r}") from exc


def build_patch_bank(
    features: Tensor,
    *,
    valid: Tensor | None = None,
    coreset_size: int | None = None,
    seed: int = 0,
    coreset_projection_dim: int | None = 128,
    feature_extractor: str,
    layers: Sequence[str],
    input_size: tuple[int, int],
    resize_mode: str,
    model_version: str,
    projection: Tensor | None = None,
    projection_seed: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> PatchBank:
    """A :class:`PatchBank` from the patch features of ``ok`` images.

    Args:
        features: ``float32[N_img, P, D]`` (:attr:`PatchFeatures.features` of the ``ok``
            images, concatenated over batches).
        valid: optional ``bool[N_img, P]`` (:func:`patch_valid_mask`); invalid (padding)
            patches are left out of the bank.
        coreset_size: keep this many patches by :func:`k_center_greedy` (None, or a value
            ≥ the number of valid patches: keep them all).
        seed: coreset seed (projection and start).
        coreset_projection_dim: dimension the coreset selection runs in (None: raw features).
        feature_extractor, layers, input_size, resize_mode, model_version, projection,
            projection_seed, mean, std: provenance, see :class:`PatchBank`.

    Returns:
        The bank (``float32[M, D]`` on the CPU).

    Raises:
        ValueError: ``features`` is not 3-D, ``valid`` does not match it or leaves no patch,
            or ``coreset_size < 1``.
    """
    if features.dim() != 3:
        raise ValueError(f"features must be [N_img, P, D], got {tuple(features.shape)}")
    n_img, p, d = features.shape
    flat = features.detach().float().reshape(n_img * p, d)
    if valid is not None:
        if valid.shape != (n_img, p) or valid.dtype != torch.bool:
            raise ValueError(
                f"valid must be bool [{n_img}, {p}], got {valid.dtype} {tuple(valid.shape)}"
            )
        flat = flat[valid.reshape(-1).to(flat.device)]
    if flat.shape[0] == 0:
        raise ValueError("no valid patch to build a bank from")
    if coreset_size is not None and coreset_size < 1:
        raise ValueError(f"coreset_size must be >= 1 or None, got {coreset_size}")
    n_patches = int(flat.shape[0])
    coreset_seed = None
    if coreset_size is not None and coreset_size < n_patches:
        idx = greedy_coreset(flat, coreset_size, seed=seed, projection_dim=coreset_projection_dim)
        flat = flat[idx.to(flat.device)]
        coreset_seed = seed
    return PatchBank(
        bank=flat.cpu().contiguous(),
        feature_extractor=feature_extractor,
        layers=tuple(layers),
        input_size=(int(input_size[0]), int(input_size[1])),
        resize_mode=resize_mode,
        model_version=model_version,
        n_images=int(n_img),
        n_patches=n_patches,
        projection=None if projection is None else projection.detach().cpu().float(),
        projection_seed=projection_seed,
        coreset_seed=coreset_seed,
        mean=None if mean is None else tuple(float(v) for v in mean),
        std=None if std is None else tuple(float(v) for v in std),
    )


# -- scores -----------------------------------------------------------------------------------


def _symmetric_index(n: int, radius: int, device: torch.device) -> Tensor:
    """Indices of ``[-radius, n + radius)`` reflected about the edges (``d c b a | a b c d``)."""
    i = torch.arange(-radius, n + radius, device=device)
    i = torch.remainder(i, 2 * n)
    return torch.where(i >= n, 2 * n - 1 - i, i)


def gaussian_blur(maps: Tensor, sigma: float, *, truncate: float = 4.0) -> Tensor:
    """Separable Gaussian blur of ``float[B, H, W]`` maps, as ``scipy.ndimage.gaussian_filter``.

    Kernel radius ``int(truncate·σ + 0.5)`` px, weights ``exp(−x²/2σ²)`` normalised to sum 1,
    borders extended by symmetric reflection (scipy's ``mode="reflect"``), run as two 1-D
    convolutions (``F.conv1d``). PatchCore smooths its anomaly map with σ = 4 px.

    Args:
        maps: ``float[B, H, W]``.
        sigma: standard deviation in pixels, ≥ 0 (0 returns ``maps`` unchanged).
        truncate: kernel half-width in standard deviations.

    Returns:
        ``float[B, H, W]``, same dtype.

    Raises:
        ValueError: ``maps`` is not 3-D or ``sigma < 0``.
    """
    if maps.dim() != 3:
        raise ValueError(f"maps must be [B, H, W], got {tuple(maps.shape)}")
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    radius = int(truncate * sigma + 0.5)
    if sigma == 0 or radius == 0:
        return maps
    b, h, w = maps.shape
    x = torch.arange(-radius, radius + 1, device=maps.device, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(maps.dtype).view(1, 1, -1)
    # along W
    out = maps.index_select(2, _symmetric_index(w, radius, maps.device))
    out = F.conv1d(out.reshape(b * h, 1, -1), kernel).reshape(b, h, w)
    # along H
    out = out.index_select(1, _symmetric_index(h, radius, maps.device))
    out = out.transpose(1, 2).reshape(b * w, 1, -1)
    out = F.conv1d(out, kernel).reshape(b, w, h).transpose(1, 2)
    return out.contiguous()


class AnomalyScores(NamedTuple):
    """PatchCore outputs for a batch.

    ``scores float32[B]``: the largest valid patch distance (L2, feature units);
    ``maps float32[B, H, W]``: patch distances upsampled and blurred, 0 on padding;
    ``patch_scores float32[B, h, w]``: the raw patch distances (0 on invalid patches).
    """

    scores: Tensor
    maps: Tensor
    patch_scores: Tensor


def anomaly_scores(
    features: PatchFeatures,
    index: NearestNeighbourIndex | PatchBank,
    image_size: tuple[int, int],
    *,
    valid: Tensor | None = None,
    min_valid_fraction: float = 0.5,
    sigma: float = PATCHCORE_SIGMA,
) -> AnomalyScores:
    """PatchCore image scores and anomaly maps of a batch against an ``ok`` bank.

    Each patch's distance is the L2 distance of its feature to the nearest bank row. The image
    score is the maximum over the image's valid patches. The map sets invalid (padding)
    patches to 0 — so they neither raise the map nor bleed into it through the blur —
    upsamples bilinearly (``align_corners=False``) to ``image_size``, blurs with
    :func:`gaussian_blur` (σ px) and zeroes the padding pixels.

    Args:
        features: :class:`PatchFeatures` of the batch (same extractor as the bank).
        index: a :class:`NearestNeighbourIndex`, or a :class:`PatchBank` (an index is built).
        image_size: ``(H, W)`` of the (letterboxed) input, pixels.
        valid: optional ``bool[B, H, W]`` pixel mask from :func:`letterbox`.
        min_valid_fraction: see :func:`patch_valid_mask`.
        sigma: blur in pixels (PatchCore: 4; 0 disables it).

    Returns:
        :class:`AnomalyScores` (``float32``, on the features' device).

    Raises:
        ValueError: feature and bank dimensions differ, ``valid`` does not match the batch, or
            an image has no valid patch.
    """
    if isinstance(index, PatchBank):
        index = index.index()
    feats = features.features
    if feats.dim() != 3:
        raise ValueError(f"features must be [B, P, D], got {tuple(feats.shape)}")
    b, p, d = feats.shape
    h, w = features.grid
    if h * w != p:
        raise ValueError(f"grid {features.grid} does not match {p} patches")
    if d != index.dim:
        raise ValueError(f"features have D = {d} but the bank has D = {index.dim}")
    dist, _ = index.search(feats.reshape(b * p, d), k=1)
    patch = dist.reshape(b, p).float()
    if valid is not None:
        if valid.dim() != 3 or valid.shape[0] != b:
            raise ValueError(f"valid must be bool [{b}, H, W], got {tuple(valid.shape)}")
        vp = patch_valid_mask(valid, (h, w), min_fraction=min_valid_fraction).to(patch.device)
    else:
        vp = torch.ones_like(patch, dtype=torch.bool)
    if not bool(vp.any(dim=1).all()):
        raise ValueError("an image has no valid patch (its letterboxed region is too small)")
    patch = torch.where(vp, patch, torch.zeros_like(patch))
    scores = patch.masked_fill(~vp, float("-inf")).amax(dim=1)
    maps = gaussian_blur(
        upsample(patch.reshape(b, h, w), (int(image_size[0]), int(image_size[1]))), sigma
    )
    if valid is not None:
        maps = maps * valid.to(maps.device, maps.dtype)
    return AnomalyScores(scores, maps, patch.reshape(b, h, w))
