"""``python -m bench.web``: the review station with 100,000 audit rows in PostgreSQL.

* latency of the queue page (first page, a filtered page, a deep keyset page), the inspection
  page, the overview and ``/metrics`` through a real uvicorn server (one process), median and
  90th percentile of ``--reps`` requests after warm-up, over HTTP keep-alive;
* ingest: images accepted per second into Redis by ``POST /api/v1/inspections`` (JSON with a
  path under the image roots, and multipart uploads sent inline), ``--clients`` concurrent
  client threads against ``--server-workers`` server processes.

Everything runs on this machine (loopback only) and cleans up after itself: a throwaway
PostgreSQL database, a private Redis queue, a temporary folder. The figures are appended to
``docs/performance.md`` as the section between ``<!-- bench.web -->`` markers (the throughput
sections are left alone). Timing only here, never in tests.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
MARK_START = "<!-- bench.web start -->"
MARK_END = "<!-- bench.web end -->"
USER, PASSWORD, TOKEN = "bench", "bench-password", "bench-token-" + "x" * 32
TARGET_MS = 200.0
TARGET_INGEST = 200.0


@dataclass
class Latency:
    name: str
    path: str
    median_ms: float
    p90_ms: float
    n: int
    bytes: int


def fill_sql(n: int, flagged: float, reviewed: float, errors: float) -> list[str]:
    """SQL that writes ``n`` inspections and audit rows (PostgreSQL, ``generate_series``): a
    share ``flagged`` of them flagged, ``reviewed`` of the flagged reviewed, ``errors`` errors;
    four lines, three stations, two model versions, capture times over the last 30 days."""
    err_every = max(1, round(1 / errors)) if errors else n + 1
    return [
        f"""INSERT INTO inspections (inspection_id, image_ref, line, station, captured_at,
               prediction, score, expected_model_version)
            SELECT 'BENCH-' || lpad(g::text, 7, '0'), 'part.png', 'line-' || (g % 4),
                   'st-' || (g % 3), now() - (g * 25.92 || ' seconds')::interval, 'ok', 0.05,
                   'resnet18-bench' || (g % 2)
            FROM generate_series(1, {n}) AS g""",
        f"""INSERT INTO audits (inspection_id, model_version, method, status, error, p_defect,
               scores, details, decision_score, tau, suspected_false_negative, params,
               overlay_path, worker_host, delivery_count, duplicate_count, decode_ms, score_ms,
               total_ms, created_at, updated_at)
            SELECT i.inspection_id, 'resnet18-bench' || (g % 2), 'iou_gap_adv',
                   CASE WHEN g % {err_every} = 0 THEN 'error' ELSE 'done' END,
                   CASE WHEN g % {err_every} = 0 THEN 'cannot decode image: truncated file' END,
                   CASE WHEN g % {err_every} = 0 THEN NULL ELSE 0.1 END,
                   CASE WHEN g % {err_every} = 0 THEN NULL ELSE jsonb_build_object(
                       'msp', 0.1, 'iou_gap', s.v / 2, 'iou_gap_adv', s.v) END,
                   CASE WHEN g % {err_every} = 0 THEN NULL ELSE '{{"iou_ok": 0.1}}'::jsonb END,
                   CASE WHEN g % {err_every} = 0 THEN NULL ELSE s.v END,
                   0.1 - 0.2 * {flagged} + 0.2 * 0.5,
                   g % {err_every} <> 0 AND s.v >= 0.1 - 0.2 * {flagged} + 0.2 * 0.5,
                   '{{"taus": {{"iou_gap_adv": 0.1}}}}'::jsonb,
                   CASE WHEN g % {err_every} <> 0 THEN '/bench/composite.png' END,
                   'bench:1', 1, 0, 3.0, 40.0, 50.0,
                   i.captured_at + ((g % 600) || ' seconds')::interval,
                   i.captured_at + ((g % 600) || ' seconds')::interval
            FROM generate_series(1, {n}) AS g
            JOIN inspections AS i ON i.inspection_id = 'BENCH-' || lpad(g::text, 7, '0')
            CROSS JOIN LATERAL (SELECT 0.2 * ((g * 7919) % 1000) / 1000.0 AS v) AS s""",
        f"""INSERT INTO reviews (inspection_id, verdict, reviewer, note)
            SELECT inspection_id, CASE WHEN id % 3 = 0 THEN 'confirmed_defect' ELSE 'cleared' END,
                   'bench', NULL
            FROM audits WHERE suspected_false_negative AND id % {max(1, round(1 / reviewed))} = 0""",
        "ANALYZE",
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def server(env: dict[str, str], workers: int, cwd: Path) -> Iterator[str]:
    """A uvicorn subprocess on a free loopback port; yields its base URL."""
    port = _free_port()
    log = cwd / f"server-{port}.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "inspection_audit.web.app:app_from_env", "--factory",
             "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers),
             "--log-level", "warning", "--no-access-log"],
            env=env, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield base
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(5)


def measure(client: httpx.Client, name: str, path: str, reps: int, **kw: Any) -> Latency:
    for _ in range(3):
        r = client.get(path, **kw)
        r.raise_for_status()
    times = []
    size = 0
    for _ in range(reps):
        t = time.perf_counter()
        r = client.get(path, **kw)
        times.append((time.perf_counter() - t) * 1000.0)
        r.raise_for_status()
        size = len(r.content)
    times.sort()
    return Latency(
        name, path, statistics.median(times), times[int(0.9 * (len(times) - 1))], reps, size
    )


def login(client: httpx.Client) -> None:
    import re

    page = client.get("/login").text
    token = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert token is not None
    r = client.post(
        "/login",
        data={"username": USER, "password": PASSWORD, "csrf_token": token.group(1)},
    )
    if r.status_code != 303:
        raise RuntimeError(f"login failed: {r.status_code} {r.text[:200]}")


def ingest_rate(
    base: str, n: int, clients: int, make: Callable[[int], tuple[str, bytes]]
) -> tuple[float, int]:
    """Images per second accepted (202) over ``n`` posts on ``clients`` keep-alive connections.

    The client is a few lines of asyncio writing pre-built HTTP/1.1 requests (``make(k)`` gives
    the content type and body of request ``k``), so that on a machine this small the load
    generator does not eat the cores the server is measured on (httpx in threads cost about as
    much CPU per request as the server itself). Returns (rate, accepted).

    Raises:
        RuntimeError: a response other than 202 (its status and body).
    """
    import asyncio
    from urllib.parse import urlsplit

    parts = urlsplit(base)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    bodies = [make(k) for k in range(n)]  # built before the clock starts
    accepted = 0
    nxt = 0

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, k: int) -> None:
        nonlocal accepted
        ctype, body = bodies[k]
        head = (
            f"POST /api/v1/inspections HTTP/1.1\r\nHost: {host}\r\n"
            f"Authorization: Bearer {TOKEN}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        writer.write(head + body)
        await writer.drain()
        raw = await reader.readuntil(b"\r\n\r\n")
        status = int(raw.split(b" ", 2)[1])
        length = 0
        for line in raw.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        reply = await reader.readexactly(length)
        if status != 202:
            raise RuntimeError(f"ingest answered {status}: {reply[:300]!r}")
        accepted += 1

    async def worker() -> None:
        nonlocal nxt
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while nxt < n:
                k = nxt
                nxt += 1
                await one(reader, writer, k)
        finally:
            writer.close()

    async def main() -> float:
        t = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        return time.perf_counter() - t

    elapsed = asyncio.run(main())
    return accepted / elapsed, accepted


def _png() -> bytes:
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    arr = (rng.uniform(0.3, 0.7, (128, 128)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def run(args: argparse.Namespace) -> dict[str, Any]:
    import redis
    import sqlalchemy as sa

    from db.migrate import upgrade
    from db.session import dispose_engines, make_engine
    from db.testing import create_database, drop_database
    from inspection_audit.procs import worker_env
    from inspection_audit.web.auth import hash_password, hash_token

    tmp = Path(tempfile.mkdtemp(prefix="bench-web-"))
    url = create_database(args.admin_url, prefix="inspection_audit_bench_")
    queue = f"bench-web-{uuid.uuid4().hex[:10]}"
    out: dict[str, Any] = {"rows": args.rows, "queue": queue}
    try:
        upgrade(url)
        t = time.perf_counter()
        with make_engine(url).begin() as conn:
            for stmt in fill_sql(args.rows, args.flagged, args.reviewed, args.errors):
                conn.exec_driver_sql(stmt.replace("%", "%%"))  # psycopg placeholders
        out["fill_s"] = time.perf_counter() - t
        with make_engine(url).connect() as conn:
            out["counts"] = dict(
                conn.execute(
                    sa.text(
                        "SELECT (SELECT count(*) FROM audits) AS audits, "
                        "(SELECT count(*) FROM audits WHERE suspected_false_negative) AS flagged, "
                        "(SELECT count(*) FROM review_queue) AS queue, "
                        "(SELECT count(*) FROM reviews) AS reviews, "
                        "(SELECT count(*) FROM audits WHERE status = 'error') AS errors"
                    )
                )
                .mappings()
                .one()
            )
        dispose_engines(url)
        images = tmp / "images"
        images.mkdir()
        png = _png()
        (images / "part.png").write_bytes(png)
        env = worker_env(
            {
                "database_url": url,
                "broker_url": args.broker_url,
                "queue": queue,
                "home": tmp / "home",
                "image_roots": images,
                "results_dir": tmp / "results",
                "web_users": f"{USER}:{hash_password(PASSWORD)}",
                "api_tokens": f"bench:{hash_token(TOKEN)}",
                "web_secret": "bench-secret-" + "y" * 24,
            }
        )
        latencies: list[Latency] = []
        with server(env, 1, tmp) as base, httpx.Client(base_url=base, timeout=30) as c:
            login(c)
            first = c.get("/queue").text
            import re

            after = re.search(r"after=([^&\"]+)", first)
            bearer = {"headers": {"Authorization": f"Bearer {TOKEN}"}}
            latencies.append(measure(c, "queue, first page (50 rows)", "/queue", args.reps))
            latencies.append(
                measure(c, "queue, filtered (line, model version)",
                        "/queue?line=line-1&model_version=resnet18-bench1", args.reps)
            )  # fmt: skip
            if after:
                latencies.append(
                    measure(c, "queue, next page (keyset)", f"/queue?after={after.group(1)}",
                            args.reps)
                )  # fmt: skip
            latencies.append(measure(c, "inspection page", "/inspections/BENCH-0000007", args.reps))
            latencies.append(measure(c, "overview", "/overview", max(5, args.reps // 3)))
            latencies.append(measure(c, "/metrics", "/metrics", args.reps, **bearer))
            latencies.append(
                measure(c, "GET /api/v1/inspections/{id}", "/api/v1/inspections/BENCH-0000007",
                        args.reps, **bearer)
            )  # fmt: skip
        out["latency"] = latencies
        now = datetime.now(UTC).isoformat()
        fields = {
            "prediction": "ok",
            "score": 0.05,
            "line": "line-1",
            "station": "st-1",
            "captured_at": now,
        }
        b64 = base64.b64encode(png).decode()

        def json_msg(k: int) -> tuple[str, bytes]:
            msg = {"inspection_id": f"ING-J-{k:06d}", "image_path": "part.png", **fields}
            return "application/json", json.dumps(msg).encode()

        def json_inline(k: int) -> tuple[str, bytes]:
            msg = {"inspection_id": f"ING-B-{k:06d}", "image_b64": b64, **fields}
            return "application/json", json.dumps(msg).encode()

        def multipart(k: int) -> tuple[str, bytes]:
            boundary = f"bench{k:08d}"
            out = b""
            for name, value in {"inspection_id": f"ING-M-{k:06d}", **fields}.items():
                out += (
                    f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
                    f"{value}\r\n"
                ).encode()
            out += (
                f'--{boundary}\r\nContent-Disposition: form-data; name="image"; '
                'filename="part.png"\r\nContent-Type: image/png\r\n\r\n'
            ).encode()
            out += png + f"\r\n--{boundary}--\r\n".encode()
            return f"multipart/form-data; boundary={boundary}", out

        rates = {}
        client = redis.Redis.from_url(args.broker_url)
        with server(env, args.server_workers, tmp) as base:
            for name, make in (
                ("JSON, image path", json_msg),
                ("JSON, image inline (base64)", json_inline),
                ("multipart upload (sent inline)", multipart),
            ):
                before = client.llen(queue)
                rate, accepted = ingest_rate(base, args.ingest, args.clients, make)
                landed = client.llen(queue) - before
                rates[name] = (rate, accepted, landed)
        out["ingest"] = rates
        out["png_bytes"] = len(png)
    finally:
        try:
            client = redis.Redis.from_url(args.broker_url)
            keys = list(client.scan_iter(match=f"*{queue}*", count=1000))
            if keys:
                client.delete(*keys)
        except Exception:
            pass
        dispose_engines()
        drop_database(url, args.admin_url)
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "?"


def report(out: dict[str, Any], args: argparse.Namespace, argv: list[str]) -> str:
    c = out["counts"]
    load = os.getloadavg()
    lines = [
        MARK_START,
        "## Review station (`python -m bench.web`)",
        "",
        f"Measured {datetime.now(UTC).isoformat(timespec='seconds')} with "
        f"`{' '.join(['python -m bench.web', *argv])}`"
        + f" (commit {_git_commit()}), on {os.cpu_count()} cores shared with other jobs "
        f"(load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}); Python "
        f"{platform.python_version()}, PostgreSQL and Redis on 127.0.0.1.",
        "",
        f"Database: {c['audits']:,} audit rows ({c['flagged']:,} flagged, {c['errors']:,} errors, "
        f"{c['reviews']:,} verdicts; the review queue holds {c['queue']:,}), written by SQL in "
        f"{out['fill_s']:.1f} s. One uvicorn process; {args.reps} timed requests per row after 3 "
        "warm-up requests, over one keep-alive connection (the client runs on the same cores).",
        "",
        "| request | median (ms) | p90 (ms) | target | response (bytes) |",
        "|---|---:|---:|---|---:|",
    ]
    for lat in out["latency"]:
        target = (
            f"< {TARGET_MS:.0f} ms: {'met' if lat.median_ms < TARGET_MS else 'NOT MET'}"
            if lat.path in ("/queue", "/metrics")
            else ""
        )
        lines.append(
            f"| {lat.name} (`{lat.path}`) | {lat.median_ms:.1f} | {lat.p90_ms:.1f} | {target} "
            f"| {lat.bytes:,} |"
        )
    lines += [
        "",
        f"Ingest: {args.ingest} requests per row on {args.clients} keep-alive connections (a "
        "minimal asyncio client, so that the load generator does not take the cores the server "
        f"is measured on) against {args.server_workers} server processes; every message lands "
        f"in Redis (counted with `LLEN`). Image: a {out['png_bytes']:,}-byte PNG.",
        "",
        "| body | images/s accepted | accepted | in Redis | target |",
        "|---|---:|---:|---:|---|",
    ]
    for name, (rate, accepted, landed) in out["ingest"].items():
        ok = "met" if rate >= TARGET_INGEST else "NOT MET"
        lines.append(
            f"| {name} | {rate:.0f} | {accepted} | {landed} | ≥ {TARGET_INGEST:.0f}/s: {ok} |"
        )
    lines += [
        "",
        "How: the queue is the `review_queue` predicate on the base tables, ordered by "
        "`decision_score` then `audit_id`, which is the partial index `ix_audits_review_queue` "
        "(migration 0005) walked backwards: a page reads its `LIMIT 51` entries and stops, and "
        "a next page starts from its keyset cursor. The total under no filter is counted from "
        "that index alone; a line, station or time filter joins `inspections`. `/metrics` reads "
        "the status counts from `ix_audits_suspected_false_negative_status`, the last minute "
        "and the newest write from `ix_audits_created_at` / `ix_audits_updated_at`, the queue "
        "from the partial index; the capture-to-score histogram keeps the settled rows' totals "
        "per process and reads only the last five minutes' rows at each scrape. The overview "
        "reads the whole table in one grouped pass (line × version × day): its cost grows with "
        "the table.",
        MARK_END,
    ]
    return "\n".join(lines) + "\n"


def write_section(text: str, path: Path) -> None:
    """Replace the section between the markers in ``path``, or append it."""
    doc = path.read_text() if path.exists() else ""
    if MARK_START in doc and MARK_END in doc:
        head, rest = doc.split(MARK_START, 1)
        _, tail = rest.split(MARK_END, 1)
        doc = head + text.rstrip("\n") + tail
    else:
        doc = doc.rstrip("\n") + "\n\n" + text
    path.write_text(doc)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m bench.web", description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--flagged", type=float, default=0.6, help="share of rows flagged")
    p.add_argument("--reviewed", type=float, default=0.05, help="share of flags with a verdict")
    p.add_argument("--errors", type=float, default=0.01, help="share of error rows")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--ingest", type=int, default=1000, help="requests per ingest kind")
    p.add_argument("--clients", type=int, default=8, help="concurrent ingest connections")
    p.add_argument("--server-workers", type=int, default=2)
    p.add_argument("--admin-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    p.add_argument("--broker-url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "performance.md")
    p.add_argument("--no-write", action="store_true", help="print the section only")
    args = p.parse_args(argv)
    out = run(args)
    text = report(out, args, argv)
    print(text)
    if not args.no_write:
        write_section(text, args.out)
        print(f"wrote the section to {args.out}")


if __name__ == "__main__":
    main()
