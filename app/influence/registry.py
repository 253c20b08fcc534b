"""Method name -> estimator class."""

from __future__ import annotations

from .base import EngineError, Estimator, EstimatorOptions
from .dense import ExactEstimator, IdentityEstimator

ESTIMATORS: dict[str, type[Estimator]] = {
    "exact": ExactEstimator,
    "identity": IdentityEstimator,
}


def available_methods() -> list[str]:
    return sorted(ESTIMATORS)


def make_estimator(method: str, model, loss, options: EstimatorOptions, device) -> Estimator:
    try:
        cls = ESTIMATORS[method]
    except KeyError:
        raise EngineError(f"unknown method {method!r}; available: {', '.join(available_methods())}") from None
    return cls(model, loss, options, device)
