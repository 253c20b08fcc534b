"""Real data for tests and benchmarks: scikit-learn's bundled digits, with seeded label flips."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def noisy_digits(seed: int = 0, noise: float = 0.1, train_size: int = 1500):
    """Standardised 8x8 digits; `noise` of the training labels flipped to a different class.

    Returns (x_train, y_noisy, y_true, flipped_mask, x_test, y_test) as numpy arrays.
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(data.target))
    x = (data.data / 16.0).astype(np.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-3)
    y = data.target.astype(np.int64)
    train, test = order[:train_size], order[train_size:]
    y_noisy = y[train].copy()
    flipped = np.zeros(train_size, dtype=bool)
    chosen = rng.choice(train_size, size=int(round(noise * train_size)), replace=False)
    shift = rng.integers(1, 10, size=chosen.shape[0])
    y_noisy[chosen] = (y_noisy[chosen] + shift) % 10
    flipped[chosen] = True
    return x[train], y_noisy, y[train], flipped, x[test], y[test]


def train_mlp(x: np.ndarray, y: np.ndarray, hidden: int | list[int] = 32, epochs: int = 300, seed: int = 0,
              weight_decay: float = 0.0, lr: float = 1e-2, batch_size: int | None = None) -> nn.Sequential:
    """A small MLP trained (full batch Adam by default) until it fits its training set, noise included."""
    torch.manual_seed(seed)
    sizes = [hidden] if isinstance(hidden, int) else list(hidden)
    layers: list[nn.Module] = []
    width = x.shape[1]
    for h in sizes:
        layers += [nn.Linear(width, h), nn.Tanh()]
        width = h
    layers.append(nn.Linear(width, int(y.max()) + 1 if y.max() >= 9 else 10))
    model = nn.Sequential(*layers)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        if batch_size is None:
            batches = [torch.arange(len(xt))]
        else:
            batches = torch.randperm(len(xt), generator=g).split(batch_size)
        for idx in batches:
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    return model.eval()


def recall_at(scores: np.ndarray, flipped: np.ndarray, fraction: float) -> float:
    k = int(round(fraction * len(scores)))
    top = np.argsort(-scores, kind="stable")[:k]
    return float(flipped[top].sum() / flipped.sum())
