"""Out-of-fold probabilities from one trained model by fold unlearning (method `folds`).

K-fold cross-validation gives each example a prediction from a model that never saw it, at the cost
of K trainings from scratch. Fold unlearning starts from the trained weights instead: for each of K
folds, the output layer (the last layer with learned weights that computes the logits) is
re-initialised, and the copy is trained on the other folds for a few epochs, keeping the epoch whose
loss on a held-back tenth of those folds is lowest; that copy predicts the fold.

Why the head is reset: the trained network has memorised its flipped labels, and fine-tuning on the
retained data alone forgets them too slowly (measured in DESIGN.md section 4: AP 0.39-0.90 without the
reset). A fresh head on the trained features must relearn every class from the retained examples only,
so a fold's flipped examples are predicted by their features' neighbours, not by their memorised labels.
Why every other weight is shrunk first (multiplied by `shrink`, 0.5 by default): in a deep network
the features themselves memorise (a flipped example's penultimate features are pulled into its noisy
class's cluster), and a fresh head on memorised features predicts the memorised label again. Shrinking
the weights towards zero before training on the retained data (the "shrink" of Ash & Adams' shrink and
perturb, NeurIPS 2020, the remedy for warm-started training that generalises worse than training from
scratch) keeps the directions the network learned but weakens what only the memorised examples hold
up, so the retained data's gradients rebuild the features. Measured (bench/results/detection-*.md):
without it AP fell to 0.70-0.74 on a residual CNN and a transformer where 5-fold retraining reaches
0.86-0.95; 0.5 is a fixed constant, the middle of the range measured, not chosen per audit.
Why the held-back tenth: the number of epochs is chosen by the data (the lowest held-back loss, noisy
labels included: no ground truth), not tuned on the flips.

The probabilities then feed confident learning (loo.confident_learning), exactly as `loo`'s do: the
flag count and the suggested labels come from them alone. The ranking (fold_scores) also weighs in the
trained model's own loss on the example, see there.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import EngineError


@dataclass
class FoldSettings:
    folds: int = 5
    max_epochs: int = 15
    patience: int = 3  # epochs without a lower held-back loss before a fold stops early
    learning_rate: float = 1e-3
    batch_size: int = 64
    weight_decay: float = 1e-4
    holdout_fraction: float = 0.1
    shrink: float = 0.5  # every weight but the reset head is multiplied by this before a fold trains
    seed: int = 0


def fold_assignment(targets: torch.Tensor, folds: int, seed: int) -> torch.Tensor:
    """Fold of every example, stratified by label: each class's examples, shuffled, dealt round-robin
    (a fold then holds each class in proportion, as scikit-learn's StratifiedKFold does)."""
    generator = torch.Generator().manual_seed(seed)
    labels = targets.cpu().long()
    assignment = torch.empty_like(labels)
    offset = 0
    for c in torch.unique(labels).tolist():
        members = (labels == c).nonzero().squeeze(1)
        members = members[torch.randperm(members.numel(), generator=generator)]
        assignment[members] = (torch.arange(members.numel()) + offset) % folds
        offset += members.numel()  # the next class starts where this one left off: folds stay balanced
    return assignment


def output_layer(model: nn.Module, example: torch.Tensor) -> tuple[str, nn.Module] | None:
    """The layer to re-initialise: the Linear or Conv2d whose output *is* the logits (the same storage:
    the model returns it, or a view of it such as a flattened 1x1 convolution), called once in the
    forward pass. None otherwise (a head tied to an embedding table, logits scaled or normalised after
    the last layer, a custom op): resetting some other layer would not give a fresh head."""
    from .adapters import SingleLogitAsTwoClasses

    if isinstance(model, SingleLogitAsTwoClasses):  # its logits [0, z]: the head is the one that makes z
        found = output_layer(model.inner, example)
        return (f"inner.{found[0]}" if found[0] else "inner", found[1]) if found is not None else None
    runs: list[tuple[str, nn.Module, torch.Tensor]] = []
    names = {id(m): name for name, m in model.named_modules()}
    hooks = [m.register_forward_hook(lambda mod, _inp, out: runs.append((names[id(mod)], mod, out)))
             for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    try:
        with torch.no_grad():
            logits = model(example)
    finally:
        for h in hooks:
            h.remove()
    for name, module, out in reversed(runs):
        if isinstance(out, torch.Tensor) and out.numel() == logits.numel() and out.data_ptr() == logits.data_ptr():
            if sum(1 for _, m, _ in runs if m is module) != 1:
                return None  # called several times: its weight is not only the head's
            if any(p is q for p in module.parameters() for other in model.modules() if other is not module
                   for q in other.parameters(recurse=False)):
                return None  # its weight is also another module's (tied)
            return name, module
    return None


def _reinitialise(module: nn.Module, generator: torch.Generator) -> None:
    """torch's default initialisation of Linear/Conv2d (uniform in +-1/sqrt(fan_in) for weight and
    bias), drawn from a seeded generator so that an audit is reproducible."""
    fan_in = module.weight[0].numel()
    bound = 1.0 / math.sqrt(fan_in)
    with torch.no_grad():
        for p in (module.weight, module.bias):
            if p is not None:
                p.copy_((torch.rand(p.shape, generator=generator, dtype=torch.float64) * 2 - 1).mul_(bound).to(p))


def _mean_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int,
               device: torch.device) -> float:
    total = 0.0
    with torch.no_grad():
        for start in range(0, inputs.shape[0], batch_size):
            x = inputs[start: start + batch_size].to(device)
            y = targets[start: start + batch_size].to(device).long()
            total += float(F.cross_entropy(model(x).float(), y, reduction="sum"))
    return total / max(1, inputs.shape[0])


def _probabilities(model: nn.Module, inputs: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    parts = []
    with torch.no_grad():
        for start in range(0, inputs.shape[0], batch_size):
            parts.append(torch.softmax(model(inputs[start: start + batch_size].to(device)).double(), -1).cpu())
    return torch.cat(parts)


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks 1..N of `values` (float64), tied values sharing their mean rank (scipy's rankdata "average"):
    the result does not depend on the order of the examples or on how a sort breaks ties."""
    _, inverse, counts = torch.unique(values, sorted=True, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()  # the last rank of each distinct value
    return (ends - (counts.double() - 1) / 2)[inverse]


def fold_scores(given_probability: torch.Tensor, training_losses: torch.Tensor) -> torch.Tensor:
    """Ranking score in [0, 1]: `(1 - p_oof[given]) * (1 + r / N) / 2`, where r is the rank (1..N) of
    the example's loss under the trained model itself.

    Why not 1 - p_oof alone: each fold copy trains briefly (15 epochs at most, its held-back loss still
    falling), so p_oof is a noisy estimate of what a model that never saw the example would say. The
    trained model's own loss is a second piece of evidence whose errors are of another kind (a memorised
    flip is fitted later and less tightly than its clean neighbours, whatever the fold copies do), and
    weighing it in orders the examples the fold copies find about equally suspicious. The weight is a
    rank, so it is scale-free and bounded: it can at most double a score, so a confident out-of-fold
    disagreement is never outranked by a mild one because of the loss alone. Picked among four
    combinations on bench seeds 0-2 (bench/results/combine-probe.txt: higher mean AP in 11 of 12
    model/noise pairs), then measured on seeds 3-5 beside cleanlab (bench/results/detection.md)."""
    disagreement = 1.0 - given_probability.double()
    weight = 1.0 + average_ranks(training_losses.double()) / max(1, training_losses.numel())
    return disagreement * weight / 2.0


def fold_settings_text(settings: FoldSettings) -> str:
    return (f"weights but the reset head multiplied by {settings.shrink:g}, then Adam lr {settings.learning_rate:g}, "
            f"batch {settings.batch_size}, weight decay {settings.weight_decay:g}; at most {settings.max_epochs} "
            f"epochs, stopping {settings.patience} epochs after the lowest loss on a held-back tenth of the retained "
            "folds, whose weights predict the fold")


@dataclass
class FoldOutcome:
    """One fold's part of the out-of-fold probabilities: what a fold task returns (one per shard)."""

    held: torch.Tensor  # (n_fold,) int64: the fold's example indices, ascending
    probabilities: torch.Tensor  # (n_fold, C) float64, from the copy that never saw these examples
    summary: dict  # epochs, best epoch, held-back losses


def unlearn_fold(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, settings: FoldSettings, fold: int,
                 device: torch.device, report: Callable[[float], None] | None = None,
                 eval_batch_size: int = 512) -> FoldOutcome:
    """Fold `fold` alone: a copy of `model`, shrunk and re-headed, trained on the other folds, predicts
    this fold. Depends only on (model, data, settings, fold), never on which folds ran before it in this
    process (the global RNG that dropout draws from is forked and seeded per fold), so folds can run in
    any order on any worker and give what one worker's loop gives. `model` is not changed."""
    n = inputs.shape[0]
    if settings.folds < 2 or n < 2 * settings.folds:
        raise EngineError(f"fold unlearning needs at least {2 * max(2, settings.folds)} examples and 2 folds")
    if not 0 <= fold < settings.folds:
        raise EngineError(f"fold {fold} of {settings.folds}")
    report = report or (lambda fraction: None)
    model = model.to(device).eval()
    head = output_layer(model, inputs[:2].to(device))
    assignment = fold_assignment(targets, settings.folds, settings.seed)
    fold_seed = settings.seed * 1_000_003 + fold
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(fold_seed)
        generator = torch.Generator().manual_seed(fold_seed)
        held = (assignment == fold).nonzero().squeeze(1)
        retained = (assignment != fold).nonzero().squeeze(1)
        retained = retained[torch.randperm(retained.numel(), generator=generator)]
        num_check = max(1, round(settings.holdout_fraction * retained.numel()))
        check, train = retained[:num_check], retained[num_check:]
        copy_ = copy.deepcopy(model)
        for p in copy_.parameters():
            p.requires_grad_(True)
        if settings.shrink != 1.0:
            with torch.no_grad():
                for p in copy_.parameters():  # each tensor once, tied ones included
                    p.mul_(settings.shrink)
        if head is not None:
            _reinitialise(dict(copy_.named_modules())[head[0]], generator)
        parameters = [p for p in copy_.parameters() if p.requires_grad]
        optimiser = torch.optim.Adam(parameters, lr=settings.learning_rate, weight_decay=settings.weight_decay)
        x_check, y_check = inputs[check], targets[check]
        best_loss, best_state, best_epoch, losses = math.inf, None, 0, []
        for epoch in range(1, settings.max_epochs + 1):
            copy_.train()  # BatchNorm re-estimates its statistics on the retained data, dropout is on
            order = train[torch.randperm(train.numel(), generator=generator)]
            for start in range(0, order.numel(), settings.batch_size):
                rows = order[start: start + settings.batch_size]
                if rows.numel() < 2 and order.numel() >= 2:
                    continue  # a batch of one breaks BatchNorm's batch statistics
                optimiser.zero_grad(set_to_none=True)
                out = copy_(inputs[rows].to(device)).float()
                F.cross_entropy(out, targets[rows].to(device).long()).backward()
                optimiser.step()
            copy_.eval()
            loss = _mean_loss(copy_, x_check, y_check, eval_batch_size, device)
            if not math.isfinite(loss):
                raise EngineError(f"fold {fold}: the held-back loss became {loss} while training; the model's "
                                  "outputs overflow")
            losses.append(round(loss, 6))
            if loss < best_loss:
                best_loss, best_epoch = loss, epoch
                best_state = {k: v.detach().clone() for k, v in copy_.state_dict().items()}
            report(epoch / settings.max_epochs)
            if epoch - best_epoch >= settings.patience:
                break
        report(1.0)
        copy_.load_state_dict(best_state)
        copy_.eval()
        probabilities = _probabilities(copy_, inputs[held], eval_batch_size, device)
    return FoldOutcome(held=held, probabilities=probabilities, summary={
        "fold": fold, "examples": int(held.numel()), "trained_on": int(train.numel()), "held_back": int(check.numel()),
        "epochs_run": len(losses), "best_epoch": best_epoch, "held_back_losses": losses})


def join_folds(model: nn.Module, inputs: torch.Tensor, settings: FoldSettings, outcomes: list[FoldOutcome],
               device: torch.device) -> tuple[torch.Tensor, dict]:
    """The folds' outcomes (any order, one per fold) as (N, C) out-of-fold probabilities and a summary."""
    if sorted(o.summary["fold"] for o in outcomes) != list(range(settings.folds)):
        raise EngineError(f"{len(outcomes)} fold results for {settings.folds} folds")  # a bug
    outcomes = sorted(outcomes, key=lambda o: o.summary["fold"])
    probabilities = torch.zeros(inputs.shape[0], outcomes[0].probabilities.shape[1], dtype=torch.float64)
    covered = torch.zeros(inputs.shape[0], dtype=torch.bool)
    for outcome in outcomes:
        probabilities[outcome.held] = outcome.probabilities
        covered[outcome.held] = True
    if not bool(covered.all()):
        raise EngineError("the folds' results do not cover every example")  # a bug
    head = output_layer(model.to(device).eval(), inputs[:2].to(device))
    summary = {"folds": settings.folds, "layer_reset": head[0] if head is not None else None,
               "shrink": settings.shrink, "optimiser": fold_settings_text(settings),
               "per_fold": [o.summary for o in outcomes]}
    if head is None:
        summary["warning"] = ("no output layer to re-initialise was found (the logits do not come from one Linear or "
                              "Conv2d called once): each fold fine-tunes every weight from the trained values, which "
                              "forgets memorised labels slowly; flags may miss examples the model memorised")
    return probabilities, summary
