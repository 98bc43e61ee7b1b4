"""security events: signed messages that did not verify

Revision ID: 0012_signing
Revises: 0011_auth
"""
from alembic import op
import sqlalchemy as sa


revision = '0012_signing'
down_revision = '0011_auth'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('security_events',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('agent_id', sa.String(length=128), nullable=True),
    sa.Column('source', sa.String(length=20), nullable=False),
    sa.Column('code', sa.String(length=50), nullable=False),
    sa.Column('detail', sa.Text(), nullable=False),
    sa.Column('excerpt', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('security_events', schema=None) as batch_op:
        batch_op.create_index('ix_security_events_at', ['at'], unique=False)
        batch_op.create_index('ix_security_events_agent_id', ['agent_id'], unique=False)
        batch_op.create_index('ix_security_events_code', ['code'], unique=False)


def downgrade() -> None:
    op.drop_table('security_events')
