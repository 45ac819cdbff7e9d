"""Writes to the store: model and SAE rows, and a precompute run swapped in atomically (label
writes are app/store/labels)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from sqlalchemy import Engine, delete, insert, select, update
from sqlalchemy.orm import Session

from app.errors import ConfigError
from app.records import (
    WINDOW_KIND_TOP,
    FeatureArrays,
    ModelRecord,
    RunRecord,
    SAERecord,
    SequenceArrays,
    WindowArrays,
)
from app.store import codec
from app.store.db import write_session
from app.store.tables import (
    RUN_STATUS_ACTIVE,
    RUN_STATUS_WRITING,
    SAE,
    Feature,
    FeatureToken,
    Model,
    Run,
    Sequence,
    Window,
)

# Rows per executemany call: bounds the Python lists built at once without slowing the insert.
INSERT_CHUNK = 20_000



@contextmanager
def _session_for(
    engine_or_session: Engine | Session, *, durable: bool = False
) -> Iterator[Session]:
    """Our own write transaction for an Engine; for a Session, its transaction (caller commits)."""
    if isinstance(engine_or_session, Session):
        yield engine_or_session
        engine_or_session.flush()
    else:
        with write_session(engine_or_session, durable=durable) as session:
            yield session


def register_sae(
    *, engine_or_session: Engine | Session, model: ModelRecord, sae: SAERecord
) -> None:
    """Create or refresh the model and SAE rows (no run), so an SAE is listed before precompute."""
    with _session_for(engine_or_session) as session:
        _upsert_model(session, model)
        _upsert_sae(session, sae)


def _upsert_model(session: Session, record: ModelRecord) -> Model:
    blob, sha = codec.encode_vocab(list(record.token_strings))
    if len(record.token_strings) != record.vocab_size:
        raise ValueError(
            f"model {record.model_id}: {len(record.token_strings)} token strings for "
            f"vocab_size {record.vocab_size}"
        )
    row = session.get(Model, record.model_id)
    if row is None:
        row = Model(id=record.model_id)
        session.add(row)
    row.source = record.source
    row.architecture = record.architecture
    row.d_model = record.d_model
    row.n_layers = record.n_layers
    row.vocab_size = record.vocab_size
    row.bos_token_id = record.bos_token_id
    row.has_chat_template = record.has_chat_template
    if row.token_strings_sha != sha:
        row.token_strings = blob
        row.token_strings_sha = sha
    session.flush()
    return row


def _upsert_sae(session: Session, record: SAERecord) -> SAE:
    row = session.get(SAE, record.sae_id)
    if row is None:
        row = SAE(id=record.sae_id)
        session.add(row)
    elif row.model_id != record.model_id:
        raise ConfigError(
            f"sae_id {record.sae_id!r} already belongs to model {row.model_id!r}; sae ids are "
            "unique in a database: pick another id (e.g. with --sae-id)"
        )
    row.model_id = record.model_id
    row.hook_name = record.hook_name
    row.architecture = record.architecture
    row.d_in = record.d_in
    row.d_sae = record.d_sae
    row.path = record.path
    row.cfg = dict(record.cfg)
    row.train_metrics = dict(record.train_metrics) if record.train_metrics is not None else None
    session.flush()
    return row


def write_run(
    *,
    engine_or_session: Engine | Session,
    model: ModelRecord,
    sae: SAERecord,
    run: RunRecord,
    sequences: SequenceArrays,
    features: FeatureArrays,
    windows: WindowArrays,
) -> int:
    """Write a finished precompute run and make it the SAE's active run; returns the run id.

    One transaction: upsert model and SAE, bulk-insert the run's rows, point the SAE at the new run
    and delete every older run of that SAE. Readers see the old run or the new one, never a mix.
    Labels are keyed by (sae_id, feature index) and are not touched.
    """
    _check_shapes(sae=sae, run=run, sequences=sequences, features=features, windows=windows)
    with _session_for(engine_or_session) as session:
        _upsert_model(session, model)
        sae_row = _upsert_sae(session, sae)
        run_row = Run(
            sae_id=sae.sae_id,
            status=RUN_STATUS_WRITING,
            corpus=run.corpus,
            n_tokens=int(run.n_tokens),
            n_tokens_counted=int(run.n_tokens_counted),
            context_size=int(run.context_size),
            window_len=int(run.window_len),
            n_top=int(run.n_top),
            n_bands=int(run.n_bands),
            config=_jsonable(run.config),
            sae_stats=_jsonable(run.sae_stats),
            hist_edges=codec.to_blob(features.hist_edges, codec.FLOAT64),
            doc_names=list(sequences.doc_names),
        )
        session.add(run_row)
        session.flush()
        run_id = run_row.id
        conn = session.connection()
        _bulk_insert(conn, Sequence, SEQUENCE_COLUMNS, _sequence_rows(run_id, sequences))
        _bulk_insert(conn, Feature, FEATURE_COLUMNS, _feature_rows(run_id, features))
        _bulk_insert(conn, FeatureToken, FEATURE_TOKEN_COLUMNS,
                     _feature_token_rows(run_id, sequences, windows))
        _bulk_insert(conn, Window, WINDOW_COLUMNS, _window_rows(run_id, windows))

        old_ids = session.scalars(
            select(Run.id).where(Run.sae_id == sae.sae_id, Run.id != run_id)
        ).all()
        session.execute(update(Run).where(Run.id == run_id).values(status=RUN_STATUS_ACTIVE))
        sae_row.active_run_id = run_id
        session.flush()
        if old_ids:
            # Children first: the same rows ON DELETE CASCADE would remove, but as four indexed
            # range deletes instead of a cascade per run row.
            # Core deletes: the ORM's would fetch every deleted key back to sync the session.
            for table in (Window, FeatureToken, Feature, Sequence):
                conn.execute(delete(table.__table__).where(table.__table__.c.run_id.in_(old_ids)))
            conn.execute(delete(Run.__table__).where(Run.__table__.c.id.in_(old_ids)))
    return run_id


def _check_shapes(
    *,
    sae: SAERecord,
    run: RunRecord,
    sequences: SequenceArrays,
    features: FeatureArrays,
    windows: WindowArrays,
) -> None:
    d_sae = sae.d_sae
    for name in ("count", "act_sum", "max_act", "frac_nonzero", "hist_counts", "band_share",
                 "band_count", "logit_pos_ids", "logit_pos_values", "logit_neg_ids",
                 "logit_neg_values", "neighbour_idx", "neighbour_cos"):
        got = len(getattr(features, name))
        if got != d_sae:
            raise ValueError(f"features.{name} has {got} rows for d_sae {d_sae}")
    if features.hist_counts.shape[1] != len(features.hist_edges) - 1:
        raise ValueError("features.hist_counts needs len(hist_edges) - 1 bins")
    if sequences.tokens.ndim != 2 or len(sequences.tokens) != len(sequences.seq_index):
        raise ValueError("sequences.tokens must be [n_sequences, context_size]")
    _check_doc_starts(sequences)
    n = len(windows.feature)
    if n:
        if windows.feature.min() < 0 or windows.feature.max() >= d_sae:
            raise ValueError("windows.feature out of range [0, d_sae)")
        known = np.isin(windows.seq_index, sequences.seq_index)
        if not known.all():
            missing = windows.seq_index[~known][:5].tolist()
            raise ValueError(f"windows reference sequences that were not given: {missing}")
        if windows.values.shape[0] != n or windows.values.shape[1] < int(windows.length.max()):
            raise ValueError("windows.values must be [n_windows, >= max length]")
        if int((windows.start + windows.length).max()) > sequences.tokens.shape[1]:
            raise ValueError("a window runs past the end of its sequence")
    del run


def _check_doc_starts(seqs: SequenceArrays) -> None:
    """Each sequence's documents start at 0 with its doc_index, at increasing offsets inside it,
    and name documents of the run (checked over all sequences at once)."""
    if seqs.doc_starts is None:
        return
    n = len(seqs.seq_index)
    if len(seqs.doc_starts) != n:
        raise ValueError(f"sequences.doc_starts has {len(seqs.doc_starts)} entries for {n} "
                         "sequences")
    if not n:
        return
    parts = [seqs.starts_of(i) for i in range(n)]
    lens = np.array([len(p) for p in parts])
    flat = np.concatenate(parts)
    first = np.concatenate([[0], np.cumsum(lens)[:-1]])
    ctx, n_docs = seqs.tokens.shape[1], len(seqs.doc_names)
    step = np.diff(flat[:, 0])
    step[first[1:] - 1] = 1  # a new sequence may restart its offsets
    bad = (lens == 0).any() or (flat[first[lens > 0], 0] != 0).any() \
        or (flat[first[lens > 0], 1] != seqs.doc_index[lens > 0]).any() \
        or (step <= 0).any() or flat[:, 0].max() >= ctx or flat[:, 1].min() < 0 \
        or (n_docs and flat[:, 1].max() >= n_docs)
    if bad:
        raise ValueError(
            "sequences.doc_starts must give each sequence (offset, doc_index) rows starting at "
            f"(0, its doc_index), offsets increasing below {ctx}, documents below {n_docs}")


def _jsonable(value: Any) -> Any:
    """JSON-safe copy of nested stats (numpy scalars and arrays become Python numbers and lists)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None  # JSON has no NaN/inf; PostgreSQL's json type rejects them
    return value


def _bulk_insert(conn: Any, table: type, columns: list[str], rows: Iterator[tuple]) -> None:
    """Insert many rows fast, inside the caller's transaction.

    SQLAlchemy's executemany spends Python time on every row (dicts, bind processors); at half
    a million windows that is most of the write. So SQLite gets the driver's executemany on tuples
    and PostgreSQL gets COPY; any other backend goes through SQLAlchemy Core.
    """
    name = table.__table__.name
    dialect = conn.dialect.name
    quoted = ", ".join(conn.dialect.identifier_preparer.quote(c) for c in columns)
    driver_conn = conn.connection.driver_connection
    if dialect == "sqlite":
        sql = f"INSERT INTO {name} ({quoted}) VALUES ({', '.join('?' * len(columns))})"
        cursor = driver_conn.cursor()
        try:
            for chunk in _chunks(rows):
                cursor.executemany(sql, chunk)
        finally:
            cursor.close()
    elif dialect == "postgresql" and conn.dialect.driver == "psycopg":
        with driver_conn.cursor() as cursor, cursor.copy(
            f"COPY {name} ({quoted}) FROM STDIN"
        ) as copy:
            for row in rows:
                copy.write_row(row)
    else:
        stmt = insert(table.__table__)
        for chunk in _chunks(rows):
            conn.execute(stmt, [dict(zip(columns, row, strict=True)) for row in chunk])


def _chunks(rows: Iterator[tuple]) -> Iterator[list[tuple]]:
    chunk: list[tuple] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) >= INSERT_CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


SEQUENCE_COLUMNS = ["run_id", "seq_index", "doc_index", "tokens", "doc_starts"]


def _sequence_rows(run_id: int, seqs: SequenceArrays) -> Iterator[tuple]:
    tokens = np.ascontiguousarray(seqs.tokens, dtype=codec.INT32)
    for i, (seq_index, doc_index) in enumerate(
        zip(seqs.seq_index.tolist(), seqs.doc_index.tolist(), strict=True)
    ):
        yield (run_id, seq_index, doc_index, tokens[i].tobytes(),
               codec.doc_starts_blob(seqs.starts_of(i)))


FEATURE_BLOBS = {
    "hist_counts": codec.INT64, "band_share": codec.FLOAT32, "band_count": codec.INT64,
    "logit_pos_ids": codec.INT32, "logit_pos_values": codec.FLOAT32,
    "logit_neg_ids": codec.INT32, "logit_neg_values": codec.FLOAT32,
    "neighbour_idx": codec.INT32, "neighbour_cos": codec.FLOAT32,
}
FEATURE_COLUMNS = ["run_id", "index", "count", "act_sum", "mean_act", "max_act", "frac_nonzero",
                   *FEATURE_BLOBS]


def _feature_rows(run_id: int, f: FeatureArrays) -> Iterator[tuple]:
    count = np.asarray(f.count, np.int64)
    act_sum = np.asarray(f.act_sum, np.float64)
    mean = np.divide(act_sum, count, out=np.zeros(len(count), np.float64), where=count > 0)
    blobs = [np.ascontiguousarray(getattr(f, name), dtype) for name, dtype in FEATURE_BLOBS.items()]
    scalars = zip(
        count.tolist(), act_sum.tolist(), mean.tolist(),
        np.asarray(f.max_act, np.float32).tolist(), np.asarray(f.frac_nonzero, np.float64).tolist(),
        strict=True,
    )
    for i, (n, total, mean_act, max_act, frac) in enumerate(scalars):
        yield (run_id, i, n, total, mean_act, max_act, frac, *(b[i].tobytes() for b in blobs))


FEATURE_TOKEN_COLUMNS = ["run_id", "feature", "token_id", "count"]


def _feature_token_rows(run_id: int, seqs: SequenceArrays, w: WindowArrays) -> Iterator[tuple]:
    top = w.kind == WINDOW_KIND_TOP
    if not top.any():
        return
    order = np.argsort(seqs.seq_index, kind="stable")
    rows = order[np.searchsorted(seqs.seq_index, w.seq_index[top], sorter=order)]
    pos = w.start[top].astype(np.int64) + w.max_pos[top].astype(np.int64)
    token = seqs.tokens[rows, pos].astype(np.int64)
    key = w.feature[top].astype(np.int64) << 32 | token
    uniq, counts = np.unique(key, return_counts=True)
    for k, c in zip(uniq.tolist(), counts.tolist(), strict=True):
        yield (run_id, k >> 32, k & 0xFFFFFFFF, c)


WINDOW_COLUMNS = ["run_id", "feature", "kind", "band", "rank", "seq_index", "start", "length",
                  "max_value", "max_pos", "values"]


def _window_rows(run_id: int, w: WindowArrays) -> Iterator[tuple]:
    values = np.ascontiguousarray(w.values, dtype=codec.FLOAT16)
    lengths = w.length.tolist()
    columns = zip(
        w.feature.tolist(), w.kind.tolist(), w.band.tolist(), w.rank.tolist(),
        w.seq_index.tolist(), w.start.tolist(), lengths,
        np.asarray(w.max_value, np.float32).tolist(), w.max_pos.tolist(),
        (values[i, :n].tobytes() for i, n in enumerate(lengths)),
        strict=True,
    )
    for row in columns:
        yield (run_id, *row)
