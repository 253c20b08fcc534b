"""`alembic upgrade head` on an empty database gives exactly the models (no drift), on both engines,
and the migrations go down and up again."""

from __future__ import annotations

import pytest
from alembic import command
from sqlalchemy import inspect

from app.cli import _alembic_config
from app.core.db import make_engine


@pytest.fixture(params=["sqlite", "postgres"])
def empty_database(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fresh.db'}"
    return request.getfixturevalue("postgres_url")


def test_upgrade_head_matches_models_and_round_trips(empty_database):
    config = _alembic_config(empty_database)
    command.upgrade(config, "head")
    command.check(config)  # raises if the models and the migrated schema differ
    engine = make_engine(empty_database)
    assert {"model", "dataset", "audit", "audit_flag", "alembic_version"} <= set(inspect(engine).get_table_names())
    command.downgrade(config, "base")
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    command.upgrade(config, "head")
    command.check(config)
    engine.dispose()
