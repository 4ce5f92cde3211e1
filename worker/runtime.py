"""The per-process runtime of a worker: model, engine and calibration, loaded once, lazily.

Celery's prefork pool forks its children from the main worker process; a model loaded before the
fork would be shared copy-on-write with BLAS/OpenMP state that does not survive a fork, and CUDA
does not survive a fork at all (DESIGN §7). So:

* the main process only *validates* the checkpoint and its calibration sidecar, on the CPU
  (:func:`validate`), and throws the model away;
* each pool process loads its own :class:`Runtime` on first use (:func:`get_runtime`), after
  ``worker_process_init`` has disposed the SQLAlchemy engines inherited from the parent and
  pinned the torch/BLAS threads (:func:`init_process`);
* with ``--device cuda`` the worker runs the solo pool: one process, one GPU, no fork.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from inspection_audit.settings import Settings, get_settings

if TYPE_CHECKING:
    import torch

    from worker.checkpoint import ProductionModel
    from worker.engine.calibration import Calibration
    from worker.engine.score import EngineConfig, ReliabilityEngine

log = logging.getLogger("inspection_audit.worker")

T = TypeVar("T")


class RuntimeConfigError(RuntimeError):
    """The worker cannot run with this configuration (checkpoint, calibration, device)."""


def worker_host() -> str:
    """``hostname:pid`` of this process (recorded in every audit row)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def resolve_device(name: str) -> str:
    """``cpu``, ``cuda`` or ``cuda:N`` for a device setting (``auto``: CUDA when available).

    Raises:
        RuntimeConfigError: CUDA is asked for but not available.
    """
    if name == "cpu":
        return "cpu"
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeConfigError(
                f"device {name!r} requested but CUDA is not available "
                f"(torch {torch.__version__}, built for CUDA {torch.version.cuda})"
            )
        return name
    raise RuntimeConfigError(f"unknown device {name!r}; use cpu, cuda or auto")


def engine_config_for(settings: Settings, calibration: Calibration | None) -> EngineConfig:
    """The engine configuration to score with.

    τ is only meaningful for the configuration it was calibrated with, so a calibration
    sidecar's ``engine`` section wins over the settings; without a sidecar the settings decide.
    """
    from worker.engine.score import EngineConfig

    if calibration is not None and calibration.engine:
        return EngineConfig.from_dict(calibration.engine)
    return EngineConfig(
        binarize=settings.binarize,
        theta=settings.theta,
        topk=settings.topk,
        agnostic=settings.agnostic,
        iou=settings.iou,
        attack=settings.attack,
        epsilon=settings.epsilon,
        pgd_steps=settings.pgd_steps,
    )


@dataclass
class ModelSummary:
    """What :func:`validate` found: enough for the startup log line."""

    checkpoint: Path
    model_version: str
    arch: str
    input_size: tuple[int, int]
    in_channels: int
    calibration: Path | None
    tau: float | None
    decision_method: str

    def describe(self) -> str:
        h, w = self.input_size
        head = (
            f"model {self.checkpoint} ({self.arch}, {h}x{w}, {self.in_channels} ch, "
            f"model_version {self.model_version})"
        )
        if self.calibration is None:
            return (
                f"{head}; no calibration sidecar ({self.checkpoint.name}.calibration.json): "
                f"tau is NULL and no image is flagged as a suspected false negative "
                f"(run `inspection-audit calibrate`)"
            )
        if self.tau is None:
            return (
                f"{head}; calibration {self.calibration} has no tau for method "
                f"{self.decision_method!r}: tau is NULL and no image is flagged"
            )
        return (
            f"{head}; decision method {self.decision_method}, tau {self.tau:.6g} "
            f"from {self.calibration}"
        )


def _checkpoint_path(settings: Settings) -> Path:
    if settings.model is None:
        raise RuntimeConfigError(
            "no model configured: set INSPECTION_AUDIT_MODEL (or pass --model) to a checkpoint "
            "written by `inspection-audit train`"
        )
    return Path(settings.model).expanduser().resolve()


def validate(settings: Settings | None = None) -> ModelSummary:
    """Load the checkpoint and its calibration sidecar once on the CPU, to refuse bad ones early.

    Never touches CUDA. The loaded model is discarded.

    Raises:
        RuntimeConfigError: no model configured, a missing or invalid checkpoint, or an
            unreadable calibration sidecar / one made for another model version. The message
            is one line that names the file and the reason.
    """
    from worker.checkpoint import CheckpointError, load_checkpoint
    from worker.engine.calibration import CalibrationError, load_calibration, sidecar_path

    settings = settings or get_settings()
    path = _checkpoint_path(settings)
    try:
        pm = load_checkpoint(path, "cpu")
    except CheckpointError as exc:
        raise RuntimeConfigError(str(exc)) from exc
    try:
        cal = load_calibration(path, pm.model_version)
    except CalibrationError as exc:
        raise RuntimeConfigError(str(exc)) from exc
    try:
        engine_config_for(settings, cal)
    except (TypeError, ValueError) as exc:
        raise RuntimeConfigError(
            f"calibration {sidecar_path(path)}: bad engine section: {exc}"
        ) from exc
    summary = ModelSummary(
        checkpoint=path,
        model_version=pm.model_version,
        arch=pm.arch,
        input_size=pm.input_size,
        in_channels=pm.in_channels,
        calibration=None if cal is None else sidecar_path(path),
        tau=None if cal is None else cal.tau(settings.decision_method),
        decision_method=settings.decision_method,
    )
    del pm
    return summary


@dataclass
class Runtime:
    """Everything a worker process needs to score: built once per process by :func:`get_runtime`."""

    settings: Settings
    pm: ProductionModel
    engine: ReliabilityEngine
    calibration: Calibration | None
    device: str
    load_seconds: float
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def model_version(self) -> str:
        return self.pm.model_version

    @property
    def method(self) -> str:
        return self.settings.decision_method

    def decide(self, row: dict[str, Any]) -> tuple[float | None, float | None, bool, float | None]:
        """``(decision_score, tau, suspected_false_negative, fusion_score)`` for one engine row.

        Without a calibration sidecar: the method's raw score, τ NULL, never flagged.
        """
        from worker.engine.calibration import method_score

        method = self.method
        if self.calibration is None:
            score = None if method == "fusion" else method_score(row, method)
            return score, None, False, None
        score, tau, flagged = self.calibration.decide(method, row)
        fusion = None
        if self.calibration.fusion is not None:
            try:
                fusion = self.calibration.fusion.score(row)
            except Exception:  # a fusion model that does not fit the row is not fatal
                fusion = None
        return score, tau, flagged, fusion


def load_runtime(settings: Settings | None = None) -> Runtime:
    """Load model, engine and calibration in *this* process (call after the fork).

    Raises:
        RuntimeConfigError: as :func:`validate`, or CUDA requested but unavailable.
    """
    from worker.checkpoint import CheckpointError, load_checkpoint
    from worker.engine.calibration import CalibrationError, load_calibration, sidecar_path
    from worker.engine.score import ReliabilityEngine

    settings = settings or get_settings()
    t0 = time.perf_counter()
    path = _checkpoint_path(settings)
    device = resolve_device(settings.device)
    try:
        pm = load_checkpoint(path, device)
    except CheckpointError as exc:
        raise RuntimeConfigError(str(exc)) from exc
    try:
        cal = load_calibration(path, pm.model_version)
    except CalibrationError as exc:
        raise RuntimeConfigError(str(exc)) from exc
    for p in pm.model.parameters():
        p.requires_grad_(False)
    layer = None if cal is None else cal.engine.get("target_layer")
    if layer and layer != pm.target_layer:
        # τ was calibrated on maps of another layer: explain that one, as the sidecar says.
        try:
            pm.model.backbone.get_submodule(layer)
        except AttributeError as exc:
            raise RuntimeConfigError(
                f"calibration {sidecar_path(path)}: target_layer {layer!r} is not a module "
                "of the model"
            ) from exc
        pm.target_layer = str(layer)
    config = engine_config_for(settings, cal)
    engine = ReliabilityEngine.from_production_model(
        pm, config, max_chunk=settings.engine_max_chunk
    )
    params = {
        **config.to_dict(),
        "decision_method": settings.decision_method,
        "target_layer": pm.target_layer,
        "device": device,
        "calibration": None if cal is None else str(sidecar_path(path)),
        "calibration_split": None if cal is None else cal.split,
        "target_recall": None if cal is None else cal.target_recall,
    }
    rt = Runtime(settings, pm, engine, cal, device, time.perf_counter() - t0, params)
    log.info(
        "loaded model_version %s on %s in %.2f s (pid %d, %d torch threads)",
        pm.model_version,
        device,
        rt.load_seconds,
        os.getpid(),
        _torch_threads(),
    )
    return rt


def _torch_threads() -> int:
    import torch

    return int(torch.get_num_threads())


_lock = threading.Lock()
_runtime: tuple[int, Runtime] | None = None


def get_runtime() -> Runtime:
    """This process's :class:`Runtime`, loaded on first call (never inherited across a fork)."""
    global _runtime
    pid = os.getpid()
    with _lock:
        if _runtime is None or _runtime[0] != pid:
            _runtime = (pid, load_runtime())
        return _runtime[1]


def reset_runtime() -> None:
    """Forget this process's runtime (tests; a changed checkpoint)."""
    global _runtime
    with _lock:
        _runtime = None


def init_process(settings: Settings | None = None) -> None:
    """``worker_process_init``: drop inherited DB engines and pin torch/BLAS threads."""
    from db.session import dispose_engines
    from inspection_audit.settings import pin_threads

    settings = settings or get_settings()
    dispose_engines()
    pin_threads(settings.torch_threads)
    reset_runtime()


# --- database retries (used by worker.tasks) ------------------------------------------------------------
class DatabaseUnavailable(RuntimeError):
    """The database kept failing after every retry."""


def is_transient_db_error(exc: BaseException) -> bool:
    """A database fault worth retrying: lost connection, server down, lock timeout."""
    from sqlalchemy import exc as sa_exc

    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(
        exc, (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError)
    ) or (isinstance(exc, sa_exc.DBAPIError) and isinstance(exc.orig, ConnectionError))


def backoff_delays(retries: int, cap_s: float, base_s: float = 0.5) -> list[float]:
    """Exponential backoff with full jitter: ``uniform(0.5, 1) × min(cap, base·2^i)``."""
    return [min(cap_s, base_s * 2**i) * random.uniform(0.5, 1.0) for i in range(retries)]


def with_db_retries(fn: Callable[[], T], what: str, s: Settings | None = None) -> T:
    """Run ``fn`` (one whole transaction), retrying transient database faults with backoff.

    Raises:
        DatabaseUnavailable: still failing after ``task_max_retries`` retries.
        Exception: a non-transient error from ``fn``, unchanged.
    """
    s = s or get_settings()
    delays = backoff_delays(s.task_max_retries, float(s.retry_backoff_max_s))
    for attempt in range(len(delays) + 1):
        try:
            return fn()
        except Exception as exc:
            if not is_transient_db_error(exc):
                raise
            if attempt == len(delays):
                raise DatabaseUnavailable(
                    f"{what}: database still failing after {len(delays)} retries: "
                    f"{type(exc).__name__}: {one_line(exc)}"
                ) from exc
            delay = delays[attempt]
            log.warning(
                "%s: database fault (%s: %s); retry %d/%d in %.1f s",
                what,
                type(exc).__name__,
                one_line(exc),
                attempt + 1,
                len(delays),
                delay,
            )
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def one_line(exc: BaseException, limit: int = 500) -> str:
    """``str(exc)`` on one line, at most ``limit`` characters."""
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def to_device(x: torch.Tensor, device: str) -> torch.Tensor:
    return x if device == "cpu" else x.to(device, non_blocking=True)
