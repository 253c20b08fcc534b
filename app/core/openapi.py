"""The OpenAPI document, completed where FastAPI's generator cannot know what the API does.

FastAPI documents every response body under the route's own media type and knows nothing of headers
set on the response object. This pass, over the generated document, says what clients get:
- every 4xx/5xx answer is `application/problem+json` with the `Problem` schema (the error handlers in
  app/core/errors.py produce nothing else), and every /v1 operation may answer 500 and 503;
- `Location` on 201/202 and `Retry-After` on 202/409/429/503 (and on a queued or running job's poll);
- uploaded file parts are `format: binary`, which code generators need to send them as files;
- `Architecture`, the schema of the JSON that the `architecture` form field holds;
- `method` of an audit, an enum of the estimators this server offers.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from fastapi import FastAPI

from app.core.errors import PROBLEM_MEDIA_TYPE, Problem

REF = "#/components/schemas/{model}"
LOCATION = {"description": "Where the created object, or the job to poll, is", "schema": {"type": "string"}}
RETRY_AFTER = {"description": "Seconds to wait before asking again", "schema": {"type": "integer", "minimum": 0}}
RETRY_AFTER_CODES = {"202", "409", "429", "503"}
JOB_SCHEMAS = {REF.format(model="AuditOut"), REF.format(model="AttributionOut")}  # polled: Retry-After while active


def install_openapi(app: FastAPI) -> None:
    """Make `app.openapi()` (and so /openapi.json, /docs) serve the completed document."""
    generate = app.openapi  # FastAPI's own, which caches the generated dict and regenerates when routes change
    completed: list[dict] = []

    def openapi() -> dict[str, Any]:
        schema = generate()
        if not completed or completed[0] is not schema:
            complete(schema)
            completed[:] = [schema]
        return schema

    app.openapi = openapi


def complete(schema: dict[str, Any]) -> None:
    from app.artifacts.architectures import architecture_adapter  # imports torch: only when documenting
    from app.influence.registry import available_methods

    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components["Problem"] = Problem.model_json_schema(ref_template=REF)
    architecture = architecture_adapter.json_schema(ref_template=REF)
    components.update(architecture.pop("$defs", {}))
    components["Architecture"] = architecture | {"title": "Architecture", "description": (
        "A built-in architecture for .safetensors weights; sent as JSON text in the `architecture` form field")}
    # `method` stays a string in AuditCreate (an unknown one is a 422 `unknown-method` naming the choices)
    components["AuditCreate"]["properties"]["method"]["enum"] = available_methods()
    problem = {"content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": REF.format(model="Problem")}}}}
    for path, item in schema.get("paths", {}).items():
        for method, operation in item.items():
            responses = operation.setdefault("responses", {})
            if path.startswith("/v1/"):
                responses.setdefault("500", {"description": "Internal Server Error"})
                responses.setdefault("503", {"description": "The database is busy or unreachable (see Retry-After)"})
            for code, response in responses.items():
                if code[0] in "45":
                    response.update(problem)
                    response.setdefault("description", HTTPStatus(int(code)).phrase)
                headers = response.setdefault("headers", {})
                if code in ("201", "202"):
                    headers["Location"] = LOCATION
                polled = method == "get" and code == "200" and _body_ref(response) in JOB_SCHEMAS
                if code in RETRY_AFTER_CODES or polled:
                    headers["Retry-After"] = RETRY_AFTER
                if not headers:
                    del response["headers"]
    _mark_binary(components)
    # FastAPI's own validation-error schemas are unused once every 422 is a problem document
    text = repr(schema["paths"])
    for name in ("HTTPValidationError", "ValidationError"):
        if REF.format(model=name) not in text:
            components.pop(name, None)


def _body_ref(response: dict) -> str | None:
    return response.get("content", {}).get("application/json", {}).get("schema", {}).get("$ref")


def _mark_binary(node: Any) -> None:
    """File parts (FastAPI writes them as strings with contentMediaType application/octet-stream) get
    `format: binary`, the OpenAPI 3.0 spelling that generators and fuzzers read as a file."""
    if isinstance(node, dict):
        if node.get("type") == "string" and node.get("contentMediaType") == "application/octet-stream":
            node["format"] = "binary"
        for value in node.values():
            _mark_binary(value)
    elif isinstance(node, list):
        for value in node:
            _mark_binary(value)
