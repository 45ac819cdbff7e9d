"""One feature, everything its page shows: statistics, bands, windows, logit effects, neighbours,
its labels' scores and automatic drafts."""

from __future__ import annotations

import math

import numpy as np
from sqlalchemy import and_, bindparam, select
from sqlalchemy.orm import Session

from app.errors import NotFoundError
from app.records import WINDOW_KIND_TOP, band_edge_values
from app.store import codec
from app.store.labels.reads import labels_of, pick_shown
from app.store.labels.scores import scores_of
from app.store.queries.models import get_model_vocab, token_string
from app.store.queries.runs import live_run
from app.store.read_models import (
    Band,
    FeatureDetail,
    SAEBrief,
    TokenValue,
    WindowDocument,
    WindowInfo,
)
from app.store.tables import SAE, Feature, Model, Run, Sequence, Window

# Statements built once: the feature read is the explorer's hottest, and building and coercing
# SQLAlchemy constructs per request costs more than SQLite answering them.
_sae_t, _run_t, _model_t = SAE.__table__, Run.__table__, Model.__table__
_feature_t, _window_t, _seq_t = Feature.__table__, Window.__table__, Sequence.__table__
# A feature read starts with one row: which run is live, which vocabulary to use, and the
# feature's own row from that run (left-joined, so a missing feature still says which SAE and run
# it was looked for in). One statement, not two: on PostgreSQL every statement is a round trip to
# the server, which costs more than the statement itself (bench/serve.py).
_FEATURE_HEAD = (
    select(_sae_t.c.id, _sae_t.c.model_id, _sae_t.c.d_sae, _sae_t.c.path,
           _sae_t.c.active_run_id, _run_t.c.created_at, _model_t.c.token_strings_sha,
           *_feature_t.c)
    .select_from(
        _sae_t.outerjoin(_run_t, _run_t.c.id == _sae_t.c.active_run_id)
        .outerjoin(_model_t, _model_t.c.id == _sae_t.c.model_id)
        .outerjoin(_feature_t, and_(_feature_t.c.run_id == _sae_t.c.active_run_id,
                                    _feature_t.c.index == bindparam("index")))
    )
    .where(_sae_t.c.id == bindparam("sae_id"))
)
# Windows with their sequence's tokens in one query (a sequence's tokens may come twice when two
# windows share it; cheaper than a second round trip). Each window's sequence is read by a
# correlated subquery on the sequences' key, not a join: given a join, PostgreSQL hashed the
# run's whole sequences table per request (its default random_page_cost rates a few dozen key
# lookups dearer than a scan of a ~800-row table; 1.0 vs 0.36 ms on the 131k-wide bench/wide.py
# run). SQLite looks each one up by key either way.
_seq_of_window = and_(_seq_t.c.run_id == _window_t.c.run_id,
                      _seq_t.c.seq_index == _window_t.c.seq_index)
_WINDOWS = (
    select(_window_t.c.kind, _window_t.c.band, _window_t.c.rank, _window_t.c.seq_index,
           _window_t.c.start, _window_t.c.length, _window_t.c.max_value, _window_t.c.max_pos,
           _window_t.c["values"],
           *(select(col).where(_seq_of_window).scalar_subquery()
             for col in (_seq_t.c.doc_index, _seq_t.c.tokens, _seq_t.c.doc_starts)))
    .where(_window_t.c.run_id == bindparam("run_id"), _window_t.c.feature == bindparam("index"))
    .order_by(_window_t.c.kind, _window_t.c.band.desc(), _window_t.c.rank)
)


def window_documents(starts: list[tuple[int, int]], *, start: int, length: int
                     ) -> list[tuple[int, int]]:
    """(offset in the window, doc_index) of each document a window [start, start + length) of a
    sequence shows, from the sequence's (offset, doc_index) starts: the one in force at its
    first token at 0, then each that starts (at its BOS) inside it."""
    shown = [(0, starts[0][1])]
    for offset, doc in starts[1:]:
        if offset <= start:
            shown[0] = (0, doc)
        elif offset < start + length:
            shown.append((offset - start, doc))
    return shown


def get_feature(*, session: Session, sae_id: str, index: int) -> FeatureDetail:
    """Everything a feature page shows, from one run's rows and blobs.

    Three indexed queries on one connection (SAE + run + vocabulary hash + the feature row; its
    windows with their sequences; the labels of the feature and its neighbours), a fourth for
    the scores of its own labels when it has any.
    """
    conn = session.connection()
    # `feat`: the same row; its feature columns are null when the run has no such feature.
    # (An index outside int32 matches no row; the range check below reports it.)
    key = index if 0 <= index < 2**31 else -1
    head = feat = conn.execute(_FEATURE_HEAD, {"sae_id": sae_id, "index": key}).one_or_none()
    if head is None:
        raise NotFoundError(f"no SAE {sae_id!r} in this database; see /api/v1/saes")
    sae = SAEBrief(*head[:5])
    if not 0 <= index < sae.d_sae:
        raise NotFoundError(
            f"SAE {sae_id!r} has features 0..{sae.d_sae - 1}; there is no feature {index}"
        )
    run = live_run(session, sae, created=head.created_at)
    if feat.run_id is None:
        raise NotFoundError(f"feature {index} of {sae_id!r} is missing from run {run.id}")
    vocab = (codec.cached_vocab(head.token_strings_sha) if head.token_strings_sha else None) \
        or get_model_vocab(session=session, model_id=sae.model_id)
    n_vocab = len(vocab)

    def strings(ids: list[int]) -> list[str]:
        if ids and (min(ids) < 0 or max(ids) >= n_vocab):
            return [token_string(vocab, t) for t in ids]
        return [vocab[t] for t in ids]

    doc_names = run.doc_names
    n_docs = len(doc_names)
    window_infos = []
    seq_starts: dict[int, list[tuple[int, int]]] = {}  # windows often share a sequence
    rows = conn.execute(_WINDOWS, {"run_id": run.id, "index": index}).all()
    for (kind, band, rank, seq_index, start, length, max_value, max_pos, values_blob, doc_index,
         tokens_blob, starts_blob) in rows:
        ids = np.frombuffer(tokens_blob, dtype=codec.INT32, count=length, offset=4 * start).tolist()
        f16 = np.frombuffer(values_blob, dtype=codec.FLOAT16)
        wide = f16.astype(np.float32).tolist()
        # The window's max as its values are stored (float16), so that it is exactly
        # values[max_pos]; the float32 column keeps the finer figure for ordering.
        if 0 <= max_pos < len(wide) and math.isfinite(wide[max_pos]):
            max_value = wide[max_pos]
        starts = seq_starts.get(seq_index)
        if starts is None:
            starts = seq_starts[seq_index] = codec.doc_starts_of(starts_blob, doc_index)
        documents = tuple(
            WindowDocument(offset, doc, doc_names[doc] if 0 <= doc < n_docs else None)
            for offset, doc in window_documents(starts, start=start, length=length))
        window_infos.append(WindowInfo(
            "top" if kind == WINDOW_KIND_TOP else "interval", band, rank, ids, strings(ids),
            wide, max_value, max_pos, seq_index, start, documents[0].name, f16, documents,
        ))

    share = codec.from_blob(feat.band_share, codec.FLOAT32).tolist()
    band_count = codec.from_blob(feat.band_count, codec.INT64).tolist()
    # Interval bands split [0, max_act] into equal widths, each edge snapped to the run's fine
    # grid (records.band_edge_bins): the edges the samples were drawn with. Runs without a
    # recorded grid show the nominal edges.
    if run.interval_fine_bins and run.n_bands:
        edges = band_edge_values(feat.max_act, n_bands=run.n_bands,
                                 n_fine=run.interval_fine_bins)
    else:
        width = feat.max_act / run.n_bands if run.n_bands else 0.0
        edges = [b * width for b in range(run.n_bands + 1)]
    bands = [Band(band=b, lo=edges[b], hi=edges[b + 1], share=share[b], count=band_count[b])
             for b in range(len(share))]

    def token_values(ids_blob: bytes, values_blob: bytes) -> list[TokenValue]:
        ids = codec.from_blob(ids_blob, codec.INT32).tolist()
        vals = codec.from_blob(values_blob, codec.FLOAT32).tolist()
        return [TokenValue(t, s, v) for t, s, v in zip(ids, strings(ids), vals, strict=True)]

    neighbour_ids = codec.from_blob(feat.neighbour_idx, codec.INT32).tolist()
    neighbour_cos = codec.from_blob(feat.neighbour_cos, codec.FLOAT32).tolist()
    neighbours = list(zip(neighbour_ids, neighbour_cos, strict=True))
    everyone = labels_of(session=session, sae_id=sae_id, indices=[index, *neighbour_ids])
    own_labels = everyone.pop(index, [])
    own_label = pick_shown(own_labels)
    labels = {i: shown for i, ls in everyone.items() if (shown := pick_shown(ls)) is not None}
    # Most features have no label of their own: no scores query then.
    scores = scores_of(session=session, label_ids=[lb.id for lb in own_labels]) \
        if own_labels else {}
    return FeatureDetail(
        sae_id=sae.id, model_id=sae.model_id, index=index, d_sae=sae.d_sae, count=feat.count,
        act_sum=feat.act_sum, mean_act=feat.mean_act, max_act=feat.max_act,
        frac_nonzero=feat.frac_nonzero, n_tokens_counted=run.n_tokens_counted,
        hist_edges=run.hist_edges,
        hist_counts=codec.from_blob(feat.hist_counts, codec.INT64).tolist(),
        bands=bands,
        logits_pos=token_values(feat.logit_pos_ids, feat.logit_pos_values),
        logits_neg=token_values(feat.logit_neg_ids, feat.logit_neg_values),
        neighbours=neighbours, windows=window_infos, label=own_label,
        run_id=run.id, corpus=run.corpus, dense_threshold=run.dense_threshold,
        neighbour_labels=labels, vocab=vocab,
        label_versions=tuple(sorted((lb.id, lb.version) for lb in own_labels)),
        drafts=[lb for lb in own_labels if lb.author_kind == "automatic"
                and lb.status == "draft"],
        label_scores=scores,
    )
