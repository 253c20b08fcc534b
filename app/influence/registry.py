"""Method name -> estimator class."""

from __future__ import annotations

from .base import EngineError, Estimator, EstimatorOptions
from .dense import ExactEstimator
from .kronecker import DiagonalEstimator, EKFACEstimator, IdentityEstimator, KFACEstimator
from .krylov import CGEstimator, LanczosEstimator

ESTIMATORS: dict[str, type[Estimator]] = {
    "exact": ExactEstimator,
    "identity": IdentityEstimator,
    "diagonal": DiagonalEstimator,
    "kfac": KFACEstimator,
    "ekfac": EKFACEstimator,
    "lanczos": LanczosEstimator,
    "cg": CGEstimator,
}


def available_methods() -> list[str]:
    return sorted([*ESTIMATORS, "loo"])


def make_estimator(method: str, model, loss, options: EstimatorOptions, device) -> Estimator:
    if method == "loo":
        raise EngineError("'loo' is an audit method on top of a curvature back end; pass curvature=...")
    try:
        cls = ESTIMATORS[method]
    except KeyError:
        raise EngineError(f"unknown method {method!r}; available: {', '.join(available_methods())}") from None
    return cls(model, loss, options, device)
