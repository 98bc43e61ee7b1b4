"""enrolment tokens and seen agent request signatures

Revision ID: 0010_broker
Revises: 0009_secrets
"""
from alembic import op
import sqlalchemy as sa


revision = '0010_broker'
down_revision = '0009_secrets'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('enrolment_tokens',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('token_hash', sa.String(length=64), nullable=False),
    sa.Column('agent_id', sa.String(length=128), nullable=True),
    sa.Column('labels', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('created_by', sa.String(length=200), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('used_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('used_by', sa.String(length=128), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('token_hash')
    )
    op.create_table('agent_request_signatures',
    sa.Column('digest', sa.String(length=64), nullable=False),
    sa.Column('agent_id', sa.String(length=128), nullable=False),
    sa.Column('seen_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('digest')
    )
    with op.batch_alter_table('agent_request_signatures', schema=None) as batch_op:
        batch_op.create_index('ix_agent_request_signatures_seen_at', ['seen_at'], unique=False)


def downgrade() -> None:
    op.drop_table('agent_request_signatures')
    op.drop_table('enrolment_tokens')
