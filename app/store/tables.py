"""ORM tables: models, SAEs, precompute runs and their rows, and human data (people, labels,
saved steering runs and steering vectors).

Precomputed rows (sequences, features, feature_tokens, windows) belong to one run and are replaced
as a whole when a new run is swapped in. Their tables are WITHOUT ROWID on SQLite: rows are stored
once, clustered on the (run_id, ...) primary key, so bulk inserts and range deletes of a run
write one b-tree instead of a rowid table plus its primary-key index.

Human data (users, labels, label_tags, label_revisions, the labeling queue's leases and skips) is
keyed by the SAE's id string and the feature index, never by a run, so it survives any rebuild;
an automatic label's explanation record and its scores hang off the label (deleted with it).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Double,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Stable constraint names so Alembic batch migrations (SQLite) can find and alter them later.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

RUN_STATUS_WRITING = "writing"
RUN_STATUS_ACTIVE = "active"


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def as_utc(value: datetime) -> datetime:
    """A stored timestamp with its offset: columns hold naive UTC (utcnow), readers get aware."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JSON, bytes: LargeBinary}


class Model(Base):
    """A language model; its vocabulary is kept so pages can show tokens without a tokenizer."""

    __tablename__ = "models"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)  # e.g. "smollm2-135m"
    source: Mapped[str] = mapped_column(Text)
    architecture: Mapped[str] = mapped_column(String(64))
    d_model: Mapped[int] = mapped_column(Integer)
    n_layers: Mapped[int] = mapped_column(Integer)
    vocab_size: Mapped[int] = mapped_column(Integer)
    bos_token_id: Mapped[int | None] = mapped_column(Integer)
    has_chat_template: Mapped[bool] = mapped_column(Boolean, default=False)
    # zlib-compressed JSON list of display strings, token id i at position i (see store.codec).
    token_strings: Mapped[bytes] = mapped_column(LargeBinary)
    # sha256 of the blob: readers cache the decoded vocabulary under it.
    token_strings_sha: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)


class SAE(Base):
    """An SAE over one hook point of one model; `id` is the globally unique sae_id string."""

    __tablename__ = "saes"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)  # e.g. "15-res-topk-4k"
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"), index=True)
    hook_name: Mapped[str] = mapped_column(String(200))
    architecture: Mapped[str] = mapped_column(String(64))
    d_in: Mapped[int] = mapped_column(Integer)
    d_sae: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    cfg: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    train_metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # The run whose rows readers see. No foreign key on purpose: runs.sae_id already points here,
    # and a cycle of foreign keys would need ALTER TABLE, which SQLite lacks; the writer sets it
    # in the same transaction that inserts the run.
    active_run_id: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)


class Run(Base):
    """One precompute run of one SAE over a corpus, with the per-SAE statistics it measured."""

    __tablename__ = "runs"
    # Never reuse a deleted run's id: readers cache a run's decoded data under its id.
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    sae_id: Mapped[str] = mapped_column(ForeignKey("saes.id", ondelete="CASCADE"), index=True)
    status: Mapped[str] = mapped_column(String(16), default=RUN_STATUS_WRITING)
    corpus: Mapped[str] = mapped_column(Text)
    n_tokens: Mapped[int] = mapped_column(BigInteger)
    n_tokens_counted: Mapped[int] = mapped_column(BigInteger)
    context_size: Mapped[int] = mapped_column(Integer)
    window_len: Mapped[int] = mapped_column(Integer)
    n_top: Mapped[int] = mapped_column(Integer)
    n_bands: Mapped[int] = mapped_column(Integer)
    config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    sae_stats: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # Shared by every feature of the run: float64 [n_bins + 1] log-spaced histogram edges.
    hist_edges: Mapped[bytes] = mapped_column(LargeBinary)
    doc_names: Mapped[list[str]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Sequence(Base):
    """A token sequence referenced by windows: ids stored once, as an int32 blob, with the
    documents it holds (a packed sequence holds several, each opened by a BOS)."""

    __tablename__ = "sequences"
    __table_args__ = {"sqlite_with_rowid": False}

    run_id: Mapped[int] = mapped_column(
        ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True
    )
    seq_index: Mapped[int] = mapped_column(Integer, primary_key=True)
    doc_index: Mapped[int] = mapped_column(Integer)  # the document at position 0
    tokens: Mapped[bytes] = mapped_column(LargeBinary)  # int32 little-endian [context_size]
    # int32 little-endian [m, 2]: (offset, doc_index) of every document the sequence holds, in
    # order, the first at offset 0 (store.codec.doc_starts_blob). Read in the same row as the
    # tokens, so a feature's windows stay one query. Null reads as one document (doc_index at 0).
    doc_starts: Mapped[bytes | None] = mapped_column(LargeBinary)


class Feature(Base):
    """Per-feature statistics of one run; arrays are little-endian blobs (see store.codec)."""

    __tablename__ = "features"
    __table_args__ = (
        # The feature table sorts by these within a run.
        Index("ix_features_run_frac_nonzero", "run_id", "frac_nonzero"),
        Index("ix_features_run_max_act", "run_id", "max_act"),
        Index("ix_features_run_mean_act", "run_id", "mean_act"),
        # Counting a filtered table (alive/dead) from this small index instead of the rows,
        # which carry every blob.
        Index("ix_features_run_count", "run_id", "count"),
        {"sqlite_with_rowid": False},
    )

    run_id: Mapped[int] = mapped_column(
        ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True
    )
    index: Mapped[int] = mapped_column(Integer, primary_key=True)
    count: Mapped[int] = mapped_column(BigInteger)
    act_sum: Mapped[float] = mapped_column(Double)
    mean_act: Mapped[float] = mapped_column(Double)  # act_sum / count, 0 for dead features
    max_act: Mapped[float] = mapped_column(Float)
    frac_nonzero: Mapped[float] = mapped_column(Double)
    hist_counts: Mapped[bytes] = mapped_column(LargeBinary)  # int64 [n_bins]
    band_share: Mapped[bytes] = mapped_column(LargeBinary)  # float32 [n_bands]
    band_count: Mapped[bytes] = mapped_column(LargeBinary)  # int64 [n_bands]
    logit_pos_ids: Mapped[bytes] = mapped_column(LargeBinary)  # int32 [n_logits]
    logit_pos_values: Mapped[bytes] = mapped_column(LargeBinary)  # float32 [n_logits]
    logit_neg_ids: Mapped[bytes] = mapped_column(LargeBinary)  # int32 [n_logits]
    logit_neg_values: Mapped[bytes] = mapped_column(LargeBinary)  # float32 [n_logits]
    neighbour_idx: Mapped[bytes] = mapped_column(LargeBinary)  # int32 [n_neighbours]
    neighbour_cos: Mapped[bytes] = mapped_column(LargeBinary)  # float32 [n_neighbours]


class FeatureToken(Base):
    """The token under the max of each top window, counted per feature: search by token, and the
    "top tokens" column of the feature table, without reading windows."""

    __tablename__ = "feature_tokens"
    __table_args__ = (
        Index("ix_feature_tokens_run_token", "run_id", "token_id"),
        {"sqlite_with_rowid": False},
    )

    run_id: Mapped[int] = mapped_column(
        ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True
    )
    feature: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    count: Mapped[int] = mapped_column(Integer)


class Window(Base):
    """One text window on a feature page: a slice of a sequence and the feature's values on it.

    No foreign key to sequences: (run_id, seq_index) is checked by the writer, and a composite key
    would need an extra index on this, the largest table, only to make deletes check it.
    """

    __tablename__ = "windows"
    __table_args__ = {"sqlite_with_rowid": False}

    run_id: Mapped[int] = mapped_column(
        ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True
    )
    feature: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[int] = mapped_column(SmallInteger, primary_key=True)  # records.WINDOW_KIND_*
    band: Mapped[int] = mapped_column(SmallInteger, primary_key=True)  # -1 for top windows
    rank: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    seq_index: Mapped[int] = mapped_column(Integer)
    start: Mapped[int] = mapped_column(Integer)
    length: Mapped[int] = mapped_column(SmallInteger)
    max_value: Mapped[float] = mapped_column(Float)
    max_pos: Mapped[int] = mapped_column(SmallInteger)  # relative to start
    values: Mapped[bytes] = mapped_column(LargeBinary)  # float16 [length]


USER_ROLES = ("viewer", "annotator", "reviewer", "admin")
LABEL_STATUSES = ("draft", "needs_review", "accepted", "rejected")
AUTHOR_KINDS = ("person", "automatic")


class User(Base):
    """A person who signs in; the API token is stored only as its SHA-256 (see api/auth.py)."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))  # one of USER_ROLES
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class AuthSession(Base):
    """A browser sign-in; in the database so every server worker knows it and sign-out ends it."""

    __tablename__ = "auth_sessions"

    id_hash: Mapped[str] = mapped_column(String(64), primary_key=True)  # SHA-256 of the cookie id
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime)


class Label(Base):
    """One author's label for a feature; `version` increases on every change (edit or review).

    Several authors may label one feature; which label a feature shows is decided when reading
    (store/labels.py: accepted first, else the newest by a person). `author` is a user name for
    people, or the explainer's name for automatic labels (user_id then null).
    """

    __tablename__ = "labels"
    __table_args__ = (
        UniqueConstraint("sae_id", "feature_index", "author_kind", "author"),
        Index("ix_labels_feature", "sae_id", "feature_index"),
        Index("ix_labels_author", "author", "sae_id"),
        # Never reuse a withdrawn label's id: its revisions keep it, unique with their version.
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    # Plain strings, not foreign keys: a label outlives runs, and may be imported before its SAE.
    sae_id: Mapped[str] = mapped_column(String(200))
    feature_index: Mapped[int] = mapped_column(Integer)
    author: Mapped[str] = mapped_column(String(200))
    author_kind: Mapped[str] = mapped_column(String(16), default="person")  # AUTHOR_KINDS
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    description: Mapped[str] = mapped_column(Text, default="")
    # The tags in the author's order, for display; filters use label_tags.
    tags: Mapped[list[str]] = mapped_column(JSON, default=list)
    status: Mapped[str] = mapped_column(String(16), default="draft")  # LABEL_STATUSES
    confidence: Mapped[float | None] = mapped_column(Float)
    notes: Mapped[str] = mapped_column(Text, default="")
    version: Mapped[int] = mapped_column(Integer, default=1)
    reviewed_by: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class LabelTag(Base):
    """One tag of one label: the tag filter is an index lookup, not a LIKE over JSON."""

    __tablename__ = "label_tags"
    __table_args__ = (Index("ix_label_tags_tag", "tag", "label_id"),)

    label_id: Mapped[int] = mapped_column(
        ForeignKey("labels.id", ondelete="CASCADE"), primary_key=True
    )
    tag: Mapped[str] = mapped_column(String(64), primary_key=True)


class LabelRevision(Base):
    """Append-only history: one row per change of a label (create, edit, review, withdraw).

    `label_id` is not a foreign key, so a withdrawn (deleted) label keeps its history; `before` and
    `after` are the label's fields (null before a create and after a withdraw).
    """

    __tablename__ = "label_revisions"
    __table_args__ = (
        UniqueConstraint("label_id", "version"),
        Index("ix_label_revisions_feature", "sae_id", "feature_index", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    label_id: Mapped[int] = mapped_column(Integer)
    version: Mapped[int] = mapped_column(Integer)
    sae_id: Mapped[str] = mapped_column(String(200))
    feature_index: Mapped[int] = mapped_column(Integer)
    action: Mapped[str] = mapped_column(String(16))  # create, edit, review, withdraw, import
    actor: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    before: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    after: Mapped[dict[str, Any] | None] = mapped_column(JSON)


SCORE_METHODS = ("detection", "fuzzing")


class LabelExplanation(Base):
    """What wrote an automatic label's current text: the explainer, its seed and the run it read.

    One row per automatic label, replaced when the explainer writes the label again; the label's
    version at that time says whether the text is still the explainer's (a rerun that finds the
    same explainer, seed and version has nothing to redo).
    """

    __tablename__ = "label_explanations"

    label_id: Mapped[int] = mapped_column(
        ForeignKey("labels.id", ondelete="CASCADE"), primary_key=True
    )
    explainer: Mapped[str] = mapped_column(String(200))  # e.g. "pattern", "local", "openai"
    seed: Mapped[int] = mapped_column(BigInteger)
    run_id: Mapped[int | None] = mapped_column(Integer)  # plain int: labels outlive runs
    label_version: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class LabelScore(Base):
    """How well one version of a label predicts its feature's activations, by one scorer.

    `score` is a balanced accuracy (null when it could not be measured, `details` says why);
    `control_score` is the same scorer's balanced accuracy for a random other explanation on the
    same windows, so a reader sees what chance looks like for that scorer.
    """

    __tablename__ = "label_scores"
    __table_args__ = (
        UniqueConstraint("label_id", "label_version", "method", "scorer", "seed"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    label_id: Mapped[int] = mapped_column(ForeignKey("labels.id", ondelete="CASCADE"))
    label_version: Mapped[int] = mapped_column(Integer)
    method: Mapped[str] = mapped_column(String(16))  # SCORE_METHODS
    scorer: Mapped[str] = mapped_column(String(200))
    score: Mapped[float | None] = mapped_column(Float)
    control_score: Mapped[float | None] = mapped_column(Float)
    n_windows: Mapped[int] = mapped_column(Integer)
    seed: Mapped[int] = mapped_column(BigInteger)
    run_id: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class LabelLease(Base):
    """A feature the queue handed to one person until `expires_at`, so two people do not get it.

    The same rows hold people's generation slots, under `sae_id` "generation/{user id}" (see
    store/generation_slots.py): one table of leases, shared by every server process."""

    __tablename__ = "label_leases"

    sae_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    feature_index: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_name: Mapped[str] = mapped_column(String(64))
    expires_at: Mapped[datetime] = mapped_column(DateTime)


class LabelSkip(Base):
    """A feature one person skipped in the queue; the queue does not offer it to them again."""

    __tablename__ = "label_skips"

    user_name: Mapped[str] = mapped_column(String(64), primary_key=True)
    sae_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    feature_index: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class SteerRun(Base):
    """A saved steering run: the request as sent and both outputs, so its page re-runs nothing."""

    __tablename__ = "steer_runs"
    __table_args__ = (Index("ix_steer_runs_sae", "sae_id", "created_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200))
    # The request's default SAE, as a plain string: a run outlives rebuilds, like a label.
    sae_id: Mapped[str] = mapped_column(String(200))
    request: Mapped[dict[str, Any]] = mapped_column(JSON)
    default_text: Mapped[str] = mapped_column(Text)
    steered_text: Mapped[str] = mapped_column(Text)
    author: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class SteerVector(Base):
    """A saved contrastive steering vector: the prompts it came from and the vector at its hook."""

    __tablename__ = "steer_vectors"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    sae_id: Mapped[str] = mapped_column(String(200))
    hook_name: Mapped[str] = mapped_column(String(200))
    position: Mapped[str] = mapped_column(String(16))
    positive: Mapped[list[str]] = mapped_column(JSON)
    negative: Mapped[list[str]] = mapped_column(JSON)
    vector: Mapped[bytes] = mapped_column(LargeBinary)  # float32 [d_model], little-endian
    norm: Mapped[float] = mapped_column(Float)
    # [{index, cosine}] of the SAE's most aligned decoder rows, computed once when saved.
    aligned: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    author: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
