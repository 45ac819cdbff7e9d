"""Per-feature facts that need only weights: logit effects and nearest decoder neighbours.

Both are computed over chunks of features so memory stays at chunk x vocab (or chunk x chunk),
whatever the SAE width. Ranking is a total order, so results do not depend on the chunking or
on how a kernel breaks ties: largest value first (smallest first for the suppressed tokens), and
among equal values the smaller token / feature index first (real vocabularies hold many tokens
with identical embeddings, e.g. unused ones, so exact ties do occur).

Cost: the matrix products dominate: d_sae x d_in x vocab multiply-adds for the logit effects,
half of d_sae^2 x d_in for the neighbours (cosine similarity is symmetric, so each block of the
similarity matrix serves both its rows and, transposed, its columns). They go through numpy's
BLAS (OpenBLAS), which on the reference machine (2-core AMD EPYC, AVX2) multiplies float32
matrices about 1.8x faster than torch's MKL build; both give float32 products. Selection is
cheap: a pass takes the max (and one the min) of every block of ``_BLOCK`` columns, and only the
blocks that can hold a row's n best entries are gathered and ordered (see ``_best``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

_BLOCK = 32  # columns per block in the selection's block min/max pass


@dataclass
class LogitEffects:
    pos_ids: np.ndarray  # int32 [d_sae, n] tokens the direction promotes most, largest first
    pos_values: np.ndarray  # float32 [d_sae, n]
    neg_ids: np.ndarray  # int32 [d_sae, n] tokens it suppresses most, most negative first
    neg_values: np.ndarray  # float32 [d_sae, n]


def _chunk_rows(budget_elems: int, width: int) -> int:
    return max(1, budget_elems // max(width, 1))


def _keys(values: Tensor, cols: Tensor, *, largest: bool) -> Tensor:
    """int64 sort keys: larger key = earlier in (value desc, or asc when not ``largest``; then
    column asc). High 32 bits: the float32 value's bits made monotonic (negative floats have
    their magnitude bits flipped; -0.0 counts as +0.0, as float comparison has it); low 32 bits:
    the column complemented, so the smaller column wins a tie."""
    v = values.float() if largest else -values.float()
    v = v + 0.0  # -0.0 + 0.0 = +0.0
    bits = v.view(torch.int32)
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)
    return (bits << 32) | (0xFFFFFFFF - cols.to(torch.int64))


def _from_keys(keys: Tensor, *, largest: bool) -> tuple[Tensor, Tensor]:
    """(values float32, columns int64) back from ``_keys``."""
    bits = (keys >> 32).to(torch.int32)
    v = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).view(torch.float32)
    return (v if largest else -v), 0xFFFFFFFF - (keys & 0xFFFFFFFF)


def _best(values: Tensor, n: int, *, largest: bool, col0: int = 0,
          block_ext: Tensor | None = None) -> Tensor:
    """Per row of ``values`` [r, w], the n first entries under (value desc, or asc when not
    ``largest``; then column asc), as ``_keys`` [r, n] (best first; columns offset by ``col0``).

    Exact without ordering whole rows: split the columns into blocks of ``_BLOCK``; let t be a
    row's n-th best block extreme (block max when largest). A block whose extreme is worse than
    t cannot hold one of the row's n best entries, since n other blocks each hold an entry
    strictly better than all of its entries. So the candidates are the blocks whose extreme is
    at least as good as t (n of them, more on ties; the K best block extremes, K the largest
    such count in the chunk, contain them all) plus the columns after the last whole block;
    their keys order them exactly. ``block_ext`` (the block extremes, [r, w // _BLOCK]) may be
    passed when already computed.
    """
    r, w = values.shape
    n = min(n, w)
    nb = w // _BLOCK
    if nb <= n:  # small rows: all columns are candidates
        cols = torch.arange(col0, col0 + w).expand(r, w)
        return _keys(values, cols, largest=largest).topk(n, dim=1).values
    if block_ext is None:
        blocks = values[:, : nb * _BLOCK].reshape(r, nb, _BLOCK)
        block_ext = blocks.amax(dim=2) if largest else blocks.amin(dim=2)
    nth = block_ext.topk(n, dim=1, largest=largest).values[:, -1:]
    ok = block_ext >= nth if largest else block_ext <= nth
    k = int(ok.sum(dim=1).max())
    chosen = block_ext.topk(k, dim=1, largest=largest).indices
    cols = (chosen[:, :, None] * _BLOCK + torch.arange(_BLOCK)).reshape(r, k * _BLOCK)
    if w > nb * _BLOCK:
        cols = torch.cat([cols, torch.arange(nb * _BLOCK, w).expand(r, w - nb * _BLOCK)], dim=1)
    keys = _keys(values.gather(1, cols), cols + col0, largest=largest)
    return keys.topk(n, dim=1).values


def _top_and_bottom(values: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """(``_best`` keys largest first, ``_best`` keys smallest first)."""
    r, w = values.shape
    nb = w // _BLOCK
    bmin = bmax = None
    if nb > min(n, w):
        # amax and amin apart: torch.aminmax over a short last axis is several times slower.
        blocks = values[:, : nb * _BLOCK].reshape(r, nb, _BLOCK)
        bmax, bmin = blocks.amax(dim=2), blocks.amin(dim=2)
    return (_best(values, n, largest=True, block_ext=bmax),
            _best(values, n, largest=False, block_ext=bmin))


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run the selection's many small ops on one thread: each parallel op pays a thread sync,
    which on a busy machine costs a scheduler slice (milliseconds) per op. The matrix products
    keep every thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def logit_effects(*, w_dec: Tensor, norm_scale: Tensor, w_u: Tensor, n: int = 10,
                  budget_elems: int = 1 << 24) -> LogitEffects:
    """Direct logit effect of each decoder direction: ``(W_dec[f] * norm_scale) @ W_U``.

    This is the first-order effect on the logits of adding the feature's direction to the
    residual stream, through the final norm's multiplicative weight (the normalisation's
    per-token 1/rms is a positive common factor, so it does not change the ranking). Top and
    bottom ``n`` tokens per feature (ties: smaller token id first); chunks of features hold at
    most ``budget_elems`` logits.
    """
    d_sae = w_dec.shape[0]
    vocab = w_u.shape[1]
    n = min(n, vocab)
    # Fold the scale into W_U once. Kept as [d_in, vocab] in W_U's own memory layout (for a
    # tied embedding that is the transposed [vocab, d_in] matrix; no copy of 100+ MB).
    scaled_u = (norm_scale.float()[:, None] * w_u.float()).numpy()
    w_dec_np = w_dec.float().numpy()
    out = LogitEffects(
        pos_ids=np.zeros((d_sae, n), dtype=np.int32), pos_values=np.zeros((d_sae, n), np.float32),
        neg_ids=np.zeros((d_sae, n), dtype=np.int32), neg_values=np.zeros((d_sae, n), np.float32))
    step = _chunk_rows(budget_elems, vocab)
    for a in range(0, d_sae, step):
        b = min(a + step, d_sae)
        effects = torch.from_numpy(w_dec_np[a:b] @ scaled_u)
        with _one_thread():
            pos, neg = _top_and_bottom(effects, n)
            pos_v, pos_c = _from_keys(pos, largest=True)
            neg_v, neg_c = _from_keys(neg, largest=False)
        out.pos_ids[a:b] = pos_c.numpy()
        out.pos_values[a:b] = pos_v.numpy()
        out.neg_ids[a:b] = neg_c.numpy()
        out.neg_values[a:b] = neg_v.numpy()
    return out


@torch.no_grad()
def decoder_neighbours(w_dec: Tensor, *, n: int = 10, budget_elems: int = 1 << 24
                       ) -> tuple[np.ndarray, np.ndarray]:
    """The ``n`` other features whose decoder directions have the highest cosine similarity.

    Returns (indices int32 [d_sae, n], cosines float32 [d_sae, n]), most similar first (ties:
    smaller index first). A feature is never its own neighbour; a zero decoder row has cosine 0
    with everything. The similarity matrix is computed in square blocks of the upper triangle
    only (each block is used for its rows and, transposed, for its columns), and each row keeps
    its running n best, merged exactly under the total order.
    """
    d_sae = w_dec.shape[0]
    n = min(n, d_sae - 1)
    idx = np.zeros((d_sae, n), dtype=np.int32)
    cos = np.zeros((d_sae, n), dtype=np.float32)
    if n < 1:
        return idx, cos
    w = w_dec.float()
    unit = (w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)).numpy()
    step = max(1, min(d_sae, int(budget_elems ** 0.5)))
    best = torch.full((d_sae, n), torch.iinfo(torch.int64).min, dtype=torch.int64)

    def merge(a: int, b: int, keys: Tensor) -> None:
        best[a:b] = torch.cat([best[a:b], keys], dim=1).topk(n, dim=1).values

    for a in range(0, d_sae, step):
        b = min(a + step, d_sae)
        for c0 in range(a, d_sae, step):
            c1 = min(c0 + step, d_sae)
            sims = torch.from_numpy(unit[a:b] @ unit[c0:c1].T)
            with _one_thread():
                if c0 == a:
                    sims.fill_diagonal_(-torch.inf)
                merge(a, b, _best(sims, n, largest=True, col0=c0))
                if c0 != a:
                    merge(c0, c1, _best(sims.T.contiguous(), n, largest=True, col0=a))
    values, cols = _from_keys(best, largest=True)
    idx[:] = cols.numpy()
    cos[:] = values.numpy()
    return idx, cos
