"""A sharded fit (partial sums per shard of rows, added in a reduce) scores as one worker's fit does:
the Fisher labels are drawn per batch from (seed, first example), so sharding changes only the order
in which float sums are added."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from app.influence import AuditConfig, run_audit, shards
from app.influence.audit import set_up_audit
from app.influence.base import FittedCurvature
from tests.zoo import ResidualCNN, TextClassifier


def _sharded(model, inputs, labels, config, shard_size):
    """Every stage's shards, each with an estimator of its own and run last shard first (as separate
    workers would), through the bytes a worker stores."""
    setup = lambda: set_up_audit(model, inputs, labels, config)  # noqa: E731
    plan = shards.ShardPlan.make(setup(), inputs.shape[0], shard_size)
    state = None
    for stage in plan.fit_stages:
        indices = reversed(range(plan.num_shards))
        partials = {i: shards.fit_shard(setup(), plan, stage, i, inputs, labels, state) for i in indices}
        state = shards.finish_stage(setup(), plan, stage, [partials[i] for i in range(plan.num_shards)], inputs, state)
        state = FittedCurvature.from_bytes(state.to_bytes())
    parts = [shards.score_shard(setup(), plan, i, inputs, labels, state, config.loss) for i in range(plan.num_shards)]
    return plan, shards.conclude_sharded(config, setup(), plan, inputs, labels, parts, state, {}, time.perf_counter(),
                                         False)


def _mlp_case():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)), torch.randn(700, 6), torch.randint(0, 3, (700,))


def _cnn_case():
    torch.manual_seed(1)
    return ResidualCNN(classes=3, width=4).eval(), torch.randn(200, 3, 8, 8), torch.randint(0, 3, (200,))


def _text_case():
    torch.manual_seed(2)
    return TextClassifier(), torch.randint(0, 50, (200, 12)), torch.randint(0, 3, (200,))


@pytest.mark.parametrize("case", [_mlp_case, _cnn_case, _text_case], ids=["mlp", "residual-cnn-batchnorm", "embeddings"])
@pytest.mark.parametrize("method", ["ekfac", "kfac", "diagonal"])
def test_sharded_fit_scores_equal_one_workers_fit(case, method):
    model, inputs, labels = case()
    config = AuditConfig(method=method, batch_size=32, seed=4)
    one = run_audit(model, inputs, labels, config)
    plan, sharded = _sharded(model, inputs, labels, config, shard_size=70)
    assert plan.shard_size == 64  # aligned to batches
    sizes = [stop - start for start, stop in map(plan.bounds, range(plan.num_shards))]
    # shards of 64, the last 64 rows in quarters (never below a batch), covering every row once
    assert sum(sizes) == inputs.shape[0] and max(sizes) == 64 and sizes[-2] == 32
    assert all(plan.bounds(i)[0] % 32 == 0 for i in range(plan.num_shards))
    # float32 statistics added in another order: relative differences at float32 rounding
    scale = float(one.scores.abs().max())
    assert float((sharded.scores - one.scores).abs().max()) <= 1e-5 * scale
    assert sharded.damping == pytest.approx(one.damping, rel=1e-5)
    assert sharded.summary["estimator"]["num_parameters"] == \
        one.summary["estimator"]["num_parameters"]
    assert sharded.summary["shards"]["num_shards"] == plan.num_shards
    assert torch.equal(sharded.predicted, one.predicted)


def test_fisher_draws_do_not_depend_on_the_fit_plan():
    """Labels are drawn per example from (seed, index): a one-pass fit, a two-pass fit (no cache) and
    another batch size give the same scores; another seed does not."""
    model, inputs, labels = _mlp_case()
    one_pass = run_audit(model, inputs, labels, AuditConfig(method="ekfac", batch_size=50, seed=9))
    streamed = run_audit(model, inputs, labels, AuditConfig(method="ekfac", batch_size=50, seed=9, cache_bytes=0))
    other_batches = run_audit(model, inputs, labels, AuditConfig(method="ekfac", batch_size=33, seed=9))
    other_seed = run_audit(model, inputs, labels, AuditConfig(method="ekfac", batch_size=50, seed=10))
    scale = float(one_pass.scores.abs().max())
    for same in (streamed, other_batches):
        assert float((one_pass.scores - same.scores).abs().max()) <= 1e-5 * scale
    assert float((one_pass.scores - other_seed.scores).abs().max()) > 1e-3 * scale  # the seed does matter


def test_sampled_labels_follow_the_model_distribution():
    """The counter-based draws are a fair sampler: label frequencies match softmax(outputs)."""
    from app.influence.base import example_uniforms
    from app.influence.losses import CrossEntropyOutput

    outputs = torch.tensor([[0.0, 1.0, -1.0]]).expand(20000, 3)
    uniforms = example_uniforms(seed=3, stream=0, first_example=0, batch=20000, count=1)
    draws = CrossEntropyOutput().sample_targets(outputs, uniforms)
    expected = torch.softmax(outputs[0].double(), -1)
    frequencies = torch.bincount(draws, minlength=3).double() / 20000
    assert float((frequencies - expected).abs().max()) < 0.015  # ~4 standard errors at n=20000
    assert torch.equal(example_uniforms(3, 0, 100, 50, 1), uniforms[100:150])  # a batch is a slice


def test_a_sharded_exact_fit_equals_one_workers():
    """The exact GGN is a float64 sum of per-shard partial sums like any staged fit."""
    model, inputs, labels = _mlp_case()
    config = AuditConfig(method="exact", batch_size=32)
    one = run_audit(model, inputs, labels, config)
    plan, sharded = _sharded(model, inputs, labels, config, shard_size=70)
    assert plan.fit_stages == ("ggn",) and plan.num_shards == 13  # 9 x 64 + 32, then 32, 32, 32, 28
    # float64 sums of float32 Jacobian products, added in another order
    torch.testing.assert_close(sharded.scores, one.scores, rtol=1e-9, atol=0)
    assert sharded.damping == pytest.approx(one.damping, rel=1e-12)


def test_methods_that_need_every_example_at_once_are_not_sharded():
    model, inputs, labels = _mlp_case()
    for config in (AuditConfig(method="loo"), AuditConfig(method="ekfac", verify_top_k=3),
                   AuditConfig(method="lanczos"), AuditConfig(method="cg")):
        assert shards.why_not_sharded(config, set_up_audit(model, inputs, labels, config)) is not None
    for method in ("ekfac", "exact"):
        config = AuditConfig(method=method)
        assert shards.why_not_sharded(config, set_up_audit(model, inputs, labels, config)) is None
    # an exact GGN of 6,000 parameters is 288 MB per shard: it stays in one worker
    wide = nn.Sequential(nn.Linear(6, 600), nn.Tanh(), nn.Linear(600, 3))
    config = AuditConfig(method="exact")
    assert "too large" in shards.why_not_sharded(config, set_up_audit(wide, inputs, labels, config))
