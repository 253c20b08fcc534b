"""Direct solve of the proximal Bregman response function (PBRF) for one training example.

    theta_eps = argmin_theta (1/N) sum_j D(f(theta, x_j), f(theta_s, x_j)) + eps L(z_m, theta)
                             + (lambda / 2) ||theta - theta_s||^2

D is the Bregman divergence of the output loss (KL(p_s || p) for softmax cross-entropy), so theta_s is
the minimiser at eps = 0 whether or not training converged. The PBRF self-influence
-(L(z_m, theta_eps) - L(z_m, theta_s)) / eps tends to g^T (G + lambda I)^-1 g as eps -> 0; removal is
eps = -1/N. This is the object the influence estimates approximate, so it is how they are verified.

Which minimiser. For eps < 0 (removal) the objective rewards raising the example's own loss; on a ReLU
network the logits grow like ||theta||^depth while the proximity term grows like ||theta||^2, so the
objective is unbounded below far from theta_s and has no global minimiser. The PBRF is then the *local*
minimiser on the branch that starts at theta_s (eps = 0) and moves continuously with eps: the one whose
derivative at eps = 0 is the influence. A global optimiser (the L-BFGS with line search this module used
before) may leave that branch for the unbounded region, and where it lands depends on the last bits of
rounding, which is why the same verification read Pearson 0.99 on one CPU and -0.3 on another.

Two tools, both in float64:
1. `critical_epsilon`: at theta_s the objective's Hessian is A + eps B with A = G + (lambda + wd) I (the
   Bregman term's Hessian at theta_s is the GGN) and B = the Hessian of the example's own loss, which is
   indefinite. Where A + eps B is not positive definite the objective's second-order model at the trained
   weights, whose response the influence estimates are, is unbounded. The critical eps is exact from the
   generalised eigenproblem (dense path). The verification does not compare estimates beyond it.
2. `solve_pbrf`: predictor-corrector continuation in eps from theta_s:
   - predictor: theta(eps + d) ~ theta(eps) + d dtheta/deps, with dtheta/deps = -H^-1 grad L(z_m, theta);
   - corrector: inexact Newton steps (preconditioned conjugate gradient on Hessian-vector products at the
     current point, preconditioned by the Cholesky factor of the last accepted point's Hessian) with
     Armijo backtracking;
   - a step is accepted only if the corrector reached a relative gradient of `tolerance`, stayed close to
     the predicted point (a jump to another basin is refused), and the Hessian at the new point is
     positive definite (Cholesky: a strict local minimum, certified); otherwise the eps step is halved.
   If the step falls below `fold_resolution` of the path travelled, the branch has ended (a fold: the
   local minimum disappears before the requested eps) and the solution says so ("branch_ended", with how
   far the branch reached) rather than returning a point from somewhere else.
On ReLU networks the objective is only piecewise smooth (kinks where a unit of some example switches), so
gradients do not vanish to machine precision: `tolerance` is 1e-5 of the gradient at theta_s. Models
above `dense_limit` parameters skip check 1 and use plain conjugate gradient (negative curvature met in
CG counts as not positive definite, which certifies less than Cholesky does).

`PBRFProblem` holds what all examples share (the float64 model copy, the reference outputs, and the
factored Hessian at theta_s and eps = 0, which does not depend on the example), so verifying k examples
costs one dense Hessian of the whole objective plus the continuation steps, not 2k more.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

from .functional import flatten, trainable_parameters, unflatten

CONVERGED, ILL_POSED, BRANCH_ENDED, NOT_CONVERGED = "converged", "ill_posed", "branch_ended", "not_converged"


@dataclass
class PBRFSolution:
    index: int
    epsilon: float  # the requested eps
    reached_epsilon: float  # how far along the branch the solve got (== epsilon when converged)
    status: str  # converged | ill_posed (theta_s is no strict minimum at eps 0) | branch_ended | not_converged
    self_influence: float | None  # -(L(theta_eps) - L(theta_s)) / eps at reached_epsilon (None at eps 0)
    loss_change: float  # L(z_m, theta_eps) - L(z_m, theta_s)
    gradient_norm: float  # ||grad of the objective|| at the returned point
    relative_gradient_norm: float  # gradient_norm / ||eps * grad L(z_m, theta_s)|| (the gradient at the start)
    distance: float  # ||theta_eps - theta_s||
    iterations: int  # Newton steps in all
    continuation_steps: int  # accepted eps steps

    @property
    def converged(self) -> bool:
        return self.status == CONVERGED


class _NotPositiveDefinite(Exception):
    pass


class PBRFProblem:
    """The PBRF objective of one model and training set, for any of its examples."""

    def __init__(self, model: nn.Module, loss, inputs: torch.Tensor, targets: torch.Tensor, damping: float,
                 weight_decay: float = 0.0, dense_limit: int = 3000):
        self.model = copy.deepcopy(model).double().eval()
        self.base = trainable_parameters(self.model)
        self.theta_s = flatten(self.base).clone()
        self.loss = loss
        self.x = inputs.double() if inputs.is_floating_point() else inputs
        self.targets = targets
        # Training weight decay is part of the training objective's curvature: its Bregman divergence is
        # (wd/2)||theta - theta_s||^2, so it adds to the proximity term.
        self.proximity = damping + weight_decay
        with torch.no_grad():
            self.reference = functional_call(self.model, self.base, (self.x,))
        self.dense = self.theta_s.numel() <= dense_limit
        # The dense Hessian vmaps Hessian-vector products in chunks; memory grows with chunk x N.
        self.chunk = max(1, min(self.theta_s.numel(), 400_000 // max(1, self.x.shape[0])))
        self._start_factor: torch.Tensor | None = None

    def start_factor(self) -> torch.Tensor | None:
        """Cholesky factor of the objective's Hessian at theta_s and eps = 0 (G + proximity; the same for
        every example), or None where it is not positive definite (no proximity term, flat G)."""
        if self._start_factor is None:
            objective = _Objective(self, index=None)
            factor, info = torch.linalg.cholesky_ex(objective.hessian(self.theta_s, 0.0))
            self._start_factor = factor if int(info) == 0 else torch.empty(0)
        return self._start_factor if self._start_factor.numel() else None

    def critical_epsilon(self, index: int, sign: float) -> float | None:
        """The eps of the given sign closest to 0 at which the objective's Hessian at theta_s,
        A + eps B with A = G + (lambda + wd) I and B = Hess L(z_index), stops being positive definite
        (inf: never; None: above the dense limit, not computed). Beyond it the objective's second-order
        model at the trained weights is unbounded, the regime no influence estimate describes (they are
        that model's response)."""
        factor = self.start_factor() if self.dense else None
        if factor is None:
            return None
        own = _Objective(self, index).hessian(self.theta_s, 0.0, own_only=True)
        half = torch.linalg.solve_triangular(factor, own, upper=False)
        whitened = torch.linalg.solve_triangular(factor, half.T, upper=False)
        mu = torch.linalg.eigvalsh(0.5 * (whitened + whitened.T))
        extreme = float(mu[-1]) if sign < 0 else -float(mu[0])  # A + eps B singular at eps = -1/mu
        return sign / extreme if extreme > 0 else sign * math.inf

    def solve(self, index: int, epsilon: float, tolerance: float = 1e-5, max_iterations: int = 200,
              fold_resolution: float = 1.0 / 32) -> PBRFSolution:
        """Follow the local minimiser from theta_s (eps = 0) to `epsilon` (see the module doc).

        `tolerance` is on the objective's gradient relative to its size at theta_s, |eps| ||grad L(z_m)||;
        `max_iterations` bounds the Newton steps in all (status not_converged past it)."""
        objective, theta_s = _Objective(self, index), self.theta_s
        with torch.no_grad():
            loss_s = float(objective.own_loss(theta_s))
        scale = abs(epsilon) * float(objective.own_gradient(theta_s).norm())
        tolerance_abs = tolerance * max(scale, 1e-300)
        kink_abs = 1e2 * tolerance_abs  # see _corrector

        theta, t, step, newton_steps, accepted, last_norm = theta_s.clone(), 0.0, 1.0, 0, 0, 0.0
        preconditioner = objective.preconditioner(theta, 0.0, factor=self.start_factor() if self.dense else None)
        # theta_s itself is not a strict minimum where the proximity term is 0 and G has flat directions
        status = CONVERGED if preconditioner is not None else ILL_POSED
        while status == CONVERGED and t < 1.0:
            step = min(step, 1.0 - t)
            target = (t + step) * epsilon
            ok = True
            try:  # predictor: the tangent of the branch, dtheta/deps = -H^-1 grad L(z_m, theta)
                tangent = -objective.solve(theta, t * epsilon, objective.own_gradient(theta), preconditioner,
                                           rtol=1e-8)
            except _NotPositiveDefinite:
                ok = False
            if ok:
                predicted = theta + (step * epsilon) * tangent
                corrected, norm, used, ok = _corrector(objective, preconditioner, predicted, target,
                                                        tolerance_abs, kink_abs)
                newton_steps += used
                # A corrector that travels as far as the predictor did has left the branch (another basin).
                ok = ok and float((corrected - predicted).norm()) <= 0.5 * float((predicted - theta).norm()) + 1e-12
            if ok:
                # The accepted point must be a strict local minimum (positive definite Hessian, certified
                # by Cholesky on the dense path); its factor preconditions the next tangent and corrector.
                new_preconditioner = objective.preconditioner(corrected, target)
                ok = new_preconditioner is not None
            if ok:
                theta, t, preconditioner, last_norm = corrected, t + step, new_preconditioner, norm
                accepted += 1
                step *= 2.0
            else:
                step *= 0.5
                # The end of the branch is located to `fold_resolution` of the path travelled.
                if step < fold_resolution * max(t, 1e-3):
                    status = BRANCH_ENDED
            if status == CONVERGED and newton_steps >= max_iterations and t < 1.0:
                status = NOT_CONVERGED

        reached = t * epsilon
        with torch.no_grad():
            change = float(objective.own_loss(theta)) - loss_s
        return PBRFSolution(index=index, epsilon=epsilon, reached_epsilon=reached, status=status,
                            self_influence=(-change / reached) if reached != 0 else None, loss_change=change,
                            gradient_norm=last_norm, relative_gradient_norm=last_norm / max(scale, 1e-300),
                            distance=float((theta - theta_s).norm()), iterations=newton_steps,
                            continuation_steps=accepted)


class _Objective:
    """theta -> the PBRF objective of one example (index None: the eps-independent part only)."""

    def __init__(self, problem: PBRFProblem, index: int | None):
        self.problem = problem
        self.x_m = None if index is None else problem.x[index : index + 1]
        self.y_m = None if index is None else problem.targets[index : index + 1]

    def own_loss(self, theta: torch.Tensor) -> torch.Tensor:
        p = self.problem
        return p.loss.loss(functional_call(p.model, unflatten(theta, p.base), (self.x_m,)), self.y_m).sum()

    def __call__(self, theta: torch.Tensor, epsilon: float) -> torch.Tensor:
        p = self.problem
        outputs = functional_call(p.model, unflatten(theta, p.base), (p.x,))
        value = p.loss.bregman(outputs, p.reference).mean() + 0.5 * p.proximity * (theta - p.theta_s).pow(2).sum()
        return value + epsilon * self.own_loss(theta) if epsilon else value

    def gradient(self, theta, epsilon):
        return grad(lambda t: self(t, epsilon))(theta)

    def own_gradient(self, theta):
        return grad(self.own_loss)(theta)

    def hvp(self, theta, epsilon, vector):
        return jvp(lambda t: self.gradient(t, epsilon), (theta,), (vector,))[1]

    def hessian(self, theta, epsilon, own_only=False):
        f = self.own_loss if own_only else (lambda t: self(t, epsilon))
        one = lambda v: jvp(grad(f), (theta,), (v,))[1]  # noqa: E731
        h = vmap(one, chunk_size=self.problem.chunk)(torch.eye(theta.numel(), dtype=theta.dtype))
        return 0.5 * (h + h.T)

    def preconditioner(self, theta, epsilon, factor: torch.Tensor | None = None):
        """b -> H^-1 b with H the Hessian at theta (dense path, Cholesky; `factor` if already known), the
        identity on the matrix-free path, or None where the dense Hessian is not positive definite."""
        if not self.problem.dense:
            return lambda b: b
        if factor is None:
            factor, info = torch.linalg.cholesky_ex(self.hessian(theta, epsilon))
            if int(info) != 0:
                return None
        return lambda b: torch.cholesky_solve(b.unsqueeze(1), factor).squeeze(1)

    def solve(self, theta, epsilon, rhs, preconditioner, rtol, max_iterations=500):
        """Preconditioned conjugate gradient on H(theta) x = rhs; raises where H shows negative curvature."""
        x, r = torch.zeros_like(rhs), rhs.clone()
        z = preconditioner(r)
        p, rz = z.clone(), float(r @ z)
        stop = rtol * float(rhs.norm())
        for _ in range(max_iterations):
            hp = self.hvp(theta, epsilon, p)
            curvature = float(p @ hp)
            if not curvature > 0:
                raise _NotPositiveDefinite
            alpha = rz / curvature
            x, r = x + alpha * p, r - alpha * hp
            if float(r.norm()) <= stop:
                break
            z = preconditioner(r)
            rz_new = float(r @ z)
            p, rz = z + (rz_new / rz) * p, rz_new
        return x


def _corrector(objective: _Objective, preconditioner, theta, epsilon, tolerance_abs, kink_abs, max_iterations=15):
    """Inexact Newton with Armijo backtracking from theta; returns (theta, gradient norm, steps, ok).

    ok when the gradient is below tolerance_abs, or when the minimiser sits on a kink of a ReLU network
    (the gradient jumps there and never vanishes): the backtracked steps then shrink to nothing while
    the gradient stays small (below kink_abs), and the point, hence the loss read off it, is pinned."""
    start = theta
    for steps in range(max_iterations + 1):
        gradient = objective.gradient(theta, epsilon)
        norm = float(gradient.norm())
        if not math.isfinite(norm):
            return theta, norm, steps, False
        if norm <= tolerance_abs or steps == max_iterations:
            return theta, norm, steps, norm <= tolerance_abs
        try:  # forcing term: solve more exactly as the gradient shrinks (superlinear convergence)
            direction = -objective.solve(theta, epsilon, gradient, preconditioner,
                                       rtol=min(0.1, math.sqrt(norm / max(tolerance_abs, 1e-300)) * 1e-4))
        except _NotPositiveDefinite:
            return theta, norm, steps, False
        value, slope, step = float(objective(theta, epsilon)), float(gradient @ direction), 1.0
        while float(objective(theta + step * direction, epsilon)) > value + 1e-4 * step * slope:
            step *= 0.5
            if step < 1e-9:
                break
        move = step * direction
        if step < 1e-9 or float(move.norm()) <= 1e-9 * float((theta - start).norm() + (start - objective.problem.theta_s).norm()):
            # no further progress: a kink (converged when the gradient is small) or a failure
            return theta, norm, steps, norm <= kink_abs
        theta = (theta + move).detach()
    return theta, norm, max_iterations, False


def solve_pbrf(model: nn.Module, loss, inputs: torch.Tensor, targets: torch.Tensor, index: int,
               epsilon: float, damping: float, weight_decay: float = 0.0, **options) -> PBRFSolution:
    """One example's PBRF solve (see PBRFProblem.solve; for several examples build the problem once)."""
    return PBRFProblem(model, loss, inputs, targets, damping, weight_decay).solve(index, epsilon, **options)
