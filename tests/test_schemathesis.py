"""Property-based API tests generated from the app's own OpenAPI schema (schemathesis), in process on
the embedded default: no 5xx, and every response matches the documented schema, status and media type."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance


KEY = "schemathesis-key-0123456789abcdef"


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory, monkeypatch_module):
    data_dir = tmp_path_factory.mktemp("schemathesis")
    monkeypatch_module.setenv("PBRF_DATA_DIR", str(data_dir))
    monkeypatch_module.setenv("PBRF_API_KEYS", f"fuzz:{KEY}")
    from app.core import config, db

    config.get_settings.cache_clear()
    db.get_engine.cache_clear()
    db.get_sessionmaker.cache_clear()
    from app.cli import migrate
    from app.main import create_app

    migrate()
    yield schemathesis.openapi.from_asgi("/openapi.json", create_app())
    db.get_engine().dispose()
    from app.auth import service as auth

    auth.static_keys.cache_clear()
    config.get_settings.cache_clear()
    db.get_engine.cache_clear()
    db.get_sessionmaker.cache_clear()


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_api_conforms_to_its_schema(api_schema):
    # Driven through schemathesis' strategies directly (its pytest plugin does not load under this
    # pytest); each operation gets its own Hypothesis run.
    failures = []
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 12
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def run(case):
            # Uploads can be schema-valid and still not be a model or a dataset: their 4xx answers are
            # the point, so "positive data must be accepted" does not apply; every other check does.
            case.call_and_validate(headers={"Authorization": f"Bearer {KEY}"},
                                   excluded_checks=[positive_data_acceptance])

        try:
            run()
        except Exception as exc:  # collect every operation's failure, then report them together
            failures.append(f"{operation.label}: {exc}")
    assert not failures, "\n\n".join(failures)
