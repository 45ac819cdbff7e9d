"""The labeling queue: the next feature for one person, leased to them for a few minutes.

Orders: by index, density, max activation, a seeded random permutation, or by automatic drafts'
scores: `draft_lowest` (features with a draft, the worst explained first: a person is needed)
and `draft_highest` (the best first: a reviewer accepts them); drafts not scored come last.

Leases and skips are rows, so every server worker sees them. Handing out a feature is one write
transaction that clears expired leases, reads the first candidates and leases the first one
nobody else took meanwhile (the lease's primary key decides; the loser takes the next).
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta
from typing import Literal

from sqlalchemy import BigInteger, Engine, and_, case, cast, delete, exists, or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session
from sqlalchemy.sql import Subquery

from app.errors import ConfigError, NotFoundError
from app.store.db import write_session
from app.store.labels.reads import may_be_shown
from app.store.labels.scores import draft_scores
from app.store.tables import SAE, Feature, Label, LabelLease, LabelSkip, as_utc, utcnow

QueueOrder = Literal["index", "density", "random", "active", "draft_lowest", "draft_highest"]
QueueMode = Literal["unlabeled", "review"]
QUEUE_ORDERS = ("index", "density", "random", "active", "draft_lowest", "draft_highest")
DRAFT_ORDERS = ("draft_lowest", "draft_highest")
LEASE_SECONDS = 300
_ATTEMPTS = 5
_CANDIDATES = 32  # tried in order within one transaction before reading again
_PRIME = 2_147_483_647  # 2^31 - 1: index * a stays below 2^62, no 64-bit overflow


def _random_key(seed: int) -> tuple[int, int]:
    """(a, b) for the random order of `seed`: a in [1, p-1], b in [0, p-1]."""
    rng = random.Random(seed)
    return rng.randrange(1, _PRIME), rng.randrange(_PRIME)


def _order(order: str, seed: int, drafts: Subquery | None) -> list:
    if drafts is not None:  # the draft orders
        score = drafts.c.score
        return [case((score.is_(None), 1), else_=0),
                score.asc() if order == "draft_lowest" else score.desc(), Feature.index.asc()]
    if order == "index":
        return [Feature.index.asc()]
    if order == "density":
        return [Feature.frac_nonzero.desc(), Feature.index.asc()]
    if order == "active":
        return [Feature.max_act.desc(), Feature.index.asc()]
    if order == "random":
        # A fixed permutation per seed, the same on SQLite and PostgreSQL: index -> (index * a +
        # b) mod p with a and b drawn from the seed. The multiplier must change with the seed:
        # changing only b shifts every key alike, which left the order nearly the same.
        a, b = _random_key(seed)
        key = (cast(Feature.index, BigInteger) * a + b) % _PRIME
        return [key, Feature.index.asc()]
    raise ConfigError(f"order: {order!r} is not one of {', '.join(QUEUE_ORDERS)}")


def next_feature(
    engine: Engine, *, sae_id: str, user: str, order: str = "index", seed: int = 0,
    mode: str = "unlabeled", lease_seconds: int = LEASE_SECONDS,
) -> tuple[int, datetime] | None:
    """(feature index, lease expiry) of the next feature for `user`, or None when the queue is
    empty. `unlabeled`: alive features with no shown label and none by this user; `review`:
    features with a label that needs review (or an automatic draft) by someone else. The draft
    orders take only features with an automatic draft."""
    if mode not in ("unlabeled", "review"):
        raise ConfigError(f"mode: {mode!r} is not one of unlabeled, review")
    drafts = draft_scores(sae_id) if order in DRAFT_ORDERS else None
    ordering = _order(order, seed, drafts)
    for _ in range(_ATTEMPTS):
        with write_session(engine) as session:
            sae = session.get(SAE, sae_id)
            if sae is None:
                raise NotFoundError(f"no SAE {sae_id!r} in this database; see /api/v1/saes")
            if sae.active_run_id is None:
                return None
            now = utcnow()
            session.execute(delete(LabelLease).where(
                LabelLease.sae_id == sae_id,
                or_(LabelLease.expires_at < now, LabelLease.user_name == user)))
            on_feature = and_(Label.sae_id == sae_id, Label.feature_index == Feature.index)
            if mode == "unlabeled":
                wanted = ~exists().where(on_feature, or_(
                    and_(may_be_shown(), Label.description != ""), Label.author == user))
            else:
                wanted = exists().where(on_feature, Label.author != user, or_(
                    Label.status == "needs_review",
                    and_(Label.author_kind == "automatic", Label.status == "draft")))
            stmt = select(Feature.index)
            if drafts is not None:
                stmt = stmt.join(drafts, drafts.c.feature_index == Feature.index)
            candidates = session.scalars(
                stmt.where(
                    Feature.run_id == sae.active_run_id, Feature.count > 0, wanted,
                    ~exists().where(LabelLease.sae_id == sae_id,
                                    LabelLease.feature_index == Feature.index),
                    ~exists().where(LabelSkip.user_name == user,
                                    LabelSkip.sae_id == sae_id,
                                    LabelSkip.feature_index == Feature.index),
                ).order_by(*ordering).limit(_CANDIDATES)).all()
            if not candidates:
                return None
            expires = now + timedelta(seconds=lease_seconds)
            # On PostgreSQL other people may be leasing the same candidates right now: ON
            # CONFLICT DO NOTHING waits for their insert and skips the row instead of aborting
            # the transaction, so we move on to the next candidate.
            for index in candidates:
                taken = session.execute(
                    _insert_for(session)(LabelLease).values(
                        sae_id=sae_id, feature_index=index, user_name=user, expires_at=expires,
                    ).on_conflict_do_nothing().returning(LabelLease.feature_index)
                ).first()
                if taken is not None:
                    return index, as_utc(expires)
    return None


def _insert_for(session: Session):  # noqa: ANN202 - the dialect's insert construct
    if session.get_bind().dialect.name == "postgresql":
        return postgresql.insert
    return sqlite.insert


def skip_feature(engine: Engine, *, sae_id: str, index: int, user: str) -> None:
    """Remember that `user` skipped this feature, and release their lease on it."""
    with write_session(engine) as session:
        session.execute(_insert_for(session)(LabelSkip).values(
            user_name=user, sae_id=sae_id, feature_index=index, created_at=utcnow(),
        ).on_conflict_do_nothing())
        session.execute(delete(LabelLease).where(
            LabelLease.sae_id == sae_id, LabelLease.feature_index == index,
            LabelLease.user_name == user))
