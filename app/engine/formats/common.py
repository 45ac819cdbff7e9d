"""What every SAE format reader shares: file reading with clear errors, dtypes, decoder folding."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from app.engine.sae_config import SAEConfig
from app.errors import ConfigError

Tensors = dict[str, Tensor]


def read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{file}: cannot read JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: expected a JSON object, found {type(data).__name__}")
    return data


def require_file(folder: Path, name: str, fmt: str) -> Path:
    file = folder / name
    if not file.is_file():
        raise ConfigError(f"{folder} looks like a {fmt} folder but has no {name}")
    return file


def read_safetensors(file: Path) -> Tensors:
    try:
        return dict(load_file(str(file), device="cpu"))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ConfigError(f"{file}: cannot read safetensors file ({exc})") from exc


def read_npz(file: Path) -> Tensors:
    try:
        with np.load(file) as data:
            return {key: torch.from_numpy(np.array(data[key])) for key in data.files}
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{file}: cannot read .npz file ({exc})") from exc


def as_float32(tensors: Tensors) -> Tensors:
    # CPU matmuls in bfloat16/float16 are slow and lossy; weights are held in float32 unless
    # SAE.load(dtype=...) asks otherwise. The file's dtype is kept in metadata.
    return {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in tensors.items()}


def file_dtype(tensors: Tensors) -> str:
    dtypes = {str(v.dtype).removeprefix("torch.") for v in tensors.values()}
    return ",".join(sorted(dtypes))


def require_tensor(tensors: Tensors, name: str, source: Path, fmt: str) -> Tensor:
    if name not in tensors:
        raise ConfigError(
            f"{source}: missing tensor {name!r} ({fmt} files hold {', '.join(sorted(tensors))})"
        )
    return tensors[name]


def fold_decoder_norms(tensors: Tensors, source: Path, fmt: str) -> Tensors:
    """Unit decoder rows, each latent's encoder column, bias and threshold scaled by its old norm:
    the same reconstructions, feature_acts multiplied by that norm."""
    w_dec = require_tensor(tensors, "W_dec", source, fmt)
    norms = w_dec.norm(dim=-1)
    norms = torch.where(norms > 0, norms, torch.ones_like(norms))
    out = dict(tensors)
    out["W_dec"] = w_dec / norms[:, None]
    out["W_enc"] = require_tensor(tensors, "W_enc", source, fmt) * norms[None, :]
    out["b_enc"] = require_tensor(tensors, "b_enc", source, fmt) * norms
    if "threshold" in tensors:
        out["threshold"] = tensors["threshold"] * norms
    return out


def config_from(source: str, **kwargs: Any) -> SAEConfig:
    """SAEConfig whose validation errors name the file they came from."""
    try:
        return SAEConfig(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from exc
    except TypeError as exc:  # a value of the wrong type in a config file
        raise ConfigError(f"{source}: invalid SAE config ({exc})") from exc
