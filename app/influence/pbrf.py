"""Direct solve of the proximal Bregman response function (PBRF) for one training example.

    theta_eps = argmin_theta (1/N) sum_j D(f(theta, x_j), f(theta_s, x_j)) + eps L(z_m, theta)
                             + (lambda / 2) ||theta - theta_s||^2

D is the Bregman divergence of the output loss (KL(p_s || p) for softmax cross-entropy), so theta_s is
the minimiser at eps = 0 whether or not training converged. The PBRF self-influence
-(L(z_m, theta_eps) - L(z_m, theta_s)) / eps tends to g^T (G + lambda I)^-1 g as eps -> 0; removal is
eps = -1/N. This is the object the influence estimates approximate, so it is how they are verified.
The solve is full-batch L-BFGS in float64 from theta_s: meant for verification on selected examples.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from .functional import flatten, trainable_parameters, unflatten


@dataclass
class PBRFSolution:
    index: int
    epsilon: float
    self_influence: float  # -(L(theta_eps) - L(theta_s)) / eps
    loss_change: float  # L(z_m, theta_eps) - L(z_m, theta_s)
    gradient_norm: float  # ||grad of the objective|| at the returned point
    iterations: int


def solve_pbrf(model: nn.Module, loss, inputs: torch.Tensor, targets: torch.Tensor, index: int,
               epsilon: float, damping: float, weight_decay: float = 0.0, max_iterations: int = 500,
               tolerance: float = 1e-12) -> PBRFSolution:
    model64 = copy.deepcopy(model).double().eval()
    base = trainable_parameters(model64)
    theta_s = flatten(base).clone()
    x = inputs.double() if inputs.is_floating_point() else inputs
    with torch.no_grad():
        reference = functional_call(model64, base, (x,))
    x_m, y_m = x[index : index + 1], targets[index : index + 1]
    with torch.no_grad():
        loss_s = float(loss.loss(functional_call(model64, base, (x_m,)), y_m).sum())

    def objective(theta: torch.Tensor) -> torch.Tensor:
        params = unflatten(theta, base)
        outputs = functional_call(model64, params, (x,))
        bregman = loss.bregman(outputs, reference).mean()
        own = loss.loss(functional_call(model64, params, (x_m,)), y_m).sum()
        delta = theta - theta_s
        # Training weight decay is part of the training objective's curvature: its Bregman
        # divergence is (wd/2)||theta - theta_s||^2, so it adds to the proximity term.
        return bregman + epsilon * own + 0.5 * (damping + weight_decay) * delta.pow(2).sum()

    theta = theta_s.clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([theta], lr=1.0, max_iter=max_iterations, tolerance_grad=tolerance,
                                  tolerance_change=1e-20, history_size=50, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        value = objective(theta)
        value.backward()
        return value

    optimizer.step(closure)
    iterations = optimizer.state[optimizer._params[0]]["n_iter"]
    theta_eps = theta.detach()
    grad_norm = float(torch.func.grad(objective)(theta_eps).norm())
    with torch.no_grad():
        loss_eps = float(loss.loss(functional_call(model64, unflatten(theta_eps, base), (x_m,)), y_m).sum())
    change = loss_eps - loss_s
    return PBRFSolution(index=index, epsilon=epsilon, self_influence=-change / epsilon, loss_change=change,
                        gradient_norm=grad_norm, iterations=int(iterations))
