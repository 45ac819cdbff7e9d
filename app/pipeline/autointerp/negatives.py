"""Windows where a feature is zero: slices of the run's stored sequences, encoded once with the
model and SAE, that lie outside the feature's recorded windows and where it never fires.

The pool holds a sample of stored sequences and, for every feature, the positions where it fires
on them (the SAE's sparse code of the model's activations at the hook, computed in each
sequence's full context, as the build computed the windows). `zero_excerpts` then draws windows
with no firing position at all, so a detection scorer's "non-activating" windows are verified
non-activating, not assumed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from sqlalchemy import Engine

from app.errors import ConfigError
from app.pipeline.autointerp.windows import Excerpt
from app.store import queries
from app.store.db import read_session

if TYPE_CHECKING:
    from app.engine.lm import LanguageModel
    from app.engine.sae import SAE

MAX_TRIES = 60  # random placements tried per wanted window before giving up on it


class SequencePool:
    """Stored sequences (token ids by sequence index) and where each feature fires on them."""

    def __init__(self, tokens: Mapping[int, np.ndarray], *, seq: np.ndarray, pos: np.ndarray,
                 feature: np.ndarray) -> None:
        """`seq`, `pos`, `feature`: one entry per (sequence, position, feature) that fires."""
        self.tokens = {int(k): np.asarray(v, dtype=np.int32) for k, v in tokens.items()}
        self.seq_order = sorted(self.tokens)
        order = np.lexsort((pos, seq, feature))
        self._seq, self._pos = np.asarray(seq)[order], np.asarray(pos)[order]
        self._feature = np.asarray(feature)[order]

    def firing(self, feature: int) -> dict[int, np.ndarray]:
        """Sorted positions where `feature` fires, by sequence index."""
        lo, hi = np.searchsorted(self._feature, [feature, feature + 1])
        seqs, poss = self._seq[lo:hi], self._pos[lo:hi]
        out: dict[int, np.ndarray] = {}
        for s in np.unique(seqs):
            out[int(s)] = poss[seqs == s]
        return out

    def zero_excerpts(self, *, feature: int, lengths: Sequence[int],
                      exclude: Sequence[tuple[int, int, int]], rng: np.random.Generator,
                      vocab: Sequence[str]) -> list[Excerpt]:
        """One window per wanted length (fewer when the pool runs out) where `feature` is zero
        on every token, overlapping no span in `exclude` (sequence, start, end) nor each other."""
        fires = self.firing(feature)
        taken: dict[int, list[tuple[int, int]]] = {}
        for s, a, b in exclude:
            taken.setdefault(int(s), []).append((int(a), int(b)))
        out: list[Excerpt] = []
        n_vocab = len(vocab)
        for length in lengths:
            for _ in range(MAX_TRIES):
                s = self.seq_order[int(rng.integers(len(self.seq_order)))]
                ids = self.tokens[s]
                if len(ids) < length:
                    continue
                a = int(rng.integers(len(ids) - length + 1))
                b = a + length
                where = fires.get(s)
                if where is not None and np.searchsorted(where, a) < np.searchsorted(where, b):
                    continue
                if any(a < y and x < b for x, y in taken.get(s, ())):
                    continue
                taken.setdefault(s, []).append((a, b))
                window = ids[a:b].tolist()
                out.append(Excerpt(
                    tuple(window), tuple(vocab[t] if 0 <= t < n_vocab else f"<{t}>"
                                         for t in window),
                    np.zeros(length, np.float32), "zero", -1, s, a))
                break
        return out


def encode_pool_steps(*, lm: LanguageModel, sae: SAE, hook_name: str,
                      tokens: Mapping[int, np.ndarray], batch_size: int = 16
                      ) -> Iterator[SequencePool | None]:
    """encode_pool one batch per step: None after each batch, then the pool (so a server's
    model worker can interleave it with other jobs)."""
    import torch

    from app.pipeline.build_inputs import ActivationSource

    source = ActivationSource(lm=lm, hook_name=hook_name, cache=None, device=sae.device)
    order = sorted(tokens)
    seqs, poss, feats = [], [], []
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        ids = np.stack([tokens[s] for s in chunk])
        with torch.inference_mode():
            acts = source.batch(ids, 0, len(chunk))
            b, ctx, d = acts.shape
            values, indices = sae.encode_sparse(acts.reshape(b * ctx, d).to(sae.dtype))
        values, indices = values.float().cpu().numpy(), indices.cpu().numpy()
        row, col = np.nonzero(values > 0)
        flat = row  # token number within the batch
        seqs.append(np.asarray(chunk, np.int64)[flat // ctx])
        poss.append((flat % ctx).astype(np.int64))
        feats.append(indices[row, col].astype(np.int64))
        yield None
    cat = (lambda parts: np.concatenate(parts) if parts else np.zeros(0, np.int64))  # noqa: E731
    yield SequencePool(tokens, seq=cat(seqs), pos=cat(poss), feature=cat(feats))


def encode_pool(*, lm: LanguageModel, sae: SAE, hook_name: str, tokens: Mapping[int, np.ndarray],
                batch_size: int = 16) -> SequencePool:
    """Run the sequences to the hook and through the SAE (activations rounded through float16,
    as the build feeds them), keeping every (sequence, position, feature) that fires."""
    *_, pool = encode_pool_steps(lm=lm, sae=sae, hook_name=hook_name, tokens=tokens,
                                 batch_size=batch_size)
    assert isinstance(pool, SequencePool)  # the last step is the pool
    return pool


def sample_sequences(engine: Engine, *, sae_id: str, n_sequences: int, seed: int
                     ) -> tuple[queries.SAEWeights, dict[int, np.ndarray]]:
    """Where the SAE's weights and model are, and a seeded sample of its live run's stored
    sequences (token ids by sequence index)."""
    with read_session(engine) as session:
        weights = queries.sae_weights(session=session, sae_id=sae_id)
        every = queries.sequence_indices(session=session, run_id=weights.run_id)
        rng = np.random.default_rng([seed, 0x5E0])
        chosen = sorted(int(i) for i in rng.choice(
            np.asarray(every, np.int64), size=min(n_sequences, len(every)), replace=False))
        tokens = queries.sequence_tokens(session=session, run_id=weights.run_id,
                                         seq_indices=chosen)
    return weights, tokens


def pool_from_store(engine: Engine, *, sae_id: str, n_sequences: int, seed: int,
                    cache_dir: Path, log: Callable[[str], None] = lambda _m: None,
                    device: str = "cpu", dtype: str = "float32") -> SequencePool:
    """Encode a seeded sample of the live run's stored sequences with the SAE's own model and
    weights (as the database records them); the model runs on ``device`` in ``dtype``
    (app/engine/devices.py), the SAE encodes float32 there."""
    from app.engine.devices import resolve_device, resolve_dtype
    from app.engine.loading import load_model
    from app.engine.sae import SAE
    from app.engine.service import model_spec

    weights, tokens = sample_sequences(engine, sae_id=sae_id, n_sequences=n_sequences, seed=seed)
    if not Path(weights.path).exists():
        raise ConfigError(
            f"the weights of SAE {sae_id!r} ({weights.path}) are not there; detection scoring "
            "encodes stored text with the model and SAE to find windows where a feature is "
            "zero (score fuzzing only with --score fuzzing)")
    log(f"finding windows at zero: encoding {len(tokens)} stored sequences with "
        f"{weights.model_id} and {sae_id}")
    torch_device, torch_dtype = resolve_device(device), resolve_dtype(dtype)
    lm = load_model(model_spec(weights.model_id, weights.model_source), device=torch_device,
                    dtype=torch_dtype, cache_dir=cache_dir)
    sae = SAE.load(weights.path, hook_name=weights.hook_name, device=torch_device).eval()
    sae.check_compatible(d_model=lm.d_model, hook_name=weights.hook_name)
    return encode_pool(lm=lm, sae=sae, hook_name=weights.hook_name, tokens=tokens)
