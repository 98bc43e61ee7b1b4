"""offline operation: device_offline timing, scheduled-ahead assignments, clock skew

Revision ID: 0003_offline
Revises: 0002
"""
from alembic import op
import sqlalchemy as sa


revision = '0003_offline'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('task_instances', schema=None) as batch_op:
        batch_op.add_column(sa.Column('offline_since', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('offline_until', sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index(batch_op.f('ix_task_instances_offline_until'), ['offline_until'], unique=False)
    with op.batch_alter_table('assignments', schema=None) as batch_op:
        batch_op.add_column(sa.Column('not_before', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('deadline', sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table('agents', schema=None) as batch_op:
        batch_op.add_column(sa.Column('clock_skew', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('clock_skew_flagged_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('agents', schema=None) as batch_op:
        batch_op.drop_column('clock_skew_flagged_at')
        batch_op.drop_column('clock_skew')
    with op.batch_alter_table('assignments', schema=None) as batch_op:
        batch_op.drop_column('deadline')
        batch_op.drop_column('not_before')
    with op.batch_alter_table('task_instances', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_task_instances_offline_until'))
        batch_op.drop_column('offline_until')
        batch_op.drop_column('offline_since')
