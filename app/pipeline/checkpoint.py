"""A build's resumable state: the run key that names it and the atomically written checkpoint.

Accumulator state is checkpointed under ``{cache_dir}/precompute/{run_key}/`` every few batches
and after the last one (a sharded build keeps each finished shard's state in ``shards/`` there);
the run key hashes everything the result depends on, so a checkpoint is only ever resumed by the
same build.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from app.pipeline.corpus import corpus_fingerprint

CHECKPOINT_VERSION = 3  # 3: exact sums (int64 limbs), canonical slot order


class Checkpoint:
    """Accumulator state + position, written atomically (tmp file, then os.replace)."""

    def __init__(self, folder: Path, key: str, *, name: str = "state") -> None:
        self.folder, self.key = folder, key
        self.path = folder / f"{name}.npz"

    def load(self) -> tuple[int, dict[str, np.ndarray]] | None:
        if not self.path.exists():
            return None
        try:
            with np.load(self.path, allow_pickle=False) as data:
                state = {k: np.array(data[k]) for k in data.files}
        except (OSError, ValueError, EOFError):
            return None  # unreadable (cannot happen with os.replace, but never trust a file)
        meta = json.loads(bytes(state.pop("__meta__")).decode())
        if meta.get("key") != self.key or meta.get("version") != CHECKPOINT_VERSION:
            return None
        return int(meta["next_seq"]), state

    def saved_seq(self) -> int | None:
        """The position of a checkpoint of this run on disk (reads only its metadata)."""
        if not self.path.exists():
            return None
        try:
            with np.load(self.path, allow_pickle=False) as data:
                meta = json.loads(bytes(data["__meta__"]).decode())
        except (OSError, ValueError, EOFError, KeyError):
            return None
        if meta.get("key") != self.key or meta.get("version") != CHECKPOINT_VERSION:
            return None
        return int(meta["next_seq"])

    def save(self, *, next_seq: int, state: dict[str, np.ndarray]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        meta = {"key": self.key, "version": CHECKPOINT_VERSION, "next_seq": int(next_seq)}
        tmp = self.folder / f".{self.path.stem}.{os.getpid()}.tmp.npz"
        with tmp.open("wb") as fh:
            np.savez(fh, __meta__=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
                     **state)
        os.replace(tmp, self.path)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def run_key(config: dict[str, Any], *, sae_path: Path, corpus: str, text_field: str,
            activation_source: str) -> str:
    """The build's identity: its config plus fingerprints of the SAE files and the corpus."""
    key_parts = {**config, "sae_fingerprint": _sae_fingerprint(sae_path),
                 "corpus_fingerprint": corpus_fingerprint(corpus, text_field=text_field),
                 "activation_source": activation_source, "version": CHECKPOINT_VERSION}
    return hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:20]


def open_checkpoint(cache_dir: Path, key: str) -> Checkpoint:
    return Checkpoint(cache_dir / "precompute" / key, key)


def _sae_fingerprint(path: Path) -> str:
    digest = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        st = f.stat()
        digest.update(f"{f.relative_to(path)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]
