"""exec: task log chunks and progress of device tasks

Revision ID: 0005_exec
Revises: 0004_conflicts
"""
from alembic import op
import sqlalchemy as sa



revision = '0005_exec'
down_revision = '0004_conflicts'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('task_log_chunks',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('ti_id', sa.Integer(), nullable=False),
    sa.Column('try_number', sa.Integer(), nullable=False),
    sa.Column('agent_id', sa.String(length=128), nullable=False),
    sa.Column('assignment_id', sa.String(length=64), nullable=False),
    sa.Column('seq', sa.Integer(), nullable=False),
    sa.Column('data', sa.Text(), nullable=False),
    sa.Column('final', sa.Boolean(), nullable=False),
    sa.Column('received_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['ti_id'], ['task_instances.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('assignment_id', 'seq')
    )
    op.create_index('ix_task_log_chunks_ti_try', 'task_log_chunks', ['ti_id', 'try_number'], unique=False)
    with op.batch_alter_table('task_instances') as batch:
        batch.add_column(sa.Column('progress', sa.Float(), nullable=True))
        batch.add_column(sa.Column('progress_message', sa.String(length=500), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('task_instances') as batch:
        batch.drop_column('progress_message')
        batch.drop_column('progress')
    op.drop_index('ix_task_log_chunks_ti_try', table_name='task_log_chunks')
    op.drop_table('task_log_chunks')
