"""pbrf-audit's influence engine: pure PyTorch, usable as a library.

    from app.influence import AuditConfig, run_audit
    result = run_audit(model, inputs, labels, AuditConfig(method="exact"))

No FastAPI, Celery or SQLAlchemy import anywhere in this package (a test checks it).
"""

from .audit import AuditConfig, AuditResult, run_audit
from .base import EngineError, Estimator, EstimatorOptions, FittedCurvature
from .losses import CrossEntropyOutput, SquaredErrorOutput, output_loss
from .registry import available_methods, make_estimator

__all__ = [
    "AuditConfig", "AuditResult", "run_audit", "EngineError", "Estimator", "EstimatorOptions", "FittedCurvature",
    "CrossEntropyOutput", "SquaredErrorOutput", "output_loss", "available_methods", "make_estimator",
]
