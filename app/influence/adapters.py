"""Model shapes that are classifiers in another form, adapted to the softmax classifier the engine audits."""

from __future__ import annotations

import torch
from torch import nn


class SingleLogitAsTwoClasses(nn.Module):
    """A binary classifier with one output z (trained with a sigmoid and binary cross-entropy, e.g.
    BCEWithLogitsLoss) as the two-class softmax classifier it equals: logits [0, z]. Softmax then gives
    [1 - sigmoid(z), sigmoid(z)], the softmax cross-entropy of label y in {0, 1} is the binary
    cross-entropy of z, and its Gauss-Newton curvature sigmoid(z)(1 - sigmoid(z)) is the Bernoulli one:
    every method (sampled Fisher labels, out-of-sample probabilities, confident learning, suggested
    labels) audits the model the user trained, with no new loss. The learned weights are the inner
    model's alone."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        z = self.inner(*inputs)
        return torch.cat([torch.zeros_like(z), z], dim=1)
