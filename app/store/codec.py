"""Blob encodings shared by the store's writer and readers: little-endian arrays, vocabularies."""

from __future__ import annotations

import hashlib
import json
import zlib
from collections import OrderedDict
from threading import Lock

import numpy as np

# Explicit little-endian dtypes so a database file reads the same on any machine.
INT32 = np.dtype("<i4")
INT64 = np.dtype("<i8")
FLOAT16 = np.dtype("<f2")
FLOAT32 = np.dtype("<f4")
FLOAT64 = np.dtype("<f8")


def to_blob(array: np.ndarray, dtype: np.dtype) -> bytes:
    return np.ascontiguousarray(array, dtype=dtype).tobytes()


def from_blob(blob: bytes, dtype: np.dtype) -> np.ndarray:
    return np.frombuffer(blob, dtype=dtype)


def doc_starts_blob(starts: np.ndarray) -> bytes:
    """A sequence's documents, (offset, doc_index) rows, as the int32 blob sequences store."""
    return np.ascontiguousarray(starts, dtype=INT32).tobytes()


def doc_starts_of(blob: bytes | None, doc_index: int) -> list[tuple[int, int]]:
    """(offset, doc_index) of every document of a stored sequence, first at offset 0; a null
    blob (a row written before documents were recorded) is one document, ``doc_index``."""
    if not blob:
        return [(0, doc_index)]
    flat = np.frombuffer(blob, dtype=INT32).tolist()
    return list(zip(flat[::2], flat[1::2], strict=True))


def encode_vocab(token_strings: list[str]) -> tuple[bytes, str]:
    """The vocabulary as a zlib-compressed JSON list, and the sha256 readers cache it under."""
    raw = json.dumps(token_strings, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    blob = zlib.compress(raw, 6)
    return blob, hashlib.sha256(blob).hexdigest()


_VOCAB_CACHE: OrderedDict[str, list[str]] = OrderedDict()
_VOCAB_CACHE_SIZE = 4
_VOCAB_LOCK = Lock()


def cached_vocab(sha: str) -> list[str] | None:
    with _VOCAB_LOCK:
        return _VOCAB_CACHE.get(sha)


def decode_vocab(blob: bytes, sha: str) -> list[str]:
    """Decoded vocabulary, kept for the last few models: decoding a vocabulary of a few hundred
    thousand strings is too slow for a feature page to pay per request."""
    with _VOCAB_LOCK:
        cached = _VOCAB_CACHE.get(sha)
        if cached is not None:
            _VOCAB_CACHE.move_to_end(sha)
            return cached
    vocab = json.loads(zlib.decompress(blob).decode("utf-8"))
    with _VOCAB_LOCK:
        _VOCAB_CACHE[sha] = vocab
        while len(_VOCAB_CACHE) > _VOCAB_CACHE_SIZE:
            _VOCAB_CACHE.popitem(last=False)
    return vocab
