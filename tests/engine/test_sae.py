"""The SAE module: architectures against their definitions, round trips, folds, validation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from app.engine.sae import ARCHITECTURES, SAE, SAEConfig
from app.errors import ConfigError, NotFoundError

D_IN, D_SAE = 12, 40


def make_sae(architecture: str, *, seed: int = 0, **kwargs: object) -> SAE:
    """Random SAE with non-trivial biases and (for JumpReLU kinds) positive thresholds."""
    if architecture in ("topk", "batchtopk"):
        kwargs.setdefault("k", 6)
    cfg = SAEConfig(architecture=architecture, d_in=D_IN, d_sae=D_SAE, **kwargs)  # type: ignore[arg-type]
    sae = SAE.from_config(cfg, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(D_IN, D_SAE, generator=gen) * 0.5)
        sae.W_dec.copy_(torch.randn(D_SAE, D_IN, generator=gen) * 0.5)
        sae.b_enc.copy_(torch.randn(D_SAE, generator=gen) * 0.2)
        sae.b_dec.copy_(torch.randn(D_IN, generator=gen))
        if sae.threshold is not None:
            sae.threshold.copy_(torch.rand(D_SAE, generator=gen) * 0.8)
    return sae.eval()


def inputs(seed: int = 7) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(4, 9, D_IN, generator=gen) * 2.0


def pre_activations(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    """hidden_pre written out from the definition, independent of the module's own path."""
    w = sae.W_enc.detach().double()
    x = x.double()
    if sae.cfg.norm_scaling_factor:
        x = x * sae.cfg.norm_scaling_factor
    if sae.cfg.apply_b_dec_to_input:
        x = x - sae.b_dec.detach().double()
    return torch.einsum("...i,ij->...j", x, w) + sae.b_enc.detach().double()


def brute_force_topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    out = torch.zeros_like(pre)
    flat_pre, flat_out = pre.reshape(-1, pre.shape[-1]), out.view(-1, pre.shape[-1])
    for row in range(flat_pre.shape[0]):
        values = flat_pre[row].tolist()
        order = sorted(range(len(values)), key=lambda j: values[j], reverse=True)[:k]
        for j in order:
            flat_out[row, j] = max(values[j], 0.0)
    return out


# --- architectures against their definitions ---------------------------------------------------


@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_relu_encode_decode_match_definition(apply_b_dec: bool) -> None:
    sae = make_sae("relu", apply_b_dec_to_input=apply_b_dec)
    x = inputs()
    expected = torch.relu(pre_activations(sae, x))
    acts = sae.encode(x)
    torch.testing.assert_close(acts.double(), expected, atol=1e-5, rtol=1e-5)
    recon = acts.double() @ sae.W_dec.detach().double() + sae.b_dec.detach().double()
    torch.testing.assert_close(sae.decode(acts).double(), recon, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sae(x), sae.decode(acts))


def test_topk_keeps_k_largest_then_relu() -> None:
    sae = make_sae("topk", k=6)
    with torch.no_grad():
        sae.b_enc[:5] = -50.0  # some latents inside the top k can only be negative
    x = inputs()
    acts = sae.encode(x)
    torch.testing.assert_close(
        acts.double(), brute_force_topk(pre_activations(sae, x), 6), atol=1e-5, rtol=1e-5
    )
    assert int((acts > 0).sum(-1).max()) <= 6


def test_topk_encode_sparse_in_row_chunks_equals_one_product(monkeypatch) -> None:
    """A wide SAE's batch is ranked in row chunks (no whole [n, d_sae] product): the same
    values and latents as ranking every row at once, for a row count that is no multiple of
    the chunk."""
    import app.engine.sae as sae_module

    cfg = SAEConfig(architecture="topk", d_in=8, d_sae=64, k=5)
    sae = SAE.from_config(cfg, seed=3)
    x = torch.randn(3, 37, 8, generator=torch.Generator().manual_seed(1))
    whole = sae.encode_sparse(x)
    monkeypatch.setattr(sae_module, "_SPARSE_CHUNK_ELEMS", 64 * 10)  # 10 rows a chunk
    chunked = sae.encode_sparse(x)
    assert chunked[0].shape == (3, 37, 5) and chunked[1].shape == (3, 37, 5)
    assert torch.equal(chunked[1], whole[1])
    torch.testing.assert_close(chunked[0], whole[0], rtol=1e-6, atol=1e-6)
    dense = sae.encode(x)
    torch.testing.assert_close(dense.gather(-1, chunked[1]), chunked[0], rtol=1e-6, atol=1e-6)


def test_topk_latent_in_top_k_with_negative_preactivation_stays_zero() -> None:
    sae = make_sae("topk", k=D_SAE)  # every latent is in the top k
    x = inputs()
    pre = pre_activations(sae, x)
    acts = sae.encode(x)
    assert bool((pre < 0).any())
    torch.testing.assert_close(acts.double(), pre.clamp(min=0), atol=1e-5, rtol=1e-5)


def test_jumprelu_fires_strictly_above_threshold() -> None:
    sae = make_sae("jumprelu", apply_b_dec_to_input=False)
    x = inputs()
    pre = pre_activations(sae, x)
    threshold = sae.threshold.detach().double()  # type: ignore[union-attr]
    expected = pre * (pre > threshold)
    torch.testing.assert_close(sae.encode(x).double(), expected, atol=1e-5, rtol=1e-5)
    # a pre-activation exactly at the threshold does not fire
    with torch.no_grad():
        sae.threshold.fill_(0.25)  # type: ignore[union-attr]
        sae.W_enc.zero_()
        sae.b_enc.fill_(0.25)
    assert float(sae.encode(x).detach().abs().max()) == 0.0


def test_batchtopk_eval_is_jumprelu_and_train_keeps_k_per_token_on_average() -> None:
    sae = make_sae("batchtopk", k=3)
    x = inputs()
    pre = pre_activations(sae, x)
    threshold = sae.threshold.detach().double()  # type: ignore[union-attr]
    torch.testing.assert_close(
        sae.encode(x).double(), pre * (pre > threshold), atol=1e-5, rtol=1e-5
    )

    sae.train()
    acts = sae.encode(x)
    n_tokens = x.shape[0] * x.shape[1]
    assert int((acts > 0).sum()) == 3 * n_tokens
    relu = pre.clamp(min=0).reshape(-1)
    kept = set(torch.argsort(relu, descending=True)[: 3 * n_tokens].tolist())
    assert set(torch.nonzero(acts.reshape(-1) > 0).flatten().tolist()) == kept


def test_batchtopk_threshold_tracks_smallest_kept_activation() -> None:
    sae = make_sae("batchtopk", k=3)
    with torch.no_grad():
        sae.threshold.zero_()  # type: ignore[union-attr]
    acts = torch.tensor([[0.0, 2.0, 0.5], [1.0, 0.0, 0.0]])
    sae.update_batchtopk_threshold(acts, lr=0.5)
    assert torch.allclose(sae.threshold, torch.full((D_SAE,), 0.25))  # type: ignore[arg-type]


def test_expected_average_only_in_scales_input_and_unscales_output() -> None:
    factor = 2.5
    sae = make_sae(
        "relu", normalize_activations="expected_average_only_in", norm_scaling_factor=factor
    )
    x = inputs()
    acts = sae.encode(x)
    expected = torch.relu(pre_activations(sae, x))  # pre_activations applies the factor
    torch.testing.assert_close(acts.double(), expected, atol=1e-5, rtol=1e-5)
    raw = acts.double() @ sae.W_dec.detach().double() + sae.b_dec.detach().double()
    torch.testing.assert_close(sae.decode(acts).double(), raw / factor, atol=1e-5, rtol=1e-5)


def test_expected_average_only_in_without_factor_is_a_no_op_like_saelens() -> None:
    plain = make_sae("relu")
    normed = make_sae("relu", normalize_activations="expected_average_only_in")
    x = inputs()
    torch.testing.assert_close(normed(x), plain(x))


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_folding_norm_scaling_factor_keeps_encodings(architecture: str) -> None:
    sae = make_sae(
        architecture, normalize_activations="expected_average_only_in", norm_scaling_factor=0.37
    )
    x = inputs()
    before_acts, before_out = sae.encode(x), sae(x)
    sae.fold_activation_norm_scaling_factor()
    assert sae.cfg.normalize_activations == "none" and sae.cfg.norm_scaling_factor is None
    torch.testing.assert_close(sae.encode(x), before_acts, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sae(x), before_out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("architecture", ["relu", "jumprelu"])
def test_fold_w_dec_norm_keeps_reconstruction(architecture: str) -> None:
    sae = make_sae(architecture)
    x = inputs()
    before_acts, before_out = sae.encode(x), sae(x)
    norms = sae.fold_W_dec_norm()
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(D_SAE))
    torch.testing.assert_close(sae.encode(x), before_acts * norms, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sae(x), before_out, atol=1e-5, rtol=1e-5)


def test_encode_accepts_half_precision_input_and_keeps_leading_dims() -> None:
    sae = make_sae("topk")
    x = inputs()
    acts = sae.encode(x.half())
    assert acts.dtype == torch.float32 and acts.shape == (4, 9, D_SAE)
    torch.testing.assert_close(acts, sae.encode(x.half().float()))
    assert sae.encode(x[0, 0]).shape == (D_SAE,)


@pytest.mark.parametrize("architecture,training", [
    ("relu", False), ("jumprelu", False), ("batchtopk", False), ("batchtopk", True),
    ("topk", False)])
@pytest.mark.parametrize("scaled", [False, True])
def test_encode_latents_is_encode_at_those_latents(architecture: str, training: bool,
                                                   scaled: bool) -> None:
    """Steering's few-latent encode against the full one: per-latent architectures use only
    those encoder columns, TopK ranks them all; batchtopk in training ranks over the batch."""
    kwargs = {"normalize_activations": "expected_average_only_in",
              "norm_scaling_factor": 1.7} if scaled else {}
    sae = make_sae(architecture, **kwargs).train(training)
    x = inputs()
    latents = [31, 2, 17, 2, 0, 39]  # any order, repeats allowed
    full = sae.encode(x)
    assert bool((full[..., latents] > 0).any())  # some of them fire
    torch.testing.assert_close(sae.encode_latents(x, latents), full[..., latents],
                               atol=1e-6, rtol=1e-6)
    sae.store_encoder_transposed()  # as the server holds it
    torch.testing.assert_close(sae.encode_latents(x[0], [5]), sae.encode(x[0])[..., [5]],
                               atol=1e-6, rtol=1e-6)


def test_topk_encode_latents_of_latents_that_cannot_fire() -> None:
    """Rows where every latent asked for has a pre-activation <= 0 are 0 without ranking."""
    sae = make_sae("topk")
    with torch.no_grad():
        sae.b_enc[[4, 9]] = -100.0
    x = inputs()
    for latents in ([4, 9], [4, 9, 12]):
        got = sae.encode_latents(x, latents)
        torch.testing.assert_close(got, sae.encode(x)[..., latents], atol=1e-6, rtol=1e-6)
    assert bool((sae.encode_latents(x, [4, 9]) == 0).all())


def test_topk_encode_latents_resolves_ties_as_encode() -> None:
    sae = make_sae("topk", k=2)
    with torch.no_grad():  # four latents tie for the top two places
        sae.W_enc.zero_()
        sae.b_enc.zero_()
        sae.b_enc[[3, 8, 20, 33]] = 1.0
    x = inputs()
    latents = [3, 8, 20, 33]
    torch.testing.assert_close(sae.encode_latents(x, latents), sae.encode(x)[..., latents],
                               atol=0, rtol=0)


def test_to_dtype_updates_config() -> None:
    sae = make_sae("relu").to(torch.float64)
    assert sae.cfg.dtype == "float64" and sae.dtype == torch.float64
    assert sae.encode(inputs()).dtype == torch.float64


# --- construction ----------------------------------------------------------------------------


def test_from_config_unit_decoder_tied_encoder_and_seeded() -> None:
    cfg = SAEConfig(architecture="topk", d_in=D_IN, d_sae=D_SAE, k=4)
    a, b, c = (SAE.from_config(cfg, seed=s) for s in (3, 3, 4))
    torch.testing.assert_close(a.W_dec.norm(dim=-1), torch.ones(D_SAE))
    torch.testing.assert_close(a.W_enc, a.W_dec.T)
    assert torch.equal(a.W_dec, b.W_dec) and not torch.equal(a.W_dec, c.W_dec)
    assert not a.b_enc.detach().any() and not a.b_dec.detach().any()
    assert all(p.requires_grad for p in a.parameters())
    assert a.cfg is not cfg  # the caller's config is not shared


def test_standard_is_an_alias_of_relu() -> None:
    assert SAEConfig(architecture="standard", d_in=2, d_sae=3).architecture == "relu"
    assert SAEConfig(architecture="JumpReLU", d_in=2, d_sae=3).architecture == "jumprelu"


# --- save / load round trips ------------------------------------------------------------------


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_save_load_round_trip(architecture: str, tmp_path: Path) -> None:
    sae = make_sae(
        architecture,
        hook_name="blocks.3.hook_resid_post",
        model_name="tiny-llama",
        context_size=64,
        prepend_bos=False,
        exclude_special_tokens=True,
        neuronpedia_id="tiny-llama/3-res-test",
        apply_b_dec_to_input=architecture != "jumprelu",
        metadata={"dataset_path": "python-docs", "trained_tokens": 1234},
    )
    x = inputs()
    folder = sae.save(tmp_path / "sae")
    assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    loaded = SAE.load(folder)
    for name in (
        "architecture",
        "d_in",
        "d_sae",
        "k",
        "hook_name",
        "model_name",
        "context_size",
        "prepend_bos",
        "exclude_special_tokens",
        "neuronpedia_id",
        "apply_b_dec_to_input",
        "normalize_activations",
        "dtype",
    ):
        assert getattr(loaded.cfg, name) == getattr(sae.cfg, name), name
    assert loaded.cfg.metadata["dataset_path"] == "python-docs"
    assert loaded.cfg.metadata["trained_tokens"] == 1234
    for name, tensor in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    torch.testing.assert_close(loaded.encode(x), sae.encode(x))
    torch.testing.assert_close(loaded(x), sae(x))


def test_saved_cfg_is_saelens_v6(tmp_path: Path) -> None:
    make_sae("topk", k=5, hook_name="blocks.1.hook_resid_post").save(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 5
    assert cfg["rescale_acts_by_decoder_norm"] is False
    assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post"
    assert int(cfg["metadata"]["sae_lens_version"].split(".")[0]) >= 6
    tensors = load_file(str(tmp_path / "sae_weights.safetensors"))
    assert {n: list(t.shape) for n, t in tensors.items()} == {
        "W_enc": [D_IN, D_SAE],
        "b_enc": [D_SAE],
        "W_dec": [D_SAE, D_IN],
        "b_dec": [D_IN],
    }
    make_sae("relu").save(tmp_path / "relu")
    assert json.loads((tmp_path / "relu" / "cfg.json").read_text())["architecture"] == "standard"


def test_save_folds_norm_scaling_factor(tmp_path: Path) -> None:
    sae = make_sae(
        "jumprelu", normalize_activations="expected_average_only_in", norm_scaling_factor=3.0
    )
    x = inputs()
    sae.save(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["normalize_activations"] == "none"
    assert cfg["metadata"]["norm_scaling_factor_folded"] == 3.0
    assert sae.cfg.norm_scaling_factor == 3.0  # the live module is untouched
    loaded = SAE.load(tmp_path)
    torch.testing.assert_close(loaded.encode(x), sae.encode(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loaded(x), sae(x), atol=1e-5, rtol=1e-5)


def test_unserialisable_metadata_fails_before_writing(tmp_path: Path) -> None:
    sae = make_sae("relu", metadata={"bad": object()})
    with pytest.raises(ConfigError, match="cannot be written to cfg.json"):
        sae.save(tmp_path / "sae")
    assert list((tmp_path / "sae").iterdir()) == []


def test_load_overrides_hook_and_dtype(tmp_path: Path) -> None:
    make_sae("relu", hook_name="blocks.1.hook_resid_post").save(tmp_path)
    sae = SAE.load(tmp_path / "cfg.json", hook_name="blocks.2.hook_mlp_out", dtype="float64")
    assert sae.cfg.hook_name == "blocks.2.hook_mlp_out" and sae.dtype == torch.float64


# --- validation -------------------------------------------------------------------------------


def test_unknown_architecture_lists_allowed_values() -> None:
    with pytest.raises(
        ConfigError, match="unknown SAE architecture 'gated'.*relu, topk, batchtopk, jumprelu"
    ):
        SAEConfig(architecture="gated", d_in=4, d_sae=8)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"architecture": "topk", "k": None}, "needs k"),
        ({"architecture": "topk", "k": 100}, "between 1 and d_sae=8"),
        ({"architecture": "topk", "k": 2.5}, "integer"),
        ({"architecture": "relu", "d_sae": 0}, "d_sae must be a positive integer"),
        (
            {"architecture": "relu", "normalize_activations": "layer_norm"},
            "allowed: none, expected_average_only_in",
        ),
        ({"architecture": "relu", "norm_scaling_factor": 2.0}, "use 'expected_average_only_in'"),
        (
            {
                "architecture": "relu",
                "normalize_activations": "expected_average_only_in",
                "norm_scaling_factor": -1.0,
            },
            "positive number",
        ),
        ({"architecture": "relu", "dtype": "int8"}, "dtype 'int8' not supported"),
    ],
)
def test_bad_config_values_are_named(kwargs: dict, message: str) -> None:
    args = {"d_in": 4, "d_sae": 8, **kwargs}
    with pytest.raises(ConfigError, match=message):
        SAEConfig(**args)


def _write_folder(tmp_path: Path, tensors: dict[str, torch.Tensor], **cfg: object) -> Path:
    body = {
        "architecture": "jumprelu",
        "d_in": D_IN,
        "d_sae": D_SAE,
        "metadata": {"sae_lens_version": "6.1.0"},
        **cfg,
    }
    (tmp_path / "cfg.json").write_text(json.dumps(body))
    save_file(tensors, str(tmp_path / "sae_weights.safetensors"))
    return tmp_path


def test_shape_mismatch_names_file_and_tensor(tmp_path: Path) -> None:
    tensors = {k: v.detach().clone() for k, v in make_sae("jumprelu").state_dict().items()}
    tensors["W_dec"] = torch.zeros(D_SAE, D_IN + 1)
    _write_folder(tmp_path, tensors)
    with pytest.raises(
        ConfigError,
        match=r"sae_weights\.safetensors: tensor 'W_dec' has shape "
        r"\[40, 13\], expected \[40, 12\]",
    ):
        SAE.load(tmp_path)


def test_nan_and_inf_weights_name_the_tensor(tmp_path: Path) -> None:
    tensors = {k: v.detach().clone() for k, v in make_sae("jumprelu").state_dict().items()}
    tensors["b_enc"][3] = float("nan")
    tensors["threshold"][0] = math.inf
    _write_folder(tmp_path, tensors)
    with pytest.raises(ConfigError, match="tensor 'b_enc' has 1 NaN/Inf values"):
        SAE.load(tmp_path)


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    tensors = {k: v.detach().clone() for k, v in make_sae("relu").state_dict().items()}
    _write_folder(tmp_path, tensors)  # cfg says jumprelu, no threshold saved
    with pytest.raises(ConfigError, match="missing tensor 'threshold'"):
        SAE.load(tmp_path)


def test_missing_path_and_unknown_folder(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="does not exist"):
        SAE.load(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(
        ConfigError,
        match=r"cfg\.json \+ sae_weights\.safetensors.*params\.npz"
        r".*hyperparams\.json.*Found: notes\.txt",
    ):
        SAE.load(tmp_path)


def test_check_compatible() -> None:
    sae = make_sae("relu", hook_name="blocks.3.hook_resid_post", model_name="tiny-llama")
    sae.check_compatible(d_model=D_IN, hook_name="blocks.3.hook_resid_post")
    sae.check_compatible(d_model=D_IN)
    with pytest.raises(
        ConfigError, match="d_in=12 does not match the width 576 of blocks.3.hook_resid_post"
    ):
        sae.check_compatible(d_model=576, hook_name="blocks.3.hook_resid_post")
    with pytest.raises(
        ConfigError, match="trained on hook blocks.3.hook_resid_post, not blocks.4.hook_resid_post"
    ):
        sae.check_compatible(d_model=D_IN, hook_name="blocks.4.hook_resid_post")
