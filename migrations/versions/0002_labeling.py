"""labeling: users, sign-in sessions, one label per author, tags, revisions, queue, full-text

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02 09:00:00

Today's one-label-per-feature rows become labels by their author (an empty author becomes
"legacy"), status "reviewed" becomes "accepted", and each label_history row becomes a revision
whose `before` is the previous history row. Full-text search: an FTS5 table kept by triggers on
SQLite, a GIN index over a tsvector expression on PostgreSQL (store/labels.py queries both).
"""

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The SQLite full-text table (with prefix indexes: search-as-you-type makes the last word a prefix)
# and the triggers that keep it in step with `labels`. A later batch
# migration of `labels` on SQLite copies the table and drops these triggers: recreate them there.
SQLITE_FTS = [
    "CREATE VIRTUAL TABLE labels_fts USING fts5(description, tags, notes, content='labels', "
    "content_rowid='id', tokenize='unicode61 remove_diacritics 2', prefix='2 3')",
    "CREATE TRIGGER labels_fts_insert AFTER INSERT ON labels BEGIN "
    "INSERT INTO labels_fts(rowid, description, tags, notes) "
    "VALUES (new.id, new.description, new.tags, new.notes); END",
    "CREATE TRIGGER labels_fts_delete AFTER DELETE ON labels BEGIN "
    "INSERT INTO labels_fts(labels_fts, rowid, description, tags, notes) "
    "VALUES ('delete', old.id, old.description, old.tags, old.notes); END",
    "CREATE TRIGGER labels_fts_update AFTER UPDATE ON labels BEGIN "
    "INSERT INTO labels_fts(labels_fts, rowid, description, tags, notes) "
    "VALUES ('delete', old.id, old.description, old.tags, old.notes); "
    "INSERT INTO labels_fts(rowid, description, tags, notes) "
    "VALUES (new.id, new.description, new.tags, new.notes); END",
]
# Must match store/labels.py's PG_SEARCH_VECTOR character for character, or the planner will not
# use the index.
PG_SEARCH_INDEX = (
    "CREATE INDEX ix_labels_search ON labels USING gin ("
    "to_tsvector('simple'::regconfig, description || ' ' || notes || ' ' || (tags)::text))"
)


def _old_rows() -> tuple[list, list]:
    conn = op.get_bind()
    labels = conn.execute(sa.text(
        "SELECT id, sae_id, feature_index, description, tags, status, author, version, "
        "updated_at FROM labels ORDER BY id")).mappings().all()
    history = conn.execute(sa.text(
        "SELECT sae_id, feature_index, version, description, tags, status, author, created_at "
        "FROM label_history ORDER BY sae_id, feature_index, version, id")).mappings().all()
    return list(labels), list(history)


def _tags(raw) -> list[str]:  # noqa: ANN001 - JSON text or an already decoded list
    import json

    if raw is None:
        return []
    return list(json.loads(raw) if isinstance(raw, str) else raw)


def _when(raw) -> datetime:  # noqa: ANN001 - SQLite hands back text
    if isinstance(raw, datetime):
        return raw
    if raw:
        return datetime.fromisoformat(str(raw))
    return datetime.now(UTC).replace(tzinfo=None)


def _status(old: str) -> str:
    return {"reviewed": "accepted", "rejected": "rejected"}.get(old, "draft")


def upgrade() -> None:
    old_labels, old_history = _old_rows()
    op.drop_table('labels')
    with op.batch_alter_table('label_history', schema=None) as batch_op:
        batch_op.drop_index('ix_label_history_feature')
    op.drop_table('label_history')

    op.create_table('users',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('role', sa.String(length=16), nullable=False),
    sa.Column('token_hash', sa.String(length=64), nullable=False),
    sa.Column('disabled', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_users')),
    sa.UniqueConstraint('name', name=op.f('uq_users_name')),
    sa.UniqueConstraint('token_hash', name=op.f('uq_users_token_hash'))
    )
    op.create_table('auth_sessions',
    sa.Column('id_hash', sa.String(length=64), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('expires_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_auth_sessions_user_id_users'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id_hash', name=op.f('pk_auth_sessions'))
    )
    with op.batch_alter_table('auth_sessions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_auth_sessions_user_id'), ['user_id'], unique=False)

    labels = op.create_table('labels',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('sae_id', sa.String(length=200), nullable=False),
    sa.Column('feature_index', sa.Integer(), nullable=False),
    sa.Column('author', sa.String(length=200), nullable=False),
    sa.Column('author_kind', sa.String(length=16), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=True),
    sa.Column('description', sa.Text(), nullable=False),
    sa.Column('tags', sa.JSON(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('confidence', sa.Float(), nullable=True),
    sa.Column('notes', sa.Text(), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('reviewed_by', sa.String(length=64), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('updated_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_labels_user_id_users'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_labels')),
    sa.UniqueConstraint('sae_id', 'feature_index', 'author_kind', 'author', name=op.f('uq_labels_sae_id')),
    sqlite_autoincrement=True
    )
    with op.batch_alter_table('labels', schema=None) as batch_op:
        batch_op.create_index('ix_labels_author', ['author', 'sae_id'], unique=False)
        batch_op.create_index('ix_labels_feature', ['sae_id', 'feature_index'], unique=False)

    tags = op.create_table('label_tags',
    sa.Column('label_id', sa.Integer(), nullable=False),
    sa.Column('tag', sa.String(length=64), nullable=False),
    sa.ForeignKeyConstraint(['label_id'], ['labels.id'], name=op.f('fk_label_tags_label_id_labels'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('label_id', 'tag', name=op.f('pk_label_tags'))
    )
    with op.batch_alter_table('label_tags', schema=None) as batch_op:
        batch_op.create_index('ix_label_tags_tag', ['tag', 'label_id'], unique=False)

    revisions = op.create_table('label_revisions',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('label_id', sa.Integer(), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('sae_id', sa.String(length=200), nullable=False),
    sa.Column('feature_index', sa.Integer(), nullable=False),
    sa.Column('action', sa.String(length=16), nullable=False),
    sa.Column('actor', sa.String(length=200), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('before', sa.JSON(), nullable=True),
    sa.Column('after', sa.JSON(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_label_revisions')),
    sa.UniqueConstraint('label_id', 'version', name=op.f('uq_label_revisions_label_id'))
    )
    with op.batch_alter_table('label_revisions', schema=None) as batch_op:
        batch_op.create_index('ix_label_revisions_feature', ['sae_id', 'feature_index', 'id'], unique=False)

    op.create_table('label_leases',
    sa.Column('sae_id', sa.String(length=200), nullable=False),
    sa.Column('feature_index', sa.Integer(), nullable=False),
    sa.Column('user_name', sa.String(length=64), nullable=False),
    sa.Column('expires_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('sae_id', 'feature_index', name=op.f('pk_label_leases'))
    )
    op.create_table('label_skips',
    sa.Column('user_name', sa.String(length=64), nullable=False),
    sa.Column('sae_id', sa.String(length=200), nullable=False),
    sa.Column('feature_index', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('user_name', 'sae_id', 'feature_index', name=op.f('pk_label_skips'))
    )

    if op.get_bind().dialect.name == "sqlite":
        for statement in SQLITE_FTS:
            op.execute(statement)
    else:
        op.execute(PG_SEARCH_INDEX)
    _migrate_rows(labels, tags, revisions, old_labels, old_history)


def _migrate_rows(labels, tags, revisions, old_labels, old_history) -> None:  # noqa: ANN001
    history: dict[tuple[str, int], list] = {}
    for row in old_history:
        history.setdefault((row["sae_id"], row["feature_index"]), []).append(row)
    label_rows, tag_rows, revision_rows = [], [], []
    for old in old_labels:
        author = old["author"] or "legacy"
        clean_tags = _tags(old["tags"])
        label_rows.append({
            "id": old["id"], "sae_id": old["sae_id"], "feature_index": old["feature_index"],
            "author": author, "author_kind": "person", "user_id": None,
            "description": old["description"], "tags": clean_tags,
            "status": _status(old["status"]), "confidence": None, "notes": "",
            "version": old["version"], "reviewed_by": None,
            "created_at": _when(old["updated_at"]), "updated_at": _when(old["updated_at"]),
        })
        tag_rows += [{"label_id": old["id"], "tag": tag} for tag in dict.fromkeys(clean_tags)]
        before = None
        for h in history.get((old["sae_id"], old["feature_index"]), []):
            after = {"description": h["description"], "tags": _tags(h["tags"]),
                     "status": _status(h["status"]), "confidence": None, "notes": ""}
            revision_rows.append({
                "label_id": old["id"], "version": h["version"], "sae_id": old["sae_id"],
                "feature_index": old["feature_index"],
                "action": "create" if before is None else "edit",
                "actor": h["author"] or "legacy", "created_at": _when(h["created_at"]),
                "before": before, "after": after,
            })
            before = after
    if label_rows:
        op.bulk_insert(labels, label_rows)
    if tag_rows:
        op.bulk_insert(tags, tag_rows)
    if revision_rows:
        op.bulk_insert(revisions, revision_rows)
    if label_rows and op.get_bind().dialect.name == "postgresql":
        # Rows went in with their old ids: move the id sequence past them.
        op.execute("SELECT setval(pg_get_serial_sequence('labels', 'id'), "
                   "(SELECT max(id) FROM labels))")


def downgrade() -> None:
    raise NotImplementedError(
        "0002 replaced one label per feature by one per author; restore a backup to go back"
    )
