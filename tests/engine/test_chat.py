"""Chat prompts and replies on the engine (tiny random Llama; a chat template set on a copy of its
tokenizer for the template path): the transcript, the prompt token limit, stop strings held
back across pieces, one forward per step, and the finish reasons."""

from __future__ import annotations

import copy

import pytest
import torch

from app.engine import chat
from app.engine.generate import Generation
from app.engine.tiny import build_tiny

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi fox"}]
TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}[assistant] {% endif %}")


@pytest.fixture(scope="module")
def lm():
    return build_tiny("tiny-llama")


@pytest.fixture(scope="module")
def templated():
    model = build_tiny("tiny-llama")
    model.tokenizer = copy.deepcopy(model.tokenizer)
    model.tokenizer.chat_template = TEMPLATE
    model.has_chat_template = True
    return model


def test_transcript_and_its_prompt(lm):
    text = chat.transcript([*MESSAGES, {"role": "developer", "content": "x"}])
    assert text == "System: Be brief.\n\nUser: Hi fox\n\nSystem: x\n\nAssistant:"
    ids = chat.prompt_ids(lm, MESSAGES, max_tokens=100)
    assert ids == lm.tokenize(chat.transcript(MESSAGES), prepend_bos=True)


def test_chat_template_prompt_and_developer_role(templated):
    messages = [{"role": "developer", "content": "Be brief."}, MESSAGES[1]]
    ids = chat.prompt_ids(templated, messages, max_tokens=100)
    assert templated.decode(ids) == "[system] Be brief.\n[user] Hi fox\n[assistant] "


def test_prompt_over_the_limit_names_the_limit(lm):
    with pytest.raises(chat.PromptTooLongError, match=r"the limit is 5 \(SOMEWHERE\)"):
        chat.prompt_ids(lm, MESSAGES, max_tokens=5, limit_name="SOMEWHERE")
    with pytest.raises(chat.PromptTooLongError):
        list(chat.chat_steps(lm, MESSAGES, max_new_tokens=4, max_prompt_tokens=3))


def test_refused_template_is_a_config_error(templated):
    refusing = copy.copy(templated)
    refusing.tokenizer = copy.deepcopy(templated.tokenizer)
    refusing.tokenizer.chat_template = "{{ raise_exception('no system role') }}"
    with pytest.raises(chat.ConfigError, match="chat template refused these messages: "
                                                "no system role"):
        chat.prompt_ids(refusing, MESSAGES, max_tokens=100)


@pytest.mark.parametrize(("pieces", "stops", "emitted", "stopped"), [
    (["1a", "2x", "xy", "a", "b", "c"], ["ab", "xyz"], ["1", "a2", "x", "xy", "", ""], True),
    (["hello", " wor", "ld"], ["\nUser:"], ["hello", " wor", "ld"], False),
    (["ok\n", "Us", "er: more"], ["\nUser:"], ["ok", "", ""], True),
    (["aab"], ["ab"], ["a"], True),
])
def test_stop_scanner_holds_back_possible_starts(pieces, stops, emitted, stopped):
    scanner = chat.StopScanner(stops)
    assert [scanner.feed(p) for p in pieces] == emitted
    assert scanner.stopped is stopped


def test_reply_steps_one_forward_each_and_the_same_tokens_as_generation(lm):
    ids = chat.prompt_ids(lm, MESSAGES, max_tokens=100)
    forwards = []
    handle = lm.hf_model.register_forward_hook(lambda *a: forwards.append(1))
    try:
        items = list(chat.reply_steps(lm, ids, max_new_tokens=10))
    finally:
        handle.remove()
    assert len(forwards) == len(items)
    assert [i["finish_reason"] for i in items] == [None] * (len(items) - 1) + [
        items[-1]["finish_reason"]]
    expected = Generation(lm, max_new_tokens=10, stop_ids=chat.stop_token_ids(lm)).run([ids])[0]
    text = "".join(i["text"] for i in items)
    ended_on_stop = expected[-1] in chat.stop_token_ids(lm)
    assert text == lm.decode(expected[:-1] if ended_on_stop else expected)
    assert items[-1]["completion_tokens"] == len(expected) - ended_on_stop
    assert items[-1]["finish_reason"] == ("stop" if ended_on_stop else "length")
    assert items[-1]["prompt_tokens"] == len(ids)


def test_stop_string_and_max_tokens_finish_reasons(lm):
    whole = chat.reply(lm, MESSAGES, max_new_tokens=20)
    assert whole["finish_reason"] == "length" and whole["completion_tokens"] == 20
    stop = whole["text"][5:8]
    cut = chat.reply(lm, MESSAGES, max_new_tokens=20, stop=[stop])
    assert cut["text"] == whole["text"][:whole["text"].index(stop)]
    assert cut["finish_reason"] == "stop"


def test_seeded_sampling_repeats_and_context_caps_max_tokens(lm):
    one = chat.reply(lm, MESSAGES, max_new_tokens=12, temperature=1.0, seed=5)
    assert one == chat.reply(lm, MESSAGES, max_new_tokens=12, temperature=1.0, seed=5)
    # max_new_tokens past the model's 512 positions: cut to what fits, no error.
    long = [{"role": "user", "content": "fox " * 200}]
    ids = chat.prompt_ids(lm, long, max_tokens=511)
    with torch.inference_mode():
        last = list(chat.reply_steps(lm, ids, max_new_tokens=4000))[-1]
    assert last["completion_tokens"] <= lm.n_ctx - len(ids)


def test_end_of_turn_tokens_stop_too(templated):
    assert chat.stop_token_ids(templated) >= templated.eos_token_ids
    vocab = templated.tokenizer.get_vocab()
    assert vocab["<|endoftext|>"] in chat.stop_token_ids(templated)


@pytest.mark.parametrize("model", ["lm", "templated"])
def test_reply_start_is_written_into_the_prompt_and_left_out_of_the_reply(model, request):
    lm = request.getfixturevalue(model)
    ids = chat.prompt_ids(lm, MESSAGES, max_tokens=100)
    start_ids = lm.tokenize("[" if lm.has_chat_template else " [", prepend_bos=False)
    continued = Generation(lm, max_new_tokens=8, stop_ids=chat.stop_token_ids(lm)).run(
        [ids + start_ids])[0]
    out = chat.reply(lm, MESSAGES, max_new_tokens=8, reply_start="[")
    assert out["prompt_tokens"] == len(ids) + len(start_ids)
    ended_on_stop = continued[-1] in chat.stop_token_ids(lm)
    expected = lm.decode(continued[:-1] if ended_on_stop else continued)
    # a transcript's reply loses a leading space only when nothing was written before it
    assert out["text"] == expected
    assert out["text"] != chat.reply(lm, MESSAGES, max_new_tokens=8)["text"]
