"""Cached generation: the KV-cached step path against full forwards, positional hooks scoped to
prompt or generated tokens, seeded sampling over a batch of streams, stopping."""

from __future__ import annotations

import pytest
import torch

from app.engine.generate import Generation, KVDecoder, top_p_filter
from app.engine.hooks import PositionContext
from app.engine.loading import load_model
from app.engine.tiny import build_tiny
from app.errors import ConfigError
from app.settings import get_settings

HOOK = "blocks.1.hook_resid_post"
PROMPT_LEN = 6


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gemma3"])
def lm(request):
    return build_tiny(request.param)


def prompts(lm, n: int = 2) -> list[list[int]]:
    texts = ["def add(a, b):", "The quick brown fox", "for i in range(10):"]
    return [lm.tokenize(text)[:PROMPT_LEN] for text in texts[:n]]


def test_cached_steps_give_the_logits_of_full_forwards(lm):
    """Teacher forcing: the same tokens fed one step at a time on the cache, or all at once
    without it. 12 steps run past tiny-gemma3's sliding window of 8, so its window cache counts."""
    ids = torch.tensor(prompts(lm))
    forced = torch.randint(3, lm.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    decoder = KVDecoder(lm)
    cached = [decoder.prefill(ids)] + [decoder.feed(forced[:, k]) for k in range(12)]
    full = lm.logits(torch.cat([ids, forced], dim=1))
    assert (decoder.prompt_len, decoder.length, decoder.step) == (PROMPT_LEN, PROMPT_LEN + 12, 12)
    for k, logits in enumerate(cached):
        assert logits.shape == (2, lm.vocab_size)
        torch.testing.assert_close(logits, full[:, PROMPT_LEN - 1 + k], atol=1e-4, rtol=1e-4)


def test_generation_chooses_from_the_cached_logits(lm):
    """Greedy generation takes the argmax of the step logits, which match full forwards."""
    gen = Generation(lm, max_new_tokens=6)
    ids = prompts(lm)
    chosen = gen.prefill(ids)
    logits = [gen.logits]
    while not gen.done:
        chosen = gen.step()
        logits.append(gen.logits)
    assert [len(t) for t in gen.tokens] == [6, 6] and chosen == [t[-1] for t in gen.tokens]
    full = lm.logits(torch.cat([torch.tensor(ids), torch.tensor(gen.tokens)[:, :-1]], dim=1))
    for k, step_logits in enumerate(logits):
        torch.testing.assert_close(step_logits, full[:, PROMPT_LEN - 1 + k], atol=1e-4,
                                   rtol=1e-4)
        assert step_logits.argmax(-1).tolist() == [t[k] for t in gen.tokens]


def test_hooks_see_positions_of_prefill_and_steps(lm):
    seen = []

    def record(t, positions: PositionContext):
        seen.append((tuple(t.shape), positions.positions.tolist(), positions.generated.tolist(),
                     positions.step))

    Generation(lm, max_new_tokens=4, hooks={HOOK: record}).run(prompts(lm))
    d = lm.d_model
    assert seen == [
        ((2, PROMPT_LEN, d), list(range(PROMPT_LEN)), [False] * PROMPT_LEN, 0),
        ((2, 1, d), [PROMPT_LEN], [True], 1),
        ((2, 1, d), [PROMPT_LEN + 1], [True], 2),
        ((2, 1, d), [PROMPT_LEN + 2], [True], 3),
    ]
    # The generation's hooks were attached around its own forwards only.
    seen.clear()
    lm.logits(prompts(lm))
    assert seen == []


def test_positional_hooks_on_a_plain_forward_see_a_whole_prompt(lm):
    seen = []

    def record(t, positions: PositionContext):
        seen.append((positions.positions.tolist(), positions.prompt_len, positions.step))

    with lm.hooks({HOOK: record}, positional=True):
        lm.run_to_hook(prompts(lm), HOOK)
    assert seen == [(list(range(PROMPT_LEN)), PROMPT_LEN, 0)]


def test_scoped_intervention_on_one_stream(lm):
    """Default beside steered: the same prompt twice, a direction added to stream 1 only, at
    the generated positions only (or at the prompt only)."""
    direction = 4.0 * torch.randn(lm.d_model, generator=torch.Generator().manual_seed(1))

    def steer(scope):
        def fn(t, positions: PositionContext):
            out = t.clone()
            out[1] += direction * positions.mask(scope)
            return out

        return fn

    prompt = prompts(lm, 1)[0]
    plain = KVDecoder(lm)
    forced = [7, 11, 13]
    plain_logits = [plain.prefill([prompt])] + [plain.feed([t]) for t in forced]

    for scope in ("generated", "prompt", "all"):
        steered = KVDecoder(lm, hooks={HOOK: steer(scope)})
        logits = [steered.prefill([prompt, prompt])] + [steered.feed([t, t]) for t in forced]
        for k, (got, want) in enumerate(zip(logits, plain_logits, strict=True)):
            torch.testing.assert_close(got[0], want[0], atol=1e-4, rtol=1e-4)  # default stream
            touched = scope != "generated" or k > 0  # the prefill holds only prompt tokens
            assert ((got[1] - want[0]).abs().max() > 1e-3) == touched, (scope, k)


def test_same_seed_same_tokens_and_identical_streams_agree(lm):
    ids = prompts(lm, 1)[0]
    sample = dict(max_new_tokens=12, temperature=1.0, top_p=0.95)
    first = Generation(lm, seed=5, **sample).run([ids, ids])
    again = Generation(lm, seed=5, **sample).run([ids])
    other = Generation(lm, seed=6, **sample).run([ids])
    assert first[0] == first[1] == again[0]
    assert other[0] != first[0]
    assert len(first[0]) == 12


def test_a_stream_stops_at_a_stop_token_and_the_others_go_on(lm):
    ids = prompts(lm)
    free = Generation(lm, max_new_tokens=10, stop_ids=()).run(ids)
    # A token stream 0 generates that stream 1 never does.
    j, stop = next((j, t) for j, t in enumerate(free[0]) if t not in free[1])
    gen = Generation(lm, max_new_tokens=10, stop_ids={stop})
    steps = [gen.prefill(ids)]
    while not gen.done:
        steps.append(gen.step())
    assert gen.tokens == [free[0][: j + 1], free[1]]
    assert [s[0] for s in steps] == free[0][: j + 1] + [None] * (9 - j)
    assert [s[1] for s in steps] == free[1]
    with pytest.raises(RuntimeError, match="done"):
        gen.step()


def test_eos_stops_by_default(lm):
    assert lm.eos_token_ids == {2}
    gen = Generation(lm, max_new_tokens=3)
    assert gen.stop_ids == {2}


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.1, 0.5, 0.15, 0.25])
    torch.testing.assert_close(top_p_filter(probs, 0.7), torch.tensor([0, 2 / 3, 0, 1 / 3]))
    torch.testing.assert_close(top_p_filter(probs, 0.75), torch.tensor([0, 2 / 3, 0, 1 / 3]))
    torch.testing.assert_close(top_p_filter(probs, 0.01), torch.tensor([0.0, 1, 0, 0]))
    torch.testing.assert_close(top_p_filter(probs, 1.0), probs)


def test_bad_requests_fail_clearly():
    lm = build_tiny("tiny-llama")
    for bad in (dict(max_new_tokens=0), dict(temperature=-1.0), dict(top_p=0.0),
                dict(top_p=1.5)):
        with pytest.raises(ConfigError):
            Generation(lm, **bad)
    with pytest.raises(ConfigError, match="512 positions"):
        Generation(lm, max_new_tokens=510).prefill(lm.tokenize("def add(a, b):"))
    with pytest.raises(ConfigError, match="one prompt length"):
        Generation(lm).prefill([[1, 5, 6], [1, 5]])
    with pytest.raises(RuntimeError, match="prefill"):
        Generation(lm).step()
    with pytest.raises(ConfigError, match="unknown position scope"):
        PositionContext.prompt(3).mask("everywhere")


@pytest.mark.integration
def test_smollm2_cached_greedy_matches_full_forwards():
    lm = load_model("smollm2-135m", cache_dir=get_settings().cache_dir)
    ids = lm.tokenize("The Python standard library is")
    cached = Generation(lm, max_new_tokens=16, stop_ids=()).run([ids])[0]
    uncached = list(ids)
    for _ in range(16):
        uncached.append(int(lm.logits([uncached])[0, -1].argmax()))
    assert cached == uncached[len(ids):]
