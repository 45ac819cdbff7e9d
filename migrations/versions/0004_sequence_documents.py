"""sequences record every document they hold

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 13:30:00

Builds pack short documents into full sequences, each opened by a BOS, so a sequence may hold
several. `sequences.doc_starts` lists them: int32 little-endian (offset, doc_index) rows, the
first at offset 0 (app/store/codec.py). A row written before this revision knew only its first
document, so it becomes one document, its doc_index, at offset 0 (what its run recorded; a
rebuild records the rest).
"""

import struct
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CHUNK = 10_000


def upgrade() -> None:
    # A nullable column: adding it needs no table copy on SQLite (the table is WITHOUT ROWID,
    # which a batch copy would have to restate); every row is filled below.
    op.add_column('sequences', sa.Column('doc_starts', sa.LargeBinary(), nullable=True))
    conn = op.get_bind()
    rows = conn.execute(sa.text(
        "SELECT run_id, seq_index, doc_index FROM sequences")).all()
    fill = sa.text("UPDATE sequences SET doc_starts = :blob "
                   "WHERE run_id = :run_id AND seq_index = :seq_index")
    for at in range(0, len(rows), CHUNK):
        conn.execute(fill, [
            {"blob": struct.pack("<ii", 0, doc_index), "run_id": run_id, "seq_index": seq_index}
            for run_id, seq_index, doc_index in rows[at:at + CHUNK]])


def downgrade() -> None:
    # SQLite >= 3.35 drops a plain column in place, so the WITHOUT ROWID table is not copied.
    op.drop_column('sequences', 'doc_starts')
