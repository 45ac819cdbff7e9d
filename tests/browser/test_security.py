"""Pages under their own Content-Security-Policy, and /docs offline, in Debian's Chromium.

Every request to a host other than the server's loopback address is aborted and recorded, so a
page that reached for a CDN fails here as it would on an offline machine. CSP violations are
collected from `securitypolicyviolation` events (console errors are checked by the page fixture).
"""

from __future__ import annotations

from urllib.parse import urlparse

import pytest

pytestmark = pytest.mark.browser

MODEL_ID = "tiny-llama"
SAE_ID = "2-res-topk-128"
LOOPBACK = {"127.0.0.1", "localhost"}
RECORD_VIOLATIONS = """
window.__csp = [];
document.addEventListener("securitypolicyviolation",
  (e) => window.__csp.push(`${e.violatedDirective} ${e.blockedURI} ${e.sourceFile}`));
"""


@pytest.fixture
def offline_page(page):  # noqa: ANN001, ANN201
    """The page fixture with every non-loopback request aborted and CSP violations recorded."""
    page.outside = []

    def route(r) -> None:  # noqa: ANN001
        if urlparse(r.request.url).hostname in LOOPBACK:
            r.continue_()
        else:
            page.outside.append(r.request.url)
            r.abort()

    page.context.route("**/*", route)
    page.add_init_script(RECORD_VIOLATIONS)
    return page


def _assert_clean(page) -> None:  # noqa: ANN001
    page.wait_for_load_state("networkidle")
    assert page.evaluate("window.__csp") == [], "CSP violations"
    assert page.outside == [], "requests beyond this server"


def test_docs_render_offline_under_their_policy(offline_page, server) -> None:
    response = offline_page.goto("/docs")
    csp = response.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe" not in csp
    operations = sum(len(methods) for methods in server.get_json("/openapi.json")["paths"].values())
    offline_page.wait_for_function("n => document.querySelectorAll('.opblock').length === n",
                                   arg=operations)
    # Open an operation and its "Try it out" form: selects draw their arrows from data: images.
    offline_page.locator(".opblock-summary", has_text="/features/{index}").first.click()
    offline_page.locator("button.try-out__btn").first.click()
    offline_page.wait_for_selector(".opblock-body input, .opblock-body select")
    _assert_clean(offline_page)


@pytest.mark.parametrize("path", [
    "/",
    f"/{MODEL_ID}/{SAE_ID}",
    f"/{MODEL_ID}/{SAE_ID}/search?text=the+quick+brown+fox",
    "feature",
])
def test_pages_pass_their_policy(offline_page, server, path) -> None:
    if path == "feature":
        rows = server.get_json(f"/api/v1/saes/{SAE_ID}/features?filter=alive&per_page=1")
        path = f"/{MODEL_ID}/{SAE_ID}/{rows['data'][0]['index']}"
    response = offline_page.goto(path)
    headers = response.headers
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["x-frame-options"] == "DENY"
    csp = headers["content-security-policy"]
    assert "script-src 'self';" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    # What draws after load: the plots, and the search page's tokens from the API.
    if path.startswith(f"/{MODEL_ID}/{SAE_ID}/search"):
        offline_page.wait_for_selector("#search-tokens .t")
        offline_page.locator("#text-features tbody tr").first.locator("td").nth(2).click()
        offline_page.wait_for_selector("#feature-profile[data-rendered]")
    elif path != "/":
        offline_page.wait_for_selector(".plot[data-rendered]")
    _assert_clean(offline_page)
