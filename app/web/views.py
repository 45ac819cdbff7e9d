"""View models of the explorer's pages: the store's read models -> what the templates loop over."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from markupsafe import Markup, escape

from app.api.autointerp_schemas import series_json
from app.api.public_paths import public_path
from app.records import CE_ABLATION_GAP_MIN_NATS, ce_loss_figures
from app.store.read_models import (
    AutointerpSummary,
    FeatureDetail,
    FeaturePage,
    ModelInfo,
    SAEInfo,
    WindowDocument,
    WindowInfo,
)
from app.web.templating import (
    fmt_num,
    shade_class,
    span_table,
    token_run_html,
    token_runs_html,
)

# The feature table: its filters, columns (key, heading, sortable) and sortable keys.
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


def _doc_label(doc: WindowDocument) -> str:
    return doc.name if doc.name is not None else f"document {doc.doc_index}"


def document_breaks(w: WindowInfo) -> list[tuple[int, str]]:
    """Where a window crosses into another document (at the BOS that opens it), and what its
    divider says: the documents on either side."""
    return [(d.offset, f"document boundary: {_doc_label(before)} ends, {_doc_label(d)} starts")
            for before, d in zip(w.documents, w.documents[1:], strict=False) if d.offset > 0]


def windows_html(windows: list[WindowInfo], *, vocab: list[str], max_act: float) -> list[Markup]:
    """Each window as the page shows it: max value, shaded tokens (a divider where the window
    crosses into another document), the documents' names.

    Assembled in Python rather than by a Jinja loop (over a page's dozens of windows, the loop's
    attribute lookups and filters cost more than the strings), all of a page's windows in one
    call so numpy's per-call overhead is paid once. Document names are escaped.
    """
    table = span_table(vocab)
    runs: list[Markup | None] = [None] * len(windows)
    batch, where, batch_breaks = [], [], []
    for n, w in enumerate(windows):
        values = w.values if w.values_f16 is None else w.values_f16
        max_pos = min(max(int(w.max_pos), 0), max(len(w.tokens) - 1, 0))
        breaks = document_breaks(w)
        if table.covers(w.token_ids):
            batch.append((w.token_ids, values, max_pos))
            batch_breaks.append(breaks)
            where.append(n)
        else:  # ids the stored vocabulary lacks: shown by their "<id>" strings
            runs[n] = token_run_html(w.tokens, values, max_value=max_act, max_pos=max_pos,
                                     breaks=breaks)
    for n, html in zip(where, token_runs_html(batch, table=table, max_value=max_act,
                                              breaks=batch_breaks), strict=True):
        runs[n] = html
    out = []
    for w, tokens in zip(windows, runs, strict=True):
        names = [_doc_label(d) for d in w.documents] if w.documents else (
            [w.doc_name] if w.doc_name else [])
        doc = (f'<span class="win-doc">{escape(" → ".join(names))}</span>' if names else "")
        out.append(Markup(
            '<div class="win centred" tabindex="0" data-win><span class="win-max" '
            f'title="max activation in this window">{escape(fmt_num(w.max_value))}</span>'
            f'<span class="toks">{tokens}</span>{doc}</div>'
        ))
    return out


def feature_view(detail: FeatureDetail) -> dict[str, Any]:
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
            "shade": shade_class(0.25 + 0.75 * (b.band + 1) / max(n_bands, 1)),
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
        "n_drafts": len(detail.drafts),
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


def sae_view(sae: SAEInfo, *, home: Path) -> dict[str, Any]:
    """Header, statistics and histograms of an SAE (home rows and the overview page); a corpus
    path shows relative to the data folder `home`."""
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
        "corpus": public_path(run.corpus, home=home) if run else None,
        "n_tokens": run.n_tokens if run else None,
        "n_dead": stats.get("n_dead"),
        "n_dense": stats.get("n_dense"),
        "mean_l0": stat("mean_l0"),
        "explained_variance": stat("explained_variance"),
        **_ce_view(stats if stats.get("ce_loss_recovered") is not None else metrics),
        "n_labeled": sae.n_labeled,
        "has_run": run is not None,
        "density_hist": _hist(stats.get("density_hist")),
        "l0_hist": _hist(stats.get("l0_hist")),
    }


SCORE_METHOD_TITLES = {
    "detection": "Detection: which windows activate, read from the description",
    "fuzzing": "Fuzzing: which windows have their strongest tokens marked",
}


def autointerp_view(summary: AutointerpSummary) -> dict[str, Any]:
    """The SAE overview's automatic descriptions: counts, labels per explainer, and per score
    method a histogram of every source's scores beside its controls (one bar series each)."""
    rows = [series_json(s) for s in summary.series]
    charts = []
    for method, title in SCORE_METHOD_TITLES.items():
        mine = [r for r in rows if r["method"] == method]
        if not any(r["n"] for r in mine):
            continue
        series = [{"name": f"{r['source']} · scored by {r['scorer']}", "counts": r["counts"]}
                  for r in mine if r["n"]]
        # One control series per scorer: it does not depend on whose text was scored.
        controls: dict[str, list[int]] = {}
        for r in mine:
            counts = controls.setdefault(r["scorer"], [0] * len(r["control_counts"]))
            controls[r["scorer"]] = [a + b for a, b in zip(counts, r["control_counts"],
                                                           strict=True)]
        series += [{"name": f"random explanation · scored by {scorer}", "counts": counts,
                    "control": True} for scorer, counts in controls.items() if any(counts)]
        charts.append({"method": method, "title": title,
                       "data": {"edges": mine[0]["edges"], "series": series}})
    return {"labeled": summary.labeled, "drafted": summary.drafted,
            "accepted": summary.accepted, "explainers": summary.explainers, "scores": rows,
            "charts": charts, "any": bool(summary.explainers or rows)}


def _ce_view(stats: dict[str, Any]) -> dict[str, Any]:
    """CE loss recovered with the nats the SAE adds beside it, and why the ratio is flagged when
    it is; all figures from one evaluation (the run's when it measured them, else training's)."""
    ce = ce_loss_figures(stats)
    increase = ce["ce_loss_increase"]
    ce["ce_loss_increase_text"] = (
        None if increase is None else f"{'+' if increase >= 0 else ''}{fmt_num(increase)} nats")
    ce["ce_loss_unreliable_note"] = (
        f"unreliable: zero-ablating the hook adds only {fmt_num(ce['ce_loss_ablation_gap'])} "
        f"nats (under {CE_ABLATION_GAP_MIN_NATS}), so the ratio swings widely; read the nats "
        "the SAE adds" if ce["ce_loss_recovered_unreliable"] else None)
    return ce


def _hist(data: Any) -> dict[str, list[float]]:
    if not isinstance(data, dict):
        return {"edges": [], "counts": []}
    return {"edges": list(data.get("edges", [])), "counts": list(data.get("counts", []))}


def home_models(models: list[ModelInfo], saes: list[SAEInfo], *,
                home: Path) -> list[dict[str, Any]]:
    """The home page's models, each with the rows of its SAEs."""
    return [
        {
            "id": model.id,
            "architecture": model.architecture,
            "n_layers": model.n_layers,
            "d_model": model.d_model,
            "vocab_size": model.vocab_size,
            "saes": [sae_view(s, home=home) for s in saes if s.model_id == model.id],
        }
        for model in models
    ]


def feature_table_view(
    table: FeaturePage, *, per_page: int, sort: str, order: str, filter: str,  # noqa: A002
    q: str, token: str, tag: str, page: int,
) -> dict[str, Any]:
    """The feature table of an SAE page: rows, paging, the query that keeps filters in links."""
    n_pages = max((table.total + per_page - 1) // per_page, 1)
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
    return {
        "rows": table.items,
        "total": table.total,
        "page": table.page,
        "n_pages": n_pages,
        "filter": filter,
        "query": {**query, "sort": sort, "order": order},
        "note": ", ".join(note),
    }
