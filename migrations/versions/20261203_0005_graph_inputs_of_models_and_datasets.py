"""graph inputs of models and input arrays of datasets

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03 16:20:00

Models may take several inputs (input_ids, attention_mask) and integer ones (token ids); datasets hold
one array per input. Both record them as JSON. Rows from before stay null: one float32 input of
input_shape, which is what they were.
"""
from collections.abc import Sequence

from alembic import op
import sqlalchemy as sa


revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('model', schema=None) as batch_op:
        batch_op.add_column(sa.Column('inputs', sa.JSON(), nullable=True))
    with op.batch_alter_table('dataset', schema=None) as batch_op:
        batch_op.add_column(sa.Column('inputs', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('dataset', schema=None) as batch_op:
        batch_op.drop_column('inputs')
    with op.batch_alter_table('model', schema=None) as batch_op:
        batch_op.drop_column('inputs')
