"""Corpus sources (python-docs, local files, Hugging Face datasets) -> fixed-length token sequences.

A corpus is a deterministic stream of ``Document(name, text)``. ``tokenize_corpus`` packs the
documents into sequences as SAELens does: each sequence starts with BOS and documents follow one
another, each opened by a BOS, so no forward pass is spent on padding; ``doc_ids`` records the
documents each sequence holds. BOS and other special tokens are flagged in ``special_mask`` so
statistics and training skip them, and token budgets count only the other (text) positions.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import json
import re
import sys
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from app.errors import ConfigError, OfflineError

if TYPE_CHECKING:
    from app.engine.lm import LanguageModel

DEFAULT_CORPUS = "python-docs"
# How documents become sequences; part of every cache and run key, so a change of layout never
# reuses activations or checkpoints made with another.
PACKING = "bos-separated-packing"
TEXT_SUFFIXES = (".txt", ".md")
TABLE_SUFFIXES = (".jsonl", ".parquet", ".csv")
# Standard-library folders that are tests, demos or bundled third-party code, not documentation.
_STDLIB_SKIP = {"test", "tests", "idlelib", "turtledemo", "site-packages", "__phello__",
                "ensurepip", "lib2to3"}
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class Document:
    name: str
    text: str


@dataclass
class TokenizedCorpus:
    """Token windows of one corpus: ``tokens[i]`` came from document ``doc_names[doc_index[i]]``."""

    tokens: np.ndarray  # int32 [n_seq, context_size], BOS first
    doc_index: np.ndarray  # int64 [n_seq]
    doc_names: list[str]
    special_mask: np.ndarray  # bool [n_seq, context_size]: BOS, pads and other special tokens
    context_size: int
    source: str = ""
    n_real_tokens: int = 0  # positions that hold document text (not BOS or other special)
    # int32 [n_seq, context_size]: the document of each position (a BOS: the one it opens);
    # ``doc_index`` is the document a sequence starts in.
    doc_ids: np.ndarray | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_seq(self) -> int:
        return int(self.tokens.shape[0])

    def real_tokens(self, stop_seq: int | None = None) -> int:
        """Positions holding document text in the first ``stop_seq`` sequences (all: None)."""
        if stop_seq is None:
            return self.n_real_tokens
        return int((~self.special_mask[:stop_seq]).sum())

    def split(self, *budgets: int) -> list[TokenizedCorpus]:
        """Consecutive runs of sequences: each the most whole sequences, after the previous run,
        holding at most its budget of text tokens (e.g. ``split(train, held_out)``)."""
        real = np.concatenate([[0], np.cumsum((~self.special_mask).sum(axis=1))])
        parts, at = [], 0
        for budget in budgets:
            end = int(np.searchsorted(real, real[at] + budget, side="right")) - 1
            parts.append(self.select(slice(at, max(end, at))))
            at = max(end, at)
        return parts

    def select(self, rows: slice) -> TokenizedCorpus:
        """A contiguous slice of the sequences (all document names kept, so indices stay valid)."""
        special = self.special_mask[rows]
        return TokenizedCorpus(
            tokens=self.tokens[rows], doc_index=self.doc_index[rows], doc_names=self.doc_names,
            special_mask=special, context_size=self.context_size, source=self.source,
            n_real_tokens=int((~special).sum()),
            doc_ids=None if self.doc_ids is None else self.doc_ids[rows],
        )

    def documents(self, seq: int) -> list[str]:
        """Names of the documents sequence ``seq`` holds, in order."""
        if self.doc_ids is None:
            return [self.doc_names[int(self.doc_index[seq])]]
        return [self.doc_names[i] for i in dict.fromkeys(self.doc_ids[seq].tolist())]


# --------------------------------------------------------------------------------------- sources


def load_documents(source: str | Path = DEFAULT_CORPUS, *, text_field: str = "text"
                   ) -> Iterator[Document]:
    """Yield the documents of a corpus source, in a deterministic order.

    ``source`` is ``python-docs``, a ``.txt``/``.md`` file, a folder of them, a ``.jsonl``,
    ``.parquet`` or ``.csv`` file (``text_field`` names the text column), or a Hugging Face
    dataset id (needs a network or a local hub cache). Bad input raises ConfigError/OfflineError.
    """
    spec = str(source)
    if spec == DEFAULT_CORPUS:
        yield from python_docs()
        return
    path = Path(spec).expanduser()
    if path.is_dir():
        yield from _folder_documents(path)
    elif path.is_file():
        yield from _file_documents(path, text_field=text_field, display=spec)
    elif _HF_ID.match(spec) and not spec.endswith(TEXT_SUFFIXES + TABLE_SUFFIXES):
        yield from _hub_documents(spec, text_field=text_field)
    else:
        raise ConfigError(
            f"corpus {spec!r} not found: use 'python-docs', a .txt/.md file or folder, a "
            ".jsonl/.parquet/.csv file, or a Hugging Face dataset id (needs a network)")


def corpus_fingerprint(source: str | Path, *, text_field: str = "text") -> str:
    """A string that changes when the corpus content may have changed (used in cache keys)."""
    spec = str(source)
    if spec == DEFAULT_CORPUS:
        return f"python-docs@{sys.version_info[0]}.{sys.version_info[1]}.{sys.version_info[2]}"
    path = Path(spec).expanduser()
    if path.exists():
        files = sorted(_folder_files(path)) if path.is_dir() else [path]
        digest = hashlib.sha256()
        for f in files:
            st = f.stat()
            digest.update(f"{f.relative_to(path) if path.is_dir() else f.name}|{st.st_size}|"
                          f"{st.st_mtime_ns}\n".encode())
        return f"{path.resolve()}#{text_field}#{digest.hexdigest()[:16]}"
    return f"hf:{spec}#{text_field}"


def python_docs() -> Iterator[Document]:
    """Docstrings of the standard library (one document per module) plus ``pydoc_data.topics``.

    Sources are parsed with ``ast`` (nothing is imported, so no side effects). Documents come in
    the order of a hash of their names: fixed, yet well mixed, so any prefix of the corpus is a
    fair sample of the whole and a held-out tail reads like the head.
    """
    yield from _python_docs_list()


@lru_cache(maxsize=1)
def _python_docs_list() -> tuple[Document, ...]:
    # Parsing ~560 sources takes seconds; train and eval both read the corpus in one process.
    docs = list(_stdlib_documents()) + list(_pydoc_topic_documents())
    docs.sort(key=lambda d: hashlib.sha256(d.name.encode()).hexdigest())
    return tuple(docs)


def _stdlib_documents() -> Iterator[Document]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib)
        if any(part in _STDLIB_SKIP or part.startswith("config-") for part in rel.parts[:-1]):
            continue
        if rel.name.startswith("test_"):
            continue
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, OSError):
            continue  # a few sources are Python 2 fixtures or unreadable: not documentation
        module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        text = _module_docstrings(tree, module)
        if text:
            yield Document(name=module, text=text)


def _module_docstrings(tree: ast.Module, module: str) -> str:
    blocks: list[str] = []
    doc = ast.get_docstring(tree)
    if doc:
        blocks.append(f"{module}\n{doc}")

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                qualname = f"{prefix}{child.name}"
                child_doc = ast.get_docstring(child)
                if child_doc:
                    blocks.append(f"{module}.{qualname}\n{child_doc}")
                visit(child, f"{qualname}.")

    visit(tree, "")
    return "\n\n".join(blocks)


def _pydoc_topic_documents() -> Iterator[Document]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        return
    for name in sorted(topics):
        text = topics[name].strip()
        if text:
            yield Document(name=f"pydoc_data.topics:{name}", text=text)


def _folder_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES + TABLE_SUFFIXES)


def _folder_documents(folder: Path) -> Iterator[Document]:
    files = [p for p in _folder_files(folder) if p.suffix.lower() in TEXT_SUFFIXES]
    if not files:
        raise ConfigError(f"corpus folder {folder} holds no .txt or .md files")
    for path in files:
        yield from _file_documents(path, text_field="text", display=str(path.relative_to(folder)))


def _file_documents(path: Path, *, text_field: str, display: str) -> Iterator[Document]:
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        yield Document(name=display, text=_read_text(path))
    elif suffix == ".jsonl":
        yield from _jsonl_documents(path, text_field=text_field)
    elif suffix == ".parquet":
        yield from _parquet_documents(path, text_field=text_field)
    elif suffix == ".csv":
        yield from _csv_documents(path, text_field=text_field)
    else:
        raise ConfigError(f"corpus file {path} has an unsupported type {suffix!r}: use "
                          ".txt, .md, .jsonl, .parquet or .csv")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read corpus file {path} as UTF-8 text: {exc}") from None


def _jsonl_documents(path: Path, *, text_field: str) -> Iterator[Document]:
    for line_no, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{line_no} is not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict) or text_field not in row:
            keys = sorted(row) if isinstance(row, dict) else []
            raise ConfigError(f"{path}:{line_no} has no field {text_field!r} (fields: {keys}); "
                              "pass --text-field NAME")
        text = row[text_field]
        if isinstance(text, str) and text:
            yield Document(name=f"{path.name}:{line_no}", text=text)


def _table_column(names: Sequence[str], *, path: Path, text_field: str) -> None:
    if text_field not in names:
        raise ConfigError(f"{path} has no column {text_field!r} (columns: {list(names)}); "
                          "pass --text-field NAME")


def _parquet_documents(path: Path, *, text_field: str) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise ConfigError(f"cannot read parquet corpus {path}: {exc}") from None
    _table_column(parquet.schema_arrow.names, path=path, text_field=text_field)
    row = 0
    for batch in parquet.iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if isinstance(text, str) and text:
                yield Document(name=f"{path.name}:{row}", text=text)
            row += 1


def _csv_documents(path: Path, *, text_field: str) -> Iterator[Document]:
    csv.field_size_limit(1 << 30)  # long documents are normal in a corpus
    try:
        with path.open(encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            _table_column(reader.fieldnames or [], path=path, text_field=text_field)
            for row_no, row in enumerate(reader):
                text = row.get(text_field)
                if text:
                    yield Document(name=f"{path.name}:{row_no}", text=text)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ConfigError(f"cannot read csv corpus {path}: {exc}") from None


def _hub_documents(repo_id: str, *, text_field: str) -> Iterator[Document]:
    """A Hugging Face dataset read from its data files (parquet/jsonl/csv/txt) in the hub cache."""
    from huggingface_hub import constants, snapshot_download

    try:
        folder = snapshot_download(
            repo_id, repo_type="dataset", local_files_only=bool(constants.HF_HUB_OFFLINE),
            allow_patterns=["*.parquet", "*.jsonl", "*.csv", "*.txt", "*.md"])
    except Exception as exc:  # offline, unknown repo, gated repo: all end the same way here
        raise OfflineError(
            f"corpus {repo_id!r} looks like a Hugging Face dataset id, but it could not be "
            f"fetched ({type(exc).__name__}); this machine may be offline. Use 'python-docs' or "
            "a local .txt/.md/.jsonl/.parquet/.csv file or folder") from None
    files = [p for p in _folder_files(Path(folder)) if p.name.lower() != "readme.md"]
    if not files:
        raise ConfigError(f"dataset {repo_id!r} has no parquet/jsonl/csv/txt data files")
    for path in files:
        yield from _file_documents(path, text_field=text_field,
                                   display=f"{repo_id}/{path.relative_to(folder)}")


# ------------------------------------------------------------------------------------ tokenizing


class CorpusTooSmall(ConfigError):
    """The corpus holds fewer text tokens than asked; ``available`` is the most it can give."""

    def __init__(self, message: str, *, available: int) -> None:
        super().__init__(message)
        self.available = available


def tokenize_corpus(
    docs: Iterable[Document],
    *,
    lm: LanguageModel | None = None,
    tokenizer: Any = None,
    context_size: int = 128,
    max_tokens: int | None = None,
    prepend_bos: bool = True,
    source: str = "",
    allow_short: bool = False,
) -> TokenizedCorpus:
    """Pack documents into sequences of ``context_size`` tokens, as SAELens does.

    Each sequence starts with BOS; documents follow one another, each opened by a BOS (the
    sequence's own BOS opens a document that starts there), so no position is padding and a
    sequence may hold several documents (``doc_ids`` says which, per position). A document that
    does not fit goes on in the next sequence, after its BOS. ``max_tokens`` counts text tokens
    (positions that are not BOS or another special token): the sequences kept are the longest
    prefix holding at most that many; None keeps every whole sequence (a last, partial one is
    dropped). The packing does not depend on the budget, so a smaller budget gives a prefix of
    the sequences a larger one gives. A corpus holding fewer text tokens than ``max_tokens``
    raises ``CorpusTooSmall`` (unless ``allow_short``); an empty corpus raises ConfigError.
    """
    if lm is None and tokenizer is None:
        raise TypeError("tokenize_corpus needs lm= or tokenizer=")
    tok = tokenizer if tokenizer is not None else lm.tokenizer
    bos_id = _bos_id(lm, tok) if prepend_bos else None
    special_ids = set(getattr(tok, "all_special_ids", []) or [])
    if lm is not None:
        special_ids |= set(lm.special_token_ids)
    if bos_id is not None:
        special_ids.add(bos_id)
    special_arr = np.fromiter(special_ids, dtype=np.int64)
    if context_size < 2:
        raise ConfigError(f"context size must be at least 2 (got {context_size})")
    head = [bos_id] if bos_id is not None else []
    body = context_size - len(head)
    if max_tokens is not None and max_tokens < body:
        raise ConfigError(f"token budget {max_tokens} is smaller than one sequence "
                          f"({body} text tokens after BOS); raise --tokens")

    rows: list[np.ndarray] = []
    row_docs: list[np.ndarray] = []
    doc_names: list[str] = []
    n_real = 0
    # The stream not yet cut into sequences: token ids and the document of each; a separating
    # BOS is stored as -(doc + 1), so a sequence drops one that would follow its own BOS.
    stream: list[int] = []
    stream_doc: list[int] = []
    full = False  # the budget is reached
    for batch in _batched(docs, 64):
        encoded = tok([d.text for d in batch], add_special_tokens=False)["input_ids"]
        for doc, ids in zip(batch, encoded, strict=True):
            if not ids:
                continue
            doc_id = len(doc_names)
            doc_names.append(doc.name)
            if head and doc_id > 0:
                stream.append(head[0])
                stream_doc.append(-(doc_id + 1))
            stream.extend(ids)
            stream_doc.extend([doc_id] * len(ids))
            at = 0
            while True:
                if head and at < len(stream) and stream_doc[at] < 0:
                    at += 1  # the sequence's own BOS opens this document
                if len(stream) - at < body:
                    break
                row = np.asarray(head + stream[at:at + body], dtype=np.int32)
                real = int((~np.isin(row, special_arr)).sum())
                if max_tokens is not None and n_real + real > max_tokens:
                    full = True
                    break
                docs_part = [d if d >= 0 else -d - 1 for d in stream_doc[at:at + body]]
                rows.append(row)
                row_docs.append(np.asarray(docs_part[:len(head)] + docs_part, dtype=np.int32))
                n_real += real
                at += body
            del stream[:at], stream_doc[:at]
            if full:
                break
        if full:
            break
    if not doc_names:
        raise ConfigError(f"corpus {source!r} is empty: no document holds any text")
    if not rows or (max_tokens is not None and not full and n_real < max_tokens
                    and not allow_short):
        # Fewer text tokens than asked: the most it holds is what its whole sequences hold.
        raise CorpusTooSmall(
            f"corpus {source!r} has only {n_real:,} text tokens in whole sequences of "
            f"{context_size}; lower --tokens to at most {n_real:,} or use a larger corpus",
            available=n_real)
    tokens = np.stack(rows)
    doc_ids = np.stack(row_docs)
    special = np.isin(tokens, special_arr)
    return TokenizedCorpus(tokens=tokens, doc_index=doc_ids[:, 0].astype(np.int64),
                           doc_names=doc_names, special_mask=special, context_size=context_size,
                           source=source, n_real_tokens=int((~special).sum()), doc_ids=doc_ids)


def _bos_id(lm: LanguageModel | None, tok: Any) -> int:
    bos = getattr(lm, "bos_token_id", None) if lm is not None else None
    if bos is None:
        bos = getattr(tok, "bos_token_id", None)
    if bos is None:
        raise ConfigError("the tokenizer has no BOS token; pass prepend_bos=False")
    return int(bos)


def _batched(items: Iterable[Document], size: int) -> Iterator[list[Document]]:
    batch: list[Document] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def load_corpus(source: str | Path = DEFAULT_CORPUS, *, lm: LanguageModel | None = None,
                tokenizer: Any = None, text_field: str = "text", context_size: int = 128,
                max_tokens: int | None = None) -> TokenizedCorpus:
    """``load_documents`` + ``tokenize_corpus`` in one call."""
    return tokenize_corpus(load_documents(source, text_field=text_field), lm=lm,
                           tokenizer=tokenizer, context_size=context_size, max_tokens=max_tokens,
                           source=str(source))
