"""Steering interventions on the tiny models: each mode's exact effect at the hook, scoped to
positions and rows; the error term kept by clamping; cached against uncached steered logits;
contrastive activation addition."""

from __future__ import annotations

import pytest
import torch

from app.engine.generate import Generation, KVDecoder
from app.engine.hooks import PositionContext
from app.engine.sae import SAE, SAEConfig
from app.engine.steering import (
    FeatureEdit,
    FeatureProbe,
    Steering,
    VectorEdit,
    aligned_features,
    caa_vector,
    chain_hooks,
    feature_direction,
)
from app.engine.tiny import build_tiny
from app.errors import ConfigError

HOOK = "blocks.1.hook_resid_post"
HOOK2 = "blocks.2.hook_mlp_out"
PROMPT_LEN = 6
FORCED = [7, 11, 13, 17]


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gemma3"])
def lm(request):
    return build_tiny(request.param)


def random_sae(lm, *, hook=HOOK, seed=0, d_sae=48, scale: float | None = 2.5,
               architecture: str = "topk") -> SAE:
    """A TopK SAE (or another architecture: thresholds a little above 0) with a nonzero b_dec
    and, by default, input normalisation, so the edits must answer in the model's units."""
    cfg = SAEConfig(architecture=architecture, d_in=lm.d_model, d_sae=d_sae,
                    k=8 if architecture in ("topk", "batchtopk") else None, hook_name=hook,
                    normalize_activations="expected_average_only_in" if scale else "none",
                    norm_scaling_factor=scale)
    sae = SAE.from_config(cfg, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        sae.b_dec.copy_(0.3 * torch.randn(lm.d_model, generator=gen))
        sae.W_dec.mul_(1 + torch.rand(d_sae, 1, generator=gen))  # rows of assorted norms
        if sae.threshold is not None:
            sae.threshold.copy_(0.1 * torch.rand(d_sae, generator=gen))
    return sae.eval()


def orthonormal_sae(lm, *, fires: int, scale: float = 2.0) -> SAE:
    """A ReLU SAE whose encoder is the transpose of orthonormal decoder rows. Feature ``fires``
    gets a large encoder bias, so it is active everywhere and its code is its pre-activation."""
    d_sae = 16
    cfg = SAEConfig(architecture="relu", d_in=lm.d_model, d_sae=d_sae, hook_name=HOOK,
                    normalize_activations="expected_average_only_in", norm_scaling_factor=scale)
    gen = torch.Generator().manual_seed(4)
    q, _ = torch.linalg.qr(torch.randn(lm.d_model, d_sae, generator=gen))
    b_enc = torch.zeros(d_sae)
    b_enc[fires] = 50.0
    tensors = {"W_enc": q, "W_dec": q.T.contiguous(), "b_enc": b_enc,
               "b_dec": 0.1 * torch.ones(lm.d_model)}
    return SAE.from_tensors(cfg, tensors)


def prompt(lm) -> list[int]:
    return lm.tokenize("def add(a, b):")[:PROMPT_LEN]


def edited_activations(lm, steering: Steering, *, hook=HOOK, rows=2):
    """Teacher-forced cached run of `rows` copies of the prompt; per forward, the activation at
    the hook before and after the steering hook."""
    before, after = [], []
    hooks = chain_hooks({hook: lambda t, p: before.append(t.clone())}, steering.hooks(),
                        {hook: lambda t, p: after.append(t.clone())})
    decoder = KVDecoder(lm, hooks=hooks)
    decoder.prefill([prompt(lm)] * rows)
    for token in FORCED:
        decoder.feed([token] * rows)
    return torch.cat(before, dim=1), torch.cat(after, dim=1)


def scope_mask(scope: str) -> torch.Tensor:
    n = PROMPT_LEN + len(FORCED)
    generated = torch.arange(n) >= PROMPT_LEN
    return {"all": torch.ones(n, dtype=torch.bool), "prompt": ~generated,
            "generated": generated}[scope]


@pytest.mark.parametrize("scope", ["all", "prompt", "generated"])
def test_add_moves_the_activation_by_value_times_the_decoder_row_at_scoped_positions(lm, scope):
    sae = random_sae(lm)
    steering = Steering([FeatureEdit(sae=sae, index=5, mode="add", value=3.0)], scope=scope,
                        rows=[1])
    before, after = edited_activations(lm, steering)
    # In the model's units: the decoder row undoes the input scaling.
    direction = sae.decode(torch.eye(sae.cfg.d_sae)[5]) - sae.decode(torch.zeros(sae.cfg.d_sae))
    torch.testing.assert_close(feature_direction(sae, 5), direction)
    mask = scope_mask(scope)
    delta = after - before
    torch.testing.assert_close(delta[1, mask], (3.0 * direction).expand(int(mask.sum()), -1),
                               atol=1e-5, rtol=1e-5)
    assert bool((delta[1, ~mask] == 0).all())  # other positions untouched
    assert bool((delta[0] == 0).all())  # the default row untouched


@pytest.mark.parametrize("architecture", ["topk", "relu", "jumprelu"])
@pytest.mark.parametrize("mode,value", [("clamp", 4.0), ("multiply", 3.0), ("ablate", 0.0)])
def test_encoded_edits_keep_the_error_term(lm, mode, value, architecture):
    """Against the full encode: clamp, multiply and ablate compute only the edited latent
    (SAE.encode_latents: one encoder column for relu / jumprelu), with the same result."""
    sae = random_sae(lm, architecture=architecture)
    with torch.no_grad():
        f0 = sae.encode(edited_activations(lm, Steering([]))[0][1])
    index = int((f0 > 0).sum(0).argmax())  # a feature that fires somewhere
    steering = Steering([FeatureEdit(sae=sae, index=index, mode=mode, value=value)],
                        scope="generated", rows=[1])
    before, after = edited_activations(lm, steering)
    x, x_new = before[1], after[1]
    with torch.no_grad():
        f = sae.encode(x)
        f_new = f.clone()
        f_new[:, index] = {"clamp": value, "multiply": f[:, index] * value, "ablate": 0.0}[mode]
        mask = scope_mask("generated")
        f_new[~mask] = f[~mask]
        torch.testing.assert_close(x_new - sae.decode(f_new), x - sae.decode(f), atol=1e-5,
                                   rtol=1e-5)
    assert bool((x_new[~mask] == x[~mask]).all())
    assert bool((after[0] == before[0]).all())


@pytest.mark.parametrize("mode,value,target", [("clamp", 3.0, lambda f: 3.0),
                                               ("multiply", 0.5, lambda f: 0.5 * f),
                                               ("ablate", 0.0, lambda f: 0.0 * f)])
def test_an_orthonormal_sae_re_encodes_the_feature_at_the_target(lm, mode, value, target):
    sae = orthonormal_sae(lm, fires=3)
    steering = Steering([FeatureEdit(sae=sae, index=3, mode=mode, value=value)], rows=[1])
    before, after = edited_activations(lm, steering)
    with torch.no_grad():
        original, realised = sae.encode(before[1])[:, 3], sae.encode(after[1])[:, 3]
    expected = torch.as_tensor(target(original), dtype=original.dtype).expand_as(original)
    torch.testing.assert_close(realised, expected, atol=1e-4, rtol=1e-4)


def test_several_saes_at_several_hooks_and_a_raw_vector_in_one_run(lm):
    first, second = random_sae(lm, seed=1), random_sae(lm, hook=HOOK2, seed=2, scale=None)
    vector = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(9))
    steering = Steering([FeatureEdit(sae=first, index=2, mode="add", value=2.0),
                         VectorEdit(hook_name=HOOK, vector=vector, value=-1.5),
                         FeatureEdit(sae=second, index=7, mode="add", value=4.0)], rows=[1])
    assert sorted(steering.hooks()) == sorted([HOOK, HOOK2])
    before, after = edited_activations(lm, steering)
    want = 2.0 * feature_direction(first, 2) - 1.5 * vector
    torch.testing.assert_close(after[1] - before[1], want.expand_as(before[1]), atol=1e-5,
                               rtol=1e-5)
    before2, after2 = edited_activations(lm, steering, hook=HOOK2)
    torch.testing.assert_close(after2[1] - before2[1],
                               (4.0 * second.W_dec[7]).expand_as(before2[1]), atol=1e-5,
                               rtol=1e-5)


def test_edits_are_checked():
    lm = build_tiny("tiny-llama")
    sae = random_sae(lm)
    for bad in (dict(index=48, mode="add"), dict(index=-1, mode="add"),
                dict(index=0, mode="boost"), dict(index=0, mode="add", value=float("inf")),
                dict(index=0, mode="clamp", value=float("nan"))):
        with pytest.raises(ConfigError):
            FeatureEdit(sae=sae, **bad)
    with pytest.raises(ConfigError, match="scope"):
        Steering([], scope="later")


@pytest.mark.parametrize("scope", ["all", "prompt", "generated"])
def test_cached_steered_logits_match_uncached_forwards(lm, scope):
    """Teacher forcing: each cached step against a fresh forward over the whole sequence with the
    same steering (its positions say which tokens were generated)."""
    sae = random_sae(lm)
    steering = Steering([FeatureEdit(sae=sae, index=4, mode="add", value=6.0),
                         FeatureEdit(sae=sae, index=9, mode="clamp", value=2.0)],
                        scope=scope, rows=[1])
    ids = prompt(lm)
    decoder = KVDecoder(lm, hooks=steering.hooks())
    cached = [decoder.prefill([ids, ids])] + [decoder.feed([t, t]) for t in FORCED]
    for k, logits in enumerate(cached):
        seq = torch.tensor([ids + FORCED[:k]] * 2)
        positions = PositionContext(positions=torch.arange(seq.shape[1]), prompt_len=PROMPT_LEN)
        with lm.hooks(steering.hooks(), positional=True):
            full = lm.cached_logits(seq, cache=lm.new_cache(), positions=positions)
        torch.testing.assert_close(logits, full, atol=1e-4, rtol=1e-4)
    # The steering changed the steered row wherever its scope had reached.
    unsteered = KVDecoder(lm)
    plain = [unsteered.prefill([ids])] + [unsteered.feed([t]) for t in FORCED]
    for k, (got, want) in enumerate(zip(cached, plain, strict=True)):
        torch.testing.assert_close(got[0], want[0], atol=1e-4, rtol=1e-4)
        touched = scope != "generated" or k > 0
        assert bool((got[1] - want[0]).abs().max() > 1e-3) == touched, (scope, k)


def test_steered_greedy_generation_is_deterministic(lm):
    sae = random_sae(lm)
    steering = Steering([FeatureEdit(sae=sae, index=4, mode="add", value=40.0)], rows=[1])
    ids = prompt(lm)
    runs = [Generation(lm, max_new_tokens=10, stop_ids=(), hooks=steering.hooks()).run([ids, ids])
            for _ in range(2)]
    assert runs[0] == runs[1]
    assert runs[0][0] != runs[0][1]  # the steered stream differs from the default one


def test_a_probe_reads_the_realised_activation_on_generated_tokens(lm):
    sae = orthonormal_sae(lm, fires=3)
    steering = Steering([FeatureEdit(sae=sae, index=3, mode="clamp", value=5.0)],
                        scope="generated", rows=[1, 2])
    probe = FeatureProbe(sae, 3)
    gen = Generation(lm, max_new_tokens=5, stop_ids=(),
                     hooks=chain_hooks(steering.hooks(), {HOOK: probe.hook}))
    gen.run([prompt(lm)] * 3)
    means = probe.mean()
    assert len(probe.values) == 4  # the last chosen token is never fed
    assert means[1] == pytest.approx(5.0, abs=1e-4) and means[2] == pytest.approx(5.0, abs=1e-4)
    assert means[0] != pytest.approx(5.0, abs=1e-2)


def test_caa_vector_is_the_mean_difference_without_bos(lm):
    positive = [lm.tokenize("The quick brown fox"), lm.tokenize("for i in range(10):")]
    negative = [lm.tokenize("def add(a, b):")]

    def read(ids, position):
        acts = lm.run_to_hook(ids, HOOK)[0]
        return acts[-1] if position == "last" else acts[1:].mean(0)  # BOS is position 0

    for position in ("last", "mean"):
        got = caa_vector(lm, hook_name=HOOK, positive=positive, negative=negative,
                         position=position)
        want = (read(positive[0], position) + read(positive[1], position)) / 2 - read(
            negative[0], position)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError):
        caa_vector(lm, hook_name=HOOK, positive=positive, negative=[], position="last")
    with pytest.raises(ConfigError):
        caa_vector(lm, hook_name=HOOK, positive=[[lm.bos_token_id]], negative=negative,
                   position="mean")


def test_aligned_features_rank_decoder_rows_by_cosine(lm):
    sae = random_sae(lm)
    found = aligned_features(7.0 * sae.W_dec[11], sae, top_k=3)
    assert found[0][0] == 11 and found[0][1] == pytest.approx(1.0, abs=1e-5)
    assert len(found) == 3 and found[1][1] <= found[0][1]
