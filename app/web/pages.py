"""HTML pages of the explorer; each reads through app/store/queries.py like its /api/v1 twin.

Pages: home, SAE overview (feature table), feature page, text search, random feature, the
Plotly bundle from the `plotly` package, and error pages by status.
"""

from __future__ import annotations

import gzip
from functools import lru_cache
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from markupsafe import Markup, escape

from app.api.deps import SessionDep, run_read
from app.errors import NotFoundError
from app.store import queries
from app.store.db import read_session
from app.web.templating import (
    PLOTLY_VERSION,
    feature_url,
    fmt_num,
    sae_url,
    search_url,
    span_table,
    templates,
    token_run_html,
    token_runs_html,
)

router = APIRouter(tags=["pages"], include_in_schema=False)

FEATURE_TABLE_PER_PAGE = 50
FILTERS = (
    ("all", "all"),
    ("alive", "alive"),
    ("dead", "dead"),
    ("dense", "dense"),
    ("labeled", "labeled"),
    ("unlabeled", "unlabeled"),
)
COLUMNS = (
    ("index", "#", True),
    ("label", "label", False),
    ("frac_nonzero", "density", True),
    ("max_act", "max act", True),
    ("mean_act", "mean act", True),
    ("top_tokens", "top tokens", False),
)
SORTABLE = ("index", "frac_nonzero", "max_act", "mean_act")
ERROR_TITLES = {
    400: "Bad request",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    422: "That input cannot be used",
    429: "Too many requests",
    500: "Something went wrong",
    503: "Busy, try again shortly",
}


# --- Plotly, served from the installed package -------------------------------------------------


@lru_cache(maxsize=1)
def _plotly_bundle() -> tuple[bytes, bytes]:
    from plotly.offline import get_plotlyjs

    raw = get_plotlyjs().encode("utf-8")
    return raw, gzip.compress(raw, compresslevel=6, mtime=0)


@router.get("/assets/plotly-{version}.min.js")
def plotly_js(version: str, request: Request) -> Response:
    """The Plotly bundle; the version is in the URL, so browsers may keep it for a year."""
    raw, packed = _plotly_bundle()
    headers = {
        "Cache-Control": "public, max-age=31536000, immutable",
        "Vary": "Accept-Encoding",
    }
    if version != PLOTLY_VERSION:
        # An old page asking for a previous version: send the current one, but don't pin it.
        headers["Cache-Control"] = "no-cache"
    if "gzip" in request.headers.get("accept-encoding", ""):
        headers["Content-Encoding"] = "gzip"
        return Response(packed, media_type="text/javascript", headers=headers)
    return Response(raw, media_type="text/javascript", headers=headers)


@router.get("/_ping")
async def ping() -> Response:
    """A route that does nothing: the baseline the serving benchmark compares pages with."""
    return Response("ok", media_type="text/plain")


# --- view models: JSON-twin dicts -> what the templates loop over ------------------------------


def windows_html(windows: list[Any], *, vocab: list[str], max_act: float) -> list[Markup]:
    """Each window as the page shows it: max value, shaded tokens, document name.

    Assembled in Python rather than by a Jinja loop (a page has ~50 windows; the loop's
    attribute lookups and filters cost more than the strings), all of a page's windows in one
    call so numpy's per-call overhead is paid once. Document names are escaped.
    """
    table = span_table(vocab)
    runs: list[Markup | None] = [None] * len(windows)
    batch, where = [], []
    for n, w in enumerate(windows):
        values = w.values if w.values_f16 is None else w.values_f16
        max_pos = min(max(int(w.max_pos), 0), max(len(w.tokens) - 1, 0))
        if table.covers(w.token_ids):
            batch.append((w.token_ids, values, max_pos))
            where.append(n)
        else:  # ids the stored vocabulary lacks: shown by their "<id>" strings
            runs[n] = token_run_html(w.tokens, values, max_value=max_act, max_pos=max_pos)
    for n, html in zip(where, token_runs_html(batch, table=table, max_value=max_act),
                       strict=True):
        runs[n] = html
    out = []
    for w, tokens in zip(windows, runs, strict=True):
        doc = f'<span class="win-doc">{escape(w.doc_name)}</span>' if w.doc_name else ""
        out.append(Markup(
            '<div class="win centred" tabindex="0" data-win><span class="win-max" '
            f'title="max activation in this window">{escape(fmt_num(w.max_value))}</span>'
            f'<span class="toks">{tokens}</span>{doc}</div>'
        ))
    return out


def feature_view(detail: Any) -> dict[str, Any]:
    """Template context of a feature page from queries.get_feature's FeatureDetail."""
    scale = detail.max_act or 1.0
    html = windows_html(detail.windows, vocab=detail.vocab, max_act=scale)
    top: list[Markup] = []
    by_band: dict[int, list[Markup]] = {}
    for w, w_html in zip(detail.windows, html, strict=True):
        if w.kind == "top":
            top.append(w_html)
        else:
            by_band.setdefault(w.band, []).append(w_html)
    n_bands = len(detail.bands)
    # Highest band first: it reads like a continuation of the top activations.
    bands = [
        {
            "band": b.band,
            "lo": b.lo,
            "hi": b.hi,
            "share": b.share,
            "count": b.count,
            "shade": f"{0.25 + 0.75 * (b.band + 1) / max(n_bands, 1):.2f}",
            "n_windows": len(by_band.get(b.band, [])),
            "windows_html": Markup("").join(by_band.get(b.band, [])),
        }
        for b in sorted(detail.bands, key=lambda b: -b.band)
    ]
    band_edges = [detail.bands[0].lo, *(b.hi for b in detail.bands)] if detail.bands else []
    base = f"/{detail.model_id}/{detail.sae_id}"
    return {
        "model_id": detail.model_id,
        "sae_id": detail.sae_id,
        "index": detail.index,
        "d_sae": detail.d_sae,
        "label": detail.label,
        "frac_nonzero": detail.frac_nonzero,
        "max_act": detail.max_act,
        "mean_act": detail.mean_act,
        "count": detail.count,
        "n_tokens": detail.n_tokens_counted,
        "dead": detail.count == 0,
        "n_top": len(top),
        "top_html": Markup("").join(top),
        "bands": bands,
        "hist": {
            "edges": detail.hist_edges,
            "counts": detail.hist_counts,
            "band_edges": band_edges,
        },
        "logits_pos": [(t.token, t.value) for t in detail.logits_pos],
        "logits_neg": [(t.token, t.value) for t in detail.logits_neg],
        "neighbours": [
            {"index": i, "cos": c, "label": detail.neighbour_labels.get(i)}
            for i, c in detail.neighbours
        ],
        "prev_url": f"{base}/{detail.index - 1}" if detail.index > 0 else None,
        "next_url": f"{base}/{detail.index + 1}" if detail.index + 1 < detail.d_sae else None,
    }


def sae_view(sae: Any) -> dict[str, Any]:
    """Header, statistics and histograms of an SAE (home rows and the overview page)."""
    run = sae.run
    stats = (run.sae_stats if run else {}) or {}
    metrics = sae.train_metrics or {}

    def stat(key: str) -> Any:
        value = stats.get(key)
        return metrics.get(key) if value is None else value

    return {
        "model_id": sae.model_id,
        "sae_id": sae.id,
        "id": sae.id,
        "hook_name": sae.hook_name,
        "architecture": sae.architecture,
        "k": (sae.cfg or {}).get("k"),
        "d_sae": sae.d_sae,
        "corpus": run.corpus if run else None,
        "n_tokens": run.n_tokens if run else None,
        "n_dead": stats.get("n_dead"),
        "n_dense": stats.get("n_dense"),
        "mean_l0": stat("mean_l0"),
        "explained_variance": stat("explained_variance"),
        "ce_loss_recovered": stat("ce_loss_recovered"),
        "n_labeled": sae.n_labeled,
        "has_run": run is not None,
        "density_hist": _hist(stats.get("density_hist")),
        "l0_hist": _hist(stats.get("l0_hist")),
    }


def _hist(data: Any) -> dict[str, list[float]]:
    if not isinstance(data, dict):
        return {"edges": [], "counts": []}
    return {"edges": list(data.get("edges", [])), "counts": list(data.get("counts", []))}


# --- routes -------------------------------------------------------------------------------------


def _sae_for_page(session: Any, *, model_id: str, sae_id: str) -> Any:
    """The SAE of a page URL; a URL naming the wrong model for a known SAE is a 404 too."""
    sae = queries.get_sae(session=session, sae_id=sae_id)
    if sae.model_id != model_id:
        raise NotFoundError(
            f"SAE {sae_id!r} belongs to model {sae.model_id!r}, not {model_id!r}; "
            f"see {sae_url(sae.model_id, sae_id)}"
        )
    return sae


def _chrome(
    session: Any, *, crumbs: list[tuple[str, str | None]], model_id: str | None = None,
    sae_id: str | None = None,
) -> dict[str, Any]:
    """Context every page shares: breadcrumbs and the top bar's text-search target."""
    # list_models carries the SAE ids and skips the statistics list_saes would decode.
    choices = [
        {"model_id": m.id, "id": sae_id}
        for m in queries.list_models(session=session) for sae_id in m.sae_ids
    ]
    target = None
    if sae_id is not None and model_id is not None:
        target = {"model_id": model_id, "sae_id": sae_id}
    elif choices:
        target = {"model_id": choices[0]["model_id"], "sae_id": choices[0]["id"]}
    return {"crumbs": crumbs, "search_target": target, "search_choices": choices}


@router.get("/", response_class=HTMLResponse)
def home_page(request: Request, session: SessionDep) -> HTMLResponse:
    models = []
    saes = queries.list_saes(session=session)
    for model in queries.list_models(session=session):
        models.append({
            "id": model.id,
            "architecture": model.architecture,
            "n_layers": model.n_layers,
            "d_model": model.d_model,
            "vocab_size": model.vocab_size,
            "saes": [sae_view(s) for s in saes if s.model_id == model.id],
        })
    context = {"models": models, **_chrome(session, crumbs=[])}
    return templates.TemplateResponse(request, "pages/home.html", context)


@router.get("/{model_id}/{sae_id}", response_class=HTMLResponse)
def sae_page(
    request: Request,
    session: SessionDep,
    model_id: str,
    sae_id: str,
    sort: queries.SortKey = "index",
    order: str = "",
    filter: queries.FilterKey = "all",  # noqa: A002 - the query parameter's public name
    q: str = "",
    token: str = "",
    tag: str = "",
    page: int = Query(1, ge=1),
    jump: int | None = None,
) -> Response:
    """Overview of one SAE with its feature table; ?jump=N goes straight to feature N."""
    sae = _sae_for_page(session, model_id=model_id, sae_id=sae_id)
    if jump is not None:
        return RedirectResponse(feature_url(model_id, sae_id, jump), status_code=303)
    if order not in ("asc", "desc"):
        order = "asc" if sort == "index" else "desc"
    table = queries.list_features(
        session=session, sae_id=sae_id, sort=sort, order=order, filter=filter,
        tag=tag or None, q=q or None, token=token or None, page=page,
        per_page=FEATURE_TABLE_PER_PAGE,
    )
    n_pages = max((table.total + FEATURE_TABLE_PER_PAGE - 1) // FEATURE_TABLE_PER_PAGE, 1)
    query = {"sort": sort if sort != "index" else None, "order": order if sort != "index"
             or order != "asc" else None, "filter": filter if filter != "all" else None,
             "q": q, "token": token, "tag": tag, "page": page if page > 1 else None}
    note = []
    if token:
        note.append(f"whose top windows peak on a token matching “{token}”")
    if q:
        note.append(f"with “{q}” in the label")
    if tag:
        note.append(f"tagged {tag}")
    context = {
        "s": sae_view(sae),
        "t": {
            "rows": table.items,
            "total": table.total,
            "page": table.page,
            "n_pages": n_pages,
            "filter": filter,
            "query": {**query, "sort": sort, "order": order},
            "note": ", ".join(note),
        },
        "filters": FILTERS,
        "columns": COLUMNS,
        "sortable": SORTABLE,
        **_chrome(session, crumbs=[(model_id, None), (sae_id, None)], model_id=model_id,
                  sae_id=sae_id),
    }
    return templates.TemplateResponse(request, "pages/sae.html", context)


@router.get("/{model_id}/{sae_id}/random")
def random_feature_page(session: SessionDep, model_id: str, sae_id: str) -> RedirectResponse:
    _sae_for_page(session, model_id=model_id, sae_id=sae_id)
    index = queries.random_feature(session=session, sae_id=sae_id)
    # 303 + no-store: each press of "r" must land somewhere new, never a cached redirect.
    return RedirectResponse(
        feature_url(model_id, sae_id, index), status_code=303,
        headers={"Cache-Control": "no-store"},
    )


@router.get("/{model_id}/{sae_id}/search", response_class=HTMLResponse)
def search_page(
    request: Request, session: SessionDep, model_id: str, sae_id: str, text: str = ""
) -> HTMLResponse:
    """Text search: the page runs POST /api/v1/saes/{sae_id}/search from the browser."""
    sae = _sae_for_page(session, model_id=model_id, sae_id=sae_id)
    context = {
        "s": sae_view(sae),
        "text": text,
        **_chrome(session, crumbs=[(model_id, None), (sae_id, sae_url(model_id, sae_id)),
                                   ("text search", None)], model_id=model_id, sae_id=sae_id),
    }
    return templates.TemplateResponse(request, "pages/search.html", context)


def feature_template() -> Any:
    return templates.get_template("pages/feature.html")  # compiled once, cached by Jinja


@router.get("/{model_id}/{sae_id}/{index:int}", response_class=HTMLResponse)
async def feature_page(request: Request, model_id: str, sae_id: str, index: int) -> HTMLResponse:
    def render(session: Any) -> str:
        detail = queries.get_feature(session=session, sae_id=sae_id, index=index)
        if detail.model_id != model_id:
            _sae_for_page(session, model_id=model_id, sae_id=sae_id)  # raises the 404
        context = {
            "f": feature_view(detail),
            **_chrome(session, crumbs=[(model_id, None), (sae_id, sae_url(model_id, sae_id)),
                                       (f"#{index}", None)], model_id=model_id, sae_id=sae_id),
        }
        # Rendered on the read thread too: it is most of the page's cost.
        return feature_template().render(request=request, **context)

    return HTMLResponse(await run_read(request, render))


# --- error pages ----------------------------------------------------------------------------------


def wants_html(request: Request) -> bool:
    """True for page requests: not under /api or /static, and the client takes HTML."""
    path = request.url.path
    if path.startswith(("/api/", "/static/", "/assets/")) or path in ("/docs", "/openapi.json"):
        return False
    return "text/html" in request.headers.get("accept", "")


def _known_saes(request: Request) -> list[Any]:
    """SAEs to offer as a way back; an error page must render even when the database cannot."""
    engine = getattr(request.app.state, "db_engine", None)
    if engine is None:
        return []
    try:
        with read_session(engine) as session:
            return queries.list_saes(session=session)
    except Exception:  # noqa: BLE001 - the page reports the original error, not this one
        return []


def error_page(
    request: Request, *, status_code: int, message: str, headers: dict[str, str] | None = None
) -> HTMLResponse:
    """The error page for a status: what went wrong, and links to pages that exist."""
    saes = _known_saes(request)
    parts = [p for p in request.url.path.split("/") if p]
    back: list[tuple[str, str]] = []
    here = next((s for s in saes if len(parts) >= 2 and (s.model_id, s.id) == tuple(parts[:2])),
                None)
    if here is not None:
        back.append((f"{here.id} overview", sae_url(here.model_id, here.id)))
        back.append(("text search", search_url(here.model_id, here.id)))
    else:
        back += [(f"{s.model_id} · {s.id}", sae_url(s.model_id, s.id)) for s in saes[:4]]
    back.append(("home", "/"))
    choices = [{"model_id": s.model_id, "id": s.id} for s in saes]
    target = here or (saes[0] if saes else None)
    context = {
        "status_code": status_code,
        "title": ERROR_TITLES.get(status_code, "Error"),
        "message": message,
        "back_links": back,
        "crumbs": [],
        "search_target": {"model_id": target.model_id, "sae_id": target.id} if target else None,
        "search_choices": choices,
    }
    return templates.TemplateResponse(
        request, "errors/error.html", context, status_code=status_code, headers=headers
    )


def render_html_error(
    request: Request, status_code: int, message: str, headers: dict[str, str] | None = None
) -> Response | None:
    """app.state.html_error_renderer: an error page for browsers, None (JSON) for the rest."""
    if not wants_html(request):
        return None
    return error_page(request, status_code=status_code, message=message, headers=headers)
