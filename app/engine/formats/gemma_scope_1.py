"""Gemma Scope 1 folders: ``params.npz`` with W_enc, W_dec, b_enc, b_dec, threshold.

JumpReLU SAEs; b_dec is not subtracted from the input. The files do not name their hook: it is
read from the folder path (``.../gemma-scope-2b-pt-res/layer_12/...``).
"""

from __future__ import annotations

import re
from pathlib import Path

from torch import Tensor

from app.engine.formats.common import (
    Tensors,
    as_float32,
    config_from,
    file_dtype,
    read_npz,
    require_file,
    require_tensor,
)
from app.engine.sae_config import SAEConfig
from app.errors import ConfigError


def read_gemma_scope_1(folder: Path) -> tuple[SAEConfig, Tensors, str]:
    file = require_file(folder, "params.npz", "Gemma Scope 1")
    raw = read_npz(file)
    dtype_in_file = file_dtype(raw)
    tensors = as_float32(gemma_scope_tensors(raw, file, "Gemma Scope 1"))
    d_in, d_sae = encoder_dims(tensors["W_enc"], file)
    hook_name, model_name = _hook_from_path(folder)
    cfg = config_from(
        str(file),
        architecture="jumprelu",
        d_in=d_in,
        d_sae=d_sae,
        hook_name=hook_name,
        model_name=model_name,
        apply_b_dec_to_input=False,
        metadata={"source_format": "gemma-scope-1", "file_dtype": dtype_in_file},
    )
    return cfg, tensors, str(file)


def gemma_scope_tensors(tensors: Tensors, source: Path, fmt: str) -> Tensors:
    """The five tensors of a Gemma Scope 1 or 2 file in our names (Gemma Scope 2 spells them
    w_enc / w_dec; both releases share the same layout)."""
    renamed = {("W_" + k[2:] if k.startswith("w_") else k): v for k, v in tensors.items()}
    return {
        name: require_tensor(renamed, name, source, fmt)
        for name in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
    }


def encoder_dims(w_enc: Tensor, source: Path) -> tuple[int, int]:
    """(d_in, d_sae) of a [d_in, d_sae] encoder."""
    if w_enc.ndim != 2:
        raise ConfigError(
            f"{source}: tensor 'W_enc' must be 2-D [d_in, d_sae], has shape {list(w_enc.shape)}"
        )
    return int(w_enc.shape[0]), int(w_enc.shape[1])


def _hook_from_path(folder: Path) -> tuple[str | None, str | None]:
    """(hook_name, model_name) from a Gemma Scope 1 path such as
    ``gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82``; the files carry neither."""
    text = folder.resolve().as_posix().lower()
    layer = re.findall(r"(?:^|/)layer_(\d+)(?:/|$)", text)
    model = re.search(r"gemma-scope-(\d+b)-(pt|it)", text)
    model_name = None
    if model:
        model_name = f"gemma-2-{model.group(1)}" + ("-it" if model.group(2) == "it" else "")
    tokens = set(re.split(r"[-_/]", text))
    hook_kind = None
    if tokens & {"res", "resid"}:
        hook_kind = "hook_resid_post"
    elif "mlp" in tokens:
        hook_kind = "hook_mlp_out"
    elif tokens & {"att", "attn"}:
        hook_kind = "attn.hook_z"
    hook_name = f"blocks.{layer[-1]}.{hook_kind}" if layer and hook_kind else None
    return hook_name, model_name
