"""Accessibility in Debian's Chromium: axe-core's WCAG 2.1 AA rules on every page
(tests/browser/pages.py lists them), and what a keyboard user needs (token values, clickable
rows, a visible focus ring, single-key shortcuts that can be turned off).

axe-core is the npm package, installed at test time into .cache/node/ (make browser-deps), and
injected with add_init_script: init scripts are not subject to the pages' script-src 'self'.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from tests.browser.pages import MODEL_ID, PAGES, SAE_ID, AppPage
from tests.live_server import DRAFTED_FROM, REPO

pytestmark = pytest.mark.browser

AXE_VERSION = "4.14.1"  # the Makefile's browser-deps installs the same
NODE_PREFIX = REPO / ".cache" / "node"
AXE_JS = NODE_PREFIX / "node_modules" / "axe-core" / "axe.min.js"
WCAG_21_AA = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"]
RUN_AXE = """async (tags) => {
  const result = await axe.run(document, {runOnly: {type: "tag", values: tags},
                                          resultTypes: ["violations"]});
  return result.violations.map(v => ({id: v.id, impact: v.impact, help: v.help,
    nodes: v.nodes.map(n => [n.target.join(" "), n.failureSummary])}));
}"""


@pytest.fixture(scope="session")
def axe_script() -> str:
    """axe.min.js from the npm registry (installed here once when `make browser-deps` has not)."""
    if not AXE_JS.exists():
        npm = shutil.which("npm")
        if npm is None:
            pytest.skip("npm is not installed (make browser-deps installs axe-core)")
        subprocess.run([npm, "install", "--no-save", "--no-audit", "--no-fund", "--prefix",
                        str(NODE_PREFIX), f"axe-core@{AXE_VERSION}"], check=True,
                       capture_output=True, timeout=300)
    return str(AXE_JS)


def _alive_feature(server) -> int:  # noqa: ANN001
    rows = server.get_json(f"/api/v1/saes/{SAE_ID}/features?filter=alive&per_page=1")
    return rows["data"][0]["index"]


def _drafted_feature(server) -> int:  # noqa: ANN001
    """A feature with a scored automatic draft (the live server's build wrote them)."""
    for index in range(DRAFTED_FROM, 128):
        if server.get_json(f"/api/v1/saes/{SAE_ID}/features/{index}")["drafts"]:
            return index
    raise AssertionError("the live server's build wrote no drafts")


@pytest.mark.parametrize("app_page", PAGES, ids=[p.name for p in PAGES])
def test_axe_finds_no_serious_violations(page, server, axe_script, shot,
                                         app_page: AppPage) -> None:
    page.add_init_script(path=axe_script)
    drafted = _drafted_feature(server) if "{drafted}" in app_page.path else None
    response = page.goto(app_page.url(feature=_alive_feature(server), drafted=drafted))
    assert response.status == app_page.status
    if app_page.ready:
        page.wait_for_selector(app_page.ready)
    if app_page.act:
        app_page.act(page)
    page.wait_for_load_state("networkidle")
    violations = page.evaluate(RUN_AXE, WCAG_21_AA)
    shot(f"a11y-{app_page.name}")
    serious = [v for v in violations if v["impact"] in ("serious", "critical")]
    assert serious == [], "\n".join(
        f"{v['id']} ({v['impact']}, {len(v['nodes'])} elements): {v['help']}\n  "
        + "\n  ".join(f"{t}: {s}" for t, s in v["nodes"][:5]) for v in serious)


# ------------------------------------------------------------------------------------ keyboard

FOCUSED = """() => { const e = document.activeElement;
  return {cls: e.className, v: e.dataset.v ?? null, tag: e.tagName, id: e.id,
          described: e.getAttribute('aria-describedby'), text: e.textContent}; }"""


def _tab_until(page, selector: str, limit: int = 80) -> None:  # noqa: ANN001
    """Press Tab until the focused element matches `selector` (a keyboard user's path)."""
    for _ in range(limit):
        page.keyboard.press("Tab")
        if page.evaluate("s => document.activeElement.matches(s)", selector):
            return
    raise AssertionError(f"Tab never reached {selector}")


def test_keyboard_reads_each_tokens_activation(page, server, shot) -> None:
    index = _alive_feature(server)
    data = server.get_json(f"/api/v1/saes/{SAE_ID}/features/{index}")
    top = [a for a in data["activations"] if a["kind"] == "top"]
    page.goto(f"/{MODEL_ID}/{SAE_ID}/{index}")
    n_tokens = page.locator(".t").count()
    # One tab stop per window: the tokens themselves carry no tabindex until reached.
    assert n_tokens > 100 and page.locator(".t[tabindex]").count() == 0

    _tab_until(page, "#top-windows [data-win]")
    window = page.locator("#top-windows [data-win]").first
    page.keyboard.press("ArrowRight")  # into the window, at its max token
    focused = page.evaluate(FOCUSED)
    assert "max" in focused["cls"].split() and focused["described"] == "tooltip"
    tooltip = page.locator("#tooltip")
    assert tooltip.is_visible()
    peak = top[0]["values"][top[0]["maxValueTokenIndex"]]
    assert f"{peak:.3g}" in tooltip.inner_text() and focused["v"] in tooltip.inner_text()
    assert "expanded" in window.get_attribute("class").split()  # every token in view
    shot("a11y-keyboard-token")

    page.keyboard.press("Home")
    assert page.evaluate(FOCUSED)["text"] == window.locator(".t").first.inner_text()
    page.keyboard.press("ArrowRight")
    second = page.evaluate(FOCUSED)
    assert second["text"] == window.locator(".t").nth(1).inner_text()
    assert (second["v"] or "0") in tooltip.inner_text()
    page.keyboard.press("Escape")  # back to the window; the tooltip goes
    assert page.evaluate("document.activeElement.matches('[data-win]')")
    assert not tooltip.is_visible()
    page.keyboard.press("ArrowDown")  # the next window
    assert page.evaluate(
        "document.activeElement === document.querySelectorAll('#top-windows [data-win]')[1]")
    # Reached tokens only: the page still holds one focusable per window.
    assert page.locator(".t[tabindex]").count() <= 3


def _window_crossing_documents(server) -> tuple[int, int, dict]:  # noqa: ANN001
    """(feature, rank, top window) of the first top window that crosses a document boundary
    (the build packs the corpus's files into shared sequences)."""
    d_sae = server.get_json(f"/api/v1/saes/{SAE_ID}")["d_sae"]
    for index in range(d_sae):
        data = server.get_json(f"/api/v1/saes/{SAE_ID}/features/{index}")
        top = [a for a in data["activations"] if a["kind"] == "top"]
        for n, act in enumerate(top):
            if len(act["documents"]) > 1:
                return index, n, act
    raise AssertionError("no top window of the build crosses a document boundary")


def test_document_boundary_is_shown_and_announced(page, server, axe_script, shot) -> None:
    """A window that crosses into another document shows a divider at the BOS that opens it,
    named for mouse (title), screen reader (separator's label) and keyboard (the BOS token's
    tooltip); the page stays free of serious axe violations."""
    index, n, act = _window_crossing_documents(server)
    first, second = act["documents"][:2]
    said = f"document boundary: {first['name']} ends, {second['name']} starts"
    page.add_init_script(path=axe_script)
    page.goto(f"/{MODEL_ID}/{SAE_ID}/{index}")
    window = page.locator("#top-windows [data-win]").nth(n)
    window.locator(".win-max").click()  # expanded: the whole window in view
    divider = window.locator(".doc-break").first
    assert divider.is_visible()
    box = divider.bounding_box()
    assert box["width"] >= 1 and box["height"] >= 8  # drawn, not an empty span
    assert divider.get_attribute("role") == "separator"
    assert divider.get_attribute("aria-label") == divider.get_attribute("title") == said
    # It sits right before the window's token at the JSON's offset: the BOS.
    tokens = window.locator(".t")
    bos_index = window.locator(".doc-break + .t").first.evaluate(
        "(t, all) => all.indexOf(t)", tokens.element_handles())
    assert bos_index == second["offset"]
    assert tokens.nth(bos_index).inner_text() == act["tokens"][second["offset"]]
    assert window.locator(".win-doc").inner_text().startswith(first["name"])
    shot("feature-document-boundary")

    # Keyboard: arrows reach the BOS, whose tooltip names the documents.
    window.focus()
    page.keyboard.press("Home")
    for _ in range(second["offset"]):
        page.keyboard.press("ArrowRight")
    focused = page.evaluate(FOCUSED)
    assert focused["text"] == act["tokens"][second["offset"]]
    tooltip = page.locator("#tooltip")
    assert tooltip.is_visible() and said in tooltip.inner_text()

    violations = page.evaluate(RUN_AXE, WCAG_21_AA)
    serious = [v for v in violations if v["impact"] in ("serious", "critical")]
    assert serious == [], serious


def test_text_search_rows_and_tokens_by_keyboard(page, server) -> None:
    page.goto(f"/{MODEL_ID}/{SAE_ID}/search?text=the+quick+brown+fox+jumps")
    page.wait_for_selector("#text-features tbody tr[tabindex]")
    _, api = server.post_json(f"/api/v1/saes/{SAE_ID}/search",
                              {"text": "the quick brown fox jumps"})
    # Tokens: one tab stop for the box, arrows move, Enter lists the token's features.
    _tab_until(page, "#search-tokens")
    page.keyboard.press("Home")
    page.keyboard.press("ArrowRight")
    focused = page.evaluate(FOCUSED)
    assert "t" in focused["cls"].split() and page.locator("#tooltip").is_visible()
    page.keyboard.press("Enter")
    assert page.locator("#token-features-title").inner_text().startswith("Features on token 1 ")
    # Rows of the "firing most" table are tab stops; Enter shades the text by that feature.
    _tab_until(page, "#text-features tbody tr")
    first = api["top_features"][0]["index"]
    page.keyboard.press("Enter")
    page.wait_for_selector(f"#feature-profile[data-rendered='{first}']")
    assert "selected-feature" in page.locator("#text-features tbody tr").first.get_attribute(
        "class")


RING = """() => { const s = getComputedStyle(document.activeElement);
  return [s.outlineStyle, parseFloat(s.outlineWidth), s.outlineColor]; }"""


def test_focus_ring_is_clearly_visible(page, server) -> None:
    index = _alive_feature(server)
    page.goto(f"/{MODEL_ID}/{SAE_ID}/{index}")
    seen = set()
    for selector in ("a.btn", "#top-windows [data-win]", "button.shortcuts-toggle",
                     ".test-form textarea"):
        _tab_until(page, selector, limit=200)
        style, width, color = page.evaluate(RING)
        assert style == "solid" and width >= 2, (selector, style, width)
        seen.add(color)
    assert seen == {"rgb(47, 95, 208)"}  # --focus: 5:1 on the panels, 3:1 or more everywhere


def test_single_key_shortcuts_can_be_turned_off(page, server) -> None:
    index = 5
    page.goto(f"/{MODEL_ID}/{SAE_ID}/{index}")
    toggle = page.locator("#shortcuts-toggle")
    assert toggle.get_attribute("aria-pressed") == "true"
    toggle.click()
    assert toggle.get_attribute("aria-pressed") == "false" and "off" in toggle.inner_text()
    # Off survives a reload (localStorage): j, k, r and / do nothing.
    page.reload()
    assert page.locator("#shortcuts-toggle").get_attribute("aria-pressed") == "false"
    url = page.url
    for key in ("j", "k", "r", "/"):
        page.keyboard.press(key)
    page.wait_for_timeout(300)
    assert page.url == url and page.evaluate("document.activeElement === document.body")
    # On again: j goes to the next feature.
    page.locator("#shortcuts-toggle").click()
    page.keyboard.press("j")
    page.wait_for_url(re.compile(rf"/{SAE_ID}/{index + 1}$"))


def test_feature_page_still_renders_fast(page, server) -> None:
    """The keyboard support adds no per-token markup or listeners: a feature page with
    thousands of tokens keeps few tab stops (load and key timings printed, not asserted)."""
    index = _alive_feature(server)
    page.goto(f"/{MODEL_ID}/{SAE_ID}/{index}")
    timing = page.evaluate("""() => { const n = performance.getEntriesByType('navigation')[0];
        return [n.domContentLoadedEventEnd, n.loadEventEnd, document.querySelectorAll('.t').length,
                document.querySelectorAll('[tabindex]').length]; }""")
    page.locator("#top-windows [data-win]").first.focus()
    key_ms = page.evaluate("""() => { const w = document.querySelector('#top-windows [data-win]');
        const t0 = performance.now();
        for (let i = 0; i < 50; i++)
          document.activeElement.dispatchEvent(new KeyboardEvent('keydown',
            {key: 'ArrowRight', bubbles: true}));
        return (performance.now() - t0) / 50; }""")
    dcl, load, n_tokens, n_focusable = timing
    print(f"feature page: {n_tokens} tokens, {n_focusable} tab stops, DOMContentLoaded "
          f"{dcl:.0f} ms, load {load:.0f} ms, {key_ms:.2f} ms per arrow key")
    assert n_focusable < 200 < n_tokens
