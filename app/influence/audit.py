"""Self-influence audit of a whole training set: the one call the worker makes.

Streams the data in batches through: a prediction pass (loss, predicted class), the estimator's
curvature stages, and a scoring pass. Reports progress as (stage name, overall fraction in 0..1).
Scores follow kronfluence's convention: s_i = g_i^T (G + lambda I)^-1 g_i with G the *mean* GGN and no
1/N factor (s_i / N is the first-order rise of example i's own loss when it is removed under the PBRF).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from .base import EngineError, Estimator, EstimatorOptions, add_partials
from .registry import make_estimator
from .losses import output_loss

ProgressCallback = Callable[[str, float], None]


@dataclass
class AuditConfig:
    method: str = "exact"
    damping: float | None = None
    weight_decay: float = 0.0
    batch_size: int = 256
    fisher_samples: int = 1
    seed: int = 0
    loss: str = "cross_entropy"
    flag_fraction: float = 0.1
    max_exact_parameters: int = 12_000
    device: str | None = None  # None: CUDA when available, else CPU


@dataclass
class AuditResult:
    scores: torch.Tensor  # (N,) float64, higher = more suspicious
    self_influence: torch.Tensor | None  # raw s_i for curvature methods
    losses: torch.Tensor  # (N,) per-example loss at the given label
    predicted: torch.Tensor  # (N,) argmax class (classification)
    given_probability: torch.Tensor  # (N,) p(given label)
    flagged: torch.Tensor  # indices, most suspicious first
    damping: float | None
    summary: dict = field(default_factory=dict)


def pick_device(requested: str | None) -> torch.device:
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def batches(inputs: torch.Tensor, targets: torch.Tensor, batch_size: int, device) -> Iterator[tuple]:
    for start in range(0, inputs.shape[0], batch_size):
        yield (inputs[start : start + batch_size].to(device, non_blocking=True),
               targets[start : start + batch_size].to(device, non_blocking=True))


def check_compatible(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, loss_name: str) -> int:
    """Run the model on two examples and check its output fits the labels; returns the output size."""
    with torch.no_grad():
        try:
            out = model(inputs[:2])
        except Exception as exc:  # the model's own error, shown to the user
            raise EngineError(f"the model could not run on the dataset's inputs {tuple(inputs.shape[1:])}: {exc}") from exc
    if out.ndim != 2 or out.shape[0] != min(2, inputs.shape[0]):
        raise EngineError(f"the model must return one output vector per example, got shape {tuple(out.shape)}")
    num_outputs = out.shape[1]
    if loss_name == "cross_entropy":
        top = int(targets.max())
        if top >= num_outputs:
            raise EngineError(
                f"labels go up to {top} but the model has {num_outputs} outputs: "
                "the model's output size must be at least the number of classes"
            )
    return num_outputs


def run_audit(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, config: AuditConfig,
              progress: ProgressCallback | None = None) -> AuditResult:
    started = time.perf_counter()
    report = progress or (lambda stage, fraction: None)
    device = pick_device(config.device)
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    loss = output_loss(config.loss)
    n = inputs.shape[0]
    if n == 0:
        raise EngineError("the dataset has no examples")
    check_compatible(model, inputs.to(device), targets.to(device), config.loss)

    options = EstimatorOptions(damping=config.damping, weight_decay=config.weight_decay,
                               fisher_samples=config.fisher_samples, seed=config.seed,
                               max_exact_parameters=config.max_exact_parameters)
    estimator: Estimator = make_estimator(config.method, model, loss, options, device)
    passes = 2 + len(estimator.stages)  # prediction pass + stages + scoring pass
    num_batches = math.ceil(n / config.batch_size)
    timings: dict[str, float] = {}

    def step(pass_index: int, stage: str, batch_index: int) -> None:
        report(stage, min(1.0, (pass_index + (batch_index + 1) / num_batches) / passes))

    # 1. predictions at theta_s
    t0 = time.perf_counter()
    losses, predicted, given_prob = [], [], []
    with torch.no_grad():
        for b, (x, y) in enumerate(batches(inputs, targets, config.batch_size, device)):
            out = model(x)
            losses.append(loss.loss(out, y).double().cpu())
            if config.loss == "cross_entropy":
                probs = torch.softmax(out.double(), -1)
                predicted.append(probs.argmax(-1).cpu())
                given_prob.append(probs.gather(1, y.long().unsqueeze(1)).squeeze(1).cpu())
            step(0, "predictions", b)
    timings["predictions"] = time.perf_counter() - t0
    losses_t = torch.cat(losses)
    predicted_t = torch.cat(predicted) if predicted else torch.zeros(n, dtype=torch.long)
    given_prob_t = torch.cat(given_prob) if given_prob else torch.full((n,), float("nan"), dtype=torch.float64)

    # 2. curvature stages: each a streaming sum over the data
    for s, stage in enumerate(estimator.stages):
        t0 = time.perf_counter()
        total = None
        for b, (x, y) in enumerate(batches(inputs, targets, config.batch_size, device)):
            total = add_partials(total, estimator.accumulate(stage, x, y, None))
            step(1 + s, stage, b)
        estimator.finish(stage, total, n)
        timings[stage] = time.perf_counter() - t0

    # 3. scores
    t0 = time.perf_counter()
    parts = []
    for b, (x, y) in enumerate(batches(inputs, targets, config.batch_size, device)):
        parts.append(estimator.self_influence(x, y).double().cpu())
        step(passes - 1, "scores", b)
    timings["scores"] = time.perf_counter() - t0
    raw = torch.cat(parts)
    if not torch.isfinite(raw).all():
        raise EngineError("non-finite influence scores: the model's outputs or gradients overflow on this data")

    scores = raw
    order = torch.argsort(scores, descending=True, stable=True)
    num_flags = max(1, min(n, round(config.flag_fraction * n)))
    summary = {
        "num_examples": n,
        "method": estimator.name,
        "damping": estimator.damping,
        "score": "self_influence g^T (G + damping I)^-1 g, G the mean GGN, no 1/N factor"
        if estimator.uses_curvature else "squared gradient norm",
        "device": str(device),
        "batch_size": config.batch_size,
        "seed": config.seed,
        "num_flagged": num_flags,
        "flag_rule": f"top {config.flag_fraction:.0%} of examples by score",
        "estimator": estimator.describe(),
        "seconds": {k: round(v, 4) for k, v in timings.items()} | {"total": round(time.perf_counter() - started, 4)},
    }
    if config.loss == "cross_entropy":
        summary["training_accuracy"] = float((predicted_t == targets.cpu().long()).double().mean())
        summary["num_disagreeing_with_model"] = int((predicted_t != targets.cpu().long()).sum())
    return AuditResult(scores=scores, self_influence=raw if estimator.uses_curvature else None,
                       losses=losses_t, predicted=predicted_t, given_probability=given_prob_t,
                       flagged=order[:num_flags], damping=estimator.damping, summary=summary)
