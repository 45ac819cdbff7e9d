"""Where and in what precision the model runs: ``--device`` and ``--dtype`` parsed and checked.

``auto`` is CUDA when torch sees a GPU, else the CPU, so a CPU-only machine behaves as before.
The dtype is the model forward's only: SAE encodes and everything after them stay float32.
"""

from __future__ import annotations

import re

import torch

from app.errors import ConfigError

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_DEVICE_RE = re.compile(r"cpu|cuda(?::(\d+))?")


def resolve_device(spec: str | None) -> torch.device:
    """``auto`` / ``cpu`` / ``cuda`` / ``cuda:N`` as a torch device (ConfigError when unusable)."""
    text = (spec or "auto").strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    match = _DEVICE_RE.fullmatch(text)
    if match is None:
        raise ConfigError(f"unknown device {spec!r}; use {DEVICE_CHOICES}")
    if text == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"device {text} asked for, but torch sees no CUDA GPU here "
                          "(use --device cpu or auto)")
    index = int(match.group(1) or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise ConfigError(f"device {text} asked for, but torch sees {count} CUDA GPU(s) "
                          f"(cuda:0..cuda:{count - 1})")
    return torch.device("cuda", index)


def resolve_dtype(name: str | None) -> torch.dtype:
    """``float32`` / ``bfloat16`` / ``float16`` as a torch dtype (ConfigError otherwise)."""
    text = (name or "float32").strip().lower()
    if text not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; use {', '.join(DTYPES)}")
    return DTYPES[text]


def dtype_label(dtype: torch.dtype) -> str:
    """The option's spelling of a dtype (``torch.bfloat16`` -> ``bfloat16``)."""
    return str(dtype).removeprefix("torch.")
