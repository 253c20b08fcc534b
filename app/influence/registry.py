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


# audit methods that are not one estimator: loo (a Gauss-Newton removal step over a curvature back end)
# and folds (fold unlearning: out-of-fold predictions from retrained copies, no curvature)
COMPOSITE_METHODS = ("folds", "loo")


def available_methods() -> list[str]:
    return sorted([*ESTIMATORS, *COMPOSITE_METHODS])


def make_estimator(method: str, model, loss, options: EstimatorOptions, device) -> Estimator:
    if method == "loo":
        raise EngineError("'loo' is an audit method on top of a curvature back end; pass curvature=...")
    if method == "folds":
        raise EngineError("'folds' is an audit method without a curvature estimator (run_audit runs it)")
    try:
        cls = ESTIMATORS[method]
    except KeyError:
        raise EngineError(f"unknown method {method!r}; available: {', '.join(available_methods())}") from None
    return cls(model, loss, options, device)
