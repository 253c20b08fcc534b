"""Matrix-free estimators built on GGN-vector products: `lanczos` and `cg`.

A GGN-vector product over the training set is a sum over batches of J^T H J v (JVP, output Hessian,
VJP), so every matvec is one streaming, shardable pass over the data and nothing of size N x P or
P x P is ever formed.

- lanczos: top-k eigenpairs (u_j, mu_j) of G by Lanczos with full reorthogonalisation (float64);
  s = sum_j (u_j^T g)^2 / (mu_j + lambda) + (||g||^2 - sum_j (u_j^T g)^2) / lambda, the second term
  being the exact contribution of the orthogonal complement when G is taken as zero there.
  With k = P it is the exact damped-GGN self-influence.
- cg: conjugate gradient on (G + lambda I) x = g for each example, a block of right-hand sides per
  pass; for verification and for few right-hand sides (attribution), refused on large audits.
  Residuals are checked and reported, never silently dropped.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import torch
from torch.func import functional_call, vmap

from .base import GRAD_CHUNK_ELEMENTS, EngineError, Estimator, FittedCurvature
from .functional import flatten, unflatten


def ggn_matvec_partial(model, params, loss, inputs: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """sum over the batch of J_i^T H_i J_i v for each column-batch row of `vectors` (R, P) -> (R, P)."""

    def batch_outputs(p):
        return functional_call(model, p, (inputs,))

    def one(v):
        tangent = unflatten(v, params)
        outputs, jv = torch.func.jvp(batch_outputs, (params,), (tangent,))
        hjv = torch.einsum("bij,bj->bi", loss.hessian(outputs.detach()), jv)
        _, vjp_fn = torch.func.vjp(batch_outputs, params)
        return flatten(vjp_fn(hjv)[0])

    return vmap(one)(vectors)


class _MatrixFree(Estimator):
    def _trace_pass(self, data, report) -> float:
        """trace(G) = E||g(y~p)||^2 over labels sampled from the model (exact for fisher_samples=0)."""
        total = 0.0
        for b, (x, y) in enumerate(data()):
            self.draw_for_batch(data.first_example(b))
            with torch.no_grad():
                outputs = self.model(x)
            if self.options.fisher_samples == 0:
                root = self.loss.hessian_sqrt(outputs)
                vector_sets = [root[:, c, :] for c in range(root.shape[1])]
            else:
                vector_sets = [self.loss.residual(outputs, self.sampled_targets(outputs, sample, "trace"))
                               for sample in range(self.options.fisher_samples)]
            for vectors in vector_sets:
                def value(p, xi, vi):
                    return (functional_call(self.model, p, (xi.unsqueeze(0),)).reshape(-1) * vi).sum()

                g = flatten(vmap(torch.func.grad(value), in_dims=(None, 0, 0))(self.params, x, vectors), batch_dims=1)
                total += float(g.double().pow(2).sum())
            report("trace", (b + 1) / data.num_batches)
        scale = 1 if self.options.fisher_samples == 0 else self.options.fisher_samples
        return total / scale / data.num_examples

    def matvec(self, data, vectors: torch.Tensor) -> torch.Tensor:
        """(G + wd I) V for V (R, P): one pass over the data."""
        out = torch.zeros_like(vectors, dtype=torch.float64)
        for x, _ in data():
            out += ggn_matvec_partial(self.model, self.params, self.loss, x, vectors.float()).double()
        out /= data.num_examples
        if self.options.weight_decay:
            out += self.options.weight_decay * vectors.double()
        return out


class LanczosEstimator(_MatrixFree):
    name = "lanczos"
    stores_curvature = True  # its Ritz pairs: rank x P floats

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rank = max(1, min(self.options.lanczos_rank, self.num_parameters))
        self.eigenvalues: torch.Tensor | None = None
        self.eigenvectors: torch.Tensor | None = None

    @property
    def num_passes(self) -> int:
        return 1 + self.rank

    def fit(self, data, report):
        trace = self._trace_pass(data, report) + self.options.weight_decay * self.num_parameters
        if self.damping is None:
            self.damping = 0.1 * trace / self.num_parameters
            if self.damping <= 0:
                raise EngineError("the model's Gauss-Newton curvature is zero on this data; pass an explicit damping")
        P, k = self.num_parameters, self.rank
        basis = torch.zeros(k, P, dtype=torch.float64)
        alphas, betas = [], []
        q = torch.randn(P, generator=self.generator, dtype=torch.float64)
        q /= q.norm()
        previous, beta = torch.zeros_like(q), 0.0
        for j in range(k):
            basis[j] = q
            w = self.matvec(data, q.unsqueeze(0).to(self.device))[0].cpu()
            alpha = float(w @ q)
            w = w - alpha * q - beta * previous
            # full reorthogonalisation (twice is enough) keeps the Ritz pairs clean in float64
            for _ in range(2):
                w -= basis[: j + 1].T @ (basis[: j + 1] @ w)
            alphas.append(alpha)
            report("lanczos", 1.0)  # each iteration is one pass over the data: one of the num_passes slots
            beta = float(w.norm())
            if j + 1 == k or beta <= 1e-10 * max(1.0, abs(alpha)):
                break
            betas.append(beta)
            previous, q = q, w / beta
        m = len(alphas)
        tri = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if m > 1:
            off = torch.tensor(betas[: m - 1], dtype=torch.float64)
            tri += torch.diag(off, 1) + torch.diag(off, -1)
        ritz_values, ritz_vectors = torch.linalg.eigh(tri)
        self.eigenvalues = ritz_values.clamp_min(0)
        self.eigenvectors = (ritz_vectors.T @ basis[:m]).to(self.device)  # (m, P)
        self.trace = trace
        # the remaining passes promised to the progress bar were not needed
        for _ in range(k - m):
            report("lanczos", 1.0)

    def fitted_curvature(self, complete: bool = True) -> FittedCurvature:
        if self.eigenvectors is None:
            raise EngineError("the 'lanczos' estimator has no fitted curvature to store")
        return FittedCurvature(
            {"eigenvalues": self.eigenvalues, "eigenvectors": self.eigenvectors},
            {"estimator": self.name, "format": "pbrf-audit low-rank curvature v1",
             "structure": json.dumps(self.structure()), "damping": json.dumps(self.damping),
             "trace": json.dumps(self.trace),
             "options": json.dumps({"damping": self.options.damping, "weight_decay": self.options.weight_decay,
                                    "lanczos_rank": self.options.lanczos_rank, "seed": self.options.seed})})

    def load_curvature(self, curvature: FittedCurvature, example: torch.Tensor) -> None:
        meta = self._check_stored(curvature)
        self.eigenvalues = curvature.tensors["eigenvalues"].double()
        self.eigenvectors = curvature.tensors["eigenvectors"].double().to(self.device)
        self.damping, self.trace = json.loads(meta["damping"]), json.loads(meta["trace"])
        # the complement's curvature is the weight decay it was fitted with
        self.options = replace(self.options, weight_decay=json.loads(meta["options"])["weight_decay"])

    def solve(self, vectors: torch.Tensor) -> torch.Tensor:
        """(G + lambda I)^-1 v with G as its top-k eigenpairs and weight decay on the complement."""
        v = vectors.double()
        proj = v @ self.eigenvectors.T
        inside = (proj / (self.eigenvalues.to(v.device) + self.damping)) @ self.eigenvectors
        rest = (v - proj @ self.eigenvectors) / (self.damping + self.options.weight_decay)
        return inside + rest

    def self_influence(self, inputs, targets):
        parts = []
        lam = self.damping
        for g in self.loss_gradients(inputs, targets):
            g = g.double()
            proj = g @ self.eigenvectors.T
            captured = proj.pow(2)
            inside = (captured / (self.eigenvalues.to(g.device) + lam)).sum(1)
            # outside the Krylov space G is taken as zero, so the curvature there is weight decay + damping
            rest = (g.pow(2).sum(1) - captured.sum(1)).clamp_min(0) / (lam + self.options.weight_decay)
            parts.append(inside + rest)
        return torch.cat(parts)

    def leverage(self, inputs: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        from .functional import per_example_jacobians

        lam = self.damping
        out = []
        step = max(1, GRAD_CHUNK_ELEMENTS // max(1, self.num_parameters * classes.shape[1]))
        for start in range(0, inputs.shape[0], step):
            jac = per_example_jacobians(self.model, self.params, inputs[start : start + step]).double()
            idx = classes[start : start + step]
            jac = torch.gather(jac, 1, idx.unsqueeze(-1).expand(-1, -1, jac.shape[-1]))
            proj = jac @ self.eigenvectors.T  # (b, K, k)
            inside = torch.einsum("bck,bdk,k->bcd", proj, proj, 1.0 / (self.eigenvalues.to(jac.device) + lam))
            rest = (jac @ jac.transpose(1, 2) - proj @ proj.transpose(1, 2)) / (lam + self.options.weight_decay)
            out.append(inside + rest)
        return torch.cat(out)

    def describe(self):
        top = self.eigenvalues.flip(0)[:5].tolist() if self.eigenvalues is not None else []
        return {"estimator": self.name, "num_parameters": self.num_parameters, "damping": self.damping,
                "rank": int(self.eigenvalues.numel()) if self.eigenvalues is not None else self.rank,
                "top_eigenvalues": top,
                "captured_trace_fraction": float(self.eigenvalues.sum() / self.trace) if self.eigenvalues is not None else None,
                "note": "top-k eigenpairs of the GGN by Lanczos; the orthogonal complement is treated as damping only"}


class CGEstimator(_MatrixFree):
    name = "cg"
    tolerance = 1e-6
    max_iterations = 500
    block = 64

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_examples = int(self.options.extra.get("max_cg_examples", 512))
        self.worst_residual = 0.0
        self.iterations: list[int] = []
        self._data = None

    @property
    def num_passes(self) -> int:
        return 1

    def fit(self, data, report):
        if data.num_examples > self.max_examples:
            raise EngineError(
                f"method 'cg' solves one linear system per example and is limited to {self.max_examples} examples "
                f"(this dataset has {data.num_examples}); use 'ekfac' or 'exact' for whole-dataset audits")
        self._data = data
        if self.damping is None:
            trace = self._trace_pass(data, report) + self.options.weight_decay * self.num_parameters
            self.damping = 0.1 * trace / self.num_parameters
        else:
            report("trace", 1.0)

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        """(G + lambda I)^-1 for each row of rhs (R, P), by conjugate gradient with batched matvecs."""
        b = rhs.double()
        x = torch.zeros_like(b)
        r = b.clone()
        p = r.clone()
        rs = (r * r).sum(1)
        norms = b.norm(dim=1).clamp_min(1e-300)
        iterations = 0
        for iterations in range(1, self.max_iterations + 1):
            ap = self.matvec(self._data, p) + self.damping * p
            alpha = rs / (p * ap).sum(1).clamp_min(1e-300)
            x += alpha.unsqueeze(1) * p
            r -= alpha.unsqueeze(1) * ap
            rs_new = (r * r).sum(1)
            if bool((rs_new.sqrt() / norms <= self.tolerance).all()):
                break
            p = r + (rs_new / rs.clamp_min(1e-300)).unsqueeze(1) * p
            rs = rs_new
        # true residual, recomputed: CG's recurrence can drift
        residual = (self.matvec(self._data, x) + self.damping * x - b).norm(dim=1) / norms
        # a NaN residual (CG broke down at a tiny damping) must count as the worst, not vanish in max()
        worst = float(residual.max()) if bool(torch.isfinite(residual).all()) else math.inf
        self.worst_residual = max(self.worst_residual, worst)
        self.iterations.append(iterations)
        if self.worst_residual > 1e-3:
            raise EngineError(f"conjugate gradient did not converge (relative residual {self.worst_residual:.1e} "
                              f"after {iterations} iterations); raise the damping")
        return x

    def self_influence(self, inputs, targets):
        parts = []
        for g in self.loss_gradients(inputs, targets):
            for start in range(0, g.shape[0], self.block):
                gb = g[start : start + self.block].double()
                parts.append((gb * self.solve(gb)).sum(1))
        return torch.cat(parts)

    def describe(self):
        return {"estimator": self.name, "num_parameters": self.num_parameters, "damping": self.damping,
                "worst_relative_residual": self.worst_residual,
                "iterations": {"max": max(self.iterations, default=0), "mean": (sum(self.iterations) / len(self.iterations)) if self.iterations else 0},
                "tolerance": self.tolerance}

