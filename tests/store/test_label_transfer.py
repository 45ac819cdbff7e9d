"""Label export and import with hostile text: line separators inside JSON Lines strings, cells a
spreadsheet would run as formulas, and the checks an import makes before writing anything."""

from __future__ import annotations

import csv
import io

import pytest

from app.errors import ConfigError
from app.store import labels as store
from app.store.db import make_engine, read_session, upgrade
from app.store.labels import LabelEdit
from tests.factories import synthetic_run, write_records

HOSTILE = [
    "line\u2028separator, paragraph\u2029separator and \x85next line",
    '=HYPERLINK("http://evil.example","click")', "+1+cmd|' /C calc'!A0", "-2+3", "@SUM(1)",
    "'=already quoted", "''+two apostrophes", "\tTab =1", "\r=cr", "'plain apostrophe",
    "- a dash list", "<script>alert(1)</script> \u202eRTL",
]


def _fill(engine) -> None:
    for i, text in enumerate(HOSTILE):
        store.create_label(engine, sae_id="s", index=i, author="ann",
                           edit=LabelEdit(description=text, notes=text, tags=["x"]))


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_hostile_text_round_trips(engine, fmt, tmp_path):
    _fill(engine)
    with read_session(engine) as session:
        text = store.export_text(session=session, fmt=fmt)
        records = store.export_records(session=session)
    if fmt == "jsonl":
        assert len(text.splitlines()) == len(HOSTILE)  # one line per label for any reader
    else:
        cells = [c for row in csv.reader(io.StringIO(text, newline="")) for c in row]
        assert not [c for c in cells if c[:1] in ("=", "+", "-", "@", "\t", "\r")]
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    upgrade(url)
    other = make_engine(url)
    assert store.import_records(other, store.parse(text, fmt)) == len(HOSTILE)
    with read_session(other) as session:
        again = store.export_records(session=session)
    other.dispose()
    assert [(r["description"], r["notes"]) for r in again] == [(t, t) for t in HOSTILE]
    assert [r["revisions"] for r in again] == [r["revisions"] for r in records]


def test_import_checks_indices_of_known_saes_and_names_the_format(engine):
    write_records(engine, synthetic_run(d_sae=16, seed=1, sae_id="1-res-topk-16"))
    sae_id = "1-res-topk-16"
    ok = f'{{"sae_id": "{sae_id}", "feature_index": 15, "author": "ann", "description": "ok"}}'
    past = f'{{"sae_id": "{sae_id}", "feature_index": 16, "author": "ann", "description": "x"}}'
    elsewhere = '{"sae_id": "not-built-yet", "feature_index": 99, "author": "ann"}'
    with pytest.raises(ConfigError, match=r"^line 2: feature_index: .* 0\.\.15, not 16"):
        store.import_records(engine, store.parse(f"{ok}\n{past}\n", "jsonl"))
    with read_session(engine) as session:
        assert store.export_records(session=session) == []
    assert store.import_records(engine, store.parse(f"{ok}\n{elsewhere}\n", "jsonl")) == 2
    with pytest.raises(ConfigError, match=r"^line 1: a JSON array"):
        store.parse('[\n {"modelId": "m", "index": "1"}\n]\n', "jsonl")
    with pytest.raises(ConfigError, match=r"^line 1: a JSON array"):
        store.parse('[{"modelId": "m", "index": "1"}]', "jsonl")
