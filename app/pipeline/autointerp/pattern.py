"""The pattern explainer: a short, deterministic description of a feature from what the build
stored (top windows, interval samples, logit effects), needing no language model.

It names the tokens the feature fires on (weighted by how strongly, over every stored window),
the context before the max token when the top windows share one, and the tokens its decoder
direction promotes, e.g. "fires on ' value' after 'the' / 'Return the'; promotes ' of', ' is'".
It is the baseline the LLM explainers are scored against, and the random-explanation control of
every score is the pattern explanation of another feature.
"""

from __future__ import annotations

import math
from collections import Counter

from app.pipeline.autointerp.windows import Excerpt, excerpt_of, strongest_positions
from app.store.read_models import FeatureDetail

EXPLAINER_NAME = "pattern"
STRONG = 0.5  # a token "fires" when at least this fraction of its window's max
MIN_WEIGHT = 0.2  # a fired-on token is named when its weight is this share of the first's
CONTEXT_SHARE = 0.3  # a context is named when this share of the top windows have it
CONTEXT_MIN = 3  # ... and at least this many
VARIED_SHARE = 0.15  # under this share of all weight, the first token is one of many


def _quote(token: str) -> str:
    return "'" + token.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r") + "'"


def _context(tokens: tuple[str, ...]) -> str | None:
    """Text of the tokens, stripped; a whitespace-only context keeps its escaped form."""
    if not tokens:
        return None
    raw = "".join(tokens)
    return raw.strip() or raw


def _common(counter: Counter[str], n: int) -> str | None:
    if not counter:
        return None
    (text, count), = sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))[:1]
    return text if count >= max(CONTEXT_MIN, math.ceil(CONTEXT_SHARE * n)) else None


def fired_tokens(excerpts: list[Excerpt], *, n_tokens: int) -> tuple[list[str], bool]:
    """The token strings the feature fires on most, and whether they are a few among many (no
    token holds much of the weight). Each window weighs its strong tokens by value over the
    window's own max, so the interval samples of the weaker bands count as much as the top."""
    weight: Counter[str] = Counter()
    for e in excerpts:
        for i in strongest_positions(e.values, STRONG):
            weight[e.tokens[i]] += float(e.values[i]) / e.max_value
    ranked = sorted(weight.items(), key=lambda kv: (-kv[1], kv[0]))
    first = ranked[0][1]
    names = [t for t, w in ranked[:n_tokens] if w >= MIN_WEIGHT * first]
    return names, first < VARIED_SHARE * sum(weight.values())


def contexts(excerpts: list[Excerpt]) -> tuple[str | None, str | None, str | None]:
    """(one token before, two tokens before, one token after) the max token, when shared by
    enough of these windows."""
    before1: Counter[str] = Counter()
    before2: Counter[str] = Counter()
    after1: Counter[str] = Counter()
    for e in excerpts:
        m = int(e.values.argmax())
        if (c := _context(e.tokens[max(0, m - 1):m])) is not None:
            before1[c] += 1
        if m >= 2 and (c := _context(e.tokens[m - 2:m])) is not None:
            before2[c] += 1
        if (c := _context(e.tokens[m + 1:m + 2])) is not None:
            after1[c] += 1
    n = len(excerpts)
    one, two = _common(before1, n), _common(before2, n)
    return one, (two if two != one else None), _common(after1, n)


def explain_pattern(feature: FeatureDetail, *, n_tokens: int = 3, n_promoted: int = 3) -> str:
    """The description; deterministic for given stored data."""
    excerpts = [excerpt_of(w) for w in feature.windows]
    excerpts = [e for e in excerpts if e.max_value > 0]
    if not excerpts:
        return "never active in the stored text"
    names, varied = fired_tokens(excerpts, n_tokens=n_tokens)
    text = ("fires on varied tokens, most on " if varied else "fires on ") + \
        ", ".join(_quote(t) for t in names)
    top = [e for e in excerpts if e.source == "top"] or excerpts
    one, two, after = contexts(top)
    shown = [_quote(c) for c in (one, two) if c is not None]
    if shown:
        text += " after " + " / ".join(shown)
    if after is not None:
        text += f", followed by {_quote(after)}"
    promoted = [_quote(t.token) for t in feature.logits_pos[:n_promoted] if t.value > 0]
    if promoted:
        text += "; promotes " + ", ".join(promoted)
    return text
