"""sync cursors for the HTTP bulk sync

Revision ID: 0006_sync
Revises: 0005_exec
"""
from alembic import op
import sqlalchemy as sa


revision = '0006_sync'
down_revision = '0005_exec'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('sync_cursors',
    sa.Column('agent_id', sa.String(length=128), nullable=False),
    sa.Column('stream', sa.String(length=64), nullable=False),
    sa.Column('seq', sa.String(length=64), nullable=False),
    sa.Column('items', sa.BigInteger(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('agent_id')
    )


def downgrade() -> None:
    op.drop_table('sync_cursors')
