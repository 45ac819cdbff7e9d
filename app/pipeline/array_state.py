"""Accumulators whose whole state is a few numpy arrays: checkpointing and fast row writes."""

from __future__ import annotations

import numpy as np


class ArrayState:
    """Checkpointing for accumulators whose whole state is the numpy arrays named in _fields."""

    _fields: tuple[str, ...] = ()

    def state_dict(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in self._fields}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        for name in self._fields:
            got, want = state[name], getattr(self, name)
            if got.shape != want.shape or got.dtype != want.dtype:
                raise ValueError(f"checkpoint field {name}: {got.dtype}{got.shape}, "
                                 f"expected {want.dtype}{want.shape}")
            setattr(self, name, np.array(got, order="C"))


def flat_view(arr: np.ndarray) -> np.ndarray:
    """``arr`` as one axis, a view (so in-place adds reach ``arr``; a copy would lose them)."""
    if not arr.flags.c_contiguous:
        raise ValueError("flat_view needs a C-contiguous array")
    return arr.reshape(-1)


def put_rows(arr: np.ndarray, index: tuple[np.ndarray, ...], rows: np.ndarray) -> None:
    """``arr[index] = rows`` for index arrays over the leading axes, each target a contiguous
    row of the trailing axes (a window's values), written as one opaque item per row: several
    times faster than fancy assignment into a large array. Indices must be distinct."""
    lead, width = arr.shape[: len(index)], int(np.prod(arr.shape[len(index):]))
    row = np.dtype((np.void, arr.dtype.itemsize * width))
    src = np.ascontiguousarray(rows, dtype=arr.dtype).reshape(index[0].size, width)
    np.put(flat_view(arr).view(row), np.ravel_multi_index(index, lead),
           src.view(row).reshape(-1))
