"""Command line: `pbrf-audit serve` (API + worker), `migrate`, `worker`, `api`, `keys`; and the client
commands `audit`, `status`, `flags`, `export`, which talk to a running server (app/cli_client.py).

`serve` is what `make run` starts: it applies the Alembic migrations, starts a Celery worker
(prefork, PBRF_WORKER_CONCURRENCY processes, one job each) and the uvicorn API, and stops both on Ctrl-C.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import typer

from app.cli_client import register as register_client_commands

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False,
                  help="pbrf-audit: influence-based label auditing service.")
ROOT = Path(__file__).resolve().parent.parent


def _alembic_config(database_url: str | None = None):
    from alembic.config import Config

    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "migrations"))
    config.attributes["configure_logger"] = False
    if database_url:
        config.attributes["database_url"] = database_url
    return config


@app.command()
def migrate() -> None:
    """Apply the database migrations (alembic upgrade head)."""
    from alembic import command

    from app.core.config import get_settings

    command.upgrade(_alembic_config(get_settings().database_url), "head")
    typer.echo("database schema is at the latest revision")


def worker_command(loglevel: str = "INFO", concurrency: int | None = None) -> list[str]:
    """A Celery worker whose prefork pool has `concurrency` processes (PBRF_WORKER_CONCURRENCY), each
    running one job at a time: several share a sharded audit's shards."""
    from app.core.config import get_settings

    concurrency = concurrency or get_settings().worker_concurrency
    return [sys.executable, "-m", "celery", "-A", "worker.celery_app:celery_app", "worker", "--pool", "prefork",
            "--concurrency", str(concurrency), "--loglevel", loglevel, "--without-gossip", "--without-mingle", "-n",
            f"pbrf-worker-{os.getpid()}@%h"]


@app.command()
def worker(loglevel: str = "INFO",
           concurrency: int = typer.Option(None, help="Worker processes (default PBRF_WORKER_CONCURRENCY, 1)")) -> None:
    """Run one Celery worker (prefork; one job per pool process at a time)."""
    os.execv(sys.executable, worker_command(loglevel, concurrency))


@app.command()
def api(host: str | None = None, port: int | None = None) -> None:
    """Run only the HTTP API (uvicorn)."""
    import uvicorn

    from app.core.config import get_settings

    settings = get_settings()
    uvicorn.run("app.main:create_app", factory=True, host=host or settings.host, port=port or settings.port,
                log_level="info")


@app.command()
def serve(host: str | None = None, port: int | None = None, loglevel: str = "INFO") -> None:
    """Migrate, then run the API and one worker together until Ctrl-C."""
    from app.core.config import get_settings

    settings = get_settings()
    migrate()
    host, port = host or settings.host, port or settings.port
    typer.echo(f"pbrf-audit serving on http://{host}:{port}  (docs: http://{host}:{port}/docs)")
    typer.echo(f"  database: {settings.database_url}")
    typer.echo(f"  artifacts: {Path(settings.storage_dir).resolve()}")
    typer.echo(f"  broker: {settings.broker_url}" + (f" (queue folder {settings.queue_dir.resolve()})"
                                                    if settings.embedded_broker else ""))
    worker_env = os.environ.copy()
    cores = os.cpu_count() or 1
    if settings.worker_threads is None and cores > 1:
        # The API shares this machine: its requests wait behind the audit's threads unless a core is left
        # to it (bench/load.py: status polls' p99 at 200 requests per second).
        worker_env["PBRF_WORKER_THREADS"] = str(max(1, (cores - 1) // settings.worker_concurrency))
    children = [
        # PBRF_WORKER_CONCURRENCY processes, at a lower CPU priority than the API: a status poll preempts
        # an audit's arithmetic instead of queueing behind it
        subprocess.Popen(worker_command(loglevel), env=worker_env, preexec_fn=lambda: os.nice(10)),
        subprocess.Popen([sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory", "--host", host,
                          "--port", str(port)]),
    ]
    stopping = False

    def stop(*_args):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        while not stopping and all(child.poll() is None for child in children):
            time.sleep(0.2)
    finally:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)  # warm shutdown for celery, graceful for uvicorn
        deadline = time.monotonic() + 20
        for child in children:
            try:
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
    typer.echo("pbrf-audit stopped")
    if not stopping:
        raise typer.Exit(1)


keys = typer.Typer(help="API keys: each belongs to a tenant; the secret is shown once.")
app.add_typer(keys, name="keys")


@keys.command("create")
def keys_create(tenant: str = typer.Option(..., help="Tenant the key belongs to"),
                name: str = typer.Option("default", help="A label for the key")) -> None:
    """Create a key and print its secret (stored only as a hash)."""
    from app.auth import service
    from app.core.db import get_sessionmaker

    with get_sessionmaker()() as session:
        row, secret = service.create_key(session, tenant, name)
        session.commit()
        typer.echo(f"id: {row.id}\ntenant: {row.tenant_id}\nsecret: {secret}\n(store the secret now: it is not shown again)")


@keys.command("list")
def keys_list() -> None:
    """List keys without their secrets."""
    from app.auth import service
    from app.core.db import get_sessionmaker

    with get_sessionmaker()() as session:
        for row in service.list_keys(session):
            state = f"revoked {row.revoked_at:%Y-%m-%d %H:%M}" if row.revoked_at else "active"
            typer.echo(f"{row.id}  tenant={row.tenant_id}  name={row.name}  {row.prefix}...  {state}")


@keys.command("revoke")
def keys_revoke(key_id: str) -> None:
    """Revoke a key by id."""
    import uuid

    from app.auth import service
    from app.core.db import get_sessionmaker

    with get_sessionmaker()() as session:
        if not service.revoke_key(session, uuid.UUID(key_id)):
            typer.echo("no active key with that id", err=True)
            raise typer.Exit(1)
        session.commit()
        typer.echo(f"revoked {key_id}")


register_client_commands(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
