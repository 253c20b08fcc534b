"""Docker does not run on the development machines, so the deployment files are checked by reading:
every command they run exists in the CLI, every PBRF_ variable is a real setting, the image runs as
a non-root user and bakes in no secrets, and compose starts the API only after the migration."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from app.cli import app as cli
from app.core.config import Settings

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = {c.name or c.callback.__name__ for c in cli.registered_commands}


def _check_command(argv: list[str]) -> None:
    assert argv[0] == "pbrf-audit", argv
    assert argv[1] in COMMANDS, f"{argv[1]} is not a pbrf-audit command ({sorted(COMMANDS)})"


def test_dockerfile():
    text = (ROOT / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
    assert not re.search(r"^(ENV|ARG)\s+.*(PASSWORD|SECRET|TOKEN|API_KEY)", text, re.M | re.I)
    cmd = re.search(r'^CMD\s+(\[.*\])', text, re.M).group(1)
    _check_command(yaml.safe_load(cmd))
    for copied in re.findall(r"^COPY\s+(.+)\s+\S+$", text, re.M):
        for path in copied.split():
            assert (ROOT / path).exists(), path
    assert "torch==2.14.1" in text and "torch==2.14.1" in (ROOT / "Makefile").read_text()


def test_compose_services_commands_and_settings():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"api", "worker", "redis", "postgres", "migrate"} <= services.keys()
    fields = {f"PBRF_{name.upper()}" for name in Settings.model_fields}
    for name in ("api", "worker", "migrate"):
        service = services[name]
        _check_command(service["command"])
        for variable in service["environment"]:
            if variable.startswith("PBRF_"):
                assert variable in fields, f"{name}: {variable} is not a setting"
        assert service["environment"]["PBRF_DATABASE_URL"].startswith("postgresql")
        assert service["environment"]["PBRF_BROKER_URL"].startswith("redis://redis")
    assert services["migrate"]["command"][1] == "migrate"
    for name in ("api", "worker"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    # api and worker share the artifact store
    assert services["api"]["volumes"][0].split(":")[0] == services["worker"]["volumes"][0].split(":")[0]
    assert "${POSTGRES_PASSWORD" in (ROOT / "docker-compose.yml").read_text()
    # the stack never runs open: API keys come from the environment
    assert services["api"]["environment"]["PBRF_API_KEYS"].startswith("${PBRF_API_KEYS:?")
