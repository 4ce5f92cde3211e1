"""What to measure and with how many threads: :class:`BenchConfig`, the kinds (a)-(d), paths.

Nothing here imports more than torch; every other module of the benchmark builds on it.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from inspection_audit.procs import THREAD_VARS

#: The repository root (``bench/throughput/config.py`` → three levels up).
REPO = Path(__file__).resolve().parents[2]
DEFAULT_DATASET = REPO.parent / "shared" / "datasets" / "magnetic-tile"
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"

#: The in-process workloads, in the order they are run and reported.
KINDS = ("a", "b", "c", "d")
KIND_LABELS = {
    "a": "(a) inference",
    "b": "(b) audit, no attack",
    "c": "(c) audit + FGSM",
    "d": "(d) pytorch_grad_cam, 3 maps",
}

#: The second opinions, each timed as (c) audit + FGSM plus that one second opinion, through
#: ``AuditSuite.measure`` (see :mod:`bench.throughput.second`), in the order they are run.
SECOND_OPINIONS = ("auditor", "snapshots", "views", "anomaly_own", "anomaly_imagenet")
#: The second-opinion workloads: ``none`` (``measure`` alone), each second opinion, ``all``.
SO_WORKLOADS = ("none", *SECOND_OPINIONS, "all")
SO_LABELS = {
    "none": "(c) via AuditSuite.measure, no second opinion",
    "auditor": "(c) + auditor",
    "snapshots": "(c) + snapshots",
    "views": "(c) + 4 flip views",
    "anomaly_own": "(c) + PatchCore bank, own features",
    "anomaly_imagenet": "(c) + PatchCore bank, EfficientNet-Lite0",
    "all": "(c) + every second opinion",
}


def parse_second_opinions(text: str) -> tuple[str, ...]:
    """``--second-opinions``: ``none`` → ``()``, ``all`` → :data:`SECOND_OPINIONS`, else a
    comma-separated subset of it (returned in :data:`SECOND_OPINIONS` order).

    Raises:
        ValueError: an unknown name, or ``none``/``all`` mixed with other names.
    """
    names = [v.strip() for v in text.split(",") if v.strip()]
    if names == ["none"]:
        return ()
    if names == ["all"]:
        return SECOND_OPINIONS
    unknown = [n for n in names if n not in SECOND_OPINIONS]
    if unknown or not names:
        raise ValueError(
            f"unknown second opinion(s) {unknown or text!r}: use none, all or a comma-separated "
            f"subset of {', '.join(SECOND_OPINIONS)}"
        )
    return tuple(n for n in SECOND_OPINIONS if n in names)


@dataclass(frozen=True)
class BenchConfig:
    """How much to measure. :meth:`full` is the real run, :meth:`quick_preset` a smoke test.

    Attributes:
        quick: a smoke run (the report says its numbers are not a measurement).
        sizes: batch sizes B for (a)-(d).
        e2e_sizes: batch sizes for (e) (``INSPECTION_AUDIT_BATCH_SIZE``).
        e2e_workers: worker process counts for (e).
        image_size: input side in pixels (a checkpoint's own size wins).
        warmup_images: untimed images before the first timed repetition of (a)-(d): at least
            ``ceil(warmup_images / B)`` calls (see :func:`bench.throughput.workloads.time_batches`).
        reps: timed repetitions; the median images/s is reported.
        min_images: images per repetition, at least: ``ceil(min_images / B)`` calls of B images.
        n_pool: distinct images the batches cycle through.
        e2e_images: images per end-to-end repetition.
        e2e_reps: end-to-end repetitions.
        seed: seeds the model weights, the image order and torch's RNG before each workload.
        second_opinions: the second opinions timed on top of (c) (:data:`SECOND_OPINIONS`,
            empty: no second-opinion workload at all).
        auditor_size: input side in px of the random auditor (a second resnet18, seed + 1).
        n_snapshots: snapshots of the ``snapshots`` workload (random models of the production
            model's architecture and size, seeds + 10, + 11, …), as the default decision
            method ``snapshot_mean`` reads them (3: epochs 6, 9, 12 of 15).
        bank_images: ``ok`` images each PatchCore bank is built from (before timing).
        bank_coreset: patches kept in each bank (greedy k-center coreset).
    """

    quick: bool = False
    sizes: tuple[int, ...] = (1, 8, 32)
    e2e_sizes: tuple[int, ...] = (8, 32)
    e2e_workers: tuple[int, ...] = (1, 2)
    image_size: int = 224
    warmup_images: int = 8
    reps: int = 5
    min_images: int = 32
    n_pool: int = 64
    e2e_images: int = 256
    e2e_reps: int = 3
    seed: int = 0
    second_opinions: tuple[str, ...] = SECOND_OPINIONS
    auditor_size: int = 160
    n_snapshots: int = 3
    bank_images: int = 8
    bank_coreset: int = 2000

    @classmethod
    def full(cls) -> BenchConfig:
        """The full run (the defaults above)."""
        return cls()

    @classmethod
    def quick_preset(cls) -> BenchConfig:
        """The ``--quick`` smoke run: 64 px, B = 1 and 4, a few images, 2 repetitions; the
        second opinions with a 48 px auditor and banks of 200 patches from 4 images."""
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
            auditor_size=48,
            bank_images=4,
            bank_coreset=200,
        )


def batch_iters(b: int, images: int) -> int:
    """Calls needed to cover ``images`` images at batch size ``b`` (at least 1)."""
    return max(1, math.ceil(images / b))


# --- threads -------------------------------------------------------------------------------------
def all_cores() -> int:
    """CPU cores this process may run on (its affinity mask), at least 1."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def pin_env_threads(n: int = 1) -> None:
    """Set the OMP/OPENBLAS/MKL thread variables to ``n`` (inherited by subprocesses)."""
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
