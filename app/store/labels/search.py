"""Label search over description, tags and notes: SQLite FTS5 or PostgreSQL full text, ranked,
with an optional exact tag filter through label_tags. One entry point: search_labels."""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import column, exists, func, literal_column, select, table, text
from sqlalchemy.orm import Session

from app.store.labels.reads import label_info
from app.store.read_models import LabelHit
from app.store.tables import Label, LabelTag

MAX_QUERY_WORDS = 8
MAX_RESULTS = 200
RANK_WINDOW = 1000
_WORD_RE = re.compile(r"\w+", re.UNICODE)
# The words FTS5's unicode61 tokenizer makes of a tag (letters and digits; _ . : - separate).
_TAG_WORD_RE = re.compile(r"[a-z0-9]+")

# SQLite's FTS5 table (migrations/versions/0002), kept in step with labels by triggers.
_fts = table("labels_fts", column("rowid"))
# The expression migrations/versions/0002 indexes with GIN; the same text so the index is used.
PG_SEARCH_VECTOR = ("to_tsvector('simple'::regconfig, description || ' ' || notes || ' ' || "
                    "(tags)::text)")


def normalize_tag(tag: str) -> str:
    """A tag filter as tags are stored: lowercase, inner spaces as dashes (edits.normalize_tags)."""
    return "-".join(tag.strip().lower().split())


def query_words(q: str) -> list[str]:
    """The words of a query, lowercased, each once; punctuation and operators are dropped, so no
    user text reaches the full-text query syntax."""
    words: list[str] = []
    for word in _WORD_RE.findall(q or ""):
        if word.lower() not in words:  # a repeated word adds nothing to match, only cost
            words.append(word.lower())
    return words[:MAX_QUERY_WORDS]


def _tag_phrase(tag: str) -> str:
    """An FTS5 filter on the tags column that every label holding `tag` passes (its words, in
    order); the exact tag is still checked through label_tags."""
    words = _TAG_WORD_RE.findall(tag)
    return f'tags : "{" ".join(words)}"' if words else ""


def search_labels(
    *, session: Session, q: str = "", tag: str | None = None, sae_id: str | None = None,
    limit: int = 50,
) -> list[LabelHit]:
    """Labels matching every word of `q` (the last one as a prefix, for search-as-you-type),
    best first; with only a tag, that tag's labels, newest first.

    Ranking looks at the RANK_WINDOW newest matching labels: a query whose words are in most
    labels (a prefix of one letter or two, a word like "the") would otherwise score every one of
    them, ~2.5 us each in SQLite's bm25, 250 ms over 100k labels, to order results that such a
    word cannot tell apart anyway. A query matching fewer labels is ranked over all of them.
    """
    limit = max(1, min(limit, MAX_RESULTS))
    words = query_words(q)
    tag = normalize_tag(tag) if tag else None
    label_t = Label.__table__
    conditions = []
    if sae_id:
        conditions.append(label_t.c.sae_id == sae_id)
    if tag:
        conditions.append(exists().where(LabelTag.label_id == label_t.c.id, LabelTag.tag == tag))
    if not words:
        if not tag:
            return []
        rows = session.execute(select(label_t).where(*conditions)
                               .order_by(label_t.c.updated_at.desc()).limit(limit))
        return [LabelHit(label=label_info(r), score=0.0) for r in rows]
    if session.get_bind().dialect.name == "sqlite":
        rows = _search_sqlite(session, words=words, tag=tag, sae_id=sae_id,
                              conditions=conditions, limit=limit)
    else:
        rows = _search_postgresql(session, words=words, conditions=conditions, limit=limit)
    return [LabelHit(label=label_info(r), score=float(r.score)) for r in rows]


def _search_sqlite(session: Session, *, words: list[str], tag: str | None, sae_id: str | None,
                   conditions: list, limit: int) -> Any:
    label_t = Label.__table__
    # Every word quoted (a phrase of one token), the last one a prefix; a tag filter also goes
    # into the match, so the full-text index intersects it instead of SQL probing each match.
    match = " ".join(f'"{w}"' for w in words[:-1])
    match = f'{match} "{words[-1]}"*'.strip()
    if tag and _tag_phrase(tag):
        match = f"{match} {_tag_phrase(tag)}"
    on_fts = text("labels_fts MATCH :match")
    # The rank window: the rowid of the RANK_WINDOW-th newest match (FTS5 walks its matches in
    # rowid order without scoring them), or none when fewer match.
    # The window holds only labels that pass the SAE and exact tag filters; the tag's check
    # goes by the FTS rowid, so without an SAE filter the cut needs no join with labels.
    cut_stmt = select(_fts.c.rowid).where(on_fts)
    if tag:
        cut_stmt = cut_stmt.where(exists().where(LabelTag.label_id == _fts.c.rowid,
                                                 LabelTag.tag == tag))
    if sae_id:
        cut_stmt = cut_stmt.join(label_t, label_t.c.id == _fts.c.rowid).where(
            label_t.c.sae_id == sae_id)
    cut = session.execute(cut_stmt.order_by(_fts.c.rowid.desc()).limit(1)
                          .offset(RANK_WINDOW - 1), {"match": match}).scalar()
    if cut is not None:
        conditions = [*conditions, _fts.c.rowid >= cut]
    # bm25 is smaller for better matches; description counts most, then tags, then notes.
    score = literal_column("bm25(labels_fts, 4.0, 2.0, 1.0)")
    stmt = (select(label_t, (-score).label("score"))
            .select_from(_fts.join(label_t, label_t.c.id == _fts.c.rowid))
            .where(on_fts, *conditions)
            .order_by(score).limit(limit))
    return session.execute(stmt, {"match": match})


def _search_postgresql(session: Session, *, words: list[str], conditions: list,
                       limit: int) -> Any:
    label_t = Label.__table__
    tsquery = " & ".join([*words[:-1], f"{words[-1]}:*"])
    vector = literal_column(PG_SEARCH_VECTOR)
    query = func.to_tsquery(literal_column("'simple'::regconfig"), tsquery)
    # The rank window (see search_labels): the GIN index finds the matches, ts_rank (which
    # rebuilds each row's tsvector) scores only the newest RANK_WINDOW of them.
    window = (select(label_t.c.id).where(vector.op("@@")(query), *conditions)
              .order_by(label_t.c.id.desc()).limit(RANK_WINDOW))
    score = func.ts_rank(vector, query)
    stmt = (select(label_t, score.label("score"))
            .where(label_t.c.id.in_(window))
            .order_by(score.desc(), label_t.c.id.desc()).limit(limit))
    return session.execute(stmt)
