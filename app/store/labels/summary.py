"""Automatic descriptions of one SAE in numbers: features labeled, drafted and accepted, each
explainer's labels by status, and the distribution of the scores of every current label text."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.store.labels.reads import count_labeled
from app.store.labels.scores import AUTOMATIC_PREFIX, score_is_current
from app.store.read_models import AutointerpSummary, ExplainerCounts, ScoreSeries
from app.store.tables import LABEL_STATUSES, Label, LabelScore

PEOPLE = "people"
_label_t = Label.__table__
_score_t = LabelScore.__table__


def autointerp_summary(*, session: Session, sae_id: str) -> AutointerpSummary:
    """Counts and score series of `sae_id` (scores of every status: an explainer's quality
    includes its rejected drafts); one score per label, method, scorer and seed (the newest)."""
    automatic = _label_t.c.author_kind == "automatic"
    by_status: dict[str, dict[str, int]] = {}
    for author, status, n in session.execute(
            select(_label_t.c.author, _label_t.c.status, func.count())
            .where(_label_t.c.sae_id == sae_id, automatic)
            .group_by(_label_t.c.author, _label_t.c.status)):
        by_status.setdefault(author, {})[status] = n
    explainers = [
        ExplainerCounts(explainer=author.removeprefix(AUTOMATIC_PREFIX),
                        total=sum(counts.values()),
                        **{s: counts.get(s, 0) for s in LABEL_STATUSES})
        for author, counts in sorted(by_status.items())]

    def features_with(status: str) -> int:
        return session.scalar(select(func.count(func.distinct(_label_t.c.feature_index))).where(
            _label_t.c.sae_id == sae_id, automatic, _label_t.c.status == status)) or 0

    rows = session.execute(
        select(_label_t.c.author, _label_t.c.author_kind, _score_t.c.label_id,
               _score_t.c.method, _score_t.c.scorer, _score_t.c.seed, _score_t.c.score,
               _score_t.c.control_score)
        .join(_label_t, _label_t.c.id == _score_t.c.label_id)
        .where(_label_t.c.sae_id == sae_id, score_is_current())
        .order_by(_score_t.c.id.desc()))
    seen: set[tuple] = set()
    grouped: dict[tuple[str, str, str], tuple[list[float], list[float]]] = {}
    for r in rows:
        key = (r.label_id, r.method, r.scorer, r.seed)
        if key in seen:
            continue
        seen.add(key)
        source = r.author.removeprefix(AUTOMATIC_PREFIX) if r.author_kind == "automatic" \
            else PEOPLE
        scores, controls = grouped.setdefault((source, r.method, r.scorer), ([], []))
        if r.score is not None:
            scores.append(float(r.score))
        if r.control_score is not None:
            controls.append(float(r.control_score))
    series = [ScoreSeries(source=source, method=method, scorer=scorer, scores=s, controls=c)
              for (source, method, scorer), (s, c) in sorted(grouped.items())]
    return AutointerpSummary(
        sae_id=sae_id, labeled=count_labeled(session=session, sae_ids=[sae_id]).get(sae_id, 0),
        drafted=features_with("draft"), accepted=features_with("accepted"),
        explainers=explainers, series=series)
