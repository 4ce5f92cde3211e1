"""The second-opinion workloads: (c) audit + FGSM plus one second opinion, through
``AuditSuite.measure(images, x)`` exactly as the worker calls it (``worker/batch.py``).

Each timed call is one ``AuditSuite.measure(images, x)`` on a batch of B decoded images
(``float32[C, h, w]`` at their own size, as the worker decodes them) and their production input
``x`` (``float32[B, C, H, W]``, built before timing, as the worker builds it while decoding).
So the cost includes fitting the images to each second opinion's own input (an auditor's size
and resize mode, a bank's letterbox), the per-image rows and the maps cropped to each image's
aspect ratio. The workloads (:data:`bench.throughput.config.SO_WORKLOADS`):

* ``none``: ``measure`` with no second opinion: the engine's (c) plus ``measure``'s own work;
* ``auditor``: one auditor checkpoint (a second seeded random resnet18 at
  ``BenchConfig.auditor_size`` px unless ``--auditor CKPT``): one more forward pass at its size;
* ``views``: the production model on the 4 flip views (``identity,hflip,vflip,hvflip``);
* ``anomaly_own``: a PatchCore bank on the production model's own features (layers
  ``backbone.layer2`` + ``backbone.layer3``) at its input size;
* ``anomaly_imagenet``: a PatchCore bank on EfficientNet-Lite0 features at 224 × 224 letterbox
  (skipped, with the reason in the report, when the wheel is not installed);
* ``all``: every selected second opinion together (with an auditor and views, ``measure`` also
  averages the auditor over the views: ``auditor_views_mean``).

Banks are built once, before timing, from ``BenchConfig.bank_images`` ``ok`` images with a
``BenchConfig.bank_coreset``-patch coreset (:func:`inspection_audit.lab.banks.build_bank`);
their build time, in seconds, is reported apart from the per-image cost. The production model
and the auditor are loaded from checkpoint files with ``load_checkpoint`` and frozen, and the
engine is ``ReliabilityEngine.from_production_model`` with the worker's default
``engine_max_chunk``, as the worker loads them. CPU only.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from bench.throughput.config import (
    SECOND_OPINIONS,
    SO_LABELS,
    SO_WORKLOADS,
    BenchConfig,
    batch_iters,
    threads,
)
from bench.throughput.model import ModelSpec, random_model, save_model_checkpoint
from bench.throughput.workloads import TIMER_WARMUP_MIN, synthetic_images, time_calls

if TYPE_CHECKING:
    from inspection_audit.lab.dataset import Record
    from worker.engine.score import ReliabilityEngine
    from worker.measure import AuditSuite, BankScorer
    from worker.model.checkpoint import ProductionModel

#: The test-time views of the ``views`` workload (``worker.engine.views.FLIP_VIEWS``).
VIEWS = ("identity", "hflip", "vflip", "hvflip")
#: Synthetic "decoded" images are ``S × round(SYNTHETIC_ASPECT · S)`` px (S: the model's input
#: side), so that fitting them to every model's input is real work, as with the tiles.
SYNTHETIC_ASPECT = 1.5


# --- images --------------------------------------------------------------------------------------
def decoded_images(records: Sequence[Record], n: int, in_channels: int) -> list[Tensor]:
    """The first ``n`` records decoded at their own size, as the worker decodes them
    (``worker.model.preprocess.load_image``): ``float32[C, h, w]`` in [0, 1] each."""
    from worker.model.preprocess import load_image

    return [load_image(r.path, in_channels) for r in records[:n]]


def ok_records(records: Sequence[Record], n: int) -> list[Record]:
    """The first ``n`` records labelled ``ok`` (all of them when fewer)."""
    return [r for r in records if r.label == "ok"][:n]


def synthetic_decoded(n: int, size: int, in_channels: int = 1, seed: int = 0) -> list[Tensor]:
    """``n`` synthetic decoded images ``float32[C, size, round(1.5 · size)]`` in [0, 1]
    (:func:`bench.throughput.workloads.synthetic_images`, not square)."""
    width = round(SYNTHETIC_ASPECT * size)
    return list(synthetic_images(n, size, in_channels, seed, width=width).unbind(0))


# --- what is measured ----------------------------------------------------------------------------
@contextlib.contextmanager
def faiss_threads(n: int) -> Iterator[None]:
    """Limit faiss's OpenMP pool (the banks' nearest-neighbour search) to ``n`` threads.

    faiss ships its own OpenMP runtime, which ``threadpoolctl`` only sees once faiss is
    imported; this sets it directly (and restores it). Nothing happens without faiss.
    """
    try:
        import faiss  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        yield
        return
    before = int(faiss.omp_get_max_threads())
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _frozen(pm: ProductionModel) -> ProductionModel:
    for p in pm.model.parameters():
        p.requires_grad_(False)
    pm.model.eval()
    return pm


def _model_info(pm: ProductionModel) -> dict[str, Any]:
    return {
        "model_version": pm.model_version,
        "arch": pm.arch,
        "input_size": list(pm.input_size),
        "in_channels": pm.in_channels,
        "resize": pm.resize,
    }


def worker_max_chunk() -> int:
    """The worker's default ``engine_max_chunk`` (images per engine pass inside a batch)."""
    from inspection_audit.settings import Settings

    return int(Settings.model_fields["engine_max_chunk"].default)


@dataclass
class SecondOpinionSetup:
    """The production model, its engine and the second opinions, built before timing.

    Attributes:
        pm: the production model, loaded from a checkpoint file and frozen (as the worker does).
        engine: ``ReliabilityEngine.from_production_model(pm, EngineConfig(attack="fgsm"),
            max_chunk=<worker default>)``.
        selected: the second opinions asked for (:data:`SECOND_OPINIONS` order).
        auditor: the auditor model (``auditor`` selected), else ``None``.
        snapshots: the snapshot models (``snapshots`` selected), else empty.
        banks: bank kind (``own``, ``imagenet``) → its scorer.
        info: what was built, for the report (JSON): models, views, banks with their build
            time in seconds.
        skipped: second opinion → why it was not measured (e.g. the EfficientNet-Lite0 wheel
            is missing).
    """

    pm: ProductionModel
    engine: ReliabilityEngine
    selected: tuple[str, ...]
    auditor: ProductionModel | None = None
    snapshots: list[ProductionModel] = field(default_factory=list)
    banks: dict[str, BankScorer] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def available(self) -> tuple[str, ...]:
        """The selected second opinions that were set up (not skipped)."""
        return tuple(n for n in self.selected if n not in self.skipped)

    def workloads(self) -> tuple[str, ...]:
        """What :func:`run_second_opinions` times: ``none``, each available second opinion,
        and ``all`` when at least two are available (with one it would repeat that one)."""
        avail = self.available
        if not self.selected:
            return ()
        return ("none", *avail, *(("all",) if len(avail) >= 2 else ()))

    def suite(self, workload: str) -> AuditSuite:
        """The ``AuditSuite`` of one workload (see :data:`bench.throughput.config.SO_WORKLOADS`).

        Raises:
            ValueError: an unknown workload, or a second opinion that was not set up.
        """
        from worker.measure import AuditSuite

        if workload not in SO_WORKLOADS:
            raise ValueError(f"unknown workload {workload!r}; use one of {SO_WORKLOADS}")
        names = self.available if workload == "all" else () if workload == "none" else (workload,)
        if any(n not in self.available for n in names):
            raise ValueError(f"second opinion {workload!r} was not set up")
        groups: dict[str, list[ProductionModel]] = {}
        if "auditor" in names:
            assert self.auditor is not None
            groups["auditor"] = [self.auditor]
        if "snapshots" in names:
            groups["snapshot"] = list(self.snapshots)
        views = VIEWS if "views" in names else ()
        banks = [self.banks[n.removeprefix("anomaly_")] for n in names if n.startswith("anomaly_")]
        return AuditSuite(self.pm, self.engine, groups, views, banks)


def production_model(spec: ModelSpec, workdir: Path) -> ProductionModel:
    """``spec``'s model as the worker loads it: written as a checkpoint (a ``--model``
    checkpoint is used as it is), ``load_checkpoint`` on the CPU, parameters frozen."""
    from worker.model.checkpoint import load_checkpoint

    path = spec.checkpoint or save_model_checkpoint(spec, workdir / "production.pt")
    return _frozen(load_checkpoint(path, "cpu"))


def auditor_model(
    pm: ProductionModel, cfg: BenchConfig, workdir: Path, checkpoint: Path | None = None
) -> tuple[ProductionModel, str]:
    """The auditor and a one-line description: ``checkpoint``, else a second resnet18 with
    random weights (seed ``cfg.seed + 1``) at ``cfg.auditor_size`` px and the production
    model's channel count, written and loaded as a checkpoint; frozen, as ``load_suite`` does."""
    from worker.model.checkpoint import load_checkpoint

    if checkpoint is not None:
        return _frozen(load_checkpoint(checkpoint, "cpu")), f"checkpoint {checkpoint}"
    seed = cfg.seed + 1
    aspec = random_model(cfg.auditor_size, seed, "resnet18", in_channels=pm.in_channels)
    s = cfg.auditor_size
    path = save_model_checkpoint(
        aspec, workdir / "auditor.pt", model_version=f"bench-auditor-resnet18-seed{seed}-{s}x{s}"
    )
    return _frozen(load_checkpoint(path, "cpu")), aspec.description


def snapshot_models(
    pm: ProductionModel,
    cfg: BenchConfig,
    workdir: Path,
    checkpoints: Sequence[Path] | None = None,
) -> tuple[list[ProductionModel], list[str]]:
    """The snapshots and a one-line description of each: ``checkpoints``, else
    ``cfg.n_snapshots`` models of the production model's architecture at the production input size with
    random weights (seeds ``cfg.seed + 10 + i``: a snapshot costs a forward pass of the
    production model whatever its weights), written and loaded as checkpoints; frozen."""
    from worker.model.checkpoint import load_checkpoint

    if checkpoints:
        return [_frozen(load_checkpoint(c, "cpu")) for c in checkpoints], [
            f"checkpoint {c}" for c in checkpoints
        ]
    h, _w = pm.input_size
    models, descs = [], []
    for i in range(cfg.n_snapshots):
        seed = cfg.seed + 10 + i
        sspec = random_model(h, seed, pm.arch, in_channels=pm.in_channels)
        path = save_model_checkpoint(
            sspec, workdir / f"snapshot{i}.pt", model_version=f"bench-snapshot{i}-seed{seed}"
        )
        models.append(_frozen(load_checkpoint(path, "cpu")))
        descs.append(sspec.description)
    return models, descs


def _build_bank(
    kind: str, pm: ProductionModel, ok_images: Sequence[Tensor], cfg: BenchConfig
) -> tuple[BankScorer, dict[str, Any]]:
    from inspection_audit.lab.banks import CANDIDATE_LAYERS, build_bank, scorer_for

    layers = CANDIDATE_LAYERS[kind][0]
    t0 = time.perf_counter()
    bank = build_bank(
        kind,
        pm,
        ok_images,
        layers,
        coreset_size=cfg.bank_coreset,
        seed=cfg.seed,
        show_progress=False,
    )
    scorer = scorer_for(kind, pm, bank)
    build_s = time.perf_counter() - t0
    return scorer, {
        "feature_extractor": bank.feature_extractor,
        "model_version": bank.model_version,
        "layers": list(layers),
        "input_size": list(bank.input_size),
        "resize_mode": bank.resize_mode,
        "ok_images": len(ok_images),
        "patches": bank.n_patches,
        "bank_patches": len(bank),
        "coreset_size": cfg.bank_coreset,
        "dim": bank.dim,
        "search": scorer.index.backend,
        "build_s": round(build_s, 3),
    }


def prepare_second_opinions(
    spec: ModelSpec,
    cfg: BenchConfig,
    ok_images: Sequence[Tensor],
    *,
    auditor: Path | None = None,
    snapshots: Sequence[Path] | None = None,
    on_step: Callable[[str], None] | None = None,
) -> SecondOpinionSetup:
    """Load the production model and the auditor, build the banks (``cfg.second_opinions``).

    Runs with one thread. A bank that cannot be built (no EfficientNet-Lite0 wheel, a
    ``--model`` without resnet layers) is skipped with its reason in
    :attr:`SecondOpinionSetup.skipped`; an auditor that does not fit raises.

    Args:
        spec: the model under test.
        cfg: which second opinions, the auditor size, the banks' images and coreset size.
        ok_images: decoded ``ok`` images ``float32[C, h, w]`` the banks are built from.
        auditor: an auditor checkpoint instead of the random resnet18.
        snapshots: snapshot checkpoints instead of ``cfg.n_snapshots`` random models.
        on_step: called with a description before each build.

    Raises:
        worker.measure.SuiteError: the auditor does not fit the production model.
        worker.model.checkpoint.CheckpointError: an unreadable checkpoint.
    """
    from worker.engine.options import EngineConfig
    from worker.engine.score import ReliabilityEngine
    from worker.measure import check_auditor

    selected = tuple(n for n in SECOND_OPINIONS if n in cfg.second_opinions)
    with tempfile.TemporaryDirectory(prefix="inspection-audit-bench-so-") as tmp, threads(1):
        workdir = Path(tmp)
        pm = production_model(spec, workdir)
        max_chunk = worker_max_chunk()
        engine = ReliabilityEngine.from_production_model(
            pm, EngineConfig(attack="fgsm", target_layer=spec.layer), max_chunk=max_chunk
        )
        setup = SecondOpinionSetup(pm, engine, selected)
        setup.info = {
            "production": _model_info(pm),
            "engine": {"attack": "fgsm", "target_layer": spec.layer, "max_chunk": max_chunk},
        }
        if "auditor" in selected:
            if on_step is not None:
                on_step("second opinions: loading the auditor")
            t0 = time.perf_counter()
            a, desc = auditor_model(pm, cfg, workdir, auditor)
            check_auditor(pm, a)
            setup.auditor = a
            setup.info["auditor"] = {
                **_model_info(a),
                "description": desc,
                "load_s": round(time.perf_counter() - t0, 3),
            }
        if "snapshots" in selected:
            if on_step is not None:
                on_step("second opinions: loading the snapshots")
            setup.snapshots, descs = snapshot_models(pm, cfg, workdir, snapshots)
            for sm in setup.snapshots:  # a misfit fails here, before minutes of timing
                check_auditor(pm, sm, "snapshot")
            setup.info["snapshots"] = [
                {**_model_info(sm), "description": d}
                for sm, d in zip(setup.snapshots, descs, strict=True)
            ]
        if "views" in selected:
            setup.info["views"] = list(VIEWS)
        banks: dict[str, Any] = {}
        for name in selected:
            if not name.startswith("anomaly_"):
                continue
            kind = name.removeprefix("anomaly_")
            if on_step is not None:
                on_step(f"second opinions: building the {kind} bank")
            try:
                scorer, info = _build_bank(kind, pm, ok_images, cfg)
            except Exception as exc:  # the wheel is missing, layers absent, no ok image...
                setup.skipped[name] = f"{type(exc).__name__}: {exc}"
                continue
            setup.banks[kind] = scorer
            banks[kind] = info
        if banks:
            setup.info["banks"] = banks
    return setup


def suite_batches(
    pm: ProductionModel, images: Sequence[Tensor], b: int, n_images: int
) -> list[tuple[list[Tensor], Tensor]]:
    """``ceil(n_images / b)`` batches cycling through ``images``: each ``(decoded images,
    production input float32[b, C, H, W])``, the input fitted as the worker fits it
    (``fit_to_input`` at the production model's size and resize mode)."""
    from worker.model.preprocess import fit_to_input

    n = len(images)
    out = []
    for i in range(batch_iters(b, n_images)):
        ims = [images[(i * b + j) % n] for j in range(b)]
        x = torch.stack([fit_to_input(im, pm.input_size, pm.resize) for im in ims])
        out.append((ims, x))
    return out


def run_second_opinions(
    setup: SecondOpinionSetup,
    images: Sequence[Tensor],
    cfg: BenchConfig,
    *,
    sizes: Sequence[int] | None = None,
    on_step: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Time every workload of ``setup`` at every batch size; one dict per (workload, B).

    One thread (torch, BLAS/OpenMP, OpenCV, faiss), CPU. For each B: ``ceil(cfg.min_images /
    B)`` batches of decoded ``images`` (:func:`suite_batches`), one untimed check call, then
    :func:`bench.throughput.workloads.time_calls` of ``suite.measure(images, x)``
    (``cfg.reps`` repetitions, ``ceil(cfg.warmup_images / B)`` warm-up calls at least);
    torch's RNG is seeded with ``cfg.seed`` before each workload.

    Each dict has :func:`bench.throughput.workloads.run_core`'s keys (``kind`` is the workload
    name, ``images_per_s`` the median images per second, ``ms_per_image`` = 1000 /
    ``images_per_s``) plus ``second_opinions`` (what the suite ran) and ``measurements``
    (the row keys the workload adds to ``none``'s, from the check call).
    """
    sizes = list(sizes or cfg.sizes)
    results: list[dict[str, Any]] = []
    workloads = setup.workloads()
    if not workloads:
        return results
    suites = {w: setup.suite(w) for w in workloads}
    with threads(1), faiss_threads(1):
        for b in sizes:
            items = suite_batches(setup.pm, images, b, cfg.min_images)
            warm = batch_iters(b, cfg.warmup_images)
            timer_warm = max(len(items) // 100, TIMER_WARMUP_MIN)
            base: set[str] = set()
            for w in workloads:
                if on_step is not None:
                    on_step(f"{SO_LABELS[w]}, B={b}, 1 thread, cpu")
                suite = suites[w]

                def measure(item: tuple[list[Tensor], Tensor], suite: AuditSuite = suite) -> Any:
                    return suite.measure(item[0], item[1])

                torch.manual_seed(cfg.seed)
                keys = set(measure(items[0]).rows[0])
                if w == "none":
                    base = keys
                rates = time_calls(
                    measure,
                    items,
                    batch_size=b,
                    warmup=warm,
                    reps=cfg.reps,
                    num_threads=1,
                    label=SO_LABELS[w],
                )
                med = statistics.median(rates)
                results.append(
                    {
                        "kind": w,
                        "label": SO_LABELS[w],
                        "batch_size": b,
                        "threads": 1,
                        "device": "cpu",
                        "images_per_s": med,
                        "ms_per_image": 1000.0 / med,
                        "reps_images_per_s": rates,
                        "images_per_rep": b * len(items),
                        "warmup_iters": 1 + max(warm, timer_warm),
                        "timer_warmup_per_rep": timer_warm,
                        "second_opinions": list(
                            setup.available if w == "all" else () if w == "none" else (w,)
                        ),
                        "measurements": sorted(keys - base),
                    }
                )
    return results
