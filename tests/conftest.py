"""Fixtures that start the real service: `pbrf-audit serve` (uvicorn + a Celery worker process)
against either the embedded default (SQLite + filesystem:// broker) or PostgreSQL + Redis."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import psycopg
import pytest

ROOT = Path(__file__).resolve().parent.parent
POSTGRES_ADMIN = os.environ.get("PBRF_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("PBRF_TEST_REDIS", "redis://127.0.0.1:6379/0")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def fresh_postgres_database(prefix: str = "pbrf_test"):
    """A new, empty PostgreSQL database, dropped afterwards; yields its SQLAlchemy URL.

    Every service a test starts gets a database of its own: services that shared one would see each
    other's jobs, and one's reaper would re-send another's audit to its own queue and store (where
    the model file is not), failing it."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = POSTGRES_ADMIN.rsplit("/", 1)[0]
    try:
        yield f"postgresql+psycopg://{base.split('://', 1)[1]}/{name}"
    finally:
        with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def raw_postgres_url(sqlalchemy_url: str) -> str:
    """The libpq form (for psycopg) of a URL from fresh_postgres_database."""
    return sqlalchemy_url.replace("postgresql+psycopg://", "postgresql://", 1)


@pytest.fixture
def postgres_url():
    """A database of this test's own (see fresh_postgres_database)."""
    with fresh_postgres_database() as url:
        yield url


class Service:
    """A running `pbrf-audit serve` process tree and an HTTP client for it."""

    def __init__(self, env: dict[str, str], data_dir: Path):
        self.port = free_port()
        self.data_dir = data_dir
        self.env = {**os.environ, **env, "PBRF_DATA_DIR": str(data_dir), "PBRF_PORT": str(self.port),
                    "PYTHONUNBUFFERED": "1"}
        self.log_path = data_dir / "service.log"
        self.process: subprocess.Popen | None = None
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 90) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log = open(self.log_path, "ab")
        self.process = subprocess.Popen([sys.executable, "-m", "app.cli", "serve"], cwd=ROOT, env=self.env,
                                        stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"service exited early:\n{self.log_path.read_text()[-4000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200 and self.worker_ready():
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"service did not become ready:\n{self.log_path.read_text()[-4000:]}")

    def worker_ready(self) -> bool:
        return " ready." in self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 40) -> int:
        """Ctrl-C, as a user would; returns the exit code."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        os.killpg(self.process.pid, signal.SIGINT)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            raise AssertionError("service did not stop within the timeout after Ctrl-C")
        finally:
            self.log.close()

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")


def _service_env(kind: str, postgres_url: str | None) -> dict[str, str]:
    common = {"PBRF_HEARTBEAT_SECONDS": "1", "PBRF_STALE_AFTER_SECONDS": "30", "PBRF_REAPER_INTERVAL_SECONDS": "5",
              "PBRF_MAX_DATASET_BYTES": str(256 * 1024**2)}
    if kind == "embedded":
        return common
    return common | {"PBRF_DATABASE_URL": postgres_url, "PBRF_BROKER_URL": REDIS_URL,
                     "PBRF_QUEUE_NAME": f"pbrf-test-{uuid.uuid4().hex[:8]}"}


@pytest.fixture(scope="session", params=["embedded", "postgres_redis"])
def service(request, tmp_path_factory):
    kind = request.param
    with contextlib.ExitStack() as stack:
        pg = stack.enter_context(fresh_postgres_database()) if kind == "postgres_redis" else None
        svc = Service(_service_env(kind, pg), tmp_path_factory.mktemp(kind))
        svc.kind = kind
        svc.start()
        yield svc
        code = svc.stop()
        assert code == 0, f"service exited with {code} on Ctrl-C:\n{svc.logs()[-3000:]}"


@pytest.fixture(scope="session")
def embedded_service(tmp_path_factory):
    svc = Service(_service_env("embedded", None), tmp_path_factory.mktemp("embedded-only"))
    svc.kind = "embedded"
    svc.start()
    yield svc
    svc.stop()


@pytest.fixture
def client(service):
    with service.client() as c:
        yield c
