"""Out-of-sample predictions (method `loo`): the Gauss-Newton step on the PBRF removal objective
against exact leave-one-out refits, and the leverage computations of the curvature back ends."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from app.influence import AuditConfig, EstimatorOptions, make_estimator, run_audit
from app.influence.base import BatchSource
from app.influence.functional import per_example_jacobians
from app.influence.losses import CrossEntropyOutput
from app.influence.loo import confident_learning, out_of_sample_logits
from tests.test_engine_exact import tiny_problem


def _fit_logistic(x, y, wd, mask, init=None):
    """L2-regularised multinomial logistic regression, sum of losses + (N wd / 2)||theta||^2, to convergence."""
    n = x.shape[0]
    model = nn.Linear(x.shape[1], int(y.max()) + 1).double()
    if init is not None:
        model.load_state_dict(init)
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=2000, tolerance_grad=1e-12, tolerance_change=1e-16,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        value = nn.functional.cross_entropy(model(x[mask]), y[mask], reduction="sum")
        value = value + 0.5 * n * wd * sum(p.pow(2).sum() for p in model.parameters())
        value.backward()
        return value

    opt.step(closure)
    return model


def test_newton_step_matches_leave_one_out_refits():
    torch.manual_seed(0)
    n, d, c, wd = 80, 5, 3, 1e-2
    x = torch.randn(n, d, dtype=torch.float64)
    y = torch.randint(0, c, (n,))
    y[:8] = (y[:8] + 1) % c  # some mislabeled points, whose removal moves the model most
    full = _fit_logistic(x, y, wd, torch.ones(n, dtype=torch.bool))
    refit = []
    for i in range(n):
        mask = torch.ones(n, dtype=torch.bool)
        mask[i] = False
        with torch.no_grad():
            refit.append(_fit_logistic(x, y, wd, mask, full.state_dict())(x[i : i + 1])[0])
    refit = torch.stack(refit)
    model = full.float().eval().requires_grad_(False)
    est = make_estimator("exact", model, CrossEntropyOutput(), EstimatorOptions(damping=1e-9, weight_decay=wd),
                         torch.device("cpu"))
    est.fit(BatchSource(x.float(), y, 32, torch.device("cpu")), lambda *a: None)
    f_loo, classes, _, clipped = out_of_sample_logits(est, CrossEntropyOutput(), x.float(), y, n)
    with torch.no_grad():
        f = model(x.float()).double()
    # first-order prediction (no (I - HM)^-1 factor) for comparison
    M = est.leverage(x.float(), classes) / n
    first = f + torch.einsum("bcd,bd->bc", M, CrossEntropyOutput().residual(f, y))
    change_true, change_loo, change_first = (refit - f).flatten(), (f_loo - f).flatten(), (first - f).flatten()
    corr_loo = np.corrcoef(change_true, change_loo)[0, 1]
    corr_first = np.corrcoef(change_true, change_first)[0, 1]
    err_loo = float((change_true - change_loo).norm() / change_true.norm())
    err_first = float((change_true - change_first).norm() / change_true.norm())
    print(f"logit change vs refit: corr {corr_loo:.5f} (first order {corr_first:.5f}), "
          f"relative error {err_loo:.3f} (first order {err_first:.3f})")
    assert clipped == 0
    assert corr_loo > 0.999 and err_loo < 0.05
    assert err_loo < err_first / 2


def test_leverage_of_each_back_end_matches_its_dense_inverse():
    """M = J (G~ + lambda I)^-1 J^T where G~ is the back end's own curvature, built densely here."""
    model, x, y = tiny_problem(n=30)
    loss = CrossEntropyOutput()
    classes = torch.arange(3).expand(x.shape[0], 3)
    jac = per_example_jacobians(model, {k: v.detach() for k, v in model.named_parameters()}, x).double()
    exact = make_estimator("exact", model, loss, EstimatorOptions(damping=0.05), torch.device("cpu"))
    exact.fit(BatchSource(x, y, 8, torch.device("cpu")), lambda *a: None)
    dense = torch.linalg.inv(exact.ggn + 0.05 * torch.eye(exact.ggn.shape[0], dtype=torch.float64))
    torch.testing.assert_close(exact.leverage(x, classes), jac @ dense @ jac.transpose(1, 2), rtol=1e-6, atol=1e-9)

    diag = make_estimator("diagonal", model, loss, EstimatorOptions(damping=0.05, fisher_samples=0), torch.device("cpu"))
    diag.fit(BatchSource(x, y, 8, torch.device("cpu")), lambda *a: None)
    inv = torch.cat([torch.cat([(1 / (diag.state[n]["L"] + 0.05))[:, :-1].reshape(-1), (1 / (diag.state[n]["L"] + 0.05))[:, -1]])
                     for n in ("0", "2")])
    torch.testing.assert_close(diag.leverage(x, classes), torch.einsum("bcp,bdp,p->bcd", jac, jac, inv.double()),
                               rtol=1e-4, atol=1e-7)

    lanczos = make_estimator("lanczos", model, loss, EstimatorOptions(damping=0.05, lanczos_rank=1000), torch.device("cpu"))
    lanczos.fit(BatchSource(x, y, 8, torch.device("cpu")), lambda *a: None)
    torch.testing.assert_close(lanczos.leverage(x, classes), jac @ dense @ jac.transpose(1, 2), rtol=1e-4, atol=1e-7)


def test_confident_learning_counts_off_diagonal_mass():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.1, 0.9], [0.85, 0.15],
                          [0.2, 0.8], [0.1, 0.9], [0.3, 0.7], [0.95, 0.05]])
    num_issues, thresholds, joint = confident_learning(probs, labels, 2)
    assert np.allclose(thresholds.numpy(), [(0.9 + 0.8 + 0.1 + 0.85) / 4, (0.8 + 0.9 + 0.7 + 0.05) / 4])
    assert num_issues == 2  # example 2 (labelled 0, looks like 1) and example 7 (labelled 1, looks like 0)


def test_loo_audit_flags_suggests_and_reports():
    model, x, y = tiny_problem(n=120, seed=4)
    y = y.clone()
    y[:10] = (y[:10] + 1) % 3
    result = run_audit(model, x, y, AuditConfig(method="loo", curvature="exact", damping=1e-3))
    oos = result.summary["out_of_sample"]
    assert result.summary["method"] == "loo" and result.summary["curvature"] == "exact"
    assert oos["num_label_issues"] == result.flagged.numel() and "confident learning" in result.summary["flag_rule"]
    p = result.extras["out_of_sample_given_probability"]
    torch.testing.assert_close(result.scores, 1 - p)
    assert ((result.extras["suggested_label"] >= 0) & (result.extras["suggested_label"] < 3)).all()
    # removing an example can only lower the model's confidence in its given label
    assert (p <= result.given_probability + 1e-6).all()


def test_ekfac_back_end_agrees_with_exact():
    torch.manual_seed(0)
    model, x, y = tiny_problem(n=300, d=6, hidden=12, classes=4, seed=3, epochs=400)
    y = y.clone()
    y[:30] = (y[:30] + 1) % 4
    from scipy.stats import spearmanr

    exact = run_audit(model, x, y, AuditConfig(method="loo", curvature="exact", damping=1e-3))
    ekfac = run_audit(model, x, y, AuditConfig(method="loo", curvature="ekfac", damping=1e-3, fisher_samples=0))
    rho = spearmanr(exact.scores.numpy(), ekfac.scores.numpy()).statistic
    same_suggestion = float((exact.extras["suggested_label"] == ekfac.extras["suggested_label"]).double().mean())
    print(f"loo ekfac vs exact: Spearman {rho:.3f}, same suggested label {same_suggestion:.3f}")
    assert rho > 0.9 and same_suggestion > 0.9
    assert ekfac.summary["out_of_sample"]["examples_with_clipped_eigenvalues"] == 0


def test_loo_with_approximate_curvature_warns_when_it_calls_most_labels_wrong():
    """An over-parameterised CNN that fits all 300 examples: the EK-FAC leverage overshoots and most
    examples look mislabeled; the summary must say so (exact curvature stays sane on the same model)."""
    import zlib

    seed = zlib.crc32(b"cnn_3x16x16")  # the architecture sweep's case that showed it
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(6, 768)) * 1.5
    labels = rng.integers(0, 6, size=300)
    inputs = (centers[labels] + rng.normal(size=(300, 768))).astype(np.float32).reshape(300, 3, 16, 16)
    labels = np.where(rng.random(300) < 0.05, rng.integers(0, 6, size=300), labels)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1),
                          nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 4 * 4, 6))
    x, y = torch.from_numpy(inputs), torch.from_numpy(labels)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    model.eval()
    approximate = run_audit(model, x, y, AuditConfig(method="loo", curvature="ekfac")).summary["out_of_sample"]
    exact = run_audit(model, x, y, AuditConfig(method="loo", curvature="exact")).summary["out_of_sample"]
    assert approximate["num_label_issues"] > 150 and "implausible" in approximate["warning"]
    assert exact["num_label_issues"] < 100 and "warning" not in exact
