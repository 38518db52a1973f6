"""Errors that Ray Serve's HTTP proxy makes itself, in engine.serve's shape: `{"error": ...}` with Retry-After.

The proxy answers in plain text when a request waited past its timeout (408), when every replica's queue is
full (503) or when the replica died under a request (500). Clients of engine.serve expect a JSON body and 503
for all three (the server could not answer; try again), so this middleware, installed in the proxy through
RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=engine.serving.ray_proxy:middlewares, rewrites them. JSON responses
(everything the app itself says) pass through untouched.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List

from starlette.middleware import Middleware

from .asgi import HttpOnly, error_response

REFUSED = (408, 500, 503)  # the proxy's own failures: the request was not answered, retrying may work


class JsonErrors(HttpOnly):
    async def http(self, scope: Dict[str, Any], receive: Callable, send: Callable) -> None:
        held: Dict[str, Any] = {}

        async def reshape(message: Dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                kind = dict(message.get("headers", [])).get(b"content-type", b"")
                if message["status"] >= 400 and not kind.startswith(b"application/json"):
                    held.update(status=message["status"], body=b"")
                    return
            if held and message["type"] == "http.response.body":
                held["body"] += message.get("body", b"")
                if not message.get("more_body", False):
                    status = 503 if held["status"] in REFUSED else held["status"]
                    text = held["body"].decode(errors="replace").strip() or f"HTTP {held['status']}"
                    await error_response(status, text)(scope, receive, send)
                return
            await send(message)

        await self.app(scope, receive, reshape)


def middlewares() -> List[Middleware]:
    """The proxy callback's answer: the middlewares wrapped around Serve's HTTP proxy."""
    return [Middleware(JsonErrors)]
