"""agents: groups, inventory, hardware_model and firmware_version (the device registry)

Revision ID: 0014_registry
Revises: 0013_wire
"""
from alembic import op
import sqlalchemy as sa


revision = '0014_registry'
down_revision = '0013_wire'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('agents', schema=None) as batch_op:
        batch_op.add_column(sa.Column('groups', sa.JSON(), server_default='[]', nullable=False))
        batch_op.add_column(sa.Column('inventory', sa.JSON(), server_default='{}', nullable=False))
        batch_op.add_column(sa.Column('hardware_model', sa.String(length=100), server_default='', nullable=False))
        batch_op.add_column(sa.Column('firmware_version', sa.String(length=50), server_default='', nullable=False))
        batch_op.create_index(batch_op.f('ix_agents_hardware_model'), ['hardware_model'], unique=False)
        batch_op.create_index(batch_op.f('ix_agents_firmware_version'), ['firmware_version'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('agents', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_agents_firmware_version'))
        batch_op.drop_index(batch_op.f('ix_agents_hardware_model'))
        batch_op.drop_column('firmware_version')
        batch_op.drop_column('hardware_model')
        batch_op.drop_column('inventory')
        batch_op.drop_column('groups')
