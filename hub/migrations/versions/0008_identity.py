"""device identity (public keys, revocation, send sequence) and the audit log

Revision ID: 0008_identity
Revises: 0007_log_retention
"""
from alembic import op
import sqlalchemy as sa


revision = '0008_identity'
down_revision = '0007_log_retention'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('agents', schema=None) as batch_op:
        batch_op.add_column(sa.Column('public_key', sa.String(length=100), nullable=True))
        batch_op.add_column(sa.Column('registered_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('send_seq', sa.BigInteger(), nullable=False, server_default='0'))
    op.create_table('audit_log',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('actor', sa.String(length=200), nullable=False),
    sa.Column('action', sa.String(length=100), nullable=False),
    sa.Column('target', sa.String(length=300), nullable=False),
    sa.Column('success', sa.Boolean(), nullable=False),
    sa.Column('remote', sa.String(length=100), nullable=False),
    sa.Column('detail', sa.JSON(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('audit_log', schema=None) as batch_op:
        batch_op.create_index('ix_audit_log_at', ['at'], unique=False)
        batch_op.create_index('ix_audit_log_actor', ['actor'], unique=False)
        batch_op.create_index('ix_audit_log_action', ['action'], unique=False)


def downgrade() -> None:
    op.drop_table('audit_log')
    with op.batch_alter_table('agents', schema=None) as batch_op:
        batch_op.drop_column('send_seq')
        batch_op.drop_column('revoked_at')
        batch_op.drop_column('registered_at')
        batch_op.drop_column('public_key')
