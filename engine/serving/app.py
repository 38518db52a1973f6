"""The FastAPI app: endpoints, error bodies, the body-size bound and request metrics.

Handlers parse and preprocess in a thread pool (never on the event loop), submit jobs to the batcher and await
their rows. Every refusal is `{"error": "..."}` with its status: 400 malformed, 404 no such endpoint or no such
head in this checkpoint, 405 wrong method (with Allow), 413 too large, 503 (with Retry-After) queue full, loading,
failed or shutting down. The API's schema is served at /openapi.json (and /docs), from engine.serving.schema.
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from ..models import ModelConfig
from .asgi import RETRY_AFTER, error_response
from .batcher import Batcher, Job, QueueFull, Result, Unavailable
from .metrics import ServerMetrics
from .middleware import BodyLimit, Counted
from .page import page_html
from .payloads import (Prepared, Preprocessor, chat_response, embeddings_response, nlvr2_response, required,
                       top_k_of, vqa_response)
from .preprocess import RequestError, check_image_size
from .runner import Runner
from .schema import (REQUEST_MODELS, ChatRequest, ChatResponse, EmbeddingsRequest, EmbeddingsResponse, ErrorBody,
                     HealthBody, ModelList, NLVR2Form, NLVR2Request, NLVR2Response, SearchRequest, SearchResponse,
                     VQAForm, VQARequest, VQAResponse, errors, request_body, request_schemas)
from ..models.tasks import IMAGE_EMBEDDING, NLVR2, TEXT_EMBEDDING, VQA
from .search import SearchIndex, search_job
from .search_page import search_page_html

ENDPOINTS = ("/", "/health", "/metrics", "/v1/models", "/v1/vqa", "/v1/chat/completions", "/v1/embeddings",
             "/v1/nlvr2", "/search", "/v1/search", "/v1/images/{id}", "/openapi.json", "/docs")
# What every POST endpoint may answer besides 200.
_REFUSALS = errors(400, 404, 413, 503)


@dataclass
class ServerState:
    cfg: ModelConfig
    model_id: str
    tp: int
    dtype: Optional[str]  # known once the model is loaded (the device's default unless --dtype)
    kinds: Sequence[str]
    answers: Optional[List[str]]
    preprocessor: Preprocessor
    batcher: Batcher
    runner: Runner
    metrics: ServerMetrics
    pool: ThreadPoolExecutor
    request_timeout_s: float
    max_body_bytes: int
    created: int
    search: Optional[SearchIndex] = None  # engine.serve --index
    calibration: Optional[Dict[str, Any]] = None  # int8's calibration (Calibration.identity), once loaded
    int8_variant: Optional[Dict[str, Any]] = None  # int8's settings that are not the defaults, once loaded
    # More of /health's body, asked in the thread pool (engine.ray_serve: this replica and the running ones).
    fleet: Optional[Callable[[], Dict[str, Any]]] = None


def build_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="vlmo-tp", version="0.1.0", docs_url="/docs", redoc_url=None, openapi_url="/openapi.json",
                  description="VQA, OpenAI chat and embeddings, and NLVR2 on a tensor-parallel VLMo or BEiT-3 "
                              "checkpoint. Every error body is {\"error\": \"...\"}.")
    metrics = state.metrics
    _serve_request_schemas(app)

    # The metrics wrapper is outermost so that it also counts the body-size refusals.
    app.add_middleware(BodyLimit, limit=state.max_body_bytes)
    app.add_middleware(Counted, metrics=metrics, endpoints=ENDPOINTS)

    @app.exception_handler(RequestError)
    async def refused(_: Request, exc: RequestError) -> JSONResponse:
        return error_response(exc.status, str(exc))

    @app.exception_handler(QueueFull)
    @app.exception_handler(Unavailable)
    async def unavailable(_: Request, exc: Exception) -> JSONResponse:
        return error_response(503, str(exc))

    @app.exception_handler(HTTPException)
    async def httperror_response(_: Request, exc: HTTPException) -> JSONResponse:
        response = error_response(exc.status_code, str(exc.detail))
        response.headers.update(exc.headers or {})  # 405's Allow
        return response

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        # A bug of the server's, not the client's fault: still a JSON body (the traceback goes to the log).
        return error_response(500, f"internal error: {type(exc).__name__}")

    async def offload(fn: Callable, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(state.pool, fn, *args)

    def need(kind: str, head: str) -> None:
        if kind not in state.kinds:
            raise RequestError(f"this checkpoint has no {head} head (it serves: {', '.join(state.kinds)})", 404)
        if state.runner.failure:
            raise Unavailable(state.runner.failure)
        if not state.runner.ready:
            raise Unavailable("the model is loading")

    async def run(jobs: List[Prepared]) -> List[Result]:
        loop = asyncio.get_running_loop()
        queued = [Job(p.kind, p.inputs, loop, loop.create_future()) for p in jobs]
        state.batcher.submit_all(queued)
        try:
            return await asyncio.wait_for(asyncio.gather(*(asyncio.shield(j.future) for j in queued)),
                                          state.request_timeout_s)
        except asyncio.TimeoutError:
            for job in queued:
                job.abandoned = True  # leaves the queue if its batch has not started
            raise Unavailable(f"no answer within --request-timeout {state.request_timeout_s:g} s") from None

    def answered(began: float, prepared: Sequence[Prepared], results: Sequence[Result]) -> Dict[str, Any]:
        notes = [n for p in prepared for n in p.notes]
        extra: Dict[str, Any] = {"latency_ms": 1e3 * (time.perf_counter() - began),
                                 "forward_ms": max(r.forward_ms for r in results),
                                 "batch_size": results[0].batch_size, "truncated": bool(notes)}
        if notes:
            extra["warning"] = "; ".join(notes)
        return extra

    @app.get("/health", response_model=HealthBody,
             responses={503: {"model": Union[HealthBody, ErrorBody], "description": "Loading, or failed."}})
    async def health() -> JSONResponse:
        if state.runner.failure:
            return error_response(503, state.runner.failure)
        if not state.runner.ready:
            return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": RETRY_AFTER})
        return JSONResponse({"status": "ok", **(await offload(state.fleet) if state.fleet else {})})

    @app.get("/v1/models", response_model=ModelList)
    async def models() -> Dict[str, Any]:
        return {"object": "list", "data": [{
            "id": state.model_id, "object": "model", "created": state.created, "owned_by": "vlmo-tp",
            "family": state.cfg.family, "tasks": list(state.kinds), "tp": state.tp, "dtype": state.dtype,
            "image_size": state.cfg.image_size, "max_text_len": state.cfg.max_text_len,
            "answers": len(state.answers) if state.answers else None, "calibration": state.calibration,
            "int8_variant": state.int8_variant}]}

    @app.get("/metrics", response_class=Response,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                              "description": "Prometheus text format."}})
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return page_html(state.model_id, VQA in state.kinds, state.search is not None)

    async def image_task(request: Request, files: Sequence[str], text: str, make: Callable,
                         from_json: Callable[[bytes], Prepared]) -> Prepared:
        """A VQA or NLVR2 job from JSON, or from multipart: image `files`, the `text` field, optional top_k."""
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            return await offload(from_json, await request.body())
        form = await _form(request)
        images = [await _upload(form, name, state) for name in files]
        prepared = await offload(lambda: make(*(state.preprocessor.image(data, name)
                                                for data, name in zip(images, files)), required(form, text)))
        prepared.options["top_k"] = form.get("top_k")
        return prepared

    @app.post("/v1/vqa", response_model=VQAResponse, responses=_REFUSALS,
              openapi_extra=request_body(VQARequest, VQAForm))
    async def vqa(request: Request) -> Dict[str, Any]:
        began = time.perf_counter()
        need(VQA, "VQA")
        prepared = await image_task(request, ["image"], "question", state.preprocessor.vqa,
                                    state.preprocessor.vqa_json)
        k = top_k_of(prepared.options.get("top_k"), len(state.answers))
        results = await run([prepared])
        return {**vqa_response(results[0].output, state.answers, k), **answered(began, [prepared], results)}

    @app.post("/v1/chat/completions", response_model=ChatResponse, responses=_REFUSALS,
              openapi_extra=request_body(ChatRequest))
    async def chat(request: Request) -> Dict[str, Any]:
        began = time.perf_counter()
        need(VQA, "VQA")
        prepared = await offload(state.preprocessor.chat_json, await request.body())
        results = await run([prepared])
        answer = vqa_response(results[0].output, state.answers, 1)["answer"]
        response = chat_response(answer, state.model_id, prepared.tokens)
        response["vlmo"] = answered(began, [prepared], results)
        return response

    @app.post("/v1/nlvr2", response_model=NLVR2Response, responses=_REFUSALS,
              openapi_extra=request_body(NLVR2Request, NLVR2Form))
    async def nlvr2(request: Request) -> Dict[str, Any]:
        began = time.perf_counter()
        need(NLVR2, "NLVR2")
        prepared = await image_task(request, ["image_0", "image_1"], "sentence", state.preprocessor.nlvr2,
                                    state.preprocessor.nlvr2_json)
        results = await run([prepared])
        return {**nlvr2_response(results[0].output), **answered(began, [prepared], results)}

    @app.post("/v1/embeddings", response_model=EmbeddingsResponse, responses=_REFUSALS,
              openapi_extra=request_body(EmbeddingsRequest))
    async def embeddings(request: Request) -> Dict[str, Any]:
        began = time.perf_counter()
        need(IMAGE_EMBEDDING, "retrieval")
        prepared, data = await offload(state.preprocessor.embeddings_json, await request.body(),
                                       state.batcher.max_queue)
        results = await run(prepared)
        response = embeddings_response([r.output for r in results], state.model_id,
                                       data.get("encoding_format", "float"), sum(p.tokens for p in prepared))
        response["vlmo"] = answered(began, prepared, results)
        return response

    def need_index() -> SearchIndex:
        if state.search is None:
            raise RequestError("no index is served: start engine.serve with --index INDEX "
                               "(built by `python -m engine.index build`)", 404)
        return state.search

    @app.get("/search", response_class=HTMLResponse, responses=errors(404))
    async def search_page() -> str:
        return search_page_html(state.model_id, len(need_index().store))

    @app.post("/v1/search", response_model=SearchResponse, responses=_REFUSALS,
              openapi_extra=request_body(SearchRequest))
    async def search(request: Request) -> Dict[str, Any]:
        began = time.perf_counter()
        index = need_index()
        need(TEXT_EMBEDDING, "retrieval")
        prepared, top_k = await offload(search_job, state.preprocessor, index, await request.body())
        results = await run([prepared])
        found = await offload(index.search, results[0].output, top_k)
        return {"results": found, **answered(began, [prepared], results)}

    @app.get("/v1/images/{ident}", response_class=Response, responses={
        200: {"content": {"image/*": {"schema": {"type": "string", "format": "binary"}}},
              "description": "The indexed image's bytes, or a JPEG thumbnail (max_side)."}, **errors(400, 404)},
        openapi_extra={"parameters": [{"name": "max_side", "in": "query", "required": False,
                                       "schema": {"type": "integer", "minimum": 16, "maximum": 2048}}]})
    async def indexed_image(ident: str, request: Request) -> Response:
        data, media_type = await offload(need_index().image, ident, request.query_params.get("max_side"))
        return Response(data, media_type=media_type, headers={"Cache-Control": "private, max-age=3600"})

    return app


def _serve_request_schemas(app: FastAPI) -> None:
    """The request models' schemas join the components FastAPI makes of the response models (the handlers parse
    their bodies themselves, so FastAPI does not see them)."""
    make = app.openapi

    def openapi() -> Dict[str, Any]:
        if app.openapi_schema is None:
            schema = make()
            schema.setdefault("components", {}).setdefault("schemas", {}).update(request_schemas(REQUEST_MODELS))
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


async def _form(request: Request) -> Any:
    try:
        return await request.form(max_files=4, max_fields=16)
    except HTTPException as exc:
        raise RequestError(f"malformed multipart body: {exc.detail}") from None


async def _upload(form: Any, name: str, state: ServerState) -> bytes:
    upload = form.get(name)
    if upload is None:
        raise RequestError(f"missing field {name!r}")
    if not isinstance(upload, UploadFile):
        raise RequestError(f"{name}: expected a file part")
    return check_image_size(await upload.read(state.preprocessor.limits.max_image_bytes + 1), name,
                            state.preprocessor.limits)
