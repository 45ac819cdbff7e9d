"""label scores: how well a label predicts its feature, and what wrote an automatic label

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03 10:00:00

label_scores: one row per (label, label version, method, scorer, seed): the balanced accuracy of
detection or fuzzing and a random-explanation control beside it. label_explanations: the
explainer, seed and run behind an automatic label's current text (saescope explain resumes by
it). Both cascade with their label.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('label_explanations',
    sa.Column('label_id', sa.Integer(), nullable=False),
    sa.Column('explainer', sa.String(length=200), nullable=False),
    sa.Column('seed', sa.BigInteger(), nullable=False),
    sa.Column('run_id', sa.Integer(), nullable=True),
    sa.Column('label_version', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('details', sa.JSON(), nullable=False),
    sa.ForeignKeyConstraint(['label_id'], ['labels.id'],
                            name=op.f('fk_label_explanations_label_id_labels'),
                            ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('label_id', name=op.f('pk_label_explanations'))
    )
    op.create_table('label_scores',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('label_id', sa.Integer(), nullable=False),
    sa.Column('label_version', sa.Integer(), nullable=False),
    sa.Column('method', sa.String(length=16), nullable=False),
    sa.Column('scorer', sa.String(length=200), nullable=False),
    sa.Column('score', sa.Float(), nullable=True),
    sa.Column('control_score', sa.Float(), nullable=True),
    sa.Column('n_windows', sa.Integer(), nullable=False),
    sa.Column('seed', sa.BigInteger(), nullable=False),
    sa.Column('run_id', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('details', sa.JSON(), nullable=False),
    sa.ForeignKeyConstraint(['label_id'], ['labels.id'],
                            name=op.f('fk_label_scores_label_id_labels'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_label_scores')),
    sa.UniqueConstraint('label_id', 'label_version', 'method', 'scorer', 'seed',
                        name=op.f('uq_label_scores_label_id'))
    )


def downgrade() -> None:
    op.drop_table('label_scores')
    op.drop_table('label_explanations')
