"""Throughput benchmark: images/s of the audit against inference, pytorch_grad_cam and end to end.

Run from the repository root::

    python -m bench.throughput                 # full run: writes docs/performance.{json,md}
    python -m bench.throughput --quick         # smoke run: 64 px, B = 1 and 4, a few images
    python -m bench.throughput --profile       # also docs/profile.txt (torch.profiler, B = 8)

What is measured (images per second, median of several timed repetitions after warm-up, fixed
seeds, resnet18 with one input channel at 224 px unless ``--model`` names a checkpoint, real
magnetic-tile images), at each batch size B:

(a) inference only: ``model(x)`` under ``torch.inference_mode()``;
(b) the audit without enhancement: ``ReliabilityEngine.score(x)``, ``EngineConfig(attack="none")``;
(c) the audit with FGSM: ``EngineConfig(attack="fgsm")`` (the worker's default);
(d) ``pytorch_grad_cam`` computing the same three maps (GradCAM for the defect class, GradCAM
    for the ok class, EigenCAM), CAM objects built once outside the timed loop;
(e) end to end: ``producer.api.enqueue_many`` -> Redis -> ``inspection-audit worker`` (1 or 2
    worker processes, ``--concurrency 1`` each) -> PostgreSQL, from the first enqueue to the
    last row committed, with the peak RSS of each worker's process tree.

Every measurement uses one torch/BLAS/OpenMP/OpenCV thread per process, so ratios compare like
with like; (a)-(c) are also measured with all cores. The report states the machine, the date,
the ratios against the targets of the issue and a pass/miss column. See ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATASET = REPO.parent / "shared" / "datasets" / "magnetic-tile"
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
DEFAULT_PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
READY = "inspection-audit worker ready"
#: "GB" in the RSS target is decimal: 1.5 GB = 1500 MB = 1.5e9 bytes.
RSS_LIMIT_MB = 1500.0
KINDS = ("a", "b", "c", "d")
KIND_LABELS = {
    "a": "(a) inference",
    "b": "(b) audit, no attack",
    "c": "(c) audit + FGSM",
    "d": "(d) pytorch_grad_cam, 3 maps",
}

WHAT_WAS_TIMED = {
    "a": "`model(x)` under `torch.inference_mode()`: one forward pass, nothing else.",
    "b": "`ReliabilityEngine.score(x)` with `EngineConfig(attack='none')` (closed-form Grad-CAM "
    "weights at layer4): one forward pass, both Grad-CAM maps, Eigen-CAM (float64 SVD), "
    "upsampling, normalisation, binarisation, IoUs, p_defect and energy.",
    "c": "`ReliabilityEngine.score(x)` with `EngineConfig(attack='fgsm')`, the worker's default: "
    "(b) plus the backward pass to the input, the FGSM step and a second map pass on x'.",
    "d": "`pytorch_grad_cam` 1.5.7 computing the same three maps. Built once, outside the timed "
    "loop: `GradCAM(model=deepcopy(model), target_layers=[layer4])` and "
    "`EigenCAM(model=deepcopy(model), target_layers=[layer4])`, each on its own deep copy and "
    "entered as a `with` block. Each timed call: `gradcam(x, targets=[ClassifierOutputTarget("
    "defect)]*B)`, `gradcam(x, targets=[ClassifierOutputTarget(ok)]*B)` and `eigencam(x)` (3 "
    "forward passes, 2 backward passes to the parameters, the numpy/cv2 post-processing). "
    "No binarisation or IoU: those are (b)'s extra work.",
    "e": "From the first `producer.api.enqueue_many` call (message validation, SHA-256 of each "
    "file, sending) to the moment the last audit row is visible in PostgreSQL (polled every "
    "0.1 s), after a warm-up batch that every worker process has scored. Each worker is "
    "`inspection-audit worker --concurrency 1` (prefork pool, one pool process) with "
    "`INSPECTION_AUDIT_TORCH_THREADS=1`; every message is a `prediction='ok'` inspection, so "
    "every image gets the full FGSM audit; JPEG decoding and resizing happen in the worker and "
    "are included. Peak RSS: psutil, sampled every 0.2 s over the worker's process tree "
    "(main process + pool process), summed; PSS (shared pages split between processes) alongside.",
}


# --- configuration --------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchConfig:
    """How much to measure. :meth:`full` is the real run, :meth:`quick` a smoke test."""

    quick: bool = False
    sizes: tuple[int, ...] = (1, 8, 32)
    e2e_sizes: tuple[int, ...] = (8, 32)
    e2e_workers: tuple[int, ...] = (1, 2)
    image_size: int = 224
    warmup_images: int = 8  # warm-up iterations before timing: ceil(warmup_images / B), >= 1
    reps: int = 5  # timed repetitions; the median is reported
    min_images: int = 32  # images per repetition: ceil(min_images / B) batches
    n_pool: int = 64  # distinct images the batches cycle through
    e2e_images: int = 256
    e2e_reps: int = 3
    seed: int = 0

    @classmethod
    def full(cls) -> BenchConfig:
        return cls()

    @classmethod
    def quick_preset(cls) -> BenchConfig:
        return cls(
            quick=True,
            sizes=(1, 4),
            e2e_sizes=(4,),
            image_size=64,
            warmup_images=1,
            reps=2,
            min_images=4,
            n_pool=8,
            e2e_images=16,
            e2e_reps=1,
        )


def batch_iters(b: int, images: int) -> int:
    """Batches needed to cover ``images`` images at batch size ``b`` (at least 1)."""
    return max(1, math.ceil(images / b))


# --- threads -------------------------------------------------------------------------------------
def all_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def pin_env_threads(n: int = 1) -> None:
    """Set OMP/OPENBLAS/MKL thread variables (inherited by subprocesses)."""
    for var in THREAD_VARS:
        os.environ[var] = str(n)


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op, BLAS/OpenMP (threadpoolctl) and OpenCV threads.

    numpy's OpenBLAS (pytorch_grad_cam's SVD) and cv2 (its resizing) have their own pools; all
    are limited, and restored afterwards.
    """
    before = torch.get_num_threads()
    cv2_mod: Any = None
    cv2_before = None
    with contextlib.suppress(Exception):
        import cv2

        cv2_mod = cv2
        cv2_before = cv2.getNumThreads()
        cv2.setNumThreads(n)
    torch.set_num_threads(n)
    try:
        with contextlib.ExitStack() as stack:
            with contextlib.suppress(ImportError):
                from threadpoolctl import threadpool_limits

                stack.enter_context(threadpool_limits(limits=n))
            yield
    finally:
        torch.set_num_threads(before)
        if cv2_mod is not None and cv2_before is not None:
            cv2_mod.setNumThreads(cv2_before)


# --- model and images ----------------------------------------------------------------------------
@dataclass
class ModelSpec:
    """The model under test and what the engine and pytorch_grad_cam need to know about it."""

    model: nn.Module  # NormalizedModel: [0, 1] pixels in, logits out, eval mode
    layer: str  # target layer, dotted name inside ``model.backbone``
    num_classes: int
    defect_index: int
    ok_index: int
    input_size: tuple[int, int]
    in_channels: int
    description: str
    checkpoint: Path | None = None


def random_model(image_size: int, seed: int = 0, arch: str = "resnet18") -> ModelSpec:
    """``build_backbone(arch, 2, 1)`` with seeded random weights in a ``NormalizedModel``."""
    from worker.model.checkpoint import NormalizedModel, build_backbone

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = build_backbone(arch, 2, 1)
    model = NormalizedModel(backbone, [0.5], [0.25]).eval()
    return ModelSpec(
        model=model,
        layer="layer4",
        num_classes=2,
        defect_index=1,
        ok_index=0,
        input_size=(image_size, image_size),
        in_channels=1,
        description=f"{arch}, random weights (seed {seed}), 1 input channel",
    )


def checkpoint_model(path: Path) -> ModelSpec:
    """A docs/design.md §2 checkpoint, loaded on the CPU."""
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
        checkpoint=path,
    )


def save_model_checkpoint(spec: ModelSpec, path: Path) -> Path:
    """Write ``spec``'s model as a checkpoint the worker can load (random weights included)."""
    if spec.checkpoint is not None:
        shutil.copyfile(spec.checkpoint, path)  # without its calibration sidecar
        return path
    from worker.model.checkpoint import save_checkpoint

    model: Any = spec.model
    save_checkpoint(
        path,
        model.backbone,
        arch="resnet18",
        num_classes=spec.num_classes,
        class_names=["ok", "defect"],
        input_size=spec.input_size,
        mean=[float(v) for v in model.mean.flatten()],
        std=[float(v) for v in model.std.flatten()],
        in_channels=spec.in_channels,
        target_layer=spec.layer,
        model_version=f"bench-resnet18-{spec.input_size[0]}x{spec.input_size[1]}",
    )
    return path


def synthetic_images(n: int, size: int, in_channels: int = 1, seed: int = 0) -> Tensor:
    """``float32[n, C, size, size]`` in [0, 1]: noisy background with one bright or dark blob."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    out = np.empty((n, in_channels, size, size), dtype=np.float32)
    for i in range(n):
        base = rng.normal(0.5, 0.08, (size, size))
        cy, cx = rng.uniform(0.2 * size, 0.8 * size, 2)
        r = rng.uniform(0.06, 0.25) * size
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        out[i] = np.clip(base + rng.choice([-0.4, 0.4]) * blob, 0, 1)
    return torch.from_numpy(out)


def dataset_records(dataset: Path, seed: int = 0) -> list[Any]:
    """Every manifest record, in a fixed shuffled order (all splits, both labels)."""
    from inspection_audit.lab.dataset import read_manifest

    records = sorted(read_manifest(dataset), key=lambda r: r.rel_path)
    order = np.random.default_rng(seed).permutation(len(records))
    return [records[i] for i in order]


def load_pool(records: Sequence[Any], n: int, spec: ModelSpec) -> Tensor:
    """The first ``n`` records decoded and preprocessed to the model's input size."""
    from inspection_audit.lab.dataset import load_tensors

    x, _ = load_tensors(list(records[:n]), spec.input_size, spec.in_channels, show_progress=False)
    return x


def make_batches(pool: Tensor, b: int, images: int) -> list[Tensor]:
    """``ceil(images / b)`` contiguous batches of ``b`` images cycling through ``pool``."""
    n = pool.shape[0]
    out = []
    for i in range(batch_iters(b, images)):
        idx = torch.tensor([(i * b + j) % n for j in range(b)])
        out.append(pool.index_select(0, idx.to(pool.device)).contiguous())
    return out


# --- the four in-process workloads ------------------------------------------------------------
class NegatedOutputTarget:
    """pytorch_grad_cam target ``-z[0]`` (the ok class of a single-logit head)."""

    def __call__(self, model_output: Tensor) -> Tensor:
        return -(model_output[0] if model_output.dim() == 1 else model_output[:, 0])


class GradCamRunner:
    """(d): pytorch_grad_cam computing the engine's three maps; objects built once.

    ``runner(x)`` returns ``(cam_defect, cam_ok, cam_eigen)``, each ``float32[B, H, W]`` numpy.
    Use as a context manager (the CAM objects keep hooks on their model copies while alive).
    """

    def __init__(self, spec: ModelSpec) -> None:
        from pytorch_grad_cam import EigenCAM, GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        self._stack = contextlib.ExitStack()
        m_grad: Any = copy.deepcopy(spec.model)
        m_eig: Any = copy.deepcopy(spec.model)
        self.gradcam = self._stack.enter_context(
            GradCAM(model=m_grad, target_layers=[m_grad.backbone.get_submodule(spec.layer)])
        )
        self.eigencam = self._stack.enter_context(
            EigenCAM(model=m_eig, target_layers=[m_eig.backbone.get_submodule(spec.layer)])
        )
        if spec.num_classes == 1:
            self.t_defect: Any = ClassifierOutputTarget(0)
            self.t_ok: Any = NegatedOutputTarget()
        else:
            self.t_defect = ClassifierOutputTarget(spec.defect_index)
            self.t_ok = ClassifierOutputTarget(spec.ok_index)

    def __call__(self, x: Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        b = x.shape[0]
        cam_defect = self.gradcam(input_tensor=x, targets=[self.t_defect] * b)
        cam_ok = self.gradcam(input_tensor=x, targets=[self.t_ok] * b)
        cam_eigen = self.eigencam(input_tensor=x, targets=None)
        return cam_defect, cam_ok, cam_eigen

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> GradCamRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_engine(spec: ModelSpec, attack: str) -> Any:
    from worker.engine.score import EngineConfig, ReliabilityEngine

    return ReliabilityEngine(
        spec.model,
        spec.model.backbone.get_submodule(spec.layer),  # type: ignore[operator]
        defect_index=spec.defect_index if spec.num_classes == 2 else 1,
        ok_index=spec.ok_index if spec.num_classes == 2 else 0,
        config=EngineConfig(attack=attack),  # type: ignore[arg-type]
    )


def compare_with_gradcam(
    spec: ModelSpec, x: Tensor, scores: Any, cams: Sequence[np.ndarray]
) -> dict[str, float]:
    """Largest absolute difference between the engine's maps (b) and pytorch_grad_cam's (d).

    EigenCAM does not fix the SVD sign (docs/design.md §7): each image's agnostic map is compared with
    both signs of the engine's projection and the closer one counts.
    """
    import torch.nn.functional as F

    from worker.engine.cam import eigen_cam_projection, forward_with_activations
    from worker.engine.maps import minmax_normalize, upsample

    cam_defect, cam_ok, cam_eigen = cams
    out = {
        "defect": float(np.abs(scores.cam_defect.detach().cpu().numpy() - cam_defect).max()),
        "ok": float(np.abs(scores.cam_ok.detach().cpu().numpy() - cam_ok).max()),
    }
    layer = spec.model.backbone.get_submodule(spec.layer)  # type: ignore[operator]
    with torch.no_grad():
        _, act = forward_with_activations(spec.model, layer, x, need_grad=False)
    p = eigen_cam_projection(act)
    size = (x.shape[2], x.shape[3])
    pos = minmax_normalize(upsample(F.relu(p), size)).cpu().numpy()
    neg = minmax_normalize(upsample(F.relu(-p), size)).cpu().numpy()
    per_image = [
        min(np.abs(cam_eigen[i] - pos[i]).max(), np.abs(cam_eigen[i] - neg[i]).max())
        for i in range(x.shape[0])
    ]
    out["agnostic"] = float(max(per_image))
    out["engine_agnostic_vs_fixed_sign"] = float(
        np.abs(scores.cam_agnostic.detach().cpu().numpy() - pos).max()
    )
    return out


def _sync(device: str) -> Callable[[], None]:
    if device.startswith("cuda"):
        return torch.cuda.synchronize
    return lambda: None


def time_batches(
    fn: Callable[[Tensor], Any],
    batches: Sequence[Tensor],
    *,
    warmup: int,
    reps: int,
    device: str = "cpu",
) -> list[float]:
    """Images/s of each of ``reps`` timed passes over ``batches``, after ``warmup`` calls."""
    sync = _sync(device)
    for i in range(warmup):
        fn(batches[i % len(batches)])
    sync()
    n_images = sum(int(b.shape[0]) for b in batches)
    rates = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for b in batches:
            fn(b)
        sync()
        rates.append(n_images / (time.perf_counter() - t0))
    return rates


def run_core(
    spec: ModelSpec,
    pool: Tensor,
    cfg: BenchConfig,
    *,
    n_threads: int = 1,
    device: str = "cpu",
    kinds: Sequence[str] = KINDS,
    sizes: Sequence[int] | None = None,
    on_step: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Measure (a)-(d) (or ``kinds``) at every batch size; one dict per (kind, B).

    Each dict: ``kind``, ``label``, ``batch_size``, ``threads``, ``device``, ``images_per_s``
    (median), ``reps_images_per_s``, ``images_per_rep``, ``warmup_iters``, ``ms_per_image``.
    """
    sizes = list(sizes or cfg.sizes)
    model = spec.model.to(device).eval()
    dspec = replace(spec, model=model)
    pool = pool.to(device)
    engines = {"b": make_engine(dspec, "none"), "c": make_engine(dspec, "fgsm")}

    def infer(x: Tensor) -> Tensor:
        with torch.inference_mode():
            return model(x)

    results: list[dict[str, Any]] = []
    with threads(n_threads), contextlib.ExitStack() as stack:
        runner = stack.enter_context(GradCamRunner(dspec)) if "d" in kinds else None
        fns: dict[str, Callable[[Tensor], Any]] = {
            "a": infer,
            "b": engines["b"].score,
            "c": engines["c"].score,
        }
        if runner is not None:
            fns["d"] = runner
        for b in sizes:
            batches = make_batches(pool, b, cfg.min_images)
            warm = batch_iters(b, cfg.warmup_images)
            for kind in kinds:
                if on_step is not None:
                    on_step(f"{KIND_LABELS[kind]}, B={b}, {n_threads} thread(s), {device}")
                torch.manual_seed(cfg.seed)
                rates = time_batches(fns[kind], batches, warmup=warm, reps=cfg.reps, device=device)
                med = statistics.median(rates)
                results.append(
                    {
                        "kind": kind,
                        "label": KIND_LABELS[kind],
                        "batch_size": b,
                        "threads": n_threads,
                        "device": device,
                        "images_per_s": med,
                        "ms_per_image": 1000.0 / med,
                        "reps_images_per_s": rates,
                        "images_per_rep": b * len(batches),
                        "warmup_iters": warm,
                    }
                )
    spec.model.to("cpu")
    return results


def maps_agreement(spec: ModelSpec, pool: Tensor, b: int) -> dict[str, float]:
    """(b) and (d) on the same batch of ``b`` images: largest map differences (see above)."""
    x = pool[:b]
    with threads(1):
        scores = make_engine(spec, "none").score(x)
        with GradCamRunner(spec) as runner:
            cams = runner(x)
        return compare_with_gradcam(spec, x, scores, cams)


def device_agreement(spec: ModelSpec, pool: Tensor, b: int, device: str) -> dict[str, Any]:
    """The engine's FGSM scores on ``device`` against the CPU ones, on one batch."""
    x = pool[:b]
    with threads(1):
        cpu = make_engine(spec, "fgsm").score(x)
        spec.model.to(device)
        try:
            dev = make_engine(spec, "fgsm").score(x.to(device))
        finally:
            spec.model.to("cpu")
    diffs: dict[str, float] = {}
    for name in ("p_defect", "iou_gap", "iou_gap_adv"):
        a, c = getattr(cpu, name), getattr(dev, name)
        diffs[name] = float((a - c.cpu()).abs().max())
    for name in ("cam_defect", "cam_ok", "cam_agnostic"):
        diffs[f"{name}_mean_abs"] = float(
            (getattr(cpu, name) - getattr(dev, name).cpu()).abs().mean()
        )
    tol = {
        "p_defect": 5e-3,
        "iou_gap": 0.05,
        "iou_gap_adv": 0.05,
        "cam_defect_mean_abs": 5e-3,
        "cam_ok_mean_abs": 5e-3,
        "cam_agnostic_mean_abs": 5e-3,
    }
    return {
        "batch_size": b,
        "max_abs_diff": diffs,
        "tolerance": tol,
        "passed": all(diffs[k] <= tol[k] for k in tol),
    }


# --- profile -----------------------------------------------------------------------------------
def profile_engine(spec: ModelSpec, pool: Tensor, b: int, iters: int = 3, rows: int = 30) -> str:
    """torch.profiler tables (sorted by self CPU time) of (b) and (c) at batch ``b``, 1 thread."""
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # no profiler start/stop chatter
    from torch.profiler import ProfilerActivity, profile

    parts = []
    x = pool[: min(b, pool.shape[0])]
    if x.shape[0] < b:
        x = make_batches(pool, b, b)[0]
    with threads(1):
        for kind, attack in (("b", "none"), ("c", "fgsm")):
            engine = make_engine(spec, attack)
            engine.score(x)  # warm-up
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(iters):
                    engine.score(x)
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
            parts.append(
                f"== {KIND_LABELS[kind]}: EngineConfig(attack={attack!r}), B={b}, "
                f"{x.shape[2]}x{x.shape[3]} px, 1 thread, {iters} calls, "
                f"sorted by self CPU time ==\n{table}\n"
            )
    return "\n".join(parts)


# --- (e) end to end ------------------------------------------------------------------------------
@dataclass
class WorkerProc:
    """One ``inspection-audit worker`` subprocess and its memory peaks (MB, decimal)."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    peak_rss_tree_mb: float = 0.0
    peak_rss_proc_mb: float = 0.0
    peak_pss_tree_mb: float = 0.0
    pids: set[int] = field(default_factory=set)

    def text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.text().splitlines()[-n:])


class MemoryMonitor(threading.Thread):
    """Samples each worker's process tree (psutil): RSS every ``interval`` s, PSS every 10th."""

    def __init__(self, workers: Sequence[WorkerProc], interval: float = 0.2) -> None:
        super().__init__(daemon=True, name="bench-memory-monitor")
        self.workers = list(workers)
        self.interval = interval
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)

    def sample(self, with_pss: bool) -> None:
        import psutil

        for w in self.workers:
            try:
                root = psutil.Process(w.proc.pid)
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                continue
            rss_total, rss_max, pss_total = 0, 0, 0
            for p in procs:
                try:
                    rss = p.memory_info().rss
                    if with_pss:
                        pss_total += getattr(p.memory_full_info(), "pss", 0)
                except psutil.Error:
                    continue
                w.pids.add(p.pid)
                rss_total += rss
                rss_max = max(rss_max, rss)
            w.peak_rss_tree_mb = max(w.peak_rss_tree_mb, rss_total / 1e6)
            w.peak_rss_proc_mb = max(w.peak_rss_proc_mb, rss_max / 1e6)
            if with_pss:
                w.peak_pss_tree_mb = max(w.peak_pss_tree_mb, pss_total / 1e6)

    def run(self) -> None:
        i = 0
        while not self._halt.is_set():
            self.sample(with_pss=i % 10 == 0)
            i += 1
            self._halt.wait(self.interval)


@dataclass
class E2EContext:
    """Servers and files the end-to-end runs share."""

    redis_url: str
    pg_admin_url: str
    checkpoint: Path
    image_root: Path
    images: list[Path]
    workdir: Path


def _create_database(admin_url: str) -> str:
    import sqlalchemy as sa
    from sqlalchemy.engine import make_url
    from sqlalchemy.pool import NullPool

    name = f"inspection_audit_bench_{uuid.uuid4().hex[:12]}"
    engine = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    finally:
        engine.dispose()
    return make_url(admin_url).set(database=name).render_as_string(hide_password=False)


def _drop_database(admin_url: str, url: str) -> None:
    import sqlalchemy as sa
    from sqlalchemy.engine import make_url
    from sqlalchemy.pool import NullPool

    from db.session import dispose_engines

    dispose_engines(url)
    name = make_url(url).database
    engine = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        engine.dispose()


def _worker_env(values: dict[str, Any]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INSPECTION_AUDIT_")}
    for key, value in values.items():
        env[f"INSPECTION_AUDIT_{key.upper()}"] = str(value)
    for var in THREAD_VARS:
        env[var] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _start_worker(env: dict[str, str], name: str, cwd: Path) -> WorkerProc:
    log = cwd / f"worker-{name}.log"
    cmd = [
        sys.executable,
        "-m",
        "inspection_audit.cli",
        "worker",
        "--concurrency",
        "1",
        "-n",
        f"{name}@%h",
        "-l",
        "info",
    ]
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            cmd,
            env=env,
            cwd=cwd,
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: a stop reaches the pool process
        )
    return WorkerProc(name, proc, log)


def _wait_ready(workers: Sequence[WorkerProc], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pending = list(workers)
    while pending:
        for w in list(pending):
            if READY in w.text():
                pending.remove(w)
            elif w.proc.poll() is not None:
                raise RuntimeError(
                    f"worker {w.name} exited with {w.proc.returncode} before it was ready:\n"
                    + w.tail()
                )
        if pending and time.monotonic() > deadline:
            raise RuntimeError(
                f"worker(s) {[w.name for w in pending]} not ready after {timeout:.0f} s:\n"
                + "\n".join(w.tail() for w in pending)
            )
        time.sleep(0.2)


def _stop_workers(workers: Sequence[WorkerProc], timeout: float = 30.0) -> None:
    for w in workers:
        if w.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(w.proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for w in workers:
        try:
            w.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(w.proc.pid, signal.SIGKILL)
            w.proc.wait(10)
        # a pool process that outlived its parent (it should not)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(w.proc.pid, signal.SIGKILL)


def _cleanup_queue(redis_url: str, queue: str) -> None:
    """Delete the benchmark's queue and kombu's binding keys for it (names hold a random tag)."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        keys = [queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}"]
        keys += [k for k in client.scan_iter(match=f"*{queue}*") if k not in keys]
        client.delete(*keys)
    finally:
        client.close()


def _rows(url: str, prefix: str) -> list[dict[str, Any]]:
    import sqlalchemy as sa

    from db.models import Audit
    from db.session import session_scope

    t = Audit.__table__
    stmt = sa.select(
        t.c.inspection_id, t.c.status, t.c.error, t.c.worker_host, t.c.decode_ms, t.c.score_ms
    ).where(t.c.inspection_id.like(f"{prefix}%"))
    with session_scope(url) as session:
        return [dict(r) for r in session.execute(stmt).mappings()]


def _count_rows(url: str, prefix: str) -> int:
    import sqlalchemy as sa

    from db.models import Audit
    from db.session import session_scope

    t = Audit.__table__
    stmt = sa.select(sa.func.count()).select_from(t).where(t.c.inspection_id.like(f"{prefix}%"))
    with session_scope(url) as session:
        return int(session.execute(stmt).scalar_one())


def _messages(prefix: str, images: Sequence[Path], n: int) -> list[dict[str, Any]]:
    now = datetime.now(UTC).isoformat()
    return [
        {
            "inspection_id": f"{prefix}{i:05d}",
            "image_path": str(images[i % len(images)]),
            "prediction": "ok",  # every image gets the full audit
            "score": 0.1,
            "line": "bench",
            "station": "bench",
            "captured_at": now,
        }
        for i in range(n)
    ]


def _wait_count(
    url: str,
    prefix: str,
    n: int,
    workers: Sequence[WorkerProc],
    timeout: float,
    on_count: Callable[[int], None] | None = None,
    poll: float = 0.1,
) -> float:
    """Poll until ``n`` rows with ``prefix`` exist; returns ``time.perf_counter()`` then."""
    deadline = time.monotonic() + timeout
    last = -1
    while True:
        count = _count_rows(url, prefix)
        now = time.perf_counter()
        if count != last and on_count is not None:
            on_count(count)
        last = count
        if count >= n:
            return now
        dead = [w for w in workers if w.proc.poll() is not None]
        if dead:
            raise RuntimeError(
                f"worker {dead[0].name} exited with {dead[0].proc.returncode}:\n{dead[0].tail()}"
            )
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{count} of {n} rows after {timeout:.0f} s\n"
                + "\n".join(w.tail(20) for w in workers)
            )
        time.sleep(poll)


def run_e2e(
    ctx: E2EContext,
    b: int,
    n_workers: int,
    cfg: BenchConfig,
    *,
    on_status: Callable[[str], None] | None = None,
    ready_timeout: float = 300.0,
) -> dict[str, Any]:
    """(e) at batch size ``b`` with ``n_workers`` worker processes (see ``WHAT_WAS_TIMED``)."""
    from db.migrate import upgrade
    from inspection_audit.settings import Settings
    from producer.api import enqueue_many, reset_apps

    def status(msg: str) -> None:
        if on_status is not None:
            on_status(f"(e) B={b}, {n_workers} worker(s): {msg}")

    tag = uuid.uuid4().hex[:10]
    queue = f"inspection-audit-bench-{tag}"
    status("creating the database")
    url = _create_database(ctx.pg_admin_url)
    workers: list[WorkerProc] = []
    monitor: MemoryMonitor | None = None
    home = ctx.workdir / f"home-{tag}"
    home.mkdir(parents=True, exist_ok=True)
    try:
        upgrade(url)
        values = {
            "broker_url": ctx.redis_url,
            "database_url": url,
            "model": ctx.checkpoint,
            "image_roots": ctx.image_root,
            "queue": queue,
            "batch_size": b,
            "torch_threads": 1,
            "device": "cpu",
            "attack": "fgsm",
            "home": home,
            "save_overlays": "false",
        }
        env = _worker_env(values)
        status("starting worker(s)")
        for i in range(n_workers):
            workers.append(_start_worker(env, f"bench{i + 1}-{tag}", ctx.workdir))
        monitor = MemoryMonitor(workers)
        monitor.start()
        _wait_ready(workers, ready_timeout)
        settings = Settings(
            broker_url=ctx.redis_url,
            database_url=url,
            image_roots=[ctx.image_root],
            queue=queue,
            batch_size=b,
        )
        # Warm-up: until every worker's pool process has scored (loaded its model).
        warm_rounds = 0
        while True:
            warm_rounds += 1
            prefix = f"warm{warm_rounds}-"
            n_warm = 2 * b * n_workers
            status(f"warm-up round {warm_rounds} ({n_warm} images)")
            enqueue_many(_messages(prefix, ctx.images, n_warm), settings=settings)
            _wait_count(url, prefix, n_warm, workers, timeout=600)
            hosts = {r["worker_host"] for r in _rows(url, "warm")}
            pids = {int(h.rsplit(":", 1)[1]) for h in hosts if h and ":" in h}
            if all(w.pids & pids for w in workers) or warm_rounds >= 4:
                break
        reps: list[dict[str, Any]] = []
        n = cfg.e2e_images
        for rep in range(cfg.e2e_reps):
            prefix = f"run{rep}-"
            msgs = _messages(prefix, ctx.images, n)
            status(f"rep {rep + 1}/{cfg.e2e_reps}: enqueueing {n} images")
            t0 = time.perf_counter()
            enqueue_many(msgs, settings=settings)
            t_enq = time.perf_counter()
            t_end = _wait_count(
                url,
                prefix,
                n,
                workers,
                timeout=max(600.0, 5.0 * n),
                on_count=lambda c, rep=rep: status(f"rep {rep + 1}/{cfg.e2e_reps}: {c}/{n} rows"),
            )
            rows = _rows(url, prefix)
            errors = [r for r in rows if r["status"] != "done"]
            by_host: dict[str, int] = {}
            for r in rows:
                by_host[str(r["worker_host"])] = by_host.get(str(r["worker_host"]), 0) + 1
            reps.append(
                {
                    "images_per_s": n / (t_end - t0),
                    "seconds": t_end - t0,
                    "enqueue_s": t_enq - t0,
                    "errors": len(errors),
                    "first_error": errors[0]["error"] if errors else None,
                    "rows_per_worker_process": by_host,
                    "median_decode_ms": _median([r["decode_ms"] for r in rows]),
                    "median_score_ms": _median([r["score_ms"] for r in rows]),
                }
            )
        monitor.sample(with_pss=True)
        rates = [r["images_per_s"] for r in reps]
        return {
            "batch_size": b,
            "workers": n_workers,
            "images_per_rep": n,
            "images_per_s": statistics.median(rates),
            "reps_images_per_s": rates,
            "reps": reps,
            "errors": sum(r["errors"] for r in reps),
            "warmup_rounds": warm_rounds,
            "peak_rss_tree_mb": [round(w.peak_rss_tree_mb, 1) for w in workers],
            "peak_rss_pool_process_mb": [round(w.peak_rss_proc_mb, 1) for w in workers],
            "peak_pss_tree_mb": [round(w.peak_pss_tree_mb, 1) for w in workers],
            "median_decode_ms": _median([r["median_decode_ms"] for r in reps]),
            "median_score_ms": _median([r["median_score_ms"] for r in reps]),
        }
    finally:
        status("stopping worker(s)")
        # Every step runs even when an earlier one fails, and none masks the real error.
        cleanup: list[tuple[str, Callable[[], None]]] = [
            ("stop the memory monitor", monitor.stop if monitor is not None else lambda: None),
            ("stop the workers", lambda: _stop_workers(workers)),
            ("close the producer", reset_apps),
            (f"delete queue {queue}", lambda: _cleanup_queue(ctx.redis_url, queue)),
            (f"drop database {url}", lambda: _drop_database(ctx.pg_admin_url, url)),
        ]
        for what, fn in cleanup:
            try:
                fn()
            except Exception as exc:  # pragma: no cover - best effort, reported
                print(f"warning: could not {what}: {type(exc).__name__}: {exc}", file=sys.stderr)


def _median(values: Sequence[Any]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return statistics.median(vals) if vals else None


# --- machine, targets, reports ---------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    import psutil

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    commit = None
    with contextlib.suppress(Exception):
        commit = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
            or None
        )
    try:
        import torchvision

        tv = torchvision.__version__
    except Exception:  # pragma: no cover
        tv = None
    return {
        "cpu_model": cpu,
        "cores_logical": os.cpu_count(),
        "cores_physical": psutil.cpu_count(logical=False),
        "cores_usable": all_cores(),
        "ram_gb": round(psutil.virtual_memory().total / 1e9, 1),
        "torch": torch.__version__,
        "torchvision": tv,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "git_commit": commit,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "load_average_start": [round(v, 2) for v in os.getloadavg()],
    }


def _ips(
    core: Sequence[dict[str, Any]], kind: str, b: int, n_threads: int = 1, device: str = "cpu"
) -> float | None:
    for r in core:
        if (r["kind"], r["batch_size"], r["threads"], r["device"]) == (kind, b, n_threads, device):
            return float(r["images_per_s"])
    return None


def _e2e(e2e: Sequence[dict[str, Any]], b: int, n: int) -> dict[str, Any] | None:
    for r in e2e:
        if r["batch_size"] == b and r["workers"] == n:
            return r
    return None


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or den is None or den == 0 else num / den


def evaluate_targets(
    core: Sequence[dict[str, Any]],
    e2e: Sequence[dict[str, Any]],
    sizes: Sequence[int],
    e2e_sizes: Sequence[int],
) -> list[dict[str, Any]]:
    """The issue's targets, one row per (target, B): measured value, required, passed."""
    out: list[dict[str, Any]] = []

    def add(
        target: str, b: int | None, value: float | None, required: float, ge: bool, unit: str = "×"
    ) -> None:
        passed = None if value is None else (value >= required if ge else value <= required)
        out.append(
            {
                "target": target,
                "batch_size": b,
                "value": value,
                "required": required,
                "op": ">=" if ge else "<=",
                "unit": unit,
                "passed": passed,
            }
        )

    for b in sizes:
        a, bb, c, d = (_ips(core, k, b) for k in KINDS)
        add("(b) ≥ 0.6 × (a)", b, _ratio(bb, a), 0.6, True)
        add("(c) ≥ 0.25 × (a)", b, _ratio(c, a), 0.25, True)
        add("(b) ≥ 3 × (d)", b, _ratio(bb, d), 3.0, True)
    for b in e2e_sizes:
        e1, e2 = _e2e(e2e, b, 1), _e2e(e2e, b, 2)
        c = _ips(core, "c", b)
        add("(e) 1 worker ≥ 0.8 × (c)", b, _ratio(e1 and e1["images_per_s"], c), 0.8, True)
        add(
            "(e) 2 workers ≥ 1.6 × (e) 1 worker",
            b,
            _ratio(e2 and e2["images_per_s"], e1 and e1["images_per_s"]),
            1.6,
            True,
        )
    rss_b = 32 if 32 in e2e_sizes else (max(e2e_sizes) if e2e_sizes else None)
    for key, label in (
        ("peak_rss_tree_mb", "peak RSS ≤ 1.5 GB per CPU worker"),
        ("peak_pss_tree_mb", "peak PSS ≤ 1.5 GB per CPU worker (supplementary)"),
    ):
        peaks = [max(r[key]) for r in e2e if r["batch_size"] == rss_b and r[key]]
        add(label, rss_b, max(peaks) if peaks else None, RSS_LIMIT_MB, False, "MB")
    return out


def _f(v: float | None, digits: int = 2) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _verdict(p: bool | None) -> str:
    return "not measured" if p is None else ("pass" if p else "**MISS**")


def render_markdown(report: dict[str, Any]) -> str:
    """``docs/performance.md`` from the JSON report."""
    m, cfg, core = report["machine"], report["config"], report["core"]
    e2e, targets = report["e2e"], report["targets"]
    sizes = cfg["sizes"]
    lines: list[str] = ["# Throughput", ""]
    if cfg["quick"]:
        lines += [
            "> **Quick smoke run** (`--quick`): tiny images, few iterations. These numbers "
            "check that the benchmark runs; they are not a measurement.",
            "",
        ]
    lines += [
        f"Measured {m['date']} with `{report['command']}` (commit {m['git_commit'] or '?'}), "
        f"one run: every ratio below comes from this one run.",
        "",
        f"Machine: {m['cpu_model']}, {m['cores_usable']} usable cores "
        f"({m['cores_physical']} physical), {m['ram_gb']} GB RAM; torch {m['torch']}, "
        f"torchvision {m['torchvision']}, Python {m['python']}; {m['platform']}.",
        f"Load average at start: {' / '.join(str(v) for v in m['load_average_start'])} "
        f"(1 / 5 / 15 min); at end: {' / '.join(str(v) for v in report['load_average_end'])}.",
    ]
    if m["load_average_start"][0] > 0.5 * m["cores_usable"]:
        lines += [
            "",
            "> **Warning:** the machine was busy when the run started (load average above half "
            "the cores): the numbers are lower and noisier than on an idle machine.",
        ]
    lines += [
        "",
        f"Setup: {report['model']}; input {cfg['image_size']}×{cfg['image_size']} px; "
        f"{report['images']}; CPU. Images/s is the median of {cfg['reps']} timed repetitions of "
        f"at least {cfg['min_images']} images each (batches cycle through {cfg['n_pool']} "
        f"distinct images), after warm-up calls (⌈{cfg['warmup_images']}/B⌉ batches); seed "
        f"{cfg['seed']}. Every measurement uses one torch/BLAS/OpenMP/OpenCV thread per process "
        "unless marked *all cores*.",
        "",
        "## Images per second, one thread",
        "",
        "| B | (a) inference | (b) audit | (c) audit + FGSM | (d) pytorch_grad_cam | "
        "(b)/(a) | (c)/(a) | (b)/(d) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for b in sizes:
        a, bb, c, d = (_ips(core, k, b) for k in KINDS)
        lines.append(
            f"| {b} | {_f(a, 1)} | {_f(bb, 1)} | {_f(c, 1)} | {_f(d, 1)} | "
            f"{_f(_ratio(bb, a))} | {_f(_ratio(c, a))} | {_f(_ratio(bb, d))} |"
        )
    n_all = report["all_cores_threads"]
    if any(r["threads"] == n_all and n_all != 1 for r in core):
        lines += [
            "",
            f"## Images per second, all cores ({n_all} threads), (a)–(c)",
            "",
            "| B | (a) inference | (b) audit | (c) audit + FGSM | (b)/(a) | (c)/(a) | "
            "(a) speed-up vs 1 thread |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for b in sizes:
            a, bb, c = (_ips(core, k, b, n_all) for k in ("a", "b", "c"))
            lines.append(
                f"| {b} | {_f(a, 1)} | {_f(bb, 1)} | {_f(c, 1)} | {_f(_ratio(bb, a))} | "
                f"{_f(_ratio(c, a))} | {_f(_ratio(a, _ips(core, 'a', b)))} |"
            )
    lines += ["", "## End to end: Redis → Celery → PostgreSQL", ""]
    if not e2e:
        lines.append(report.get("e2e_note") or "Not measured (`--skip-e2e`).")
    else:
        lines += [
            f"{cfg['e2e_images']} images per repetition, median of {cfg['e2e_reps']} "
            "repetition(s); B = `INSPECTION_AUDIT_BATCH_SIZE`; one thread per worker process.",
            "",
            "| B | workers | images/s | (e)/(c) | 2 workers / 1 | peak RSS per worker, "
            "process tree (MB) | pool process (MB) | PSS tree (MB) | decode ms/img | score ms/img | errors |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in e2e:
            b, n = r["batch_size"], r["workers"]
            one = _e2e(e2e, b, 1)
            scale = _ratio(r["images_per_s"], one["images_per_s"]) if one and n == 2 else None
            lines.append(
                f"| {b} | {n} | {_f(r['images_per_s'], 1)} | "
                f"{_f(_ratio(r['images_per_s'], _ips(core, 'c', b)))} | {_f(scale)} | "
                f"{', '.join(f'{v:.0f}' for v in r['peak_rss_tree_mb'])} | "
                f"{', '.join(f'{v:.0f}' for v in r['peak_rss_pool_process_mb'])} | "
                f"{', '.join(f'{v:.0f}' for v in r['peak_pss_tree_mb'])} | "
                f"{_f(r['median_decode_ms'], 1)} | {_f(r['median_score_ms'], 1)} | {r['errors']} |"
            )
    lines += [
        "",
        "## Targets",
        "",
        "| target | B | measured | required | result |",
        "|---|---:|---:|---:|---|",
    ]
    for t in targets:
        unit = " MB" if t["unit"] == "MB" else "×"
        digits = 0 if t["unit"] == "MB" else 2
        lines.append(
            f"| {t['target']} | {t['batch_size'] if t['batch_size'] is not None else '–'} | "
            f"{_f(t['value'], digits)}{unit if t['value'] is not None else ''} | "
            f"{'≥' if t['op'] == '>=' else '≤'} {_f(t['required'], digits)}{unit} | "
            f"{_verdict(t['passed'])} |"
        )
    missed = [t for t in targets if t["passed"] is False]
    lines += [
        "",
        (
            f"{len(missed)} of {sum(t['passed'] is not None for t in targets)} measured targets "
            "missed: " + "; ".join(f"{t['target']} at B={t['batch_size']}" for t in missed) + "."
        )
        if missed
        else "Every measured target passed.",
        "",
        "Ratios are of images/s measured in this run on this machine. The RSS target is judged "
        "at B=32 (the largest end-to-end batch size when 32 is not run), on the peak of the RSS "
        "summed over the worker's process tree (main process + pool process), the larger of the "
        "1- and 2-worker runs. The pool process is forked from the main process after torch is "
        "imported, so the pages they share (torch's libraries, imported modules) are counted "
        "twice in that sum; the supplementary PSS row splits shared pages between the processes "
        "that map them, which is closer to what one more worker adds to the machine's memory.",
        "",
        "## What was timed",
        "",
    ]
    for k in ("a", "b", "c", "d", "e"):
        lines.append(f"* **({k})** {WHAT_WAS_TIMED[k]}")
    agree = report.get("maps_agreement")
    if agree:
        lines += [
            "",
            f"Equal work: on one batch of {agree['batch_size']} images the engine's maps (b) and "
            f"pytorch_grad_cam's (d) differ by at most {agree['defect']:.1e} (defect), "
            f"{agree['ok']:.1e} (ok) and {agree['agnostic']:.1e} (Eigen-CAM, up to the SVD sign).",
        ]
    lines += ["", "## GPU", ""]
    gpu = report.get("gpu")
    if not gpu:
        lines.append("No GPU was available in this session; CUDA numbers not measured.")
    else:
        lines += [
            f"{gpu['name']}; host side one thread. Images/s:",
            "",
            "| B | (a) inference | (b) audit | (c) audit + FGSM | (d) pytorch_grad_cam | "
            "(b)/(a) | (c)/(a) | (b)/(d) |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for b in sizes:
            a, bb, c, d = (_ips(gpu["core"], k, b, 1, gpu["device"]) for k in KINDS)
            lines.append(
                f"| {b} | {_f(a, 1)} | {_f(bb, 1)} | {_f(c, 1)} | {_f(d, 1)} | "
                f"{_f(_ratio(bb, a))} | {_f(_ratio(c, a))} | {_f(_ratio(bb, d))} |"
            )
        ag = gpu["agreement"]
        diffs = ", ".join(
            f"{k} {v:.1e} (tol {ag['tolerance'][k]:.0e})" for k, v in ag["max_abs_diff"].items()
        )
        lines += [
            "",
            f"CUDA vs CPU engine scores (FGSM, B={ag['batch_size']}): "
            f"{'match' if ag['passed'] else '**DO NOT MATCH**'} within tolerance: {diffs}.",
        ]
    lines += ["", "## Profile", ""]
    prof = report.get("profile")
    lines.append(
        f"`{prof}`: torch.profiler tables of (b) and (c) at B=8, sorted by self CPU time."
        if prof
        else "Not run in this run; `python -m bench.throughput --profile` writes `docs/profile.txt`."
    )
    lines.append("")
    return "\n".join(lines)


# --- command line -------------------------------------------------------------------------------
def _int_list(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from exc
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.throughput",
        description="Images/s of inference, the audit, pytorch_grad_cam and the pipeline "
        "end to end; writes performance.json and performance.md.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="Smoke run: 64 px, B=1,4, few images "
        "and iterations; output to a temporary folder unless --out is given.",
    )
    p.add_argument(
        "--sizes", type=_int_list, default=None, help="Batch sizes for (a)-(d) (default 1,8,32)."
    )
    p.add_argument(
        "--e2e-sizes", type=_int_list, default=None, help="Batch sizes for (e) (default 8,32)."
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="Input side in px (default 224; a --model checkpoint's own size wins).",
    )
    p.add_argument(
        "--model",
        type=Path,
        default=None,
        help="Checkpoint to benchmark (default: random resnet18).",
    )
    p.add_argument(
        "--dataset",
        type=Path,
        default=None,
        help="Dataset folder with manifest.csv (default: $INSPECTION_AUDIT_DATASET, else ../shared/datasets/magnetic-tile).",
    )
    p.add_argument("--skip-e2e", action="store_true", help="Skip (e) (no Redis/PostgreSQL needed).")
    p.add_argument(
        "--profile",
        action="store_true",
        help="Also write profile.txt: torch.profiler on (b) and (c) at B=8.",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="Output folder (default docs/; with --quick a temporary folder).",
    )
    p.add_argument("--reps", type=int, default=None, help="Timed repetitions (default 5).")
    p.add_argument(
        "--min-images", type=int, default=None, help="Images per repetition, at least (default 32)."
    )
    p.add_argument(
        "--e2e-images",
        type=int,
        default=None,
        help="Images per end-to-end repetition (default 256).",
    )
    p.add_argument("--e2e-reps", type=int, default=None, help="End-to-end repetitions (default 3).")
    p.add_argument(
        "--redis-url", default=DEFAULT_REDIS, help=f"Broker for (e) (default {DEFAULT_REDIS})."
    )
    p.add_argument(
        "--pg-admin-url",
        default=os.environ.get("INSPECTION_AUDIT_BENCH_PG_ADMIN_URL", DEFAULT_PG_ADMIN),
        help="PostgreSQL database to CREATE/DROP the benchmark database from.",
    )
    p.add_argument(
        "--no-all-cores", action="store_true", help="Skip the all-cores runs of (a)-(c)."
    )
    return p


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    cfg = BenchConfig.quick_preset() if args.quick else BenchConfig.full()
    over: dict[str, Any] = {}
    for name in (
        "sizes",
        "e2e_sizes",
        "image_size",
        "reps",
        "min_images",
        "e2e_images",
        "e2e_reps",
    ):
        v = getattr(args, name)
        if v is not None:
            over[name] = v
    return replace(cfg, **over)


def resolve_dataset(arg: Path | None) -> Path:
    if arg is not None:
        return arg
    env = os.environ.get("INSPECTION_AUDIT_DATASET")
    return Path(env) if env else DEFAULT_DATASET


def main(argv: Sequence[str] | None = None) -> int:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )
    from rich.table import Table

    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    pin_env_threads(1)
    console = Console()
    out = args.out or (
        Path(tempfile.gettempdir()) / "inspection-audit-bench-quick" if cfg.quick else REPO / "docs"
    )
    out.mkdir(parents=True, exist_ok=True)
    argv_text = " ".join(sys.argv[1:] if argv is None else argv)
    command = f"python -m bench.throughput {argv_text}".strip()
    machine = machine_info()

    # model and images
    torch.manual_seed(cfg.seed)
    if args.model is not None:
        spec = checkpoint_model(args.model)
        if args.image_size is not None and args.image_size != spec.input_size[0]:
            console.print(f"[yellow]--image-size ignored: the checkpoint is {spec.input_size}[/]")
        cfg = replace(cfg, image_size=spec.input_size[0])
    else:
        spec = random_model(cfg.image_size, cfg.seed)
    dataset = resolve_dataset(args.dataset)
    records = dataset_records(dataset, cfg.seed)
    with console.status(f"loading {cfg.n_pool} images from {dataset}"):
        pool = load_pool(records, cfg.n_pool, spec)
    n_all = all_cores()
    run_all = not args.no_all_cores and n_all > 1
    run_e2e_ = not args.skip_e2e
    gpu = torch.cuda.is_available()
    steps = len(cfg.sizes) * (4 + (3 if run_all else 0) + (4 if gpu else 0)) + 1
    if run_e2e_:
        steps += len(cfg.e2e_sizes) * len(cfg.e2e_workers)
    if args.profile:
        steps += 1

    report: dict[str, Any] = {
        "command": command,
        "machine": machine,
        "config": asdict(cfg),
        "model": spec.description,
        "images": f"{cfg.n_pool} magnetic-tile images from {dataset} (manifest order shuffled "
        f"with seed {cfg.seed})",
        "all_cores_threads": n_all,
        "what_was_timed": WHAT_WAS_TIMED,
        "core": [],
        "e2e": [],
    }
    t_start = time.perf_counter()
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("benchmark", total=steps)
        first = [True]

        def step(desc: str) -> None:
            if not first[0]:
                progress.advance(task)
            first[0] = False
            progress.update(task, description=desc)

        def status(desc: str) -> None:
            progress.update(task, description=desc)

        step("maps agreement (b) vs (d)")
        b_agree = min(4, pool.shape[0])
        report["maps_agreement"] = {"batch_size": b_agree, **maps_agreement(spec, pool, b_agree)}
        report["core"] += run_core(spec, pool, cfg, n_threads=1, on_step=step)
        if run_all:
            report["core"] += run_core(
                spec, pool, cfg, n_threads=n_all, kinds=("a", "b", "c"), on_step=step
            )
        if gpu:
            dev = "cuda"
            gcore = run_core(spec, pool, cfg, n_threads=1, device=dev, on_step=step)
            report["gpu"] = {
                "name": torch.cuda.get_device_name(0),
                "device": dev,
                "core": gcore,
                "agreement": device_agreement(spec, pool, min(8, pool.shape[0]), dev),
            }
        if args.profile:
            step("profiling (b) and (c) at B=8")
            pb = 8 if not cfg.quick else max(cfg.sizes)
            text = profile_engine(spec, pool, pb)
            (out / "profile.txt").write_text(
                f"# {command}\n# {machine['date']}, {machine['cpu_model']}, torch {machine['torch']}\n\n"
                + text
            )
            report["profile"] = str(_display_path(out / "profile.txt"))
        if run_e2e_:
            workdir = Path(tempfile.mkdtemp(prefix="inspection-audit-bench-"))
            try:
                ckpt = save_model_checkpoint(spec, workdir / "model.pt")
                n_e2e = min(len(records), max(cfg.e2e_images, 1))
                ctx = E2EContext(
                    redis_url=args.redis_url,
                    pg_admin_url=args.pg_admin_url,
                    checkpoint=ckpt,
                    image_root=dataset.resolve(),
                    images=[r.path.resolve() for r in records[:n_e2e]],
                    workdir=workdir,
                )
                for b in cfg.e2e_sizes:
                    for n in cfg.e2e_workers:
                        step(f"(e) B={b}, {n} worker(s)")
                        report["e2e"].append(run_e2e(ctx, b, n, cfg, on_status=status))
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
        progress.advance(task)
        progress.update(task, description="done")
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    report["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    report["targets"] = evaluate_targets(report["core"], report["e2e"], cfg.sizes, cfg.e2e_sizes)
    (out / "performance.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    md = render_markdown(report)
    (out / "performance.md").write_text(md)

    # console summary
    table = Table(title=f"images/s ({'quick smoke run' if cfg.quick else 'full run'}, one thread)")
    table.add_column("B", justify="right")
    for k in KINDS:
        table.add_column(f"({k})", justify="right")
    for b in cfg.sizes:
        table.add_row(str(b), *(_f(_ips(report["core"], k, b), 1) for k in KINDS))
    console.print(table)
    console.print(", ".join(f"({k}) = {KIND_LABELS[k][4:]}" for k in KINDS))
    if report["e2e"]:
        et = Table(title="(e) end to end")
        for col in ("B", "workers", "images/s", "peak RSS tree MB", "errors"):
            et.add_column(col, justify="right")
        for r in report["e2e"]:
            et.add_row(
                str(r["batch_size"]),
                str(r["workers"]),
                _f(r["images_per_s"], 1),
                ", ".join(f"{v:.0f}" for v in r["peak_rss_tree_mb"]),
                str(r["errors"]),
            )
        console.print(et)
    tt = Table(title="targets")
    for col in ("target", "B", "measured", "required", "result"):
        tt.add_column(col)
    for t in report["targets"]:
        digits = 0 if t["unit"] == "MB" else 2
        tt.add_row(
            t["target"],
            str(t["batch_size"]),
            _f(t["value"], digits),
            f"{t['op']} {_f(t['required'], digits)}",
            _verdict(t["passed"]).replace("**", ""),
        )
    console.print(tt)
    a = report["maps_agreement"]
    console.print(
        f"maps (b) vs (d), max abs diff: defect {a['defect']:.1e}, ok {a['ok']:.1e}, "
        f"eigen {a['agnostic']:.1e}"
    )
    console.print(
        f"wrote {out / 'performance.json'} and {out / 'performance.md'} in {report['seconds']:.0f} s"
    )
    errors = sum(r["errors"] for r in report["e2e"])
    if errors:
        console.print(f"[red]{errors} end-to-end rows had status error[/]")
        return 1
    return 0


def _display_path(p: Path) -> Path:
    try:
        return p.resolve().relative_to(REPO)
    except ValueError:
        return p


if __name__ == "__main__":
    sys.exit(main())
