"""The evaluation protocol of docs/design.md §4 (``inspection-audit evaluate``, ``calibrate``).

Population: images the production model predicts ``ok``. Positives: false negatives (label
``defect``); negatives: true negatives (label ``ok``). For every method of the registry: AUROC
(FN vs TN) with a bootstrap 95 % interval, the TN flag rate at 100 % FN recall (with a
bootstrap interval) and at 95 %, FN recall at the calibrated τ (Clopper–Pearson interval) and
the recall τ promised at calibration (one-sided 95 % lower bound).

Second opinions (:class:`SecondOpinionPlan`): auditor models, snapshots, test-time views and
PatchCore banks, measured by the same :class:`worker.measure.AuditSuite` the worker uses.

With ``folds=K`` every image is scored by a model that never saw it: K production models, each
selected and calibrated on an inner validation fifth of its own training folds; every second
opinion of a fold (auditors trained on the fold's training data only, snapshots of the fold's
own run, banks of its training ``ok`` images with layers chosen on its inner validation fifth)
and every fitted rule is built on that fold's data only. Fold models and banks are cached in
``folds_dir`` so every candidate is scored on the same models.
"""

from __future__ import annotations

import csv
import json
import platform
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from inspection_audit.lab.dataset import Record, read_manifest, stratified_folds
from inspection_audit.lab.plots import plot_roc, save_panel
from inspection_audit.lab.report import write_report
from inspection_audit.lab.scoring import Scored, engine_record, make_engine, score_records
from inspection_audit.lab.stats import compute_metrics, pointing_game
from inspection_audit.lab.training import Recipe, recipe_from_dict, train_model
from worker.engine.calibration import Calibration, calibrate, sidecar_path
from worker.engine.methods import REGISTRY
from worker.engine.options import EngineConfig
from worker.engine.score import ROW_KEYS
from worker.measure import AuditSuite, BankScorer
from worker.model.checkpoint import ProductionModel, load_checkpoint

#: Maps a reviewer sees, scored by the pointing game when present.
POINTING_MAPS = ("gradcam_defect", "agnostic", "anomaly_imagenet", "anomaly_own")


@dataclass(frozen=True)
class SecondOpinionPlan:
    """The second opinions an evaluation measures.

    Attributes:
        auditor_recipes: fold mode: one auditor per recipe, trained on each fold's training
            data (seed + fold).
        auditors: single-model mode: auditor checkpoints.
        snapshot_epochs: fold mode: the production run's snapshots after these epochs.
        snapshots: single-model mode: snapshot checkpoints.
        views: test-time views of the production model (e.g. identity, hflip, vflip, hvflip).
        banks: fold mode: bank kinds (``imagenet``, ``own``) fitted per fold;
            single-model mode: bank files.
    """

    auditor_recipes: tuple[Recipe, ...] = ()
    auditors: tuple[Path, ...] = ()
    snapshot_epochs: tuple[int, ...] = ()
    snapshots: tuple[Path, ...] = ()
    views: tuple[str, ...] = ()
    banks: tuple[str, ...] = ()

    def describe(self) -> dict[str, Any]:
        """A JSON-safe summary for the report."""
        return {
            "auditor_recipes": [r.canonical() for r in self.auditor_recipes],
            "auditors": [str(p) for p in self.auditors],
            "snapshot_epochs": list(self.snapshot_epochs),
            "snapshots": [str(p) for p in self.snapshots],
            "views": list(self.views),
            "banks": list(self.banks),
        }


@dataclass
class FoldArtifacts:
    """What one evaluated model (or fold) contributes to the pooled metrics."""

    pm: ProductionModel
    suite: AuditSuite
    cal: Calibration
    bank_choices: dict[str, Any] = field(default_factory=dict)


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


def _mask(record: Record) -> np.ndarray[Any, Any] | None:
    if record.mask_path is None or not record.mask_path.is_file():
        return None
    with Image.open(record.mask_path) as im:
        return np.asarray(im.convert("L")) > 127


def write_overlays(
    out: Path,
    scored: Scored,
    cals: Sequence[Calibration],
    row_cal: np.ndarray,
    method: str,
    metrics: dict[str, Any],
) -> list[str]:
    """Panels (image + every map, the image's own aspect ratio, mask outlined) of a caught and
    a missed false negative and a flagged and an unflagged true negative under ``method``,
    and of the miss that blocks each of the best methods at 100 % FN recall.

    Only rows whose maps were kept (false negatives, and the true negatives picked here) can be
    drawn; a pick without maps is skipped.
    """
    if any(c.tau(method) is None for c in cals):
        method = "iou_gap"
    dec = [cals[row_cal[i]].decide(method, r) for i, r in enumerate(scored.rows)]
    p = np.array([r["p_defect"] for r in scored.rows])
    y = scored.labels
    ok = p < 0.5
    cand = {
        "caught_false_negative": [i for i in range(len(p)) if ok[i] and y[i] == 1 and dec[i][2]],
        "missed_false_negative": [
            i for i in range(len(p)) if ok[i] and y[i] == 1 and not dec[i][2]
        ],
        "flagged_true_negative": [i for i in scored.maps if ok[i] and y[i] == 0 and dec[i][2]],
        "unflagged_true_negative": [
            i for i in scored.maps if ok[i] and y[i] == 0 and not dec[i][2]
        ],
    }
    picks: dict[str, int] = {}
    for name, idx in cand.items():
        idx = [i for i in idx if i in scored.maps]
        if idx:
            picks[name] = (
                max(idx, key=lambda i: _or(dec[i][0], -1e9))
                if name != "unflagged_true_negative"
                else min(idx, key=lambda i: _or(dec[i][0], 0.0))
            )
    ranked = sorted(
        (
            (v["tn_flag_rate_at_full_recall"], m)
            for m, v in metrics["methods"].items()
            if v.get("tn_flag_rate_at_full_recall") is not None and "blocking_miss" in v
        ),
    )
    for _rate, m in ranked[:4]:
        picks[f"blocking_miss_{m}"] = int(metrics["methods"][m]["blocking_miss"]["row"])
    written = []
    for name, i in picks.items():
        if i not in scored.maps:
            continue
        k = int(row_cal[i])
        r = scored.rows[i]
        shown = (
            method if not name.startswith("blocking_miss_") else name.removeprefix("blocking_miss_")
        )
        s = cals[k].score(shown, r)
        t = cals[k].tau(shown)
        title = (
            f"{name.replace('_', ' ')}: {r['path']} ({r['defect_type'] or r['label']}), "
            f"p_defect {r['p_defect']:.4f}, {shown} {_or(s, float('nan')):.3f} "
            f"vs τ {_or(t, float('nan')):.3f} (fold {k})"
        )
        path = out / f"overlay_{name}.png"
        save_panel(scored.images[i], scored.maps[i], path, title, _mask(scored.records[i]))
        written.append(path.name)
    return written


def _reusable(ckpt: Path, recipe: Recipe) -> bool:
    """Whether ``ckpt`` was trained with ``recipe`` (keys added to :class:`Recipe` since it was
    written take their defaults, so older fold models stay reusable)."""
    if not ckpt.is_file():
        return False
    try:
        saved = torch.load(ckpt, map_location="cpu", weights_only=True).get("recipe")
        return bool(recipe_from_dict(saved).canonical() == recipe.canonical())
    except Exception:
        return False


def _ensure(
    ckpt: Path,
    tr: list[Record],
    va: list[Record],
    recipe: Recipe,
    *,
    version: str,
    snapshot_epochs: tuple[int, ...] = (),
    extra: dict[str, Any] | None = None,
    show_progress: bool = True,
) -> ProductionModel:
    if not _reusable(ckpt, recipe):
        train_model(
            tr,
            va,
            ckpt,
            recipe,
            snapshot_epochs=snapshot_epochs,
            show_progress=show_progress,
            model_version=version,
            extra=extra,
        )
    pm = load_checkpoint(ckpt)
    for p in pm.model.parameters():
        p.requires_grad_(False)
    return pm


def _fold_banks(
    kinds: Sequence[str],
    pm: ProductionModel,
    tr: list[Record],
    va: list[Record],
    folds_dir: Path,
    f: int,
    show_progress: bool,
) -> tuple[list[BankScorer], dict[str, Any]]:
    from inspection_audit.lab.banks import choose_layers, scorer_for
    from worker.engine.anomaly import BankError, PatchBank

    scorers, choices = [], {}
    for kind in kinds:
        path = folds_dir / f"bank-{kind}-fold{f}.pt"
        info = path.with_suffix(".json")
        expected = pm.model_version if kind == "own" else _imagenet_version()
        try:
            bank = PatchBank.load(path, expected)
            choice = json.loads(info.read_text())
        except (BankError, OSError, ValueError):
            fit = choose_layers(kind, pm, tr, va, seed=f, show_progress=show_progress)
            bank = fit.bank
            bank.save(path)
            choice = {"layers": list(fit.layers), "val_auroc": fit.candidates}
            info.write_text(json.dumps(choice, indent=2))
        scorers.append(scorer_for(kind, pm, bank))
        choices[kind] = choice
    return scorers, choices


def _imagenet_version() -> str:
    from worker.engine.backbones import efficientnet_lite0_version

    return efficientnet_lite0_version()


def calibrate_on(
    suite: AuditSuite,
    records: list[Record],
    *,
    split: str,
    target_recall: float = 1.0,
    description: str | None = None,
    show_progress: bool = True,
) -> Calibration:
    """Score labelled ``records`` with ``suite`` and fit and pick τ for every method (the
    engine's options, target layer and second opinions are recorded: τ is only valid for
    them)."""
    scored = score_records(
        suite,
        suite.pm,
        records,
        description=description or f"calibrating on {split}",
        show_progress=show_progress,
    )
    return calibrate(
        scored.rows,
        scored.labels.tolist(),
        model_version=suite.pm.model_version,
        engine=engine_record(suite.engine),
        split=split,
        target_recall=target_recall,
        second_opinions=suite.describe(),
    )


def calibrate_checkpoint(
    manifest: str | Path,
    model: str | Path,
    *,
    split: str = "val",
    target_recall: float = 1.0,
    config: EngineConfig = EngineConfig(),
    plan: SecondOpinionPlan = SecondOpinionPlan(),
    show_progress: bool = True,
) -> Calibration:
    """Score ``split`` with ``model`` (and ``plan``'s second opinions given as files), pick τ
    for every method and write the sidecar next to the checkpoint."""
    pm = load_checkpoint(model)
    suite = _single_suite(pm, config, plan)
    cal = calibrate_on(
        suite,
        read_manifest(manifest, split),
        split=split,
        target_recall=target_recall,
        show_progress=show_progress,
    )
    cal.save(sidecar_path(model))
    return cal


def _single_suite(pm: ProductionModel, config: EngineConfig, plan: SecondOpinionPlan) -> AuditSuite:
    from worker.measure import load_suite

    for p in pm.model.parameters():
        p.requires_grad_(False)
    return load_suite(
        pm,
        make_engine(pm, config),
        auditor_models=plan.auditors,
        snapshot_models=plan.snapshots,
        views=plan.views,
        anomaly_banks=[Path(b) for b in plan.banks],
    )


def _keep_maps(record: Record) -> bool:
    return record.label == "defect"


def evaluate(
    manifest: str | Path,
    out: str | Path,
    *,
    model: str | Path | None = None,
    split: str = "test",
    calibration_split: str = "val",
    folds: int = 0,
    recipe: Recipe | None = None,
    config: EngineConfig = EngineConfig(),
    plan: SecondOpinionPlan = SecondOpinionPlan(),
    target_recall: float = 1.0,
    decision_method: str = "iou_gap_adv",
    seed: int = 0,
    n_boot: int = 1000,
    command: str = "inspection-audit evaluate",
    show_progress: bool = True,
    folds_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Run the evaluation protocol and write ``metrics.json``, ``report.md``, ``roc.png``,
    ``rows.csv`` and overlays.

    Without ``folds``: score ``split`` with ``model``, τ from ``calibration_split`` (the model's
    sidecar is rewritten only by ``calibrate``, never here). With ``folds=K ≥ 2``: pool all
    splits, train K models with ``recipe`` (reusing ``<folds_dir>/fold<i>.pt``, default
    ``out/folds``, when present and trained with the same recipe) and the plan's auditors, fit
    the plan's banks, calibrate each fold on its own inner validation split, and score every
    image out of fold.

    Raises:
        ValueError: neither a model nor folds given; ManifestError for a bad manifest.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    facts: dict[str, Any] = {
        "manifest": str(manifest),
        "engine": json.dumps(config.to_dict()),
        "second opinions": json.dumps(plan.describe()),
    }
    arts: list[FoldArtifacts] = []
    if folds and folds >= 2:
        recipe = recipe or Recipe()
        fdir = Path(folds_dir or out / "folds")
        fdir.mkdir(parents=True, exist_ok=True)
        records = read_manifest(manifest)
        assign = stratified_folds(records, folds, seed)
        parts: list[Scored] = []
        row_cal: list[int] = []
        for f in range(folds):
            train_all = [r for r, a in zip(records, assign, strict=True) if a != f]
            held = [r for r, a in zip(records, assign, strict=True) if a == f]
            inner = stratified_folds(train_all, 5, seed + 100 + f)
            tr = [r for r, a in zip(train_all, inner, strict=True) if a != 0]
            va = [r for r, a in zip(train_all, inner, strict=True) if a == 0]
            fold_recipe = replace(recipe, seed=recipe.seed + f)
            pm = _ensure(
                fdir / f"fold{f}.pt",
                tr,
                va,
                fold_recipe,
                version=f"{fold_recipe.arch}-fold{f}of{folds}-s{fold_recipe.seed}",
                snapshot_epochs=plan.snapshot_epochs,
                extra={"fold": f, "folds": folds},
                show_progress=show_progress,
            )
            auditors = []
            for k, ar in enumerate(plan.auditor_recipes):
                a_recipe = replace(ar, seed=ar.seed + f)
                auditors.append(
                    _ensure(
                        fdir / f"auditor{k}-fold{f}.pt",
                        tr,
                        va,
                        a_recipe,
                        version=f"{a_recipe.arch}-auditor{k}-fold{f}of{folds}-s{a_recipe.seed}",
                        extra={"fold": f, "folds": folds, "auditor": k},
                        show_progress=show_progress,
                    )
                )
            snapshots = [
                load_checkpoint(fdir / f"fold{f}-epoch{e}.pt")
                for e in plan.snapshot_epochs
                if (fdir / f"fold{f}-epoch{e}.pt").is_file()
            ]
            banks, choices = _fold_banks(plan.banks, pm, tr, va, fdir, f, show_progress)
            suite = AuditSuite(
                pm,
                make_engine(pm, config),
                {"auditor": auditors, "snapshot": snapshots},
                plan.views,
                banks,
            )
            cal = calibrate_on(
                suite,
                va,
                split=f"fold{f}-inner-val",
                target_recall=target_recall,
                description=f"fold {f + 1}/{folds}: calibrating",
                show_progress=show_progress,
            )
            parts.append(
                score_records(
                    suite,
                    pm,
                    held,
                    description=f"fold {f + 1}/{folds}: scoring",
                    show_progress=show_progress,
                    keep_maps=_keep_maps,
                )
            )
            arts.append(FoldArtifacts(pm, suite, cal, choices))
            row_cal += [f] * len(held)
        scored = _pool(parts)
        rc = np.asarray(row_cal)
        facts.update(
            {
                "folds": folds,
                "recipe": json.dumps(recipe.canonical()),
                "models": [a.pm.model_version for a in arts],
                "auditors": [
                    [m.model_version for m in a.suite.groups.get("auditor", [])] for a in arts
                ],
                "bank layers (chosen on each fold's inner val)": json.dumps(
                    [a.bank_choices for a in arts]
                ),
            }
        )
        notes += [
            f"{folds}-fold stratified out-of-fold evaluation over all {len(records)} images (all "
            "manifest splits pooled); each image is scored by the one model that never saw it.",
            "Each fold model was selected (best epoch) and calibrated (τ, fusion, rules) on an "
            "inner validation split (one fifth of its own training folds); its auditors were "
            "trained on the same training data, its banks built from the same training ok "
            "images with layers chosen on the inner validation split; held-out fold images "
            "were used for nothing but scoring.",
        ]
        size = recipe.input_size
        title = f"{folds}-fold out-of-fold, {recipe.arch} {size[0]}x{size[1]} px"
    else:
        if model is None:
            raise ValueError("evaluate needs --model, or --folds K to train its own models")
        pm = load_checkpoint(model)
        suite = _single_suite(pm, config, plan)
        cal = calibrate_on(
            suite,
            read_manifest(manifest, calibration_split),
            split=calibration_split,
            target_recall=target_recall,
            show_progress=show_progress,
        )
        scored = score_records(
            suite,
            pm,
            read_manifest(manifest, split),
            description=f"scoring {split}",
            show_progress=show_progress,
            keep_maps=_keep_maps,
        )
        arts = [FoldArtifacts(pm, suite, cal)]
        rc = np.zeros(len(scored.rows), dtype=np.int64)
        facts.update(
            {
                "model": str(model),
                "model_version": pm.model_version,
                "split": split,
                "calibration_split": calibration_split,
                "target_layer": suite.engine.target_layer_name,
                "input_size": list(pm.input_size),
                "recipe": json.dumps(pm.extra.get("recipe")),
            }
        )
        notes.append(
            f"τ of every method, the fusion weights and the rules were fitted on "
            f"`{calibration_split}` only; `{split}` was used for nothing but these figures."
        )
        title = f"{pm.model_version} on {split}"
    cals = [a.cal for a in arts]
    if any(c.tau(decision_method) is None for c in cals):
        decision_method = "iou_gap"
    notes.append(
        f"Target FN recall for τ: {target_recall}. Overlays use decision method `{decision_method}`."
    )
    metrics = compute_metrics(scored.rows, scored.labels, cals, rc, n_boot)
    for v in metrics["methods"].values():
        miss = v.get("blocking_miss")
        if miss is not None:
            row = scored.rows[miss["row"]]
            miss.update(path=row["path"], defect_type=row["defect_type"], p_defect=row["p_defect"])
    metrics["pointing_game"] = _pointing(scored, cals, rc, decision_method)
    metrics["calibration"] = [c.to_dict() for c in cals]
    metrics["engine"] = config.to_dict()
    metrics["target_layer"] = arts[0].suite.engine.target_layer_name
    metrics["second_opinions"] = plan.describe()
    metrics["decision_method"] = decision_method
    plot_roc(scored.rows, scored.labels, cals, rc, out / "roc.png", title)
    metrics["overlays"] = write_overlays(out, scored, cals, rc, decision_method, metrics)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=_jsonable))
    write_rows_csv(out / "rows.csv", scored, cals, rc)
    context = {
        "title": title,
        "facts": facts,
        "notes": notes,
        "command": command,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}",
    }
    write_report(out, metrics, context)
    return metrics


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, Path):
        return str(v)
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")


def _pool(parts: Sequence[Scored]) -> Scored:
    records: list[Record] = []
    rows: list[dict[str, Any]] = []
    maps: dict[int, Any] = {}
    images: dict[int, Any] = {}
    for part in parts:
        base = len(rows)
        records += part.records
        rows += part.rows
        maps.update({base + i: m for i, m in part.maps.items()})
        images.update({base + i: m for i, m in part.images.items()})
    labels = np.concatenate([p.labels for p in parts])
    return Scored(records, rows, labels, maps, images)


def _pointing(
    scored: Scored, cals: Sequence[Calibration], row_cal: np.ndarray, method: str
) -> dict[str, Any]:
    """Pointing game on the false negatives with a mask: all of them, and those ``method``
    catches at its calibrated τ."""
    fn = [i for i in scored.maps if scored.labels[i] == 1 and scored.rows[i]["p_defect"] < 0.5]
    caught = [i for i in fn if cals[row_cal[i]].decide(method, scored.rows[i])[2]]

    def game(idx: list[int]) -> dict[str, Any]:
        maps = [{k: v for k, v in scored.maps[i].items() if k in POINTING_MAPS} for i in idx]
        return pointing_game(maps, [_mask(scored.records[i]) for i in idx])

    return {"all_false_negatives": game(fn), f"caught_by_{method}": game(caught)}


def write_rows_csv(
    path: Path, scored: Scored, cals: Sequence[Calibration], row_cal: np.ndarray
) -> None:
    """``rows.csv``: one line per image — fold, path, label, defect type, every measurement of
    the engine and every method's score (``csv.DictWriter``: commas in paths are quoted)."""
    methods = [m for m in REGISTRY.names() if m not in ROW_KEYS]
    fields = ["fold", "path", "label", "defect_type", *ROW_KEYS, *methods]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for i, r in enumerate(scored.rows):
            cal = cals[int(row_cal[i])]
            line = {k: r.get(k) for k in ("path", "label", "defect_type", *ROW_KEYS)}
            line.update({m: cal.score(m, r) for m in methods})
            line["fold"] = int(row_cal[i])
            writer.writerow({k: "" if v is None else v for k, v in line.items()})
