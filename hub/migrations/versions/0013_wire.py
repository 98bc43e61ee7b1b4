"""agents.heartbeat_hlc: a replayed heartbeat is refused

Revision ID: 0013_wire
Revises: 0012_signing
"""
from alembic import op
import sqlalchemy as sa


revision = '0013_wire'
down_revision = '0012_signing'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('agents', schema=None) as batch_op:
        batch_op.add_column(sa.Column('heartbeat_hlc', sa.String(length=200), server_default='', nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('agents', schema=None) as batch_op:
        batch_op.drop_column('heartbeat_hlc')
