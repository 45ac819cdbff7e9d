"""The label store on SQLite and PostgreSQL: versioned writes with revisions, the shown label,
withdraw and review, search, the queue's leases and skips, import and export."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import func, select

from app.errors import ConfigError, NotFoundError, PreconditionFailedError
from app.store import labels as store
from app.store import queries
from app.store.db import DURABLE, read_session, write_session
from app.store.labels import LabelEdit
from app.store.tables import LabelRevision, LabelTag
from tests.factories import synthetic_run, write_records

SAE_ID = "1-res-topk-64"


def _edit(description: str, **kw) -> LabelEdit:
    return LabelEdit(description=description, **kw)


def test_versioned_writes_keep_every_revision(engine):
    label = store.create_label(engine, sae_id=SAE_ID, index=3, author="ann",
                               edit=_edit("a", tags=["X y", "x-y", "z"]))
    assert (label.version, label.tags) == (1, ["x-y", "z"])
    with pytest.raises(PreconditionFailedError, match="already has a label"):
        store.create_label(engine, sae_id=SAE_ID, index=3, author="ann", edit=_edit("b"))
    second = store.update_label(engine, label_id=label.id, expected_version=1,
                                edit=_edit("b", tags=["z"], notes="why"), actor="ann")
    assert second.version == 2
    with pytest.raises(PreconditionFailedError, match="version 2"):
        store.update_label(engine, label_id=label.id, expected_version=1, edit=_edit("c"),
                           actor="ann")
    reviewed = store.review_label(engine, label_id=label.id, status="accepted", reviewer="rev")
    assert (reviewed.version, reviewed.status, reviewed.reviewed_by) == (3, "accepted", "rev")
    with read_session(engine) as session:
        history = store.feature_history(session=session, sae_id=SAE_ID, index=3)
        assert [(r.version, r.action, r.actor) for r in history] == [
            (3, "review", "rev"), (2, "edit", "ann"), (1, "create", "ann")]
        assert history[1].before["description"] == "a"
        assert history[1].after == {"description": "b", "tags": ["z"], "status": "draft",
                                    "confidence": None, "notes": "why"}
        assert session.scalars(select(LabelTag.tag).where(LabelTag.label_id == label.id)
                               ).all() == ["z"]
    store.withdraw_label(engine, label_id=label.id, expected_version=3, actor="ann")
    with read_session(engine) as session:
        assert store.feature_labels(session=session, sae_id=SAE_ID, index=3) == []
        history = store.feature_history(session=session, sae_id=SAE_ID, index=3)
        assert (history[0].action, history[0].version, history[0].after) == ("withdraw", 4, None)
        assert session.scalar(select(func.count()).select_from(LabelTag)) == 0
    # A new label after a withdraw gets a new id, so the old history stays its own.
    again = store.create_label(engine, sae_id=SAE_ID, index=3, author="ann", edit=_edit("d"))
    assert again.id != label.id


@pytest.mark.parametrize(("field", "edit"), [
    ("description", _edit("x" * 2001)),
    ("description", _edit("nul \x00 inside")),
    ("tags", _edit("ok", tags=["<b>"])),
    ("tags", _edit("ok", tags=[f"t{i}" for i in range(21)])),
    ("status", _edit("ok", status="great")),
    ("confidence", _edit("ok", confidence=1.5)),
])
def test_bad_input_names_the_field_and_writes_nothing(engine, field, edit):
    with pytest.raises(ConfigError, match=f"^{field}"):
        store.create_label(engine, sae_id=SAE_ID, index=1, author="ann", edit=edit)
    with read_session(engine) as session:
        assert session.scalar(select(func.count()).select_from(LabelRevision)) == 0


def test_shown_label_rule(engine):
    def shown() -> str | None:
        with read_session(engine) as session:
            got = store.shown_labels(session=session, sae_id=SAE_ID, indices=[5]).get(5)
        return got.description if got else None

    auto = store.create_label(engine, sae_id=SAE_ID, index=5, author="explainer",
                              author_kind="automatic", edit=_edit("auto"))
    assert shown() is None  # an automatic draft is never shown
    store.create_label(engine, sae_id=SAE_ID, index=5, author="ann", edit=_edit("ann's"))
    bob = store.create_label(engine, sae_id=SAE_ID, index=5, author="bob", edit=_edit("bob's"))
    assert shown() == "bob's"  # the newest by a person
    store.review_label(engine, label_id=auto.id, status="accepted", reviewer="rev")
    assert shown() == "auto"  # accepted wins
    store.review_label(engine, label_id=auto.id, status="rejected", reviewer="rev")
    store.review_label(engine, label_id=bob.id, status="rejected", reviewer="rev")
    assert shown() == "ann's"


def test_durable_writes_run_with_synchronous_full(tmp_path):
    """A kill -9 cannot tell FULL from OFF, so read the pragma on the writing connection."""
    from app.store.db import make_engine, upgrade

    url = f"sqlite:///{tmp_path / 'd.db'}"
    upgrade(url)
    engine = make_engine(url)
    with write_session(engine, durable=True) as session:
        conn = session.connection()
        assert conn.get_execution_options()[DURABLE] is True
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
    with write_session(engine) as session:
        assert session.connection().exec_driver_sql("PRAGMA synchronous").scalar() == 1
    engine.dispose()


def test_search_ranks_matches_and_filters_by_tag(engine):
    for i, (desc, tags, notes) in enumerate([
        ("closing brackets in Python code", ["syntax", "code"], ""),
        ("opening brackets", ["syntax"], "also fires on braces"),
        ("the word bracket in prose", ["english"], ""),
        ("numbers and digits", ["numbers"], "brackets never"),
    ]):
        store.create_label(engine, sae_id=SAE_ID, index=i, author="ann",
                           edit=_edit(desc, tags=tags, notes=notes))
    with read_session(engine) as session:
        def found(**kw) -> list[int]:
            return [h.label.feature_index for h in store.search_labels(session=session, **kw)]

        assert set(found(q="brackets")) == {0, 1, 3}
        assert set(found(q="bracket")) == {0, 1, 2, 3}  # the last word is a prefix
        assert found(q="closing brack") == [0]
        assert found(q="braces") == [1]  # notes are searched
        assert set(found(q="brackets", tag="syntax")) == {0, 1}
        assert found(q="english") == [2]  # tags are searched
        assert set(found(tag="syntax")) == {0, 1}
        assert found(q='"; DROP TABLE labels; --') == []
        assert found(q="brackets", sae_id="other") == []
        hits = store.search_labels(session=session, q="brackets")
        assert hits[0].score >= hits[-1].score


def test_queue_leases_skips_and_orders(engine):
    rec = synthetic_run(d_sae=12, n_dead=2, seed=3)
    write_records(engine, rec)
    dead = {i for i in range(12) if rec.features.count[i] == 0}
    alive = [i for i in range(12) if i not in dead]
    first = store.next_feature(engine, sae_id=SAE_ID, user="ann")
    assert first is not None and first[0] == alive[0]
    # bob does not get ann's leased feature; ann asking again releases hers.
    assert store.next_feature(engine, sae_id=SAE_ID, user="bob")[0] == alive[1]
    assert store.next_feature(engine, sae_id=SAE_ID, user="ann")[0] == alive[0]
    store.skip_feature(engine, sae_id=SAE_ID, index=alive[0], user="ann")
    assert store.next_feature(engine, sae_id=SAE_ID, user="ann")[0] == alive[2]
    store.create_label(engine, sae_id=SAE_ID, index=alive[2], author="ann", edit=_edit("x"))
    assert store.next_feature(engine, sae_id=SAE_ID, user="ann")[0] == alive[3]
    # An expired lease is free again.
    assert store.next_feature(engine, sae_id=SAE_ID, user="cy", lease_seconds=-1)[0] \
        == alive[0]
    assert store.next_feature(engine, sae_id=SAE_ID, user="dee")[0] == alive[0]
    by_density = store.next_feature(engine, sae_id=SAE_ID, user="eve", order="density")[0]
    assert by_density == max((i for i in alive if i not in {alive[0], alive[1], alive[2],
                                                             alive[3]}),
                             key=lambda i: (rec.features.frac_nonzero[i], -i))
    randoms = [store.next_feature(engine, sae_id=f"{SAE_ID}", user="fay", order="random",
                                  seed=s)[0] for s in (1, 1)]
    assert randoms[0] == randoms[1]
    with pytest.raises(ConfigError, match="order"):
        store.next_feature(engine, sae_id=SAE_ID, user="ann", order="sideways")
    with pytest.raises(NotFoundError):
        store.next_feature(engine, sae_id="nope", user="ann")


def test_random_order_differs_by_seed(engine):
    write_records(engine, synthetic_run(d_sae=40, n_dead=0, seed=4))

    def first_five(seed: int) -> list[int]:
        got = []
        for _ in range(5):  # skipping moves on; an expired lease blocks nobody
            index, _ = store.next_feature(engine, sae_id=SAE_ID, user=f"seed{seed}",
                                          order="random", seed=seed, lease_seconds=-1)
            store.skip_feature(engine, sae_id=SAE_ID, index=index, user=f"seed{seed}")
            got.append(index)
        return got

    orders = [tuple(first_five(seed)) for seed in range(6)]
    assert len(set(orders)) == 6 and len({o[0] for o in orders}) >= 4
    assert all(list(o) != sorted(o) for o in orders)  # not index order in disguise


def test_queue_hands_each_feature_to_one_person(engine):
    rec = synthetic_run(d_sae=40, n_dead=0, seed=4)
    write_records(engine, rec)
    got: list[int] = []
    lock = threading.Lock()

    def take(user: str) -> None:
        for _ in range(3):
            index, _ = store.next_feature(engine, sae_id=SAE_ID, user=user)
            store.skip_feature(engine, sae_id=SAE_ID, index=index, user=user)
            with lock:
                got.append(index)

    threads = [threading.Thread(target=take, args=(f"u{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 18
    # Held leases: eight people asking at once get eight different features.
    held: list[int] = []

    def hold(user: str) -> None:
        index, _ = store.next_feature(engine, sae_id=SAE_ID, user=user)
        with lock:
            held.append(index)

    threads = [threading.Thread(target=hold, args=(f"h{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(held)) == len(held) == 8


def _fill(engine) -> None:
    a = store.create_label(engine, sae_id=SAE_ID, index=1, author="ann",
                           edit=_edit('<script>alert(1)</script> "quotes", commas',
                                      tags=["html"], notes="line\nbreak", confidence=0.5))
    store.update_label(engine, label_id=a.id, expected_version=1, actor="ann",
                       edit=_edit("\u202eevil RTL", tags=["html", "rtl"]))
    store.review_label(engine, label_id=a.id, status="accepted", reviewer="rev")
    store.create_label(engine, sae_id=SAE_ID, index=1, author="gpt", author_kind="automatic",
                       edit=_edit("auto"))
    gone = store.create_label(engine, sae_id=SAE_ID, index=2, author="bob", edit=_edit("gone"))
    store.withdraw_label(engine, label_id=gone.id, expected_version=1, actor="bob")


def _comparable(records: list[dict]) -> list[dict]:
    return sorted(records, key=lambda r: (r["sae_id"], r["feature_index"], r["author"]))


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_export_then_import_into_an_empty_database_is_lossless(engine, fmt, tmp_path):
    from app.store.db import make_engine, upgrade

    _fill(engine)
    with read_session(engine) as session:
        records = store.export_records(session=session)
    text = "".join(store.to_jsonl(records)) if fmt == "jsonl" else store.to_csv(records)
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    upgrade(url)
    other = make_engine(url)
    assert store.import_records(other, store.parse(text, fmt)) == 3
    with read_session(other) as session:
        again = store.export_records(session=session)
        assert store.search_labels(session=session, q="evil")[0].label.status == "accepted"
    other.dispose()
    assert _comparable(again) == _comparable(records)
    shaped = store.to_neuronpedia(records, model_ids={SAE_ID: "m"})
    assert {tuple(sorted(s)) for s in shaped} == {
        ("authorId", "createdAt", "description", "index", "layer", "modelId", "typeName")}
    assert len(shaped) == 2  # the withdrawn label is not an explanation


def test_import_with_one_bad_row_applies_nothing(engine):
    good = '{"sae_id": "s", "feature_index": 1, "author": "ann", "description": "ok"}'
    bad = '{"sae_id": "s", "feature_index": 2, "author": "ann", "description": "x", ' \
          '"status": "great"}'
    with pytest.raises(ConfigError, match=r"^line 3: status"):
        store.import_records(engine, store.parse(f"{good}\n\n{bad}\n", "jsonl"))
    csv_text = "\ufeffsae_id,feature_index,author,description\ns,1,ann,ok\ns,-2,ann,bad\n"
    with pytest.raises(ConfigError, match=r"^line 3: feature_index"):
        store.import_records(engine, store.parse(csv_text, "csv"))
    dup = f"{good}\n{good}\n"
    with pytest.raises(ConfigError, match=r"^line 2: .*line 1"):
        store.import_records(engine, store.parse(dup, "jsonl"))
    store.create_label(engine, sae_id="s", index=1, author="ann", edit=_edit("there"))
    with pytest.raises(ConfigError, match=r"^line 1: ann already has"):
        store.import_records(engine, store.parse(f"{good}\n", "jsonl"))
    with read_session(engine) as session:
        assert session.scalar(select(func.count()).select_from(LabelRevision)) == 1


def test_feature_reads_use_the_shown_label(engine):
    rec = synthetic_run(d_sae=12, n_dead=0, seed=3)
    write_records(engine, rec)
    store.create_label(engine, sae_id=SAE_ID, index=4, author="gpt", author_kind="automatic",
                       edit=_edit("hidden draft", tags=["auto"]))
    store.create_label(engine, sae_id=SAE_ID, index=5, author="ann",
                       edit=_edit("visible", tags=["mine"]))
    with read_session(engine) as session:
        page = queries.list_features(session=session, sae_id=SAE_ID, filter="labeled")
        assert [r.index for r in page.items] == [5]
        assert queries.list_features(session=session, sae_id=SAE_ID, tag="mine").total == 1
        assert queries.list_features(session=session, sae_id=SAE_ID, tag="auto").total == 0
        assert queries.get_sae(session=session, sae_id=SAE_ID).n_labeled == 1
        detail = queries.get_feature(session=session, sae_id=SAE_ID, index=4)
        assert detail.label is None and len(detail.label_versions) == 1
