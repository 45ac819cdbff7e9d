"""Exact sums of float32 activations: fixed point in three int64 limbs, the same whatever the order.

A float sum depends on the order of its additions, so the accumulators' sums (a feature's
activation mass, the mass of each interval bin) would differ between a one-process build and a
sharded one. Here every value is read as the integer ``floor(v * 2^64)`` and integers are added,
which is associative and commutative: any split of the records, merged in any order, gives the
same limbs, and so the same float64 at the end.

Representation: a sum is int64 limbs ``[..., 3]`` holding ``l0 * 2^-64 + l1 * 2^-32 + l2``; in
canonical form (``normalize``) l0 and l1 lie in [0, 2^32) and l2 >= 0 is the integer part.

Exactness: a float32 ``v`` has 24 significant bits, so ``v * 2^64`` is an integer (the sum is
exact) for every ``v >= 2^-40`` (about 9.1e-13); smaller values are truncated to a multiple of
2^-64, an error under 5.5e-20 per value, the same in every split. ``v`` must be below 2^32
(``add`` raises otherwise): SAE activations are nowhere near.

Speed: a batch is split into its three 32-bit limb pieces (float64 floors and exact scalings),
each added per bin with ``np.add.at`` on int64; ``add`` feeds at most 2^21 records per call
and normalizes only the bins it added to when they are few (interval bins).

Overflow: after ``normalize`` each limb is below 2^32, so one call adds less than 2^53 to a limb
and the limbs stay far below 2^63 when normalized after every call (``add`` does). Only l2, the
integer part of the whole sum, could overflow, past 2^62 (4.6e18 units of activation; two such
sums still merge below 2^63).

Memory: 24 bytes a sum instead of a float64's 8; the interval bins' sums (128 a feature) take
3 KB a feature.
"""

from __future__ import annotations

import numpy as np

N_LIMBS = 3
LIMB_BITS = 32
FRAC_BITS = 64  # the grid: multiples of 2^-64
MAX_VALUE = 2.0 ** 32  # values must be below this
_MASK = np.int64((1 << LIMB_BITS) - 1)
_CHUNK = 1 << 21  # records per add call (the overflow bound above)


def zeros(*shape: int) -> np.ndarray:
    """An exact sum of zero for every index of ``shape``: int64 ``[*shape, 3]``."""
    return np.zeros((*shape, N_LIMBS), dtype=np.int64)


def pieces(values: np.ndarray) -> np.ndarray:
    """int64 ``[n, 3]``: the limbs of ``floor(v * 2^64)`` for each value, each < 2^32.

    In float64, exactly: ``l2 = floor(v)``; ``r = (v - l2) * 2^32``, ``l1 = floor(r)``; ``l0 =
    floor((r - l1) * 2^32)``. Every step is exact: v has 24 significant bits, subtracting its
    integer part and scaling by a power of two lose nothing, and the last floor is the
    truncation to the 2^-64 grid."""
    v = np.asarray(values, dtype=np.float32)
    if v.size and not (v.min() >= 0 and v.max() < MAX_VALUE):
        raise ValueError(f"exact sum: values must lie in [0, 2^32), got [{v.min()}, {v.max()}]")
    out = np.empty((v.size, N_LIMBS), dtype=np.int64)
    rest = v.astype(np.float64).reshape(-1)
    for j in range(N_LIMBS - 1, -1, -1):
        limb = np.floor(rest)
        out[:, j] = limb
        if j:
            rest = (rest - limb) * float(1 << LIMB_BITS)
    return out


def add(total: np.ndarray, index: np.ndarray, values: np.ndarray | None = None, *,
        limbs: np.ndarray | None = None) -> None:
    """``total[index[i]] += values[i]`` exactly, in place, for sums ``total`` [..., 3] indexed
    by flat position over its leading axes (``limbs``: the values' ``pieces``, when the caller
    has them already); the sums touched are left normalized."""
    flat = total.reshape(-1, N_LIMBS)
    if not np.may_share_memory(flat, total):
        raise ValueError("exact sum: total must be contiguous")
    n_bins = flat.shape[0]
    part = pieces(values) if limbs is None else limbs
    if index.size and (index.min() < 0 or index.max() >= n_bins):
        raise IndexError(f"exact sum index out of [0, {n_bins})")
    for a in range(0, index.size, _CHUNK):
        idx, chunk = index[a:a + _CHUNK], part[a:a + _CHUNK]
        for j in range(N_LIMBS):
            np.add.at(flat[:, j], idx, chunk[:, j])
        if n_bins <= 4 * idx.size:  # most bins touched: normalize them all
            normalize(flat)
        else:  # only the rows added to (a repeated row is written twice, the same)
            flat[idx] = normalize(np.take(flat, idx, axis=0))


def normalize(limbs: np.ndarray) -> np.ndarray:
    """Carry every limb's overflow into the next (in place, and returned): canonical form."""
    for j in range(N_LIMBS - 1):
        carry = limbs[..., j] >> LIMB_BITS
        limbs[..., j] &= _MASK
        limbs[..., j + 1] += carry
    return limbs


def merged(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The exact sum of two sums (normalized)."""
    return normalize(a + b)


def reduce_groups(limbs: np.ndarray, group: np.ndarray, n_groups: int) -> np.ndarray:
    """Exact sums over groups of the rows of normalized ``limbs`` [n, 3]: ``out[g]`` = the sum
    of the rows of group g, normalized (integer adds: l0 and l1 are below 2^32, so fewer than
    2^31 rows per group cannot overflow)."""
    out = zeros(n_groups)
    for j in range(N_LIMBS):
        np.add.at(out[:, j], group, limbs[:, j])
    return normalize(out)


def to_float(limbs: np.ndarray) -> np.ndarray:
    """float64 value of normalized sums ``[..., 3]``: a function of the exact sum alone (so
    identical in every split); correctly rounded while the integer part is below 2^21, within
    one ulp beyond."""
    limbs = normalize(np.array(limbs, dtype=np.int64))
    hi = limbs[..., 2].astype(np.float64) + np.ldexp(limbs[..., 1].astype(np.float64),
                                                     -LIMB_BITS)
    return hi + np.ldexp(limbs[..., 0].astype(np.float64), -2 * LIMB_BITS)
