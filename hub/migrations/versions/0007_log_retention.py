"""index on task_log_chunks.received_at for log retention

Revision ID: 0007_log_retention
Revises: 0006_sync
"""
from alembic import op


revision = '0007_log_retention'
down_revision = '0006_sync'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_task_log_chunks_received_at', 'task_log_chunks', ['received_at'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_task_log_chunks_received_at', table_name='task_log_chunks')
