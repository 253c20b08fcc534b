"""RFC 9457 problem+json errors. Every error the API returns goes through here, with a stable `type`."""

from __future__ import annotations

from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

PROBLEM_BASE = "https://pbrf-audit.dev/problems/"
PROBLEM_MEDIA_TYPE = "application/problem+json"


class Problem(BaseModel):
    """An RFC 9457 problem document (media type application/problem+json)."""

    model_config = ConfigDict(extra="allow")  # RFC 9457 extension members may ride along

    type: str = Field(description="Stable identifier of the kind of problem: https://pbrf-audit.dev/problems/<slug>")
    title: str = Field(description="Short summary of the status")
    status: int = Field(description="The HTTP status code")
    detail: str = Field(description="What went wrong for this request, and what to fix")
    instance: str | None = Field(None, description="The request path")
    errors: list[dict] | None = Field(None, description="Request validation errors: loc, msg, type")


class ProblemError(Exception):
    def __init__(self, status: int, slug: str, detail: str, title: str | None = None, errors: list[dict] | None = None,
                 headers: dict | None = None):
        super().__init__(detail)
        self.headers = headers
        self.status = status
        self.slug = slug
        self.detail = detail
        self.title = title or HTTPStatus(status).phrase
        self.errors = errors


def not_found(kind: str, object_id) -> ProblemError:
    return ProblemError(404, "not-found", f"no {kind} with id {object_id}")


def problem_response(status: int, slug: str, detail: str, title: str | None = None, instance: str | None = None,
                     errors: list[dict] | None = None, headers: dict | None = None) -> JSONResponse:
    body = Problem(type=PROBLEM_BASE + slug, title=title or HTTPStatus(status).phrase, status=status,
                   detail=detail, instance=instance, errors=errors)
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status, media_type=PROBLEM_MEDIA_TYPE,
                        headers=headers)


_SLUGS = {400: "bad-request", 401: "unauthorized", 403: "forbidden", 404: "not-found", 405: "method-not-allowed",
          406: "not-acceptable", 409: "conflict", 413: "payload-too-large", 415: "unsupported-media-type",
          422: "validation-error", 429: "too-many-requests", 500: "internal-error", 503: "unavailable"}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ProblemError)
    async def _problem(request: Request, exc: ProblemError):
        return problem_response(exc.status, exc.slug, exc.detail, exc.title, str(request.url.path), exc.errors,
                                headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        return problem_response(exc.status_code, _SLUGS.get(exc.status_code, "http-error"), detail,
                                instance=str(request.url.path), headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errors = [{"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
                  for e in exc.errors()]
        detail = "; ".join(f"{'.'.join(e['loc'])}: {e['msg']}" for e in errors) or "invalid request"
        return problem_response(422, "validation-error", detail, instance=str(request.url.path), errors=errors)

    @app.exception_handler(IntegrityError)
    async def _integrity(request: Request, exc: IntegrityError):
        # e.g. a model deleted while an audit naming it was being created: the other request won the race.
        # The database's own text (SQL, parameters) never reaches the client.
        return problem_response(409, "conflict", "the request conflicts with a concurrent change to the objects it "
                                "names (one was deleted or changed meanwhile); read them again and retry",
                                instance=str(request.url.path))

    @app.exception_handler(OperationalError)
    async def _database_busy(request: Request, exc: OperationalError):
        # a locked or unreachable database is a transient condition, not a server bug: tell clients when to retry
        return problem_response(503, "database-busy", "the database is busy or unreachable; retry shortly",
                                instance=str(request.url.path), headers={"Retry-After": "5"})

    @app.exception_handler(PoolTimeout)
    async def _server_busy(request: Request, exc: PoolTimeout):
        # every database connection of this API process is in use (more requests than it can serve)
        return problem_response(503, "server-busy", "the server is busy (all its database connections are in use); "
                                "retry shortly", instance=str(request.url.path), headers={"Retry-After": "2"})

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        return problem_response(500, "internal-error", "internal server error", instance=str(request.url.path))


# OpenAPI: the problem responses of every route that can produce them (their problem+json body and
# headers are filled in for every 4xx/5xx by app/core/openapi.py).
PROBLEM_RESPONSES = {code: {"description": HTTPStatus(code).phrase} for code in (400, 401, 404, 413, 415, 422)}
QUOTA_RESPONSES = {429: PROBLEM_RESPONSES[400] | {"description": "Too many active audits for this tenant (see Retry-After)"}}
