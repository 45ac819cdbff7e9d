"""Logit effects and decoder neighbours against a brute-force ordering of the full matrix.

Integer-valued weights make every product exact in float32 (small integers), so the full matrix
is known exactly whatever the kernel, and ties are frequent: the reference orders each row by
(value, then index ascending) with a lexsort, and the chunked, block-pruned selection must give
exactly the same indices and values.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_info

from app.pipeline.static_features import StaticFeatures, decoder_neighbours, logit_effects


def lex_order(row_values: np.ndarray, n: int, *, largest: bool) -> np.ndarray:
    """Indices of the n first entries of each row: value (desc if largest), then index asc."""
    out = np.empty((row_values.shape[0], n), dtype=np.int64)
    cols = np.arange(row_values.shape[1])
    for i, row in enumerate(row_values):
        out[i] = np.lexsort((cols, -row if largest else row))[:n]
    return out


def integer_weights(seed: int, *, d_sae: int, d_in: int, vocab: int):
    g = torch.Generator().manual_seed(seed)
    w_dec = torch.randint(-3, 4, (d_sae, d_in), generator=g).float()
    w_u = torch.randint(-2, 3, (d_in, vocab), generator=g).float()
    w_u[:, 700:760] = w_u[:, 5:6]  # 61 identical token embeddings: a run of exact ties
    w_u[:, 900] = 0.0
    w_dec[7] = w_dec[3]  # duplicate decoder rows and a dead (zero) one
    w_dec[11] = 0.0
    scale = torch.randint(1, 3, (d_in,), generator=g).float()
    return w_dec, scale, w_u


@pytest.mark.parametrize("budget", [1 << 24, 5000, 1001])
def test_logit_effects_equal_a_brute_force_ordering_with_ties(budget):
    w_dec, scale, w_u = integer_weights(0, d_sae=150, d_in=24, vocab=1000)
    full = ((w_dec @ (scale[:, None] * w_u)).double()).numpy()
    got = logit_effects(w_dec=w_dec, norm_scale=scale, w_u=w_u, n=10, budget_elems=budget)
    rows = np.arange(full.shape[0])[:, None]
    for ids, values, largest in ((got.pos_ids, got.pos_values, True),
                                 (got.neg_ids, got.neg_values, False)):
        want = lex_order(full, 10, largest=largest)
        assert np.array_equal(ids, want)
        assert np.array_equal(values, full[rows, want].astype(np.float32))
    # the zero decoder row ties everywhere: the 10 smallest token ids, both ways
    assert got.pos_ids[11].tolist() == list(range(10)) == got.neg_ids[11].tolist()


def test_logit_effects_on_a_transposed_tied_embedding_and_small_vocab():
    """W_U given as the transpose of an embedding (as lm.unembedding() returns it), and a vocab
    too small for block pruning: the same ordering."""
    w_dec, scale, w_u = integer_weights(1, d_sae=40, d_in=16, vocab=1000)
    emb = w_u.T.contiguous()
    for vocab in (1000, 300, 7):
        sub = emb[:vocab].T
        full = (w_dec @ (scale[:, None] * sub)).double().numpy()
        got = logit_effects(w_dec=w_dec, norm_scale=scale, w_u=sub, n=10, budget_elems=900)
        n = min(10, vocab)
        assert np.array_equal(got.pos_ids, lex_order(full, n, largest=True))
        assert np.array_equal(got.neg_ids, lex_order(full, n, largest=False))


def test_logit_effects_random_floats_match_the_dense_top_k():
    g = torch.Generator().manual_seed(2)
    w_dec = torch.randn(64, 32, generator=g)
    w_u = torch.randn(32, 4000, generator=g)
    scale = torch.rand(32, generator=g) + 0.5
    full = w_dec @ (scale[:, None] * w_u)
    got = logit_effects(w_dec=w_dec, norm_scale=scale, w_u=w_u, n=10, budget_elems=30_000)
    top = full.topk(10, dim=1)
    bottom = full.topk(10, dim=1, largest=False)
    assert np.array_equal(got.pos_ids, top.indices.numpy())
    assert np.array_equal(got.neg_ids, bottom.indices.numpy())
    np.testing.assert_allclose(got.pos_values, top.values.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got.neg_values, bottom.values.numpy(), rtol=1e-5, atol=1e-5)


def four_hot(seed: int, *, d_sae: int, d_in: int) -> torch.Tensor:
    """Rows with four entries of +-1: norm 2, so unit vectors and all cosines (multiples of 1/4)
    are exact in float32."""
    g = torch.Generator().manual_seed(seed)
    w = torch.zeros(d_sae, d_in)
    for i in range(d_sae):
        cols = torch.randperm(d_in, generator=g)[:4]
        w[i, cols] = torch.randint(0, 2, (4,), generator=g).float() * 2 - 1
    return w


@pytest.mark.parametrize("budget", [1 << 24, 10_000, 1000, 50])
def test_neighbours_equal_a_brute_force_ordering_with_ties(budget):
    w_dec = four_hot(3, d_sae=300, d_in=16)
    w_dec[20:40] = w_dec[19]  # 21 identical directions: cosine 1 among them
    w_dec[50] = 3 * w_dec[51]  # parallel, another norm
    w_dec[11] = 0.0  # a dead feature
    norms = w_dec.double().norm(dim=1, keepdim=True).clamp_min(1e-12)
    full = ((w_dec.double() / norms) @ (w_dec.double() / norms).T).numpy()
    np.fill_diagonal(full, -np.inf)
    idx, cos = decoder_neighbours(w_dec, n=10, budget_elems=budget)
    want = lex_order(full, 10, largest=True)
    rows = np.arange(300)[:, None]
    assert np.array_equal(idx, want)
    assert np.array_equal(cos, full[rows, want].astype(np.float32))
    assert not (idx == np.arange(300)[:, None]).any()
    assert idx[19].tolist() == list(range(20, 30))  # ties: smaller index first
    assert idx[51][0] == 50 and cos[51][0] == 1.0
    assert idx[11].tolist() == [i for i in range(12) if i != 11][:10]  # cosine 0 with all
    assert not cos[11].any()


def test_neighbours_chunking_does_not_change_random_results():
    g = torch.Generator().manual_seed(4)
    w_dec = torch.randn(400, 48, generator=g)
    unit = w_dec / w_dec.norm(dim=1, keepdim=True)
    sims = unit @ unit.T
    sims.fill_diagonal_(-torch.inf)
    top = sims.topk(10, dim=1)
    for budget in (1 << 24, 40_000, 3000):
        idx, cos = decoder_neighbours(w_dec, n=10, budget_elems=budget)
        assert np.array_equal(idx, top.indices.numpy())
        np.testing.assert_allclose(cos, top.values.numpy(), rtol=1e-5, atol=1e-6)


def blas_threads() -> list[int]:
    return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]


def test_background_then_finish_equals_one_thread_and_brute_force():
    """A build's schedule: some units in the nice-19 worker process, the rest on two threads
    after the stream. The result is the same as one thread doing everything (units are
    independent, the order is total) and the brute-force ordering; pause holds the worker;
    numpy's BLAS keeps its thread count; no process or file is left behind. The worker is
    stepped explicitly, so what it has done does not depend on how it was scheduled."""
    w_dec, scale, w_u = integer_weights(5, d_sae=300, d_in=24, vocab=1000)
    w_dec[20:40] = w_dec[19]
    kwargs = dict(w_dec=w_dec, norm_scale=scale, w_u=w_u, n_logits=10, n_neighbours=10,
                  budget_elems=3000)
    alone = StaticFeatures(**kwargs).run(threads=1)
    before = blas_threads()
    job = StaticFeatures(**kwargs)
    assert job.units_total > 20
    job.start_background(paused=True)
    if os.name == "posix":
        worker = job._worker
        worker.pause(wait=True)  # held before its first unit
        assert job.background_progress() == 0
        for _ in range(3):
            worker.step()  # exactly one unit, reported before it holds again
        assert worker.done == {0, 1, 2}
        assert os.getpriority(os.PRIO_PROCESS, worker.process.pid) == 19  # set before unit 0
        if hasattr(os, "SCHED_IDLE"):
            assert os.sched_getscheduler(worker.process.pid) == os.SCHED_IDLE
        job.pause_background(wait=True)
        held = job.background_progress()
        assert held == 3 < job.units_total  # paused: no new unit
        job.resume_background()
    got = job.finish(threads=2)
    assert got.units_total == job.units_total
    if os.name == "posix":
        assert got.units_in_background >= held
        assert worker.process.poll() is not None and not worker.folder.exists()
    assert blas_threads() == before
    for name in ("pos_ids", "pos_values", "neg_ids", "neg_values"):
        assert np.array_equal(getattr(got.logits, name), getattr(alone.logits, name)), name
    assert np.array_equal(got.neighbour_idx, alone.neighbour_idx)
    assert np.array_equal(got.neighbour_cos, alone.neighbour_cos)
    full = (w_dec @ (scale[:, None] * w_u)).double().numpy()
    assert np.array_equal(got.logits.pos_ids, lex_order(full, 10, largest=True))
    assert np.array_equal(got.logits.neg_ids, lex_order(full, 10, largest=False))


def test_stop_ends_the_worker_and_removes_its_files():
    w_dec, scale, w_u = integer_weights(6, d_sae=200, d_in=16, vocab=1000)
    job = StaticFeatures(w_dec=w_dec, norm_scale=scale, w_u=w_u, budget_elems=2000)
    job.start_background()
    worker = job._worker
    job.stop()
    if os.name == "posix":
        assert worker.process.poll() is not None
        assert not worker.folder.exists()


def test_no_room_for_the_worker_only_makes_it_slower(monkeypatch, capsys):
    """The worker is an optimisation: if its files cannot be written, the build says so and
    computes everything after its stream, with the same result."""
    import tempfile

    w_dec, scale, w_u = integer_weights(7, d_sae=120, d_in=16, vocab=1000)
    kwargs = dict(w_dec=w_dec, norm_scale=scale, w_u=w_u, budget_elems=2000)
    alone = StaticFeatures(**kwargs).run(threads=1)

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tempfile, "mkdtemp", full)
    job = StaticFeatures(**kwargs)
    job.start_background()
    assert job._worker is None
    got = job.finish()
    assert got.units_in_background == 0
    assert np.array_equal(got.logits.pos_ids, alone.logits.pos_ids)
    assert np.array_equal(got.neighbour_idx, alone.neighbour_idx)
    if os.name == "posix":
        assert "no background worker" in capsys.readouterr().err


def test_outputs_grow_linearly_with_the_width():
    """No output grows as d_sae^2: the bytes per feature of every shared output array (what the
    worker's files and a build hold) are the same at 4k and 1M latents, for the default unit
    budget (the neighbour blocks' candidates are merged per block, not kept per block)."""
    from app.pipeline.static_features import DEFAULT_BUDGET, _Units

    def per_feature(d_sae: int) -> float:
        units = _Units(d_sae=d_sae, vocab=49152, n_logits=10, n_nb=10,
                       budget_elems=DEFAULT_BUDGET)
        total = sum(int(np.prod(shape)) * np.dtype(dtype).itemsize
                    for shape, dtype in units.output_shapes().values())
        return total / d_sae

    assert per_feature(1 << 20) <= per_feature(4096) * 1.01
    assert per_feature(131072) < 400  # 4 x 10 logit-effect entries + 2 x 10 neighbour keys


def test_a_unit_run_again_or_a_merge_cut_short_changes_nothing():
    """A worker killed mid-unit: the unit was not reported, so it runs again, possibly after
    its candidates were already merged into one band (the same keys count once), and a merge cut
    short wrote only the band's spare copy (the current one is untouched). The result equals an
    uninterrupted run."""
    w_dec = four_hot(8, d_sae=300, d_in=16)
    w_dec[20:40] = w_dec[19]
    kwargs = dict(w_dec=w_dec, norm_scale=torch.ones(16), w_u=torch.zeros(16, 0), n_logits=0,
                  n_neighbours=10, budget_elems=3000)
    alone = StaticFeatures(**kwargs).run(threads=1)
    job = StaticFeatures(**kwargs)
    units = job._units
    assert units.n_bands > 3
    for i in range(len(units.units)):
        units.run(i)
    for i in (0, 1, len(units.units) - 1):  # run again: merged twice
        units.run(i)
    sel = units.a["nb_sel"]
    for band in range(units.n_bands):  # a cut-short merge: garbage in every spare copy
        spare = 2 if sel[band] == 1 else 1
        r0 = band * units.step
        units.a["nb_best"][spare - 1, r0:r0 + units.step] = 12345
    idx, cos = units.merge_neighbours()
    assert np.array_equal(idx, alone.neighbour_idx)
    assert np.array_equal(cos, alone.neighbour_cos)
    again = job.finish(threads=2)  # no worker reported a unit: every unit merged once more
    assert np.array_equal(again.neighbour_idx, alone.neighbour_idx)
    assert np.array_equal(again.neighbour_cos, alone.neighbour_cos)
