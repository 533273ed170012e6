"""The dashboard: static files shipped in the package (``nodepass/master/ui/``), served
at ``{prefix}/`` and ``{prefix}/ui/``, public — everything they show comes from the
seed API, with the key the user enters in the page (docs/dashboard.md).

No CDN, no build step: the page, its ES modules and its stylesheet are read from the
package at start.  Every answer carries a Content-Security-Policy that allows scripts,
styles and requests from the master itself only, and no inline script.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from klein import Klein
from twisted.web.iweb import IRequest

UI = Path(__file__).parent / "ui"
ASSETS = {
    "app.js": "text/javascript; charset=utf-8",
    "api.js": "text/javascript; charset=utf-8",
    "charts.js": "text/javascript; charset=utf-8",
    "format.js": "text/javascript; charset=utf-8",
    "urlform.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "icon.svg": "image/svg+xml",
}
HEADERS = {
    b"Content-Security-Policy": b"default-src 'none'; script-src 'self'; style-src 'self'; "
                                b"img-src 'self' data:; connect-src 'self'; base-uri 'self'; "
                                b"form-action 'none'; frame-ancestors 'none'",
    b"X-Content-Type-Options": b"nosniff",
    b"Referrer-Policy": b"no-referrer",
    b"Cache-Control": b"no-cache",
}


class Dashboard:
    """The page and its files, for a master whose API is at ``{prefix}/v1``."""

    def __init__(self, prefix: str, auth: bool = True, files: Path = UI) -> None:
        self.prefix = prefix
        page = (files / "index.html").read_text(encoding="utf-8")
        # The page asks for the key only when the API wants one (auth=1).
        self._page = (page.replace("{{base}}", html.escape(f"{prefix}/ui/"))
                      .replace("{{api}}", html.escape(f"{prefix}/v1"))
                      .replace("{{auth}}", "1" if auth else "0")).encode()
        self._assets = {name: (files / name).read_bytes() for name in ASSETS}

    def public_paths(self) -> list[str]:
        """Every path the dashboard serves (the gate lets them pass without a key)."""
        return [f"{self.prefix}/", f"{self.prefix}/ui/", *self._asset_paths()]

    def _asset_paths(self) -> list[str]:
        return [f"{self.prefix}/ui/{name}" for name in ASSETS]

    def route(self, app: Klein, dialect: Any) -> None:
        """GET the page and each file; any other method is ``dialect``'s 405."""
        for path in (f"{self.prefix}/", f"{self.prefix}/ui/"):
            app.route(path, methods=["GET", "HEAD"], endpoint=f"dashboard {path}")(
                lambda request: self._answer(request, "text/html; charset=utf-8", self._page))
        for name, path in zip(ASSETS, self._asset_paths(), strict=True):
            app.route(path, methods=["GET", "HEAD"], endpoint=f"dashboard {path}")(
                lambda request, name=name: self._answer(request, ASSETS[name],
                                                        self._assets[name]))
        for path in self.public_paths():
            app.route(path, endpoint=f"dashboard {path} refused")(
                lambda request: dialect.wrong_method(request, _allow(request)))

    @staticmethod
    def _answer(request: IRequest, content_type: str, body: bytes) -> bytes:
        request.setHeader(b"Content-Type", content_type.encode())
        for name, value in HEADERS.items():
            request.setHeader(name, value)
        return body


def _allow(request: IRequest) -> list[str]:
    request.setHeader(b"Allow", b"GET, HEAD")
    return ["GET", "HEAD"]
