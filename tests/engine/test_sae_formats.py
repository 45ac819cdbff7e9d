"""SAE file formats: folders written by SAELens itself, and each published layout built by hand.

The SAELens fixtures (tests/fixtures/saelens/, made by tests/fixtures/make_saelens_fixtures.py
with SAELens's own classes and save methods) carry SAELens's feature_acts and reconstructions
for a fixed batch; the hand-built folders are checked against each format's encoding definition
written out here.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from app.engine.formats import detect_format
from app.engine.formats.gemma_scope_2 import hf_hook_to_hook_name
from app.engine.sae import SAE
from app.errors import ConfigError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "saelens"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
TOL = {"atol": 1e-5, "rtol": 1e-5}
D_IN, D_SAE = 10, 24


# --- folders written by SAELens, and ours read back by SAELens --------------------------------


@pytest.mark.parametrize("case", MANIFEST["cases"])
def test_encodings_match_saelens(case: str) -> None:
    folder = FIXTURES / case
    ref = load_file(str(folder / "saelens_reference.safetensors"))
    sae = SAE.load(folder)
    with torch.no_grad():
        acts = sae.encode(ref["x"])
        torch.testing.assert_close(acts, ref["feature_acts"], **TOL)
        torch.testing.assert_close(sae.decode(acts), ref["reconstruction"], **TOL)
        torch.testing.assert_close(sae(ref["x"]), ref["sae_out"], **TOL)
    assert bool((ref["feature_acts"] > 0).any()) and bool((ref["feature_acts"] == 0).any())
    if case.startswith("ours_"):
        # SAELens reads what we wrote exactly as our module computed it before saving
        torch.testing.assert_close(ref["feature_acts"], ref["ours_feature_acts"], **TOL)
        torch.testing.assert_close(ref["reconstruction"], ref["ours_reconstruction"], **TOL)


@pytest.mark.parametrize(
    ("case", "architecture", "k"),
    [
        ("saelens_standard", "relu", None),
        ("saelens_topk", "topk", 5),
        ("saelens_topk_rescaled", "topk", 5),
        ("saelens_jumprelu", "jumprelu", None),
        ("saelens_batchtopk", "batchtopk", 4),
    ],
)
def test_saelens_v6_config_fields(case: str, architecture: str, k: int | None) -> None:
    sae = SAE.load(FIXTURES / case)
    assert detect_format(FIXTURES / case) == "saelens"
    assert (sae.cfg.architecture, sae.cfg.k) == (architecture, k)
    assert sae.cfg.hook_name == "blocks.1.hook_resid_post"
    assert sae.cfg.model_name == "tiny-llama"
    assert sae.cfg.neuronpedia_id == "tiny-llama/1-res-test"
    assert sae.cfg.context_size == 32 and sae.cfg.prepend_bos is True
    assert sae.cfg.apply_b_dec_to_input is (case != "saelens_jumprelu")
    assert sae.cfg.metadata["source_format"] == "saelens-v6"
    assert sae.cfg.metadata["sae_lens_version"] == MANIFEST["sae_lens_version"]


def test_rescaled_topk_is_loaded_with_unit_decoder_rows() -> None:
    sae = SAE.load(FIXTURES / "saelens_topk_rescaled")
    assert sae.cfg.metadata["decoder_norm_folded"] is True
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(sae.cfg.d_sae))


# --- hand-built layouts -----------------------------------------------------------------------


def random_weights(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "W_enc": torch.randn(D_IN, D_SAE, generator=gen) * 0.5,
        "W_dec": torch.randn(D_SAE, D_IN, generator=gen) * 0.5,
        "b_enc": torch.randn(D_SAE, generator=gen) * 0.2,
        "b_dec": torch.randn(D_IN, generator=gen),
        "threshold": torch.rand(D_SAE, generator=gen) * 0.8 + 0.05,
    }


def batch(seed: int = 11, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(6, D_IN, generator=torch.Generator().manual_seed(seed)) * scale


def topk_rows(pre: torch.Tensor, k: int) -> torch.Tensor:
    out = torch.zeros_like(pre)
    for row in range(pre.shape[0]):
        idx = torch.argsort(pre[row], descending=True)[:k]
        out[row, idx] = pre[row, idx].clamp(min=0)
    return out


def test_saelens_pre_6_flat_topk_config_with_finetuning_scale(tmp_path: Path) -> None:
    w = random_weights(1)
    scale = torch.linspace(0.5, 1.5, D_SAE)
    (tmp_path / "cfg.json").write_text(
        json.dumps(
            {
                "model_name": "gpt2-small",
                "hook_point": "blocks.8.hook_resid_pre",
                "hook_point_layer": 8,
                "hook_point_head_index": None,
                "d_in": D_IN,
                "d_sae": D_SAE,
                "dtype": "torch.float32",
                "device": "cuda",
                "activation_fn_str": "topk",
                "activation_fn_kwargs": {"k": 4},
                "apply_b_dec_to_input": True,
                "normalize_activations": False,
                "finetuning_scaling_factor": True,
                "context_size": 128,
                "prepend_bos": True,
                "dataset_path": "Skylion007/openwebtext",
                "sae_lens_training_version": "3.5.0",
                "neuronpedia_id": "gpt2-small/8-res-test",
                "lr": 0.0004,
                "l1_coefficient": 5,
            }
        )
    )
    tensors = {k: v for k, v in w.items() if k != "threshold"}
    tensors["scaling_factor"] = scale
    save_file(tensors, str(tmp_path / "sae_weights.safetensors"))
    sparsity = torch.zeros(D_SAE)
    save_file({"sparsity": sparsity}, str(tmp_path / "sparsity.safetensors"))

    sae = SAE.load(tmp_path)
    assert (sae.cfg.architecture, sae.cfg.k) == ("topk", 4)
    assert sae.cfg.hook_name == "blocks.8.hook_resid_pre"
    assert sae.cfg.context_size == 128 and sae.cfg.neuronpedia_id == "gpt2-small/8-res-test"
    assert sae.cfg.normalize_activations == "none"
    assert sae.cfg.metadata["source_format"] == "saelens-pre-6.0"
    assert sae.cfg.metadata["dataset_path"] == "Skylion007/openwebtext"
    assert sae.cfg.metadata["hook_layer"] == 8

    x = batch()
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    acts = topk_rows(pre, 4)
    # pre-6.0 decode: (feature_acts * scaling_factor) @ W_dec + b_dec
    recon = (acts * scale) @ w["W_dec"] + w["b_dec"]
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), acts, **TOL)
        torch.testing.assert_close(sae(x), recon, **TOL)


def test_saelens_pre_6_relu_defaults(tmp_path: Path) -> None:
    w = random_weights(2)
    (tmp_path / "cfg.json").write_text(
        json.dumps(
            {
                "hook_point": "blocks.0.hook_mlp_out",
                "d_in": D_IN,
                "d_sae": D_SAE,
                "normalize_activations": True,  # pre-6.0 boolean for the April-update scaling
            }
        )
    )
    tensors = {k: v for k, v in w.items() if k != "threshold"}
    tensors["scaling_factor"] = torch.ones(D_SAE)  # saved by default for a while: a no-op
    save_file(tensors, str(tmp_path / "sae_weights.safetensors"))
    sae = SAE.load(tmp_path)
    assert sae.cfg.architecture == "relu" and sae.cfg.apply_b_dec_to_input is True
    assert sae.cfg.normalize_activations == "expected_average_only_in"
    x = batch()
    acts = torch.relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), acts, **TOL)
        torch.testing.assert_close(sae(x), acts @ w["W_dec"] + w["b_dec"], **TOL)


def jumprelu_reference(w: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Gemma Scope's definition: no b_dec subtraction; fires where pre > threshold."""
    pre = x @ w["W_enc"] + w["b_enc"]
    acts = pre * (pre > w["threshold"])
    return acts, acts @ w["W_dec"] + w["b_dec"]


def test_gemma_scope_1_params_npz(tmp_path: Path) -> None:
    w = random_weights(3)
    folder = tmp_path / "gemma-scope-2b-pt-res" / "layer_12" / "width_16k" / "average_l0_82"
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **{k: v.numpy() for k, v in w.items()})
    assert detect_format(folder) == "gemma-scope-1"
    sae = SAE.load(folder)
    assert sae.cfg.architecture == "jumprelu" and sae.cfg.apply_b_dec_to_input is False
    assert sae.cfg.hook_name == "blocks.12.hook_resid_post"
    assert sae.cfg.model_name == "gemma-2-2b"
    assert (sae.cfg.d_in, sae.cfg.d_sae) == (D_IN, D_SAE)
    x = batch()
    acts, recon = jumprelu_reference(w, x)
    assert bool((acts > 0).any()) and bool((acts == 0).any())
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), acts, **TOL)
        torch.testing.assert_close(sae(x), recon, **TOL)
    # the file alone names no hook; the caller can
    other = tmp_path / "copy"
    other.mkdir()
    (other / "params.npz").write_bytes((folder / "params.npz").read_bytes())
    assert SAE.load(other).cfg.hook_name is None
    assert (
        SAE.load(other, hook_name="blocks.3.hook_mlp_out").cfg.hook_name == "blocks.3.hook_mlp_out"
    )


def test_gemma_scope_1_mlp_and_it_path(tmp_path: Path) -> None:
    folder = tmp_path / "gemma-scope-9b-it-mlp" / "layer_20" / "width_131k" / "average_l0_9"
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **{k: v.numpy() for k, v in random_weights(4).items()})
    sae = SAE.load(folder)
    assert sae.cfg.hook_name == "blocks.20.hook_mlp_out" and sae.cfg.model_name == "gemma-2-9b-it"


def write_gemma_scope_2(folder: Path, w: dict[str, torch.Tensor], **cfg: object) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    body = {
        "architecture": "jump_relu",
        "model_name": "gemma-v3-270m-pt",
        "hf_hook_point_in": "model.layers.5.output",
        "width": D_SAE,
        "l0": 9,
        **cfg,
    }
    (folder / "config.json").write_text(json.dumps(body))
    save_file(
        {k.lower(): v.to(torch.bfloat16) if k.startswith("W") else v for k, v in w.items()},
        str(folder / "params.safetensors"),
    )


def test_gemma_scope_2_config_and_params(tmp_path: Path) -> None:
    w = random_weights(5)
    # weights stored as bfloat16 in the file; compare against what the file actually holds
    w = {k: v.to(torch.bfloat16).float() if k.startswith("W") else v for k, v in w.items()}
    folder = tmp_path / "resid_post" / "layer_5_width_16k_l0_small"
    write_gemma_scope_2(folder, w)
    assert detect_format(folder) == "gemma-scope-2"
    sae = SAE.load(folder / "params.safetensors")
    assert sae.cfg.architecture == "jumprelu" and sae.cfg.apply_b_dec_to_input is False
    assert sae.cfg.hook_name == "blocks.5.hook_resid_post"
    assert sae.cfg.model_name == "gemma-v3-270m-pt"
    assert sae.cfg.metadata["hf_hook_name"] == "model.layers.5.output"
    assert sae.cfg.metadata["file_dtype"] == "bfloat16,float32"
    assert sae.dtype == torch.float32
    x = batch()
    acts, recon = jumprelu_reference(w, x)
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), acts, **TOL)
        torch.testing.assert_close(sae(x), recon, **TOL)


@pytest.mark.parametrize(
    ("hf_hook", "hook_name"),
    [
        ("model.layers.5.output", "blocks.5.hook_resid_post"),
        ("model.layers.0.input", "blocks.0.hook_resid_pre"),
        ("model.layers.17.post_feedforward_layernorm.output", "blocks.17.hook_mlp_out"),
        ("model.layers.3.post_attention_layernorm.output", "blocks.3.hook_attn_out"),
        ("model.layers.9.self_attn.o_proj.input", "blocks.9.attn.hook_z"),
        ("model.embed_tokens.output", None),
    ],
)
def test_hf_hook_point_mapping(hf_hook: str, hook_name: str | None) -> None:
    assert hf_hook_to_hook_name(hf_hook) == hook_name


def test_gemma_scope_2_transcoder_and_missing_tensor_are_refused(tmp_path: Path) -> None:
    w = random_weights(6)
    write_gemma_scope_2(
        tmp_path / "tc", w, hf_hook_point_out="model.layers.5.post_feedforward_layernorm.output"
    )
    with pytest.raises(ConfigError, match="transcoder"):
        SAE.load(tmp_path / "tc")
    write_gemma_scope_2(tmp_path / "no_thr", {k: v for k, v in w.items() if k != "threshold"})
    with pytest.raises(ConfigError, match=r"params\.safetensors: missing tensor 'threshold'"):
        SAE.load(tmp_path / "no_thr")


def lm_saes_reference(
    raw: dict[str, torch.Tensor], hp: dict, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """lm-saes (Llama Scope) encode/decode, written out from its definition: returns
    (feature_acts in lm-saes's convention, reconstruction in model units)."""
    s = 1.0
    if hp["norm_activation"] == "dataset-wise":
        s = math.sqrt(hp["d_model"]) / hp["dataset_average_activation_norm"]["in"]
    xn = x * s
    if hp.get("apply_decoder_bias_to_pre_encoder", True):
        xn = xn - raw["decoder.bias"]
    pre = xn @ raw["encoder.weight"].T + raw["encoder.bias"]
    scores = pre * raw["decoder.weight"].norm(dim=0) if hp["sparsity_include_decoder_norm"] else pre
    if hp["act_fn"] == "jumprelu":
        mask = scores > hp["jump_relu_threshold"]
    else:  # topk
        clamped = scores.clamp(min=0)
        kth = clamped.topk(hp["top_k"], dim=-1).values[:, -1:]
        mask = clamped >= kth
    acts = pre * mask
    return acts, (acts @ raw["decoder.weight"].T + raw["decoder.bias"]) / s


def write_llama_scope(folder: Path, hp: dict, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    raw = {
        "encoder.weight": torch.randn(D_SAE, D_IN, generator=gen) * 0.4,
        "encoder.bias": torch.randn(D_SAE, generator=gen) * 0.2,
        "decoder.weight": torch.randn(D_IN, D_SAE, generator=gen) * 0.6,  # norms ~1.9, not 1
        "decoder.bias": torch.randn(D_IN, generator=gen) * 0.3,
    }
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "hyperparams.json").write_text(json.dumps(hp))
    save_file(raw, str(folder / "checkpoints" / "final.safetensors"))
    return raw


LLAMA_HP = {
    "hook_point_in": "blocks.15.hook_resid_post",
    "hook_point_out": "blocks.15.hook_resid_post",
    "d_model": D_IN,
    "expansion_factor": D_SAE // 4,
    "d_sae": D_SAE,
    "act_fn": "jumprelu",
    "jump_relu_threshold": 0.6,
    "top_k": 5,
    "norm_activation": "dataset-wise",
    "dataset_average_activation_norm": {"in": 17.125, "out": 17.125},
    "use_decoder_bias": True,
    "apply_decoder_bias_to_pre_encoder": False,
    "sparsity_include_decoder_norm": True,
}


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"act_fn": "topk", "sparsity_include_decoder_norm": False},
        {"act_fn": "topk", "apply_decoder_bias_to_pre_encoder": True},
        {"norm_activation": "inference", "sparsity_include_decoder_norm": False},
    ],
    ids=["jumprelu-decnorm", "topk", "topk-decnorm-bdec", "jumprelu-inference"],
)
def test_llama_scope_matches_lm_saes_definition(tmp_path: Path, overrides: dict) -> None:
    hp = {**LLAMA_HP, **overrides}
    raw = write_llama_scope(tmp_path / "Llama3_1-8B-Base-L15R-8x", hp, seed=7)
    folder = tmp_path / "Llama3_1-8B-Base-L15R-8x"
    assert detect_format(folder) == "llama-scope"
    sae = SAE.load(folder)
    assert sae.cfg.hook_name == "blocks.15.hook_resid_post"
    assert sae.cfg.architecture == hp["act_fn"]
    assert sae.cfg.apply_b_dec_to_input is hp["apply_decoder_bias_to_pre_encoder"]
    x = batch(scale=6.0)  # residual-like norms, so the dataset norm scaling matters
    acts, recon = lm_saes_reference(raw, hp, x)
    assert bool((acts != 0).any()) and bool((acts == 0).any())
    with torch.no_grad():
        ours = sae.encode(x)
        torch.testing.assert_close(sae(x), recon, **TOL)
        if hp["sparsity_include_decoder_norm"]:
            # decoder rows come out unit-norm; activations carry each decoder norm
            torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(D_SAE))
            torch.testing.assert_close(ours, acts * raw["decoder.weight"].norm(dim=0), **TOL)
        else:
            torch.testing.assert_close(ours, acts, **TOL)


def test_llama_scope_round_trips_through_saelens_layout(tmp_path: Path) -> None:
    raw = write_llama_scope(tmp_path / "ls", LLAMA_HP, seed=8)
    sae = SAE.load(tmp_path / "ls")
    assert sae.cfg.normalize_activations == "expected_average_only_in"
    assert sae.cfg.norm_scaling_factor == pytest.approx(math.sqrt(D_IN) / 17.125)
    sae.save(tmp_path / "out")
    again = SAE.load(tmp_path / "out")
    assert again.cfg.normalize_activations == "none"  # folded into the written weights
    x = batch(scale=6.0)
    _, recon = lm_saes_reference(raw, LLAMA_HP, x)
    with torch.no_grad():
        torch.testing.assert_close(again(x), recon, **TOL)
        torch.testing.assert_close(again.encode(x), sae.encode(x), **TOL)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"hook_point_out": "blocks.15.hook_mlp_out"}, "transcoder"),
        ({"act_fn": "batchtopk"}, "act_fn 'batchtopk' is not supported; allowed: jumprelu"),
        ({"norm_activation": "token-wise"}, "norm_activation 'token-wise' is not supported"),
        ({"d_model": D_IN + 2}, "hyperparams.json says d_model=12"),
    ],
)
def test_llama_scope_unsupported_settings_are_named(
    tmp_path: Path, overrides: dict, message: str
) -> None:
    write_llama_scope(tmp_path / "ls", {**LLAMA_HP, **overrides}, seed=9)
    with pytest.raises(ConfigError, match=message):
        SAE.load(tmp_path / "ls")


# --- errors a user can act on ------------------------------------------------------------------


def test_saelens_folder_errors(tmp_path: Path) -> None:
    (tmp_path / "cfg.json").write_text(json.dumps({"architecture": "gated", "d_in": 4, "d_sae": 8}))
    with pytest.raises(ConfigError, match="has no sae_weights.safetensors"):
        SAE.load(tmp_path)
    save_file({"W_enc": torch.zeros(4, 8)}, str(tmp_path / "sae_weights.safetensors"))
    with pytest.raises(
        ConfigError,
        match=r"cfg\.json: unknown SAE architecture 'gated'; "
        r"allowed: relu, topk, batchtopk, jumprelu",
    ):
        SAE.load(tmp_path)
    (tmp_path / "cfg.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"cfg\.json: cannot read JSON"):
        SAE.load(tmp_path)
    (tmp_path / "cfg.json").write_text(
        json.dumps(
            {
                "architecture": "standard",
                "d_in": 4,
                "d_sae": 8,
                "reshape_activations": "hook_z",
                "metadata": {"hook_name": "blocks.0.attn.hook_z"},
            }
        )
    )
    with pytest.raises(ConfigError, match="hook_z"):
        SAE.load(tmp_path)
    (tmp_path / "cfg.json").write_text(
        json.dumps({"architecture": "topk", "d_in": 4, "d_sae": 8, "metadata": {}})
    )
    with pytest.raises(ConfigError, match=r"cfg\.json: architecture topk needs k"):
        SAE.load(tmp_path)
    (tmp_path / "sae_weights.safetensors").write_bytes(b"garbage")
    (tmp_path / "cfg.json").write_text(json.dumps({"d_in": 4, "d_sae": 8, "metadata": {}}))
    with pytest.raises(ConfigError, match=r"sae_weights\.safetensors: cannot read safetensors"):
        SAE.load(tmp_path)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_saved_files_follow_the_umask(tmp_path: Path, umask: int) -> None:
    from app.engine.sae import SAEConfig

    sae = SAE.from_config(SAEConfig(architecture="topk", d_in=8, d_sae=16, k=2), seed=0)
    old = os.umask(umask)
    try:
        folder = sae.save(tmp_path / "sae")
        (folder / "evals.json").write_text("{}")  # what train-sae writes beside them
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
    assert modes == dict.fromkeys(["cfg.json", "sae_weights.safetensors", "evals.json"],
                                  0o666 & ~umask)
