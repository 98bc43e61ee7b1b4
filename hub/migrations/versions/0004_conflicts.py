"""conflicts: hub and operator decisions, conflict records, the receive stamp of a result

Revision ID: 0004_conflicts
Revises: 0003_offline
"""
from alembic import op
import sqlalchemy as sa


revision = '0004_conflicts'
down_revision = '0003_offline'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('decisions',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('ti_id', sa.Integer(), nullable=False),
    sa.Column('try_number', sa.Integer(), nullable=False),
    sa.Column('source', sa.String(length=20), nullable=False),
    sa.Column('kind', sa.String(length=30), nullable=False),
    sa.Column('agent_id', sa.String(length=128), nullable=True),
    sa.Column('assignment_id', sa.String(length=64), nullable=True),
    sa.Column('state', sa.String(length=20), nullable=True),
    sa.Column('actor', sa.String(length=128), nullable=True),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('hlc', sa.String(length=200), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['ti_id'], ['task_instances.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('decisions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_decisions_ti_id'), ['ti_id'], unique=False)

    op.create_table('conflicts',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('ti_id', sa.Integer(), nullable=False),
    sa.Column('key', sa.String(length=300), nullable=False),
    sa.Column('run_pk', sa.Integer(), nullable=False),
    sa.Column('dag_id', sa.String(length=250), nullable=False),
    sa.Column('run_id', sa.String(length=250), nullable=False),
    sa.Column('task_id', sa.String(length=250), nullable=False),
    sa.Column('map_index', sa.Integer(), nullable=False),
    sa.Column('agent_id', sa.String(length=128), nullable=True),
    sa.Column('rule', sa.String(length=40), nullable=False),
    sa.Column('kept', sa.JSON(), nullable=False),
    sa.Column('overridden', sa.JSON(), nullable=False),
    sa.Column('resolution', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['ti_id'], ['task_instances.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('ti_id', 'key')
    )
    with op.batch_alter_table('conflicts', schema=None) as batch_op:
        batch_op.create_index('ix_conflicts_rule', ['rule'], unique=False)
        batch_op.create_index(batch_op.f('ix_conflicts_ti_id'), ['ti_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_conflicts_run_pk'), ['run_pk'], unique=False)
        batch_op.create_index(batch_op.f('ix_conflicts_dag_id'), ['dag_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_conflicts_agent_id'), ['agent_id'], unique=False)

    with op.batch_alter_table('task_results', schema=None) as batch_op:
        batch_op.add_column(sa.Column('received_hlc', sa.String(length=200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('task_results', schema=None) as batch_op:
        batch_op.drop_column('received_hlc')
    op.drop_table('conflicts')
    op.drop_table('decisions')
