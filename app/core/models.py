"""Imports every table module so Base.metadata is complete (Alembic and tests use this)."""

from app.artifacts import tables as _artifacts  # noqa: F401
from app.audits import tables as _audits  # noqa: F401
from app.auth import tables as _auth  # noqa: F401
from app.core.db import Base

metadata = Base.metadata
