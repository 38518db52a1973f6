"""The server's torch-free ASGI pieces: every refusal's body and the base of HTTP-only middleware (Ray's HTTP proxy
imports them, engine.serving.ray_proxy, without loading the model's dependencies)."""
from __future__ import annotations

from typing import Any, Callable, Dict

from fastapi.responses import JSONResponse

RETRY_AFTER = "1"  # seconds, on every 503


def error_response(status: int, message: str) -> JSONResponse:
    """Every refusal's body: {"error": "..."}; a 503 also says when to retry."""
    headers = {"Retry-After": RETRY_AFTER} if status == 503 else None
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class HttpOnly:
    """Pass everything but HTTP requests straight through; subclasses handle the HTTP ones in `http`."""

    def __init__(self, app: Callable) -> None:
        self.app = app

    async def __call__(self, scope: Dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        return await self.http(scope, receive, send)

    async def http(self, scope: Dict[str, Any], receive: Callable, send: Callable) -> None:
        raise NotImplementedError
