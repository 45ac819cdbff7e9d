"""Every page of the explorer, for the checks that run on all of them (axe-core in test_a11y.py).

A page added to the app is added here with one line: its name, its path (with {model}, {sae},
{feature} and {drafted}, a feature with a scored automatic draft, filled from the live server's
database) and, when it draws after load, a `ready` selector or an `act` that brings it into the
state worth checking (results shown, rows open).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MODEL_ID = "tiny-llama"
SAE_ID = "2-res-topk-128"
SEARCH_TEXT = "Once upon a time the quick brown fox jumped over the lazy dog.\n\tdef scale(x):"


def _open_search_feature(page: Any) -> None:
    """Shade the text by the first listed feature (the profile plot shows)."""
    page.locator("#text-features tbody tr").first.locator("td").nth(2).click()
    page.wait_for_selector("#feature-profile[data-rendered]")


def _run_test_box(page: Any) -> None:
    """Run the feature's test box and open a window: shaded tokens on every background."""
    page.fill(".test-form textarea", SEARCH_TEXT)
    page.click(".test-form button")
    page.wait_for_selector(".test-result .t")
    page.locator("#top-windows [data-win]").first.locator(".win-max").click()
    page.eval_on_selector_all("details.band", "ds => ds.forEach(d => { d.open = true; })")


def _steer_and_sweep(page: Any) -> None:
    """Generate side by side, then sweep: both columns, the grid and the chart shown."""
    page.fill("#steer-prompt", "Once upon a time")
    page.fill("#steer-max-new", "6")
    page.click("#steer-go")
    page.wait_for_selector("[data-steer-lab][data-state=done]")
    page.fill("#steer-sweep-values", "0, 20")
    page.click("#steer-sweep-go")
    page.wait_for_selector("#steer-sweep-plot[data-rendered=yes]")


@dataclass(frozen=True)
class AppPage:
    name: str
    path: str
    ready: str | None = None
    act: Callable[[Any], None] | None = None
    status: int = 200

    def url(self, *, feature: int, drafted: int | None = None) -> str:
        return self.path.format(model=MODEL_ID, sae=SAE_ID, feature=feature, drafted=drafted)


PAGES: list[AppPage] = [
    AppPage("home", "/"),
    AppPage("overview", "/{model}/{sae}", ready="#score-hist-fuzzing[data-rendered]"),
    AppPage("overview-labeled", "/{model}/{sae}?filter=labeled&sort=max_act"),
    AppPage("feature", "/{model}/{sae}/{feature}", ready=".plot[data-rendered]",
            act=_run_test_box),
    AppPage("feature-drafted", "/{model}/{sae}/{drafted}",
            ready="[data-all-labels] .label-row.automatic table.label-scores"),
    AppPage("queue-drafts", "/{model}/{sae}/queue?order=draft_highest&mode=review",
            ready="[data-queue-pending] table.label-scores"),
    AppPage("queue-write-drafts", "/{model}/{sae}/queue?order=draft_lowest",
            ready="[data-queue-drafts] table.label-scores"),
    AppPage("search-empty", "/{model}/{sae}/search"),
    AppPage("search", "/{model}/{sae}/search?text=the+quick+brown+fox%0A%09def+f(x)%3A",
            ready="#search-tokens .t", act=_open_search_feature),
    AppPage("steer", "/steer?sae={sae}&feature={feature}&value=20",
            ready="#steer-features tbody tr", act=_steer_and_sweep),
    AppPage("label-queue", "/{model}/{sae}/queue",
            ready="[data-queue-card]:not([hidden]), [data-queue-done]:not([hidden])"),
    AppPage("label-search", "/labels/search?q=story"),
    AppPage("sign-in", "/sign-in"),
    AppPage("docs", "/docs", ready=".opblock"),
    AppPage("not-found", "/{model}/no-such-sae", status=404),
]
