"""The LLM explainer: a prompt built from a feature's data, sent to a chat backend, and the
answer cleaned into a one-line description.

Two prompt styles. `activations` (after Bills et al. 2023 and delphi): top windows and interval
samples, each cut around its strongest token, with the tokens where the feature fires marked
<<like this>>; the model says what the feature responds to. `output` (after "Enhancing
Automated Interpretability with Output-Centric Descriptions", Gur-Arieh et al. 2025): the
tokens the feature's decoder direction promotes and suppresses through the unembedding; the
model says what the feature makes the model write.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any, Literal, get_args

from app.errors import ConfigError, SaescopeError
from app.pipeline.autointerp.backends import ChatBackend, ChatMessage, ChatOptions
from app.pipeline.autointerp.feature_data import FeatureData, LogitEffect, Window

Style = Literal["activations", "output"]
PROMPT_STYLES: tuple[str, ...] = get_args(Style)  # the first is the default
OPEN, CLOSE = "<<", ">>"


@dataclass(frozen=True)
class ExplainOptions:
    """``mark_fraction``: a token is marked when its activation is above this fraction of the
    window's max (0: every token where the feature fires); ``before``/``after``: tokens kept
    around each window's strongest token; ``show_values``: list each example's marked tokens
    with their activation on a 0-10 scale of the feature's max (as Bills et al. show them)."""

    style: Style = "activations"
    n_top: int = 10
    n_intervals: int = 5
    n_logits: int = 10
    before: int = 24
    after: int = 8
    mark_fraction: float = 0.0
    show_values: bool = False
    few_shot: bool = True
    max_chars: int = 200
    chat: ChatOptions = field(default_factory=lambda: ChatOptions(max_tokens=64))


_ACTIVATIONS_SYSTEM = (
    "You study one feature of a language model: a direction inside it that is active on some "
    "tokens and silent on the rest. You get text excerpts; in each, the tokens where the "
    f"feature is active are between {OPEN} and {CLOSE}. Find what the marked tokens have in "
    "common, and the context before them when it matters. Answer with one short phrase of at "
    "most 15 words, with no preamble.")
_OUTPUT_SYSTEM = (
    "You study one feature of a language model: a direction inside it that, when active, "
    "makes some next tokens more likely and others less likely. You get both lists. Say what "
    "the feature makes the model write next. Answer with one short phrase of at most 15 "
    "words, with no preamble.")
# A worked example shown before the real question, so a small model sees the form of an answer.
_ACTIVATIONS_EXAMPLE = (
    "Excerpts where the feature is most active:\n"
    "1. I took my <<dog>> for a walk\n"
    "2. she fed the <<cat>> and the <<dogs>>\n"
    "3. a <<puppy>> barked at the door\n"
    "What does the feature respond to?", "names of pets, such as dog, cat and puppy")
_OUTPUT_EXAMPLE = (
    "Tokens it makes more likely: ' Paris', ' London', ' Berlin', ' Rome'\n"
    "Tokens it makes less likely: ' the', ' and', ' of'\n"
    "What does the feature make the model write?", "names of European capital cities")


def show_token(token: str) -> str:
    """A token as a quoted string with its whitespace visible (' the', '\\n')."""
    return "'" + token.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t") + "'"


def _crop(window: Window, *, before: int, after: int) -> Window:
    peak = window.max_index
    lo, hi = max(0, peak - before), min(len(window.tokens), peak + after + 1)
    return Window(window.tokens[lo:hi], window.values[lo:hi], kind=window.kind,
                  band=window.band)


def mark_window(window: Window, *, mark_fraction: float = 0.0) -> str:
    """The window's text on one line (newlines as \\n, outer whitespace trimmed), each run of
    tokens above ``mark_fraction`` of the window's max (and above 0) between << and >>; a
    run's leading whitespace stays outside."""
    threshold = max(0.0, mark_fraction * window.max_value)
    out: list[str] = []
    run: list[str] = []

    def close_run() -> None:
        if run:
            text = "".join(run)
            stripped = text.lstrip()
            out.append(text[:len(text) - len(stripped)] + OPEN + stripped + CLOSE)
            run.clear()

    for token, value in zip(window.tokens, window.values, strict=True):
        if value > threshold:
            run.append(token)
        else:
            close_run()
            out.append(token)
    close_run()
    return "".join(out).replace("\r", "").strip().replace("\n", "\\n")


def _values_line(window: Window, *, max_act: float, mark_fraction: float) -> str:
    threshold = max(0.0, mark_fraction * window.max_value)
    scale = max_act if max_act > 0 else window.max_value or 1.0
    shown = [f"{show_token(t)} {round(10 * v / scale)}"
             for t, v in zip(window.tokens, window.values, strict=True) if v > threshold]
    return "   activations: " + ", ".join(shown)


def _interval_sample(windows: tuple[Window, ...], n: int) -> list[Window]:
    """Up to ``n`` interval windows taken in turn from each band, the highest band first."""
    bands: dict[int, list[Window]] = {}
    for w in windows:
        bands.setdefault(w.band or 0, []).append(w)
    order = sorted(bands, reverse=True)
    picked: list[Window] = []
    while len(picked) < n and any(bands[b] for b in order):
        for b in order:
            if bands[b] and len(picked) < n:
                picked.append(bands[b].pop(0))
    return picked


def activations_prompt(feature: FeatureData, options: ExplainOptions) -> str:
    top = [w for w in feature.top if w.max_value > 0][:options.n_top]
    intervals = _interval_sample(tuple(w for w in feature.intervals if w.max_value > 0),
                                 options.n_intervals)
    if not top and not intervals:
        raise ConfigError(f"feature {feature.index} of {feature.sae_id} has no window where it "
                          "fires; nothing to explain (is it dead?)")
    lines: list[str] = []
    number = 0
    for title, windows in (("Excerpts where the feature is most active:", top),
                           ("Excerpts where it is less active:", intervals)):
        if not windows:
            continue
        lines.append(title)
        for window in windows:
            number += 1
            cropped = _crop(window, before=options.before, after=options.after)
            lines.append(f"{number}. {mark_window(cropped, mark_fraction=options.mark_fraction)}")
            if options.show_values:
                lines.append(_values_line(cropped, max_act=feature.max_act,
                                          mark_fraction=options.mark_fraction))
    lines.append("What does the feature respond to?")
    return "\n".join(lines)


def _effects(effects: tuple[LogitEffect, ...], n: int) -> str:
    return ", ".join(show_token(e.token) for e in effects[:n]) or "(none)"


def output_prompt(feature: FeatureData, options: ExplainOptions) -> str:
    if not feature.promoted and not feature.suppressed:
        raise ConfigError(f"feature {feature.index} of {feature.sae_id} has no logit effects; "
                          "use the activations prompt style")
    return (f"Tokens it makes more likely: {_effects(feature.promoted, options.n_logits)}\n"
            f"Tokens it makes less likely: {_effects(feature.suppressed, options.n_logits)}\n"
            "What does the feature make the model write?")


def explain_messages(feature: FeatureData, options: ExplainOptions | None = None
                     ) -> list[ChatMessage]:
    """The chat messages asking for the feature's description in the options' style."""
    options = options or ExplainOptions()
    if options.style == "activations":
        system, example, question = (_ACTIVATIONS_SYSTEM, _ACTIVATIONS_EXAMPLE,
                                     activations_prompt(feature, options))
    elif options.style == "output":
        system, example, question = _OUTPUT_SYSTEM, _OUTPUT_EXAMPLE, output_prompt(feature, options)
    else:
        raise ConfigError(f"unknown prompt style {options.style!r}; use "
                          f"{' or '.join(PROMPT_STYLES)}")
    messages: list[ChatMessage] = [{"role": "system", "content": system}]
    if options.few_shot:
        messages += [{"role": "user", "content": example[0]},
                     {"role": "assistant", "content": example[1]}]
    messages.append({"role": "user", "content": question})
    return messages


_THINKING = re.compile(r"<think>.*?(</think>|$)", re.DOTALL | re.IGNORECASE)
_PREFIX = re.compile(
    r"^(?:[-*#>\d.)\s]+)?(?:\[?(?:final\s+)?(?:explanation|description|answer|summary|label)\]?"
    r"\s*[:\-–]\s*|(?:this|the)\s+feature\s+(?:responds\s+to|fires\s+on|detects|is)\s*:?\s*)",
    re.IGNORECASE)


def clean_explanation(text: str, *, max_chars: int = 200) -> str:
    """The answer as one line: reasoning blocks dropped, the first line with words in it,
    labels ("Explanation:"), list marks, quotes and marks removed, cut at a word boundary to
    ``max_chars`` ("…" added). Empty when the answer holds nothing usable."""
    text = _THINKING.sub("", text)
    line = next((ln for ln in (s.strip() for s in text.splitlines())
                 if re.search(r"\w", _PREFIX.sub("", ln))), "")
    line = _PREFIX.sub("", line).replace(OPEN, "").replace(CLOSE, "")
    line = re.sub(r"\s+", " ", line).strip().strip("*_ ")
    # Quotes around the whole answer go; a quote that closes a quoted word inside stays.
    while len(line) > 1 and line[0] == line[-1] and line[0] in "\"'`":
        line = line[1:-1].strip().strip("*_ ")
    line = line.rstrip(".").rstrip()
    if len(line) > max_chars:
        cut = line[:max_chars - 1]
        if " " in cut:
            cut = cut.rsplit(" ", 1)[0]
        line = cut.rstrip(",;:-– ") + "…"
    return line


def llm_explain(feature_data: FeatureData | Any, backend: ChatBackend,
                options: ExplainOptions | ChatOptions | None = None) -> str:
    """The backend's description of the feature, cleaned to one line (may be empty when the
    model answers nothing usable). ``feature_data``: a FeatureData, or the store's
    FeatureDetail (converted); ``options``: ExplainOptions, or just the ChatOptions to
    sample with (the other options at their defaults)."""
    if not isinstance(feature_data, FeatureData):
        feature_data = FeatureData.from_detail(feature_data)
    if isinstance(options, ChatOptions):
        options = ExplainOptions(chat=options)
    options = options or ExplainOptions()
    while True:
        try:
            answer = backend.complete(explain_messages(feature_data, options), options.chat)
            break
        except SaescopeError as exc:
            # A prompt over the model's context (the local engine's, or an endpoint's 400
            # with OpenAI's code) is asked again with fewer and shorter examples.
            smaller = _smaller(options)
            if getattr(exc, "code", None) != "context_length_exceeded" or smaller is None:
                raise
            options = smaller
    return clean_explanation(answer, max_chars=options.max_chars)


def _smaller(options: ExplainOptions) -> ExplainOptions | None:
    """The options with about half the prompt: no worked example first, then half the
    examples and context; None once there is nothing left to cut."""
    if options.few_shot:
        return replace(options, few_shot=False)
    smaller = replace(options, n_top=max(1, options.n_top // 2),
                      n_intervals=options.n_intervals // 2, n_logits=max(1, options.n_logits // 2),
                      before=max(4, options.before // 2), after=max(1, options.after // 2))
    return None if smaller == options else smaller
