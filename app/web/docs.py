"""/docs: Swagger UI for the JSON API, served from the installed swagger-ui-bundle-v2 package (no
CDN, no copy in this repository); its start-up script is a static file, so the page runs under
the same Content-Security-Policy as the explorer."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from app.web.csp import DOCS_HEADERS
from app.web.templating import templates

SWAGGER_PREFIX = "/assets/swagger-ui"

router = APIRouter(include_in_schema=False)


def mount_swagger_assets(app: FastAPI) -> bool:
    """Serve the package's Swagger UI files; False when the package is not installed."""
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ModuleNotFoundError:
        return False
    app.mount(SWAGGER_PREFIX, StaticFiles(directory=str(swagger_ui_path)), name="swagger-ui")
    return True


@router.get("/docs", response_class=HTMLResponse)
def docs_page(request: Request) -> HTMLResponse:
    """Swagger UI over /openapi.json."""
    version = swagger_version()
    context = {"swagger": SWAGGER_PREFIX, "version": version,
               "openapi_url": request.app.openapi_url, "title": request.app.title}
    return templates.TemplateResponse(request, "docs.html", context,
                                      headers=DOCS_HEADERS)


def swagger_version() -> str:
    """The bundled Swagger UI's version (its folder name), to version the asset URLs."""
    from swagger_ui_bundle import swagger_ui_path

    return swagger_ui_path.name.removeprefix("swagger-ui-")
