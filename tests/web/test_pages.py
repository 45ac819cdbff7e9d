"""HTML page routes through the real app (TestClient) over a real SQLite file of synthetic records.

Each page is compared with its JSON twin under /api/v1; hostile tokens and labels must reach the
HTML only in escaped form.
"""

from __future__ import annotations

import gzip
import html
import re
from collections.abc import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from app.store.read_models import WindowDocument, WindowInfo
from app.web.templating import PLOTLY_VERSION, token_run_html
from app.web.views import windows_html
from tests.factories import SyntheticRun, synthetic_database, synthetic_run

XSS = "</script><img src=x onerror=alert(1)>"
MODEL_ID = "tiny-llama"
SAE_ID = "1-res-topk-64"
HTML = {"Accept": "text/html,application/xhtml+xml"}


@pytest.fixture
def records(tmp_path) -> tuple[str, SyntheticRun]:
    db_url = f"sqlite:///{tmp_path / 'pages.db'}"
    vocab = [f"t{i}" for i in range(100)]
    vocab[5] = XSS
    vocab[6] = "\n"
    rec = synthetic_run(d_sae=32, n_dead=2, seed=3, token_strings=vocab)
    rec.sequences.tokens[:, 2::4] = 5  # the hostile token in every window
    rec.features.logit_pos_ids[:, 0] = 5
    rec.sequences.doc_names[:] = [f"{XSS}{i}" for i in range(len(rec.sequences.doc_names))]
    synthetic_database(db_url, rec, labels=[
        {"sae_id": SAE_ID, "index": 4, "description": XSS, "tags": ["html"]},
    ])
    return db_url, rec


@pytest.fixture
def client(records, tmp_path) -> Iterator[TestClient]:
    db_url, _ = records
    settings = Settings(home=tmp_path, database_url=db_url, load_model=False)
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield c


def _no_raw_payload(text: str) -> None:
    assert "<img" not in text and "onerror=alert(1)>" not in text
    assert "</script><img" not in text


def test_home_lists_models_and_saes(client) -> None:
    page = client.get("/", headers=HTML)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for sae in client.get("/api/v1/saes").json()["data"]:
        assert f'href="/{sae["model_id"]}/{sae["id"]}"' in page.text
        assert f'{sae["n_labeled"]} / {sae["d_sae"]}' in page.text


def test_feature_page_matches_its_json_twin(client, records) -> None:
    _, rec = records
    index = 10
    data = client.get(f"/api/v1/saes/{SAE_ID}/features/{index}").json()
    page = client.get(f"/{MODEL_ID}/{SAE_ID}/{index}", headers=HTML)
    assert page.status_code == 200
    text = page.text
    top = [a for a in data["activations"] if a["kind"] == "top"]
    assert text.count("data-win") == len(data["activations"])
    # One marked max token per window; as many token spans as tokens.
    assert text.count(' max"') + text.count(" max ") >= len(data["activations"])
    n_tokens = sum(len(a["tokens"]) for a in data["activations"])
    assert len(re.findall(r'<span class="t[ "]', text)) == n_tokens
    # Window maxima in the page's order are the JSON's.
    shown = [float(v) for v in re.findall(r'class="win-max"[^>]*>([^<]+)<', text)][:len(top)]
    assert shown == pytest.approx([a["maxValue"] for a in top], rel=5e-3)
    # The histogram data block is the feature's counts; neighbours link to their pages.
    assert f'"counts": {data["hist"]["counts"]}'.replace(" ", "") in text.replace(" ", "")
    for n in data["topkCosSimIndices"]:
        assert f'href="/{MODEL_ID}/{SAE_ID}/{n}" data-neighbour' in text
    assert f'href="/{MODEL_ID}/{SAE_ID}/{index - 1}"' in text
    assert f'href="/{MODEL_ID}/{SAE_ID}/{index + 1}"' in text
    assert rec.sae.d_sae == data["d_sae"]


def test_feature_page_marks_each_document_boundary_its_json_lists(client) -> None:
    """A window crossing into another document shows a divider before the BOS that opens it,
    named (title, aria-label) by both documents; every name escaped."""
    dividers = re.compile(r'<span class="doc-break" role="separator" title="([^"]*)" '
                          r'aria-label="([^"]*)"></span><span class="t[^"]*"[^>]*'
                          r' data-doc="([^"]*)">')
    crossings = 0
    for index in range(2, 32):
        data = client.get(f"/api/v1/saes/{SAE_ID}/features/{index}").json()
        text = client.get(f"/{MODEL_ID}/{SAE_ID}/{index}", headers=HTML).text
        _no_raw_payload(text)
        want = [f"document boundary: {before['name']} ends, {d['name']} starts"
                for a in data["activations"]
                for before, d in zip(a["documents"], a["documents"][1:], strict=False)]
        found = dividers.findall(text)
        assert text.count('class="doc-break"') == len(found) == len(want)
        assert sorted(html.unescape(title) for title, _, _ in found) == sorted(want)
        assert all(title == label == said for title, label, said in found)
        crossings += len(want)
    assert crossings > 0


def test_first_and_last_feature_have_one_neighbour_link(client) -> None:
    first = client.get(f"/{MODEL_ID}/{SAE_ID}/0", headers=HTML).text
    last = client.get(f"/{MODEL_ID}/{SAE_ID}/31", headers=HTML).text
    assert 'data-nav="prev"' not in first and 'data-nav="next"' in first
    assert 'data-nav="next"' not in last and 'data-nav="prev"' in last


def test_overview_table_follows_the_api(client) -> None:
    page = client.get(f"/{MODEL_ID}/{SAE_ID}?sort=max_act&order=desc", headers=HTML)
    assert page.status_code == 200
    shown = [int(i) for i in re.findall(r'<tr data-index="(\d+)"', page.text)]
    api = client.get(f"/api/v1/saes/{SAE_ID}/features?sort=max_act&order=desc&per_page=50")
    assert shown == [r["index"] for r in api.json()["data"]]

    dead = client.get(f"/{MODEL_ID}/{SAE_ID}?filter=dead", headers=HTML).text
    assert [int(i) for i in re.findall(r'<tr data-index="(\d+)"', dead)] == [0, 1]
    labeled = client.get(f"/{MODEL_ID}/{SAE_ID}?tag=html", headers=HTML).text
    assert re.findall(r'<tr data-index="(\d+)"', labeled) == ["4"]


def test_jump_and_random_redirect_to_feature_pages(client) -> None:
    jump = client.get(f"/{MODEL_ID}/{SAE_ID}?jump=7", follow_redirects=False)
    assert jump.status_code == 303 and jump.headers["location"] == f"/{MODEL_ID}/{SAE_ID}/7"
    for _ in range(5):
        rnd = client.get(f"/{MODEL_ID}/{SAE_ID}/random", follow_redirects=False)
        assert rnd.status_code == 303 and rnd.headers["cache-control"] == "no-store"
        index = int(rnd.headers["location"].rsplit("/", 1)[1])
        assert index >= 2  # features 0 and 1 are dead; random picks alive ones


@pytest.mark.parametrize(
    ("path", "status"),
    [
        (f"/{MODEL_ID}/no-such-sae", 404),
        (f"/{MODEL_ID}/{SAE_ID}/999", 404),
        (f"/other-model/{SAE_ID}", 404),
        (f"/{MODEL_ID}/{SAE_ID}?sort=nonsense", 422),
        (f"/{MODEL_ID}/{SAE_ID}/search/extra/path", 404),
    ],
)
def test_errors_are_pages_for_browsers_and_json_for_clients(client, path, status) -> None:
    page = client.get(path, headers=HTML)
    assert page.status_code == status
    assert page.headers["content-type"].startswith("text/html")
    assert f'data-status="{status}"' in page.text
    assert 'href="/"' in page.text
    if status == 404 and "no-such" in path:
        # The way back names SAEs that exist, not the missing one.
        assert f'href="/{MODEL_ID}/{SAE_ID}"' in page.text
        assert f'href="/{MODEL_ID}/no-such-sae"' not in page.text
    as_json = client.get(path, headers={"Accept": "application/json"})
    assert as_json.status_code == status
    assert set(as_json.json()["error"]) == {"status", "message"}


def test_hostile_text_reaches_html_only_escaped(client) -> None:
    escaped = html.escape(XSS, quote=True)
    feature = client.get(f"/{MODEL_ID}/{SAE_ID}/4", headers=HTML).text
    _no_raw_payload(feature)
    assert feature.count(escaped) > 3  # label, windows, logit table
    overview = client.get(f"/{MODEL_ID}/{SAE_ID}", headers=HTML).text
    _no_raw_payload(overview)
    assert escaped in overview
    search = client.get(f"/{MODEL_ID}/{SAE_ID}/search", params={"text": XSS}, headers=HTML).text
    _no_raw_payload(search)
    assert escaped in search
    missing = client.get(f"/{MODEL_ID}/{SAE_ID}/search/{XSS}", headers=HTML).text
    _no_raw_payload(missing)


def test_plotly_is_served_from_the_package_with_long_caching(client) -> None:
    from plotly.offline import get_plotlyjs

    url = f"/assets/plotly-{PLOTLY_VERSION}.min.js"
    packed = client.get(url, headers={"Accept-Encoding": "gzip"})
    assert packed.status_code == 200
    assert "immutable" in packed.headers["cache-control"]
    assert packed.headers["content-encoding"] == "gzip"
    assert packed.content == get_plotlyjs().encode()  # httpx decodes gzip
    plain = client.get(url, headers={"Accept-Encoding": "identity"})
    assert "content-encoding" not in plain.headers and plain.content == packed.content
    assert len(gzip.compress(plain.content)) < len(plain.content) / 2
    page = client.get(f"/{MODEL_ID}/{SAE_ID}/3", headers=HTML).text
    assert f'src="{url}"' in page


def test_static_files_and_versioned_urls(client) -> None:
    page = client.get("/", headers=HTML).text
    css = re.search(r'href="(/static/css/app\.css\?v=[0-9a-f]{10})"', page)
    assert css is not None
    assert client.get(css.group(1)).status_code == 200
    assert client.get("/static/js/tokens.js").headers["content-type"].startswith(
        ("text/javascript", "application/javascript"))


def test_token_run_html_escapes_shades_and_marks_the_max() -> None:
    out = str(token_run_html(["a", XSS, "\n", " "], [0.0, 2.0, 1.0, 0.0], max_value=4.0,
                             max_pos=1))
    _no_raw_payload(out)
    spans = re.findall(r"<span class=\"t[^\"]*\"[^>]*>[^<]*</span>", out)
    assert len(spans) == 4
    assert 'class="t on max sh50" data-v="2"' in spans[1]
    assert html.escape(XSS) in spans[1]
    assert '"t on sh25"' in spans[2] and ">↵<" in spans[2] and 'data-tok="“\\n”"' in spans[2]
    assert spans[0] == '<span class="t">a</span>'
    assert ">·<" in spans[3]
    # Centred layout: tokens before the max in .pre, after it in .post.
    assert out.index('class="pre"') < out.index(" max") < out.index('class="post"')


def test_windows_html_by_id_matches_the_string_renderer_and_handles_unknown_ids() -> None:
    vocab = ["a", XSS, "\n", " ", "b"]
    values = np.array([0.0, 2.0, 1.0, 0.0], np.float16)
    known = WindowInfo("top", -1, 0, [0, 1, 2, 3], [vocab[i] for i in (0, 1, 2, 3)],
                       values.astype(np.float32).tolist(), 2.0, 1, 0, 0, "doc<1>", values)
    unknown = WindowInfo("top", -1, 1, [4, 99], ["b", "<99>"], [1.0, 0.0], 1.0, 0, 0, 0, None,
                         np.array([1.0, 0.0], np.float16))
    first, second = windows_html([known, unknown], vocab=vocab, max_act=4.0)
    by_string = token_run_html(known.tokens, known.values, max_value=4.0, max_pos=1)
    assert str(by_string) in str(first)
    assert "doc&lt;1&gt;" in str(first)
    _no_raw_payload(str(first))
    assert "&lt;99&gt;" in str(second) and ">b<" in str(second)
    # The same page rendered twice reads the filled table: identical output.
    assert windows_html([known, unknown], vocab=vocab, max_act=4.0) == [first, second]


def test_windows_html_puts_a_named_divider_before_the_bos_of_the_next_document() -> None:
    vocab = ["<bos>", "a", "b"]
    values = np.array([0.0, 2.0, 0.0, 1.0, 0.5], np.float16)
    docs = (WindowDocument(0, 3, "first.txt"), WindowDocument(2, 4, XSS),
            WindowDocument(4, 5, None))
    crossing = WindowInfo("top", -1, 0, [1, 2, 0, 1, 0], [vocab[i] for i in (1, 2, 0, 1, 0)],
                          values.astype(np.float32).tolist(), 2.0, 1, 7, 3, "first.txt", values,
                          docs)
    inside = WindowInfo("top", -1, 1, [1, 2], ["a", "b"], [2.0, 0.0], 2.0, 0, 7, 0,
                        "first.txt", np.array([2.0, 0.0], np.float16), docs[:1])
    out, plain = (str(h) for h in windows_html([crossing, inside], vocab=vocab, max_act=4.0))
    _no_raw_payload(out)
    assert "doc-break" not in plain
    # Centred on the max (token 1): both boundaries fall after it.
    post = out[out.index('class="post"'):]
    assert post.count('class="doc-break"') == out.count('class="doc-break"') == 2
    said = [html.unescape(t) for t in re.findall(r'aria-label="([^"]*)"', out)]
    assert said == [f"document boundary: first.txt ends, {XSS} starts",
                    f"document boundary: {XSS} ends, document 5 starts"]
    # Each divider sits right before the BOS that opens the document, which names it too.
    for bos in re.findall(r'role="separator"[^>]*></span>(<span class="t[^>]*>[^<]*</span>)',
                          out):
        assert "&lt;bos&gt;" in bos and "data-doc=" in bos
    assert html.unescape(re.search(r'class="win-doc">([^<]*)<', out)[1]) == \
        f"first.txt → {XSS} → document 5"
