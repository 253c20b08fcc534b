"""shards of audits

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04 13:00:00

A sharded audit's shards: per step (fitting stage or scores) and shard of rows, a job row any worker may claim (the audit's
lifecycle columns) and the stored file of its partial sums or scores.
"""
from collections.abc import Sequence

from alembic import op
import sqlalchemy as sa


revision: str = '0008'
down_revision: str | None = '0007'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'audit_shard',
        sa.Column('id', sa.Uuid(), nullable=False),
        sa.Column('tenant_id', sa.String(length=64), nullable=False),
        sa.Column('audit_id', sa.Uuid(), nullable=False),
        sa.Column('step', sa.String(length=32), nullable=False),
        sa.Column('shard_index', sa.Integer(), nullable=False),
        sa.Column('plan', sa.JSON(), nullable=False),
        sa.Column('input_sha256', sa.String(length=64), nullable=True),
        sa.Column('result_sha256', sa.String(length=64), nullable=True),
        sa.Column('seconds', sa.Float(), nullable=True),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('progress', sa.Float(), nullable=False),
        sa.Column('stage', sa.String(length=64), nullable=True),
        sa.Column('error', sa.Text(), nullable=True),
        sa.Column('attempts', sa.Integer(), nullable=False),
        sa.Column('claim_token', sa.String(length=64), nullable=True),
        sa.Column('worker', sa.String(length=255), nullable=True),
        sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('enqueued_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
        sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(['audit_id'], ['audit.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('audit_id', 'step', 'shard_index', name='uq_audit_shard_position'),
    )
    with op.batch_alter_table('audit_shard', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_audit_shard_audit_id'), ['audit_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_audit_shard_status'), ['status'], unique=False)
        batch_op.create_index(batch_op.f('ix_audit_shard_tenant_id'), ['tenant_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('audit_shard', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_audit_shard_tenant_id'))
        batch_op.drop_index(batch_op.f('ix_audit_shard_status'))
        batch_op.drop_index(batch_op.f('ix_audit_shard_audit_id'))
    op.drop_table('audit_shard')
