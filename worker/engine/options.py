"""The engine's options, declared once (no torch import).

:class:`EngineConfig` names every choice of the reliability score (docs/design.md §3). The
settings (``INSPECTION_AUDIT_<NAME>``), the command-line options (``--<name>``) and the
calibration sidecar's ``engine`` section are all derived from its fields
(:func:`option_fields`), so a new option is one field here.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Literal, get_args, get_type_hints

Binarize = Literal["threshold", "otsu", "topk"]
Agnostic = Literal["eigen", "mean"]
IouKind = Literal["binary", "soft"]
Attack = Literal["none", "fgsm", "pgd"]


def _option(default: Any, help: str, *, cli: str | None = None, exposed: bool = True) -> Any:
    """A dataclass field with the metadata the settings and the CLI are derived from."""
    return field(default=default, metadata={"help": help, "cli": cli, "exposed": exposed})


@dataclass(frozen=True)
class EngineConfig:
    """Every choice of the score, named so evaluations can compare them (docs/design.md §3).

    Attributes:
        binarize: ``threshold`` (θ), ``otsu`` or ``topk``.
        theta: binarisation threshold in (0, 1] on the normalised maps.
        topk: fraction of pixels kept by ``topk``, in (0, 1].
        agnostic: class-agnostic map: ``eigen`` (Eigen-CAM) or ``mean`` (channel mean).
        iou: ``binary`` (on binarised masks) or ``soft`` (on the normalised maps).
        attack: ``none``, ``fgsm`` or ``pgd``.
        epsilon: attack radius in [0, 1] pixel units (default 2/255).
        pgd_steps: PGD steps of size ε/n (≥ 1).
        target_layer: dotted module name (inside the checkpoint's backbone) to explain;
            ``None`` uses the checkpoint's own ``target_layer``.
        closed_form: use the GAP + linear closed form for Grad-CAM weights when it applies
            (an implementation choice, not exposed as a setting).

    Raises:
        ValueError: any value out of its range (the message names the option).
    """

    binarize: Binarize = _option("threshold", "map binarisation: threshold (θ), otsu or topk")
    theta: float = _option(0.5, "binarisation threshold θ in (0, 1] on the normalised maps")
    topk: float = _option(0.2, "fraction of pixels kept by topk, in (0, 1]")
    agnostic: Agnostic = _option("eigen", "class-agnostic map: eigen (Eigen-CAM) or mean")
    iou: IouKind = _option("binary", "IoU on binarised masks (binary) or on the maps (soft)")
    attack: Attack = _option("fgsm", "adversarial step toward defect: none, fgsm or pgd")
    epsilon: float = _option(2 / 255, "attack radius ε in [0, 1] pixel units")
    pgd_steps: int = _option(5, "PGD steps of size ε/n")
    target_layer: str | None = _option(
        None, "layer to explain (default: the checkpoint's target_layer)", cli="--layer"
    )
    closed_form: bool = _option(True, "closed-form Grad-CAM weights for GAP+linear", exposed=False)

    def __post_init__(self) -> None:
        for f in fields(self):
            choices = literal_choices(f.name)
            value = getattr(self, f.name)
            if choices is not None and value not in choices:
                raise ValueError(f"{f.name} must be one of {', '.join(choices)}, got {value!r}")
        if not 0.0 < self.theta <= 1.0:
            raise ValueError(f"theta must be in (0, 1], got {self.theta}")
        if not 0.0 < self.topk <= 1.0:
            raise ValueError(f"topk must be in (0, 1], got {self.topk}")
        if not 0.0 <= self.epsilon <= 1.0:
            raise ValueError(f"epsilon must be in [0, 1] pixel units, got {self.epsilon}")
        if self.pgd_steps < 1:
            raise ValueError(f"pgd_steps must be >= 1, got {self.pgd_steps}")
        if self.target_layer is not None and not self.target_layer.strip():
            raise ValueError("target_layer must be a dotted module name or None")

    def to_dict(self) -> dict[str, Any]:
        """Every option as a JSON-safe dict (the calibration sidecar's ``engine`` section)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EngineConfig:
        """Build from a dict, ignoring unknown keys (older or newer sidecars).

        Raises:
            ValueError: a value out of range.
        """
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def literal_choices(name: str) -> tuple[str, ...] | None:
    """The allowed values of a ``Literal`` option, or ``None`` for a free option."""
    hint = get_type_hints(EngineConfig)[name]
    args = get_args(hint)
    if args and all(isinstance(a, str) for a in args):
        return tuple(args)
    return None


@dataclass(frozen=True)
class OptionField:
    """One exposed engine option: what the settings and the CLI are built from."""

    name: str
    type: Any
    default: Any
    help: str
    cli: str
    choices: tuple[str, ...] | None


def option_fields() -> list[OptionField]:
    """The exposed options of :class:`EngineConfig`, in declaration order."""
    hints = get_type_hints(EngineConfig)
    out = []
    for f in fields(EngineConfig):
        if not f.metadata.get("exposed", True):
            continue
        default = f.default if f.default is not MISSING else None
        out.append(
            OptionField(
                name=f.name,
                type=hints[f.name],
                default=default,
                help=str(f.metadata.get("help", "")),
                cli=f.metadata.get("cli") or "--" + f.name.replace("_", "-"),
                choices=literal_choices(f.name),
            )
        )
    return out
