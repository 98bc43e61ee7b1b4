"""enrolment_tokens: uses and use_count (multi-use fleet provisioning tokens)

Revision ID: 0017_token_uses
Revises: 0016_rollouts
"""
from alembic import op
import sqlalchemy as sa


revision = '0017_token_uses'
down_revision = '0016_rollouts'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('enrolment_tokens', schema=None) as batch_op:
        batch_op.add_column(sa.Column('uses', sa.Integer(), server_default='1', nullable=False))
        batch_op.add_column(sa.Column('use_count', sa.Integer(), server_default='0', nullable=False))
    # Tokens used before this revision were one-time tokens used once.
    op.execute("UPDATE enrolment_tokens SET use_count = 1 WHERE used_at IS NOT NULL")


def downgrade() -> None:
    with op.batch_alter_table('enrolment_tokens', schema=None) as batch_op:
        batch_op.drop_column('use_count')
        batch_op.drop_column('uses')
