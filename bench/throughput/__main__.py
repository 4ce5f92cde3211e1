"""``python -m bench.throughput``: run the benchmark and write ``performance.json``/``.md``.

See ``bench/README.md`` for the options and what each number means.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from bench.throughput.agreement import device_agreement, maps_agreement
from bench.throughput.config import (
    DEFAULT_DATASET,
    DEFAULT_REDIS,
    KIND_LABELS,
    KINDS,
    REPO,
    SO_LABELS,
    BenchConfig,
    all_cores,
    parse_second_opinions,
    pin_env_threads,
)
from bench.throughput.e2e import E2EContext, run_e2e
from bench.throughput.model import ModelSpec, checkpoint_model, random_model, save_model_checkpoint
from bench.throughput.report import (
    WHAT_WAS_TIMED,
    display_path,
    evaluate_targets,
    fmt,
    images_per_s,
    machine_info,
    ratio,
    verdict,
    write_reports,
)
from bench.throughput.second import (
    decoded_images,
    ok_records,
    prepare_second_opinions,
    run_second_opinions,
    synthetic_decoded,
)
from bench.throughput.workloads import (
    dataset_records,
    load_pool,
    profile_engine,
    run_core,
    synthetic_images,
)
from db.testing import DEFAULT_ADMIN_URL


def _int_list(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from exc
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def _second_opinions(text: str) -> tuple[str, ...]:
    try:
        return parse_second_opinions(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m bench.throughput`` (see ``bench/README.md``)."""
    p = argparse.ArgumentParser(
        prog="python -m bench.throughput",
        description="Images/s of inference, the audit, pytorch_grad_cam and the pipeline "
        "end to end; writes performance.json and performance.md.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="Smoke run: 64 px, B=1,4, few images "
        "and iterations; output to a temporary folder unless --out is given.",
    )
    p.add_argument(
        "--sizes", type=_int_list, default=None, help="Batch sizes for (a)-(d) (default 1,8,32)."
    )
    p.add_argument(
        "--e2e-sizes", type=_int_list, default=None, help="Batch sizes for (e) (default 8,32)."
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="Input side in px (default 224; a --model checkpoint's own size wins).",
    )
    p.add_argument(
        "--model",
        type=Path,
        default=None,
        help="Checkpoint to benchmark (default: random resnet18).",
    )
    p.add_argument(
        "--dataset",
        type=Path,
        default=None,
        help="Dataset folder with manifest.csv (default: $INSPECTION_AUDIT_DATASET, else ../shared/datasets/magnetic-tile).",
    )
    p.add_argument(
        "--synthetic",
        action="store_true",
        help="Synthetic images instead of the dataset (no dataset needed; (e) is not run).",
    )
    p.add_argument("--skip-e2e", action="store_true", help="Skip (e) (no Redis/PostgreSQL needed).")
    p.add_argument(
        "--second-opinions",
        type=_second_opinions,
        default=None,
        metavar="none|all|auditor,snapshots,views,anomaly_own,anomaly_imagenet",
        help="Second opinions timed on top of (c) through AuditSuite.measure (default all; "
        "none: no second-opinion workload).",
    )
    p.add_argument(
        "--auditor",
        type=Path,
        default=None,
        metavar="CKPT",
        help="Auditor checkpoint (default: a second random resnet18 at 160 px).",
    )
    p.add_argument(
        "--snapshot",
        dest="snapshots",
        type=Path,
        action="append",
        default=None,
        metavar="CKPT",
        help="A snapshot checkpoint (repeat; default: 3 random models of the production "
        "model's architecture and size).",
    )
    p.add_argument(
        "--bank-images",
        type=int,
        default=None,
        help="ok images each PatchCore bank is built from (default 8).",
    )
    p.add_argument(
        "--bank-coreset",
        type=int,
        default=None,
        help="Patches kept in each PatchCore bank (default 2000).",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="Also write profile.txt: torch.profiler on (b) and (c) at B=8.",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="Output folder (default docs/; with --quick a temporary folder).",
    )
    p.add_argument("--reps", type=int, default=None, help="Timed repetitions (default 5).")
    p.add_argument(
        "--min-images", type=int, default=None, help="Images per repetition, at least (default 32)."
    )
    p.add_argument(
        "--e2e-images",
        type=int,
        default=None,
        help="Images per end-to-end repetition (default 256).",
    )
    p.add_argument("--e2e-reps", type=int, default=None, help="End-to-end repetitions (default 3).")
    p.add_argument(
        "--redis-url", default=DEFAULT_REDIS, help=f"Broker for (e) (default {DEFAULT_REDIS})."
    )
    p.add_argument(
        "--pg-admin-url",
        default=os.environ.get("INSPECTION_AUDIT_BENCH_PG_ADMIN_URL", DEFAULT_ADMIN_URL),
        help="PostgreSQL database to CREATE/DROP the benchmark database from.",
    )
    p.add_argument(
        "--no-all-cores", action="store_true", help="Skip the all-cores runs of (a)-(c)."
    )
    return p


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The preset (``--quick`` or full) with every option given on the command line applied."""
    cfg = BenchConfig.quick_preset() if args.quick else BenchConfig.full()
    over: dict[str, Any] = {}
    for name in (
        "sizes",
        "e2e_sizes",
        "image_size",
        "reps",
        "min_images",
        "e2e_images",
        "e2e_reps",
        "second_opinions",
        "bank_images",
        "bank_coreset",
    ):
        v = getattr(args, name)
        if v is not None:
            over[name] = v
    return replace(cfg, **over)


def resolve_dataset(arg: Path | None) -> Path:
    """``--dataset``, else ``$INSPECTION_AUDIT_DATASET``, else ``../shared/datasets/magnetic-tile``."""
    if arg is not None:
        return arg
    env = os.environ.get("INSPECTION_AUDIT_DATASET")
    return Path(env) if env else DEFAULT_DATASET


def _print_summary(report: dict[str, Any], cfg: BenchConfig, out: Path) -> None:
    """The console tables: images/s of (a)-(d), (e), the targets and the maps agreement."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"images/s ({'quick smoke run' if cfg.quick else 'full run'}, one thread)")
    table.add_column("B", justify="right")
    for k in KINDS:
        table.add_column(f"({k})", justify="right")
    for b in cfg.sizes:
        table.add_row(str(b), *(fmt(images_per_s(report["core"], k, b), 1) for k in KINDS))
    console.print(table)
    console.print(", ".join(f"({k}) = {KIND_LABELS[k][4:]}" for k in KINDS))
    so = report["second_opinions"]["results"]
    if so:
        st = Table(title="(c) + second opinion through AuditSuite.measure: images/s (× (a))")
        st.add_column("workload")
        for b in cfg.sizes:
            st.add_column(f"B={b}", justify="right")
        for n in dict.fromkeys(r["kind"] for r in so):
            cells = []
            for b in cfg.sizes:
                v = images_per_s(so, n, b)
                cells.append(f"{fmt(v, 1)} ({fmt(ratio(v, images_per_s(report['core'], 'a', b)))})")
            st.add_row(SO_LABELS[n], *cells)
        console.print(st)
    for name, why in report["second_opinions"]["skipped"].items():
        console.print(f"[yellow]{name} not measured: {why}[/]")
    if report["e2e"]:
        et = Table(title="(e) end to end")
        for col in ("B", "workers", "images/s", "peak RSS tree MB", "errors"):
            et.add_column(col, justify="right")
        for r in report["e2e"]:
            et.add_row(
                str(r["batch_size"]),
                str(r["workers"]),
                fmt(r["images_per_s"], 1),
                ", ".join(f"{v:.0f}" for v in r["peak_rss_tree_mb"]),
                str(r["errors"]),
            )
        console.print(et)
    tt = Table(title="targets")
    for col in ("target", "B", "measured", "required", "result"):
        tt.add_column(col)
    for t in report["targets"]:
        digits = 0 if t["unit"] == "MB" else 2
        tt.add_row(
            t["target"],
            str(t["batch_size"]),
            fmt(t["value"], digits),
            f"{t['op']} {fmt(t['required'], digits)}",
            verdict(t["passed"]).replace("**", ""),
        )
    console.print(tt)
    a = report["maps_agreement"]
    console.print(
        f"maps (b) vs (d), max abs diff: defect {a['defect']:.1e}, ok {a['ok']:.1e}, "
        f"eigen {a['agnostic']:.1e}"
    )
    console.print(
        f"wrote {out / 'performance.json'} and {out / 'performance.md'} in {report['seconds']:.0f} s"
    )
    errors = sum(r["errors"] for r in report["e2e"])
    if errors:
        console.print(f"[red]{errors} end-to-end rows had status error[/]")


def _run_e2e_all(
    args: argparse.Namespace,
    cfg: BenchConfig,
    spec: ModelSpec,
    dataset: Path,
    records: Sequence[Any],
    step: Callable[[str], None],
    status: Callable[[str], None],
) -> list[dict[str, Any]]:
    """(e) for every end-to-end batch size and worker count, in a temporary working folder."""
    results: list[dict[str, Any]] = []
    workdir = Path(tempfile.mkdtemp(prefix="inspection-audit-bench-"))
    try:
        ckpt = save_model_checkpoint(spec, workdir / "model.pt")
        n_e2e = min(len(records), max(cfg.e2e_images, 1))
        ctx = E2EContext(
            redis_url=args.redis_url,
            pg_admin_url=args.pg_admin_url,
            checkpoint=ckpt,
            image_root=dataset.resolve(),
            images=[r.path.resolve() for r in records[:n_e2e]],
            workdir=workdir,
        )
        for b in cfg.e2e_sizes:
            for n in cfg.e2e_workers:
                step(f"(e) B={b}, {n} worker(s)")
                results.append(run_e2e(ctx, b, n, cfg, on_status=status))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark with ``argv`` (default ``sys.argv[1:]``); write the reports.

    Returns the exit status: 1 when an end-to-end image ended as an ``error`` row, else 0.
    """
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    pin_env_threads(1)
    console = Console()
    out: Path = args.out or (
        Path(tempfile.gettempdir()) / "inspection-audit-bench-quick" if cfg.quick else REPO / "docs"
    )
    out.mkdir(parents=True, exist_ok=True)
    argv_text = " ".join(sys.argv[1:] if argv is None else argv)
    command = f"python -m bench.throughput {argv_text}".strip()
    machine = machine_info()

    # model and images
    torch.manual_seed(cfg.seed)
    if args.model is not None:
        spec = checkpoint_model(args.model)
        if args.image_size is not None and args.image_size != spec.input_size[0]:
            console.print(f"[yellow]--image-size ignored: the checkpoint is {spec.input_size}[/]")
        cfg = replace(cfg, image_size=spec.input_size[0])
    else:
        spec = random_model(cfg.image_size, cfg.seed)
    so_names = cfg.second_opinions
    dataset = resolve_dataset(args.dataset)
    records: list[Any] = []
    decoded: list[torch.Tensor] = []
    ok_decoded: list[torch.Tensor] = []
    if args.synthetic:
        (size, width), ch = spec.input_size, spec.in_channels
        pool = synthetic_images(cfg.n_pool, size, ch, seed=cfg.seed, width=width)
        if so_names:
            decoded = synthetic_decoded(cfg.n_pool, size, ch, seed=cfg.seed)
            ok_decoded = synthetic_decoded(cfg.bank_images, size, ch, seed=cfg.seed + 1)
        images_text = (
            f"{cfg.n_pool} synthetic images (`--synthetic`, seed {cfg.seed}): {size}×{width} px for "
            f"(a)–(d), {size}×{round(1.5 * size)} px decoded images for the second opinions"
        )
    else:
        records = dataset_records(dataset, cfg.seed)
        with console.status(f"loading {cfg.n_pool} images from {dataset}"):
            pool = load_pool(records, cfg.n_pool, spec)
            if so_names:
                decoded = decoded_images(records, cfg.n_pool, spec.in_channels)
                ok_decoded = decoded_images(
                    ok_records(records, cfg.bank_images), cfg.bank_images, spec.in_channels
                )
        images_text = (
            f"{cfg.n_pool} magnetic-tile images from {dataset} (manifest order shuffled "
            f"with seed {cfg.seed})"
        )
    run_e2e_now = not args.skip_e2e and not args.synthetic
    n_all = all_cores()
    run_all = not args.no_all_cores and n_all > 1
    gpu = torch.cuda.is_available()
    steps = len(cfg.sizes) * (4 + (3 if run_all else 0) + (4 if gpu else 0)) + 1
    if so_names:
        n_so = len(so_names)
        steps += 1 + ("auditor" in so_names) + ("snapshots" in so_names)
        steps += sum(n.startswith("anomaly_") for n in so_names)
        steps += len(cfg.sizes) * (1 + n_so + (n_so >= 2))
    if run_e2e_now:
        steps += len(cfg.e2e_sizes) * len(cfg.e2e_workers)
    if args.profile:
        steps += 1

    report: dict[str, Any] = {
        "command": command,
        "machine": machine,
        "config": asdict(cfg),
        "model": spec.description,
        "images": images_text,
        "all_cores_threads": n_all,
        "what_was_timed": WHAT_WAS_TIMED,
        "core": [],
        "second_opinions": {
            "selected": list(so_names),
            "setup": {},
            "skipped": {},
            "results": [],
            "note": None if so_names else "Not measured (`--second-opinions none`).",
        },
        "e2e": [],
    }
    if args.synthetic and not args.skip_e2e:
        report["e2e_note"] = "Not measured: `--synthetic` has no image files to enqueue."
    t_start = time.perf_counter()
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("benchmark", total=steps)
        first = [True]

        def step(desc: str) -> None:
            if not first[0]:
                progress.advance(task)
            first[0] = False
            progress.update(task, description=desc)

        def status(desc: str) -> None:
            progress.update(task, description=desc)

        step("maps agreement (b) vs (d)")
        b_agree = min(4, pool.shape[0])
        report["maps_agreement"] = {"batch_size": b_agree, **maps_agreement(spec, pool, b_agree)}
        setup = None
        if so_names:  # before (a)-(d): a bad --auditor fails here, not after minutes of timing
            step("second opinions: loading the production model")
            setup = prepare_second_opinions(
                spec,
                cfg,
                ok_decoded,
                auditor=args.auditor,
                snapshots=args.snapshots,
                on_step=step,
            )
            report["second_opinions"].update(setup=setup.info, skipped=setup.skipped)
        report["core"] += run_core(spec, pool, cfg, n_threads=1, on_step=step)
        if setup is not None:
            report["second_opinions"]["results"] = run_second_opinions(
                setup, decoded, cfg, on_step=step
            )
            del setup
        if run_all:
            report["core"] += run_core(
                spec, pool, cfg, n_threads=n_all, kinds=("a", "b", "c"), on_step=step
            )
        if gpu:
            dev = "cuda"
            gcore = run_core(spec, pool, cfg, n_threads=1, device=dev, on_step=step)
            report["gpu"] = {
                "name": torch.cuda.get_device_name(0),
                "device": dev,
                "core": gcore,
                "agreement": device_agreement(spec, pool, min(8, pool.shape[0]), dev),
            }
        if args.profile:
            step("profiling (b) and (c) at B=8")
            pb = 8 if not cfg.quick else max(cfg.sizes)
            text = profile_engine(spec, pool, pb)
            (out / "profile.txt").write_text(
                f"# {command}\n# {machine['date']}, {machine['cpu_model']}, torch {machine['torch']}\n\n"
                + text
            )
            report["profile"] = str(display_path(out / "profile.txt"))
        if run_e2e_now:
            report["e2e"] = _run_e2e_all(args, cfg, spec, dataset, records, step, status)
        progress.advance(task)
        progress.update(task, description="done")
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    report["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    report["targets"] = evaluate_targets(
        report["core"],
        report["e2e"],
        cfg.sizes,
        cfg.e2e_sizes,
        report["second_opinions"]["results"],
    )
    write_reports(report, out)
    _print_summary(report, cfg, out)
    return 1 if sum(r["errors"] for r in report["e2e"]) else 0


if __name__ == "__main__":
    sys.exit(main())
