"""The per-process runtime of a worker: model, engine and calibration, loaded once, lazily.

Celery's prefork pool forks its children from the main worker process; a model loaded before the
fork would be shared copy-on-write with BLAS/OpenMP state that does not survive a fork, and CUDA
does not survive a fork at all (docs/design.md §7). So:

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
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from inspection_audit.settings import Settings

if TYPE_CHECKING:
    from worker.engine.calibration import Calibration
    from worker.engine.options import EngineConfig
    from worker.engine.score import ReliabilityEngine
    from worker.measure import AuditSuite
    from worker.model.checkpoint import ProductionModel

log = logging.getLogger("inspection_audit.worker")


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
    from worker.engine.options import EngineConfig

    if calibration is not None and calibration.engine:
        return EngineConfig.from_dict(calibration.engine)
    return settings.engine_config()


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
    #: the decision method needs the adversarial pass and the engine runs none
    blind: bool = False

    def describe(self) -> str:
        h, w = self.input_size
        head = (
            f"model {self.checkpoint} ({self.arch}, {h}x{w}, {self.in_channels} ch, "
            f"model_version {self.model_version})"
        )
        if self.blind:
            head += (
                f"; WARNING: decision method {self.decision_method} needs the adversarial pass "
                "but attack is none, so its score is NULL and no image is flagged (set attack "
                "fgsm or pgd, or choose another decision method)"
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


def _load(
    settings: Settings, device: str
) -> tuple[ProductionModel, Calibration | None, AuditSuite]:
    """Checkpoint, sidecar, engine and second opinions for ``settings`` on ``device``.

    Raises:
        RuntimeConfigError: see :func:`validate`.
    """
    from worker.engine.calibration import CalibrationError, load_calibration, sidecar_path
    from worker.engine.score import ReliabilityEngine
    from worker.measure import load_suite
    from worker.model.checkpoint import CheckpointError, load_checkpoint

    path = _checkpoint_path(settings)
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
    where = f"calibration {sidecar_path(path)}" if cal is not None else "settings"
    try:
        config = engine_config_for(settings, cal)
        engine = ReliabilityEngine.from_production_model(
            pm, config, max_chunk=settings.engine_max_chunk
        )
    except (TypeError, ValueError) as exc:
        raise RuntimeConfigError(f"{where}: bad engine options: {exc}") from exc
    try:
        suite = load_suite(
            pm,
            engine,
            auditor_models=settings.auditor_models,
            snapshot_models=settings.snapshot_models,
            views=settings.views,
            anomaly_banks=settings.anomaly_banks,
            device=device,
        )
    except (CheckpointError, ValueError, RuntimeError) as exc:
        raise RuntimeConfigError(f"second opinions: {exc}") from exc
    if cal is not None and cal.second_opinions != suite.describe():
        from worker.engine.methods import REGISTRY

        if REGISTRY.get(settings.decision_method).family in ("second_opinion", "rule"):
            raise RuntimeConfigError(
                f"calibration {sidecar_path(path)} was made with second opinions "
                f"{cal.second_opinions or 'none'}, the settings give {suite.describe() or 'none'}: "
                f"τ of {settings.decision_method} is not valid for them (calibrate again)"
            )
    return pm, cal, suite


def validate(settings: Settings) -> ModelSummary:
    """Load the checkpoint and its calibration sidecar once on the CPU, to refuse bad ones early.

    Never touches CUDA. The loaded model is discarded.

    Raises:
        RuntimeConfigError: no model configured, a missing or invalid checkpoint, an
            unreadable calibration sidecar or one made for another model version, or engine
            options (from the sidecar or the settings) the engine refuses. The message is one
            line that names the file and the reason.
    """
    from worker.engine.calibration import sidecar_path
    from worker.engine.methods import REGISTRY

    pm, cal, suite = _load(settings, "cpu")
    path = _checkpoint_path(settings)
    _check_measured(settings.decision_method, suite)
    blind = (
        REGISTRY.get(settings.decision_method).needs_adversarial
        and suite.engine.config.attack == "none"
    )
    return ModelSummary(
        blind=blind,
        checkpoint=path,
        model_version=pm.model_version,
        arch=pm.arch,
        input_size=pm.input_size,
        in_channels=pm.in_channels,
        calibration=None if cal is None else sidecar_path(path),
        tau=None if cal is None else cal.tau(settings.decision_method),
        decision_method=settings.decision_method,
    )


def _check_measured(method: str, suite: AuditSuite) -> None:
    """Refuse a second-opinion decision method whose measurement the suite never makes (its
    auditors, snapshots, views or bank are not turned on): every image would score NULL and
    none would ever be flagged. One synthetic image is measured to find out.

    Raises:
        RuntimeConfigError: the method's score is missing.
    """
    import torch

    from worker.engine.methods import REGISTRY

    m = REGISTRY.get(method)
    if m.family != "second_opinion":
        return
    h, w = suite.pm.input_size
    gen = torch.Generator().manual_seed(0)
    image = (0.5 + 0.1 * torch.randn(suite.pm.in_channels, h, w, generator=gen)).clamp(0, 1)
    row = suite.measure([image]).rows[0]
    if m.score(row) is None:
        raise RuntimeConfigError(
            f"decision method {method} reads a second opinion the settings do not turn on "
            f"(they give {suite.describe() or 'none'}): every image would score NULL and none "
            "would be flagged; set its auditor, snapshot, views or anomaly bank setting, or "
            "choose another decision method"
        )


class Decision(NamedTuple):
    """The decision for one image: its score under the decision method, τ, and the flag."""

    score: float | None
    tau: float | None
    flagged: bool


@dataclass
class Runtime:
    """Everything a worker process needs to score: built once per process by :func:`get_runtime`."""

    settings: Settings
    pm: ProductionModel
    suite: AuditSuite
    calibration: Calibration | None
    device: str
    load_seconds: float
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def engine(self) -> ReliabilityEngine:
        return self.suite.engine

    @property
    def model_version(self) -> str:
        return self.pm.model_version

    @property
    def method(self) -> str:
        return self.settings.decision_method

    def scores(self, measurements: dict[str, Any]) -> dict[str, float | None]:
        """Every registered method's score for one image (fitted methods need the sidecar)."""
        from worker.engine.methods import REGISTRY

        if self.calibration is None:
            return REGISTRY.scores(measurements)
        return self.calibration.scores(measurements)

    def decide(self, measurements: dict[str, Any]) -> Decision:
        """``(decision_score, tau, suspected_false_negative)`` for one image's measurements.

        Without a calibration sidecar: the method's own score (``None`` for a fitted method),
        τ NULL, never flagged.
        """
        from worker.engine.methods import REGISTRY

        if self.calibration is None:
            return Decision(REGISTRY.get(self.method).score(measurements), None, False)
        return Decision(*self.calibration.decide(self.method, measurements))


def load_runtime(settings: Settings) -> Runtime:
    """Load model, engine and calibration in *this* process (call after the fork).

    Raises:
        RuntimeConfigError: as :func:`validate`, or CUDA requested but unavailable.
    """
    from worker.engine.calibration import sidecar_path

    t0 = time.perf_counter()
    device = resolve_device(settings.device)
    pm, cal, suite = _load(settings, device)
    engine = suite.engine
    path = _checkpoint_path(settings)
    params = {
        **engine.config.to_dict(),
        **({"second_opinions": suite.describe()} if suite.describe() else {}),
        "decision_method": settings.decision_method,
        "target_layer": engine.target_layer_name,
        "device": device,
        "calibration": None if cal is None else str(sidecar_path(path)),
        "calibration_split": None if cal is None else cal.split,
        "target_recall": None if cal is None else cal.target_recall,
        # τ of every method (the review page shows each score against its own τ)
        "taus": {} if cal is None else {m: cal.tau(m) for m in cal.methods},
        # what the decision method's τ can honestly promise (docs/design.md §3.7)
        "recall_promise": _promise(cal, settings.decision_method),
    }
    rt = Runtime(settings, pm, suite, cal, device, time.perf_counter() - t0, params)
    log.info(
        "loaded model_version %s on %s in %.2f s (pid %d, %d torch threads)",
        pm.model_version,
        device,
        rt.load_seconds,
        os.getpid(),
        _torch_threads(),
    )
    return rt


def _promise(cal: Calibration | None, method: str) -> dict[str, Any] | None:
    """The decision method's recall promise from the sidecar: the misses τ was set on and the
    one-sided 95 % lower bound on recall (None without a calibration or an older sidecar)."""
    entry = None if cal is None else cal.methods.get(method)
    if not entry or entry.get("recall_lower_bound") is None:
        return None
    return {
        "n_false_negatives": entry.get("n_positives"),
        "caught": entry.get("n_false_negatives_caught"),
        "recall_lower_bound": entry["recall_lower_bound"],
        "split": cal.split if cal is not None else None,
    }


def _torch_threads() -> int:
    import torch

    return int(torch.get_num_threads())


_lock = threading.Lock()
_runtime: tuple[int, Runtime] | None = None


def get_runtime(settings: Settings) -> Runtime:
    """This process's :class:`Runtime` for ``settings``, loaded on first call (never inherited
    across a fork)."""
    global _runtime
    pid = os.getpid()
    with _lock:
        if _runtime is None or _runtime[0] != pid:
            _runtime = (pid, load_runtime(settings))
        return _runtime[1]


def reset_runtime() -> None:
    """Forget this process's runtime (tests; a changed checkpoint)."""
    global _runtime
    with _lock:
        _runtime = None


def init_process(settings: Settings) -> None:
    """``worker_process_init``: drop inherited DB engines and pin torch/BLAS threads."""
    from db.session import dispose_engines
    from inspection_audit.settings import pin_threads

    dispose_engines()
    pin_threads(settings.torch_threads)
    reset_runtime()
