"""The LLM explainer's prompts (marked tokens, interval samples across bands, logit effects),
its answer cleaning, a scripted backend, the store's feature read as input, and the local
backend on the tiny model (and, marked integration, on the default model)."""

from __future__ import annotations

import pytest
import torch

from app.engine.chat import PromptTooLongError
from app.engine.tiny import build_tiny
from app.errors import ConfigError
from app.pipeline.autointerp.backends import ChatOptions
from app.pipeline.autointerp.feature_data import FeatureData, LogitEffect, Window
from app.pipeline.autointerp.llm_explainer import (
    ExplainOptions,
    clean_explanation,
    explain_messages,
    llm_explain,
    mark_window,
)
from app.pipeline.autointerp.local_backend import LocalBackend
from app.pipeline.autointerp.usage import TokenBudgetExceeded
from app.store.db import make_engine, read_session
from app.store.queries import get_feature
from tests.factories import synthetic_database, synthetic_run


def fox_window(value: float = 5.0, *, kind: str = "top", band: int | None = None) -> Window:
    return Window.of([" the", " quick", " brown", " fox", "\n", " jumps"],
                     [0.0, 0.0, value / 2, value, 0.0, 0.0], kind=kind, band=band)  # type: ignore[arg-type]


FEATURE = FeatureData(
    sae_id="2-res-topk-128", index=7,
    top=(fox_window(9.0), fox_window(8.0)),
    intervals=(fox_window(1.0, kind="interval", band=0), fox_window(2.0, kind="interval", band=1),
               fox_window(1.5, kind="interval", band=0)),
    promoted=(LogitEffect(" dog", 2.5), LogitEffect("\n", 1.0)),
    suppressed=(LogitEffect(" cat", -1.5),), max_act=9.0, frac_nonzero=0.01)


class Scripted:
    """Answers with fixed text and records what it was asked."""

    name = "scripted"

    def __init__(self, answer: str) -> None:
        self.answer = answer
        self.asked: list[tuple[list, ChatOptions]] = []

    def complete(self, messages, options):
        self.asked.append((list(messages), options))
        return self.answer


def test_marks_runs_with_their_leading_space_outside():
    assert mark_window(fox_window()) == "the quick <<brown fox>>\\n jumps"
    assert mark_window(fox_window(), mark_fraction=0.6) == "the quick brown <<fox>>\\n jumps"
    assert mark_window(Window.of([" a", " b"], [1.0, 0.0])) == "<<a>> b"
    assert mark_window(Window.of(["a", "b"], [0.0, 0.0])) == "ab"


def test_activation_prompt_shows_marked_top_and_interval_examples():
    messages = explain_messages(FEATURE)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert "<<" in messages[0]["content"] and ">>" in messages[0]["content"]
    question = messages[-1]["content"]
    assert question.count("<<brown fox>>") == 5  # 2 top + 3 interval windows
    top, less = question.split("less active")
    assert top.count("<<") == 2 and less.count("<<") == 3
    # Interval samples in turn from each band, the highest first.
    first_interval = less.splitlines()[1]
    assert first_interval.startswith("3. ")
    no_shot = explain_messages(FEATURE, ExplainOptions(few_shot=False, n_top=1, n_intervals=0))
    assert [m["role"] for m in no_shot] == ["system", "user"]
    assert no_shot[-1]["content"].count("<<") == 1


def test_windows_are_cut_around_their_peak_and_values_can_be_shown():
    long = Window.of([f" w{i}" for i in range(100)], [0.0] * 60 + [4.0] + [0.0] * 39)
    feature = FeatureData(sae_id="s", index=1, top=(long,), max_act=8.0)
    question = explain_messages(feature, ExplainOptions(before=3, after=2, show_values=True))[-1]
    assert " w57 w58 w59 <<w60>> w61 w62\n" in question["content"]
    assert "w56" not in question["content"] and "w63" not in question["content"]
    assert "activations: ' w60' 5" in question["content"]  # 4 of a max of 8 on a 0-10 scale


def test_output_prompt_lists_promoted_and_suppressed_tokens():
    question = explain_messages(FEATURE, ExplainOptions(style="output"))[-1]["content"]
    assert "more likely: ' dog', '\\n'" in question
    assert "less likely: ' cat'" in question
    assert "<<" not in question


def test_features_without_data_are_refused_clearly():
    empty = FeatureData(sae_id="s", index=3)
    with pytest.raises(ConfigError, match="feature 3 of s has no window where it fires"):
        explain_messages(empty)
    with pytest.raises(ConfigError, match="no logit effects"):
        explain_messages(empty, ExplainOptions(style="output"))


@pytest.mark.parametrize(("answer", "cleaned"), [
    ("Explanation: the word <<fox>>.\nMore text", "the word fox"),
    ("\n\n**\"animal names\"**", "animal names"),
    ("<think>it is about foxes\nreally</think>\nThe feature responds to: fox mentions",
     "fox mentions"),
    ("1. [EXPLANATION]: nouns after 'the'", "nouns after 'the'"),
    ("   ", ""),
    ("word " * 100, ("word " * 39).strip() + "…"),
])
def test_answers_are_cleaned_to_one_line(answer, cleaned):
    assert clean_explanation(answer, max_chars=200) == cleaned


def test_llm_explain_asks_the_backend_and_cleans_its_answer():
    backend = Scripted("Explanation: the animal <<fox>> in stories.\nSecond line")
    options = ChatOptions(max_tokens=20, temperature=0.5, seed=3)
    assert llm_explain(FEATURE, backend, options) == "the animal fox in stories"
    messages, used = backend.asked[0]
    assert used == options
    assert "<<brown fox>>" in messages[-1]["content"]


class SmallContext(Scripted):
    """Refuses prompts over `limit` characters as the engine does (PromptTooLongError)."""

    def __init__(self, limit: int) -> None:
        super().__init__("fox words")
        self.limit = limit

    def complete(self, messages, options):
        self.asked.append((list(messages), options))
        size = sum(len(m["content"]) for m in messages)
        if size > self.limit:
            raise PromptTooLongError(f"{size} characters")
        return self.answer


def test_a_prompt_over_the_context_is_asked_again_shorter():
    long = FeatureData(sae_id="s", index=1, top=tuple(
        Window.of([f" w{i}" for i in range(60)], [0.0] * 30 + [2.0] + [0.0] * 29)
        for _ in range(10)))
    backend = SmallContext(limit=900)
    assert llm_explain(long, backend) == "fox words"
    sizes = [sum(len(m["content"]) for m in asked) for asked, _ in backend.asked]
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] <= 900 < sizes[-2]
    assert len(backend.asked[-1][0]) == 2  # the worked example went first
    with pytest.raises(PromptTooLongError):
        llm_explain(long, SmallContext(limit=10))


def test_llm_explain_takes_the_stores_feature_read(tmp_path):
    url = f"sqlite:///{tmp_path / 'f.db'}"
    run = synthetic_run(d_sae=8, n_dead=1, seed=4)
    synthetic_database(url, run)
    engine = make_engine(url)
    with read_session(engine) as session:
        detail = get_feature(session=session, sae_id=run.sae.sae_id, index=2)
    engine.dispose()
    data = FeatureData.from_detail(detail)
    assert data.top and len(data.top) == sum(w.kind == "top" for w in detail.windows)
    assert data.promoted[0].token == detail.logits_pos[0].token
    backend = Scripted("digits")
    assert llm_explain(detail, backend, ExplainOptions(mark_fraction=0.999)) == "digits"
    question = backend.asked[0][0][-1]["content"]
    peak = data.top[0]  # only each window's peak is above 0.999 of its max
    assert f"<<{peak.tokens[peak.max_index].lstrip()}>>" in question.splitlines()[1]


def test_local_backend_on_the_tiny_model():
    backend = LocalBackend.from_model(build_tiny("tiny-llama"), max_total_tokens=10_000)
    assert backend.name == "local:tiny-llama"
    # Short: the tiny model has 512 positions and a small vocabulary.
    short = ExplainOptions(n_top=1, n_intervals=1, few_shot=False, chat=ChatOptions(8))
    messages = explain_messages(FEATURE, short)
    first = backend.complete(messages, ChatOptions(max_tokens=8, temperature=1.0, seed=2))
    assert first == backend.complete(messages, ChatOptions(max_tokens=8, temperature=1.0, seed=2))
    assert backend.usage.requests == 2 and backend.usage.completion_tokens <= 16
    assert backend.usage.prompt_tokens > 2 * 50
    assert "\n" not in llm_explain(FEATURE, backend, short)
    # The default prompt is over the tiny model's 511 positions: asked again, shorter.
    assert "\n" not in llm_explain(FEATURE, backend, ExplainOptions(chat=ChatOptions(4)))
    tight = LocalBackend.from_model(backend.lm, max_total_tokens=1)
    tight.complete(messages, ChatOptions(max_tokens=2))
    with pytest.raises(TokenBudgetExceeded, match="token budget is used up"):
        tight.complete(messages, ChatOptions(max_tokens=2))
    with pytest.raises(ConfigError, match="takes no URL"):
        LocalBackend(url="http://127.0.0.1:1/v1", lm=backend.lm)


def test_local_backend_loads_by_name_on_a_device_and_dtype():
    backend = LocalBackend("tiny-llama", device="auto", dtype="bfloat16")
    assert next(backend.lm.hf_model.parameters()).dtype == torch.bfloat16
    assert isinstance(backend.complete([{"role": "user", "content": "hi"}], ChatOptions(4)), str)
    with pytest.raises(ConfigError, match="unknown device 'tpu'"):
        LocalBackend("tiny-llama", device="tpu")


@pytest.mark.integration
def test_default_model_writes_a_description():
    backend = LocalBackend()  # the default preset, through the engine's loader and cache
    assert backend.name == "local:smollm2-135m"
    text = backend.complete([{"role": "user", "content": "Name one colour."}],
                            ChatOptions(max_tokens=16))
    assert text.strip()
    description = llm_explain(FEATURE, backend, ExplainOptions(chat=ChatOptions(max_tokens=32)))
    assert description and "\n" not in description and len(description) <= 200
