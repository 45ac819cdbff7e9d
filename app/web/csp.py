"""Content-Security-Policy exceptions of the pages that need one; every other page gets the
strict default (app/api/security_headers.PAGE_CSP). Each exception is named in the README."""

from __future__ import annotations

from app.api.security_headers import PAGE_CSP

# Plotly adds its stylesheet as an empty <style> element and fills it through the CSSOM
# (insertRule), which CSP does not govern; the hash of the empty string admits that element and
# no inline style with content, nor any style attribute.
EMPTY_STYLE_HASH = "'sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU='"
PLOT_PAGE_CSP = f"{PAGE_CSP}; style-src 'self' {EMPTY_STYLE_HASH}"
PLOT_PAGE_HEADERS = {"Content-Security-Policy": PLOT_PAGE_CSP}

# /docs: Swagger UI's stylesheet draws its icons (select arrows, expanders) as data: URI images.
DOCS_CSP = f"{PAGE_CSP}; img-src 'self' data:"
DOCS_HEADERS = {"Content-Security-Policy": DOCS_CSP}
