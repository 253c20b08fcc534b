"""curvature size of audits

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04 16:10:00

The size of an audit's stored curvature file, so that the tenant's storage quota counts it (an exact
curvature is P^2 doubles: up to a GB at the default size limit).
"""
from collections.abc import Sequence

from alembic import op
import sqlalchemy as sa


revision: str = '0009'
down_revision: str | None = '0008'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('audit', schema=None) as batch_op:
        batch_op.add_column(sa.Column('curvature_size_bytes', sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('audit', schema=None) as batch_op:
        batch_op.drop_column('curvature_size_bytes')
