"""variables and connections, encrypted at rest

Revision ID: 0009_secrets
Revises: 0008_identity
"""
import sqlalchemy as sa
from alembic import op


revision = '0009_secrets'
down_revision = '0008_identity'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'variables',
        sa.Column('key', sa.String(length=250), nullable=False),
        sa.Column('value_encrypted', sa.Text(), nullable=False),
        sa.Column('description', sa.Text(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('key'),
    )
    op.create_table(
        'connections',
        sa.Column('conn_id', sa.String(length=250), nullable=False),
        sa.Column('conn_type', sa.String(length=100), nullable=False),
        sa.Column('description', sa.Text(), nullable=False),
        sa.Column('host', sa.String(length=500), nullable=True),
        sa.Column('login', sa.String(length=500), nullable=True),
        sa.Column('port', sa.Integer(), nullable=True),
        sa.Column('schema', sa.String(length=500), nullable=True),
        sa.Column('password_encrypted', sa.Text(), nullable=True),
        sa.Column('extra_encrypted', sa.Text(), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('conn_id'),
    )


def downgrade() -> None:
    op.drop_table('connections')
    op.drop_table('variables')
