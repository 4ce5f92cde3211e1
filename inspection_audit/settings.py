"""The one settings class of inspection-audit.

Every knob comes from the environment (prefix ``INSPECTION_AUDIT_``) or a ``.env`` file;
credentials only ever come from there. With nothing set, the *embedded default* runs with no
server at all: a SQLite file and kombu's filesystem transport under ``INSPECTION_AUDIT_HOME``
(default: a fixed per-user folder, :func:`default_home`). Given Redis and PostgreSQL URLs the same code is the
production deployment.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, create_model, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from worker.engine.methods import REGISTRY
from worker.engine.options import EngineConfig, option_fields


def default_home() -> Path:
    """The embedded default's folder: ``$XDG_DATA_HOME/inspection-audit``, else
    ``~/.local/share/inspection-audit`` (one fixed folder per user, whatever the current
    directory)."""
    xdg = os.environ.get("XDG_DATA_HOME", "").strip()
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".local" / "share"
    return base / "inspection-audit"


#: One setting per exposed engine option (``INSPECTION_AUDIT_THETA`` …), derived from
#: :class:`worker.engine.options.EngineConfig`: the options are declared once, there.
_EngineSettings: type[BaseSettings] = create_model(  # type: ignore[call-overload]
    "_EngineSettings",
    __base__=BaseSettings,
    **{o.name: (o.type, Field(default=o.default, description=o.help)) for o in option_fields()},
)


class Settings(_EngineSettings):  # type: ignore[misc,valid-type]
    """Configuration of producer, worker and database (env prefix ``INSPECTION_AUDIT_``).

    The engine options (``attack``, ``epsilon``, ``theta`` … ``target_layer``) are fields too,
    derived from :class:`~worker.engine.options.EngineConfig`; :meth:`engine_config` gathers
    them, and validation refuses a combination the engine would refuse.
    """

    model_config = SettingsConfigDict(
        env_prefix="INSPECTION_AUDIT_", env_file=".env", extra="ignore", frozen=True
    )

    # --- where things live -------------------------------------------------------------
    home: Path = Field(
        default_factory=lambda: default_home(),
        description="Folder of the embedded default: SQLite file, filesystem broker, cached "
        "models. Default: $XDG_DATA_HOME/inspection-audit, else ~/.local/share/inspection-audit.",
    )
    broker_url: str | None = Field(
        default=None,
        description="Celery broker, e.g. redis://127.0.0.1:6379/0. Default: filesystem.",
    )
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL, e.g. postgresql+psycopg://postgres@127.0.0.1/inspection_audit. "
        "Default: SQLite file under home.",
    )
    model: Path | None = Field(default=None, description="Checkpoint the workers audit with.")
    image_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="Folders an image path in a message must lie under (comma-separated).",
    )
    results_dir: Path | None = Field(
        default=None, description="Where overlay PNGs of flagged images go. Default: home/results."
    )
    dataset: Path | None = Field(default=None, description="Dataset folder for `demo`.")

    # --- queue ---------------------------------------------------------------------------
    queue: str = "inspection-audit"
    visibility_timeout_s: int = Field(
        default=3600, ge=1, description="Redis visibility timeout (counted from delivery)."
    )
    max_redeliveries: int = Field(
        default=3, ge=0, description="Deliveries after which a message becomes an error row."
    )
    task_max_retries: int = Field(default=8, ge=0, description="Retries on database faults.")
    retry_backoff_max_s: int = Field(default=30, ge=1)
    prefetch_multiplier: int = Field(default=1, ge=1)
    batch_size: int = Field(default=8, ge=1, description="Micro-batch: images per engine call.")
    batch_wait_ms: int = Field(default=200, ge=0, description="Micro-batch: longest wait.")
    enqueue_timeout_s: float = Field(
        default=10.0, gt=0, description="How long a producer retries a broker that is down."
    )
    outbox: bool = Field(
        default=False,
        description="Producer: record each inspection as queued in the database's outbox "
        "(INSPECTION_AUDIT_DATABASE_URL) before sending it, so that `inspection-audit "
        "reconcile` finds and resends what a broker lost. The HTTP ingest always does.",
    )
    reconcile_after_s: int = Field(
        default=7200,
        ge=0,
        description="`inspection-audit reconcile` resends an outbox entry still without an "
        "audit row this many seconds after its last send. Keep it above the longest wait in "
        "the queue plus the visibility timeout: a message resent too early is scored twice "
        "(one row, a duplicate counted).",
    )
    rabbitmq_delivery_limit: int = Field(
        default=10,
        ge=1,
        description="RabbitMQ only: the quorum queue's x-delivery-limit. A message returned "
        "to the queue more often (its process or worker died, the connection dropped) is "
        "dead-lettered by the broker and recorded by a worker. Keep it above "
        "MAX_REDELIVERIES + 1, so that the worker's own cap answers first.",
    )

    # --- worker ----------------------------------------------------------------------------
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    torch_threads: int = Field(
        default=1, ge=1, description="torch/BLAS threads per worker process."
    )
    score_defect_predictions: bool = Field(
        default=False,
        description="Also run the full score on images the line predicted `defect` "
        "(default: a cheap row with p_defect only).",
    )
    save_overlays: bool = True
    engine_max_chunk: int = Field(
        default=8,
        ge=1,
        description="Images per engine pass inside a micro-batch (bounds the FGSM graph's memory).",
    )

    # --- second opinions (each off when empty; see worker/measure.py) ----------------------
    auditor_models: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="Auditor checkpoints beside the production model (comma-separated paths): "
        "trained on the same labelled data, made to fail differently.",
    )
    snapshot_models: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="Snapshot checkpoints of the production model's own training run "
        "(comma-separated): a cheap ensemble.",
    )
    views: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Test-time views of the production model (comma-separated, e.g. "
        "identity,hflip,vflip,hvflip); only views its recipe was trained to be invariant to.",
    )
    anomaly_banks: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="PatchCore banks written by `inspection-audit fit-bank` (comma-separated).",
    )

    # --- limits on input ----------------------------------------------------------------------
    max_image_bytes: int = Field(default=20_000_000, ge=1)
    max_inline_bytes: int = Field(default=2_000_000, ge=1)
    max_image_pixels: int = Field(default=40_000_000, ge=1)
    min_image_side: int = Field(default=16, ge=1)
    max_aspect_ratio: float = Field(default=20.0, ge=1.0)

    # --- review station (inspection_audit/web) -----------------------------------------------
    web_users: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Reviewer accounts, comma-separated `name:hash` (hash from "
        "`inspection-audit web hash-password`).",
    )
    web_users_file: Path | None = Field(
        default=None,
        description="File of `name:hash` lines (default: home/web-users when it exists).",
    )
    api_tokens: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="API clients, comma-separated `name:hash` (from `inspection-audit web "
        "add-token`); a client sends `Authorization: Bearer <token>`.",
    )
    api_tokens_file: Path | None = Field(
        default=None,
        description="File of `name:hash` token lines (default: home/api-tokens when it exists).",
    )
    web_secret: SecretStr | None = Field(
        default=None,
        description="Key that signs session cookies (default: a random key kept in "
        "home/web-secret).",
    )
    upload_dir: Path | None = Field(
        default=None,
        description="Folder under an image root where HTTP ingest keeps uploaded images "
        "(default: none, uploads travel inline as base64 within max_inline_bytes).",
    )
    health_stall_s: float = Field(
        default=300.0,
        gt=0,
        description="`inspection-audit health` fails when inspections wait and no row was "
        "written for longer than this.",
    )
    overlay_all: bool = Field(
        default=False,
        description="Save the review maps for every fully scored image, not only flagged ones.",
    )

    # --- decision ---------------------------------------------------------------------------
    decision_method: str = Field(
        default="snapshot_mean",
        description="Which score and calibrated τ decide `suspected_false_negative` "
        "(a name in worker.engine.methods.REGISTRY). The default, `snapshot_mean` (P(defect) "
        "averaged over INSPECTION_AUDIT_SNAPSHOT_MODELS), flagged the fewest true negatives at "
        "100 % FN recall out of fold on magnetic tile (docs/results/README.md); it needs "
        "snapshots (`train --snapshot-epochs`), and a worker without them refuses to start.",
    )

    @field_validator("decision_method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        if value not in REGISTRY:
            raise ValueError(
                f"unknown decision method {value!r}; choose from {', '.join(REGISTRY.names())}"
            )
        return value

    @model_validator(mode="after")
    def _engine_options_valid(self) -> Settings:
        self.engine_config()  # the engine's own checks, with its own messages
        return self

    def engine_config(self) -> EngineConfig:
        """The engine options of these settings.

        Raises:
            ValueError: an option the engine refuses (e.g. ``theta = 0``).
        """
        return EngineConfig(**{o.name: getattr(self, o.name) for o in option_fields()})

    @field_validator(
        "image_roots",
        "auditor_models",
        "snapshot_models",
        "views",
        "anomaly_banks",
        "web_users",
        "api_tokens",
        mode="before",
    )
    @classmethod
    def _split_roots(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.strip()
            if value.startswith("["):
                import json

                return json.loads(value)
            return [p.strip() for p in value.split(",") if p.strip()]
        return value

    # --- derived -------------------------------------------------------------------------------
    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def broker_folder(self) -> Path:
        return self.home.resolve() / "broker"

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.home.resolve() / 'audit.sqlite3').as_posix()}"

    @property
    def resolved_results_dir(self) -> Path:
        return (self.results_dir or self.home / "results").resolve()


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()


def pin_threads(n: int) -> None:
    """Pin OpenMP/BLAS and torch threads of this process to ``n`` (docs/design.md §7).

    Default BLAS threading on a small machine made one SVD take ~0.7 s instead of ~9 ms.
    Must run before the first BLAS call to take full effect.
    """
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    import torch

    torch.set_num_threads(n)
