"""workflow semantics

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 17:29:57.759870
"""
from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('assets',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('uri', sa.String(length=1000), nullable=False),
    sa.Column('extra', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('uri')
    )
    op.create_table('pools',
    sa.Column('name', sa.String(length=256), nullable=False),
    sa.Column('slots', sa.Integer(), nullable=False),
    sa.Column('description', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('name')
    )
    op.create_table('asset_dag_run_queue',
    sa.Column('asset_id', sa.Integer(), nullable=False),
    sa.Column('target_dag_id', sa.String(length=250), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['asset_id'], ['assets.id'], ),
    sa.ForeignKeyConstraint(['target_dag_id'], ['dags.dag_id'], ),
    sa.PrimaryKeyConstraint('asset_id', 'target_dag_id')
    )
    op.create_table('asset_events',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('asset_id', sa.Integer(), nullable=False),
    sa.Column('source_dag_id', sa.String(length=250), nullable=True),
    sa.Column('source_run_id', sa.String(length=250), nullable=True),
    sa.Column('source_task_id', sa.String(length=250), nullable=True),
    sa.Column('source_map_index', sa.Integer(), nullable=False),
    sa.Column('source_agent_id', sa.String(length=128), nullable=True),
    sa.Column('source_event_id', sa.String(length=300), nullable=True),
    sa.Column('extra', sa.JSON(), nullable=False),
    sa.Column('timestamp', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['asset_id'], ['assets.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('source_event_id')
    )
    with op.batch_alter_table('asset_events', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_asset_events_asset_id'), ['asset_id'], unique=False)

    op.create_table('backfills',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('dag_id', sa.String(length=250), nullable=False),
    sa.Column('from_date', sa.DateTime(timezone=True), nullable=False),
    sa.Column('to_date', sa.DateTime(timezone=True), nullable=False),
    sa.Column('run_backwards', sa.Boolean(), nullable=False),
    sa.Column('max_active_runs', sa.Integer(), nullable=False, server_default='16'),
    sa.Column('reprocess_behavior', sa.String(length=20), nullable=False),
    sa.Column('dag_run_conf', sa.JSON(), nullable=False),
    sa.Column('is_paused', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('completed_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['dag_id'], ['dags.dag_id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('backfills', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_backfills_dag_id'), ['dag_id'], unique=False)

    op.create_table('dag_versions',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('dag_id', sa.String(length=250), nullable=False),
    sa.Column('version_number', sa.Integer(), nullable=False),
    sa.Column('structure', sa.JSON(), nullable=False),
    sa.Column('structure_hash', sa.String(length=64), nullable=False),
    sa.Column('fileloc', sa.String(length=1000), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['dag_id'], ['dags.dag_id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('dag_id', 'version_number')
    )
    with op.batch_alter_table('dag_versions', schema=None) as batch_op:
        batch_op.create_index('ix_dag_versions_hash', ['dag_id', 'structure_hash'], unique=False)

    op.create_table('deadline_misses',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('run_pk', sa.Integer(), nullable=False),
    sa.Column('dag_id', sa.String(length=250), nullable=False),
    sa.Column('run_id', sa.String(length=250), nullable=False),
    sa.Column('task_id', sa.String(length=250), nullable=False),
    sa.Column('kind', sa.String(length=20), nullable=False),
    sa.Column('deadline', sa.DateTime(timezone=True), nullable=False),
    sa.Column('detected_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('description', sa.Text(), nullable=False),
    sa.Column('notified_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['run_pk'], ['dag_runs.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('run_pk', 'task_id', 'kind')
    )
    with op.batch_alter_table('deadline_misses', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_deadline_misses_run_pk'), ['run_pk'], unique=False)

    op.create_table('xcoms',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('run_pk', sa.Integer(), nullable=False),
    sa.Column('task_id', sa.String(length=250), nullable=False),
    sa.Column('map_index', sa.Integer(), nullable=False),
    sa.Column('key', sa.String(length=250), nullable=False),
    sa.Column('value', sa.JSON(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['run_pk'], ['dag_runs.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('run_pk', 'task_id', 'map_index', 'key')
    )
    with op.batch_alter_table('xcoms', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_xcoms_run_pk'), ['run_pk'], unique=False)

    op.create_table('callback_requests',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('kind', sa.String(length=30), nullable=False),
    sa.Column('dag_id', sa.String(length=250), nullable=False),
    sa.Column('run_pk', sa.Integer(), nullable=True),
    sa.Column('ti_id', sa.Integer(), nullable=True),
    sa.Column('task_id', sa.String(length=250), nullable=True),
    sa.Column('dag_version_id', sa.Integer(), nullable=True),
    sa.Column('payload', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(['run_pk'], ['dag_runs.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['ti_id'], ['task_instances.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('callback_requests', schema=None) as batch_op:
        batch_op.create_index('ix_callback_requests_pending', ['finished_at'], unique=False)

    with op.batch_alter_table('dag_runs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('data_interval_start', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('data_interval_end', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('dag_version_id', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('backfill_id', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('queued_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('clear_number', sa.Integer(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('triggered_by', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('params', sa.JSON(), nullable=True))
        batch_op.create_index(batch_op.f('ix_dag_runs_backfill_id'), ['backfill_id'], unique=False)
        batch_op.create_foreign_key('fk_dag_runs_dag_version_id', 'dag_versions', ['dag_version_id'], ['id'])
        batch_op.create_foreign_key('fk_dag_runs_backfill_id', 'backfills', ['backfill_id'], ['id'])

    with op.batch_alter_table('dags', schema=None) as batch_op:
        batch_op.add_column(sa.Column('next_data_interval_start', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('next_data_interval_end', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('max_active_runs', sa.Integer(), nullable=False, server_default='16'))
        batch_op.add_column(sa.Column('max_active_tasks', sa.Integer(), nullable=False, server_default='16'))
        batch_op.add_column(sa.Column('latest_version_id', sa.Integer(), nullable=True))

    with op.batch_alter_table('task_instances', schema=None) as batch_op:
        batch_op.add_column(sa.Column('operator', sa.String(length=100), nullable=False, server_default=''))
        batch_op.add_column(sa.Column('pool', sa.String(length=256), nullable=False, server_default='default_pool'))
        batch_op.add_column(sa.Column('pool_slots', sa.Integer(), nullable=False, server_default='1'))
        batch_op.add_column(sa.Column('priority_weight', sa.Integer(), nullable=False, server_default='1'))
        batch_op.add_column(sa.Column('rendered_fields', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('sensor_started_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('pid', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('note', sa.Text(), nullable=True))



def downgrade() -> None:
    with op.batch_alter_table('task_instances', schema=None) as batch_op:
        batch_op.drop_column('note')
        batch_op.drop_column('pid')
        batch_op.drop_column('sensor_started_at')
        batch_op.drop_column('rendered_fields')
        batch_op.drop_column('priority_weight')
        batch_op.drop_column('pool_slots')
        batch_op.drop_column('pool')
        batch_op.drop_column('operator')

    with op.batch_alter_table('dags', schema=None) as batch_op:
        batch_op.drop_column('latest_version_id')
        batch_op.drop_column('max_active_tasks')
        batch_op.drop_column('max_active_runs')
        batch_op.drop_column('next_data_interval_end')
        batch_op.drop_column('next_data_interval_start')

    with op.batch_alter_table('dag_runs', schema=None) as batch_op:
        batch_op.drop_constraint('fk_dag_runs_backfill_id', type_='foreignkey')
        batch_op.drop_constraint('fk_dag_runs_dag_version_id', type_='foreignkey')
        batch_op.drop_index(batch_op.f('ix_dag_runs_backfill_id'))
        batch_op.drop_column('params')
        batch_op.drop_column('triggered_by')
        batch_op.drop_column('clear_number')
        batch_op.drop_column('queued_at')
        batch_op.drop_column('backfill_id')
        batch_op.drop_column('dag_version_id')
        batch_op.drop_column('data_interval_end')
        batch_op.drop_column('data_interval_start')

    with op.batch_alter_table('callback_requests', schema=None) as batch_op:
        batch_op.drop_index('ix_callback_requests_pending')

    op.drop_table('callback_requests')
    with op.batch_alter_table('xcoms', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_xcoms_run_pk'))

    op.drop_table('xcoms')
    with op.batch_alter_table('deadline_misses', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_deadline_misses_run_pk'))

    op.drop_table('deadline_misses')
    with op.batch_alter_table('dag_versions', schema=None) as batch_op:
        batch_op.drop_index('ix_dag_versions_hash')

    op.drop_table('dag_versions')
    with op.batch_alter_table('backfills', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_backfills_dag_id'))

    op.drop_table('backfills')
    with op.batch_alter_table('asset_events', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_asset_events_asset_id'))

    op.drop_table('asset_events')
    op.drop_table('asset_dag_run_queue')
    op.drop_table('pools')
    op.drop_table('assets')
