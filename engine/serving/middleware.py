"""ASGI middleware of the server: the request-body bound and the request metrics."""
from __future__ import annotations

import time
from typing import Any, Callable, Dict, Sequence

from .asgi import HttpOnly, error_response
from .metrics import ServerMetrics
from .preprocess import RequestError


class BodyLimit(HttpOnly):
    """413 for a body over --max-body-bytes: from Content-Length up front, or while a chunked body streams in."""

    def __init__(self, app: Callable, limit: int) -> None:
        super().__init__(app)
        self.limit = limit

    async def http(self, scope: Dict[str, Any], receive: Callable, send: Callable) -> None:
        message = f"request body larger than --max-body-bytes {self.limit}"
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await error_response(413, message)(scope, receive, send)
        seen = 0

        async def bounded() -> Dict[str, Any]:
            nonlocal seen
            received = await receive()
            seen += len(received.get("body", b""))
            if seen > self.limit:
                raise RequestError(message, 413)
            return received

        await self.app(scope, bounded, send)


class Counted(HttpOnly):
    """Requests by endpoint and status, and their latency (paths other than `endpoints` count as "other"; an
    endpoint with a {parameter} stands for every value of its last segment)."""

    def __init__(self, app: Callable, metrics: ServerMetrics, endpoints: Sequence[str]) -> None:
        super().__init__(app)
        self.metrics, self.endpoints = metrics, set(endpoints)
        # "/v1/images/{id}": any one path segment after the prefix
        self.templates = {e.split("{", 1)[0]: e for e in endpoints if "{" in e}

    def endpoint(self, path: str) -> str:
        if path in self.endpoints:
            return path
        prefix, _, rest = path.rpartition("/")
        return self.templates.get(prefix + "/", "other") if rest else "other"

    async def http(self, scope: Dict[str, Any], receive: Callable, send: Callable) -> None:
        began = time.perf_counter()
        endpoint = self.endpoint(scope["path"])
        status = ["500"]

        async def noted(message: Dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = str(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, noted)
        finally:
            self.metrics.requests.labels(endpoint, status[0]).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - began)
