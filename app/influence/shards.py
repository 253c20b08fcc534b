"""An audit split into shards of rows, so that several workers share one training set.

Each fitting stage of a blockwise estimator is a sum over examples: every shard computes its rows'
partial sum (`fit_shard`), the partials add (`finish_stage`), and the estimator's state after the stage
(EK-FAC's eigenbases, then its eigenvalue correction) is handed to the next stage's shards as a
FittedCurvature. Scoring is per example (`score_shard`); `conclude_sharded` joins the shards' scores in
row order and flags as one worker's audit would.

Shards are aligned to batches and Fisher labels are drawn per batch from (seed, first example), so a
sharded audit draws what one worker draws and its scores equal one worker's up to the order in which
float sums are added. Nothing here knows about workers, queues or files: the caller moves partials.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from functools import cached_property

import torch

from .audit import (AuditConfig, AuditResult, AuditSetup, FoldAuditSetup, Predictions, conclude_audit,
                    conclude_fold_audit, unlearn_one_fold)
from .base import BatchSource, EngineError, FittedCurvature, Partial, add_partials

SCORES = "scores"  # the last stage of every sharded audit, after the fitting stages
FOLDS = "folds"  # the one step of a `folds` audit: a shard per fold
# A shard's partial sums travel through the artifact store: above this size per shard (an exact GGN
# of a model near the exact size limit is 1 GB) the fit stays in one worker.
MAX_PARTIAL_BYTES = 256 * 1024**2


def why_not_sharded(config: AuditConfig, setup: AuditSetup) -> str | None:
    """None when this audit can be split into shards; else why it runs in one worker."""
    if setup.loo:
        return "method 'loo' runs in one worker (its confident-learning thresholds need every example at once)"
    if config.verify_top_k:
        return "verify_top_k runs in one worker (the PBRF solve uses the whole training set)"
    if setup.estimator.partial_bytes > MAX_PARTIAL_BYTES:
        return (f"the '{setup.estimator.name}' curvature's partial sums ({setup.estimator.partial_bytes / 1024**2:.0f} "
                "MB per shard) are too large to move between workers")
    if not setup.estimator.stores_curvature or not setup.estimator.stages:
        return f"the '{setup.estimator.name}' curvature is fitted in one worker (only fits made of summed passes are sharded)"
    return None


@dataclass(frozen=True)
class ShardPlan:
    """How an audit's rows are cut: the same in every shard task and in the reduce."""

    num_examples: int
    shard_size: int  # a multiple of batch_size: batches, and so Fisher draws, line up with one worker's
    batch_size: int
    fit_stages: tuple[str, ...]  # empty when a stored curvature is reused

    @classmethod
    def make(cls, setup: AuditSetup, num_examples: int, shard_size: int, fit: bool = True) -> ShardPlan:
        if shard_size < 1:
            raise EngineError("shard_size must be at least 1")
        aligned = max(1, round(shard_size / setup.batch_size)) * setup.batch_size
        return cls(num_examples=num_examples, shard_size=aligned, batch_size=setup.batch_size,
                   fit_stages=tuple(setup.estimator.stages) if fit else ())

    @cached_property
    def cuts(self) -> tuple[int, ...]:
        """Shard boundaries (batch-aligned): shards of shard_size, except that the last shard_size rows
        are cut in quarters. Workers take shards in order, so a step ends on small shards and no worker
        waits long for another's last one (guided scheduling)."""
        n, size, batch = self.num_examples, self.shard_size, self.batch_size
        if n <= size:
            return (0, n)
        tail_start = (n - size) // batch * batch
        quarter = max(batch, size // 4 // batch * batch)
        return (*range(0, tail_start, size), *range(tail_start, n, quarter), n)

    @property
    def num_shards(self) -> int:
        return len(self.cuts) - 1

    @property
    def stages(self) -> tuple[str, ...]:
        return (*self.fit_stages, SCORES)

    def bounds(self, index: int) -> tuple[int, int]:
        if not 0 <= index < self.num_shards:
            raise IndexError(f"shard {index} of {self.num_shards}")
        return self.cuts[index], self.cuts[index + 1]

    def to_dict(self) -> dict:
        return asdict(self) | {"num_shards": self.num_shards}  # the cuts follow from the fields

    @classmethod
    def from_dict(cls, value: dict) -> ShardPlan:
        return cls(num_examples=value["num_examples"], shard_size=value["shard_size"],
                   batch_size=value["batch_size"], fit_stages=tuple(value["fit_stages"]))


@dataclass(frozen=True)
class FoldPlan:
    """A `folds` audit's shards: one per fold, whatever the number of examples (each fold trains a copy
    of the model over the other folds, so even a small audit has K large, independent tasks)."""

    num_examples: int
    folds: int
    kind: str = "folds"

    @property
    def num_shards(self) -> int:
        return self.folds

    @property
    def stages(self) -> tuple[str, ...]:
        return (FOLDS,)

    def to_dict(self) -> dict:
        return asdict(self) | {"num_shards": self.num_shards}


def plan_from_dict(value: dict) -> ShardPlan | FoldPlan:
    """The plan a shard row records, of either kind."""
    if value.get("kind") == "folds":
        return FoldPlan(num_examples=value["num_examples"], folds=value["folds"])
    return ShardPlan.from_dict(value)


def fold_shard(setup: FoldAuditSetup, plan: FoldPlan, index: int, inputs: torch.Tensor, targets: torch.Tensor,
               progress=None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Fold `index` unlearned: its tensors (the fold's indices and out-of-fold probabilities) and its
    summary as string metadata, which is what a shard's safetensors file holds."""
    if plan.folds != setup.settings.folds or not 0 <= index < plan.folds:
        raise EngineError(f"fold {index} of a {plan.folds}-fold plan for a {setup.settings.folds}-fold audit")  # a bug
    outcome = unlearn_one_fold(setup, inputs, targets, index, progress)
    return ({"held": outcome.held, "probabilities": outcome.probabilities},
            {"summary": json.dumps(outcome.summary)})


def fold_outcome(tensors: dict[str, torch.Tensor], metadata: dict[str, str]):
    """A fold shard's stored result back as the FoldOutcome that conclude_fold_audit joins."""
    from .unlearning import FoldOutcome

    return FoldOutcome(held=tensors["held"], probabilities=tensors["probabilities"],
                       summary=json.loads(metadata["summary"]))


def conclude_folds_sharded(config: AuditConfig, setup: FoldAuditSetup, plan: FoldPlan, inputs: torch.Tensor,
                           targets: torch.Tensor, outcomes: list, timings: dict[str, float],
                           started: float) -> AuditResult:
    if len(outcomes) != plan.num_shards:
        raise RuntimeError(f"{len(outcomes)} fold results for {plan.num_shards} folds")  # a bug
    result = conclude_fold_audit(config, setup, inputs, targets, outcomes, timings, started)
    result.summary["shards"] = plan.to_dict() | {"seconds": round(time.perf_counter() - started, 4)}
    return result


def _rows(setup: AuditSetup, plan: ShardPlan, inputs: torch.Tensor, targets: torch.Tensor, index: int) -> BatchSource:
    start, stop = plan.bounds(index)
    return BatchSource(inputs[start:stop], targets[start:stop], plan.batch_size, setup.device, offset=start)


def _load_state(setup: AuditSetup, inputs: torch.Tensor, state: FittedCurvature | None) -> None:
    """The fit so far into the estimator; without one, the estimator still decides from two inputs
    which modules get which treatment, as every shard must decide alike."""
    if state is not None:
        setup.estimator.load_curvature(state, inputs[:2].to(setup.device))
    else:
        setup.estimator.probe(inputs[:2].to(setup.device))


def fit_shard(setup: AuditSetup, plan: ShardPlan, stage: str, index: int, inputs: torch.Tensor,
              targets: torch.Tensor, state: FittedCurvature | None = None, progress=None) -> Partial:
    """Shard `index`'s partial sum for a fitting stage; `state`: the fit after the earlier stages.
    `inputs`, `targets`: the whole training set (only this shard's rows are read)."""
    if stage not in plan.fit_stages:
        raise EngineError(f"'{stage}' is not a fitting stage of this audit ({', '.join(plan.fit_stages)})")
    _load_state(setup, inputs, state)
    estimator, data = setup.estimator, _rows(setup, plan, inputs, targets, index)
    total = None
    for b, (x, y) in enumerate(data()):
        estimator.draw_for_batch(data.first_example(b))
        total = add_partials(total, estimator.accumulate(stage, x, y, None))
        if progress:
            progress((b + 1) / data.num_batches)
    return {key: value.detach().cpu() for key, value in total.items()}


def finish_stage(setup: AuditSetup, plan: ShardPlan, stage: str, partials: Iterable[Partial], inputs: torch.Tensor,
                 state: FittedCurvature | None = None) -> FittedCurvature:
    """Add the shards' partial sums of a stage and fit: the state the next stage's shards start from
    (after the last stage, the complete curvature, which is what an audit stores). `partials` may be
    a generator: one shard's sums are in memory at a time besides the total (a ResNet's are GBs)."""
    _load_state(setup, inputs, state)
    total, count = None, 0
    for partial in partials:  # in shard order, so the sum does not depend on which worker finished first
        total = add_partials(total, {k: v.to(setup.device) for k, v in partial.items()})
        count += 1
    if count != plan.num_shards:
        raise RuntimeError(f"{count} partial sums for {plan.num_shards} shards")  # a bug
    setup.estimator.finish(stage, total, plan.num_examples)
    return setup.estimator.fitted_curvature(complete=stage == plan.fit_stages[-1])


def score_shard(setup: AuditSetup, plan: ShardPlan, index: int, inputs: torch.Tensor, targets: torch.Tensor,
                curvature: FittedCurvature, loss_name: str, progress=None) -> dict[str, torch.Tensor]:
    """Shard `index`'s self-influence and predictions at theta_s, with a complete curvature."""
    _load_state(setup, inputs, curvature)
    estimator, data = setup.estimator, _rows(setup, plan, inputs, targets, index)
    predictions = Predictions(setup.loss, loss_name)
    parts = []
    for b, (x, y) in enumerate(data()):
        with torch.no_grad():
            predictions.add(setup.model(x), y)
        parts.append(estimator.self_influence(x, y).double().cpu())
        if progress:
            progress((b + 1) / data.num_batches)
    return {"self_influence": torch.cat(parts), **predictions.tensors(data.num_examples)}


def conclude_sharded(config: AuditConfig, setup: AuditSetup, plan: ShardPlan, inputs: torch.Tensor,
                     targets: torch.Tensor, parts: list[dict[str, torch.Tensor]], curvature: FittedCurvature,
                     timings: dict[str, float], started: float, curvature_reused: bool) -> AuditResult:
    """The shards' scores, in row order, flagged and summarised as one worker's audit would be (the
    curvature is loaded for its damping and description)."""
    if len(parts) != plan.num_shards:
        raise RuntimeError(f"{len(parts)} scored shards for {plan.num_shards}")  # a bug
    joined = {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
    raw = joined.pop("self_influence")
    _load_state(setup, inputs, curvature)
    result = conclude_audit(config, setup, targets, scores=raw, raw=raw, timings=timings, started=started,
                            curvature_reused=curvature_reused, **joined)
    result.curvature = curvature
    result.summary["shards"] = plan.to_dict() | {"seconds": round(time.perf_counter() - started, 4)}
    return result
