"""Display filters and the URL builder of the explorer (app/web/templating.py)."""

from __future__ import annotations

import math

import pytest

from app.web import templating as tp

XSS = "</script><img src=x onerror=alert(1)>"


@pytest.mark.parametrize(
    ("token", "shown"),
    [
        (" the", " the"),
        ("\n", "↵"),
        ("\n\n", "↵↵"),
        ("\t", "⇥"),
        (" ", "·"),
        ("    ", "····"),
        ("", "∅"),
        ("a\r\nb", "a␍↵b"),
        (XSS, XSS),  # unchanged here: escaping is the template's job (autoescape)
    ],
)
def test_token_display_makes_whitespace_visible(token: str, shown: str) -> None:
    assert tp.token_display(token) == shown


def test_token_display_never_yields_a_line_break() -> None:
    for token in ["\n", "a\nb", "\r\n", " \n ", "\t\n"]:
        assert "\n" not in tp.token_display(token) and "\r" not in tp.token_display(token)


def test_token_repr_escapes_invisible_characters_and_keeps_the_rest() -> None:
    assert tp.token_repr(" a\n") == "“ a\\n”"
    assert tp.token_repr("\x00\\") == "“\\x00\\\\”"
    assert tp.token_repr(XSS) == f"“{XSS}”"


@pytest.mark.parametrize(
    ("value", "text"),
    [(0, "0"), (0.0, "0"), (1.23456, "1.23"), (12.3456, "12.3"), (123.456, "123"),
     (12345.6, "12,346"), (0.0123456, "0.0123"), (0.00012345, "1.23e-04"), (None, "–"),
     (1234, "1,234"), (-2.5, "-2.50")],
)
def test_fmt_num_keeps_three_significant_digits(value: float | None, text: str) -> None:
    assert tp.fmt_num(value) == text


def test_fmt_num_nan_is_a_dash() -> None:
    assert tp.fmt_num(math.nan) == "–"


def test_fmt_pct_and_count() -> None:
    assert tp.fmt_pct(0.00123) == "0.123%"
    assert tp.fmt_pct(0) == "0%"
    assert tp.fmt_pct(None) == "–"
    assert tp.fmt_count(999) == "999"
    assert tp.fmt_count(1234) == "1.23k"
    assert tp.fmt_count(2_500_000) == "2.50M"


def test_shade_is_value_over_max_clipped() -> None:
    assert tp.shade(2.0, 4.0) == "0.50"
    assert tp.shade(5.0, 4.0) == "1.00"
    assert tp.shade(0.0, 4.0) == "0"
    assert tp.shade(-1.0, 4.0) == "0"
    assert tp.shade(1.0, 0.0) == "0"


def test_urls_quote_ids() -> None:
    assert tp.feature_url("m", "1-res", 7) == "/m/1-res/7"
    assert tp.sae_url("a b", "x/y") == "/a%20b/x%2Fy"
    assert tp.sae_url("m", "s", sort="max_act", page=None) == "/m/s?sort=max_act"
    assert tp.search_url("m", "s", "a&b") == "/m/s/search?text=a%26b"
    assert tp.page_query({"sort": "index", "page": 2}, page=None) == "?sort=index"


def test_static_url_changes_with_content(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(tp, "STATIC_DIR", tmp_path)
    (tmp_path / "x.css").write_text("a")
    first = tp.static_url("x.css")
    (tmp_path / "x.css").write_text("bb")
    second = tp.static_url("x.css")
    assert first.startswith("/static/x.css?v=") and first != second


def test_templates_autoescape_tokens() -> None:
    env = tp.make_environment()
    html = env.from_string("<p>{{ t|tok }}</p><p title='{{ t|tokrepr }}'></p>").render(t=XSS)
    assert "<script" not in html.replace("&lt;", "") and "<img" not in html
    assert "&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;" in html
