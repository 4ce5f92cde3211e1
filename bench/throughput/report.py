"""The report: machine facts, the targets with their verdicts, ``performance.json`` and ``.md``.

:func:`evaluate_targets` judges the measured numbers against the issue's targets;
:func:`render_markdown` turns the JSON report into ``performance.md`` (a pure function of the
report, so the Markdown can be regenerated from the JSON); :func:`write_reports` writes both.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from bench.throughput.config import KINDS, REPO, SECOND_OPINIONS, SO_LABELS, all_cores

#: "GB" in the RSS target is decimal: 1.5 GB = 1500 MB = 1.5e9 bytes.
RSS_LIMIT_MB = 1500.0
#: The issue's target for each second opinion: (c) + it ≥ 0.25 × (a) inference at B = 8.
SO_TARGET_RATIO = 0.25
SO_TARGET_B = 8

#: What one timed call of each workload does (the report's "What was timed").
WHAT_WAS_TIMED = {
    "a": "`model(x)` under `torch.inference_mode()`: one forward pass, nothing else.",
    "b": "`ReliabilityEngine.score(x)` with `EngineConfig(attack='none')` (closed-form Grad-CAM "
    "weights at layer4): one forward pass, both Grad-CAM maps, Eigen-CAM (float64 SVD), "
    "upsampling, normalisation, binarisation, IoUs, p_defect and energy.",
    "c": "`ReliabilityEngine.score(x)` with `EngineConfig(attack='fgsm')`, the worker's default: "
    "(b) plus the backward pass to the input, the FGSM step and a second map pass on x'.",
    "d": "`pytorch_grad_cam` 1.5.7 computing the same three maps. Built once, outside the timed "
    "loop: `GradCAM(model=deepcopy(model), target_layers=[layer4])` and "
    "`EigenCAM(model=deepcopy(model), target_layers=[layer4])`, each on its own deep copy and "
    "entered as a `with` block. Each timed call: `gradcam(x, targets=[ClassifierOutputTarget("
    "defect)]*B)`, `gradcam(x, targets=[ClassifierOutputTarget(ok)]*B)` and `eigencam(x)` (3 "
    "forward passes, 2 backward passes to the parameters, the numpy/cv2 post-processing). "
    "No binarisation or IoU: those are (b)'s extra work.",
    "e": "From the first `producer.api.enqueue_many` call (message validation, SHA-256 of each "
    "file, sending) to the moment the last audit row is visible in PostgreSQL (polled every "
    "0.1 s), after a warm-up batch that every worker process has scored. Each worker is "
    "`inspection-audit worker --concurrency 1` (prefork pool, one pool process) with "
    "`INSPECTION_AUDIT_TORCH_THREADS=1`; every message is a `prediction='ok'` inspection, so "
    "every image gets the full FGSM audit; JPEG decoding and resizing happen in the worker and "
    "are included. Peak RSS: psutil, sampled every 0.2 s over the worker's process tree "
    "(main process + pool process), summed; PSS (shared pages split between processes) alongside.",
    "second_opinions": "Each timed call is one `AuditSuite.measure(images, x)`, as the worker "
    "makes it: `images` are the B images decoded at their own size (`load_image`), `x` their "
    "production input (fitted before timing, as the worker does while decoding). The production "
    "model and the auditor are loaded from checkpoint files and frozen; the engine is "
    "`ReliabilityEngine.from_production_model(pm, EngineConfig(attack='fgsm'), max_chunk=<the "
    "worker's default>)`. *none*: the engine's (c) plus what `measure` adds (per-image rows, "
    "the three maps cropped and resized to each image's aspect ratio, the display copies). "
    "*auditor*: plus fitting the images to the auditor's input and its forward pass. "
    "*snapshots*: plus one forward pass of each snapshot (listed below). *views*: "
    "plus one forward pass of the production model, without gradients, on the 4 flip views "
    "of x stacked into 4·B images (identity, hflip, vflip, hvflip). *anomaly_own* / *anomaly_imagenet*: plus fitting the images to the bank's "
    "input, the feature model's forward pass to the bank's two layers, PatchCore's 3 × 3 "
    "aggregation and projection, the exact nearest-neighbour search of every patch in the bank, "
    "and the anomaly map (upsampled, Gaussian blur, cropped to the image). *all*: every selected second opinion "
    "together (with an auditor and views, also the auditor on each view). The banks are built "
    "before timing; their build time is reported apart.",
}


def machine_info() -> dict[str, Any]:
    """The machine and software the run measures: CPU model (``/proc/cpuinfo``), cores, RAM (GB),
    torch/torchvision/Python versions, CUDA, git commit, date (UTC) and load average at start."""
    import psutil

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    commit = None
    with contextlib.suppress(Exception):
        commit = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
            or None
        )
    try:
        import torchvision

        tv = torchvision.__version__
    except Exception:  # pragma: no cover
        tv = None
    return {
        "cpu_model": cpu,
        "cores_logical": os.cpu_count(),
        "cores_physical": psutil.cpu_count(logical=False),
        "cores_usable": all_cores(),
        "ram_gb": round(psutil.virtual_memory().total / 1e9, 1),
        "torch": torch.__version__,
        "torchvision": tv,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "git_commit": commit,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "load_average_start": [round(v, 2) for v in os.getloadavg()],
    }


def images_per_s(
    core: Sequence[dict[str, Any]], kind: str, b: int, n_threads: int = 1, device: str = "cpu"
) -> float | None:
    """The median images/s of ``kind`` at batch size ``b`` (``None`` when not measured)."""
    for r in core:
        if (r["kind"], r["batch_size"], r["threads"], r["device"]) == (kind, b, n_threads, device):
            return float(r["images_per_s"])
    return None


def e2e_result(e2e: Sequence[dict[str, Any]], b: int, n: int) -> dict[str, Any] | None:
    """The end-to-end result at batch size ``b`` with ``n`` workers (``None`` when not run)."""
    for r in e2e:
        if r["batch_size"] == b and r["workers"] == n:
            return r
    return None


def ratio(num: float | None, den: float | None) -> float | None:
    """``num / den``, or ``None`` when either is missing or ``den`` is 0."""
    return None if num is None or den is None or den == 0 else num / den


def so_target_name(name: str) -> str:
    """The target line of one second opinion (see :data:`SO_TARGET_RATIO`)."""
    return f"audit + FGSM + {name} ≥ {SO_TARGET_RATIO} × inference"


def evaluate_targets(
    core: Sequence[dict[str, Any]],
    e2e: Sequence[dict[str, Any]],
    sizes: Sequence[int],
    e2e_sizes: Sequence[int],
    second: Sequence[dict[str, Any]] = (),
) -> list[dict[str, Any]]:
    """The issue's targets, one row per (target, B), from one-thread CPU numbers.

    Each row: ``target``, ``batch_size``, ``value`` (a ratio of images/s, or MB for memory),
    ``required``, ``op`` (``>=``/``<=``), ``unit`` (``×`` or ``MB``) and ``passed`` (``None``
    when not measured: a batch size not run, or no end-to-end results). The memory targets are
    judged at B = 32 (else the largest end-to-end B) on the larger worker of all runs there.
    Then one row per second opinion of :data:`bench.throughput.config.SECOND_OPINIONS`: its
    workload's images/s in ``second`` (:func:`bench.throughput.second.run_second_opinions`)
    over (a)'s at B = 8, ≥ 0.25 (``None`` when it was not selected, was skipped, or B = 8 was
    not run).
    """
    out: list[dict[str, Any]] = []

    def add(
        target: str, b: int | None, value: float | None, required: float, ge: bool, unit: str = "×"
    ) -> None:
        passed = None if value is None else (value >= required if ge else value <= required)
        out.append(
            {
                "target": target,
                "batch_size": b,
                "value": value,
                "required": required,
                "op": ">=" if ge else "<=",
                "unit": unit,
                "passed": passed,
            }
        )

    for b in sizes:
        a, bb, c, d = (images_per_s(core, k, b) for k in KINDS)
        add("(b) ≥ 0.6 × (a)", b, ratio(bb, a), 0.6, True)
        add("(c) ≥ 0.25 × (a)", b, ratio(c, a), 0.25, True)
        add("(b) ≥ 3 × (d)", b, ratio(bb, d), 3.0, True)
    for b in e2e_sizes:
        e1, e2 = e2e_result(e2e, b, 1), e2e_result(e2e, b, 2)
        r1 = None if e1 is None else float(e1["images_per_s"])
        r2 = None if e2 is None else float(e2["images_per_s"])
        add("(e) 1 worker ≥ 0.8 × (c)", b, ratio(r1, images_per_s(core, "c", b)), 0.8, True)
        add("(e) 2 workers ≥ 1.6 × (e) 1 worker", b, ratio(r2, r1), 1.6, True)
    rss_b = 32 if 32 in e2e_sizes else (max(e2e_sizes) if e2e_sizes else None)
    for key, label in (
        ("peak_rss_tree_mb", "peak RSS ≤ 1.5 GB per CPU worker"),
        ("peak_pss_tree_mb", "peak PSS ≤ 1.5 GB per CPU worker (supplementary)"),
    ):
        peaks = [max(r[key]) for r in e2e if r["batch_size"] == rss_b and r[key]]
        add(label, rss_b, max(peaks) if peaks else None, RSS_LIMIT_MB, False, "MB")
    a8 = images_per_s(core, "a", SO_TARGET_B)
    for name in SECOND_OPINIONS:
        value = ratio(images_per_s(second, name, SO_TARGET_B), a8)
        add(so_target_name(name), SO_TARGET_B, value, SO_TARGET_RATIO, True)
    return out


def fmt(v: float | None, digits: int = 2) -> str:
    """``v`` with ``digits`` decimals, or an en dash when it is ``None``."""
    return "–" if v is None else f"{v:.{digits}f}"


def verdict(p: bool | None) -> str:
    """``pass``, ``**MISS**`` or ``not measured``."""
    return "not measured" if p is None else ("pass" if p else "**MISS**")


def render_markdown(report: dict[str, Any]) -> str:
    """``performance.md`` from the JSON report (nothing else is read: it can be regenerated)."""
    m, cfg, core = report["machine"], report["config"], report["core"]
    e2e, targets = report["e2e"], report["targets"]
    sizes = cfg["sizes"]
    lines: list[str] = ["# Throughput", ""]
    if cfg["quick"]:
        lines += [
            "> **Quick smoke run** (`--quick`): tiny images, few iterations. These numbers "
            "check that the benchmark runs; they are not a measurement.",
            "",
        ]
    lines += [
        f"Measured {m['date']} with `{report['command']}` (commit {m['git_commit'] or '?'}), "
        f"one run: every ratio below comes from this one run.",
        "",
        f"Machine: {m['cpu_model']}, {m['cores_usable']} usable cores "
        f"({m['cores_physical']} physical), {m['ram_gb']} GB RAM; torch {m['torch']}, "
        f"torchvision {m['torchvision']}, Python {m['python']}; {m['platform']}.",
        f"Load average at start: {' / '.join(str(v) for v in m['load_average_start'])} "
        f"(1 / 5 / 15 min); at end: {' / '.join(str(v) for v in report['load_average_end'])}.",
    ]
    if m["load_average_start"][0] > 0.5 * m["cores_usable"]:
        lines += [
            "",
            "> **Warning:** the machine was busy when the run started (load average above half "
            "the cores): the numbers are lower and noisier than on an idle machine.",
        ]
    lines += [
        "",
        f"Setup: {report['model']}; input {cfg['image_size']}×{cfg['image_size']} px; "
        f"{report['images']}; CPU. Images/s is the median of {cfg['reps']} timed repetitions of "
        f"at least {cfg['min_images']} images each (batches cycle through {cfg['n_pool']} "
        f"distinct images), each repetition one `torch.utils.benchmark.Timer.timeit` over every "
        f"batch, after at least ⌈{cfg['warmup_images']}/B⌉ untimed warm-up calls; seed "
        f"{cfg['seed']}. Every measurement uses one torch/BLAS/OpenMP/OpenCV thread per process "
        "unless marked *all cores*.",
        "",
        "## Images per second, one thread",
        "",
        "| B | (a) inference | (b) audit | (c) audit + FGSM | (d) pytorch_grad_cam | "
        "(b)/(a) | (c)/(a) | (b)/(d) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for b in sizes:
        a, bb, c, d = (images_per_s(core, k, b) for k in KINDS)
        lines.append(
            f"| {b} | {fmt(a, 1)} | {fmt(bb, 1)} | {fmt(c, 1)} | {fmt(d, 1)} | "
            f"{fmt(ratio(bb, a))} | {fmt(ratio(c, a))} | {fmt(ratio(bb, d))} |"
        )
    lines += second_opinion_lines(report)
    n_all = report["all_cores_threads"]
    if any(r["threads"] == n_all and n_all != 1 for r in core):
        lines += [
            "",
            f"## Images per second, all cores ({n_all} threads), (a)–(c)",
            "",
            "| B | (a) inference | (b) audit | (c) audit + FGSM | (b)/(a) | (c)/(a) | "
            "(a) speed-up vs 1 thread |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for b in sizes:
            a, bb, c = (images_per_s(core, k, b, n_all) for k in ("a", "b", "c"))
            lines.append(
                f"| {b} | {fmt(a, 1)} | {fmt(bb, 1)} | {fmt(c, 1)} | {fmt(ratio(bb, a))} | "
                f"{fmt(ratio(c, a))} | {fmt(ratio(a, images_per_s(core, 'a', b)))} |"
            )
    lines += ["", "## End to end: Redis → Celery → PostgreSQL", ""]
    if not e2e:
        lines.append(report.get("e2e_note") or "Not measured (`--skip-e2e`).")
    else:
        lines += [
            f"{cfg['e2e_images']} images per repetition, median of {cfg['e2e_reps']} "
            "repetition(s); B = `INSPECTION_AUDIT_BATCH_SIZE`; one thread per worker process.",
            "",
            "| B | workers | images/s | (e)/(c) | 2 workers / 1 | peak RSS per worker, "
            "process tree (MB) | pool process (MB) | PSS tree (MB) | decode ms/img | score ms/img | errors |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in e2e:
            b, n = r["batch_size"], r["workers"]
            one = e2e_result(e2e, b, 1)
            scale = ratio(r["images_per_s"], one["images_per_s"]) if one and n == 2 else None
            lines.append(
                f"| {b} | {n} | {fmt(r['images_per_s'], 1)} | "
                f"{fmt(ratio(r['images_per_s'], images_per_s(core, 'c', b)))} | {fmt(scale)} | "
                f"{', '.join(f'{v:.0f}' for v in r['peak_rss_tree_mb'])} | "
                f"{', '.join(f'{v:.0f}' for v in r['peak_rss_pool_process_mb'])} | "
                f"{', '.join(f'{v:.0f}' for v in r['peak_pss_tree_mb'])} | "
                f"{fmt(r['median_decode_ms'], 1)} | {fmt(r['median_score_ms'], 1)} | {r['errors']} |"
            )
    lines += [
        "",
        "## Targets",
        "",
        "| target | B | measured | required | result |",
        "|---|---:|---:|---:|---|",
    ]
    for t in targets:
        unit = " MB" if t["unit"] == "MB" else "×"
        digits = 0 if t["unit"] == "MB" else 2
        lines.append(
            f"| {t['target']} | {t['batch_size'] if t['batch_size'] is not None else '–'} | "
            f"{fmt(t['value'], digits)}{unit if t['value'] is not None else ''} | "
            f"{'≥' if t['op'] == '>=' else '≤'} {fmt(t['required'], digits)}{unit} | "
            f"{verdict(t['passed'])} |"
        )
    missed = [t for t in targets if t["passed"] is False]
    lines += [
        "",
        (
            f"{len(missed)} of {sum(t['passed'] is not None for t in targets)} measured targets "
            "missed: " + "; ".join(f"{t['target']} at B={t['batch_size']}" for t in missed) + "."
        )
        if missed
        else "Every measured target passed.",
        "",
        "Ratios are of images/s measured in this run on this machine. The RSS target is judged "
        "at B=32 (the largest end-to-end batch size when 32 is not run), on the peak of the RSS "
        "summed over the worker's process tree (main process + pool process), the larger of the "
        "1- and 2-worker runs. The pool process is forked from the main process after torch is "
        "imported, so the pages they share (torch's libraries, imported modules) are counted "
        "twice in that sum; the supplementary PSS row splits shared pages between the processes "
        "that map them, which is closer to what one more worker adds to the machine's memory. "
        f"Each second opinion's target is judged at B={SO_TARGET_B} on its workload (one "
        "`AuditSuite.measure` call with the FGSM audit and that second opinion) over (a); a "
        "second opinion not selected (`--second-opinions`) or skipped says *not measured*.",
        "",
        "## What was timed",
        "",
    ]
    for k in ("a", "b", "c", "d", "e"):
        lines.append(f"* **({k})** {WHAT_WAS_TIMED[k]}")
    lines.append(f"* **Second opinions** {WHAT_WAS_TIMED['second_opinions']}")
    agree = report.get("maps_agreement")
    if agree:
        lines += [
            "",
            f"Equal work: on one batch of {agree['batch_size']} images the engine's maps (b) and "
            f"pytorch_grad_cam's (d) differ by at most {agree['defect']:.1e} (defect), "
            f"{agree['ok']:.1e} (ok) and {agree['agnostic']:.1e} (Eigen-CAM, up to the SVD sign).",
        ]
    lines += ["", "## GPU", ""]
    gpu = report.get("gpu")
    if not gpu:
        lines.append("No GPU was available in this session; CUDA numbers not measured.")
    else:
        lines += [
            f"{gpu['name']}; host side one thread. Images/s:",
            "",
            "| B | (a) inference | (b) audit | (c) audit + FGSM | (d) pytorch_grad_cam | "
            "(b)/(a) | (c)/(a) | (b)/(d) |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for b in sizes:
            a, bb, c, d = (images_per_s(gpu["core"], k, b, 1, gpu["device"]) for k in KINDS)
            lines.append(
                f"| {b} | {fmt(a, 1)} | {fmt(bb, 1)} | {fmt(c, 1)} | {fmt(d, 1)} | "
                f"{fmt(ratio(bb, a))} | {fmt(ratio(c, a))} | {fmt(ratio(bb, d))} |"
            )
        ag = gpu["agreement"]
        diffs = ", ".join(
            f"{k} {v:.1e} (tol {ag['tolerance'][k]:.0e})" for k, v in ag["max_abs_diff"].items()
        )
        lines += [
            "",
            f"CUDA vs CPU engine scores (FGSM, B={ag['batch_size']}): "
            f"{'match' if ag['passed'] else '**DO NOT MATCH**'} within tolerance: {diffs}.",
        ]
    lines += ["", "## Profile", ""]
    prof = report.get("profile")
    lines.append(
        f"`{prof}`: torch.profiler tables of (b) and (c) at B=8, sorted by self CPU time."
        if prof
        else "Not run in this run; `python -m bench.throughput --profile` writes `docs/profile.txt`."
    )
    lines.append("")
    return "\n".join(lines)


def second_opinion_lines(report: dict[str, Any]) -> list[str]:
    """The Markdown section of the second-opinion workloads (from ``report["second_opinions"]``;
    a report without it, from before they existed, gets none)."""
    so = report.get("second_opinions")
    if so is None:
        return []
    lines = ["", "## Second opinions: (c) audit + FGSM plus one second opinion, one thread", ""]
    results = so.get("results") or []
    if not results:
        lines.append(so.get("note") or "Not measured.")
        return lines
    core = report["core"]
    lines += [
        "Each workload is one `AuditSuite.measure(images, x)` call per batch of B images decoded "
        "at their own size, as the worker makes it (see *What was timed*). images/s: median of "
        "the repetitions; × (a): over (a) inference's images/s at the same B; ms/img: 1000 / "
        "images/s; + ms/img vs (c): its ms/img minus (c) audit + FGSM's at the same B (the "
        "table above), i.e. what `measure` and the second opinion add per image; + ms/img vs "
        "none: minus the *no second opinion* workload's, i.e. what the second opinion alone "
        "adds. Differences of separately timed workloads: on a busy machine they are noisy.",
        "",
        "| B | workload | images/s | × (a) | ms/img | + ms/img vs (c) | + ms/img vs none |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]

    def added(ms: float, rate: float | None) -> str:
        return "–" if rate is None else f"{ms - 1000.0 / rate:+.1f}"

    for r in results:
        b = r["batch_size"]
        a, c = images_per_s(core, "a", b), images_per_s(core, "c", b)
        none = None if r["kind"] == "none" else images_per_s(results, "none", b)
        lines.append(
            f"| {b} | {SO_LABELS.get(r['kind'], r['kind'])} | {fmt(r['images_per_s'], 1)} | "
            f"{fmt(ratio(r['images_per_s'], a))} | {fmt(r['ms_per_image'], 1)} | "
            f"{added(r['ms_per_image'], c)} | {added(r['ms_per_image'], none)} |"
        )
    info = so.get("setup") or {}
    lines += ["", "Set-up, before timing (not in the per-image cost):", ""]
    prod, eng = info.get("production"), info.get("engine")
    if prod and eng:
        lines.append(
            f"* production model `{prod['model_version']}` ({prod['arch']}, "
            f"{prod['input_size'][0]}×{prod['input_size'][1]} px, {prod['resize']}), engine "
            f"attack={eng['attack']}, layer {eng['target_layer']}, max_chunk {eng['max_chunk']}."
        )
    aud = info.get("auditor")
    if aud:
        lines.append(
            f"* auditor: {aud['description']}, `{aud['model_version']}`, "
            f"{aud['input_size'][0]}×{aud['input_size'][1]} px ({aud['resize']}), loaded in "
            f"{aud['load_s']:.1f} s."
        )
    for sn in info.get("snapshots") or ():
        lines.append(
            f"* snapshot: {sn['description']}, `{sn['model_version']}`, "
            f"{sn['input_size'][0]}×{sn['input_size'][1]} px ({sn['resize']})."
        )
    if info.get("views"):
        lines.append(f"* views: {', '.join(info['views'])}.")
    for kind, bk in (info.get("banks") or {}).items():
        lines.append(
            f"* bank `{kind}` ({bk['feature_extractor']}, layers {' + '.join(bk['layers'])}, "
            f"{bk['input_size'][0]}×{bk['input_size'][1]} px {bk['resize_mode']}): "
            f"{bk['patches']} patches of {bk['ok_images']} ok images → {bk['bank_patches']} "
            f"kept (coreset {bk['coreset_size']}), {bk['dim']} dimensions, {bk['search']} "
            f"exact search; built in {bk['build_s']:.1f} s."
        )
    for name, why in (so.get("skipped") or {}).items():
        lines.append(f"* **{name} not measured**: {why}")
    return lines


def display_path(p: Path) -> Path:
    """``p`` relative to the repository when it lies inside it, else as given."""
    try:
        return p.resolve().relative_to(REPO)
    except ValueError:
        return p


def write_reports(report: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """Write ``performance.json`` and ``performance.md`` (from :func:`render_markdown`) to ``out``.

    Returns both paths.
    """
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "performance.json", out / "performance.md"
    json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    md_path.write_text(render_markdown(report))
    return json_path, md_path
