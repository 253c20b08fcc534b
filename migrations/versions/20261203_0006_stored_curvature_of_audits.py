"""stored curvature of audits

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03 20:00:00

An audit with a blockwise estimator stores its fitted curvature (safetensors in the artifact store)
and the key that identifies it (tenant, model, dataset, estimator and its settings); a later audit
with the same key scores with it instead of fitting again.
"""
from collections.abc import Sequence

from alembic import op
import sqlalchemy as sa


revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('audit', schema=None) as batch_op:
        batch_op.add_column(sa.Column('curvature_key', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('curvature_sha256', sa.String(length=64), nullable=True))
        batch_op.create_index(batch_op.f('ix_audit_curvature_key'), ['curvature_key'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('audit', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_audit_curvature_key'))
        batch_op.drop_column('curvature_sha256')
        batch_op.drop_column('curvature_key')
