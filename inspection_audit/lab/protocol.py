"""The evaluation protocol of docs/design.md §4 (``inspection-audit evaluate``, ``calibrate``).

Population: images the production model predicts ``ok``. Positives: false negatives (label
``defect``); negatives: true negatives (label ``ok``). For every method of the registry: AUROC
(FN vs TN) with a bootstrap 95 % interval, the TN flag rate at 100 % FN recall, FN recall
(Clopper–Pearson 95 % interval) and TN flag rate at the calibrated τ. With ``folds=K`` every
image is scored by a model trained without it (K models, each with its own inner validation
split for model selection and calibration), and the out-of-fold rows are pooled.
"""

from __future__ import annotations

import csv
import json
import platform
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inspection_audit.lab.dataset import Record, load_tensors, read_manifest, stratified_folds
from inspection_audit.lab.plots import plot_roc, save_panel
from inspection_audit.lab.report import write_report
from inspection_audit.lab.scoring import Scored, engine_record, make_engine, score_records
from inspection_audit.lab.stats import compute_metrics
from inspection_audit.lab.training import Recipe, train_model
from worker.engine.calibration import Calibration, calibrate, sidecar_path
from worker.engine.methods import REGISTRY
from worker.engine.options import EngineConfig
from worker.engine.score import ROW_KEYS, ReliabilityEngine
from worker.model.checkpoint import ProductionModel, load_checkpoint


def _decision_flags(
    rows: Sequence[Mapping[str, Any]], cals: Sequence[Calibration], row_cal: np.ndarray, method: str
) -> list[tuple[float | None, bool]]:
    return [(d[0], d[2]) for d in (cals[row_cal[i]].decide(method, r) for i, r in enumerate(rows))]


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


def write_overlays(
    out: Path,
    scored: Scored,
    engines: Sequence[ReliabilityEngine],
    pms: Sequence[ProductionModel],
    cals: Sequence[Calibration],
    row_cal: np.ndarray,
    method: str,
) -> list[str]:
    """Overlays of a caught false negative, a flagged and an unflagged true negative.

    ``method`` decides flagged/unflagged; when the calibrations have no τ for it (e.g. an
    ``*_adv`` method with ``attack="none"``), ``iou_gap`` is used instead.
    """
    if any(c.tau(method) is None for c in cals):
        method = "iou_gap"
    dec = _decision_flags(scored.rows, cals, row_cal, method)
    p = np.array([r["p_defect"] for r in scored.rows])
    y = scored.labels
    picks: dict[str, int] = {}
    cand = {
        "caught_false_negative": [
            i for i in range(len(p)) if p[i] < 0.5 and y[i] == 1 and dec[i][1]
        ],
        "missed_false_negative": [
            i for i in range(len(p)) if p[i] < 0.5 and y[i] == 1 and not dec[i][1]
        ],
        "flagged_true_negative": [
            i for i in range(len(p)) if p[i] < 0.5 and y[i] == 0 and dec[i][1]
        ],
        "unflagged_true_negative": [
            i for i in range(len(p)) if p[i] < 0.5 and y[i] == 0 and not dec[i][1]
        ],
    }
    for name, idx in cand.items():
        if idx:
            picks[name] = (
                max(idx, key=lambda i: _or(dec[i][0], -1e9))
                if name != "unflagged_true_negative"
                else min(idx, key=lambda i: _or(dec[i][0], 0.0))
            )
    written = []
    for name, i in picks.items():
        k = int(row_cal[i])
        pm = pms[k]
        x, _ = load_tensors([scored.records[i]], pm.input_size, pm.in_channels, show_progress=False)
        s = engines[k].score(x.to(next(pm.model.parameters()).device))
        r = scored.rows[i]
        title = (
            f"{name.replace('_', ' ')}: {r['path']} (label {r['label']}) p_defect {r['p_defect']:.3f} "
            f"r {r['iou_gap']:.3f} r_adv {r['iou_gap_adv'] if r['iou_gap_adv'] is None else round(r['iou_gap_adv'], 3)} "
            f"{method} {dec[i][0]:.3f} vs τ {cals[k].tau(method):.3f}"
        )
        path = out / f"overlay_{name}.png"
        save_panel(x, s, 0, path, title)
        written.append(path.name)
    return written


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
    target_recall: float = 1.0,
    decision_method: str = "iou_gap_adv",
    seed: int = 0,
    n_boot: int = 1000,
    command: str = "inspection-audit evaluate",
    show_progress: bool = True,
    folds_dir: str | Path | None = None,
    snapshot_epochs: tuple[int, ...] = (),
) -> dict[str, Any]:
    """Run the evaluation protocol and write ``metrics.json``, ``report.md``, ``roc.png``, overlays.

    Without ``folds``: score ``split`` with ``model``, τ from ``calibration_split`` (the model's
    sidecar is rewritten only by ``calibrate``, never here). With ``folds=K ≥ 2``: pool all
    splits, train K models with ``recipe`` (reusing ``<folds_dir>/fold<i>.pt``, default
    ``out/folds``, when present and trained with the same recipe), each calibrated on its own inner validation split, and score
    every image out of fold.

    Raises:
        ValueError: neither a model nor folds given; ManifestError for a bad manifest.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    facts: dict[str, Any] = {"manifest": str(manifest), "engine": json.dumps(config.to_dict())}
    if folds and folds >= 2:
        recipe = recipe or Recipe()
        records = read_manifest(manifest)
        assign = stratified_folds(records, folds, seed)
        pms, engines, cals = [], [], []
        all_rows: list[dict[str, Any]] = []
        all_labels: list[np.ndarray] = []
        all_records: list[Record] = []
        row_cal: list[int] = []
        for f in range(folds):
            train_all = [r for r, a in zip(records, assign, strict=True) if a != f]
            held = [r for r, a in zip(records, assign, strict=True) if a == f]
            inner = stratified_folds(train_all, 5, seed + 100 + f)
            tr = [r for r, a in zip(train_all, inner, strict=True) if a != 0]
            va = [r for r, a in zip(train_all, inner, strict=True) if a == 0]
            ckpt = Path(folds_dir or out / "folds") / f"fold{f}.pt"
            fold_recipe = Recipe(**{**asdict(recipe), "seed": recipe.seed + f})
            if not _reusable(ckpt, fold_recipe):
                train_model(
                    tr,
                    va,
                    ckpt,
                    fold_recipe,
                    snapshot_epochs=snapshot_epochs,
                    show_progress=show_progress,
                    model_version=f"{fold_recipe.arch}-fold{f}of{folds}-s{fold_recipe.seed}",
                    extra={"fold": f, "folds": folds},
                )
            pm = load_checkpoint(ckpt)
            eng = make_engine(pm, config)
            cal = calibrate_on(
                eng,
                pm,
                va,
                split=f"fold{f}-inner-val",
                target_recall=target_recall,
                description=f"fold {f + 1}/{folds}: calibrating",
                show_progress=show_progress,
            )
            test_scored = score_records(
                eng,
                pm,
                held,
                description=f"fold {f + 1}/{folds}: scoring",
                show_progress=show_progress,
            )
            pms.append(pm)
            engines.append(eng)
            cals.append(cal)
            all_rows += test_scored.rows
            all_labels.append(test_scored.labels)
            all_records += held
            row_cal += [f] * len(held)
        scored = Scored(all_records, all_rows, np.concatenate(all_labels))
        rc = np.asarray(row_cal)
        facts.update(
            {
                "folds": folds,
                "recipe": json.dumps(asdict(recipe)),
                "models": [p.model_version for p in pms],
            }
        )
        notes += [
            f"{folds}-fold stratified out-of-fold evaluation over all {len(records)} images (all manifest splits pooled); "
            "each image is scored by the one model that never saw it.",
            "Each fold model was selected (best epoch) and calibrated (τ, fusion) on an inner validation split "
            "(one fifth of its own training folds); held-out fold images were used for nothing but scoring.",
        ]
        title = f"{folds}-fold out-of-fold, {recipe.arch} {recipe.image_size} px"
    else:
        if model is None:
            raise ValueError("evaluate needs --model, or --folds K to train its own models")
        pm = load_checkpoint(model)
        eng = make_engine(pm, config)
        cal = calibrate_on(
            eng,
            pm,
            read_manifest(manifest, calibration_split),
            split=calibration_split,
            target_recall=target_recall,
            show_progress=show_progress,
        )
        scored = score_records(
            eng,
            pm,
            read_manifest(manifest, split),
            description=f"scoring {split}",
            show_progress=show_progress,
        )
        pms, engines, cals = [pm], [eng], [cal]
        rc = np.zeros(len(scored.rows), dtype=np.int64)
        facts.update(
            {
                "model": str(model),
                "model_version": pm.model_version,
                "split": split,
                "calibration_split": calibration_split,
                "target_layer": eng.target_layer_name,
                "input_size": list(pm.input_size),
                "recipe": json.dumps(pm.extra.get("recipe")),
            }
        )
        notes.append(
            f"τ of every method and the fusion weights were fitted on `{calibration_split}` only; "
            f"`{split}` was used for nothing but these figures."
        )
        title = f"{pm.model_version} on {split}"
    if any(c.tau(decision_method) is None for c in cals):
        decision_method = "iou_gap"
    notes.append(
        f"Target FN recall for τ: {target_recall}. Overlays use decision method `{decision_method}`."
    )
    metrics = compute_metrics(scored.rows, scored.labels, cals, rc, n_boot)
    metrics["calibration"] = [c.to_dict() for c in cals]
    metrics["engine"] = config.to_dict()
    metrics["target_layer"] = engines[0].target_layer_name
    plot_roc(scored.rows, scored.labels, cals, rc, out / "roc.png", title)
    overlays = write_overlays(out, scored, engines, pms, cals, rc, decision_method)
    metrics["overlays"] = overlays
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    write_rows_csv(out / "rows.csv", scored, cals, rc)
    context = {
        "title": title,
        "facts": facts,
        "notes": notes,
        "command": command,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
    }
    write_report(out, metrics, context)
    return metrics


def _reusable(ckpt: Path, recipe: Recipe) -> bool:
    if not ckpt.is_file():
        return False
    try:
        saved = torch.load(ckpt, map_location="cpu", weights_only=True).get("recipe")
    except Exception:
        return False
    return saved == asdict(recipe)


def calibrate_on(
    engine: ReliabilityEngine,
    pm: ProductionModel,
    records: list[Record],
    *,
    split: str,
    target_recall: float = 1.0,
    description: str | None = None,
    show_progress: bool = True,
) -> Calibration:
    """Score labelled ``records`` and pick τ for every method (the engine's options and target
    layer are recorded with it: τ is only valid for them)."""
    scored = score_records(
        engine,
        pm,
        records,
        description=description or f"calibrating on {split}",
        show_progress=show_progress,
    )
    return calibrate(
        scored.rows,
        scored.labels.tolist(),
        model_version=pm.model_version,
        engine=engine_record(engine),
        split=split,
        target_recall=target_recall,
    )


def calibrate_checkpoint(
    manifest: str | Path,
    model: str | Path,
    *,
    split: str = "val",
    target_recall: float = 1.0,
    config: EngineConfig = EngineConfig(),
    show_progress: bool = True,
) -> Calibration:
    """Score ``split`` with ``model``, pick τ for every method and write the sidecar next to it."""
    pm = load_checkpoint(model)
    eng = make_engine(pm, config)
    cal = calibrate_on(
        eng,
        pm,
        read_manifest(manifest, split),
        split=split,
        target_recall=target_recall,
        show_progress=show_progress,
    )
    cal.save(sidecar_path(model))
    return cal


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
