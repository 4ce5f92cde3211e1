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
    last row committed, with the peak RSS of each worker's process tree;
second opinions: (c) plus one second opinion (an auditor model, 4 flip views, a PatchCore bank
    on the model's own or on EfficientNet-Lite0 features, or all of them), each one
    ``AuditSuite.measure(images, x)`` call per batch as the worker makes it, and ``measure``
    with none, so that what each adds (ms per image) is visible.

Modules: :mod:`~bench.throughput.config` (what to measure, threads),
:mod:`~bench.throughput.model` (the model under test, engines),
:mod:`~bench.throughput.workloads` ((a)-(d), images, timing with ``torch.utils.benchmark``),
:mod:`~bench.throughput.second` (the second-opinion workloads through ``AuditSuite``),
:mod:`~bench.throughput.agreement` ((b) vs (d) maps, CUDA vs CPU),
:mod:`~bench.throughput.e2e` ((e) with worker subprocesses and memory monitoring),
:mod:`~bench.throughput.report` (targets, ``performance.json``/``.md``) and
:mod:`~bench.throughput.__main__` (the command line). See ``bench/README.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bench.throughput.agreement import compare_with_gradcam, device_agreement, maps_agreement
from bench.throughput.config import (
    KIND_LABELS,
    KINDS,
    SECOND_OPINIONS,
    SO_LABELS,
    SO_WORKLOADS,
    BenchConfig,
    parse_second_opinions,
    threads,
)
from bench.throughput.model import (
    ModelSpec,
    checkpoint_model,
    make_engine,
    random_model,
    save_model_checkpoint,
)
from bench.throughput.report import (
    WHAT_WAS_TIMED,
    evaluate_targets,
    machine_info,
    render_markdown,
    write_reports,
)
from bench.throughput.second import (
    SecondOpinionSetup,
    prepare_second_opinions,
    run_second_opinions,
    suite_batches,
    synthetic_decoded,
)
from bench.throughput.workloads import (
    GradCamRunner,
    dataset_records,
    load_pool,
    make_batches,
    profile_engine,
    run_core,
    synthetic_images,
    time_batches,
    time_calls,
)

if TYPE_CHECKING:
    from bench.throughput.__main__ import main

__all__ = [
    "KINDS",
    "KIND_LABELS",
    "SECOND_OPINIONS",
    "SO_LABELS",
    "SO_WORKLOADS",
    "WHAT_WAS_TIMED",
    "BenchConfig",
    "GradCamRunner",
    "ModelSpec",
    "SecondOpinionSetup",
    "checkpoint_model",
    "compare_with_gradcam",
    "dataset_records",
    "device_agreement",
    "evaluate_targets",
    "load_pool",
    "machine_info",
    "main",
    "make_batches",
    "make_engine",
    "maps_agreement",
    "parse_second_opinions",
    "prepare_second_opinions",
    "profile_engine",
    "random_model",
    "render_markdown",
    "run_core",
    "run_second_opinions",
    "save_model_checkpoint",
    "suite_batches",
    "synthetic_decoded",
    "synthetic_images",
    "threads",
    "time_batches",
    "time_calls",
    "write_reports",
]


def __getattr__(name: str) -> Any:
    """``main`` is loaded on first use: importing ``bench.throughput.__main__`` here, eagerly,
    would make ``python -m bench.throughput`` find it already imported (runpy's warning)."""
    if name == "main":
        from bench.throughput.__main__ import main

        return main
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
