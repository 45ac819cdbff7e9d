"""state_dict / load_state_dict for accumulators whose whole state is a few numpy arrays."""

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
            setattr(self, name, np.array(got))

