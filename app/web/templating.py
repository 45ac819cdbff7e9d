"""Jinja2 environment of the explorer: template folder, display filters and the one URL builder.

Autoescape is on for every template; filters return plain strings (never Markup), so tokens,
labels and document names written by users or models always reach the page as text.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import numpy as np
import plotly
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from markupsafe import Markup, escape
from starlette.templating import Jinja2Templates

from app.resources import STATIC_DIR, TEMPLATES_DIR

STATIC_PREFIX = "/static"
PLOTLY_VERSION = plotly.__version__

# Whitespace made visible inside token runs: a newline would otherwise break the run, a tab or a
# token made only of spaces would be an invisible shaded box.
_VISIBLE = str.maketrans({"\n": "↵", "\r": "␍", "\t": "⇥"})


def token_display(token: str) -> str:
    """How a token reads in a token run: newlines as ↵, tabs as ⇥, all-space tokens as ·."""
    if token == "":
        return "∅"
    if token.strip(" ") == "":
        return "·" * len(token)
    return token.translate(_VISIBLE)


def token_repr(token: str) -> str:
    """The exact token for tooltips and tables: quoted, with escapes for invisible characters."""
    out = []
    for ch in token:
        if ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\\":
            out.append("\\\\")
        elif ord(ch) < 32 or ord(ch) == 127:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "“" + "".join(out) + "”"


def fmt_num(value: float | int | None, digits: int = 3) -> str:
    """A number with `digits` significant digits, no exponent for everyday magnitudes."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, int):
        return f"{value:,}"
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 10 ** digits:
        return f"{value:,.0f}"
    if magnitude < 1e-3:
        return f"{value:.{max(digits - 1, 0)}e}"
    decimals = max(digits - 1 - math.floor(math.log10(magnitude)), 0)
    return f"{value:.{decimals}f}"


def fmt_pct(frac: float | None, digits: int = 3) -> str:
    """A fraction as a percentage, e.g. 0.00123 -> '0.123%'; 0 reads as '0%'."""
    if frac is None:
        return "–"
    if frac == 0:
        return "0%"
    return fmt_num(frac * 100, digits) + "%"


def fmt_count(value: int | float | None) -> str:
    """Large counts the way people say them: 1.2k, 3.4M."""
    if value is None:
        return "–"
    value = float(value)
    for threshold, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= threshold:
            return fmt_num(value / threshold, 3) + suffix
    return f"{value:.0f}"


def shade(value: float | None, max_value: float | None) -> str:
    """Opacity of a token's activation shading in [0, 1], two decimals."""
    if not value or not max_value or value <= 0 or max_value <= 0:
        return "0"
    return f"{min(value / max_value, 1.0):.2f}"


@lru_cache(maxsize=65536)
def _token_parts(token: str) -> tuple[str, str]:
    """Escaped display text of a token and its data-tok attribute (only where display differs)."""
    shown = token_display(token)
    exact = token_repr(token) if shown != token or not token.isprintable() else ""
    attr = f' data-tok="{escape(exact)}"' if exact else ""
    return str(escape(shown)), attr


# Shading in steps of 0.01 as classes sh0..sh100, each setting --a in app.css: a class, not a
# style attribute, so pages pass a Content-Security-Policy without 'unsafe-inline' styles.
_SHADES = tuple(f"sh{i}" for i in range(101))


def shade_class(alpha: float) -> str:
    """The shading class of an opacity in [0, 1] (see _SHADES)."""
    return _SHADES[min(max(round(alpha * 100), 0), 100)]


@lru_cache(maxsize=1)
def _f16_texts() -> tuple[str, ...]:
    """The tooltip text of every float16 value, indexed by its bit pattern (built on first use).

    Window values are stored as float16, so a page never formats a number: it looks one up.
    """
    every = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float64).tolist()
    return tuple(f"{v:.3g}" for v in every)


class SpanTable:
    """Per token id, the two strings a token run is made of, filled on first use.

    `inactive[i]`: the whole span of token i with no activation (most tokens of a window);
    `tail[i]`: what follows an active span's value (data-tok, escaped text, closing tag). A
    feature page then costs a list lookup per token instead of hashing its string.
    """

    def __init__(self, vocab: list[str]) -> None:
        self.vocab = vocab
        self.inactive: list[str | None] = [None] * len(vocab)
        self.tail: list[str | None] = [None] * len(vocab)

    def covers(self, ids: list[int]) -> bool:
        return not ids or (min(ids) >= 0 and max(ids) < len(self.vocab))

    def spans_for(self, ids: list[int]) -> None:
        """Fill the entries of `ids` not seen yet (the caller checked `covers(ids)`)."""
        inactive = self.inactive
        for i in ids:
            if inactive[i] is None:
                text, attr = _token_parts(self.vocab[i])
                inactive[i] = f'<span class="t"{attr}>{text}</span>'
                self.tail[i] = f'"{attr}>{text}</span>'


_SPAN_TABLES: dict[int, SpanTable] = {}


def span_table(vocab: list[str]) -> SpanTable:
    """The table for `vocab` (the store caches each model's vocabulary as one list object)."""
    table = _SPAN_TABLES.get(id(vocab))
    if table is None or table.vocab is not vocab:
        if len(_SPAN_TABLES) >= 4:
            _SPAN_TABLES.pop(next(iter(_SPAN_TABLES)))
        table = _SPAN_TABLES[id(vocab)] = SpanTable(vocab)
    return table


# Where a run crosses into another document: (token position, what to say there).
Breaks = Sequence[tuple[int, str]]


def token_run_html(
    tokens: list[str], values: list[float] | np.ndarray, *, max_value: float, max_pos: int,
    centred: bool = True, breaks: Breaks = (),
) -> Markup:
    """The token spans of one window, shaded by value / max_value, the max token marked."""
    table = SpanTable(list(tokens))
    return token_runs_html([(list(range(len(tokens))), values, max_pos)], table=table,
                           max_value=max_value, centred=centred, breaks=[breaks])[0]


def _doc_break(span: str, text: str) -> str:
    """A token span that opens a document, after a divider: the divider is named by `text`
    (title for the mouse, aria-label for screen readers), and so is the token (data-doc, which
    its tooltip shows when the arrow keys reach it)."""
    said = str(escape(text))
    end = span.index(">")  # of the opening tag: its attribute values are escaped, so no ">"
    return ('<span class="doc-break" role="separator" title="' + said + '" aria-label="' + said
            + '"></span>' + span[:end] + ' data-doc="' + said + '"' + span[end:])


def token_runs_html(
    runs: list[tuple[list[int], list[float] | np.ndarray, int]], *, table: SpanTable,
    max_value: float, centred: bool = True, breaks: Sequence[Breaks] | None = None,
) -> list[Markup]:
    """Token spans of several windows (token ids, values, max position) on one shading scale.

    Every id must be in `table` (see SpanTable.covers). Built here rather than with a Jinja loop
    because a feature page has thousands of tokens. Values are taken as float16 (how windows
    are stored) and all windows go through numpy together: shading steps come from one
    expression and tooltip text from a table indexed by the float16 bits; the token parts come
    from `table` by id. Every token string goes through markupsafe.escape in _token_parts, so a
    token is always text, never markup. `breaks[n]` marks where run n crosses into another
    document (a divider before the token at each position > 0; its text is escaped too).
    """
    for ids, values, _ in runs:
        if len(ids) != len(values):
            raise ValueError(f"{len(ids)} tokens but {len(values)} values")
    if not runs:
        return []
    half = np.concatenate([np.asarray(values, dtype=np.float16) for _, values, _ in runs])
    wide = half.astype(np.float32)
    scale = 100.0 / max_value if max_value > 0 else 0.0
    steps_all = np.minimum(np.maximum(np.floor(wide * scale + 0.5), 0), 100).astype(np.intp)
    steps_all, codes_all = steps_all.tolist(), half.view(np.uint16).tolist()
    active_all = (wide > 0).tolist()
    texts, shades = _f16_texts(), _SHADES
    out = []
    at = 0
    for n, (ids, _, max_pos) in enumerate(runs):
        table.spans_for(ids)
        inactive, tail = table.inactive, table.tail
        end = at + len(ids)
        active, steps, codes = active_all[at:end], steps_all[at:end], codes_all[at:end]
        at = end
        spans = [
            '<span class="t on ' + shades[step] + '" data-v="' + texts[code] + tail[i]
            if on else inactive[i]
            for i, on, step, code in zip(ids, active, steps, codes, strict=True)
        ]
        if 0 <= max_pos < len(spans):
            # The max token, once per window: the same span with the "max" class.
            i = ids[max_pos]
            if active[max_pos]:
                spans[max_pos] = ('<span class="t on max ' + shades[steps[max_pos]]
                                  + '" data-v="' + texts[codes[max_pos]] + tail[i])
            else:
                spans[max_pos] = '<span class="t max' + inactive[i][len('<span class="t'):]
        for pos, text in breaks[n] if breaks else ():
            if 0 < pos < len(spans):
                spans[pos] = _doc_break(spans[pos], text)
        if not centred or not spans:
            out.append(Markup("".join(spans)))
            continue
        # Centred view: the max token sits mid-row, the text before it is clipped on the left.
        out.append(Markup(
            '<span class="pre"><span>' + "".join(spans[:max_pos]) + "</span></span>"
            + spans[max_pos]
            + '<span class="post">' + "".join(spans[max_pos + 1:]) + "</span>"
        ))
    return out


# --- the URL builder: every link in the explorer is made here --------------------------------


def home_url() -> str:
    return "/"


def sae_url(model_id: str, sae_id: str, **params: object) -> str:
    base = f"/{quote(model_id, safe='')}/{quote(sae_id, safe='')}"
    query = {k: v for k, v in params.items() if v not in (None, "", False)}
    return base + ("?" + urlencode(query) if query else "")


def feature_url(model_id: str, sae_id: str, index: int) -> str:
    return f"{sae_url(model_id, sae_id)}/{int(index)}"


def random_url(model_id: str, sae_id: str) -> str:
    return f"{sae_url(model_id, sae_id)}/random"


def search_url(model_id: str, sae_id: str, text: str | None = None) -> str:
    base = f"{sae_url(model_id, sae_id)}/search"
    return base + ("?" + urlencode({"text": text}) if text else "")


def api_url(path: str) -> str:
    return "/api/v1" + path


def plotly_url() -> str:
    return f"/assets/plotly-{PLOTLY_VERSION}.min.js"


@lru_cache(maxsize=1)
def plotly_bundle_js() -> bytes:
    """The Plotly bundle of the installed `plotly` package."""
    from plotly.offline import get_plotlyjs

    return get_plotlyjs().encode("utf-8")


# The bundle adds stylesheets for trace types the explorer never draws (maplibre maps) as
# <style> elements with content, each skipped when an element with its id exists.
_PLOTLY_STYLE_GUARD = re.compile(
    rb'if\(!document\.getElementById\("([0-9a-f]{16,64})"\)\)\{var \w+=document\.createElement'
    rb'\("style"\)')


@lru_cache(maxsize=1)
def plotly_unused_style_ids() -> tuple[str, ...]:
    """Ids of those stylesheets: a page that loads Plotly holds an element with each id, so
    nothing needs an inline-style exception in its Content-Security-Policy."""
    return tuple(m.decode() for m in _PLOTLY_STYLE_GUARD.findall(plotly_bundle_js()))


@lru_cache(maxsize=256)
def _static_digest(path: str, mtime_ns: int) -> str:
    return hashlib.sha256((STATIC_DIR / path).read_bytes()).hexdigest()[:10]


def static_url(path: str) -> str:
    """/static/path?v=<content hash>: browsers may cache static files, and see every change."""
    file = STATIC_DIR / path
    try:
        version = _static_digest(path, file.stat().st_mtime_ns)
    except OSError:
        version = "0"
    return f"{STATIC_PREFIX}/{path}?v={version}"


def page_query(base: dict[str, object], **changes: object) -> str:
    """The current table query with some parameters changed (sort links, pagination)."""
    query = {**base, **changes}
    query = {k: v for k, v in query.items() if v not in (None, "", False)}
    return "?" + urlencode(query) if query else "?"


def principal_of(request: Any) -> Any:
    """The signed-in person a page dependency put on the request (label_pages.page_user), or
    None (the sign-in page, error pages)."""
    return getattr(request.state, "principal", None)


def make_environment(templates_dir: Path = TEMPLATES_DIR) -> Environment:
    env = Environment(
        loader=FileSystemLoader(str(templates_dir)),
        autoescape=select_autoescape(["html", "jinja", "j2"], default_for_string=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        auto_reload=False,
    )
    env.filters.update(
        tok=token_display,
        tokrepr=token_repr,
        num=fmt_num,
        pct=fmt_pct,
        count=fmt_count,
        shade=shade,
    )
    env.globals.update(
        home_url=home_url,
        sae_url=sae_url,
        feature_url=feature_url,
        random_url=random_url,
        search_url=search_url,
        api_url=api_url,
        plotly_url=plotly_url,
        plotly_unused_style_ids=plotly_unused_style_ids,
        static_url=static_url,
        page_query=page_query,
        principal_of=principal_of,
    )
    return env


templates = Jinja2Templates(env=make_environment())
