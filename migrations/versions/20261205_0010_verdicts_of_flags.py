"""verdicts of flags

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05 10:00:00

Reviewers' verdicts on flagged examples (mislabeled, with the corrected label; correct; unsure), keyed
by tenant, dataset content (sha256) and example index, so that later audits of the same data show them
and the dataset's labels can be exported with the accepted corrections.
"""
from collections.abc import Sequence

from alembic import op
import sqlalchemy as sa


revision: str = '0010'
down_revision: str | None = '0009'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'flag_verdict',
        sa.Column('tenant_id', sa.String(length=64), nullable=False),
        sa.Column('dataset_sha256', sa.String(length=64), nullable=False),
        sa.Column('example_index', sa.Integer(), nullable=False),
        sa.Column('verdict', sa.String(length=16), nullable=False),
        sa.Column('corrected_label', sa.Integer(), nullable=True),
        sa.Column('verdict_by', sa.String(length=255), nullable=True),
        sa.Column('verdict_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('tenant_id', 'dataset_sha256', 'example_index', name=op.f('pk_flag_verdict')),
    )


def downgrade() -> None:
    op.drop_table('flag_verdict')
