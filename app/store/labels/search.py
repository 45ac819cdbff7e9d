"""Label search over description, tags and notes: SQLite FTS5 or PostgreSQL full text, ranked,
with an optional exact tag filter through label_tags. One entry point: search_labels."""

from __future__ import annotations

import re

from sqlalchemy import column, exists, func, literal_column, select, table, text
from sqlalchemy.orm import Session

from app.store.labels.reads import label_info
from app.store.read_models import LabelHit
from app.store.tables import Label, LabelTag

MAX_QUERY_WORDS = 8
MAX_RESULTS = 200
_WORD_RE = re.compile(r"\w+", re.UNICODE)

# SQLite's FTS5 table (migrations/versions/0002), kept in step with labels by triggers.
_fts = table("labels_fts", column("rowid"))
# The expression migrations/versions/0002 indexes with GIN; the same text so the index is used.
PG_SEARCH_VECTOR = ("to_tsvector('simple'::regconfig, description || ' ' || notes || ' ' || "
                    "(tags)::text)")


def query_words(q: str) -> list[str]:
    """The words of a query, lowercased; punctuation and operators are dropped, so no user text
    reaches the full-text query syntax."""
    return [w.lower() for w in _WORD_RE.findall(q or "")][:MAX_QUERY_WORDS]


def search_labels(
    *, session: Session, q: str = "", tag: str | None = None, sae_id: str | None = None,
    limit: int = 50,
) -> list[LabelHit]:
    """Labels matching every word of `q` (the last one as a prefix, for search-as-you-type),
    best first; with only a tag, that tag's labels, newest first."""
    limit = max(1, min(limit, MAX_RESULTS))
    words = query_words(q)
    label_t = Label.__table__
    conditions = []
    if sae_id:
        conditions.append(label_t.c.sae_id == sae_id)
    if tag:
        conditions.append(exists().where(LabelTag.label_id == label_t.c.id,
                                         LabelTag.tag == tag.strip().lower()))
    if not words:
        if not tag:
            return []
        rows = session.execute(select(label_t).where(*conditions)
                               .order_by(label_t.c.updated_at.desc()).limit(limit))
        return [LabelHit(label=label_info(r), score=0.0) for r in rows]
    if session.get_bind().dialect.name == "sqlite":
        # Every word quoted (a phrase of one token), the last one a prefix.
        match = " ".join(f'"{w}"' for w in words[:-1])
        match = f'{match} "{words[-1]}"*'.strip()
        # bm25 is smaller for better matches; description counts most, then tags, then notes.
        score = literal_column("bm25(labels_fts, 4.0, 2.0, 1.0)")
        stmt = (select(label_t, (-score).label("score"))
                .select_from(_fts.join(label_t, label_t.c.id == _fts.c.rowid))
                .where(text("labels_fts MATCH :match"), *conditions)
                .order_by(score).limit(limit))
        rows = session.execute(stmt, {"match": match})
    else:
        tsquery = " & ".join([*words[:-1], f"{words[-1]}:*"])
        vector = literal_column(PG_SEARCH_VECTOR)
        query = func.to_tsquery(literal_column("'simple'::regconfig"), tsquery)
        score = func.ts_rank(vector, query)
        stmt = (select(label_t, score.label("score"))
                .where(vector.op("@@")(query), *conditions)
                .order_by(score.desc(), label_t.c.id.desc()).limit(limit))
        rows = session.execute(stmt)
    return [LabelHit(label=label_info(r), score=float(r.score)) for r in rows]
