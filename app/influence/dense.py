"""The estimator that works with the full parameter vector: `exact` (dense damped GGN)."""

from __future__ import annotations

import json

import torch

from .base import EngineError, Estimator, FittedCurvature, Partial
from .functional import per_example_jacobians, per_example_loss_grads


class ExactEstimator(Estimator):
    """Dense G = (1/N) sum_i J_i^T H_i J_i, damped and Cholesky-factored in float64.

    Memory is P^2 doubles, so models above `max_exact_parameters` are refused.
    This is the ground truth the scalable estimators are tested against.
    """

    name = "exact"
    stages = ("ggn",)
    stores_curvature = True  # its Cholesky factor: P x P doubles, P <= max_exact_parameters

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        limit = self.options.max_exact_parameters
        if self.num_parameters > limit:
            raise EngineError(
                f"method 'exact' forms a dense {self.num_parameters} x {self.num_parameters} matrix; "
                f"it is limited to models with at most {limit} parameters. Use 'ekfac', 'kfac', "
                "'diagonal' or 'lanczos' for this model."
            )
        self.ggn: torch.Tensor | None = None
        self.cholesky: torch.Tensor | None = None

    def accumulate(self, stage, inputs, targets, partial: Partial | None) -> Partial:
        jac = per_example_jacobians(self.model, self.params, inputs)  # (B, C, P)
        outputs = self.model(inputs).detach()
        root = self.loss.hessian_sqrt(outputs)  # (B, C, C), H = R^T R
        weighted = torch.einsum("bkc,bcp->bkp", root, jac).reshape(-1, jac.shape[-1]).double()
        ggn_sum = weighted.T @ weighted
        if partial is not None:
            ggn_sum += partial["ggn_sum"]
        return {"ggn_sum": ggn_sum}

    def finish(self, stage, total, num_examples):
        ggn = total["ggn_sum"] / num_examples
        if self.options.weight_decay:
            ggn = ggn + self.options.weight_decay * torch.eye(ggn.shape[0], dtype=ggn.dtype, device=ggn.device)
        self.ggn = ggn
        if self.damping is None:
            # 0.1 x mean eigenvalue; the trace gives the mean without an eigendecomposition.
            self.damping = 0.1 * float(torch.diagonal(ggn).mean())
            if self.damping <= 0:
                raise EngineError("the model's Gauss-Newton curvature is zero on this data (constant outputs?); "
                                  "pass an explicit damping")
        damped = ggn + self.damping * torch.eye(ggn.shape[0], dtype=ggn.dtype, device=ggn.device)
        factor, info = torch.linalg.cholesky_ex(damped)
        if int(info) != 0:  # G is only positive semi-definite: a damping below rounding leaves it singular
            raise EngineError(f"the curvature plus damping {self.damping:.3g} is not positive definite in float64 "
                              "(the damping is below the curvature's rounding error); raise the damping, e.g. to "
                              f"{max(1e-8, 1e-10 * float(torch.diagonal(ggn).abs().max())):.1g} or more")
        self.cholesky = factor

    @property
    def partial_bytes(self) -> int:
        return 8 * self.num_parameters**2  # a shard's GGN sum, float64

    def fitted_curvature(self, complete: bool = True) -> FittedCurvature:
        if self.cholesky is None:
            raise EngineError("the 'exact' estimator has no fitted curvature to store")
        return FittedCurvature(
            {"cholesky": self.cholesky},
            {"estimator": self.name, "format": "pbrf-audit dense curvature v1",
             "structure": json.dumps(self.structure()), "damping": json.dumps(self.damping),
             "options": json.dumps({"damping": self.options.damping, "weight_decay": self.options.weight_decay})})

    def load_curvature(self, curvature: FittedCurvature, example: torch.Tensor) -> None:
        meta = self._check_stored(curvature)
        self.cholesky = curvature.tensors["cholesky"].double().to(self.device)
        self.damping = json.loads(meta["damping"])

    def solve(self, vectors: torch.Tensor) -> torch.Tensor:
        """(G + lambda I)^-1 v for each row of `vectors` (B, P)."""
        return torch.cholesky_solve(vectors.double().T, self.cholesky).T

    def leverage(self, inputs: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """J_K (G + lambda I)^-1 J_K^T for the selected logits of each example: (B, K, K)."""
        jac = per_example_jacobians(self.model, self.params, inputs).double()  # (B, C, P)
        jac = torch.gather(jac, 1, classes.unsqueeze(-1).expand(-1, -1, jac.shape[-1]))
        B, K, P = jac.shape
        z = torch.linalg.solve_triangular(self.cholesky, jac.reshape(B * K, P).T, upper=False)  # (P, B K)
        z = z.T.reshape(B, K, P)
        return z @ z.transpose(1, 2)

    def self_influence(self, inputs, targets):
        grads = per_example_loss_grads(self.model, self.params, self.loss, inputs, targets).double()
        z = torch.linalg.solve_triangular(self.cholesky, grads.T, upper=False)
        return z.pow(2).sum(0)
