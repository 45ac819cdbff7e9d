"""On-disk activation cache: one model pass per corpus, float16 memmaps for training and precompute.

A cache lives in ``{cache_dir}/activations/{key}/`` where the key hashes (model, hook, corpus,
packing, text-token budget, context size). Layout::

    meta.json          what the key was made of, shapes, dtype
    tokens.npy         int32 [n_seq, ctx]
    doc_index.npy      int64 [n_seq]        the document each sequence starts in
    doc_ids.npy        int32 [n_seq, ctx]   the document of each position (packed sequences)
    special_mask.npy   bool  [n_seq, ctx]   BOS / special tokens (left out of stats)
    doc_names.json     list[str]
    acts.npy           float16 [n_seq, ctx, d_model]   (memory-mapped .npy)
    progress.json      {"done_seq": n}: rows of acts.npy written and flushed
    complete.json      written last, atomically: the cache is whole

The model runs once per batch of sequences. After each chunk of batches the memmap is flushed
and progress.json replaced atomically, so a killed run resumes at the last flushed chunk and ends
with exactly the arrays of an uninterrupted run (each batch's activations depend only on its own
sequences).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from app.errors import ConfigError, Interrupted
from app.pipeline.corpus import (
    DEFAULT_CORPUS,
    PACKING,
    TokenizedCorpus,
    corpus_fingerprint,
    load_corpus,
)
from app.pipeline.interrupts import DeferredInterrupt

if TYPE_CHECKING:
    from app.engine.lm import LanguageModel

FORMAT_VERSION = 2


@dataclass
class ActivationBatch:
    """A run of consecutive sequences of the cache (numpy views; acts stay float16)."""

    start: int  # index of the first sequence
    tokens: np.ndarray  # int32 [b, ctx]
    acts: np.ndarray  # float16 [b, ctx, d_model]
    special_mask: np.ndarray  # bool [b, ctx]
    doc_index: np.ndarray  # int64 [b]


@dataclass
class ActivationCache:
    """Activations of one hook over one tokenized corpus; see the module docstring for files."""

    path: Path
    key: str
    meta: dict[str, Any]
    tokens: np.ndarray
    acts: np.ndarray
    doc_index: np.ndarray
    doc_names: list[str]
    special_mask: np.ndarray
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_seq(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def context_size(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def d_model(self) -> int:
        return int(self.acts.shape[2])

    @property
    def hook_name(self) -> str:
        return str(self.meta["hook"])

    def iter_batches(self, batch_size: int = 32, *, start: int = 0, stop: int | None = None
                     ) -> Iterator[ActivationBatch]:
        """Consecutive batches of ``batch_size`` sequences from ``start`` to ``stop``."""
        stop = self.n_seq if stop is None else min(stop, self.n_seq)
        for s in range(start, stop, batch_size):
            e = min(s + batch_size, stop)
            yield ActivationBatch(start=s, tokens=self.tokens[s:e], acts=self.acts[s:e],
                                  special_mask=self.special_mask[s:e],
                                  doc_index=self.doc_index[s:e])

    def counted_activations(self, *, chunk_seqs: int = 256) -> np.ndarray:
        """float16 [n_counted, d_model]: every non-special position, in corpus order (a copy)."""
        keep = ~self.special_mask
        out = np.empty((int(keep.sum()), self.d_model), dtype=np.float16)
        at = 0
        for batch in self.iter_batches(chunk_seqs):
            rows = batch.acts[~batch.special_mask]
            out[at:at + len(rows)] = rows
            at += len(rows)
        return out


def cache_key_parts(*, lm: LanguageModel, hook_name: str, corpus: str, text_field: str,
                    max_tokens: int, context_size: int) -> dict[str, Any]:
    """What a cache depends on; hashed into its folder name."""
    return {
        "format": FORMAT_VERSION,
        "model": lm.model_id,
        "model_source": str(lm.source),
        "hook": lm.hook_point(hook_name).name,
        "corpus": str(corpus),
        "corpus_fingerprint": corpus_fingerprint(corpus, text_field=text_field),
        "packing": PACKING,
        "max_tokens": int(max_tokens),
        "context_size": int(context_size),
        # a model run in another dtype gives other activations; float32 keys stay as they were
        **({} if str(lm.dtype) == "torch.float32"
           else {"model_dtype": str(lm.dtype).removeprefix("torch.")}),
    }


def cache_key(parts: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
    safe_model = "".join(c if c.isalnum() or c in "-_." else "-" for c in parts["model"])
    return f"{safe_model}--{parts['hook']}--{digest}"


def get_activations(
    *,
    lm: LanguageModel,
    hook_name: str,
    corpus: str = DEFAULT_CORPUS,
    max_tokens: int,
    context_size: int = 128,
    cache_dir: Path,
    text_field: str = "text",
    tokenized: TokenizedCorpus | None = None,
    batch_size: int = 8,
    chunk_seqs: int = 128,
    progress: bool = True,
    on_chunk: Callable[[int], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> ActivationCache:
    """Return the cached activations of ``hook_name`` over the first ``max_tokens`` of a corpus.

    Computes what is missing (resuming a partial cache), under a file lock so two processes
    asking for the same cache do the work once. ``tokenized`` skips re-tokenizing when the
    caller already has the corpus windows (they must be the ones this corpus and budget give).
    ``on_chunk(done_seq)`` runs after each flushed chunk. ``log`` hears whether the cache is
    reused, resumed or computed. Ctrl-C saves the batches done and raises ``Interrupted``.
    """
    say = log or (lambda _msg: None)
    cache_root = Path(cache_dir) / "activations"
    parts = cache_key_parts(lm=lm, hook_name=hook_name, corpus=corpus, text_field=text_field,
                            max_tokens=max_tokens, context_size=context_size)
    key = cache_key(parts)
    folder = cache_root / key
    if (folder / "complete.json").exists():
        say(f"activations: reusing the cache {folder}")
        return open_cache(folder)

    if tokenized is None:
        tokenized = load_corpus(corpus, lm=lm, text_field=text_field, context_size=context_size,
                                max_tokens=max_tokens)
    if tokenized.real_tokens() > max_tokens or tokenized.context_size != context_size:
        raise ConfigError(f"tokenized corpus has {tokenized.real_tokens():,} text tokens in "
                          f"sequences of {tokenized.context_size}, expected at most "
                          f"{max_tokens:,} in sequences of {context_size}")

    cache_root.mkdir(parents=True, exist_ok=True)
    with _locked(cache_root / f".{key}.lock"):
        if (folder / "complete.json").exists():  # another process finished it meanwhile
            say(f"activations: reusing the cache {folder}")
            return open_cache(folder)
        acts, done = _prepare(folder, parts=parts, tokenized=tokenized, d_model=lm.d_model)
        total = tokenized.real_tokens()
        if done:
            say(f"activations: resuming at {tokenized.real_tokens(done):,} of {total:,} tokens "
                f"(cache in {folder})")
        else:
            say(f"activations: running {lm.model_id} to {parts['hook']} over {total:,} tokens "
                f"(cache in {folder})")
        _fill(acts, tokens=tokenized, done=done, lm=lm, hook_name=parts["hook"],
              folder=folder, batch_size=batch_size, chunk_seqs=chunk_seqs, progress=progress,
              on_chunk=on_chunk)
        del acts
        _write_json(folder / "complete.json", {"done_seq": tokenized.n_seq,
                                               "finished_at": time.time()})
    return open_cache(folder)


def open_cache(folder: Path) -> ActivationCache:
    """Open a complete cache folder read-only (activations memory-mapped)."""
    if not (folder / "complete.json").exists():
        raise ConfigError(f"activation cache {folder} is incomplete; rerun the command that "
                          "builds it (it resumes)")
    meta = json.loads((folder / "meta.json").read_text())
    return ActivationCache(
        path=folder, key=folder.name, meta=meta,
        tokens=np.load(folder / "tokens.npy", mmap_mode="r"),
        acts=np.load(folder / "acts.npy", mmap_mode="r"),
        doc_index=np.load(folder / "doc_index.npy", mmap_mode="r"),
        doc_names=json.loads((folder / "doc_names.json").read_text()),
        special_mask=np.load(folder / "special_mask.npy", mmap_mode="r"),
    )


def _prepare(folder: Path, *, parts: dict[str, Any], tokenized: TokenizedCorpus, d_model: int
             ) -> tuple[np.memmap, int]:
    """Open a partial cache whose inputs match, or start a fresh one; return (acts, done_seq)."""
    shape = [tokenized.n_seq, tokenized.context_size, int(d_model)]
    meta = {**parts, "shape": shape, "dtype": "float16", "n_counted": tokenized.n_real_tokens}
    if (folder / "meta.json").exists():
        try:
            old = json.loads((folder / "meta.json").read_text())
            same = old == meta and np.array_equal(np.load(folder / "tokens.npy"),
                                                  tokenized.tokens)
            acts = np.load(folder / "acts.npy", mmap_mode="r+") if same else None
            done = json.loads((folder / "progress.json").read_text())["done_seq"] if (
                folder / "progress.json").exists() else 0
            if acts is not None and list(acts.shape) == shape:
                return acts, int(done)
        except (OSError, ValueError, KeyError):
            pass  # a damaged partial cache: rebuild it
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    _save_npy(folder / "tokens.npy", tokenized.tokens.astype(np.int32))
    _save_npy(folder / "doc_index.npy", tokenized.doc_index.astype(np.int64))
    _save_npy(folder / "special_mask.npy", tokenized.special_mask.astype(bool))
    if tokenized.doc_ids is not None:
        _save_npy(folder / "doc_ids.npy", tokenized.doc_ids.astype(np.int32))
    _write_json(folder / "doc_names.json", tokenized.doc_names)
    acts = np.lib.format.open_memmap(folder / "acts.npy", mode="w+", dtype=np.float16,
                                     shape=tuple(shape))
    _write_json(folder / "meta.json", meta)  # last: its presence means the inputs are in place
    return acts, 0


def _fill(acts: np.memmap, *, tokens: TokenizedCorpus, done: int, lm: LanguageModel,
          hook_name: str, folder: Path, batch_size: int, chunk_seqs: int, progress: bool,
          on_chunk: Callable[[int], None] | None) -> None:
    n_seq, ctx = tokens.tokens.shape
    # Chunks are whole batches, so resumed batches have the same composition as uninterrupted.
    chunk_seqs = max(batch_size, chunk_seqs // batch_size * batch_size)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n_seq * ctx, initial=done * ctx, unit="tok", unit_scale=True,
                   desc=f"activations {hook_name}", dynamic_ncols=True, mininterval=0.5)

    def flushed(upto: int) -> None:
        acts.flush()
        _write_json(folder / "progress.json", {"done_seq": upto})
        if on_chunk is not None:
            on_chunk(upto)

    try:
        with DeferredInterrupt() as interrupt:
            for chunk_start in range(done, n_seq, chunk_seqs):
                chunk_end = min(chunk_start + chunk_seqs, n_seq)
                for s in range(chunk_start, chunk_end, batch_size):
                    e = min(s + batch_size, chunk_end)
                    ids = torch.from_numpy(np.ascontiguousarray(tokens.tokens[s:e])).long()
                    with torch.inference_mode():
                        out = lm.run_to_hook(ids, hook_name)
                    acts[s:e] = out.to(torch.float16).cpu().numpy()
                    if bar is not None:
                        bar.update((e - s) * ctx)
                    if interrupt.requested:  # Ctrl-C: keep the batches done, then stop
                        flushed(e)
                        raise Interrupted(
                            f"interrupted; activations for {tokens.real_tokens(e):,} of "
                            f"{tokens.real_tokens():,} tokens are cached: the same command "
                            "resumes there")
                flushed(chunk_end)
    finally:
        if bar is not None:
            bar.close()


class _locked:
    """An exclusive flock on a file for the duration of a with block (released on kill)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fh: Any = None

    def __enter__(self) -> _locked:
        self.fh = self.path.open("a")
        fcntl.flock(self.fh, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.fh, fcntl.LOCK_UN)
        self.fh.close()


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)


def _save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.stem}.tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)
