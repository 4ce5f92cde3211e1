"""The in-process workloads (a)-(d), their images, and how they are timed.

(a) ``model(x)`` under ``torch.inference_mode()``; (b) ``ReliabilityEngine.score(x)`` with
``attack="none"``; (c) the same with ``attack="fgsm"``; (d) ``pytorch_grad_cam`` computing the
same three maps (:class:`GradCamRunner`). Images are real magnetic-tile images
(:func:`dataset_records`, :func:`load_pool`) or synthetic ones (:func:`synthetic_images`).
Timing: :func:`time_batches`, with ``torch.utils.benchmark.Timer``.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import os
import statistics
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.benchmark import Timer

from bench.throughput.config import KIND_LABELS, KINDS, BenchConfig, batch_iters, threads
from bench.throughput.model import ModelSpec, make_engine

if TYPE_CHECKING:
    from inspection_audit.lab.dataset import Record

#: ``torch.utils.benchmark.Timer.timeit(n)`` first makes ``max(n // 100, 2)`` untimed calls.
TIMER_WARMUP_MIN = 2


# --- images --------------------------------------------------------------------------------------
def synthetic_images(
    n: int, size: int, in_channels: int = 1, seed: int = 0, *, width: int | None = None
) -> Tensor:
    """``float32[n, C, size, width]`` in [0, 1] (``width`` defaults to ``size``): noisy
    background with one bright or dark blob."""
    rng = np.random.default_rng(seed)
    w = size if width is None else width
    yy, xx = np.mgrid[0:size, 0:w]
    out = np.empty((n, in_channels, size, w), dtype=np.float32)
    for i in range(n):
        base = rng.normal(0.5, 0.08, (size, w))
        cy, cx = rng.uniform([0.2 * size, 0.2 * w], [0.8 * size, 0.8 * w])
        r = rng.uniform(0.06, 0.25) * min(size, w)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        out[i] = np.clip(base + rng.choice([-0.4, 0.4]) * blob, 0, 1)
    return torch.from_numpy(out)


def dataset_records(dataset: Path, seed: int = 0) -> list[Record]:
    """Every manifest record of ``dataset``, in a fixed shuffled order (all splits, both labels)."""
    from inspection_audit.lab.dataset import read_manifest

    records = sorted(read_manifest(dataset), key=lambda r: r.rel_path)
    order = np.random.default_rng(seed).permutation(len(records))
    return [records[i] for i in order]


def load_pool(records: Sequence[Record], n: int, spec: ModelSpec) -> Tensor:
    """The first ``n`` records decoded and preprocessed to the model's input size, once.

    Returns ``float32[n, C, H, W]`` in [0, 1].
    """
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


# --- (d) pytorch_grad_cam -------------------------------------------------------------------------
class NegatedOutputTarget:
    """pytorch_grad_cam target ``-z[0]`` (the ok class of a single-logit head)."""

    def __call__(self, model_output: Tensor) -> Tensor:
        """``-z[0]`` of one image's logits (or ``-z[:, 0]`` of a batch)."""
        return -(model_output[0] if model_output.dim() == 1 else model_output[:, 0])


class GradCamRunner:
    """(d): pytorch_grad_cam computing the engine's three maps; CAM objects built once.

    ``runner(x)`` returns ``(cam_defect, cam_ok, cam_eigen)``, each ``float32[B, H, W]`` numpy.
    ``GradCAM`` and ``EigenCAM`` each get their own ``copy.deepcopy`` of the model, so the
    caller's model keeps no hooks and no gradients. Use as a context manager (the CAM objects
    keep hooks on their copies while alive).
    """

    def __init__(self, spec: ModelSpec) -> None:
        from pytorch_grad_cam import EigenCAM, GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        self._stack = contextlib.ExitStack()
        m_grad = copy.deepcopy(spec.model)
        m_eig = copy.deepcopy(spec.model)
        self.gradcam = self._stack.enter_context(
            GradCAM(model=m_grad, target_layers=[m_grad.backbone.get_submodule(spec.layer)])
        )
        self.eigencam = self._stack.enter_context(
            EigenCAM(model=m_eig, target_layers=[m_eig.backbone.get_submodule(spec.layer)])
        )
        self.t_defect: Any
        self.t_ok: Any
        if spec.num_classes == 1:
            self.t_defect = ClassifierOutputTarget(0)
            self.t_ok = NegatedOutputTarget()
        else:
            self.t_defect = ClassifierOutputTarget(spec.defect_index)
            self.t_ok = ClassifierOutputTarget(spec.ok_index)

    def __call__(self, x: Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The three maps of ``x`` (``float32[B, C, H, W]`` in [0, 1]), each in [0, 1]."""
        b = x.shape[0]
        cam_defect = self.gradcam(input_tensor=x, targets=[self.t_defect] * b)
        cam_ok = self.gradcam(input_tensor=x, targets=[self.t_ok] * b)
        cam_eigen = self.eigencam(input_tensor=x, targets=None)
        return cam_defect, cam_ok, cam_eigen

    def close(self) -> None:
        """Remove the hooks (exit the CAM objects' ``with`` blocks)."""
        self._stack.close()

    def __enter__(self) -> GradCamRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- timing --------------------------------------------------------------------------------------
def time_batches(
    fn: Callable[[Tensor], Any],
    batches: Sequence[Tensor],
    *,
    warmup: int,
    reps: int,
    num_threads: int = 1,
    label: str = "",
) -> list[float]:
    """Images/s of each of ``reps`` timed repetitions over ``batches`` (one value per repetition).

    :func:`time_calls` with ``B = batches[0].shape[0]``: one
    ``torch.utils.benchmark.Timer(stmt="fn(next(batches))")`` per workload, with ``batches``
    an endless cycle over the ``n = len(batches)`` distinct batches of ``B`` images. Each
    repetition is ``timer.timeit(n)``: torch first makes ``max(n // 100, 2)`` untimed calls,
    then times ``n`` calls, so a repetition covers every batch exactly once; its rate is
    ``B / m.mean`` images per second (``m.mean``: seconds per call, i.e. the ``n`` calls' wall
    time divided by ``n``). The Timer synchronises an accelerator before reading the clock, so
    CUDA work is counted in full. Before the first repetition, the calls that ``warmup`` asks
    for beyond Timer's own are made untimed, so at least ``max(warmup, 2)`` calls precede the
    first timed one.

    Args:
        fn: the workload, called with one ``float32[B, C, H, W]`` batch.
        batches: the distinct batches (same B).
        warmup: untimed calls wanted before the first timed repetition.
        reps: timed repetitions.
        num_threads: torch intra-op threads while timing (Timer's ``num_threads``).
        label: Timer label (shows in a printed ``Measurement``).
    """
    b = int(batches[0].shape[0])
    return time_calls(
        fn, batches, batch_size=b, warmup=warmup, reps=reps, num_threads=num_threads, label=label
    )


def time_calls(
    fn: Callable[[Any], Any],
    items: Sequence[Any],
    *,
    batch_size: int,
    warmup: int,
    reps: int,
    num_threads: int = 1,
    label: str = "",
) -> list[float]:
    """Images/s of each of ``reps`` timed repetitions of ``fn`` over ``items``, each item one
    batch of ``batch_size`` images in whatever form ``fn`` takes (a tensor for (a)-(d); decoded
    images and their production input for the second-opinion workloads).

    The timing is :func:`time_batches`'s: ``timer.timeit(len(items))`` per repetition after
    ``max(warmup, 2)`` untimed calls at least; each rate is ``batch_size`` / (seconds per call).
    """
    n = len(items)
    it = itertools.cycle(items)
    for _ in range(max(0, warmup - max(n // 100, TIMER_WARMUP_MIN))):
        fn(next(it))
    timer = Timer(
        stmt="fn(next(batches))",
        globals={"fn": fn, "batches": it},
        num_threads=num_threads,
        label=label,
        sub_label=f"B={batch_size}",
    )
    return [batch_size / timer.timeit(n).mean for _ in range(reps)]


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

    For each B: ``ceil(cfg.min_images / B)`` batches cycling through ``pool``, timed by
    :func:`time_batches` (``cfg.reps`` repetitions, ``ceil(cfg.warmup_images / B)`` warm-up
    calls at least), with ``n_threads`` torch/BLAS/OpenCV threads, on ``device``; torch's RNG
    is seeded with ``cfg.seed`` before each workload. The model is moved back to the CPU after.

    Each dict: ``kind``, ``label``, ``batch_size``, ``threads``, ``device``, ``images_per_s``
    (median of the repetitions), ``ms_per_image`` (``1000 / images_per_s``),
    ``reps_images_per_s``, ``images_per_rep`` (``B`` × batches), ``warmup_iters`` (untimed calls
    before the first repetition) and ``timer_warmup_per_rep`` (Timer's untimed calls before
    each repetition).
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
        fns: dict[str, Callable[[Tensor], Any]] = {
            "a": infer,
            "b": engines["b"].score,
            "c": engines["c"].score,
        }
        if "d" in kinds:
            fns["d"] = stack.enter_context(GradCamRunner(dspec))
        for b in sizes:
            batches = make_batches(pool, b, cfg.min_images)
            warm = batch_iters(b, cfg.warmup_images)
            timer_warm = max(len(batches) // 100, TIMER_WARMUP_MIN)
            for kind in kinds:
                if on_step is not None:
                    on_step(f"{KIND_LABELS[kind]}, B={b}, {n_threads} thread(s), {device}")
                torch.manual_seed(cfg.seed)
                rates = time_batches(
                    fns[kind],
                    batches,
                    warmup=warm,
                    reps=cfg.reps,
                    num_threads=n_threads,
                    label=KIND_LABELS[kind],
                )
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
                        "warmup_iters": max(warm, timer_warm),
                        "timer_warmup_per_rep": timer_warm,
                    }
                )
    spec.model.to("cpu")
    return results


# --- profile -------------------------------------------------------------------------------------
def profile_engine(spec: ModelSpec, pool: Tensor, b: int, iters: int = 3, rows: int = 30) -> str:
    """torch.profiler tables of (b) and (c) at batch ``b``, one thread, by self CPU time.

    One warm-up call, then ``iters`` profiled calls per workload; ``rows`` ops per table.
    """
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # no profiler start/stop chatter
    from torch.profiler import ProfilerActivity, profile

    parts = []
    x = pool[: min(b, pool.shape[0])]
    if x.shape[0] < b:
        x = make_batches(pool, b, b)[0]
    attacks: tuple[tuple[str, Any], ...] = (("b", "none"), ("c", "fgsm"))
    with threads(1):
        for kind, attack in attacks:
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
