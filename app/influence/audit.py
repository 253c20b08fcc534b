"""Self-influence audit of a whole training set: the one call the worker makes.

Streams the data in batches through: a prediction pass (loss, predicted class), the estimator's
curvature stages, and a scoring pass. Reports progress as (stage name, overall fraction in 0..1).
Scores follow kronfluence's convention: s_i = g_i^T (G + lambda I)^-1 g_i with G the *mean* GGN and no
1/N factor (s_i / N is the first-order rise of example i's own loss when it is removed under the PBRF).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .base import BatchSource, EngineError, Estimator, EstimatorOptions, FittedCurvature
from .registry import make_estimator
from .losses import output_loss

ProgressCallback = Callable[[str, float], None]


@dataclass
class AuditConfig:
    """Every audit setting and its default, for the library and the service alike: the worker builds
    this from an audit's recorded params unchanged, and a test keeps the API's defaults equal to these."""

    method: str = "folds"
    damping: float | None = None
    weight_decay: float = 0.0
    batch_size: int | None = None  # None: chosen per method from the model size (see auto_batch_size)
    fisher_samples: int = 1  # labels sampled from the model per example; 0 = exact expectation over classes
    lanczos_rank: int = 64
    cache_bytes: int = 512 * 1024**2  # one-pass blockwise estimators keep at most this much per-example state
    seed: int = 0
    loss: str = "cross_entropy"
    flag_fraction: float | None = None  # None: the method's rule (loo: confident learning; others: 10%)
    curvature: str = "auto"  # back end of `loo`: auto = ekfac
    verify_top_k: int = 0  # solve the PBRF directly for this many top flags and report the agreement
    pbrf_epsilon: float | None = None  # None: removal, -1/N
    max_exact_parameters: int = 12_000
    device: str | None = None  # None: CUDA when available, else CPU
    folds: int = 5  # method `folds`: how many folds are unlearned, one at a time
    fold_epochs: int = 15  # method `folds`: the most epochs a fold's copy trains
    fold_shrink: float = 0.5  # method `folds`: weights are multiplied by this before a fold trains (1 = off)


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
    # per-example extras of some methods (loo: out-of-sample probability of the given label, suggestion)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    # the fitted curvature, for estimators that can store it (fitted by this audit or given to it)
    curvature: FittedCurvature | None = None
    # every example, most suspicious first (flagged is its head)
    flagged_order: torch.Tensor | None = None


def pick_device(requested: str | None) -> torch.device:
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


BATCH_STATE_BYTES = 256 * 1024**2  # what one batch's captured layer inputs/gradients may take


def auto_batch_size(estimator: Estimator, num_outputs: int, example: torch.Tensor | None = None) -> int:
    """Large batches for the blockwise estimators, as long as one batch's captured layer state
    (unfolded convolution patches grow with the image: T x d_in per layer) stays near
    BATCH_STATE_BYTES; for methods that form per-example Jacobians or gradients (B x C x P), a batch
    whose Jacobians stay near 64 MiB."""
    from .kronecker import KroneckerEstimator

    if isinstance(estimator, KroneckerEstimator):
        if example is None:
            return 2048
        # x3: the autograd graph's own saved activations, rotated copies and chunks besides the capture
        captured = estimator.captured_bytes_per_example(example)
        per_example = 3 * captured
        if estimator.fallback_names:
            # the fallback's per-example gradients are B x (its parameters), float32 and float64 squares,
            # never B x P; torch.func's batched forward holds about another capture's worth
            per_example += captured + 12 * sum(estimator.params[n].numel() for n in estimator.fallback_names)
        return int(max(8, min(2048, BATCH_STATE_BYTES // max(1, per_example))))
    per_example = max(1, estimator.num_parameters * num_outputs)
    return int(max(8, min(1024, (16 * 1024**2) // per_example)))


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
    if not bool(torch.isfinite(out).all()):
        # caught here, not as a failed eigendecomposition or a NaN ranking further on
        raise EngineError("the model's outputs are not finite (inf or NaN) on the dataset's first examples: its "
                          "weights or these inputs overflow float32")
    if loss_name == "cross_entropy" and num_outputs < 2:
        raise EngineError("a softmax classifier needs at least 2 outputs; this model has 1")
    if loss_name == "cross_entropy":
        top = int(targets.max())
        if top >= num_outputs:
            raise EngineError(
                f"labels go up to {top} but the model has {num_outputs} outputs: "
                "the model's output size must be at least the number of classes"
            )
    return num_outputs


@dataclass
class AuditSetup:
    """What every part of an audit agrees on: the model on its device, the loss, the estimator and the
    batch size (from the config and two examples; the same in each shard of a sharded audit)."""

    device: torch.device
    model: nn.Module
    loss: object
    estimator: Estimator
    batch_size: int
    loo: bool


def set_up_audit(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, config: AuditConfig) -> AuditSetup:
    """Check the model against the data (two examples and the labels) and build the estimator. Freezes
    the model's parameters (the engine differentiates them only when asked)."""
    device = pick_device(config.device)
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    loss = output_loss(config.loss)
    if inputs.shape[0] == 0:
        raise EngineError("the dataset has no examples")
    num_outputs = check_compatible(model, inputs[:2].to(device), targets.to(device), config.loss)
    options = EstimatorOptions(damping=config.damping, weight_decay=config.weight_decay,
                               fisher_samples=config.fisher_samples, seed=config.seed,
                               max_exact_parameters=config.max_exact_parameters, lanczos_rank=config.lanczos_rank,
                               cache_bytes=0 if config.method == "loo" else config.cache_bytes)
    loo = config.method == "loo"
    if loo and config.loss != "cross_entropy":
        raise EngineError("method 'loo' needs a classification model (softmax cross-entropy)")
    name = config.method
    if loo:
        name = "ekfac" if config.curvature == "auto" else config.curvature
    estimator: Estimator = make_estimator(name, model, loss, options, device)
    batch_size = config.batch_size or auto_batch_size(estimator, num_outputs, inputs[:2].to(device))
    return AuditSetup(device=device, model=model, loss=loss, estimator=estimator, batch_size=batch_size, loo=loo)


class Predictions:
    """Per-example loss, predicted class and probability of the given label at theta_s, batch by batch."""

    def __init__(self, loss, loss_name: str):
        self.loss, self.loss_name = loss, loss_name
        self.losses, self.predicted, self.given_probability = [], [], []

    def add(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        self.losses.append(self.loss.loss(outputs, targets).double().cpu())
        if self.loss_name == "cross_entropy":
            probs = torch.softmax(outputs.double(), -1)
            self.predicted.append(probs.argmax(-1).cpu())
            self.given_probability.append(probs.gather(1, targets.long().unsqueeze(1)).squeeze(1).cpu())

    def tensors(self, n: int) -> dict[str, torch.Tensor]:
        return {"losses": torch.cat(self.losses),
                "predicted": torch.cat(self.predicted) if self.predicted else torch.zeros(n, dtype=torch.long),
                "given_probability": torch.cat(self.given_probability) if self.given_probability else
                torch.full((n,), float("nan"), dtype=torch.float64)}


def run_audit(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, config: AuditConfig,
              progress: ProgressCallback | None = None, curvature: FittedCurvature | None = None) -> AuditResult:
    """`curvature`: a fit stored by an earlier audit of the same model with the same curvature settings
    (AuditResult.curvature); the audit then scores with it and makes no fitting pass."""
    started = time.perf_counter()
    report = progress or (lambda stage, fraction: None)
    if config.method == "folds":
        return run_fold_audit(model, inputs, targets, config, report, started)
    setup = set_up_audit(model, inputs, targets, config)
    model, loss, estimator, device, loo = setup.model, setup.loss, setup.estimator, setup.device, setup.loo
    n = inputs.shape[0]
    data = BatchSource(inputs, targets, setup.batch_size, device)
    if curvature is not None:
        if not estimator.stores_curvature:
            raise EngineError(f"the '{estimator.name}' curvature cannot be loaded")
        estimator.load_curvature(curvature, inputs[:2].to(device))
    else:
        estimator.prepare(data)
    # a fit that scores every example needs no scoring pass; a fit that runs the model forward on every
    # batch in order (a blockwise estimator's first pass) gives the predictions too
    one_pass = estimator.precomputed_scores is not None or getattr(estimator, "scores_in_fit", False) \
        or getattr(estimator, "one_pass", False)
    predictions_from_fit = getattr(estimator, "predictions_in_fit", False) or (one_pass and not loo)
    fit_passes = 0 if curvature is not None else estimator.num_passes
    # Progress: every pass over the data is one equal slot, in the order they run: predictions, the fit's
    # passes, the scoring pass, the PBRF verification. Each stage reports inside its own slot, so the
    # fraction only grows (the scoring pass once took the last slot and verification went back into it).
    passes = (0 if predictions_from_fit else 1) + fit_passes + (0 if one_pass and not loo else 1) \
        + (1 if config.verify_top_k else 0)
    verify_slot = passes - 1 if config.verify_top_k else passes
    score_slot = verify_slot - 1
    num_batches = data.num_batches
    timings: dict[str, float] = {}
    done_passes = 0

    def step(pass_index: int, stage: str, batch_index: int) -> None:
        report(stage, min(1.0, (pass_index + (batch_index + 1) / num_batches) / passes))

    predictions = Predictions(loss, config.loss)

    # 1. predictions at theta_s
    t0 = time.perf_counter()
    if not predictions_from_fit:
        with torch.no_grad():
            for b, (x, y) in enumerate(data()):
                predictions.add(model(x), y)
                step(0, "predictions", b)
    timings["predictions"] = time.perf_counter() - t0

    # 2. curvature: each pass a streaming sum over the data (shardable)
    t0 = time.perf_counter()
    first_pass = 0 if predictions_from_fit else 1

    def fit_report(stage: str, fraction: float) -> None:
        nonlocal done_passes
        report(stage, min(1.0, (first_pass + done_passes + fraction) / passes))
        if fraction >= 1.0:
            done_passes += 1

    if curvature is None:
        estimator.fit(data, fit_report)
    timings["curvature"] = time.perf_counter() - t0
    if predictions_from_fit:
        if estimator.batch_outputs is None or len(estimator.batch_outputs) != num_batches:
            raise RuntimeError("the fit did not keep its outputs")  # a bug, not a user error
        for out, y in zip(estimator.batch_outputs, targets.split(data.batch_size)):
            predictions.add(out, y.to(out.device))
        estimator.batch_outputs = None

    # 3. scores
    t0 = time.perf_counter()
    extras: dict[str, torch.Tensor] = {}
    loo_summary: dict = {}
    if loo:
        raw, scores, extras, loo_summary = _out_of_sample_pass(estimator, loss, data, targets, n,
                                                               lambda b: step(score_slot, "scores", b))
    elif estimator.precomputed_scores is not None:
        raw = estimator.precomputed_scores.double().cpu()
        scores = raw
    else:
        parts = []
        for b, (x, y) in enumerate(data()):
            parts.append(estimator.self_influence(x, y).double().cpu())
            step(score_slot, "scores", b)
        raw = torch.cat(parts)
        scores = raw
    timings["scores"] = time.perf_counter() - t0
    result = conclude_audit(config, setup, targets, scores=scores, raw=raw, extras=extras, loo_summary=loo_summary,
                            timings=timings, started=started, curvature_reused=curvature is not None,
                            **predictions.tensors(n))
    if config.verify_top_k:
        t0 = time.perf_counter()
        result.summary["verification"] = json_safe(verify_against_pbrf(
            model, loss, inputs, targets, result.flagged_order[: config.verify_top_k].tolist(), raw,
            estimator.damping or 0.0, config, lambda f: report("pbrf", min(1.0, (verify_slot + f) / passes))))
        result.summary["seconds"]["pbrf"] = round(time.perf_counter() - t0, 4)
    result.curvature = curvature if curvature is not None else (
        estimator.fitted_curvature() if estimator.stores_curvature else None)
    return result


def conclude_audit(config: AuditConfig, setup: AuditSetup, targets: torch.Tensor, *, scores: torch.Tensor,
                   raw: torch.Tensor, losses: torch.Tensor, predicted: torch.Tensor, given_probability: torch.Tensor,
                   timings: dict[str, float], started: float, curvature_reused: bool,
                   extras: dict | None = None, loo_summary: dict | None = None) -> AuditResult:
    """Every example scored: the flags (the config's fraction, confident learning for loo, else 10%)
    and the summary, for one worker's audit and a sharded one alike."""
    estimator, loo, loo_summary = setup.estimator, setup.loo, loo_summary or {}
    n = scores.shape[0]
    if not torch.isfinite(scores).all():
        raise EngineError("non-finite influence scores: the model's outputs or gradients overflow on this data")
    order, num_flags, flag_rule = _flags(config, scores, loo_summary.get("num_label_issues") if loo else None)
    summary = {
        "num_examples": n,
        "method": "loo" if loo else estimator.name,
        "damping": estimator.damping,
        "score": ("1 - out-of-sample probability of the given label (one Gauss-Newton step on the PBRF removal "
                  "objective)") if loo else ("self_influence g^T (G + damping I)^-1 g, G the mean GGN, no 1/N factor"
                                             if estimator.uses_curvature else "squared gradient norm"),
        "device": str(setup.device),
        "batch_size": setup.batch_size,
        "seed": config.seed,
        "num_flagged": num_flags,
        "flag_rule": flag_rule,
        "estimator": estimator.describe(),
        "curvature_reused": curvature_reused,
        "seconds": {k: round(v, 4) for k, v in timings.items()} | {"total": round(time.perf_counter() - started, 4)},
    }
    if loo:
        summary["out_of_sample"] = loo_summary
        summary["curvature"] = estimator.name
    if config.loss == "cross_entropy":
        summary["training_accuracy"] = float((predicted == targets.cpu().long()).double().mean())
        summary["num_disagreeing_with_model"] = int((predicted != targets.cpu().long()).sum())
    return AuditResult(scores=scores, self_influence=raw if estimator.uses_curvature else None,
                       losses=losses, predicted=predicted, given_probability=given_probability,
                       flagged=order[:num_flags], flagged_order=order, damping=estimator.damping,
                       summary=json_safe(summary), extras=extras or {})


def _flags(config: AuditConfig, scores: torch.Tensor, num_label_issues: int | None) -> tuple[torch.Tensor, int, str]:
    """Every example most suspicious first, how many are flagged and by what rule: the requested
    fraction, else confident learning's count where the method has one, else 10%."""
    n = scores.shape[0]
    order = torch.argsort(scores, descending=True, stable=True)
    if config.flag_fraction is not None:
        num_flags = round(config.flag_fraction * n)
        flag_rule = f"top {config.flag_fraction:.1%} of examples by score"
    elif num_label_issues is not None:
        num_flags = num_label_issues
        flag_rule = ("confident learning on the out-of-sample probabilities: the calibrated confident joint's "
                     "off-diagonal count, most suspicious first")
    else:
        num_flags = round(0.1 * n)
        flag_rule = "top 10% of examples by score"
    return order, max(0, min(n, num_flags)), flag_rule


@dataclass
class FoldAuditSetup:
    """What every task of a `folds` audit shares: the model on its device, frozen, and the fold recipe."""

    device: torch.device
    model: nn.Module
    num_outputs: int
    settings: object  # unlearning.FoldSettings


def set_up_fold_audit(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                      config: AuditConfig) -> FoldAuditSetup:
    from .unlearning import FoldSettings

    if config.loss != "cross_entropy":
        raise EngineError("method 'folds' needs a classification model (softmax cross-entropy)")
    if inputs.shape[0] == 0:
        raise EngineError("the dataset has no examples")
    device = pick_device(config.device)
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    num_outputs = check_compatible(model, inputs[:2].to(device), targets.to(device), config.loss)
    settings = FoldSettings(folds=config.folds, max_epochs=config.fold_epochs, shrink=config.fold_shrink,
                            seed=config.seed)
    return FoldAuditSetup(device=device, model=model, num_outputs=num_outputs, settings=settings)


def unlearn_one_fold(setup: FoldAuditSetup, inputs: torch.Tensor, targets: torch.Tensor, fold: int,
                     report: Callable[[float], None] | None = None):
    """One fold's FoldOutcome: the unit of work a sharded `folds` audit hands to a worker."""
    from .unlearning import unlearn_fold

    return unlearn_fold(setup.model, inputs, targets, setup.settings, fold, setup.device, report)


def run_fold_audit(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, config: AuditConfig,
                   report: ProgressCallback, started: float) -> AuditResult:
    """Method `folds` in one process: every fold in turn (unlearning.py), then conclude_fold_audit."""
    setup = set_up_fold_audit(model, inputs, targets, config)
    t0 = time.perf_counter()
    outcomes = [unlearn_one_fold(setup, inputs, targets, fold,
                                 lambda f, fold=fold: report("folds", 0.02 + 0.97 * (fold + f) / config.folds))
                for fold in range(config.folds)]
    return conclude_fold_audit(config, setup, inputs, targets, outcomes, {"folds": time.perf_counter() - t0}, started)


def conclude_fold_audit(config: AuditConfig, setup: FoldAuditSetup, inputs: torch.Tensor, targets: torch.Tensor,
                        outcomes: list, timings: dict[str, float], started: float) -> AuditResult:
    """The folds' out-of-fold probabilities (one FoldOutcome per fold, from any workers) joined, then
    confident learning and suggested labels as for `loo`. No curvature is fitted: no self-influence."""
    from .loo import confident_learning
    from .unlearning import fold_scores, join_folds

    device, model, n = setup.device, setup.model, inputs.shape[0]
    t0 = time.perf_counter()
    predictions = Predictions(output_loss(config.loss), config.loss)
    with torch.no_grad():
        for x, y in BatchSource(inputs, targets, config.batch_size or 512, device)():
            predictions.add(model(x), y)
    probs, fold_summary = join_folds(model, inputs, setup.settings, outcomes, device)
    timings = timings | {"predictions": time.perf_counter() - t0}
    labels = targets.cpu().long()
    given_p = probs.gather(1, labels.unsqueeze(1)).squeeze(1)
    suggested_p, suggested = probs.max(1)
    num_issues, thresholds, joint = confident_learning(probs.float(), labels, setup.num_outputs)
    tensors = predictions.tensors(n)
    scores = fold_scores(given_p, tensors["losses"])
    order, num_flags, flag_rule = _flags(config, scores, num_issues)
    summary = {
        "num_examples": n,
        "method": "folds",
        "damping": None,
        "score": ("(1 - out-of-fold probability of the given label) x (1 + rank of the trained model's loss / N) / 2: "
                  "the out-of-fold disagreement (fold unlearning: weights shrunk, the output layer re-initialised "
                  "and retrained without the example's fold), weighted by how poorly the trained model itself fits "
                  "the label"),
        "device": str(device),
        "batch_size": setup.settings.batch_size,
        "seed": config.seed,
        "num_flagged": num_flags,
        "flag_rule": flag_rule,
        "out_of_sample": {"num_label_issues": num_issues, "class_thresholds": [round(float(t), 6) for t in thresholds],
                          "out_of_sample_accuracy_vs_given": float((probs.argmax(1) == labels).double().mean()),
                          **_label_issue_counts(joint), **fold_summary},
        "seconds": {k: round(v, 4) for k, v in timings.items()} | {"total": round(time.perf_counter() - started, 4)},
        "training_accuracy": float((tensors["predicted"] == labels).double().mean()),
        "num_disagreeing_with_model": int((tensors["predicted"] != labels).sum()),
    }
    extras = {"out_of_sample_given_probability": given_p, "suggested_label": suggested,
              "suggested_label_probability": suggested_p}
    return AuditResult(scores=scores, self_influence=None, flagged=order[:num_flags], flagged_order=order, damping=None,
                       summary=json_safe(summary), extras=extras, **tensors)


MAX_JOINT_CLASSES = 50  # a C x C table in the summary; larger ones are left out (C^2 numbers)


def _label_issue_counts(joint: torch.Tensor) -> dict:
    """Confident learning's counts for the summary: per given label, how many examples are estimated to
    belong to another class, and (up to MAX_JOINT_CLASSES classes) the calibrated confident joint,
    rows = given label, columns = the estimated true label, rounded to whole examples."""
    off = joint.sum(1) - torch.diagonal(joint)
    out = {"label_issues_by_given_label": [int(round(float(v))) for v in off]}
    if joint.shape[0] <= MAX_JOINT_CLASSES:
        out["confident_joint"] = [[int(round(float(v))) for v in row] for row in joint]
    return out


def json_safe(value):
    """The summary is stored as JSON: non-finite floats (which strict JSON and PostgreSQL refuse)
    become null, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def verify_against_pbrf(model, loss, inputs, targets, indices: list[int], estimates: torch.Tensor, damping: float,
                        config: AuditConfig, report: Callable[[float], None]) -> dict:
    """Solve the PBRF objective for each index and compare with the estimate (Pearson, Spearman).

    Correlations use only the items whose local PBRF minimiser was followed to the requested eps; the
    others say why (ill-posed at that eps, or the branch could not be followed past some eps). Figures
    are meant to be reproducible across CPUs: see pbrf.py for why the solve is local and certified."""
    from .pbrf import CONVERGED, ILL_POSED, PBRFProblem

    if damping <= 0:
        damping = 1e-3  # identity has no damping of its own; the PBRF needs a proximity term
    n = inputs.shape[0]
    epsilon = config.pbrf_epsilon if config.pbrf_epsilon is not None else -1.0 / n
    items = []
    problem = PBRFProblem(model.to("cpu"), loss, inputs.cpu(), targets.cpu(), damping, config.weight_decay)
    for j, index in enumerate(indices):
        critical = problem.critical_epsilon(index, math.copysign(1.0, epsilon))
        item = {"index": index, "estimate": float(estimates[index]), "critical_epsilon": critical}
        if critical is not None and abs(epsilon) >= abs(critical):
            # Not solved: whatever minimiser a solver finds out there is not what the estimate describes,
            # and finding it is slow and rounding-sensitive (kinks, folds).
            item.update(status=ILL_POSED, pbrf=None)
        else:
            solution = problem.solve(index, epsilon)
            converged = solution.status == CONVERGED
            item.update(status=solution.status, pbrf=solution.self_influence if converged else None,
                        relative_gradient_norm=solution.relative_gradient_norm, distance=solution.distance)
            if not converged and solution.reached_epsilon != 0:
                item.update(reached_epsilon=solution.reached_epsilon,
                            pbrf_at_reached_epsilon=solution.self_influence)
        items.append(item)
        report((j + 1) / len(indices))
    finite = [i for i in items if i["status"] == CONVERGED]
    est = torch.tensor([i["estimate"] for i in finite], dtype=torch.float64)
    ref = torch.tensor([i["pbrf"] for i in finite], dtype=torch.float64)
    counts = {status: sum(1 for i in items if i["status"] == status)
              for status in ("converged", "ill_posed", "branch_ended", "not_converged")}
    enough = len(finite) >= 3  # a correlation over fewer items says nothing
    summary = {"num_examples": len(items), "num_converged": counts["converged"], "num_ill_posed": counts["ill_posed"],
               "num_branch_ended": counts["branch_ended"], "num_not_converged": counts["not_converged"],
               "epsilon": epsilon, "damping": damping,
               "pearson": _pearson(est, ref) if enough else None,
               "spearman": _pearson(_ranks(est), _ranks(ref)) if enough else None, "items": items,
               "note": "pbrf = -(L(z, theta_eps) - L(z, theta_s)) / eps at the local minimiser of the PBRF objective "
                       "that starts at theta_s, followed by continuation in eps with certified Newton steps; "
                       "correlations over the items solved at the requested eps (at least 3). critical_epsilon: "
                       "where the objective's Hessian at theta_s stops being positive definite (null: beyond "
                       "reach or not computed, models above 3000 parameters)"}
    if counts["ill_posed"]:
        summary["warning"] = (
            f"{counts['ill_posed']} of {len(items)} examples: at eps={epsilon:.3g} with damping {damping:.3g} the "
            "PBRF objective's curvature at the trained weights is indefinite (eps is beyond the item's "
            "critical_epsilon): the objective is non-convex there, its second-order model has no minimum, and "
            "no influence estimate describes its response. Not compared; verify at a smaller |pbrf_epsilon| "
            "or with a larger damping.")
    if counts["branch_ended"]:
        summary["branch_ended"] = ("the solver could not follow the local minimiser past reached_epsilon: a fold of "
                                   "the objective, or kinks of a ReLU network where the gradient jumps")
    return summary


def _ranks(values: torch.Tensor) -> torch.Tensor:
    order = torch.argsort(values, stable=True)
    ranks = torch.empty_like(values)
    ranks[order] = torch.arange(values.numel(), dtype=values.dtype)
    return ranks


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float | None:
    if a.numel() < 2:
        return None
    a, b = a - a.mean(), b - b.mean()
    denom = float(a.norm() * b.norm())
    return float((a * b).sum()) / denom if denom > 0 else None


def _out_of_sample_pass(estimator, loss, data, targets, n, step):
    """Scoring pass of `loo`: approximate out-of-sample probabilities, suggestions, confident learning."""
    from .loo import confident_learning, out_of_sample_logits

    given_p, suggested, suggested_p, first_order, prob_rows = [], [], [], [], []
    clipped, all_classes = 0, True
    for b, (x, y) in enumerate(data()):
        f_loo, classes, self_inf, c = out_of_sample_logits(estimator, loss, x, y, n)
        clipped += c
        p = torch.softmax(f_loo, -1)
        local = (classes == y.long().unsqueeze(1)).double().argmax(1)
        given_p.append(p.gather(1, local.unsqueeze(1)).squeeze(1).cpu())
        best = p.argmax(1)
        suggested.append(classes.gather(1, best.unsqueeze(1)).squeeze(1).cpu())
        suggested_p.append(p.max(1).values.cpu())
        first_order.append(self_inf.cpu())
        all_classes = all_classes and classes.shape[1] == f_loo.shape[1] and bool(
            (classes == torch.arange(classes.shape[1], device=classes.device)).all())
        if all_classes:
            prob_rows.append(p.float().cpu())
        step(b)
    given_p_t = torch.cat(given_p)
    extras = {"out_of_sample_given_probability": given_p_t, "suggested_label": torch.cat(suggested),
              "suggested_label_probability": torch.cat(suggested_p)}
    summary = {"examples_with_clipped_eigenvalues": clipped,
               "step": ("exact curvature: f + M (I - H M)^-1 r (Woodbury removal of the example from the exact GGN)"
                        if estimator.name == "exact" else
                        "approximate curvature: the example's own term J^T H J is added to the approximation and "
                        "removed again, which gives f + M r with M from the approximate curvature"),
               "classes": "all" if all_classes else "given label + the top 20 classes by probability (more than 100 classes)"}
    if all_classes:
        probs = torch.cat(prob_rows)
        num_issues, thresholds, joint = confident_learning(probs, targets.cpu(), probs.shape[1])
        summary.update(num_label_issues=num_issues, class_thresholds=[round(float(t), 6) for t in thresholds],
                       out_of_sample_accuracy_vs_given=float((probs.argmax(1) == targets.cpu().long()).double().mean()),
                       **_label_issue_counts(joint))
        if estimator.name != "exact" and num_issues > 0.5 * n:
            # Seen on over-parameterised CNNs that fit every example: the approximate curvature is far
            # too small along an example's own directions, the step overshoots and most labels look wrong.
            summary["warning"] = (f"{num_issues} of {n} examples look mislabeled, which is implausible: the "
                                  f"{estimator.name} leverage overshoots on this model. Use curvature 'exact' "
                                  "(models up to the exact size limit) or a self-influence method such as ekfac.")
    raw = torch.cat(first_order)
    return raw, 1.0 - given_p_t, extras, summary
