"""Gemma Scope 2 folders: ``config.json`` (``hf_hook_point_in``) + ``params.safetensors``.

Lowercase w_enc, w_dec, b_enc, b_dec, threshold; the same layout and maths as Gemma Scope 1.
Hook points are Hugging Face module paths, mapped here to TransformerLens names.
"""

from __future__ import annotations

import re
from pathlib import Path

from app.engine.formats.common import (
    Tensors,
    as_float32,
    config_from,
    file_dtype,
    read_json,
    read_safetensors,
    require_file,
)
from app.engine.formats.gemma_scope_1 import encoder_dims, gemma_scope_tensors
from app.engine.sae_config import SAEConfig, canonical_architecture
from app.errors import ConfigError

# The Hugging Face hook points with a TransformerLens name (as SAELens maps them). Gemma 3
# normalises each sublayer's output before adding it to the residual stream, so the post-norm
# outputs are hook_attn_out / hook_mlp_out.
_HF_HOOK_PATTERNS = (
    (re.compile(r"^model\.layers\.(\d+)\.output$"), "blocks.{L}.hook_resid_post"),
    (re.compile(r"^model\.layers\.(\d+)\.input$"), "blocks.{L}.hook_resid_pre"),
    (
        re.compile(r"^model\.layers\.(\d+)\.post_feedforward_layernorm\.output$"),
        "blocks.{L}.hook_mlp_out",
    ),
    (
        re.compile(r"^model\.layers\.(\d+)\.post_attention_layernorm\.output$"),
        "blocks.{L}.hook_attn_out",
    ),
    (re.compile(r"^model\.layers\.(\d+)\.self_attn\.o_proj\.input$"), "blocks.{L}.attn.hook_z"),
    (
        re.compile(r"^model\.layers\.(\d+)\.pre_feedforward_layernorm\.output$"),
        "blocks.{L}.hook_mlp_in",
    ),
)


def hf_hook_to_hook_name(hf_hook: str) -> str | None:
    """TransformerLens-style hook name for a Hugging Face hook point, e.g.
    ``model.layers.12.output`` -> ``blocks.12.hook_resid_post``; None if it has none."""
    for pattern, template in _HF_HOOK_PATTERNS:
        match = pattern.match(hf_hook.strip())
        if match:
            return template.replace("{L}", match.group(1))
    return None


def read_gemma_scope_2(folder: Path) -> tuple[SAEConfig, Tensors, str]:
    cfg_file = require_file(folder, "config.json", "Gemma Scope 2")
    file = require_file(folder, "params.safetensors", "Gemma Scope 2")
    raw_cfg = read_json(cfg_file)
    arch = str(raw_cfg.get("architecture", "jump_relu"))
    if canonical_architecture(arch, source=str(cfg_file)) != "jumprelu":
        raise ConfigError(f"{cfg_file}: Gemma Scope 2 SAEs are JumpReLU, found {arch!r}")
    hook_in = raw_cfg.get("hf_hook_point_in")
    hook_out = raw_cfg.get("hf_hook_point_out")
    if (hook_out and hook_out != hook_in) or raw_cfg.get("affine_connection"):
        raise ConfigError(
            f"{cfg_file}: this is a transcoder ({hook_in} -> {hook_out}); saescope reads SAEs "
            "that reconstruct the activation they encode"
        )
    raw = read_safetensors(file)
    dtype_in_file = file_dtype(raw)
    tensors = as_float32(gemma_scope_tensors(raw, file, "Gemma Scope 2"))
    d_in, d_sae = encoder_dims(tensors["W_enc"], file)
    hook_name = hf_hook_to_hook_name(str(hook_in)) if hook_in else None
    metadata = {k: v for k, v in raw_cfg.items() if k not in ("architecture", "model_name")}
    metadata.update({"source_format": "gemma-scope-2", "file_dtype": dtype_in_file})
    if hook_in:
        metadata["hf_hook_name"] = hook_in
    cfg = config_from(
        str(cfg_file),
        architecture="jumprelu",
        d_in=d_in,
        d_sae=d_sae,
        hook_name=hook_name,
        model_name=raw_cfg.get("model_name"),
        apply_b_dec_to_input=False,
        metadata=metadata,
    )
    return cfg, tensors, str(file)
