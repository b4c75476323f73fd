"""Headers on every answer of the service, as a pure ASGI middleware.

Content-Security-Policy lets a page load only from the service itself (plus inline code and data:
images, which the operator's page and Swagger UI use), so the browser makes no third-party request
even where a bundled script would: ReDoc's bundle always fetches its "API docs by Redocly" logo from a
CDN, which the policy blocks. `nosniff` keeps browsers from reading an answer as another content type.
"""
from __future__ import annotations

POLICY = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
          "img-src 'self' data:; font-src 'self' data:; worker-src 'self' blob:; connect-src 'self'; "
          "frame-ancestors 'self'; base-uri 'self'; form-action 'self'")
HEADERS = [(b"content-security-policy", POLICY.encode()), (b"x-content-type-options", b"nosniff")]


class SecurityHeaders:
    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *HEADERS]}
            await send(message)

        await self.app(scope, receive, with_headers)
