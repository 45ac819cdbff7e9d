"""What lets the pages run under a strict Content-Security-Policy: no inline scripts or style
attributes in the templates, a CSS rule for every token-shading class."""

from __future__ import annotations

import re

from app.resources import STATIC_DIR, TEMPLATES_DIR
from app.web.templating import plotly_unused_style_ids, shade_class


def test_templates_have_no_inline_script_or_style() -> None:
    for template in TEMPLATES_DIR.rglob("*.html"):
        text = template.read_text(encoding="utf-8")
        assert " style=" not in text and "<style" not in text, template
        assert not re.search(r"\son[a-z]+=", text), template  # no inline event handlers
        for script in re.findall(r"<script[^>]*>", text):
            # External scripts, or JSON data blocks the browser never runs.
            assert "src=" in script or 'type="application/json"' in script, (template, script)


def test_every_shading_class_has_its_rule() -> None:
    css = (STATIC_DIR / "css" / "app.css").read_text(encoding="utf-8")
    rules = dict(re.findall(r"\.(sh\d+)\{--a:([\d.]+)\}", css))
    for step in range(101):
        name = shade_class(step / 100)
        assert name == f"sh{step}" and float(rules[name]) == step / 100


def test_plotly_bundle_still_guards_its_unused_stylesheets() -> None:
    # If a Plotly upgrade changes how it adds them, the pattern finds nothing and the plot pages
    # would break their policy: the browser test shows it, this says where to look.
    assert plotly_unused_style_ids()
