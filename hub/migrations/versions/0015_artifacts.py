"""artifacts and artifact_fetches: the hub's firmware artifact store

Revision ID: 0015_artifacts
Revises: 0014_registry
"""
from alembic import op
import sqlalchemy as sa


revision = '0015_artifacts'
down_revision = '0014_registry'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'artifacts',
        sa.Column('id', sa.String(length=200), nullable=False),
        sa.Column('name', sa.String(length=100), nullable=False),
        sa.Column('version', sa.String(length=100), nullable=False),
        sa.Column('security_version', sa.Integer(), nullable=False),
        sa.Column('hardware', sa.JSON(), nullable=False),
        sa.Column('size', sa.BigInteger(), nullable=False),
        sa.Column('sha256', sa.String(length=64), nullable=False),
        sa.Column('document', sa.Text(), nullable=False),
        sa.Column('state', sa.String(length=20), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('created_by', sa.String(length=200), nullable=False),
        sa.Column('ready_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('downloads', sa.BigInteger(), nullable=False),
        sa.Column('last_download_at', sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint('id'),
    )
    with op.batch_alter_table('artifacts', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_artifacts_name'), ['name'], unique=False)
    op.create_table(
        'artifact_fetches',
        sa.Column('artifact_id', sa.String(length=200), nullable=False),
        sa.Column('agent_id', sa.String(length=128), nullable=False),
        sa.Column('requests', sa.Integer(), nullable=False),
        sa.Column('completed', sa.Boolean(), nullable=False),
        sa.Column('first_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('last_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['artifact_id'], ['artifacts.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('artifact_id', 'agent_id'),
    )
    with op.batch_alter_table('artifact_fetches', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_artifact_fetches_agent_id'), ['agent_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('artifact_fetches', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_artifact_fetches_agent_id'))
    op.drop_table('artifact_fetches')
    with op.batch_alter_table('artifacts', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_artifacts_name'))
    op.drop_table('artifacts')
