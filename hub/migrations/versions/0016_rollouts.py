"""rollouts and rollout_devices (staged rollouts of fleet tasks)

Revision ID: 0016_rollouts
Revises: 0015_artifacts
"""
from alembic import op
import sqlalchemy as sa

revision = '0016_rollouts'
down_revision = '0015_artifacts'
branch_labels = None
depends_on = None

def upgrade() -> None:
    op.create_table(
        'rollouts',
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('dag_id', sa.String(length=250), nullable=False),
        sa.Column('run_pk', sa.Integer(), nullable=False),
        sa.Column('run_id', sa.String(length=250), nullable=False),
        sa.Column('task_id', sa.String(length=250), nullable=False),
        sa.Column('job_type', sa.String(length=100), nullable=False),
        sa.Column('policy', sa.JSON(), nullable=False),
        sa.Column('selector', sa.JSON(), nullable=False),
        sa.Column('state', sa.String(length=20), nullable=False),
        sa.Column('batch', sa.Integer(), nullable=False),
        sa.Column('total', sa.Integer(), nullable=False),
        sa.Column('seed', sa.BigInteger(), nullable=True),
        sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('deadline', sa.DateTime(timezone=True), nullable=True),
        sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('reason', sa.Text(), nullable=True),
        sa.Column('actor', sa.String(length=200), nullable=False),
        sa.ForeignKeyConstraint(['run_pk'], ['dag_runs.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('run_pk', 'task_id'),
    )
    op.create_index('ix_rollouts_state', 'rollouts', ['state'], unique=False)
    op.create_index(op.f('ix_rollouts_dag_id'), 'rollouts', ['dag_id'], unique=False)
    op.create_table(
        'rollout_devices',
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('rollout_id', sa.Integer(), nullable=False),
        sa.Column('seq', sa.Integer(), nullable=False),
        sa.Column('agent_id', sa.String(length=128), nullable=False),
        sa.Column('ti_id', sa.Integer(), nullable=False),
        sa.Column('groups', sa.JSON(), nullable=False),
        sa.Column('state', sa.String(length=20), nullable=False),
        sa.Column('batch', sa.Integer(), nullable=True),
        sa.Column('notified_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('error_code', sa.String(length=50), nullable=True),
        sa.ForeignKeyConstraint(['rollout_id'], ['rollouts.id'], ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['ti_id'], ['task_instances.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('rollout_id', 'agent_id'),
    )
    op.create_index('ix_rollout_devices_rollout_state', 'rollout_devices', ['rollout_id', 'state'], unique=False)
    op.create_index('ix_rollout_devices_rollout_seq', 'rollout_devices', ['rollout_id', 'seq'], unique=False)
    op.create_index(op.f('ix_rollout_devices_ti_id'), 'rollout_devices', ['ti_id'], unique=False)

def downgrade() -> None:
    op.drop_table('rollout_devices')
    op.drop_table('rollouts')
