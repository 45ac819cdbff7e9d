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

Speed: a batch is split into its three 32-bit limb pieces (integer shifts of the float32
mantissa), each summed per bin with ``np.bincount``, whose float64 sums are exact while a bin
receives fewer than 2^21 values per call (n * (2^32 - 1) < 2^53); ``add`` feeds at most 2^21
records per call, and touches only the bins it adds to when they are few (interval bins).

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
_CHUNK = 1 << 21  # records per bincount call (exactness bound above)


def zeros(*shape: int) -> np.ndarray:
    """An exact sum of zero for every index of ``shape``: int64 ``[*shape, 3]``."""
    return np.zeros((*shape, N_LIMBS), dtype=np.int64)


def pieces(values: np.ndarray) -> np.ndarray:
    """float64 ``[n, 3]``: the limbs of ``floor(v * 2^64)`` for each value, each < 2^32.

    From the float32 bits: ``v = M * 2^(p - 149)`` with the 24-bit integer mantissa M (the
    implicit bit included) and ``p = max(biased exponent, 1) - 1``, so ``v * 2^64 = M *
    2^(p - 85)`` and limb j is ``(M << (p - 85 - 32 j)) mod 2^32`` (a right shift, truncating,
    for negative amounts)."""
    v = np.ascontiguousarray(values, dtype=np.float32)
    if v.size and not (v.min() >= 0 and v.max() < MAX_VALUE):
        raise ValueError(f"exact sum: values must lie in [0, 2^32), got [{v.min()}, {v.max()}]")
    bits = v.view(np.uint32).astype(np.uint64)
    biased = bits >> np.uint64(23)  # the sign bit is 0
    mantissa = (bits & np.uint64(0x7FFFFF)) | (biased != 0).astype(np.uint64) << np.uint64(23)
    shift = np.maximum(biased.astype(np.int64), 1) - (1 + 149 - FRAC_BITS)
    out = np.empty((v.size, N_LIMBS), dtype=np.float64)
    for j in range(N_LIMBS):
        s = shift - LIMB_BITS * j
        # A left shift of 32 or more leaves nothing in this limb; 40 keeps M << s in 64 bits.
        left = np.clip(s, 0, 40).astype(np.uint64)
        right = np.clip(-s, 0, 63).astype(np.uint64)
        out[:, j] = ((mantissa << left) >> right) & np.uint64(_MASK)
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
        if n_bins <= 4 * idx.size:  # most bins touched: whole columns
            for j in range(N_LIMBS):
                flat[:, j] += np.bincount(idx, weights=chunk[:, j],
                                          minlength=n_bins).astype(np.int64)
            normalize(flat)
            continue
        touched, where = np.unique(idx, return_inverse=True)
        grown = np.take(flat, touched, axis=0)  # (take: much faster than fancy rows)
        for j in range(N_LIMBS):
            grown[:, j] += np.bincount(where, weights=chunk[:, j],
                                       minlength=touched.size).astype(np.int64)
        flat[touched] = normalize(grown)


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
