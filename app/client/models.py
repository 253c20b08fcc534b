"""Typed results of the client: the server's own response schemas (pydantic; they import nothing of the
server but pydantic), plus the few shapes that exist only on the client side."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, Literal, TypeVar


from app.artifacts.schemas import DatasetOut as Dataset
from app.artifacts.schemas import ExternalDataOut as ExternalData
from app.artifacts.schemas import InputOut as ModelInput
from app.artifacts.schemas import ModelOut as Model
from app.audits.schemas import TERMINAL
from app.audits.schemas import AuditOut as Audit
from app.audits.schemas import FlagOut as Flag
from app.audits.schemas import LabelChange, LabelChanges
from app.audits.schemas import MethodsOut as Methods
from app.audits.schemas import ScoreOut as Score
from app.audits.schemas import Verdict as VerdictName
from app.audits.schemas import VerdictOut as Verdict

T = TypeVar("T")

__all__ = ["Audit", "Dataset", "ExternalData", "Flag", "LabelChange", "LabelChanges", "LabelsExport", "Methods",
           "Model", "ModelInput", "Page", "Score", "TERMINAL", "Verdict", "VerdictName"]


@dataclass
class Page(Generic[T]):
    """One page of a cursor-paginated listing; pass next_cursor back for the next (None: the last page)."""

    items: list[T]
    next_cursor: str | None


@dataclass
class LabelsExport:
    """A dataset's labels written to `path` by export_labels."""

    path: Path
    format: Literal["csv", "npz"]
    corrected: bool
    changed_examples: int = field(metadata={"doc": "labels the accepted corrections change (X-Changed-Examples)"})
