"""docker-compose.yml is valid (validated offline by the compose client) and has the shape the
deployment relies on. No Docker engine is needed; skips where no compose client exists."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"


def _clients() -> list[list[str]]:
    found = []
    if shutil.which("docker-compose"):
        found.append(["docker-compose"])
    if shutil.which("docker"):
        probe = subprocess.run(
            ["docker", "compose", "version"], capture_output=True, text=True, timeout=30
        )
        if probe.returncode == 0:
            found.append(["docker", "compose"])
    return found


CLIENTS = _clients()


def _compose(
    client: list[str],
    *args: str,
    password: str | None = "test-only",
    extra: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("POSTGRES_", "COMPOSE_", "RABBITMQ_", "BROKER_"))
    }
    if password is not None:
        env["POSTGRES_PASSWORD"] = password
    env.update(extra or {})
    # --project-directory on a folder without .env: a developer's .env must not leak in.
    return subprocess.run(
        [*client, "-f", str(COMPOSE), "--project-directory", str(ROOT / "tests"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


@pytest.fixture(params=CLIENTS or [None], ids=lambda c: " ".join(c) if c else "none")
def client(request: pytest.FixtureRequest) -> list[str]:
    if request.param is None:
        pytest.skip(
            "no compose client (install Debian's docker-compose: apt-get install docker-compose; "
            "scripts/ensure-tools.sh does it in CI)"
        )
    return list(request.param)


def test_config_is_valid(client: list[str]) -> None:
    res = _compose(client, "config", "-q")
    assert res.returncode == 0, res.stderr


def test_services(client: list[str]) -> None:
    res = _compose(client, "--profile", "gpu", "config", "--services")
    assert res.returncode == 0, res.stderr
    # (compose 1.29 lists the services of every profile; v2 only the active ones)
    services = set(res.stdout.split()) - {"rabbitmq"}
    assert services == {"redis", "postgres", "migrate", "worker", "worker-gpu", "web"}


def test_password_comes_from_the_environment(client: list[str]) -> None:
    res = _compose(client, "config", "-q", password=None)
    assert res.returncode != 0
    assert "POSTGRES_PASSWORD" in res.stderr


def test_resolved_config(client: list[str]) -> None:
    """The GPU profile's resolved file (also validated by the client)."""
    res = _compose(client, "--profile", "gpu", "config")
    assert res.returncode == 0, res.stderr
    text = res.stdout
    assert "--appendonly" in text and "redis-data:/data" in text
    assert "pg_isready" in text and "pg-data:/var/lib/postgresql/data" in text
    assert "service_completed_successfully" in text
    assert "postgresql+psycopg://inspection:test-only@postgres:5432/inspection_audit" in text
    assert "driver: nvidia" in text and "gpu" in text
    assert "container_name" not in text  # `--scale worker=N` needs generated names
    # the review station: served on 8000, health-checked, uploads inside the image root
    assert "serve" in text and "/healthz" in text and "/images/uploads" in text


def test_rabbitmq_profile(client: list[str]) -> None:
    """The rabbitmq profile adds RabbitMQ; BROKER_URL points every worker at it."""
    res = _compose(client, "--profile", "rabbitmq", "config", "--services")
    assert res.returncode == 0, res.stderr
    assert {"redis", "postgres", "migrate", "worker", "rabbitmq"} <= set(res.stdout.split())
    url = "amqp://inspection:pw@rabbitmq:5672//"
    res = _compose(
        client,
        "--profile",
        "rabbitmq",
        "config",
        extra={"BROKER_URL": url, "RABBITMQ_PASSWORD": "pw"},
    )
    assert res.returncode == 0, res.stderr
    # migrate, worker (and worker-gpu, which compose 1.29 lists whatever the profile)
    assert res.stdout.count(f"INSPECTION_AUDIT_BROKER_URL: {url}") >= 2
    assert "INSPECTION_AUDIT_BROKER_URL: redis:" not in res.stdout
    assert (
        "RABBITMQ_DEFAULT_PASS: pw" in res.stdout
        and "rabbitmq-data:/var/lib/rabbitmq" in res.stdout
    )
    assert "INSPECTION_AUDIT_RABBITMQ_DELIVERY_LIMIT: '10'" in res.stdout
    default = _compose(client, "config")
    assert "INSPECTION_AUDIT_BROKER_URL: redis://redis:6379/0" in default.stdout


def test_file_shape() -> None:
    """Checks on the file itself (run even without a compose client)."""
    text = COMPOSE.read_text()
    assert "container_name" not in text
    assert 'profiles: ["gpu"]' in text and 'profiles: ["rabbitmq"]' in text
    assert "RABBITMQ_PASSWORD in .env" in text  # no default password
    assert '"--device", "cuda"' in text
    assert "- cpu" in text
    assert "POSTGRES_PASSWORD:?" in text  # no default password
    docker = (ROOT / "Dockerfile").read_text()
    assert "pip install torch==2.14.1 torchvision==0.29.1" in docker
    assert "pip install ." in docker
    assert ".env" in (ROOT / ".dockerignore").read_text().split()
