"""Merging accumulator states: exact sums; every split, merged in any order, is one pass's state."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from app.pipeline import exact_sum
from app.pipeline.accumulators import FeatureAccumulators
from app.pipeline.sparse import sparsify

N_SEQ, CTX, D_SAE, WIN, K, BANDS, PER_BAND = 18, 8, 20, 4, 3, 4, 2


def make_data(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Activations whose scale jumps between sequences (so the interval grids of different
    shards differ and must be coarsened on merge), with exact ties, values spanning six orders
    of magnitude, a dead feature, BOS and padding."""
    rng = np.random.default_rng(seed)
    scale = np.exp(rng.normal(0, 2.0, D_SAE))
    jump = np.exp(rng.normal(0, 2.0, (N_SEQ, 1, 1)))
    vals = rng.exponential(1.0, (N_SEQ, CTX, D_SAE)) * scale * jump
    vals = np.where(rng.random(vals.shape) < 0.2, np.round(vals * 4) / 4, vals)  # some ties
    fire = rng.random(vals.shape) < rng.uniform(0.05, 0.7, D_SAE)
    acts = np.where(fire, vals, 0.0).astype(np.float32)
    acts[:, :, 3] = 0.0
    special = np.zeros((N_SEQ, CTX), dtype=bool)
    special[:, 0] = True
    special[rng.choice(N_SEQ, 3, replace=False), -2:] = True
    return acts, special


def new_acc() -> FeatureAccumulators:
    return FeatureAccumulators(D_SAE, ctx=CTX, n_top=K, window_len=WIN, n_bands=BANDS,
                               per_band=PER_BAND, seed=5)


def feed(acc: FeatureAccumulators, acts, special, seqs: list[int], rng) -> FeatureAccumulators:
    """Feed sequences ``seqs`` in random batches (any order: a batch is any set of sequences)."""
    seqs = list(rng.permutation(seqs))
    while seqs:
        n = int(rng.integers(1, 4))
        batch, seqs = np.array(sorted(seqs[:n])), seqs[n:]
        acc.feed(sparsify(torch.from_numpy(acts[batch].copy()), special_mask=special[batch],
                          seq_index=batch))
    return acc


def assert_same_state(a: FeatureAccumulators, b: FeatureAccumulators) -> None:
    sa, sb = a.canonical_state_dict(), b.canonical_state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and np.array_equal(sa[name], sb[name]), name
    ra, rb = a.finalize(), b.finalize()
    for name in ("count", "act_sum", "max_act", "hist_counts", "band_count", "band_share"):
        assert np.array_equal(getattr(ra, name), getattr(rb, name)), name
    for name in ra.windows.__dataclass_fields__:
        assert np.array_equal(getattr(ra.windows, name), getattr(rb.windows, name)), name
    assert ra.sae_stats == rb.sae_stats


def merge_in_random_tree(parts: list[FeatureAccumulators], rng) -> FeatureAccumulators:
    """Merge by repeatedly folding a random part into another random one."""
    parts = list(parts)
    while len(parts) > 1:
        i, j = rng.choice(len(parts), 2, replace=False)
        parts[i].merge(parts[j])
        parts.pop(j)
    return parts[0]


@pytest.fixture(scope="module", params=[0, 1, 2])
def data(request):
    acts, special = make_data(request.param)
    one_pass = feed(new_acc(), acts, special, list(range(N_SEQ)), np.random.default_rng(0))
    return acts, special, one_pass


@pytest.mark.parametrize("n_shards", [1, 2, 3, 5, N_SEQ])
def test_any_split_merged_in_any_order_is_the_one_pass_state(data, n_shards):
    acts, special, one_pass = data
    rng = np.random.default_rng(n_shards)
    for contiguous in (True, False):
        order = np.arange(N_SEQ) if contiguous else rng.permutation(N_SEQ)
        cuts = np.sort(rng.choice(np.arange(1, N_SEQ), n_shards - 1, replace=False))
        shards = [feed(new_acc(), acts, special, [int(s) for s in part], rng)
                  for part in np.split(order, cuts)]
        assert_same_state(one_pass, merge_in_random_tree(shards, rng))


def test_merge_is_commutative_and_associative_and_empty_is_neutral(data):
    acts, special, one_pass = data
    rng = np.random.default_rng(7)
    thirds = [list(range(0, 5)), list(range(5, 11)), list(range(11, N_SEQ))]

    def part(i: int) -> FeatureAccumulators:
        return feed(new_acc(), acts, special, thirds[i], np.random.default_rng(i))

    ab, ba = part(0), part(1)
    ab.merge(part(1))
    ba.merge(part(0))
    assert_same_state(ab, ba)
    left = part(0)
    left.merge(part(1))
    left.merge(part(2))  # (a + b) + c
    bc = part(1)
    bc.merge(part(2))
    right = part(0)
    right.merge(bc)  # a + (b + c)
    assert_same_state(left, right)
    assert_same_state(left, one_pass)
    empty = new_acc()
    empty.merge(left)
    left.merge(new_acc())
    assert_same_state(empty, one_pass)
    assert_same_state(left, one_pass)
    # merging leaves its argument as it was
    c, c_before = part(2), part(2)
    part(0).merge(c)
    assert_same_state(c, c_before)
    del rng


def test_resumed_and_merged_state_round_trips_through_state_dict(data):
    acts, special, one_pass = data
    rng = np.random.default_rng(3)
    a = feed(new_acc(), acts, special, list(range(9)), rng)
    b = feed(new_acc(), acts, special, list(range(9, N_SEQ)), rng)
    loaded = new_acc()
    loaded.load_state_dict(a.state_dict())
    other = new_acc()
    other.load_state_dict(b.state_dict())
    loaded.merge(other)
    assert_same_state(loaded, one_pass)


def test_exact_sum_is_order_independent_and_correctly_rounded():
    rng = np.random.default_rng(0)
    values = (10.0 ** rng.uniform(-12, 6, 5000)).astype(np.float32)
    values = values[values >= 2.0 ** -40]  # exact from here (see exact_sum)
    index = rng.integers(0, 7, values.size)
    sums = []
    for _ in range(3):
        perm = rng.permutation(values.size)
        total = exact_sum.zeros(7)
        for chunk in np.array_split(perm, 4):
            exact_sum.add(total, index[chunk], values[chunk])
        sums.append(total)
    assert all(np.array_equal(sums[0], s) for s in sums[1:])
    want = [math.fsum(values[index == g].astype(np.float64)) for g in range(7)]
    assert exact_sum.to_float(sums[0]).tolist() == want  # integer parts < 2^21: exact rounding
    assert (sums[0][:, :2] < 2 ** 32).all() and (sums[0] >= 0).all()  # normalized


def test_exact_sum_truncates_below_its_grid_and_refuses_huge_values():
    total = exact_sum.zeros(1)
    exact_sum.add(total, np.zeros(3, np.int64), np.array([2.0 ** -70, 2.0 ** -64, 1.5],
                                                         np.float32))
    assert exact_sum.to_float(total)[0] == 1.5 + 2.0 ** -64
    with pytest.raises(ValueError, match="2\\^32"):
        exact_sum.add(total, np.zeros(1, np.int64), np.array([2.0 ** 33], np.float32))
    big = exact_sum.zeros(1)
    for _ in range(4):  # a sum far past 2^32 carries into the integer limb
        exact_sum.add(big, np.zeros(1000, np.int64), np.full(1000, 2.0 ** 31, np.float32))
    assert exact_sum.to_float(big)[0] == 4000 * 2.0 ** 31


def test_static_feature_units_run_in_groups_and_merged_in_any_order_equal_one_run():
    """The sharded build's static features: groups of units run apart (``run_units``), their
    parts merged in any order, give the one-process result exactly."""
    from app.pipeline.static_features import StaticFeatures, StaticPart, run_units

    g = torch.Generator().manual_seed(0)
    w_dec, w_u = torch.randn(90, 16, generator=g), torch.randn(16, 300, generator=g)
    scale = torch.rand(16, generator=g) + 0.5

    def job() -> StaticFeatures:
        return StaticFeatures(w_dec=w_dec, norm_scale=scale, w_u=w_u, n_logits=6,
                              n_neighbours=5, budget_elems=900)

    whole = job().run(threads=1)
    rng = np.random.default_rng(0)
    split = job()
    meta, inputs = split.plan()
    ids = rng.permutation(split.units_total)
    assert split.units_total > 10  # logit bands and neighbour blocks
    parts = [run_units(meta, inputs, [int(i) for i in group])
             for group in np.array_split(ids, 4)]
    merged = StaticPart()
    for k in rng.permutation(len(parts)):
        merged = parts[k].merge(merged) if k % 2 else merged.merge(parts[k])
    got = split.finish_parts(merged)
    for name in ("pos_ids", "pos_values", "neg_ids", "neg_values"):
        assert np.array_equal(getattr(got.logits, name), getattr(whole.logits, name)), name
    assert np.array_equal(got.neighbour_idx, whole.neighbour_idx)
    assert np.array_equal(got.neighbour_cos, whole.neighbour_cos)
    with pytest.raises(ValueError, match="no output"):
        job().finish_parts(parts[0])


def test_exact_sum_limbs_are_the_floor_of_each_value_times_2_to_the_64():
    """``pieces`` against integer arithmetic on every scale a float32 below 2^32 takes,
    subnormals included."""
    rng = np.random.default_rng(1)
    values = np.ldexp(rng.uniform(0.5, 1.0, 4000), rng.integers(-150, 33, 4000))
    values = values.astype(np.float32)
    values = np.r_[values[values < 2.0 ** 32], np.float32(0.0), np.float32(1e-45),
                   np.nextafter(np.float32(2.0 ** 32), np.float32(0.0))]
    limbs = exact_sum.pieces(values)
    for v, row in zip(values, limbs, strict=True):
        x = math.floor(Fraction(float(v)) * 2 ** 64)
        assert row.tolist() == [x & 0xFFFFFFFF, (x >> 32) & 0xFFFFFFFF, x >> 64], v
