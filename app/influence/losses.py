"""Output losses the engine knows, with the pieces the Gauss-Newton machinery needs.

Each loss maps a batch of model outputs f (B, C) and targets to per-example losses, and knows
its output-space Hessian H(f) (the curvature the GGN puts between the Jacobians), a square root
of that Hessian (so G = sum_i (B_i J_i)^T (B_i J_i) without forming H), how to sample targets from the
model's own predictive distribution (true Fisher = GGN for these matching losses), and the Bregman
divergence that the PBRF objective uses in place of the training loss.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class CrossEntropyOutput:
    """Softmax cross-entropy on logits; targets are integer class ids."""

    name = "cross_entropy"

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs, targets.long(), reduction="none")

    def hessian(self, outputs: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(outputs, dim=-1)
        return torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)

    def hessian_sqrt(self, outputs: torch.Tensor) -> torch.Tensor:
        """R with R^T R = diag(p) - p p^T: row c is sqrt(p_c) (e_c - p).

        This is also why the sampled-label Fisher equals the GGN: E_{y~p}[(p - e_y)(p - e_y)^T] = R^T R.
        """
        p = torch.softmax(outputs, dim=-1)
        eye = torch.eye(p.shape[-1], dtype=p.dtype, device=p.device)
        return p.sqrt().unsqueeze(-1) * (eye - p.unsqueeze(-2))

    def residual(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """dL/df for each example: p - onehot(y)."""
        p = torch.softmax(outputs, dim=-1)
        return p - F.one_hot(targets.long(), p.shape[-1]).to(p.dtype)

    @staticmethod
    def uniforms_per_draw(num_outputs: int) -> int:
        return 1

    def sample_targets(self, outputs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
        """A label per example drawn from softmax(outputs) by inverting its CDF at the example's own
        uniform (B, 1): the draw depends on the example, not on the batch around it."""
        p = torch.softmax(outputs.detach().double(), dim=-1).cpu()
        cdf = p.cumsum(-1)
        draws = (cdf < uniforms * cdf[:, -1:]).sum(-1).clamp_max(p.shape[-1] - 1)
        return draws.to(outputs.device)

    def bregman(self, outputs: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """Bregman divergence of the loss in output space = KL(softmax(reference) || softmax(outputs))."""
        log_p_ref = torch.log_softmax(reference, dim=-1)
        log_p = torch.log_softmax(outputs, dim=-1)
        return (log_p_ref.exp() * (log_p_ref - log_p)).sum(-1)


class SquaredErrorOutput:
    """Half squared error 0.5 ||f - y||^2; targets are real vectors shaped like the outputs."""

    name = "squared_error"

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return 0.5 * (outputs - targets.reshape(outputs.shape).to(outputs.dtype)).pow(2).sum(-1)

    def hessian(self, outputs: torch.Tensor) -> torch.Tensor:
        eye = torch.eye(outputs.shape[-1], dtype=outputs.dtype, device=outputs.device)
        return eye.expand(outputs.shape[0], -1, -1)

    def hessian_sqrt(self, outputs: torch.Tensor) -> torch.Tensor:
        return self.hessian(outputs)

    def residual(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return outputs - targets.reshape(outputs.shape).to(outputs.dtype)

    @staticmethod
    def uniforms_per_draw(num_outputs: int) -> int:
        return 2 * num_outputs

    def sample_targets(self, outputs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
        """outputs + standard normal noise, by Box-Muller from the example's own 2C uniforms."""
        u1, u2 = uniforms[:, 0::2], uniforms[:, 1::2]
        noise = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2 * math.pi * u2)
        return outputs.detach() + noise.to(outputs.device, outputs.dtype)

    def bregman(self, outputs: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        return 0.5 * (outputs - reference).pow(2).sum(-1)


def output_loss(name: str) -> CrossEntropyOutput | SquaredErrorOutput:
    if name in ("cross_entropy", "classification"):
        return CrossEntropyOutput()
    if name in ("squared_error", "regression", "mse"):
        return SquaredErrorOutput()
    raise ValueError(f"unknown output loss {name!r}; expected cross_entropy or squared_error")
