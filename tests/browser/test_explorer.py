"""The explorer in Debian's Chromium against a real server over a database from `saescope build`.

Each page is checked against its JSON twin under /api/v1 (the same store queries), so the tests
compare what a person sees with what the pipeline wrote, not with numbers copied into the test.
"""

from __future__ import annotations

import math
import re
from urllib.parse import quote

import pytest

pytestmark = pytest.mark.browser

MODEL_ID = "tiny-llama"
SAE_ID = "2-res-topk-128"
XSS = "</script><img src=x onerror=alert(1)>"
XSS_MODEL_ID = "xss-lm"
XSS_SAE_ID = "1-res-xss"
SEARCH_TEXT = "Once upon a time the quick brown fox jumped over the lazy dog.\n\tdef scale(x):"


def _alive_feature(server) -> int:
    rows = server.get_json(f"/api/v1/saes/{SAE_ID}/features?filter=alive&per_page=1")
    return rows["data"][0]["index"]


def test_home_lists_every_sae_with_its_numbers(page, server, shot) -> None:
    page.goto("/")
    saes = server.get_json("/api/v1/saes")["data"]
    for sae in saes:
        link = page.locator(f'table.saes a[href="/{sae["model_id"]}/{sae["id"]}"]')
        assert link.inner_text() == sae["id"]
    row = page.locator("table.saes tr", has=page.locator(f'a[href="/{MODEL_ID}/{SAE_ID}"]'))
    sae = next(s for s in saes if s["id"] == SAE_ID)
    assert f'{sae["n_labeled"]} / {sae["d_sae"]}' in row.inner_text()
    shot("home")


def test_overview_sorts_and_opens_a_feature(page, server, shot) -> None:
    page.goto(f"/{MODEL_ID}/{SAE_ID}")
    # Both SAE histograms are drawn by Plotly with the run's data.
    for plot_id in ("density-hist", "l0-hist"):
        page.wait_for_selector(f"#{plot_id}[data-rendered=yes]")
        drawn = page.evaluate(f"document.getElementById('{plot_id}').data[0].y")
        stats = server.get_json(f"/api/v1/saes/{SAE_ID}")["stats"]
        key = "density_hist" if plot_id == "density-hist" else "l0_hist"
        counts = stats[key]["counts"]
        # Drawn: every non-empty bin, in order (empty bins at the ends are trimmed).
        start = next(i for i in range(len(counts)) if counts[i:i + len(drawn)] == drawn)
        assert sum(drawn) == sum(counts) > 0 and start >= 0
    shot("overview")

    page.click('th a[data-sort="max_act"]')
    page.wait_for_url(re.compile(r"sort=max_act"))
    shown = [int(i) for i in page.locator("table.features tbody tr").evaluate_all(
        "rows => rows.map(r => r.dataset.index)")]
    expected = server.get_json(
        f"/api/v1/saes/{SAE_ID}/features?sort=max_act&order=desc&per_page=50")["data"]
    assert shown == [r["index"] for r in expected]
    maxes = [r["max_act"] for r in expected]
    assert maxes == sorted(maxes, reverse=True)
    assert page.locator('th.sorted a[data-sort="max_act"]').inner_text().endswith("▼")

    # A second click flips the order.
    page.click('th a[data-sort="max_act"]')
    page.wait_for_url(re.compile(r"order=asc"))
    first = int(page.locator("table.features tbody tr").first.get_attribute("data-index"))
    asc = server.get_json(f"/api/v1/saes/{SAE_ID}/features?sort=max_act&order=asc&per_page=1")
    assert first == asc["data"][0]["index"]
    shot("overview-sorted")

    page.locator("table.features tbody tr a").first.click()
    page.wait_for_url(re.compile(rf"/{MODEL_ID}/{SAE_ID}/{first}$"))
    assert page.locator("h1").inner_text().endswith(f"#{first}")


def test_overview_filters_and_searches(page, server) -> None:
    page.goto(f"/{MODEL_ID}/{SAE_ID}")
    page.click('a[data-filter="labeled"]')
    page.wait_for_url(re.compile(r"filter=labeled"))
    labeled = server.get_json(f"/api/v1/saes/{SAE_ID}/features?filter=labeled")
    rows = page.locator("table.features tbody tr[data-index]")
    assert rows.count() == labeled["count"] == 2

    page.fill('.table-search input[name="q"]', "fox")  # the header also has a q box
    page.click(".table-search button")
    page.wait_for_url(re.compile(r"q=fox"))
    assert page.locator("table.features tbody tr[data-index]").evaluate_all(
        "rows => rows.map(r => r.dataset.index)") == ["4"]

    # Search by token: features whose top windows peak on a token.
    feature = server.get_json(f"/api/v1/saes/{SAE_ID}/features?per_page=1&filter=alive")["data"][0]
    token = feature["top_tokens"][0]
    page.goto(f"/{MODEL_ID}/{SAE_ID}")
    page.fill('.table-search input[name="token"]', token)
    page.click(".table-search button")
    page.wait_for_url(re.compile(r"[?&]token="))
    api = server.get_json(f"/api/v1/saes/{SAE_ID}/features?per_page=50&token={quote(token)}")
    shown = page.locator("table.features tbody tr[data-index]").evaluate_all(
        "rows => rows.map(r => Number(r.dataset.index))")
    assert feature["index"] in shown
    assert shown == [r["index"] for r in api["data"]]

    # Jump to an index.
    page.fill("form.jump input", "17")
    page.press("form.jump input", "Enter")
    page.wait_for_url(re.compile(rf"/{SAE_ID}/17$"))


def test_feature_page_shows_shaded_windows_and_a_histogram(page, server, shot) -> None:
    index = _alive_feature(server)
    data = server.get_json(f"/api/v1/saes/{SAE_ID}/features/{index}")
    page.goto(f"/{MODEL_ID}/{SAE_ID}/{index}")

    top = [a for a in data["activations"] if a["kind"] == "top"]
    windows = page.locator("#top-windows [data-win]")
    assert windows.count() == len(top) > 0
    # Each window's max matches the JSON twin, its max token is marked and its text is the
    # window's tokens (whitespace made visible, nothing dropped).
    for i, act in enumerate(top[:5]):
        win = windows.nth(i)
        assert math.isclose(float(win.locator(".win-max").inner_text()), act["maxValue"],
                            rel_tol=5e-3)
        tokens = win.locator(".t")
        assert tokens.count() == len(act["tokens"])
        marked = win.locator(".t.max")
        assert marked.count() == 1
        assert tokens.evaluate_all("ts => ts.findIndex(t => t.classList.contains('max'))") \
            == act["maxValueTokenIndex"]
    # Shading: opacity is value / max activation, on the tokens that fired.
    alphas = windows.first.locator(".t.on").evaluate_all(
        "ts => ts.map(t => Number(getComputedStyle(t).getPropertyValue('--a')))")
    assert alphas and max(alphas) > 0.5 and all(0 < a <= 1 for a in alphas)

    # Hovering a token shows its value.
    windows.first.locator(".t.max").hover()
    tooltip = page.locator("#tooltip")
    assert tooltip.is_visible()
    assert f"{top[0]['values'][top[0]['maxValueTokenIndex']]:.3g}" in tooltip.inner_text()

    # The activation histogram is drawn with the feature's counts, bars coloured by band.
    page.wait_for_selector("#act-hist[data-rendered=yes]")
    drawn = page.evaluate("document.getElementById('act-hist').data[0]")
    assert sum(drawn["y"]) == sum(data["hist"]["counts"]) > 0
    assert len(set(drawn["marker"]["color"])) > 1
    assert page.locator("#act-hist .bars path").count() > 0

    # Interval bands are collapsible and show their share.
    bands = page.locator("details.band")
    assert bands.count() == len(data["bands"])
    band_id = page.locator("details.band:not([open])").first.get_attribute("data-band")
    closed = page.locator(f"details.band[data-band='{band_id}']")
    assert not closed.locator(".windows").is_visible()
    closed.locator("summary").click()
    assert closed.get_attribute("open") is not None and closed.locator(".windows").is_visible()
    shown = [s.split("%")[0] for s in page.locator(".band-share").all_inner_texts()]
    # Each share is shown to 2 significant digits: allow half a unit of its last digit.
    rounding = sum(0.0 if s == "0" or "e" in s else 0.5 * 10.0 ** -len(s.partition(".")[2])
                   for s in shown)
    assert math.isclose(sum(float(s) for s in shown), 100 * sum(b["share"] for b in data["bands"]),
                        abs_tol=max(rounding, 0.01))

    # Logit effects as in the JSON.
    assert page.locator(".logit-table.pos tbody tr").count() == len(data["pos_str"])
    assert page.locator(".logit-table.neg tbody tr").count() == len(data["neg_str"])
    shot("feature")


def test_neighbour_link_and_keyboard_navigation(page, server) -> None:
    index = 5
    data = server.get_json(f"/api/v1/saes/{SAE_ID}/features/{index}")
    page.goto(f"/{MODEL_ID}/{SAE_ID}/{index}")
    page.locator("[data-neighbour]").first.click()
    target = data["topkCosSimIndices"][0]
    page.wait_for_url(re.compile(rf"/{SAE_ID}/{target}$"))

    page.goto(f"/{MODEL_ID}/{SAE_ID}/{index}")
    page.keyboard.press("j")
    page.wait_for_url(re.compile(rf"/{SAE_ID}/{index + 1}$"))
    page.keyboard.press("k")
    page.wait_for_url(re.compile(rf"/{SAE_ID}/{index}$"))
    page.keyboard.press("k")
    page.wait_for_url(re.compile(rf"/{SAE_ID}/{index - 1}$"))
    with page.expect_navigation():
        page.keyboard.press("r")
    assert re.search(rf"/{SAE_ID}/\d+$", page.url)
    assert page.locator("h1").inner_text().startswith("feature #")
    # "/" focuses the search box, and typing there does not navigate.
    url = page.url
    page.keyboard.press("/")
    assert page.evaluate("document.activeElement.id") == "top-search-input"
    page.keyboard.type("jk")
    assert page.url == url


def test_text_search_and_click_through(page, server, shot) -> None:
    page.goto(f"/{MODEL_ID}/{SAE_ID}")
    page.fill("#top-search-input", SEARCH_TEXT.splitlines()[0])
    page.press("#top-search-input", "Enter")
    page.wait_for_url(re.compile(rf"/{SAE_ID}/search\?text="))
    page.wait_for_selector("#search-tokens .t")

    page.fill("#search-text", SEARCH_TEXT)
    page.click(".search-form button")
    status, api = server.post_json(f"/api/v1/saes/{SAE_ID}/search", {"text": SEARCH_TEXT})
    assert status == 200
    page.wait_for_function(
        "n => document.querySelectorAll('#search-tokens .t').length === n", arg=len(api["tokens"]))
    shown = page.locator("#search-tokens .t").all_inner_texts()
    assert "↵" in "".join(shown) and "⇥" in "".join(shown)

    # The features firing most over the text, in the API's order, each linking to its page.
    links = page.locator("#text-features a[data-feature-link]")
    assert [int(x) for x in links.evaluate_all("as => as.map(a => a.dataset.featureLink)")] == [
        f["index"] for f in api["top_features"]]

    # Click a token: its top features.
    position = 3
    page.locator("#search-tokens .t").nth(position).click()
    listed = page.locator("#token-features a[data-feature-link]").evaluate_all(
        "as => as.map(a => Number(a.dataset.featureLink))")
    assert listed == [f["index"] for f in api["per_token"][position]]

    # Click a feature row: the text is shaded by that feature and its profile is plotted.
    first = api["top_features"][0]
    page.locator("#text-features tbody tr").first.locator("td").nth(2).click()
    page.wait_for_selector(f"#feature-profile[data-rendered='{first['index']}']")
    profile = page.evaluate("document.getElementById('feature-profile').data[0].y")
    assert len(profile) == len(api["tokens"])
    assert math.isclose(max(profile), first["max_value"], rel_tol=1e-4)
    shot("search")

    links.first.click()
    page.wait_for_url(re.compile(rf"/{SAE_ID}/{first['index']}$"))


def test_test_box_shows_the_feature_on_new_text(page, server) -> None:
    index = _alive_feature(server)
    page.goto(f"/{MODEL_ID}/{SAE_ID}/{index}")
    page.fill(".test-form textarea", SEARCH_TEXT)
    page.click(".test-form button")
    status, api = server.post_json(f"/api/v1/saes/{SAE_ID}/features/{index}/activations",
                                   {"text": SEARCH_TEXT})
    assert status == 200
    page.wait_for_selector(".test-result .t")
    spans = page.locator(".test-result .t")
    assert spans.count() == len(api["tokens"])
    values = spans.evaluate_all("ts => ts.map(t => Number(t.dataset.v))")
    assert math.isclose(values[api["maxValueTokenIndex"]], api["maxValue"], rel_tol=5e-3)
    assert page.locator(".test-result .t.max").count() == (1 if api["maxValue"] > 0 else 0)


def test_errors_render_as_pages_with_a_way_back(page, server, shot) -> None:
    response = page.goto(f"/{MODEL_ID}/{SAE_ID}/99999")
    assert response.status == 404
    assert "99999" in page.locator(".error-message").inner_text()
    page.locator(".error-links a", has_text="overview").click()
    page.wait_for_url(re.compile(rf"/{MODEL_ID}/{SAE_ID}$"))

    response = page.goto(f"/{MODEL_ID}/no-such-sae")
    assert response.status == 404
    shot("error-404")
    hrefs = page.locator(".error-links a").evaluate_all("as => as.map(a => a.pathname)")
    assert f"/{MODEL_ID}/{SAE_ID}" in hrefs and "/" in hrefs


def _assert_no_injected_markup(page) -> None:
    assert page.locator("img[src='x']").count() == 0


def test_hostile_tokens_and_labels_render_as_text(page, server, shot) -> None:
    # A label on the real SAE: the table and the feature page show it literally.
    page.goto(f"/{MODEL_ID}/{SAE_ID}?filter=labeled")
    cell = page.locator("table.features tr[data-index='3'] .label")
    assert cell.inner_text() == f"{XSS} label"
    page.goto(f"/{MODEL_ID}/{SAE_ID}/3")
    assert page.locator(".feature-label .label").inner_text() == f"{XSS} label"
    _assert_no_injected_markup(page)

    # A token in windows, tooltips, logit tables and the feature table.
    data = server.get_json(f"/api/v1/saes/{XSS_SAE_ID}/features/2")
    assert any(XSS in a["tokens"] for a in data["activations"])
    page.goto(f"/{XSS_MODEL_ID}/{XSS_SAE_ID}/2")
    assert page.locator(".feature-label .label").inner_text() == XSS
    window = page.locator("#top-windows [data-win]", has_text="onerror").first
    window.locator(".win-max").click()  # expanded: every token in view, none clipped
    assert "expanded" in window.get_attribute("class")
    hostile = window.locator(".t", has_text="onerror").first
    assert hostile.inner_text() == XSS
    hostile.hover()
    assert XSS in page.locator("#tooltip").inner_text()
    assert page.locator(".logit-table.pos .chip").first.inner_text() == XSS
    assert page.title().startswith("#2")
    # Document names, in the dividers where a window crosses into the next document.
    said = page.locator(".doc-break").evaluate_all(
        "ds => ds.map(d => d.getAttribute('aria-label') + d.title)")
    assert said and all(s.count(XSS) == 4 for s in said)
    shot("feature-xss")
    _assert_no_injected_markup(page)

    page.goto(f"/{XSS_MODEL_ID}/{XSS_SAE_ID}")
    chips = page.locator("table.features .top-tokens .chip").all_inner_texts()
    assert XSS in chips
    _assert_no_injected_markup(page)

    # Typed text with markup goes through the model and comes back as text, in the token box
    # and in the Plotly axis and hover labels.
    text = f"a {XSS} b"
    page.goto(f"/{MODEL_ID}/{SAE_ID}/search")
    page.fill("#search-text", text)
    page.click(".search-form button")
    page.wait_for_selector("#search-tokens .t")
    joined = "".join(page.locator("#search-tokens .t").all_inner_texts())
    assert XSS in joined.replace("·", " ")
    page.locator("#text-features tbody tr").first.locator("td").nth(2).click()
    page.wait_for_selector("#feature-profile[data-rendered]")
    ticks = "".join(page.locator("#feature-profile .xtick text").all_text_contents())
    assert "</" in ticks and "onerror" in ticks
    _assert_no_injected_markup(page)

    # The search page reached with hostile text in its URL.
    page.goto(f"/{MODEL_ID}/{SAE_ID}/search?text=" + "%3C%2Fscript%3E%3Cimg%20src%3Dx%20"
              "onerror%3Dalert(1)%3E")
    assert page.locator("#search-text").input_value() == XSS
    page.wait_for_selector("#search-tokens .t")
    _assert_no_injected_markup(page)


def test_token_display_agrees_between_server_and_browser(page, server) -> None:
    from app.web.templating import token_display, token_repr

    samples = [" the", "\n", "\n\n", "\t", " ", "   ", "", "a\r\nb", XSS, "é", "\x00"]
    page.goto("/")
    got = page.evaluate(
        """async (samples) => {
            const m = await import('/static/js/tokens.js');
            return samples.map(s => [m.tokenDisplay(s), m.tokenRepr(s)]);
        }""",
        samples,
    )
    assert got == [[token_display(s), token_repr(s)] for s in samples]
