"""write_run round trip, atomic swap of runs, labels surviving a rebuild, label versions."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.errors import ConfigError, NotFoundError
from app.records import WINDOW_KIND_TOP, band_edge_values
from app.store import queries
from app.store.db import read_session
from app.store.tables import SAE, Feature, FeatureToken, Run, Sequence, Window
from app.store.writer import register_sae, write_run
from tests.factories import synthetic_run, write_label


def _rows(session: Session, table, run_id: int) -> int:
    return session.scalar(select(func.count()).select_from(table).where(table.run_id == run_id))


def test_round_trip_matches_records(engine):
    rec = synthetic_run(d_sae=24, n_dead=2, seed=3)
    run_id = write_run(engine_or_session=engine, **rec.as_kwargs())
    vocab = rec.model.token_strings
    f = rec.features
    w = rec.windows
    seq_row = {int(s): i for i, s in enumerate(rec.sequences.seq_index)}
    ctx = rec.sequences.tokens.shape[1]
    crossing = 0
    with Session(engine) as session:
        assert session.get(SAE, rec.sae.sae_id).active_run_id == run_id
        assert queries.get_model_vocab(session=session, model_id="tiny-llama") == vocab
        for index in (0, 5, 23):
            got = queries.get_feature(session=session, sae_id=rec.sae.sae_id, index=index)
            assert got.count == f.count[index]
            assert got.max_act == pytest.approx(float(f.max_act[index]))
            assert got.frac_nonzero == pytest.approx(float(f.frac_nonzero[index]))
            expected_mean = f.act_sum[index] / f.count[index] if f.count[index] else 0.0
            assert got.mean_act == pytest.approx(expected_mean)
            assert got.hist_edges == pytest.approx(f.hist_edges.tolist())
            assert got.hist_counts == f.hist_counts[index].tolist()
            assert [b.share for b in got.bands] == pytest.approx(f.band_share[index].tolist())
            assert [t.token for t in got.logits_pos] == [
                vocab[i] for i in f.logit_pos_ids[index]
            ]
            assert [t.value for t in got.logits_neg] == pytest.approx(
                f.logit_neg_values[index].tolist()
            )
            assert [n for n, _ in got.neighbours] == f.neighbour_idx[index].tolist()

            mine = np.flatnonzero(w.feature == index)
            assert len(got.windows) == len(mine)
            expected = sorted(
                mine.tolist(), key=lambda i: (int(w.kind[i]), -int(w.band[i]), int(w.rank[i]))
            )
            for win, i in zip(got.windows, expected, strict=True):
                row = seq_row[int(w.seq_index[i])]
                start, length = int(w.start[i]), int(w.length[i])
                ids = rec.sequences.tokens[row, start:start + length].tolist()
                assert win.token_ids == ids
                assert win.tokens == [vocab[t] for t in ids]
                assert win.values == w.values[i, :length].astype(np.float32).tolist()
                assert win.max_pos == w.max_pos[i]
                assert win.values[win.max_pos] == pytest.approx(win.max_value, rel=1e-3)
                assert win.kind == ("top" if w.kind[i] == WINDOW_KIND_TOP else "interval")
                # The documents it shows, from the packing (the document of each position).
                of_pos = np.zeros(ctx, np.int64)
                for offset, doc in rec.sequences.starts_of(row).tolist():
                    of_pos[offset:] = doc
                shown = of_pos[start:start + length]
                want = [(0, int(shown[0]))] + [(p, int(shown[p])) for p in range(1, length)
                                                if shown[p] != shown[p - 1]]
                assert [(d.offset, d.doc_index) for d in win.documents] == want
                names = rec.sequences.doc_names
                assert [d.name for d in win.documents] == [names[d] for _, d in want]
                assert win.doc_name == names[want[0][1]]
                # A later document starts at the BOS that opens it.
                assert all(win.token_ids[p] == 1 for p, _ in want[1:])
                crossing += len(want) > 1
    assert crossing > 0  # some windows cross a document boundary


def test_sequences_store_every_document_they_hold(engine):
    """Each packed sequence's (offset, doc_index) starts come back as written; a record without
    them stores one document per sequence; starts that contradict the sequence are refused."""
    rec = synthetic_run(d_sae=8, n_dead=1, seed=5)
    seqs = rec.sequences
    assert any(len(s) > 2 for s in seqs.doc_starts)  # some hold three documents
    run_id = write_run(engine_or_session=engine, **rec.as_kwargs())
    with Session(engine) as session:
        stored = {r.seq_index: r for r in session.scalars(
            select(Sequence).where(Sequence.run_id == run_id))}
    assert len(stored) == len(seqs.seq_index)
    for row, seq in enumerate(seqs.seq_index.tolist()):
        got = np.frombuffer(stored[seq].doc_starts, "<i4").reshape(-1, 2)
        assert got.tolist() == seqs.doc_starts[row].tolist()
        assert stored[seq].doc_index == got[0, 1] == seqs.doc_index[row]

    plain = synthetic_run(d_sae=8, n_dead=1, seed=5, sae_id="plain")
    plain.sequences.doc_starts = None
    run_id = write_run(engine_or_session=engine, **plain.as_kwargs())
    with Session(engine) as session:
        rows = session.scalars(select(Sequence).where(Sequence.run_id == run_id)).all()
    assert all(np.frombuffer(r.doc_starts, "<i4").tolist() == [0, r.doc_index] for r in rows)

    bad = synthetic_run(d_sae=8, n_dead=1, seed=5, sae_id="bad")
    row = next(i for i, s in enumerate(bad.sequences.doc_starts) if len(s) > 1)
    bad.sequences.doc_starts[row] = bad.sequences.doc_starts[row][::-1].copy()  # not from 0
    with pytest.raises(ValueError, match="doc_starts"):
        write_run(engine_or_session=engine, **bad.as_kwargs())


def test_bands_show_the_edges_the_samples_were_drawn_with(engine):
    """A run that records its interval grid shows each band's snapped edges (the pipeline's
    own, records.band_edge_bins); an older run without it shows the nominal equal widths."""
    rec = synthetic_run(d_sae=12, n_dead=1, n_bands=5, seed=4)
    run_id = write_run(engine_or_session=engine, **rec.as_kwargs())
    m = rec.features.max_act.astype(np.float64)
    with Session(engine) as session:
        for index in range(12):
            got = queries.get_feature(session=session, sae_id=rec.sae.sae_id, index=index)
            nominal = [b * m[index] / 5 for b in range(6)]
            assert [b.lo for b in got.bands] == pytest.approx(nominal[:-1])
            assert [b.hi for b in got.bands] == pytest.approx(nominal[1:])
        session.get(Run, run_id).config = {**rec.run.config, "interval_fine_bins": 128}
        session.commit()
    queries.runs._RUN_CACHE.clear()
    snapped_differs = 0
    with Session(engine) as session:
        for index in range(12):
            got = queries.get_feature(session=session, sae_id=rec.sae.sae_id, index=index)
            edges = band_edge_values(m[index], n_bands=5, n_fine=128)
            assert [b.lo for b in got.bands] == edges[:-1]
            assert [b.hi for b in got.bands] == edges[1:]
            assert edges[-1] == pytest.approx(m[index])
            grid = 2.0 ** np.frexp(m[index])[1] / 128  # each edge on the grid, within half a bin
            for b in range(1, 5):
                assert edges[b] / grid == int(edges[b] / grid)
                assert abs(edges[b] - b * m[index] / 5) <= grid / 2
            snapped_differs += any(e != n for e, n in zip(edges[1:-1], [
                b * m[index] / 5 for b in range(1, 5)], strict=True))
    assert snapped_differs > 0


def test_feature_tokens_are_the_max_tokens_of_top_windows(engine):
    rec = synthetic_run(d_sae=16, seed=4)
    run_id = write_run(engine_or_session=engine, **rec.as_kwargs())
    w, s = rec.windows, rec.sequences
    brute: dict[tuple[int, int], int] = {}
    for i in np.flatnonzero(w.kind == WINDOW_KIND_TOP):
        row = int(np.flatnonzero(s.seq_index == w.seq_index[i])[0])
        token = int(s.tokens[row, w.start[i] + w.max_pos[i]])
        key = (int(w.feature[i]), token)
        brute[key] = brute.get(key, 0) + 1
    with Session(engine) as session:
        stored = {
            (r.feature, r.token_id): r.count
            for r in session.execute(
                select(FeatureToken.feature, FeatureToken.token_id, FeatureToken.count)
                .where(FeatureToken.run_id == run_id)
            )
        }
    assert stored == brute


def test_swap_replaces_old_run_and_keeps_labels(engine):
    first = synthetic_run(d_sae=20, seed=1)
    old_id = write_run(engine_or_session=engine, **first.as_kwargs())
    write_label(engine, sae_id=first.sae.sae_id, index=7,
                description="closing brackets", tags=["Syntax"], author="ann")

    second = synthetic_run(d_sae=20, seed=2, corpus="other corpus")
    new_id = write_run(engine_or_session=engine, **second.as_kwargs())
    assert new_id != old_id
    with Session(engine) as session:
        for table in (Window, FeatureToken, Feature, Sequence):
            assert _rows(session, table, old_id) == 0, table.__tablename__
        assert _rows(session, Feature, new_id) == 20
        assert _rows(session, Window, new_id) == len(second.windows.feature)
        assert session.scalars(select(Run.id)).all() == [new_id]
        assert session.get(Run, new_id).status == "active"
        got = queries.get_feature(session=session, sae_id=second.sae.sae_id, index=7)
        assert got.corpus == "other corpus"
        assert got.max_act == pytest.approx(float(second.features.max_act[7]))
        assert got.label is not None
        assert got.label.description == "closing brackets"
        assert got.label.tags == ["syntax"]


def test_reader_sees_old_or_new_run_never_a_mix(engine, db_url):
    first = synthetic_run(d_sae=20, seed=1)
    old_id = write_run(engine_or_session=engine, **first.as_kwargs())
    second = synthetic_run(d_sae=20, seed=2)
    n_old_windows = len(first.windows.feature)
    with read_session(engine) as reader, reader.begin():
        # The first read opens the reader's snapshot.
        assert _rows(reader, Window, old_id) == n_old_windows
        done = threading.Event()
        errors: list[BaseException] = []

        def swap() -> None:
            try:
                write_run(engine_or_session=engine, **second.as_kwargs())
            except BaseException as exc:  # noqa: BLE001 - reported to the main thread
                errors.append(exc)
            finally:
                done.set()

        thread = threading.Thread(target=swap)
        thread.start()
        assert done.wait(60), "the writer should not wait for a reader"
        thread.join()
        assert not errors, errors
        # Same transaction: still the old run, completely.
        assert _rows(reader, Window, old_id) == n_old_windows
        assert reader.scalar(select(SAE.active_run_id)) == old_id
    with Session(engine) as fresh:
        assert _rows(fresh, Window, old_id) == 0
        assert fresh.scalar(select(SAE.active_run_id)) != old_id


def test_failed_write_leaves_the_old_run(engine):
    first = synthetic_run(d_sae=12, seed=1)
    old_id = write_run(engine_or_session=engine, **first.as_kwargs())
    broken = synthetic_run(d_sae=12, seed=2)
    broken.windows.seq_index[-1] = 10_000  # a sequence that was not given
    with pytest.raises(ValueError, match="sequences that were not given"):
        write_run(engine_or_session=engine, **broken.as_kwargs())
    with Session(engine) as session:
        assert session.get(SAE, first.sae.sae_id).active_run_id == old_id
        assert _rows(session, Window, old_id) == len(first.windows.feature)


def test_register_sae_lists_it_before_any_run(engine):
    rec = synthetic_run(d_sae=8)
    register_sae(engine_or_session=engine, model=rec.model, sae=rec.sae)
    register_sae(engine_or_session=engine, model=rec.model, sae=rec.sae)  # idempotent
    with Session(engine) as session:
        saes = queries.list_saes(session=session)
        assert [s.id for s in saes] == [rec.sae.sae_id]
        assert saes[0].run is None
        with pytest.raises(NotFoundError, match="saescope build"):
            queries.get_feature(session=session, sae_id=rec.sae.sae_id, index=0)


def test_sae_id_is_unique_across_models(engine):
    rec = synthetic_run(d_sae=8)
    register_sae(engine_or_session=engine, model=rec.model, sae=rec.sae)
    other = synthetic_run(d_sae=8, model_id="other-model")
    with pytest.raises(ConfigError, match="already belongs to model"):
        register_sae(engine_or_session=engine, model=other.model, sae=other.sae)
