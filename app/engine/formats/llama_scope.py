"""Llama Scope (OpenMOSS lm-saes) folders: ``hyperparams.json`` + ``checkpoints/final.safetensors``.

nn.Linear tensors encoder.weight [d_sae, d_in], decoder.weight [d_in, d_sae] (+ biases), read
into our layout and conventions.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from app.engine.formats.common import (
    Tensors,
    as_float32,
    config_from,
    file_dtype,
    fold_decoder_norms,
    read_json,
    read_safetensors,
    require_file,
    require_tensor,
)
from app.engine.formats.saelens import SAELENS_WEIGHTS
from app.engine.sae_config import SAEConfig
from app.errors import ConfigError

_LLAMA_SCOPE_ACT_FNS = {"jumprelu": "jumprelu", "topk": "topk", "relu": "relu"}


def read_llama_scope(folder: Path) -> tuple[SAEConfig, Tensors, str]:
    """Read an lm-saes / Llama Scope folder into our conventions.

    lm-saes encodes x_n = x * s (s = sqrt(d_model) / dataset_average_activation_norm when
    norm_activation is "dataset-wise"), hidden_pre = x_n @ encoder.weight.T + encoder.bias, and
    gates each latent on hidden_pre * |decoder column| when sparsity_include_decoder_norm
    (its default): JumpReLU fires above jump_relu_threshold, TopK keeps the k largest. The
    decoder output is in the scaled space, so the model-space reconstruction is divided by s.

    Here s becomes norm_scaling_factor (expected_average_only_in), and the decoder norms are
    folded into the encoder (unit decoder rows), so the gate is the plain JumpReLU / TopK one.
    Reconstructions equal lm-saes's; feature_acts are lm-saes's times each decoder norm (the
    unit-decoder convention that SAELens and Neuronpedia use)."""
    cfg_file = require_file(folder, "hyperparams.json", "Llama Scope")
    candidates = (folder / "checkpoints" / "final.safetensors", folder / SAELENS_WEIGHTS)
    file = next((c for c in candidates if c.is_file()), None)
    if file is None:
        raise ConfigError(
            f"{folder} looks like a Llama Scope folder but has no checkpoints/final.safetensors"
        )
    hp = read_json(cfg_file)
    source = str(cfg_file)
    raw = read_safetensors(file)
    dtype_in_file = file_dtype(raw)
    raw = as_float32(raw)

    hook_in, hook_out = hp.get("hook_point_in"), hp.get("hook_point_out", hp.get("hook_point_in"))
    if hook_out != hook_in:
        raise ConfigError(
            f"{source}: this is a transcoder ({hook_in} -> {hook_out}); saescope reads SAEs "
            "that reconstruct the activation they encode"
        )
    act_fn = str(hp.get("act_fn", "relu")).lower()
    if act_fn not in _LLAMA_SCOPE_ACT_FNS:
        raise ConfigError(
            f"{source}: act_fn {act_fn!r} is not supported; "
            f"allowed: {', '.join(_LLAMA_SCOPE_ACT_FNS)}"
        )
    if hp.get("use_glu_encoder"):
        raise ConfigError(f"{source}: GLU encoders (use_glu_encoder) are not supported")

    enc_w = require_tensor(raw, "encoder.weight", file, "Llama Scope")
    if enc_w.ndim != 2:
        raise ConfigError(f"{file}: tensor 'encoder.weight' must be 2-D [d_sae, d_model]")
    d_sae, d_in = int(enc_w.shape[0]), int(enc_w.shape[1])
    for key, want in (("d_model", d_in), ("d_sae", d_sae)):
        if key in hp and int(hp[key]) != want:
            raise ConfigError(
                f"{file}: tensor 'encoder.weight' has shape {list(enc_w.shape)}, but "
                f"hyperparams.json says {key}={hp[key]}"
            )
    dec_w = require_tensor(raw, "decoder.weight", file, "Llama Scope")
    if tuple(dec_w.shape) != (d_in, d_sae):
        raise ConfigError(
            f"{file}: tensor 'decoder.weight' has shape {list(dec_w.shape)}, "
            f"expected {[d_in, d_sae]}"
        )
    use_decoder_bias = bool(hp.get("use_decoder_bias", True))
    b_dec = raw.get("decoder.bias") if use_decoder_bias else None
    tensors: Tensors = {
        "W_enc": enc_w.T.contiguous(),
        "b_enc": require_tensor(raw, "encoder.bias", file, "Llama Scope"),
        "W_dec": dec_w.T.contiguous(),
        "b_dec": b_dec if b_dec is not None else torch.zeros(d_in),
    }

    norm_mode = str(hp.get("norm_activation", "token-wise"))
    factor: float | None = None
    if norm_mode == "dataset-wise":
        avg = hp.get("dataset_average_activation_norm")
        avg_in = avg.get("in") if isinstance(avg, dict) else avg
        # newer lm-saes checkpoints store the norms as tensors named after the hook point
        key = f"dataset_average_activation_norm.{hook_in}"
        if avg_in is None and key in raw:
            avg_in = float(raw[key])
        if not isinstance(avg_in, int | float) or not avg_in > 0:
            raise ConfigError(
                f"{source}: norm_activation is dataset-wise but dataset_average_activation_norm"
                f".in is missing or not positive (got {avg_in!r})"
            )
        factor = math.sqrt(d_in) / float(avg_in)
    elif norm_mode != "inference":
        raise ConfigError(
            f"{source}: norm_activation {norm_mode!r} is not supported; allowed: dataset-wise, "
            "inference"
        )

    if hp.get("sparsity_include_decoder_norm", True):
        # lm-saes's gate uses hidden_pre * |decoder column|; folding makes that the plain gate.
        tensors = fold_decoder_norms(tensors, file, "Llama Scope")
    architecture = _LLAMA_SCOPE_ACT_FNS[act_fn]
    if architecture == "jumprelu":
        # Set after the fold on purpose: lm-saes compares its threshold with the gate score
        # (hidden_pre * |decoder column| by default), which is exactly the folded hidden_pre.
        if "log_jumprelu_threshold" in raw:
            tensors["threshold"] = raw["log_jumprelu_threshold"].exp()
        elif "jump_relu_threshold" in hp:
            tensors["threshold"] = torch.full((d_sae,), float(hp["jump_relu_threshold"]))
        else:
            raise ConfigError(f"{source}: act_fn is jumprelu but jump_relu_threshold is missing")

    metadata: dict[str, Any] = {
        "source_format": "llama-scope",
        "file_dtype": dtype_in_file,
        "decoder_norm_folded": bool(hp.get("sparsity_include_decoder_norm", True)),
    }
    for key in (
        "expansion_factor",
        "top_k",
        "jump_relu_threshold",
        "norm_activation",
        "dataset_average_activation_norm",
        "sparsity_include_decoder_norm",
    ):
        if key in hp:
            metadata[key] = hp[key]
    cfg = config_from(
        source,
        architecture=architecture,
        d_in=d_in,
        d_sae=d_sae,
        k=hp.get("top_k") if architecture == "topk" else None,
        hook_name=hook_in,
        model_name=hp.get("model_name"),
        apply_b_dec_to_input=bool(hp.get("apply_decoder_bias_to_pre_encoder", True))
        and use_decoder_bias,
        normalize_activations="expected_average_only_in" if factor is not None else "none",
        norm_scaling_factor=factor,
        metadata=metadata,
    )
    return cfg, tensors, str(file)
