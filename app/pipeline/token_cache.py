"""Tokenized corpora kept on disk by fingerprint, so a rebuild skips parsing and tokenizing.

{cache_dir}/tokens/{key}/ holds corpus.npz (tokens, doc_index, special_mask, doc_ids) and
meta.json (document names, source, the key's parts). The key is made of what the packed
sequences depend on: the corpus fingerprint (as the activation cache's), the text field, the
model and its source, the tokenizer's vocabulary size and special ids, the transformers version,
the packing, the context size and the token budget. A folder is written aside and renamed into
place, so a kill leaves either nothing or a whole entry.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from app.pipeline.corpus import (
    PACKING,
    TokenizedCorpus,
    corpus_fingerprint,
    load_documents,
    tokenize_corpus,
)

if TYPE_CHECKING:
    from app.engine.lm import LanguageModel

FORMAT_VERSION = 1


def token_key_parts(*, lm: LanguageModel, corpus: str, text_field: str, context_size: int,
                    max_tokens: int) -> dict[str, Any]:
    import transformers

    return {
        "format": FORMAT_VERSION,
        "model": lm.model_id,
        "model_source": str(lm.source),
        "vocab": int(len(lm.tokenizer)),
        "special_ids": sorted(int(i) for i in lm.special_token_ids),
        "bos": int(lm.bos_token_id),
        "transformers": transformers.__version__,
        "corpus": str(corpus),
        "corpus_fingerprint": corpus_fingerprint(corpus, text_field=text_field),
        "text_field": text_field,
        "packing": PACKING,
        "context_size": int(context_size),
        "max_tokens": int(max_tokens),
    }


def _folder(cache_dir: Path, parts: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]
    return Path(cache_dir) / "tokens" / digest


def cached_tokenize(*, lm: LanguageModel, corpus: str, text_field: str, context_size: int,
                    max_tokens: int, cache_dir: Path,
                    log: Callable[[str], None] = lambda _m: None) -> TokenizedCorpus:
    """``tokenize_corpus(load_documents(corpus), allow_short=True)``, from the cache when an
    entry with the same key exists (one line says so), else computed and stored."""
    parts = token_key_parts(lm=lm, corpus=corpus, text_field=text_field,
                            context_size=context_size, max_tokens=max_tokens)
    folder = _folder(cache_dir, parts)
    if (folder / "meta.json").exists():
        found = _read(folder, parts)
        if found is not None:
            log(f"tokens: reusing the tokenized corpus in {folder}")
            return found
    docs = load_documents(corpus, text_field=text_field)
    out = tokenize_corpus(docs, lm=lm, context_size=context_size, max_tokens=max_tokens,
                          source=str(corpus), allow_short=True)
    with contextlib.suppress(OSError):  # a read-only or full cache: the next build tokenizes
        _write(folder, parts, out)
    return out


def _read(folder: Path, parts: dict[str, Any]) -> TokenizedCorpus | None:
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        if meta.get("parts") != parts:
            return None
        with np.load(folder / "corpus.npz") as z:
            arrays = {name: z[name] for name in ("tokens", "doc_index", "special_mask",
                                                 "doc_ids")}
    except (OSError, ValueError, KeyError):
        return None
    special = arrays["special_mask"]
    return TokenizedCorpus(tokens=arrays["tokens"], doc_index=arrays["doc_index"],
                           doc_names=list(meta["doc_names"]), special_mask=special,
                           context_size=int(parts["context_size"]), source=meta["source"],
                           n_real_tokens=int((~special).sum()), doc_ids=arrays["doc_ids"])


def _write(folder: Path, parts: dict[str, Any], corpus: TokenizedCorpus) -> None:
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    doc_ids = corpus.doc_ids if corpus.doc_ids is not None else \
        np.repeat(corpus.doc_index.astype(np.int32)[:, None], corpus.context_size, axis=1)
    with open(tmp / "corpus.npz", "wb") as fh:
        np.savez(fh, tokens=corpus.tokens, doc_index=corpus.doc_index,
                 special_mask=corpus.special_mask, doc_ids=doc_ids)
    (tmp / "meta.json").write_text(json.dumps({"parts": parts, "source": corpus.source,
                                               "doc_names": corpus.doc_names}),
                                   encoding="utf-8")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
