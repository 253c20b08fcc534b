"""create_app(): the FastAPI application with its routers, problem+json errors and limits."""

from __future__ import annotations

import gc
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Response
from fastapi.responses import PlainTextResponse
from fastapi_offline import FastAPIOffline
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from sqlalchemy import text

from app.artifacts.inspect_model import start_validator_server
from app.artifacts.router import router as artifacts_router
from app.audits.router import router as audits_router
from app.core.config import get_settings
from app.core.db import get_engine
from app.core.errors import install_error_handlers, problem_response
from app.core.limits import BodySizeLimit
from app.core.openapi import install_openapi
from app.ui import router as ui_router

log = logging.getLogger("pbrf_audit")

HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
REQUESTS = Counter("pbrf_http_requests_total", "HTTP requests", ["method", "route", "status"])
LATENCY = Histogram("pbrf_http_request_seconds", "HTTP request latency", ["method", "route"])

DESCRIPTION = """
Find likely mislabeled training examples with influence scores that approximate the proximal Bregman
response function (PBRF, Bae et al. 2022). Upload a model and its training set, start an audit,
poll it, then page through the flagged examples. Errors are RFC 9457 `application/problem+json`.
"""


def _announce_auth(settings) -> None:
    from app.auth import service as auth
    from app.core.db import get_sessionmaker

    try:
        with get_sessionmaker()() as session:
            secured = auth.any_keys(session, auth.static_keys(settings.api_keys))
    except Exception:  # the schema may not exist yet; requests will say so
        return
    if not secured:
        log.warning("NO API KEYS CONFIGURED: the API is OPEN to anyone who can reach it (tenant 'default'). "
                    "Create one with `pbrf-audit keys create --tenant NAME` or set PBRF_API_KEYS.")


class RequestMetrics:
    """Counts and times requests per method, route template and status, as a plain ASGI middleware
    (Starlette's BaseHTTPMiddleware runs every response through an extra task and memory stream)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500  # an exception that escapes the app becomes a 500 further out

        async def recording_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            # the router records the matched route in the scope; label values come from a fixed set, so
            # a client inventing HTTP methods or paths cannot add a series per request
            path = getattr(scope.get("route"), "path", "unmatched")
            method = scope["method"] if scope["method"] in HTTP_METHODS else "other"
            REQUESTS.labels(method, path, str(status)).inc()
            LATENCY.labels(method, path).observe(time.perf_counter() - started)


def create_app() -> FastAPI:
    settings = get_settings()
    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        _announce_auth(settings)
        start_validator_server()  # its imports run in the background; the first upload need not wait for them
        # Everything imported so far (torch, onnx, pydantic schemas: about a million objects) lives as long
        # as the process. Left in the collector's generations, each full collection walks all of it and
        # stalls every request for tens of milliseconds; frozen, collections see only request garbage.
        gc.collect()
        gc.freeze()
        yield

    # /docs and /redoc from Swagger UI and ReDoc files inside the fastapi-offline wheel: no CDN, works offline
    app = FastAPIOffline(title="pbrf-audit", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    install_error_handlers(app)
    install_openapi(app)
    app.include_router(artifacts_router)
    app.include_router(audits_router)
    app.include_router(ui_router)  # the review page at /ui (and / redirects there)

    @app.get("/healthz", tags=["operations"], summary="The process is up")
    def healthz():
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"], summary="Database and broker are reachable",
             responses={503: {"description": "A dependency is unreachable"}})
    def readyz():
        checks = {}
        try:
            with get_engine().connect() as conn:
                conn.execute(text("SELECT 1"))
            checks["database"] = "ok"
        except Exception as exc:
            checks["database"] = f"error: {type(exc).__name__}"
        try:
            from worker.celery_app import celery_app

            with celery_app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, timeout=2)
            checks["broker"] = "ok"
        except Exception as exc:
            checks["broker"] = f"error: {type(exc).__name__}"
        if all(v == "ok" for v in checks.values()):
            return {"status": "ok", "checks": checks}
        return problem_response(503, "not-ready", "; ".join(f"{k}: {v}" for k, v in checks.items()))

    @app.get("/metrics", tags=["operations"], summary="Prometheus metrics", response_class=PlainTextResponse,
             responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}})
    def metrics_endpoint():
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    # Multipart framing adds a little to the file itself; allow for it.
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_upload_bytes + 64 * 1024)
    app.add_middleware(RequestMetrics)  # added last: outermost, so it sees the 413 the limit answers
    if settings.embedded_broker:
        log.warning("embedded mode: SQLite at %s, artifacts in %s, filesystem broker in %s",
                    settings.database_url, settings.storage_dir, settings.queue_dir)
    return app
