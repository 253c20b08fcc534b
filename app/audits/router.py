"""HTTP endpoints for audits: create, poll, cancel, flags, scores."""

from __future__ import annotations

import csv
import io
import math
import uuid
from typing import Annotated, Literal

import numpy as np

from fastapi import APIRouter, File, Form, Header, Path, Query, Response, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from sqlalchemy.exc import InvalidRequestError

from app.artifacts.router import IdempotencyKey
from app.auth import idempotency

from app.core.db import get_sessionmaker
from app.auth import service as auth
from app.core.deps import CredentialsDep, SessionDep, SettingsDep, StoreDep, TenantDep, resolve_tenant
from app.core.errors import PROBLEM_RESPONSES, QUOTA_RESPONSES, not_found
from app.core.pagination import decode_cursor, encode_cursor
from app.influence.registry import available_methods

from . import attributions, repository, review, service
from .schemas import (AttributionOut, AuditCreate, AuditList, AuditOut, FlagOut, FlagPage, InfluentialExample,
                      MethodsOut, QueryAttribution, QueryPage, ScoreHistogram, ScoreOut, ScorePage, VerdictIn,
                      VerdictOut)

router = APIRouter(prefix="/v1", responses=PROBLEM_RESPONSES)
RESULT_RESPONSES = {409: PROBLEM_RESPONSES[400] | {"description": "The audit has not succeeded"}}


def _audit_or_404(session, tenant, audit_id):
    audit = repository.get_audit(session, tenant, audit_id)
    if audit is None:
        raise not_found("audit", audit_id)
    return audit


@router.get("/methods", response_model=MethodsOut, tags=["audits"], summary="Influence estimators this server offers")
def methods():
    return MethodsOut(methods=available_methods(), default=AuditCreate.model_fields["method"].default)


@router.post("/audits", status_code=202, response_model=AuditOut, tags=["audits"], responses=QUOTA_RESPONSES,
             summary="Start an audit: a worker scores every training example; poll the Location")
def create_audit(body: AuditCreate, session: SessionDep, tenant: TenantDep, response: Response,
                 idempotency_key: IdempotencyKey = None):
    request_hash = idempotency.hash_json(body.model_dump(mode="json")) if idempotency_key else ""
    # the row is the source of truth: it is committed here, before the message exists
    result, audit = idempotency.create_once(
        session, tenant, "POST /v1/audits", idempotency_key, request_hash,
        lambda: service.create_audit(session=session, tenant_id=tenant, request=body), AuditOut, 202)
    if audit is None:
        return result
    audit_id = audit.id
    service.enqueue(session, audit_id)
    response.headers["Location"] = f"/v1/audits/{audit_id}"
    response.headers["Retry-After"] = "2"
    try:
        session.refresh(audit)
    except InvalidRequestError:
        # already finished and deleted with its model by a concurrent DELETE: answer what was created
        return result
    return audit


@router.get("/audits", response_model=AuditList, tags=["audits"])
def list_audits(session: SessionDep, tenant: TenantDep, limit: Annotated[int, Query(ge=1, le=500)] = 100):
    return AuditList(items=repository.list_audits(session, tenant, limit))


@router.get("/audits/{audit_id}", response_model=AuditOut, tags=["audits"])
async def get_audit(audit_id: uuid.UUID, settings: SettingsDep, credentials: CredentialsDep):
    return await _polled(settings, credentials, lambda session, tenant: _audit_or_404(session, tenant, audit_id),
                         AuditOut)


async def _polled(settings, credentials, find, schema) -> Response:
    """A job's status, which clients poll: session, tenant lookup, query and serialisation in one threadpool
    hop (sync dependencies take one hop each, and FastAPI would validate the response model again)."""
    def poll() -> tuple[str, str]:
        with get_sessionmaker()() as session:
            job = find(session, resolve_tenant(session, settings, credentials))
            return schema.model_validate(job).model_dump_json(), job.status

    body, status = await run_in_threadpool(poll)
    return Response(body, media_type="application/json",
                    headers={"Retry-After": "2"} if status in ("queued", "running") else None)


@router.delete("/audits/{audit_id}", status_code=204, tags=["audits"], responses=RESULT_RESPONSES,
               summary="Delete a finished audit and its results (cancel a queued or running one first)")
def delete_audit(audit_id: uuid.UUID, session: SessionDep, tenant: TenantDep):
    service.delete_audit(session, _audit_or_404(session, tenant, audit_id))
    return Response(status_code=204)


@router.post("/audits/{audit_id}/cancel", response_model=AuditOut, tags=["audits"], responses=RESULT_RESPONSES,
             summary="Cancel a queued or running audit (a running one stops at its next batch boundary)")
def cancel_audit(audit_id: uuid.UUID, session: SessionDep, tenant: TenantDep):
    return service.cancel_audit(session, _audit_or_404(session, tenant, audit_id))


@router.get("/audits/{audit_id}/flags", response_model=FlagPage, tags=["audits"], responses=RESULT_RESPONSES,
            summary="Flagged examples, most suspicious first (keyset pagination)")
def list_flags(audit_id: uuid.UUID, session: SessionDep, tenant: TenantDep,
               limit: Annotated[int, Query(ge=1, le=1000)] = 100, cursor: Annotated[str | None, Query(max_length=200)] = None):
    audit = _audit_or_404(session, tenant, audit_id)
    service.require_succeeded(audit)
    after = decode_cursor(cursor, "rank")
    rows = repository.flags_after(session, audit.id, after, limit + 1)
    more = len(rows) > limit
    rows = rows[:limit]
    verdicts = review.verdicts_of(session, audit, [r.example_index for r in rows])
    items = [FlagOut(rank=r.rank, index=r.example_index, given_label=r.given_label, predicted_label=r.predicted_label,
                     score=r.score, loss=r.loss, given_label_probability=r.given_label_probability,
                     suggested_label=r.suggested_label, suggested_label_probability=r.suggested_label_probability,
                     out_of_sample_given_probability=r.out_of_sample_given_probability,
                     **_verdict_fields(verdicts.get(r.example_index))) for r in rows]
    return FlagPage(items=items, next_cursor=encode_cursor("rank", rows[-1].rank) if more else None)


def _verdict_fields(row) -> dict:
    if row is None:
        return {}
    return {"verdict": row.verdict, "corrected_label": row.corrected_label, "verdict_by": row.verdict_by,
            "verdict_at": row.verdict_at}


# ------------------------------------------------------------------------------ review
FlagIndex = Annotated[int, Path(ge=0, le=2**31 - 1, description="The example index of one of the audit's flags")]
VERDICT_RESPONSES = {409: PROBLEM_RESPONSES[400] | {"description": "The audit has not succeeded (it has no flags yet)"}}


def _reviewer(session, settings, credentials) -> str | None:
    """Who gives a verdict: the name of the caller's API key (null in open mode, where there is none)."""
    if credentials is None:
        return None
    return auth.key_name(session, credentials.credentials, auth.static_keys(settings.api_keys))


@router.put("/audits/{audit_id}/flags/{index}/verdict", response_model=VerdictOut, tags=["review"],
            responses=VERDICT_RESPONSES,
            summary="Give (or change) the tenant's verdict on a flagged example; kept for every audit of the same data")
def put_verdict(audit_id: uuid.UUID, index: FlagIndex, body: VerdictIn, session: SessionDep, settings: SettingsDep,
                credentials: CredentialsDep, tenant: TenantDep):
    audit = _audit_or_404(session, tenant, audit_id)
    row = review.set_verdict(session, audit, index, body, _reviewer(session, settings, credentials))
    session.commit()
    return VerdictOut.model_validate(row)


@router.delete("/audits/{audit_id}/flags/{index}/verdict", status_code=204, tags=["review"],
               responses=VERDICT_RESPONSES, summary="Withdraw the tenant's verdict on a flagged example")
def delete_verdict(audit_id: uuid.UUID, index: FlagIndex, session: SessionDep, tenant: TenantDep):
    review.withdraw_verdict(session, _audit_or_404(session, tenant, audit_id), index)
    session.commit()
    return Response(status_code=204)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


@router.get("/audits/{audit_id}/scores", response_model=ScorePage, tags=["audits"],
            responses=RESULT_RESPONSES | {200: {"content": {"text/csv": {}}, "description": "JSON page, or CSV with Accept: text/csv"}},
            summary="Every example's score in dataset order; JSON pages, or all rows as CSV with Accept: text/csv")
def list_scores(audit_id: uuid.UUID, session: SessionDep, store: StoreDep, tenant: TenantDep,
                limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
                cursor: Annotated[str | None, Query(max_length=200)] = None,
                accept: Annotated[str | None, Header()] = None):
    audit = _audit_or_404(session, tenant, audit_id)
    service.require_succeeded(audit)
    data = service.load_scores(store, audit)
    n = int(data["score"].shape[0])
    optional = [k for k in ("self_influence", "suggested_label", "suggested_label_probability",
                            "out_of_sample_given_probability") if k in data]
    columns = ["index", "score", "given_label", "predicted_label", "loss", "given_label_probability", *optional]

    def row(i: int) -> list:
        values = [i, float(data["score"][i]), int(data["given_label"][i]), int(data["predicted_label"][i]),
                  float(data["loss"][i]), float(data["given_label_probability"][i])]
        return values + [int(data[k][i]) if k == "suggested_label" else float(data[k][i]) for k in optional]

    if accept and "text/csv" in accept:
        def rows():
            buffer = io.StringIO()
            writer = csv.writer(buffer)
            writer.writerow(columns)
            for i in range(n):
                writer.writerow(row(i))
                if buffer.tell() > 64 * 1024:
                    yield buffer.getvalue()
                    buffer.seek(0)
                    buffer.truncate()
            yield buffer.getvalue()

        return StreamingResponse(rows(), media_type="text/csv",
                                 headers={"Content-Disposition": f'attachment; filename="audit-{audit.id}-scores.csv"'})
    start = decode_cursor(cursor, "index")
    stop = min(n, start + limit)
    items = [ScoreOut(**{k: (_finite(v) if isinstance(v, float) else v) for k, v in zip(columns, row(i))})
             for i in range(start, stop)]
    return ScorePage(items=items, next_cursor=encode_cursor("index", stop) if stop < n else None)


@router.get("/audits/{audit_id}/scores/histogram", response_model=ScoreHistogram, tags=["audits"],
            responses=RESULT_RESPONSES,
            summary="A histogram of every example's score (what the review page draws; one request for any N)")
def score_histogram(audit_id: uuid.UUID, session: SessionDep, store: StoreDep, tenant: TenantDep,
                    bins: Annotated[int, Query(ge=1, le=500)] = 50,
                    scale: Annotated[Literal["auto", "linear", "log"], Query(description=(
                        "auto: log when every score is positive and the largest is at least 1000 times the "
                        "smallest (heavy-tailed self-influence), else linear"))] = "auto"):
    audit = _audit_or_404(session, tenant, audit_id)
    service.require_succeeded(audit)
    num_flagged, flagged_min = repository.flag_extent(session, audit.id)
    scores = np.asarray(service.load_scores(store, audit)["score"], dtype=np.float64)
    finite = scores[np.isfinite(scores)]
    if scale == "auto":
        scale = "log" if finite.size and finite.min() > 0 and finite.max() >= 1000 * finite.min() else "linear"
    kept = finite[finite > 0] if scale == "log" else finite
    if kept.size == 0:
        edges, counts = np.linspace(0.0, 1.0, bins + 1), np.zeros(bins, dtype=np.int64)
    elif scale == "log":
        counts, log_edges = np.histogram(np.log10(kept), bins=bins)
        edges = 10.0 ** log_edges
    else:
        counts, edges = np.histogram(kept, bins=bins)
    return ScoreHistogram(num_examples=int(scores.shape[0]), scale=scale, edges=edges.tolist(),
                          counts=counts.tolist(), excluded=int(scores.shape[0] - kept.size),
                          num_flagged=num_flagged, flagged_min_score=flagged_min)


# ------------------------------------------------------------------------------ attributions
ATTRIBUTION_RESPONSES = {409: PROBLEM_RESPONSES[400] | {"description": "The audit (or attribution) has not succeeded"}}


@router.post("/audits/{audit_id}/attributions", status_code=202, response_model=AttributionOut, tags=["attributions"],
             responses=ATTRIBUTION_RESPONSES | QUOTA_RESPONSES,
             summary="Which training examples made the model predict each query example (uses the audit's stored "
                     "curvature; poll the Location)")
def create_attribution(
    audit_id: uuid.UUID, session: SessionDep, store: StoreDep, settings: SettingsDep, tenant: TenantDep,
    response: Response,
    file: Annotated[UploadFile, File(description=(
        "The query examples, in the dataset formats (.npz with `inputs` or one array per model input, and "
        "`labels`; .csv / .parquet with a `label` column): each query's label is the prediction explained"))],
    top_k: Annotated[int, Form(ge=1, le=100, description="Helpful and harmful training examples kept per query")] = 10,
):
    audit = _audit_or_404(session, tenant, audit_id)
    row = attributions.create_attribution(session=session, store=store, settings=settings, tenant_id=tenant,
                                          audit=audit, source=file.file, filename=file.filename or "", top_k=top_k)
    attributions.enqueue(session, row.id)
    session.refresh(row)
    response.headers["Location"] = f"/v1/attributions/{row.id}"
    response.headers["Retry-After"] = "2"
    return row


def _attribution_or_404(session, tenant, attribution_id):
    row = attributions.get_attribution(session, tenant, attribution_id)
    if row is None:
        raise not_found("attribution", attribution_id)
    return row


@router.get("/attributions/{attribution_id}", response_model=AttributionOut, tags=["attributions"])
async def get_attribution(attribution_id: uuid.UUID, settings: SettingsDep, credentials: CredentialsDep):
    return await _polled(settings, credentials,
                         lambda session, tenant: _attribution_or_404(session, tenant, attribution_id), AttributionOut)


@router.post("/attributions/{attribution_id}/cancel", response_model=AttributionOut, tags=["attributions"],
             responses=ATTRIBUTION_RESPONSES, summary="Cancel a queued or running attribution")
def cancel_attribution(attribution_id: uuid.UUID, session: SessionDep, tenant: TenantDep):
    return attributions.cancel_attribution(session, _attribution_or_404(session, tenant, attribution_id))


@router.delete("/attributions/{attribution_id}", status_code=204, tags=["attributions"],
               responses=ATTRIBUTION_RESPONSES,
               summary="Delete a finished attribution and its results (cancel a queued or running one first)")
def delete_attribution(attribution_id: uuid.UUID, session: SessionDep, tenant: TenantDep):
    attributions.delete_attribution(session, _attribution_or_404(session, tenant, attribution_id))
    return Response(status_code=204)


@router.get("/attributions/{attribution_id}/queries", response_model=QueryPage, tags=["attributions"],
            responses=ATTRIBUTION_RESPONSES,
            summary="Per query example, its most helpful and most harmful training examples (in query order)")
def list_attribution_queries(attribution_id: uuid.UUID, session: SessionDep, store: StoreDep, tenant: TenantDep,
                             limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                             cursor: Annotated[str | None, Query(max_length=200)] = None):
    row = _attribution_or_404(session, tenant, attribution_id)
    service.require_succeeded(row)
    start = decode_cursor(cursor, "query")
    results = attributions.load_results(store, row)
    stop = min(start + limit, row.num_queries)

    def ranked(indices, scores, q):
        return [InfluentialExample(index=int(i), score=float(v)) for i, v in zip(indices[q], scores[q])]

    items = [QueryAttribution(query_index=q, helpful=ranked(results["helpful"], results["helpful_scores"], q),
                              harmful=ranked(results["harmful"], results["harmful_scores"], q))
             for q in range(start, stop)]
    return QueryPage(items=items, next_cursor=encode_cursor("query", stop) if stop < row.num_queries else None)
