"""Fast, in-process checks of what a new user meets first (issue 12, "the first hour"): /docs works
offline, the OpenAPI document says what the API sends, results of an unfinished job say when and
where to look again, and progress never goes back. The app runs under a test client on SQLite; no
server, worker or broker is started."""

from __future__ import annotations

import re
import threading

import pytest
from fastapi.testclient import TestClient

PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}


@pytest.fixture(scope="module")
def app_client(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("PBRF_DATA_DIR", str(tmp_path_factory.mktemp("contract")))
    mp.delenv("PBRF_API_KEYS", raising=False)  # open mode: tenant "default"
    from app.core import config, db

    config.get_settings.cache_clear()
    db.get_engine.cache_clear()
    db.get_sessionmaker.cache_clear()
    from app.main import create_app

    db.Base.metadata.create_all(db.get_engine())
    yield TestClient(create_app())  # no `with`: the lifespan (validator server) is not needed here
    db.get_engine().dispose()
    config.get_settings.cache_clear()
    db.get_engine.cache_clear()
    db.get_sessionmaker.cache_clear()
    mp.undo()


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_load_no_asset_from_the_internet(app_client, page):
    r = app_client.get(page)
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assets = re.findall(r'(?:src|href)="([^"]+)"', r.text)
    assert any(a.endswith(".js") for a in assets), r.text
    for asset in assets:
        assert not re.match(r"(https?:)?//", asset), f"{page} loads {asset} from outside the app"
        served = app_client.get(asset)
        assert served.status_code == 200 and served.content, asset
    assert "cdn." not in r.text and "fonts.googleapis" not in r.text


def test_openapi_documents_problems_headers_enums_and_file_parts(app_client):
    doc = app_client.get("/openapi.json").json()
    schemas = doc["components"]["schemas"]
    problem = schemas["Problem"]
    assert {"type", "title", "status", "detail", "instance"} <= set(problem["properties"])
    assert problem["additionalProperties"] is True and set(problem["required"]) == {"type", "title", "status", "detail"}
    operations = [(path, method, op) for path, item in doc["paths"].items() for method, op in item.items()]
    for path, method, op in operations:
        for code, response in op["responses"].items():
            if code[0] in "45":  # every error is problem+json with the schema, nothing else
                assert response["content"] == {"application/problem+json": {"schema": PROBLEM_REF}}, (path, code)
            headers = response.get("headers", {})
            if code in ("201", "202"):
                assert "Location" in headers, (path, method, code)
            if code in ("202", "409", "429", "503"):
                assert headers["Retry-After"]["schema"]["type"] == "integer", (path, method, code)
        if path.startswith("/v1/"):
            assert {"500", "503"} <= set(op["responses"]), (path, method)
    assert "HTTPValidationError" not in schemas
    assert "Retry-After" in doc["paths"]["/v1/audits/{audit_id}"]["get"]["responses"]["200"]["headers"]

    from app.influence.registry import available_methods

    assert schemas["AuditCreate"]["properties"]["method"]["enum"] == available_methods()
    model_body = schemas["Body_upload_model_v1_models_post"]["properties"]
    assert model_body["file"]["format"] == "binary"
    assert model_body["external_data"]["anyOf"][0]["items"]["format"] == "binary"
    assert schemas["Body_upload_dataset_v1_datasets_post"]["properties"]["file"]["format"] == "binary"
    architecture = model_body["architecture"]  # still a form field holding JSON text: the wire format is unchanged
    assert {"type": "string", "maxLength": 10_000} in architecture["anyOf"]
    assert architecture["contentMediaType"] == "application/json"
    assert architecture["contentSchema"] == {"$ref": "#/components/schemas/Architecture"}
    assert {s["$ref"].rsplit("/", 1)[1] for s in schemas["Architecture"]["oneOf"]} == {"MLPSpec", "CNNSpec"}
    assert set(schemas["MLPSpec"]["properties"]) >= {"type", "input_size", "hidden_sizes", "num_classes"}


def _job_rows(status: str):
    """A model, a dataset and an audit in `status` of the open-mode tenant, plus an attribution of that
    audit in the same status; returns (audit id, attribution id)."""
    from app.audits.tables import Attribution, Audit
    from app.core.db import get_sessionmaker
    from tests.helpers import model_and_dataset_rows

    with get_sessionmaker()() as session:
        model, dataset = model_and_dataset_rows(session, "default")
        audit = Audit(tenant_id="default", status=status, model_id=model.id, dataset_id=dataset.id, method="ekfac",
                      params={}, error="boom" if status == "failed" else None)
        session.add(audit)
        session.flush()
        attribution = Attribution(tenant_id="default", status=status, audit_id=audit.id, top_k=3, num_queries=1,
                                  query_format="npz", query_sha256="c" * 64, query_size_bytes=10)
        session.add(attribution)
        session.commit()
        return audit.id, attribution.id


@pytest.mark.parametrize("status", ["queued", "running"])
def test_results_of_an_unfinished_job_say_when_and_where_to_poll(app_client, status):
    audit_id, attribution_id = _job_rows(status)
    answers = [(app_client.get(f"/v1/audits/{audit_id}/flags"), f"/v1/audits/{audit_id}"),
               (app_client.get(f"/v1/audits/{audit_id}/scores"), f"/v1/audits/{audit_id}"),
               (app_client.post(f"/v1/audits/{audit_id}/attributions", files={"file": ("q.npz", b"x")}),
                f"/v1/audits/{audit_id}"),
               (app_client.get(f"/v1/attributions/{attribution_id}/queries"), f"/v1/attributions/{attribution_id}")]
    for r, poll in answers:
        assert r.status_code == 409 and r.headers["content-type"] == "application/problem+json", r.text
        assert r.json()["type"].endswith("-not-succeeded")
        assert f"poll GET {poll} " in r.json()["detail"], r.json()
        assert 1 <= int(r.headers["Retry-After"]) <= 10
    assert app_client.get(f"/v1/audits/{audit_id}").headers["Retry-After"] == answers[0][0].headers["Retry-After"]


def test_results_of_a_failed_audit_give_its_error_and_no_retry(app_client):
    audit_id, _ = _job_rows("failed")
    r = app_client.get(f"/v1/audits/{audit_id}/flags")
    assert r.status_code == 409 and "Retry-After" not in r.headers and "error: boom" in r.json()["detail"]


def test_progress_writes_never_lower_the_recorded_progress(app_client):
    """The guard at the write, in SQL: a report below the recorded value (a later stage misweighted, or
    a new attempt starting over after its predecessor died) keeps it; the stage is still written. A
    claim for a new attempt keeps it too."""
    from app.audits.tables import Audit
    from app.core.db import get_sessionmaker
    from worker.jobs import ProgressWriter, claim

    audit_id, _ = _job_rows("queued")
    factory = get_sessionmaker()
    with factory() as session:
        token = claim(session, audit_id, "test:1", stale_after=60)
    heartbeat = type("Heartbeat", (), {"lost": threading.Event(), "table": Audit})()
    write = ProgressWriter(factory, audit_id, token, heartbeat, min_interval=0)

    def recorded():
        with factory() as session:
            row = session.get(Audit, audit_id)
            return row.progress, row.stage

    write("scores", 0.5)
    assert recorded() == (0.49, "scores")
    write("pbrf", 0.25)
    assert recorded() == (0.49, "pbrf")
    write("pbrf", 0.75)
    assert recorded() == (0.735, "pbrf")
    with factory() as session:  # the attempt's worker died: the job is queued again and claimed anew
        session.get(Audit, audit_id).status = "queued"
        session.commit()
        assert claim(session, audit_id, "test:2", stale_after=60) is not None
    assert recorded() == (0.735, "loading")
