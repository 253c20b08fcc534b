"""attributions of audits

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03 20:30:00

Train-to-query attribution jobs over a succeeded audit's stored curvature: the same lifecycle
columns as an audit, the uploaded query set and the results file in the artifact store.
"""
from collections.abc import Sequence

from alembic import op
import sqlalchemy as sa


revision: str = '0007'
down_revision: str | None = '0006'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'attribution',
        sa.Column('id', sa.Uuid(), nullable=False),
        sa.Column('tenant_id', sa.String(length=64), nullable=False),
        sa.Column('audit_id', sa.Uuid(), nullable=False),
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
        sa.Column('top_k', sa.Integer(), nullable=False),
        sa.Column('num_queries', sa.Integer(), nullable=False),
        sa.Column('query_format', sa.String(length=16), nullable=False),
        sa.Column('query_sha256', sa.String(length=64), nullable=False),
        sa.Column('query_size_bytes', sa.Integer(), nullable=False),
        sa.Column('results_sha256', sa.String(length=64), nullable=True),
        sa.ForeignKeyConstraint(['audit_id'], ['audit.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id'),
    )
    with op.batch_alter_table('attribution', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_attribution_audit_id'), ['audit_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_attribution_status'), ['status'], unique=False)
        batch_op.create_index(batch_op.f('ix_attribution_tenant_id'), ['tenant_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('attribution', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_attribution_tenant_id'))
        batch_op.drop_index(batch_op.f('ix_attribution_status'))
        batch_op.drop_index(batch_op.f('ix_attribution_audit_id'))
    op.drop_table('attribution')
