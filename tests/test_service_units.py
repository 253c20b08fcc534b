"""Fast, in-process checks of the service's small pure pieces (no server, no database)."""

from __future__ import annotations

import base64
import json

import pytest

from app.core.errors import ProblemError
from app.core.pagination import decode_cursor, encode_cursor


def _forge(payload) -> str:
    return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")


@pytest.mark.parametrize("cursor", [
    _forge({"rank": 2**63}), _forge({"rank": True}), _forge({"rank": -1}), _forge({"rank": 1.5}),
    _forge({"index": 3}), _forge([1]), "zzz", "%%%", base64.b64encode(b"\xff\xfe").decode(),
])
def test_forged_cursors_are_a_400_not_a_server_error(cursor):
    with pytest.raises(ProblemError) as err:
        decode_cursor(cursor, "rank")
    assert err.value.status == 400


def test_cursors_round_trip():
    assert decode_cursor(encode_cursor("rank", 41), "rank") == 41 and decode_cursor(None, "rank") == 0


@pytest.mark.parametrize("field", ["damping", "weight_decay", "flag_fraction", "pbrf_epsilon"])
def test_nan_and_infinite_audit_parameters_are_refused_as_such(field):
    """NaN used to be refused as 'less than or equal to 1000000', which is not the problem."""
    from pydantic import ValidationError

    from app.audits.schemas import AuditCreate

    ids = {"model_id": "00000000-0000-4000-8000-000000000000", "dataset_id": "00000000-0000-4000-8000-000000000001"}
    for value in ("NaN", "Infinity"):
        with pytest.raises(ValidationError) as err:
            AuditCreate.model_validate_json(f'{{"model_id": "{ids["model_id"]}", "dataset_id": "{ids["dataset_id"]}", '
                                            f'"{field}": {value}}}')
        assert "finite" in str(err.value)


def test_audit_memory_estimate_grows_with_the_parameters_that_drive_it():
    from app.audits.schemas import AuditCreate
    from app.audits.service import estimate_worker_bytes

    ids = {"model_id": "00000000-0000-4000-8000-000000000000", "dataset_id": "00000000-0000-4000-8000-000000000001"}
    P, C, N, D = 529_000, 10, 100_000, 64
    ekfac = sum(estimate_worker_bytes(AuditCreate(**ids), P, C, N, D).values())
    lanczos = sum(estimate_worker_bytes(AuditCreate(**ids, method="lanczos", lanczos_rank=2048), P, C, N, D).values())
    exact = estimate_worker_bytes(AuditCreate(**ids, method="exact", batch_size=8192), 12_000, C, N, D)
    verify = estimate_worker_bytes(AuditCreate(**ids, verify_top_k=1), 2_000, C, N, D)
    assert ekfac < 1024**3 < 8 * 1024**3 < lanczos  # 2 x 2048 x 529k x 8 bytes = 17 GB
    assert exact["batch Jacobians"] == 8192 * C * 12_000 * 12 and exact["dense curvature (P x P, float64, 3 copies)"] > 0
    assert verify["PBRF verification"] > 0
