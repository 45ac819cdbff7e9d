"""Streaming accumulators against brute force over the dense activation matrix."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from app.pipeline import exact_sum
from app.pipeline.accumulators import FeatureAccumulators
from app.pipeline.activation_stats import default_hist_edges
from app.pipeline.interval_samples import IntervalSamples, _priority
from app.pipeline.sparse import sparse_records, sparsify
from app.records import WINDOW_KIND_INTERVAL, WINDOW_KIND_TOP

N_SEQ, CTX, D_SAE, WIN, K, BANDS, PER_BAND = 40, 16, 48, 8, 5, 10, 3
BATCH_SIZES = (7, 3, 12, 8, 10)


def make_acts(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Sparse non-negative activations whose scales grow from batch to batch (so the interval
    grid coarsens mid-stream), quantised so that ties happen, with BOS and padding masked."""
    rng = np.random.default_rng(seed)
    scale = np.exp(rng.normal(0, 1.5, D_SAE))
    growth = np.repeat(np.linspace(0.1, 3.0, N_SEQ), CTX).reshape(N_SEQ, CTX, 1)
    vals = rng.exponential(1.0, (N_SEQ, CTX, D_SAE)) * scale * growth
    vals = np.round(vals * 8) / 8  # many exact ties
    fire = rng.random((N_SEQ, CTX, D_SAE)) < rng.uniform(0.02, 0.6, D_SAE)
    acts = np.where(fire, vals, 0.0).astype(np.float32)
    acts[:, :, 5] = 0.0  # a dead feature
    acts[:, :, 7] = np.where(rng.random((N_SEQ, CTX)) < 0.5, 2.0, 0.0)  # ties everywhere
    special = np.zeros((N_SEQ, CTX), dtype=bool)
    special[:, 0] = True  # BOS
    for s in rng.choice(N_SEQ, 6, replace=False):
        special[s, rng.integers(4, CTX):] = True  # padding at the end of some sequences
    return acts, special


def sparse_code(acts: np.ndarray, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A code in ``SAE.encode_sparse``'s form: per row the nonzeros by value, descending, then
    zero-valued latents (some of them latents that fire elsewhere), padded to one width."""
    rows = acts.reshape(-1, D_SAE)
    width = int((rows > 0).sum(axis=1).max()) + 3
    values = np.zeros((rows.shape[0], width), dtype=np.float32)
    indices = np.zeros((rows.shape[0], width), dtype=np.int64)
    for r, row in enumerate(rows):
        on = np.flatnonzero(row > 0)
        on = on[np.argsort(-row[on], kind="stable")]
        off = rng.permutation(np.flatnonzero(row <= 0))[: width - on.size]
        indices[r] = np.r_[on, off]
        values[r, : on.size] = row[on]
    return (torch.from_numpy(values).reshape(*acts.shape[:2], width),
            torch.from_numpy(indices).reshape(*acts.shape[:2], width))


def run(acts: np.ndarray, special: np.ndarray, *, order=None, resume_after=None,
        sparse: bool = False):
    acc = FeatureAccumulators(D_SAE, ctx=CTX, n_top=K, window_len=WIN, n_bands=BANDS,
                              per_band=PER_BAND, seed=3)
    bounds = np.cumsum((0, *BATCH_SIZES))
    batches = [(bounds[i], bounds[i + 1]) for i in range(len(BATCH_SIZES))]
    if order is not None:
        batches = [batches[i] for i in order]
    rng = np.random.default_rng(11)
    for i, (a, b) in enumerate(batches):
        if sparse:
            values, indices = sparse_code(acts[a:b], rng)
            acc.update_sparse(values, indices, special_mask=special[a:b],
                              seq_index=np.arange(a, b))
        else:
            acc.update(torch.from_numpy(acts[a:b].copy()), special_mask=special[a:b],
                       seq_index=np.arange(a, b))
        if resume_after is not None and i == resume_after:
            buf = io.BytesIO()
            np.savez(buf, **acc.state_dict())
            buf.seek(0)
            acc = FeatureAccumulators(D_SAE, ctx=CTX, n_top=K, window_len=WIN, n_bands=BANDS,
                                      per_band=PER_BAND, seed=3)
            with np.load(buf) as state:
                acc.load_state_dict(dict(state))
    return acc.finalize()


@pytest.fixture(scope="module")
def data():
    acts, special = make_acts()
    dense = np.where(special[:, :, None], 0.0, acts).astype(np.float32)
    return acts, special, dense, run(acts, special)


def windows_of(res, kind):
    w = res.windows
    m = w.kind == kind
    return {name: getattr(w, name)[m] for name in w.__dataclass_fields__}


def brute_window(dense, s, p, f):
    start = max(0, p - WIN // 2)
    end = min(CTX, p - WIN // 2 + WIN)
    vals = np.zeros(WIN, dtype=np.float16)
    vals[: end - start] = dense[s, start:end, f]
    return start, end - start, vals


def test_sparsify_zeroes_special_rows_and_keeps_every_nonzero(data):
    acts, special, dense, _ = data
    batch = sparsify(torch.from_numpy(acts.copy()), special_mask=special,
                     seq_index=np.arange(N_SEQ))
    flat = dense.reshape(-1, D_SAE)
    rows, cols = np.nonzero(flat)
    assert np.array_equal(np.lexsort((batch.feature, batch.token)), np.arange(rows.size))
    assert np.array_equal(batch.token, rows) and np.array_equal(batch.feature, cols)
    assert np.array_equal(batch.value, flat[rows, cols])
    assert batch.n_counted == int((~special).sum())


def test_top_windows_equal_brute_force(data):
    _, _, dense, res = data
    top = windows_of(res, WINDOW_KIND_TOP)
    for f in range(D_SAE):
        cands = []
        for s in range(N_SEQ):
            col = dense[s, :, f]
            if col.max() > 0:
                p = int(np.argmax(col))  # first position reaching the max
                cands.append((-col[p], s * CTX + p, s, p))
        cands.sort()
        want = cands[:K]
        mine = np.flatnonzero(top["feature"] == f)
        assert len(mine) == len(want), f
        assert np.array_equal(top["rank"][mine], np.arange(len(want)))
        for i, (negv, _, s, p) in zip(mine, want, strict=True):
            start, length, vals = brute_window(dense, s, p, f)
            assert top["seq_index"][i] == s
            assert top["max_value"][i] == -negv
            assert top["start"][i] == start and top["length"][i] == length
            assert top["start"][i] + top["max_pos"][i] == p
            assert np.array_equal(top["values"][i], vals)
    # the all-ties feature: windows are the earliest sequences that fire, in order
    seq7 = top["seq_index"][top["feature"] == 7]
    assert np.array_equal(seq7, np.sort(seq7))


def test_counts_sums_max_and_histogram_equal_brute_force(data):
    _, special, dense, res = data
    counted = dense[~special]  # [n_counted, d_sae]
    assert res.n_tokens == N_SEQ * CTX and res.n_tokens_counted == counted.shape[0]
    assert np.array_equal(res.count, (counted > 0).sum(0))
    np.testing.assert_allclose(res.act_sum, counted.astype(np.float64).sum(0), rtol=1e-12)
    assert np.array_equal(res.max_act, counted.max(0))
    np.testing.assert_allclose(res.frac_nonzero, (counted > 0).sum(0) / counted.shape[0])
    edges = default_hist_edges()
    assert np.array_equal(res.hist_edges, edges)
    for f in range(D_SAE):
        v = counted[:, f][counted[:, f] > 0].astype(np.float64)
        clipped = np.clip(v, edges[0], np.nextafter(edges[-1], 0))
        want, _ = np.histogram(clipped, bins=edges)
        assert np.array_equal(res.hist_counts[f], want), f
    l0 = (counted > 0).sum(1)
    stats = res.sae_stats
    e, c = np.array(stats["l0_hist"]["edges"]), np.array(stats["l0_hist"]["counts"])
    assert np.array_equal(c, np.histogram(l0, bins=e)[0]) and c.sum() == l0.size
    assert stats["mean_l0"] == pytest.approx(l0.mean())
    assert stats["n_dead"] == int(((counted > 0).sum(0) == 0).sum()) >= 1
    assert stats["n_dense"] == int(((counted > 0).mean(0) > 0.1).sum())
    assert sum(stats["density_hist"]["counts"]) == D_SAE - stats["n_dead"]


def brute_bands(v: np.ndarray, m: float, n_fine: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Documented band definition from the final max alone: edges j*M/n snapped to the grid of
    width 2^E/n_fine, E the frexp exponent of M. Returns (band per value, edge values)."""
    e = np.frexp(np.float32(m))[1]
    w = 2.0 ** e / n_fine
    j = np.arange(1, BANDS)
    edges = np.floor(j * (m / w) / BANDS + 0.5) * w
    assert np.all(np.abs(edges - j * m / BANDS) <= w / 2)
    return (v[:, None] >= edges[None, :]).sum(1), edges


def test_band_counts_and_shares_equal_brute_force(data):
    _, special, dense, res = data
    counted = dense[~special]
    for f in range(D_SAE):
        v = counted[:, f][counted[:, f] > 0].astype(np.float64)
        if v.size == 0:
            assert res.band_count[f].sum() == 0 and res.band_share[f].sum() == 0
            continue
        band, _ = brute_bands(v, counted[:, f].max())
        assert np.array_equal(res.band_count[f], np.bincount(band, minlength=BANDS)), f
        share = np.bincount(band, weights=v, minlength=BANDS) / v.sum()
        np.testing.assert_allclose(res.band_share[f], share, rtol=1e-5, atol=1e-7)


def test_interval_samples_lie_in_their_band_and_match_the_documented_sample(data):
    _, special, dense, res = data
    iv = windows_of(res, WINDOW_KIND_INTERVAL)
    n_fine, n_sbins = 128, 32
    for f in range(D_SAE):
        col = dense[:, :, f]
        s_idx, p_idx = np.nonzero(col > 0)
        mine = np.flatnonzero(iv["feature"] == f)
        if s_idx.size == 0:
            assert mine.size == 0
            continue
        v = col[s_idx, p_idx].astype(np.float64)
        m = float(col.max())
        band, edges = brute_bands(v, m)
        gpos = s_idx * CTX + p_idx
        prio = _priority(np.full(gpos.size, f), gpos, 3)
        # reference: bottom-s priorities per final sample bin, then per band by priority
        exp = np.frexp(np.float32(m))[1]
        sbin = np.minimum(np.floor(v * n_fine / 2.0 ** exp), n_fine - 1).astype(int) // (
            n_fine // n_sbins)
        cand = np.concatenate([np.flatnonzero(sbin == b)[np.argsort(prio[sbin == b])[:PER_BAND]]
                               for b in np.unique(sbin)])
        for j in range(BANDS):
            in_band = cand[band[cand] == j]
            want = in_band[np.argsort(prio[in_band])][:PER_BAND]
            got = mine[iv["band"][mine] == j]
            assert np.array_equal(iv["rank"][got], np.arange(got.size))
            assert got.size == want.size, (f, j)
            for i, r in zip(got, want, strict=True):
                s, p = s_idx[r], p_idx[r]
                assert iv["seq_index"][i] == s
                assert iv["start"][i] <= p < iv["start"][i] + iv["length"][i]
                start, length, vals = brute_window(dense, s, p, f)
                assert (iv["start"][i], iv["length"][i]) == (start, length)
                assert np.array_equal(iv["values"][i], vals)
                assert iv["max_value"][i] == vals.astype(np.float32).max()
                # in its band: lower edge <= value < upper edge
                lo = 0.0 if j == 0 else edges[j - 1]
                hi = np.inf if j == BANDS - 1 else edges[j]
                assert lo <= col[s, p] < hi
            if want.size < PER_BAND:  # fewer only when the band's candidates run out
                assert in_band.size == want.size


def assert_same_result(a, b):
    for name in ("count", "act_sum", "max_act", "hist_counts", "band_count", "band_share"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    for name in a.windows.__dataclass_fields__:
        assert np.array_equal(getattr(a.windows, name), getattr(b.windows, name)), name
    assert a.sae_stats == b.sae_stats


def test_result_does_not_depend_on_batch_order(data):
    acts, special, _, res = data
    assert_same_result(res, run(acts, special, order=[3, 0, 4, 2, 1]))  # sums are exact


def test_sparse_code_gives_the_dense_result_bit_for_bit(data):
    """A TopK SAE's pipeline feeds (values, indices) instead of the dense code: same records in
    the same order, so every statistic and every window (values looked up in the records,
    special rows and non-firing latents 0) is identical."""
    acts, special, _, res = data
    dense_batch = sparsify(torch.from_numpy(acts[:7].copy()), special_mask=special[:7],
                           seq_index=np.arange(7))
    values, indices = sparse_code(acts[:7], np.random.default_rng(0))
    sparse_batch = sparse_records(values, indices, ctx=CTX, d_sae=D_SAE,
                                  special_mask=special[:7], seq_index=np.arange(7))
    for name in ("token", "feature", "value"):
        assert np.array_equal(getattr(dense_batch, name), getattr(sparse_batch, name)), name
    assert_same_result(res, run(acts, special, sparse=True))
    assert_same_result(res, run(acts, special, sparse=True, resume_after=2))


def test_resume_from_state_is_bit_identical(data):
    acts, special, _, res = data
    for k in (0, 2, 3):
        assert_same_result(res, run(acts, special, resume_after=k))


def test_coarsening_keeps_exact_bins_when_the_max_jumps():
    iv = IntervalSamples(2, n_bands=4, per_band=2, window_len=4, n_fine=16, n_sample_bins=4)
    vals = [np.array([[0.3, 0.0], [0.7, 0.0]]), np.array([[0.0, 5.0], [9.0, 1.0]]),
            np.array([[100.0, 0.0], [33.0, 0.25]])]
    from app.pipeline.sparse import sparsify as sp

    for i, v in enumerate(vals):
        batch = sp(torch.tensor(v, dtype=torch.float32)[None], special_mask=np.zeros((1, 2), bool),
                   seq_index=np.array([i]))
        iv.update(batch)
    all_v = np.concatenate([v.ravel() for v in vals]).reshape(-1, 2)
    for f in range(2):
        col = all_v[:, f][all_v[:, f] > 0]
        e = np.frexp(np.float32(col.max()))[1]
        want = np.bincount(np.floor(col * 16 / 2.0 ** e).astype(int), minlength=16)
        assert iv.exponent[f] == e
        assert np.array_equal(iv.bin_count[f], want)
        assert np.array_equal(exact_sum.to_float(iv.bin_sum[f]), np.bincount(
            np.floor(col * 16 / 2.0 ** e).astype(int), weights=col, minlength=16))


def test_sequences_fed_out_of_order_within_a_batch_give_the_same_result(data):
    """A batch whose sequences are not in corpus order (seq_index descending) takes the
    general sort of top-window candidates; the result is the in-order one."""
    acts, special, _, res = data
    acc = FeatureAccumulators(D_SAE, ctx=CTX, n_top=K, window_len=WIN, n_bands=BANDS,
                              per_band=PER_BAND, seed=3)
    bounds = np.cumsum((0, *BATCH_SIZES))
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        rev = np.arange(a, b)[::-1]
        acc.update(torch.from_numpy(acts[rev].copy()), special_mask=special[rev], seq_index=rev)
    assert_same_result(res, acc.finalize())


def test_windows_of_a_code_wider_than_2_to_the_16_match_a_lookup():
    """Past 65,536 latents the records' feature order takes a 64-bit sort; windows looked up
    in the records equal a dictionary lookup of every position."""
    rng = np.random.default_rng(5)
    d_sae, n_seq, m = 70_000, 3, 6
    indices = torch.from_numpy(rng.choice(d_sae, (n_seq * CTX, m)))
    indices[::2, 0] = 69_999  # one latent fires often, far past 2^16
    values = torch.from_numpy(rng.exponential(1.0, (n_seq * CTX, m)).astype(np.float32))
    special = np.zeros((n_seq, CTX), dtype=bool)
    special[:, 0] = True
    batch = sparse_records(values, indices, ctx=CTX, d_sae=d_sae, special_mask=special,
                           seq_index=np.arange(10, 10 + n_seq))
    order = batch.by_feature
    assert np.array_equal(order, np.lexsort((batch.token, batch.feature)))
    lookup = {(int(t), int(f)): v for t, f, v in zip(batch.token, batch.feature, batch.value,
                                                    strict=True)}
    start, length, vals = batch.windows(token=batch.token, feature=batch.feature,
                                        window_len=WIN)
    for i, (t, f) in enumerate(zip(batch.token.tolist(), batch.feature.tolist(), strict=True)):
        row0 = t - t % CTX
        want = [lookup.get((row0 + start[i] + j, f), 0.0) if j < length[i] else 0.0
                for j in range(WIN)]
        assert vals[i].tolist() == np.array(want, dtype=np.float16).tolist()
