"""SAE file formats: read SAELens, Gemma Scope 1/2 and Llama Scope folders; write SAELens.

Each reader turns a folder into (SAEConfig, tensors in our names and layout, source file), so
``SAE.from_tensors`` validates every format the same way. Formats, as published:

- SAELens: ``cfg.json`` + ``sae_weights.safetensors``. v6 keeps model/hook facts under
  ``metadata``; pre-6.0 configs are flat (``hook_point``, ``activation_fn_str``,
  ``activation_fn_kwargs.k``, boolean ``normalize_activations``, optional ``scaling_factor``).
- Gemma Scope 1: ``params.npz`` with W_enc, W_dec, b_enc, b_dec, threshold; JumpReLU;
  b_dec is not subtracted from the input. The hook is only in the folder path
  (``.../gemma-scope-2b-pt-res/layer_12/...``).
- Gemma Scope 2: ``config.json`` (``hf_hook_point_in``) + ``params.safetensors`` with lowercase
  w_enc, w_dec, b_enc, b_dec, threshold, same layout and maths as Gemma Scope 1.
- Llama Scope (OpenMOSS lm-saes): ``hyperparams.json`` + ``checkpoints/final.safetensors`` with
  nn.Linear tensors encoder.weight [d_sae, d_in], decoder.weight [d_in, d_sae] (+ biases).
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from app.engine.sae import ARCHITECTURES, SAE, SAEConfig, canonical_architecture
from app.errors import ConfigError, NotFoundError

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

Tensors = dict[str, Tensor]


@dataclass(frozen=True)
class Format:
    name: str
    # files that identify the format; the first entry alone is enough to claim the folder
    files: tuple[str, ...]
    reader: Callable[[Path], tuple[SAEConfig, Tensors, str]]


def read_sae_folder(path: str | Path) -> tuple[SAEConfig, Tensors, str]:
    """Detect the folder's format and read it: (config, tensors in our layout, source file)."""
    folder = _folder_of(Path(path))
    for fmt in FORMATS:
        if (folder / fmt.files[0]).is_file():
            return fmt.reader(folder)
    expected = "; ".join(f"{f.name}: {' + '.join(f.files)}" for f in FORMATS)
    present = sorted(p.name for p in folder.iterdir())[:12]
    raise ConfigError(
        f"{folder} is not an SAE folder in a known format. Expected one of: {expected}. "
        f"Found: {', '.join(present) or 'nothing'}"
    )


def detect_format(path: str | Path) -> str:
    """Name of the format of an SAE folder ('saelens', 'gemma-scope-1', ...)."""
    folder = _folder_of(Path(path))
    for fmt in FORMATS:
        if (folder / fmt.files[0]).is_file():
            return fmt.name
    raise ConfigError(f"{folder} is not an SAE folder in a known format")


def _folder_of(path: Path) -> Path:
    if not path.exists():
        raise NotFoundError(f"SAE path {path} does not exist")
    if path.is_file():
        # a weights or config file was given: use its folder (Llama Scope keeps weights one
        # level down, in checkpoints/)
        path = path.parent
        if path.name == "checkpoints" and (path.parent / "hyperparams.json").is_file():
            path = path.parent
    return path


# --- shared helpers ---------------------------------------------------------------------------


def _read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{file}: cannot read JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: expected a JSON object, found {type(data).__name__}")
    return data


def _require(folder: Path, name: str, fmt: str) -> Path:
    file = folder / name
    if not file.is_file():
        raise ConfigError(f"{folder} looks like a {fmt} folder but has no {name}")
    return file


def _read_safetensors(file: Path) -> Tensors:
    try:
        return dict(load_file(str(file), device="cpu"))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ConfigError(f"{file}: cannot read safetensors file ({exc})") from exc


def _read_npz(file: Path) -> Tensors:
    try:
        with np.load(file) as data:
            return {key: torch.from_numpy(np.array(data[key])) for key in data.files}
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{file}: cannot read .npz file ({exc})") from exc


def _as_float32(tensors: Tensors) -> Tensors:
    # CPU matmuls in bfloat16/float16 are slow and lossy; weights are held in float32 unless
    # SAE.load(dtype=...) asks otherwise. The file's dtype is kept in metadata.
    return {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in tensors.items()}


def _file_dtype(tensors: Tensors) -> str:
    dtypes = {str(v.dtype).removeprefix("torch.") for v in tensors.values()}
    return ",".join(sorted(dtypes))


def _tensor(tensors: Tensors, name: str, source: Path, fmt: str) -> Tensor:
    if name not in tensors:
        raise ConfigError(
            f"{source}: missing tensor {name!r} ({fmt} files hold {', '.join(sorted(tensors))})"
        )
    return tensors[name]


def _version_major(version: Any) -> int | None:
    match = re.match(r"\s*v?(\d+)", str(version)) if version is not None else None
    return int(match.group(1)) if match else None


# --- SAELens ----------------------------------------------------------------------------------


def read_saelens(folder: Path) -> tuple[SAEConfig, Tensors, str]:
    cfg_file = _require(folder, SAELENS_CFG, "SAELens")
    weights_file = _require(folder, SAELENS_WEIGHTS, "SAELens")
    raw = _read_json(cfg_file)
    source = str(cfg_file)
    tensors = _read_safetensors(weights_file)
    file_dtype = _file_dtype(tensors)
    tensors = _as_float32(tensors)

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

    meta.setdefault("file_dtype", file_dtype)
    meta["source_format"] = "saelens-v6" if is_v6 else "saelens-pre-6.0"
    fields = {key: meta.pop(key) for key in _METADATA_FIELDS if key in meta}
    if fields.get("exclude_special_tokens") is None:
        fields.pop("exclude_special_tokens", None)
    if fields.get("prepend_bos") is None:
        fields.pop("prepend_bos", None)
    cfg = _config(
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
        tensors = _fold_decoder_norms(tensors, weights_file)
        cfg.metadata["decoder_norm_folded"] = True
    return cfg, tensors, str(weights_file)


def _fold_decoder_norms(tensors: Tensors, source: Path) -> Tensors:
    w_dec = _tensor(tensors, "W_dec", source, "SAELens")
    norms = w_dec.norm(dim=-1)
    norms = torch.where(norms > 0, norms, torch.ones_like(norms))
    out = dict(tensors)
    out["W_dec"] = w_dec / norms[:, None]
    out["W_enc"] = _tensor(tensors, "W_enc", source, "SAELens") * norms[None, :]
    out["b_enc"] = _tensor(tensors, "b_enc", source, "SAELens") * norms
    if "threshold" in tensors:
        out["threshold"] = tensors["threshold"] * norms
    return out


def _config(source: str, **kwargs: Any) -> SAEConfig:
    """SAEConfig whose validation errors name the file they came from."""
    try:
        return SAEConfig(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from exc
    except TypeError as exc:  # a value of the wrong type in a config file
        raise ConfigError(f"{source}: invalid SAE config ({exc})") from exc


def write_saelens(sae: SAE, path: str | Path) -> Path:
    """Write ``sae`` as a SAELens v6 folder (cfg.json + sae_weights.safetensors); returns it.

    A known ``norm_scaling_factor`` is folded into the written weights (SAELens applies none at
    run time), so SAELens encodes the folder exactly as this module does."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = sae.cfg
    tensors = {
        name: getattr(sae, name).detach().to("cpu").clone().contiguous()
        for name in sae.expected_shapes()
    }
    normalize = cfg.normalize_activations
    metadata: dict[str, Any] = {
        key: value for key, value in cfg.metadata.items() if key not in ("source_format",)
    }
    if cfg.norm_scaling_factor is not None:
        factor = cfg.norm_scaling_factor
        tensors["W_enc"] = tensors["W_enc"] * factor
        tensors["W_dec"] = tensors["W_dec"] / factor
        tensors["b_dec"] = tensors["b_dec"] / factor
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
    _atomic_write(folder / SAELENS_WEIGHTS, lambda tmp: save_file(tensors, tmp))
    _atomic_write(folder / SAELENS_CFG, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return folder


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
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# --- Gemma Scope ------------------------------------------------------------------------------

# Gemma Scope 2 names its hook points by Hugging Face module paths; these are the ones with a
# TransformerLens name (as SAELens maps them). Gemma 3 normalises each sublayer's output before
# adding it to the residual stream, so the post-norm outputs are hook_attn_out / hook_mlp_out.
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


def _gemma_scope_tensors(tensors: Tensors, source: Path, fmt: str) -> Tensors:
    # Gemma Scope 2 uses lowercase w_enc / w_dec; both releases share the same layout.
    renamed = {("W_" + k[2:] if k.startswith("w_") else k): v for k, v in tensors.items()}
    return {
        name: _tensor(renamed, name, source, fmt)
        for name in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
    }


def _gemma_scope_1_hook(folder: Path) -> tuple[str | None, str | None]:
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


def read_gemma_scope_1(folder: Path) -> tuple[SAEConfig, Tensors, str]:
    file = _require(folder, "params.npz", "Gemma Scope 1")
    raw = _read_npz(file)
    file_dtype = _file_dtype(raw)
    tensors = _as_float32(_gemma_scope_tensors(raw, file, "Gemma Scope 1"))
    d_in, d_sae = _shape2(tensors["W_enc"], file)
    hook_name, model_name = _gemma_scope_1_hook(folder)
    cfg = _config(
        str(file),
        architecture="jumprelu",
        d_in=d_in,
        d_sae=d_sae,
        hook_name=hook_name,
        model_name=model_name,
        apply_b_dec_to_input=False,
        metadata={"source_format": "gemma-scope-1", "file_dtype": file_dtype},
    )
    return cfg, tensors, str(file)


def read_gemma_scope_2(folder: Path) -> tuple[SAEConfig, Tensors, str]:
    cfg_file = _require(folder, "config.json", "Gemma Scope 2")
    file = _require(folder, "params.safetensors", "Gemma Scope 2")
    raw_cfg = _read_json(cfg_file)
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
    raw = _read_safetensors(file)
    file_dtype = _file_dtype(raw)
    tensors = _as_float32(_gemma_scope_tensors(raw, file, "Gemma Scope 2"))
    d_in, d_sae = _shape2(tensors["W_enc"], file)
    hook_name = hf_hook_to_hook_name(str(hook_in)) if hook_in else None
    metadata = {k: v for k, v in raw_cfg.items() if k not in ("architecture", "model_name")}
    metadata.update({"source_format": "gemma-scope-2", "file_dtype": file_dtype})
    if hook_in:
        metadata["hf_hook_name"] = hook_in
    cfg = _config(
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


def _shape2(w_enc: Tensor, source: Path) -> tuple[int, int]:
    if w_enc.ndim != 2:
        raise ConfigError(
            f"{source}: tensor 'W_enc' must be 2-D [d_in, d_sae], has shape {list(w_enc.shape)}"
        )
    return int(w_enc.shape[0]), int(w_enc.shape[1])


# --- Llama Scope ------------------------------------------------------------------------------

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
    cfg_file = _require(folder, "hyperparams.json", "Llama Scope")
    candidates = (folder / "checkpoints" / "final.safetensors", folder / SAELENS_WEIGHTS)
    file = next((c for c in candidates if c.is_file()), None)
    if file is None:
        raise ConfigError(
            f"{folder} looks like a Llama Scope folder but has no checkpoints/final.safetensors"
        )
    hp = _read_json(cfg_file)
    source = str(cfg_file)
    raw = _read_safetensors(file)
    file_dtype = _file_dtype(raw)
    raw = _as_float32(raw)

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

    enc_w = _tensor(raw, "encoder.weight", file, "Llama Scope")
    if enc_w.ndim != 2:
        raise ConfigError(f"{file}: tensor 'encoder.weight' must be 2-D [d_sae, d_model]")
    d_sae, d_in = int(enc_w.shape[0]), int(enc_w.shape[1])
    for key, want in (("d_model", d_in), ("d_sae", d_sae)):
        if key in hp and int(hp[key]) != want:
            raise ConfigError(
                f"{file}: tensor 'encoder.weight' has shape {list(enc_w.shape)}, but "
                f"hyperparams.json says {key}={hp[key]}"
            )
    dec_w = _tensor(raw, "decoder.weight", file, "Llama Scope")
    if tuple(dec_w.shape) != (d_in, d_sae):
        raise ConfigError(
            f"{file}: tensor 'decoder.weight' has shape {list(dec_w.shape)}, "
            f"expected {[d_in, d_sae]}"
        )
    use_decoder_bias = bool(hp.get("use_decoder_bias", True))
    b_dec = raw.get("decoder.bias") if use_decoder_bias else None
    tensors: Tensors = {
        "W_enc": enc_w.T.contiguous(),
        "b_enc": _tensor(raw, "encoder.bias", file, "Llama Scope"),
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
        tensors = _fold_decoder_norms(tensors, file)
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
        "file_dtype": file_dtype,
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
    cfg = _config(
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


FORMATS: tuple[Format, ...] = (
    Format("saelens", (SAELENS_CFG, SAELENS_WEIGHTS), read_saelens),
    Format("gemma-scope-1", ("params.npz",), read_gemma_scope_1),
    Format("gemma-scope-2", ("params.safetensors", "config.json"), read_gemma_scope_2),
    Format("llama-scope", ("hyperparams.json", "checkpoints/final.safetensors"), read_llama_scope),
)
