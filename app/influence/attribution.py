"""Train-to-query attribution: which training examples made the model predict each query example.

For a training example i and a query q, score(i, q) = g_i^T (G + lambda I)^-1 g_q with the loss
gradients at the trained parameters and a fitted (usually stored) curvature: the first-order fall of
q's loss when i is upweighted (the PBRF's response to i, read at q). Positive: i helped q's
prediction of its label; negative: i pulled against it. One streaming pass over the training data
per chunk of queries keeps, per query, the top-k helpful and the top-k harmful training examples, so
memory is bounded by the queries' preconditioned gradients (Q x parameters floats per chunk) and the
batch, never N x Q.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .base import BatchSource, Estimator, EstimatorOptions, FittedCurvature

QUERY_BYTES = 512 * 1024**2  # preconditioned query gradients held at once; more queries take more passes


@dataclass
class Attribution:
    helpful: torch.Tensor  # (Q, k) training indices, largest score first
    helpful_scores: torch.Tensor  # (Q, k) float64
    harmful: torch.Tensor  # (Q, k) training indices, most negative score first
    harmful_scores: torch.Tensor  # (Q, k) float64


def _merge(values: torch.Tensor, indices: torch.Tensor, new_values: torch.Tensor, new_indices: torch.Tensor, k: int):
    """The k largest of two (Q, *) candidate sets, largest first (ties: the earlier training index)."""
    v = torch.cat([values, new_values], 1)
    i = torch.cat([indices, new_indices], 1)
    # stable on the descending value, so that among equal scores the smaller index (seen first) wins
    order = torch.argsort(v, dim=1, descending=True, stable=True)[:, :k]
    return v.gather(1, order), i.gather(1, order)


def attribute(estimator: Estimator, data: BatchSource, query_inputs: torch.Tensor, query_targets: torch.Tensor,
              top_k: int = 10, report: Callable[[str, float], None] | None = None,
              query_bytes: int = QUERY_BYTES) -> Attribution:
    """The top_k helpful and harmful training examples (indices into `data`) of each query, with a
    fitted estimator that can precondition queries (Estimator.solve; every one that stores its curvature)."""
    report = report or (lambda stage, fraction: None)
    num_queries = int(query_inputs.shape[0])
    k = min(top_k, data.num_examples)
    chunk = max(1, query_bytes // max(1, 8 * estimator.num_parameters))
    passes = -(-num_queries // chunk)
    parts = []
    for c, first in enumerate(range(0, num_queries, chunk)):
        xq = query_inputs[first : first + chunk].to(data.device)
        yq = query_targets[first : first + chunk].to(data.device)
        queries = estimator.precondition_queries(xq, yq)
        count = xq.shape[0]
        empty_v = torch.empty(count, 0, dtype=torch.float64)
        empty_i = torch.empty(count, 0, dtype=torch.long)
        best, best_i, worst, worst_i = empty_v, empty_i, empty_v, empty_i
        offset = 0
        for b, (x, y) in enumerate(data()):
            scores = estimator.cross_influence(x, y, queries).T.cpu()  # (Q, B)
            index = torch.arange(offset, offset + x.shape[0]).expand(count, -1)
            best, best_i = _merge(best, best_i, scores, index, k)
            worst, worst_i = _merge(worst, worst_i, -scores, index, k)
            offset += x.shape[0]
            report("attribution", (c + (b + 1) / data.num_batches) / passes)
        parts.append((best_i, best, worst_i, -worst))
    return Attribution(*(torch.cat([p[j] for p in parts]) for j in range(4)))


def run_attribution(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, query_inputs: torch.Tensor,
                    query_targets: torch.Tensor, curvature: FittedCurvature, top_k: int = 10,
                    progress: Callable[[str, float], None] | None = None, device: str | None = None,
                    batch_size: int | None = None, loss: str = "cross_entropy") -> Attribution:
    """Attribution with a stored curvature (an audit's AuditResult.curvature): no fitting pass."""
    from .audit import auto_batch_size, check_compatible, pick_device
    from .losses import output_loss
    from .registry import make_estimator

    target = pick_device(device)
    model = model.to(target).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    num_outputs = check_compatible(model, inputs[:2].to(target), targets.to(target), loss)
    check_compatible(model, query_inputs[:2].to(target), query_targets.to(target), loss)
    estimator = make_estimator(curvature.metadata.get("estimator", ""), model, output_loss(loss), EstimatorOptions(),
                               target)
    estimator.load_curvature(curvature, inputs[:2].to(target))
    size = batch_size or auto_batch_size(estimator, num_outputs, inputs[:2].to(target))
    return attribute(estimator, BatchSource(inputs, targets, size, target), query_inputs, query_targets, top_k,
                     progress)
