"""The exact GGN, self-influence, and the PBRF it approximates, on tiny models (CPU, seconds)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from app.influence import AuditConfig, EngineError, EstimatorOptions, make_estimator, run_audit
from app.influence.functional import flatten, trainable_parameters, unflatten
from app.influence.losses import CrossEntropyOutput, SquaredErrorOutput
from app.influence.pbrf import solve_pbrf


def tiny_problem(n=40, d=3, hidden=5, classes=3, seed=0, epochs=300):
    torch.manual_seed(seed)
    x = torch.randn(n, d)
    y = torch.randint(0, classes, (n,))
    model = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, classes))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(epochs):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval().requires_grad_(False), x, y


def brute_force_ggn(model, x, loss):
    """G = (1/N) sum_i J_i^T H_i J_i with J_i from torch.autograd.functional.jacobian, one example at a time."""
    params = trainable_parameters(model)
    theta = flatten(params).double()
    model64 = model.double()
    total = torch.zeros(theta.numel(), theta.numel(), dtype=torch.float64)
    for i in range(x.shape[0]):
        xi = x[i : i + 1].double()
        jac = torch.autograd.functional.jacobian(lambda t: functional_call(model64, unflatten(t, params), (xi,))[0], theta)
        out = model64(xi)
        h = loss.hessian(out)[0]
        total += jac.T @ h @ jac
    model.float()
    return total / x.shape[0]


def fitted_exact(model, x, y, damping, loss=None, weight_decay=0.0):
    loss = loss or CrossEntropyOutput()
    est = make_estimator("exact", model, loss, EstimatorOptions(damping=damping, weight_decay=weight_decay), torch.device("cpu"))
    est.finish("ggn", est.accumulate("ggn", x, y, None), x.shape[0])
    return est


def test_ggn_matches_brute_force_jacobians():
    model, x, y = tiny_problem(n=12)
    est = make_estimator("exact", model, CrossEntropyOutput(), EstimatorOptions(damping=1e-3), torch.device("cpu"))
    # two partial sums (shards) must add up to the whole
    partial = est.accumulate("ggn", x[:5], y[:5], None)
    partial = est.accumulate("ggn", x[5:], y[5:], partial)
    est.finish("ggn", partial, x.shape[0])
    expected = brute_force_ggn(model, x, CrossEntropyOutput())
    torch.testing.assert_close(est.ggn, expected, rtol=1e-5, atol=1e-6)
    assert torch.linalg.eigvalsh(est.ggn).min() > -1e-8  # PSD


def test_ggn_regression_is_jtj():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 2)).eval().requires_grad_(False)
    x = torch.randn(7, 2)
    est = fitted_exact(model, x, torch.randn(7, 2), 1e-3, loss=SquaredErrorOutput())
    torch.testing.assert_close(est.ggn, brute_force_ggn(model, x, SquaredErrorOutput()), rtol=1e-5, atol=1e-6)


def test_self_influence_is_damped_ggn_quadratic_form():
    model, x, y = tiny_problem(n=20)
    est = fitted_exact(model, x, y, damping=0.05)
    loss = CrossEntropyOutput()
    params = trainable_parameters(model)
    grads = []
    for i in range(x.shape[0]):
        p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        value = loss.loss(functional_call(model, p, (x[i : i + 1],)), y[i : i + 1]).sum()
        grads.append(flatten(list(torch.autograd.grad(value, list(p.values())))).double())
    g = torch.stack(grads)
    damped = est.ggn + 0.05 * torch.eye(est.ggn.shape[0], dtype=torch.float64)
    expected = torch.einsum("ip,ip->i", g, torch.linalg.solve(damped, g.T).T)
    torch.testing.assert_close(est.self_influence(x, y), expected, rtol=1e-6, atol=1e-9)
    identity = make_estimator("identity", model, loss, EstimatorOptions(), torch.device("cpu"))
    torch.testing.assert_close(identity.self_influence(x, y), g.pow(2).sum(1), rtol=1e-5, atol=1e-7)


def test_damping_heuristic_is_tenth_of_mean_eigenvalue_and_weight_decay_adds():
    model, x, y = tiny_problem(n=15)
    est = fitted_exact(model, x, y, damping=None)
    eig = torch.linalg.eigvalsh(est.ggn)
    assert est.damping == pytest.approx(0.1 * float(eig.mean()), rel=1e-6)
    with_wd = fitted_exact(model, x, y, damping=0.01, weight_decay=0.02)
    torch.testing.assert_close(with_wd.ggn - est.ggn, 0.02 * torch.eye(est.ggn.shape[0], dtype=torch.float64))


@pytest.mark.parametrize("loss_name", ["cross_entropy", "squared_error"])
def test_self_influence_is_first_order_pbrf_response(loss_name):
    """Solve the PBRF objective directly for shrinking eps: -(dL)/eps -> g^T (G + lambda I)^-1 g."""
    model, x, y = tiny_problem(n=30)
    loss = CrossEntropyOutput() if loss_name == "cross_entropy" else SquaredErrorOutput()
    if loss_name == "squared_error":
        y = torch.randn(x.shape[0], 3)
    damping = 0.1
    est = fitted_exact(model, x, y, damping, loss=loss)
    for index in (0, 7):
        exact = float(est.self_influence(x[index : index + 1], y[index : index + 1])[0])
        gaps = []
        for eps in (1e-1, 1e-2, 1e-3, 1e-4):
            sol = solve_pbrf(model, loss, x, y, index, eps, damping)
            assert sol.gradient_norm < 1e-7, sol
            gaps.append(abs(sol.self_influence - exact) / exact)
        assert gaps[0] > gaps[1] > gaps[2] > gaps[3], gaps
        assert gaps[3] < 5e-3, gaps
        # down-weighting (eps < 0, the direction of removal) converges to the same first-order object
        down = solve_pbrf(model, loss, x, y, index, -1e-4, damping)
        assert abs(down.self_influence - exact) / exact < 5e-3


def test_exact_refuses_large_models_with_the_limit_named():
    model = nn.Sequential(nn.Linear(100, 100), nn.Linear(100, 10))
    with pytest.raises(EngineError, match="at most 500 parameters"):
        run_audit(model, torch.randn(4, 100), torch.zeros(4, dtype=torch.long),
                  AuditConfig(method="exact", max_exact_parameters=500))


def test_run_audit_reports_progress_and_flags():
    model, x, y = tiny_problem(n=50)
    seen = []
    result = run_audit(model, x, y, AuditConfig(method="exact", batch_size=8, flag_fraction=0.2),
                       progress=lambda stage, f: seen.append((stage, f)))
    stages = [s for s, _ in seen]
    assert stages[0] == "predictions" and "ggn" in stages and stages[-1] == "scores"
    fractions = [f for _, f in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert result.flagged.shape[0] == 10
    assert np.all(np.diff(result.scores[result.flagged].numpy()) <= 0)
    assert result.damping > 0 and result.summary["damping"] == result.damping


def test_audit_fails_readably_when_outputs_do_not_cover_labels():
    model = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(EngineError, match="outputs"):
        run_audit(model, torch.randn(5, 3), torch.tensor([0, 1, 2, 0, 1]), AuditConfig(method="identity"))


def test_engine_imports_no_service_frameworks():
    code = ("import sys, app.influence, app.influence.pbrf; "
            "bad = [m for m in ('fastapi', 'celery', 'sqlalchemy', 'starlette') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_pbrf_verification_survives_a_removal_objective_that_is_unbounded():
    """On an over-parameterised ReLU MLP, the removal PBRF (eps = -1/N) is unbounded below with the
    heuristic damping and L-BFGS runs off to inf/NaN. The verification then measures closer to eps -> 0,
    says so per item, and never reports NaN (the summary is stored as strict JSON)."""
    import json

    import numpy as np

    rng = np.random.default_rng(7)
    centers = rng.normal(size=(5, 10)) * 1.5
    labels = rng.integers(0, 5, size=300)
    inputs = torch.from_numpy((centers[labels] + rng.normal(size=(300, 10))).astype(np.float32))
    flip = rng.random(300) < 0.05
    targets = torch.from_numpy(np.where(flip, rng.integers(0, 5, size=300), labels))
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 5))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(inputs), targets).backward()
        optimizer.step()
    result = run_audit(model.eval(), inputs, targets, AuditConfig(method="exact", verify_top_k=6))
    verification = result.summary["verification"]
    json.dumps(result.summary, allow_nan=False)  # raises on NaN or inf anywhere
    assert verification["num_at_smaller_epsilon"] + verification["num_diverged"] >= 1  # the case this is about
    for item in verification["items"]:
        assert item["diverged"] or (item["pbrf"] > 0 and abs(item["epsilon"]) <= 1 / 300)
    # seen: all six at eps = -1/(10N), Pearson 0.99, Spearman 0.94
    assert verification["num_diverged"] == 0 and verification["pearson"] > 0.9 and verification["spearman"] > 0.9
