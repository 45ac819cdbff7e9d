"""SAELens folders: read v6 and pre-6.0 ``cfg.json`` + ``sae_weights.safetensors``; write v6.

v6 keeps model/hook facts under ``metadata``; pre-6.0 configs are flat (``hook_point``,
``activation_fn_str``, ``activation_fn_kwargs.k``, boolean ``normalize_activations``, optional
``scaling_factor``). Our own SAEs are written in the v6 layout so SAELens users can load them.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor

from app.engine.formats.common import (
    Tensors,
    as_float32,
    config_from,
    file_dtype,
    fold_decoder_norms,
    read_json,
    read_safetensors,
    require_file,
)
from app.engine.sae_config import ARCHITECTURES, SAEConfig, canonical_architecture
from app.errors import ConfigError

SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
# SAELens reads any config whose metadata.sae_lens_version is below 6 as a pre-6.0 flat config,
# so folders we write must declare at least the version that introduced the v6 layout.
SAELENS_LAYOUT_VERSION = "6.0.0"

# cfg.json metadata keys that are SAEConfig fields; other metadata is kept in cfg.metadata.
_METADATA_FIELDS = (
    "model_name",
    "hook_name",
    "context_size",
    "prepend_bos",
    "exclude_special_tokens",
    "neuronpedia_id",
)
# Pre-6.0 flat keys that SAELens itself carries over into v6 metadata.
_PRE6_METADATA_KEYS = (
    "model_class_name",
    "hook_head_index",
    "model_from_pretrained_kwargs",
    "seqpos_slice",
    "dataset_path",
    "sae_lens_version",
    "sae_lens_training_version",
)


def read_saelens(folder: Path) -> tuple[SAEConfig, Tensors, str]:
    cfg_file = require_file(folder, SAELENS_CFG, "SAELens")
    weights_file = require_file(folder, SAELENS_WEIGHTS, "SAELens")
    raw = read_json(cfg_file)
    source = str(cfg_file)
    tensors = read_safetensors(weights_file)
    dtype_in_file = file_dtype(tensors)
    tensors = as_float32(tensors)

    meta_raw = raw.get("metadata")
    is_v6 = isinstance(meta_raw, dict)
    meta: dict[str, Any] = dict(meta_raw) if is_v6 else {}
    flat = {k: v for k, v in raw.items() if k != "metadata"}
    if not is_v6:
        # Pre-6.0 names (SAELens renames these the same way when it loads an old config).
        renames = {
            "hook_point": "hook_name",
            "hook_point_head_index": "hook_head_index",
            "activation_fn_str": "activation_fn",
            "hook_point_layer": "hook_layer",
        }
        flat = {renames.get(k, k): v for k, v in flat.items()}
        for key in (*_METADATA_FIELDS, *_PRE6_METADATA_KEYS, "hook_layer"):
            if key in flat:
                meta[key] = flat.pop(key)

    if meta.get("hook_head_index") is not None:
        raise ConfigError(
            f"{source}: SAEs on a single attention head (hook_head_index) are not supported"
        )
    if flat.get("reshape_activations", "none") not in ("none", None):
        raise ConfigError(
            f"{source}: reshape_activations={flat['reshape_activations']!r} (hook_z SAEs) is not "
            "supported; saescope reads residual, MLP-out and attention-out hooks"
        )

    architecture = str(flat.get("architecture") or "standard")
    activation_fn = flat.get("activation_fn")
    k = flat.get("k")
    if architecture == "standard" and activation_fn == "topk":
        architecture = "topk"
        k = (flat.get("activation_fn_kwargs") or {}).get("k", k)
    elif architecture == "standard" and activation_fn not in (None, "relu"):
        raise ConfigError(
            f"{source}: activation_fn {activation_fn!r} is not supported; allowed: relu, topk"
        )
    if architecture == "jumprelu" and meta.get("training_architecture") == "batchtopk":
        # SAELens saves BatchTopK SAEs as JumpReLU for inference and notes how they were trained.
        architecture = "batchtopk"
        k = (meta.get("training_architecture_details") or {}).get("k")
    architecture = canonical_architecture(architecture, source=source)

    normalize = flat.get("normalize_activations")
    if isinstance(normalize, bool):  # pre-6.0: True meant the April-update norm scaling
        normalize = "expected_average_only_in" if normalize else "none"
    normalize = normalize or "none"

    d_in, d_sae = flat.get("d_in"), flat.get("d_sae")
    if (d_in is None or d_sae is None) and "W_enc" in tensors and tensors["W_enc"].ndim == 2:
        d_in, d_sae = (int(n) for n in tensors["W_enc"].shape)

    meta.setdefault("file_dtype", dtype_in_file)
    meta["source_format"] = "saelens-v6" if is_v6 else "saelens-pre-6.0"
    fields = {key: meta.pop(key) for key in _METADATA_FIELDS if key in meta}
    if fields.get("exclude_special_tokens") is None:
        fields.pop("exclude_special_tokens", None)
    if fields.get("prepend_bos") is None:
        fields.pop("prepend_bos", None)
    cfg = config_from(
        source,
        architecture=architecture,
        d_in=d_in,
        d_sae=d_sae,
        k=k,
        apply_b_dec_to_input=bool(flat.get("apply_b_dec_to_input", True)),
        normalize_activations=normalize,
        metadata=meta,
        **fields,
    )

    # Pre-6.0 fine-tuning scale: decode used (feature_acts * scaling_factor) @ W_dec, which is
    # the same as scaling the decoder rows. All-ones (saved by default for a while) is a no-op.
    for name in ("scaling_factor", "finetuning_scaling_factor"):
        scale = tensors.pop(name, None)
        if scale is not None and not torch.allclose(scale, torch.ones_like(scale)):
            if "W_dec" in tensors and scale.shape == (tensors["W_dec"].shape[0],):
                tensors["W_dec"] = tensors["W_dec"] * scale[:, None]
            else:
                raise ConfigError(
                    f"{weights_file}: tensor {name!r} has an unexpected shape {list(scale.shape)}"
                )

    if architecture == "topk" and flat.get("rescale_acts_by_decoder_norm"):
        # SAELens ranks and reports hidden_pre * |W_dec row| and decodes acts / |W_dec row|.
        # Folding the row norms into the encoder gives exactly the same feature_acts and
        # reconstructions with a plain TopK and unit decoder rows.
        tensors = fold_decoder_norms(tensors, weights_file, "SAELens")
        cfg.metadata["decoder_norm_folded"] = True
    return cfg, tensors, str(weights_file)


def write_saelens(cfg: SAEConfig, tensors: Mapping[str, Tensor], path: str | Path) -> Path:
    """Write an SAE (its config and named tensors) as a SAELens v6 folder (cfg.json +
    sae_weights.safetensors); returns the folder.

    A known ``norm_scaling_factor`` is folded into the written weights (SAELens applies none at
    run time), so SAELens encodes the folder exactly as ``SAE`` does."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    out_tensors = {
        name: tensor.detach().to("cpu").clone().contiguous() for name, tensor in tensors.items()
    }
    normalize = cfg.normalize_activations
    metadata: dict[str, Any] = {
        key: value for key, value in cfg.metadata.items() if key not in ("source_format",)
    }
    if cfg.norm_scaling_factor is not None:
        factor = cfg.norm_scaling_factor
        out_tensors["W_enc"] = out_tensors["W_enc"] * factor
        out_tensors["W_dec"] = out_tensors["W_dec"] / factor
        out_tensors["b_dec"] = out_tensors["b_dec"] / factor
        normalize = "none"
        metadata["norm_scaling_factor_folded"] = factor
    for key in _METADATA_FIELDS:
        metadata[key] = getattr(cfg, key)
    major = _version_major(metadata.get("sae_lens_version"))
    if major is None or major < 6:
        metadata["sae_lens_version"] = SAELENS_LAYOUT_VERSION
        metadata["sae_lens_training_version"] = SAELENS_LAYOUT_VERSION
    metadata["saved_by"] = "saescope"

    arch = ARCHITECTURES[cfg.architecture]
    out: dict[str, Any] = {
        "architecture": arch.saelens_name,
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": cfg.dtype,
        "device": "cpu",
        "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
        "normalize_activations": normalize,
        "reshape_activations": "none",
    }
    if cfg.architecture == "topk":
        out["k"] = cfg.k
        out["rescale_acts_by_decoder_norm"] = False
    if cfg.architecture == "batchtopk":
        # the SAELens convention for BatchTopK SAEs saved for inference (read back above)
        metadata["training_architecture"] = "batchtopk"
        details = dict(metadata.get("training_architecture_details") or {})
        details["k"] = cfg.k
        metadata["training_architecture_details"] = details
    out["metadata"] = metadata

    try:
        text = json.dumps(out, indent=2, default=_json_default)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"SAE metadata cannot be written to {SAELENS_CFG}: {exc}") from exc
    # Each file is written under a temporary name, then renamed, and the config is serialised
    # before anything is written, so a failure never leaves half a folder.
    _atomic_write(folder / SAELENS_WEIGHTS, lambda tmp: save_file(out_tensors, tmp))
    _atomic_write(folder / SAELENS_CFG, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return folder


def _version_major(version: Any) -> int | None:
    match = re.match(r"\s*v?(\d+)", str(version)) if version is not None else None
    return int(match.group(1)) if match else None


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple | set):
        return list(value)
    raise TypeError(f"cannot write {type(value).__name__} to cfg.json")


def _atomic_write(target: Path, write: Callable[[str], Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        # mkstemp makes the file 0600 (and safetensors may recreate it); give it the mode any
        # other file the user writes gets, so cfg.json, the weights and evals.json match.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    """The process umask, read without changing it where /proc allows (no window for threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
