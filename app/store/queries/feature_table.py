"""The feature table: a sorted, filtered page of an SAE's features, and a random feature."""

from __future__ import annotations

import random
from typing import Literal

from sqlalchemy import and_, bindparam, exists, func, or_, select
from sqlalchemy.orm import Session

from app.errors import ConfigError
from app.store.labels.reads import label_info, shown_label_id
from app.store.labels.search import normalize_tag
from app.store.queries.models import get_model_vocab, token_string
from app.store.queries.runs import live_run
from app.store.queries.saes import get_sae_brief
from app.store.read_models import FeaturePage, FeatureRow
from app.store.tables import Feature, FeatureToken, Label, LabelTag

MAX_PER_PAGE = 500
# Feature indices and token ids are 32-bit integer columns, so no page past this can hold a row,
# and (page - 1) * per_page stays far inside the 64-bit OFFSET every database accepts.
MAX_PAGE = 2**31 - 1
MAX_ID = 2**31 - 1
TOP_TOKENS_PER_FEATURE = 5

SortKey = Literal["index", "frac_nonzero", "max_act", "mean_act"]
FilterKey = Literal["all", "alive", "dead", "dense", "labeled", "unlabeled"]
SORT_COLUMNS = {
    "index": Feature.index,
    "frac_nonzero": Feature.frac_nonzero,
    "max_act": Feature.max_act,
    "mean_act": Feature.mean_act,
}

# The first few tokens per feature, ranked in SQL (a window function: SQLite >= 3.25, PostgreSQL)
# so only those rows reach Python.
_ft_t = FeatureToken.__table__
_ranked_tokens = select(
    _ft_t.c.feature, _ft_t.c.token_id,
    func.row_number().over(
        partition_by=_ft_t.c.feature, order_by=(_ft_t.c.count.desc(), _ft_t.c.token_id)
    ).label("rank"),
).where(
    _ft_t.c.run_id == bindparam("run_id"),
    _ft_t.c.feature.in_(bindparam("indices", expanding=True)),
).subquery()
_TOP_TOKENS = (
    select(_ranked_tokens.c.feature, _ranked_tokens.c.token_id)
    .where(_ranked_tokens.c.rank <= bindparam("n"))
    .order_by(_ranked_tokens.c.feature, _ranked_tokens.c.rank)
)


def list_features(
    *,
    session: Session,
    sae_id: str,
    sort: SortKey = "index",
    order: Literal["asc", "desc"] = "asc",
    filter: FilterKey = "all",  # noqa: A002 - the query parameter's public name
    tag: str | None = None,
    q: str | None = None,
    token: str | None = None,
    page: int = 1,
    per_page: int = 50,
) -> FeaturePage:
    """A page of the feature table with its total count; ties sort by index."""
    if sort not in SORT_COLUMNS:
        raise ConfigError(f"sort {sort!r}: use one of {', '.join(SORT_COLUMNS)}")
    if not 1 <= per_page <= MAX_PER_PAGE or not 1 <= page <= MAX_PAGE:
        raise ConfigError(f"page must be in [1, {MAX_PAGE}] and per_page in [1, {MAX_PER_PAGE}]")
    sae = get_sae_brief(session=session, sae_id=sae_id)
    run = live_run(session, sae)
    # The shown label of each feature (store/labels/reads.py has the rule).
    label_on = Label.id == shown_label_id(sae_id=sae_id, feature_index=Feature.index)
    conditions = [Feature.run_id == run.id]
    alive = Feature.count > 0
    if filter == "alive":
        conditions.append(alive)
    elif filter == "dead":
        conditions.append(Feature.count == 0)
    elif filter == "dense":
        conditions.append(Feature.frac_nonzero > run.dense_threshold)
    elif filter == "labeled":
        conditions.append(and_(Label.id.is_not(None), Label.description != ""))
    elif filter == "unlabeled":
        conditions.append(or_(Label.id.is_(None), Label.description == ""))
    elif filter != "all":
        raise ConfigError(
            f"filter {filter!r}: use one of all, alive, dead, dense, labeled, unlabeled"
        )
    if tag:
        conditions.append(exists().where(LabelTag.label_id == Label.id,
                                         LabelTag.tag == normalize_tag(tag)))
    if q:
        escaped = q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        conditions.append(Label.description.ilike(f"%{escaped}%", escape="\\"))
    if token:
        vocab = get_model_vocab(session=session, model_id=sae.model_id)
        ids = token_ids_matching(vocab=vocab, token=token)
        conditions.append(Feature.index.in_(
            select(FeatureToken.feature).where(
                FeatureToken.run_id == run.id, FeatureToken.token_id.in_(ids or [-1])
            )
        ))
    # The page query should walk the sort column's index and stop after one page. "count + 0"
    # keeps the planner from filtering "alive" (nearly every row) through the count index and
    # then sorting all of them; the count query does want that index.
    page_conditions = [Feature.count + 0 > 0 if c is alive else c for c in conditions]
    counted = select(func.count()).select_from(Feature)
    if filter in ("labeled", "unlabeled") or tag or q:
        counted = counted.outerjoin(Label, label_on)
    # Written as a plain count (no subquery) so SQLite answers it from a covering index.
    total = session.scalar(counted.where(*conditions)) or 0
    sort_col = SORT_COLUMNS[sort]
    ordering = [sort_col.desc() if order == "desc" else sort_col.asc()]
    if sort != "index":
        ordering.append(Feature.index.asc())
    rows = session.execute(
        select(Feature.index, Feature.count, Feature.frac_nonzero, Feature.max_act,
               Feature.mean_act, Label)
        .outerjoin(Label, label_on).where(*page_conditions)
        .order_by(*ordering).limit(per_page).offset((page - 1) * per_page)
    ).all()
    indices = [r.index for r in rows]
    top = _top_tokens(session, run_id=run.id, model_id=sae.model_id, indices=indices)
    items = [
        FeatureRow(index=r.index, count=r.count, frac_nonzero=r.frac_nonzero, max_act=r.max_act,
                   mean_act=r.mean_act, top_tokens=top.get(r.index, []),
                   label=label_info(r.Label) if r.Label is not None else None)
        for r in rows
    ]
    return FeaturePage(items=items, total=total, page=page, per_page=per_page)


def token_ids_matching(*, vocab: list[str], token: str) -> list[int]:
    """Ids for a token query: a number is an id; text matches a display string exactly or up to
    surrounding whitespace (so "the" finds " the" and "the").

    Only ASCII digits make an id ("²" and "①" are tokens to match as text), and a number past
    the id column's range matches nothing.
    """
    token = token.strip("\n") if token.strip() else token
    wanted = token.strip()
    if wanted.isascii() and wanted.isdigit():
        number = int(wanted)
        return [number] if number <= MAX_ID else []
    return [i for i, s in enumerate(vocab) if s == token or (wanted and s.strip() == wanted)]


def _top_tokens(
    session: Session, *, run_id: int, model_id: str, indices: list[int]
) -> dict[int, list[str]]:
    if not indices:
        return {}
    rows = session.connection().execute(
        _TOP_TOKENS, {"run_id": run_id, "indices": list(indices), "n": TOP_TOKENS_PER_FEATURE}
    ).all()
    vocab = get_model_vocab(session=session, model_id=model_id)
    out: dict[int, list[str]] = {}
    for feature, token_id in rows:
        out.setdefault(feature, []).append(token_string(vocab, token_id))
    return out


def random_feature(*, session: Session, sae_id: str, alive_only: bool = True) -> int:
    """A uniformly random feature index (alive ones only, unless none fired)."""
    sae = get_sae_brief(session=session, sae_id=sae_id)
    run = live_run(session, sae)
    stmt = select(func.count()).select_from(Feature).where(Feature.run_id == run.id)
    if alive_only:
        n_alive = session.scalar(stmt.where(Feature.count > 0)) or 0
        if n_alive:
            k = random.randrange(n_alive)
            return session.scalar(
                select(Feature.index).where(Feature.run_id == run.id, Feature.count > 0)
                .order_by(Feature.index).offset(k).limit(1)
            )
    return random.randrange(sae.d_sae)
