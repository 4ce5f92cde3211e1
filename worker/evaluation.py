"""Evaluation protocol of DESIGN.md §4 (``inspection-audit evaluate``).

Population: images the production model predicts ``ok``. Positives: false negatives (label
``defect``); negatives: true negatives (label ``ok``). For every method (``msp``, ``energy``,
``iou_gap``, ``iou_gap_adv``, ``fusion``): AUROC (FN vs TN) with a bootstrap 95 % interval, the
TN flag rate at 100 % FN recall, FN recall (Clopper–Pearson 95 % interval) and TN flag rate at the
calibrated τ. With ``folds=K`` every image is scored by a model trained without it (K models,
each with its own inner validation split for model selection and calibration), and the
out-of-fold rows are pooled.
"""

from __future__ import annotations

import json
import math
import platform
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import track

from worker.checkpoint import ProductionModel, load_checkpoint
from worker.dataset import Record, load_tensors, read_manifest, stratified_folds
from worker.engine.calibration import METHODS, Calibration, calibrate, method_score, sidecar_path
from worker.engine.score import ROW_KEYS, EngineConfig, ReliabilityEngine, ReliabilityScores
from worker.training import Recipe, train_model

METHOD_LABELS = {
    "msp": "max-softmax p_defect (baseline)",
    "energy": "energy −logsumexp(z)",
    "iou_gap": "IoU gap r",
    "iou_gap_adv": "IoU gap r_adv (adversarial)",
    "iou_defect": "IoU(S_defect, S_agn) alone",
    "iou_defect_adv": "IoU(S_defect, S_agn) alone, adversarial",
    "fusion": "logistic fusion",
}


@dataclass
class Scored:
    """Rows and labels of scored images (one row dict per image, from ``ReliabilityScores.rows``)."""

    records: list[Record]
    rows: list[dict[str, Any]]
    labels: np.ndarray  # int64[N], 1 = defect


def make_engine(
    pm: ProductionModel, config: EngineConfig, layer: str | None = None
) -> ReliabilityEngine:
    """An engine for ``pm``, optionally explaining another ``layer`` than the checkpoint's."""
    if layer is not None:
        pm.target_layer = layer
    return ReliabilityEngine.from_production_model(pm, config)


def score_records(
    engine: ReliabilityEngine,
    pm: ProductionModel,
    records: list[Record],
    *,
    batch_size: int = 32,
    description: str = "scoring",
    show_progress: bool = True,
) -> Scored:
    """Preprocess and score ``records`` in batches; returns their rows and labels."""
    x, y = load_tensors(records, pm.input_size, pm.in_channels, "loading images", show_progress)
    device = next(pm.model.parameters()).device
    rows: list[dict[str, Any]] = []
    starts = range(0, len(x), batch_size)
    for i in track(starts, description=description) if show_progress else starts:
        rows.extend(engine.score(x[i : i + batch_size].to(device)).rows())
    for r, rec in zip(rows, records, strict=True):
        r["path"] = rec.rel_path
        r["label"] = rec.label
        r["defect_type"] = rec.defect_type
    return Scored(records, rows, y.numpy())


# -- statistics -------------------------------------------------------------------------------
def clopper_pearson(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Exact binomial (Clopper–Pearson) interval for ``k`` successes in ``n`` trials."""
    from scipy.stats import beta

    if n == 0:
        return (float("nan"), float("nan"))
    lo = 0.0 if k == 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return lo, hi


def bootstrap_auroc(
    y: np.ndarray, s: np.ndarray, n_boot: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Percentile 95 % interval of AUROC, resampling positives and negatives separately."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    if len(pos) == 0 or len(neg) == 0:
        return (float("nan"), float("nan"))
    vals = []
    for _ in range(n_boot):
        idx = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        vals.append(roc_auc_score(y[idx], s[idx]))
    return float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))


def method_metrics(
    y: np.ndarray, scores: np.ndarray, taus: np.ndarray, n_boot: int = 1000
) -> dict[str, Any]:
    """Metrics of one method on the predicted-ok population.

    Args:
        y: ``int[N]``, 1 = false negative, 0 = true negative.
        scores: ``float[N]`` (higher = more suspicious).
        taus: ``float[N]`` the τ each row is judged with (one value, or one per fold).
    """
    from sklearn.metrics import roc_auc_score

    pos, neg = y == 1, y == 0
    n_pos, n_neg = int(pos.sum()), int(neg.sum())
    out: dict[str, Any] = {"n_false_negative": n_pos, "n_true_negative": n_neg}
    if n_pos and n_neg:
        out["auroc"] = float(roc_auc_score(y, scores))
        out["auroc_ci95"] = list(bootstrap_auroc(y, scores, n_boot))
        tau_full = float(scores[pos].min())
        out["tn_flag_rate_at_full_recall"] = float((scores[neg] >= tau_full).mean())
    else:
        out["auroc"] = None
        out["auroc_ci95"] = [None, None]
        out["tn_flag_rate_at_full_recall"] = None
    flagged = scores >= taus
    k = int((flagged & pos).sum())
    out["fn_recall_at_tau"] = k / n_pos if n_pos else None
    out["fn_recall_ci95"] = list(clopper_pearson(k, n_pos)) if n_pos else [None, None]
    out["tn_flag_rate_at_tau"] = float((flagged & neg).sum() / n_neg) if n_neg else None
    unique = np.unique(taus)
    out["tau"] = (
        float(unique[0]) if len(unique) == 1 else (float(np.mean(taus)) if len(unique) else None)
    )
    if len(unique) > 1:
        out["tau_note"] = "mean of per-fold τ; each image judged with its own fold's τ"
    return out


def compute_metrics(
    rows: Sequence[Mapping[str, Any]],
    labels: np.ndarray,
    calibrations: Sequence[Calibration],
    row_cal: np.ndarray | None = None,
    n_boot: int = 1000,
) -> dict[str, Any]:
    """``counts`` and per-method metrics (DESIGN §4) for rows judged by ``calibrations``.

    ``row_cal[i]`` is the index of the calibration that judges row ``i`` (default: 0).
    """
    row_cal = np.zeros(len(rows), dtype=np.int64) if row_cal is None else row_cal
    p = np.array([r["p_defect"] for r in rows])
    pred_def = p >= 0.5
    y = np.asarray(labels)
    pred_ok = ~pred_def
    counts = {
        "n_images": int(len(rows)),
        "n_defect": int((y == 1).sum()),
        "n_ok": int((y == 0).sum()),
        "n_predicted_ok": int(pred_ok.sum()),
        "n_false_negative": int((pred_ok & (y == 1)).sum()),
        "n_true_negative": int((pred_ok & (y == 0)).sum()),
        "accuracy": float((pred_def == (y == 1)).mean()),
        "defect_recall": float((pred_def & (y == 1)).sum() / max(int((y == 1).sum()), 1)),
    }
    idx = np.flatnonzero(pred_ok)
    yy = y[idx]
    methods: dict[str, Any] = {}
    for m in METHODS:
        s = [method_score(rows[i], m, calibrations[row_cal[i]].fusion) for i in idx]
        t = [calibrations[row_cal[i]].tau(m) for i in idx]
        cal_taus = [c.tau(m) for c in calibrations]
        if any(v is None for v in s) or any(v is None for v in t) or None in cal_taus:
            continue
        methods[m] = method_metrics(
            yy, np.asarray(s, dtype=np.float64), np.asarray(t, dtype=np.float64), n_boot
        )
        if methods[m]["tau"] is None:  # nothing predicted ok: report the calibrated τ itself
            methods[m]["tau"] = float(np.mean(np.asarray(cal_taus, dtype=np.float64)))
    return {"counts": counts, "methods": methods}


# -- pictures ---------------------------------------------------------------------------------
def plot_roc(
    rows: Sequence[Mapping[str, Any]],
    labels: np.ndarray,
    calibrations: Sequence[Calibration],
    row_cal: np.ndarray,
    path: Path,
    title: str,
) -> None:
    """ROC curves (FN vs TN among predicted ok) of every method, AUROC in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve

    p = np.array([r["p_defect"] for r in rows])
    idx = np.flatnonzero(p < 0.5)
    y = np.asarray(labels)[idx]
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot([0, 1], [0, 1], color="0.7", lw=1, ls="--", label="chance")
    if len(set(y.tolist())) == 2:
        for m in METHODS:
            s = [method_score(rows[i], m, calibrations[row_cal[i]].fusion) for i in idx]
            if any(v is None for v in s):
                continue
            fpr, tpr, _ = roc_curve(y, s)
            ax.plot(fpr, tpr, lw=1.8, label=f"{m} (AUROC {roc_auc_score(y, s):.3f})")
    ax.set_xlabel("true negatives flagged (TN flag rate)")
    ax.set_ylabel("false negatives caught (FN recall)")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_panel(x: torch.Tensor, s: ReliabilityScores, i: int, path: Path, title: str) -> None:
    """A 4-panel PNG: the image and the Grad-CAM defect / Grad-CAM ok / class-agnostic overlays."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img = x[i].detach().cpu()
    img = img[0] if img.shape[0] == 1 else img.permute(1, 2, 0)
    cmap_img = "gray" if img.dim() == 2 else None
    panels = [
        ("image", None),
        ("Grad-CAM defect", s.cam_defect),
        ("Grad-CAM ok", s.cam_ok),
        (f"class-agnostic ({s.config.agnostic})", s.cam_agnostic),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(12, 3.4))
    for ax, (name, cam) in zip(axes, panels, strict=True):
        ax.imshow(img.numpy(), cmap=cmap_img, vmin=0, vmax=1)
        if cam is not None:
            ax.imshow(cam[i].detach().cpu().numpy(), cmap="jet", alpha=0.45, vmin=0, vmax=1)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- report -----------------------------------------------------------------------------------
def _fmt(v: Any, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{100 * v:.1f} %" if pct else f"{v:.3f}"


def _ci(v: Sequence[Any], pct: bool = False) -> str:
    if not v or v[0] is None:
        return ""
    return f" [{_fmt(v[0], pct)}, {_fmt(v[1], pct)}]"


def write_report(out: Path, metrics: dict[str, Any], context: dict[str, Any]) -> None:
    """``report.md``: counts, the method table, and where the baseline beats the explanation score."""
    c, ms = metrics["counts"], metrics["methods"]
    lines = [f"# Evaluation: {context['title']}", ""]
    lines += [f"- {k}: `{v}`" for k, v in context["facts"].items()]
    lines += [
        "",
        "## Production model on this population",
        "",
        "| images | predicted ok | false negatives | true negatives | accuracy | defect recall |",
        "|---|---|---|---|---|---|",
        f"| {c['n_images']} | {c['n_predicted_ok']} | {c['n_false_negative']} | {c['n_true_negative']} "
        f"| {_fmt(c['accuracy'], True)} | {_fmt(c['defect_recall'], True)} |",
        "",
        "## Methods (population: images predicted ok; positive = false negative)",
        "",
        "| method | AUROC [95 % CI] | TN flagged at 100 % FN recall | τ | FN recall at τ [95 % CI] | TN flagged at τ |",
        "|---|---|---|---|---|---|",
    ]
    for m, v in ms.items():
        lines.append(
            f"| `{m}` | {_fmt(v['auroc'])}{_ci(v['auroc_ci95'])} | {_fmt(v['tn_flag_rate_at_full_recall'], True)} "
            f"| {_fmt(v['tau'])} | {_fmt(v['fn_recall_at_tau'], True)}{_ci(v['fn_recall_ci95'], True)} "
            f"| {_fmt(v['tn_flag_rate_at_tau'], True)} |"
        )
    lines += ["", "## Does the explanation score beat the baseline?", ""]
    base = ms.get("msp")
    if base is None:
        lines.append("The baseline could not be computed on this population.")
    else:
        for m in ("iou_gap", "iou_gap_adv", "iou_defect", "iou_defect_adv", "fusion", "energy"):
            v = ms.get(m)
            if v is None or v["auroc"] is None or base["auroc"] is None:
                continue
            a_cmp = "beats" if base["auroc"] > v["auroc"] else "does not beat"
            t_b, t_m = base["tn_flag_rate_at_full_recall"], v["tn_flag_rate_at_full_recall"]
            w_cmp = "fewer" if t_b < t_m else ("as many" if t_b == t_m else "more")
            lines.append(
                f"- `msp` {a_cmp} `{m}` on AUROC ({_fmt(base['auroc'])} vs {_fmt(v['auroc'])}); at 100 % FN "
                f"recall `msp` flags {w_cmp} true negatives ({_fmt(t_b, True)} vs {_fmt(t_m, True)})."
            )
    lines += ["", "## Choices and splits", ""] + [f"- {n}" for n in context["notes"]]
    lines += [
        "",
        "## Files",
        "",
        "- `metrics.json`: every number above.",
        "- `roc.png`: ROC curves.",
        "- `overlay_*.png`: image, Grad-CAM defect, Grad-CAM ok and class-agnostic maps.",
        "",
        f"Generated by `{context['command']}` on {context['date']} ({context['machine']}).",
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n")


# -- the command ------------------------------------------------------------------------------
def _decision_flags(
    rows: Sequence[Mapping[str, Any]], cals: Sequence[Calibration], row_cal: np.ndarray, method: str
) -> list[tuple[float | None, bool]]:
    return [(d[0], d[2]) for d in (cals[row_cal[i]].decide(method, r) for i, r in enumerate(rows))]


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
                max(idx, key=lambda i: dec[i][0] if dec[i][0] is not None else -1e9)
                if name != "unflagged_true_negative"
                else min(idx, key=lambda i: dec[i][0] or 0.0)
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
    layer: str | None = None,
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
            eng = make_engine(pm, config, layer)
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
        eng = make_engine(pm, config, layer)
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
                "target_layer": pm.target_layer,
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
    metrics["target_layer"] = pms[0].target_layer
    plot_roc(scored.rows, scored.labels, cals, rc, out / "roc.png", title)
    overlays = write_overlays(out, scored, engines, pms, cals, rc, decision_method)
    metrics["overlays"] = overlays
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    with (out / "rows.csv").open("w") as fh:
        keys = ["path", "label", "defect_type", *ROW_KEYS]
        fh.write("fold," + ",".join(keys) + "\n")
        for i, r in enumerate(scored.rows):
            fh.write(
                f"{rc[i]},"
                + ",".join("" if r.get(k) is None else str(r.get(k)) for k in keys)
                + "\n"
            )
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
        engine={**engine.config.to_dict(), "target_layer": pm.target_layer},
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
    layer: str | None = None,
    show_progress: bool = True,
) -> Calibration:
    """Score ``split`` with ``model``, pick τ for every method and write the sidecar next to it."""
    pm = load_checkpoint(model)
    eng = make_engine(pm, config, layer)
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
