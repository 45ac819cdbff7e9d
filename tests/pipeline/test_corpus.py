"""Corpus sources and tokenized windows, against the tokenizer itself as the reference."""

from __future__ import annotations

import csv
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from app.engine.tiny import tiny_tokenizer
from app.errors import ConfigError, OfflineError
from app.pipeline.corpus import (
    CorpusTooSmall,
    Document,
    corpus_fingerprint,
    load_corpus,
    load_documents,
    python_docs,
    tokenize_corpus,
)

TEXTS = [
    "The quick brown fox jumps over the lazy dog.\n" * 6,
    "def add(a, b):\n    return a + b\n",
    "Python is a programming language. " * 9,
]


@pytest.fixture
def tok():
    return tiny_tokenizer()


def test_text_file_and_markdown_folder(tmp_path):
    one = tmp_path / "one.txt"
    one.write_text(TEXTS[0], encoding="utf-8")
    assert list(load_documents(str(one))) == [Document(name=str(one), text=TEXTS[0])]

    folder = tmp_path / "notes"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.md").write_text(TEXTS[1], encoding="utf-8")
    (folder / "sub" / "a.txt").write_text(TEXTS[2], encoding="utf-8")
    (folder / "a.md").write_text(TEXTS[0], encoding="utf-8")
    (folder / "image.png").write_bytes(b"\x89PNG")  # not text: ignored
    docs = list(load_documents(folder))
    assert [d.name for d in docs] == ["a.md", "b.md", "sub/a.txt"]
    assert [d.text for d in docs] == [TEXTS[0], TEXTS[1], TEXTS[2]]


def test_jsonl_with_default_and_custom_fields(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps({"text": t, "body": t.upper()}) for t in TEXTS) + "\n\n")
    assert [d.text for d in load_documents(path)] == TEXTS
    assert [d.text for d in load_documents(path, text_field="body")] == [t.upper() for t in TEXTS]
    assert [d.name for d in load_documents(path)] == ["c.jsonl:1", "c.jsonl:2", "c.jsonl:3"]
    with pytest.raises(ConfigError, match=r"no field 'content' \(fields: \['body', 'text'\]\)"):
        list(load_documents(path, text_field="content"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(ConfigError, match="bad.jsonl:2 is not valid JSON"):
        list(load_documents(bad))


def test_parquet_and_csv_text_columns(tmp_path):
    table = pa.table({"id": [1, 2, 3], "content": TEXTS})
    pq.write_table(table, tmp_path / "c.parquet")
    assert [d.text for d in load_documents(tmp_path / "c.parquet", text_field="content")] == TEXTS
    with pytest.raises(ConfigError, match="no column 'text'.*--text-field"):
        list(load_documents(tmp_path / "c.parquet"))

    with (tmp_path / "c.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        for t in TEXTS:
            writer.writerow([t, "x"])
    assert [d.text for d in load_documents(tmp_path / "c.csv")] == TEXTS
    with pytest.raises(ConfigError, match="no column 'body'"):
        list(load_documents(tmp_path / "c.csv", text_field="body"))


def test_bad_sources_are_config_errors(tmp_path, tok):
    with pytest.raises(ConfigError, match="not found"):
        list(load_documents(tmp_path / "missing.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no .txt or .md files"):
        list(load_documents(tmp_path / "empty"))
    (tmp_path / "blank.txt").write_text("")
    with pytest.raises(ConfigError, match="is empty"):
        load_corpus(tmp_path / "blank.txt", tokenizer=tok)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ConfigError, match="UTF-8"):
        list(load_documents(tmp_path / "latin1.txt"))
    (tmp_path / "data.xml").write_text("<a/>")
    with pytest.raises(ConfigError, match="unsupported type"):
        list(load_documents(tmp_path / "data.xml"))


def test_hub_dataset_offline_is_a_clear_error(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OfflineError, match="offline.*python-docs"):
        list(load_documents("saescope-tests/no-such-dataset"))


def test_documents_are_packed_bos_separated_and_read_back_as_the_tokenizer_gives(tok):
    docs = [Document(name=f"d{i}", text=t) for i, t in enumerate(TEXTS)]
    corpus = tokenize_corpus(docs, tokenizer=tok, context_size=16)
    bos = tok.bos_token_id
    assert corpus.tokens.dtype == np.int32 and corpus.tokens.shape[1] == 16
    assert (corpus.tokens[:, 0] == bos).all()
    assert corpus.doc_names == ["d0", "d1", "d2"]
    assert corpus.doc_ids is not None and corpus.doc_ids.shape == corpus.tokens.shape
    assert tok.pad_token_id not in corpus.tokens  # no padding anywhere
    # Reference: each document's text positions, in order, are the tokenizer's ids (the last
    # document is cut where the last whole sequence ends).
    text = ~corpus.special_mask
    for i, source in enumerate(TEXTS):
        expected = tok(source, add_special_tokens=False)["input_ids"]
        got = corpus.tokens[(corpus.doc_ids == i) & text].tolist()
        assert got == (expected if i < 2 else expected[:len(got)]) and got
        # Each document is opened by a BOS: the sequence's own, or one right before it.
        seq, pos = np.argwhere(corpus.doc_ids == i)[0]
        assert corpus.tokens[seq, pos] == bos and corpus.special_mask[seq, pos]
    # Short documents share sequences: fewer sequences than one per document start.
    assert len(corpus.documents(int(corpus.doc_index[corpus.doc_ids[:, -1] == 2][0]))) >= 1
    assert any(len(corpus.documents(s)) > 1 for s in range(corpus.n_seq))
    assert corpus.n_real_tokens == int(text.sum()) == corpus.real_tokens()
    assert corpus.n_real_tokens == corpus.n_seq * 16 - int(corpus.special_mask.sum())


def test_budget_counts_text_tokens_and_the_suggested_maximum_works(tok):
    docs = [Document(name=f"d{i}", text=t) for i, t in enumerate(TEXTS)]
    full = tokenize_corpus(docs, tokenizer=tok, context_size=16)
    cut = tokenize_corpus(docs, tokenizer=tok, context_size=16, max_tokens=15 * 3 + 5)
    real = np.cumsum((~full.special_mask).sum(axis=1))
    n = int(np.searchsorted(real, 15 * 3 + 5, side="right"))
    assert cut.n_seq == n and np.array_equal(cut.tokens, full.tokens[:n])  # a prefix
    assert cut.real_tokens() <= 15 * 3 + 5 < cut.real_tokens() + int(real[n] - real[n - 1])
    with pytest.raises(CorpusTooSmall, match=f"only {full.n_real_tokens:,} text tokens.*"
                       f"lower --tokens to at most {full.n_real_tokens:,}") as err:
        tokenize_corpus(docs, tokenizer=tok, context_size=16, max_tokens=full.n_real_tokens + 1)
    assert err.value.available == full.n_real_tokens
    exact = tokenize_corpus(docs, tokenizer=tok, context_size=16, max_tokens=err.value.available)
    assert np.array_equal(exact.tokens, full.tokens)
    with pytest.raises(ConfigError, match="smaller than one sequence"):
        tokenize_corpus(docs, tokenizer=tok, context_size=16, max_tokens=8)


def test_short_rows_of_a_csv_are_packed_with_no_padding(tmp_path, tok):
    path = tmp_path / "rows.csv"
    rows = [f"row {i} says hello" for i in range(200)]
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text"])
        writer.writerows([r] for r in rows)
    corpus = load_corpus(path, tokenizer=tok, context_size=32, max_tokens=1000)
    lengths = [len(tok(r, add_special_tokens=False)["input_ids"]) for r in rows]
    assert max(lengths) < 16  # every row is far shorter than a sequence
    text = ~corpus.special_mask
    # Every position is text or the BOS opening a row: no padding, and the budget is text.
    assert int(text.sum()) == corpus.n_real_tokens <= 1000
    assert corpus.n_real_tokens > 1000 - 31
    bos = corpus.tokens == tok.bos_token_id
    assert np.array_equal(bos, corpus.special_mask)
    # A BOS inside a sequence sits between two documents (the boundary it marks).
    seq, pos = np.nonzero(bos[:, 1:-1])
    assert len(seq) > 50
    assert (corpus.doc_ids[seq, pos] != corpus.doc_ids[seq, pos + 2]).all()
    assert (corpus.doc_ids[seq, pos + 1] == corpus.doc_ids[seq, pos + 2]).all()


def test_fingerprint_changes_with_the_files(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("one")
    before = corpus_fingerprint(path)
    path.write_text("one two")
    assert corpus_fingerprint(path) != before
    assert corpus_fingerprint(path, text_field="body") != corpus_fingerprint(path)


def test_python_docs_is_the_stdlib_documentation_in_a_fixed_order():
    docs = list(python_docs())
    names = [d.name for d in docs]
    assert names == [d.name for d in python_docs()]
    assert len(names) == len(set(names))
    assert "json" in names and "pydoc_data.topics:for" in names
    assert not any(n.startswith(("test.", "idlelib", "turtledemo")) for n in names)
    total = sum(len(d.text) for d in docs)
    assert 1_500_000 < total < 2_500_000  # "about 1.9 M characters"
    json_doc = docs[names.index("json")].text
    assert json_doc.startswith("json\nJSON (JavaScript Object Notation)")
    assert "json.dumps\nSerialize ``obj`` to a JSON formatted ``str``." in json_doc
    # The order mixes modules and pydoc topics instead of listing them alphabetically.
    assert names != sorted(names)
