// Starts Swagger UI on /docs. A static file rather than FastAPI's inline script, so the page
// passes a Content-Security-Policy without 'unsafe-inline'.
(function () {
  const root = document.getElementById("swagger-ui");
  window.ui = SwaggerUIBundle({
    url: root.dataset.openapiUrl,
    dom_id: "#swagger-ui",
    // Off: with deep links each operation's path is a link inside its expand button (nested
    // interactive controls, which screen readers and axe-core reject).
    deepLinking: false,
    presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset],
    layout: "BaseLayout",
    // No badge from the public validator: the page makes no request beyond this server.
    validatorUrl: null,
  });
})();
