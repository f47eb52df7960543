"""The browser page at ``/ui/``: plain HTML, JavaScript and CSS shipped in this folder, served by the same
``bentoml serve`` as the API (``CSCService.mount_asgi_app(page_app(), path="/ui")``).

The page calls the service's own endpoints from the browser (``/metadata``, ``/denoise``, ``/encode``,
``/atoms``, ``/explain``) with the bearer token typed into it. Its files are open like ``/docs.json``: the
guard checks the token on ``POST`` requests only. Nothing is fetched from elsewhere, and the content security
policy below keeps it so. ``/`` stays BentoML's own page (the Swagger UI of every endpoint); the page links
to it.

Only the files named in ``FILES`` are served: the folder also holds this module.
"""

from __future__ import annotations

from pathlib import Path

UI_DIR = Path(__file__).resolve().parent
FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "arrays.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "sample.png": "image/png",
}
HEADERS = {
    "Cache-Control": "no-cache",  # revalidated each time: a new release shows at once
    "X-Content-Type-Options": "nosniff",
    # Its own files, the images it draws (blob: and data: URLs) and the API at the same origin: nothing else.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; "
                               "script-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'self'; "
                               "frame-ancestors 'none'",
}


def page_app():
    """An ASGI app serving ``FILES`` at ``/`` (``index.html``) and ``/<name>``; anything else is a 404."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import FileResponse, PlainTextResponse, Response
    from starlette.routing import Route

    async def serve(request: Request) -> Response:
        name = request.path_params.get("name", "index.html")
        path = UI_DIR / name
        if name not in FILES or not path.is_file():
            return PlainTextResponse("not found", status_code=404)
        return FileResponse(path, media_type=FILES[name], headers=HEADERS)

    return Starlette(routes=[Route("/", serve, methods=["GET", "HEAD"]),
                             Route("/{name}", serve, methods=["GET", "HEAD"])])
